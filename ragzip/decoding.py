"""Greedy decoding and UTF-8-safe text streaming, shared by the plain and the KV-reuse engines.

An engine supplies the first logits (its prefill) and a `step(token_id) -> logits` that runs one token through
its cache; everything after the prefill is the same for both.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

_ANSWER_PREFIX = re.compile(r"^(the )?(short )?answer( to (this|the) question)?( is)?\s*[:\-]\s*", re.IGNORECASE)


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every id that ends a reply: the tokenizer's EOS and the generation config's (one id or a list)."""
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    for source in (tokenizer.eos_token_id, getattr(config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(x) for x in source)
    return ids


def greedy_ids(logits: Any, step: Callable[[int], Any], *, eos: set[int], max_new_tokens: int) -> Iterator[int]:
    """Token ids by argmax until EOS or `max_new_tokens`; `step` is not called for a token that will not be used."""
    for i in range(max_new_tokens):
        token = int(logits.argmax())
        if token in eos:
            return
        yield token
        if i + 1 < max_new_tokens:
            logits = step(token)


def text_deltas(tokenizer: Any, token_ids: Iterable[int]) -> Iterator[str]:
    """The decoded text of `token_ids` as it grows, never splitting a multi-byte character."""
    generated: list[int] = []
    shown = ""
    for token in token_ids:
        generated.append(token)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue  # an incomplete UTF-8 sequence: wait for the next token
        if len(text) > len(shown):
            yield text[len(shown):]
            shown = text


def clean_answer(text: str) -> str:
    """A generated answer without a leading "The answer is:" (small models like to add one)."""
    return _ANSWER_PREFIX.sub("", text.strip()).strip()


__all__ = ["clean_answer", "eos_ids", "greedy_ids", "text_deltas"]
