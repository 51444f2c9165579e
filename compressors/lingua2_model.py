"""Token-classifier loading and batched keep-probability scoring for the LLMLingua-2-style compressor."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ragzip.errors import ModelNotFoundError, UnsupportedModelError
from ragzip.registry import quiet_loading

DEFAULT_MODEL = "ragzip-lingua2-minilm"
WEIGHTS_DIR = Path(__file__).parent / "weights" / "lingua2"
_DEFAULT_ALIASES = frozenset({"", "default", DEFAULT_MODEL})
_MAX_DELTA_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class TokenClassifier:
    """A loaded token classifier (class 1 = keep) and its fast tokenizer."""

    name: str
    model: Any
    tokenizer: Any
    max_seq_len: int

    def encode(self, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(ids [T], char offsets [T, 2]) per text, without special tokens, from the fast tokenizer's backend."""
        encs = self.tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [(np.asarray(e.ids, dtype=np.int64), np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2)) for e in encs]

    def keep_probs(self, windows: Sequence[np.ndarray], *, batch_size: int = 8, add_sep: Sequence[bool] = (),
                   reference_wrap: bool = False) -> list[np.ndarray]:
        """P(keep) for every body token of each window; windows are wrapped in [CLS] ... [SEP] here.

        Args:
            windows: token-id arrays of at most `max_seq_len - 1` tokens.
            batch_size: windows per forward pass (sorted by length so padding stays small).
            add_sep: per window, whether to append [SEP] (default True); the reference drops it from a window of
                `max_seq_len - 1` body tokens by truncation.
            reference_wrap: wrap with the ids of the literal strings "[CLS]" / "[SEP]", as the reference does for
                every model (for an XLM-RoBERTa vocabulary these are the <unk> id).
        """
        import torch

        tok = self.tokenizer
        if reference_wrap:
            cls_id, sep_id = tok.convert_tokens_to_ids("[CLS]"), tok.convert_tokens_to_ids("[SEP]")
        else:
            cls_id, sep_id = tok.cls_token_id, tok.sep_token_id
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        seqs = []
        for i, w in enumerate(windows):
            sep = [sep_id] if (add_sep[i] if add_sep else True) else []
            seqs.append(np.concatenate([[cls_id], w, sep]).astype(np.int64))
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        out: list[np.ndarray] = [np.zeros(0, dtype=np.float32)] * len(seqs)
        with torch.inference_mode():
            for lo in range(0, len(order), batch_size):
                idx = order[lo: lo + batch_size]
                width = len(seqs[idx[0]])
                ids = torch.full((len(idx), width), pad_id, dtype=torch.long)  # [B, S]
                mask = torch.zeros((len(idx), width), dtype=torch.long)  # [B, S]
                for row, i in enumerate(idx):
                    ids[row, : len(seqs[i])] = torch.from_numpy(seqs[i])
                    mask[row, : len(seqs[i])] = 1
                device = next(self.model.parameters()).device
                logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # [B, S, 2]
                probs = torch.softmax(logits.float(), dim=-1)[..., 1].cpu().numpy()  # [B, S]
                for row, i in enumerate(idx):
                    out[i] = probs[row, 1: 1 + len(windows[i])].astype(np.float32)
        return out


def load_token_classifier(name: str | None = None, dtype: str = "float32",
                          device: str | None = None) -> TokenClassifier:
    """Load a token classifier by alias, local folder or Hugging Face name (cached per process, dtype and device;
    `device` None is cpu, "auto" cuda when available).

    `dtype` is "float32" (the reference's numerics: parity needs it), "bfloat16", or "auto" (bf16 where the CPU
    has native bf16 support, else float32).

    The default (`None`, "default" or "ragzip-lingua2-minilm") is ragzip's own classifier: the packaged
    all-MiniLM-L6-v2 encoder with the trained top layers and head from `weights/lingua2/` applied on top.

    Raises:
        ModelNotFoundError: the weights cannot be found on this machine.
        UnsupportedModelError: the model is not a 2-label token classifier with a fast tokenizer.
    """
    from ragzip.registry import resolve_device, resolve_dtype

    target = resolve_device(device) if device is not None else "cpu"
    torch_dtype = resolve_dtype(dtype, target)
    return _load_cached(name, str(torch_dtype).removeprefix("torch."), target)


