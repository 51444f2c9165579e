"""Token counting with a named tokenizer (default: the local LLM's)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, Protocol, runtime_checkable

_WORD = re.compile(r"\S+")


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


@lru_cache(maxsize=8)
def get_token_counter(name: str | None = None) -> TokenCounter:
    """Resolve a tokenizer name to a counter: `whitespace`, a model alias of the registry, a local path or a
    Hugging Face name. None means the local LLM's tokenizer."""
    if name == "whitespace":
        return WhitespaceCounter()
    from ragzip.registry import load_tokenizer

    tok = load_tokenizer(name)
    return HFTokenCounter(tok, name or "default-llm")