@lru_cache(maxsize=4)
def _load_cached(name: str | None, dtype: str, device: str = "cpu") -> TokenClassifier:
    import torch

    clf = _load(name)
    if dtype != "float32":
        clf.model.to(getattr(torch, dtype))
    if device != "cpu":
        clf.model.to(device)
    return clf


def _load(name: str | None) -> TokenClassifier:
    if name is None or name.lower() in _DEFAULT_ALIASES:
        return _load_default()
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    path = Path(name).expanduser()
    source = str(path) if path.exists() else name
    if not path.exists() and name.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"token classifier path {name!r} does not exist")
    try:
        with quiet_loading():
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForTokenClassification.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(
            f"could not load token classifier {name!r} offline ({type(exc).__name__}: {exc}); use the default "
            f"model, a local folder, or a Hugging Face name cached on this machine"
        ) from exc
    return _checked(name, model, tokenizer)


def _checked(name: str, model: Any, tokenizer: Any) -> TokenClassifier:
    if getattr(model.config, "num_labels", None) != 2:
        raise UnsupportedModelError(f"{name!r} has {model.config.num_labels} labels; a keep/drop classifier has 2")
    if not getattr(tokenizer, "is_fast", False):
        raise UnsupportedModelError(f"{name!r} needs a fast tokenizer (char offsets) for faithful spans")
    model.eval()
    # sentence-transformers folders ship a backend truncation (e.g. 128 tokens); windows are cut here instead
    tokenizer.backend_tokenizer.no_truncation()
    tokenizer.backend_tokenizer.no_padding()
    max_len = min(512, int(getattr(model.config, "max_position_embeddings", 512)))
    return TokenClassifier(name, model, tokenizer, max_len)


def _load_default() -> TokenClassifier:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

    from ragzip.registry import resolve_embedder

    card_path, delta_path = WEIGHTS_DIR / "config.json", WEIGHTS_DIR / "model.safetensors"
    if not delta_path.exists():
        raise ModelNotFoundError(f"the default lingua2 weights are missing from {WEIGHTS_DIR}; reinstall ragzip")
    if delta_path.stat().st_size > _MAX_DELTA_BYTES:
        raise ModelNotFoundError(f"{delta_path} is larger than expected; refusing to load it")
    card = json.loads(card_path.read_text())
    base = Path(resolve_embedder(card["base"]))
    with quiet_loading():
        config = BertConfig.from_pretrained(base, num_labels=2)
    model = BertForTokenClassification(config)
    state = {f"bert.{k}": v for k, v in load_file(str(base / "model.safetensors")).items()}
    state.update({k: v.to(torch.float32) for k, v in load_file(str(delta_path)).items()})
    own = model.state_dict()
    unknown = [k for k in state if k not in own and not k.startswith("bert.pooler.") and "position_ids" not in k]
    if unknown:
        raise UnsupportedModelError(f"default lingua2 weights do not fit the base encoder: {unknown[:3]}")
    missing = model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False).missing_keys
    missing = [k for k in missing if not k.startswith("bert.pooler.") and "position_ids" not in k]
    if missing:
        raise UnsupportedModelError(f"default lingua2 weights leave parameters unset: {missing[:3]}")
    with quiet_loading():
        tokenizer = AutoTokenizer.from_pretrained(base)
    return _checked(DEFAULT_MODEL, model, tokenizer)


def save_full_model(target: Path, name: str | None = None) -> Path:
    """Write `name` (default: ragzip's classifier) as an ordinary transformers folder, e.g. to load it elsewhere."""
    clf = load_token_classifier(name)
    clf.model.save_pretrained(target)
    clf.tokenizer.save_pretrained(target)
    return target
