"""The prompt the proxy sends to vLLM: stable pieces, documents in a canonical order, and the spans the connector keys.

vLLM's prefix cache (and the connector's exact entries) hit only on an identical prefix. Three things make the same
documents give the same prefix: the prompt is built from `PromptBuilder` pieces (a document's tokens never depend
on its neighbours), sent as token ids (vLLM does not re-tokenise across seams), and the documents go in a canonical
order (by a hash of their tokens), so a set that recurs in another order is the same prompt. The spans name each
document's token range for the connector (`kv_transfer_params["ragzip"]`).

Seams are not padded to vLLM's block size: the connector reads and writes token ranges, so a document seam may fall
anywhere; only the claim's end is block aligned (and padding to 128-token blocks would cost ~60 tokens a document).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ragzip.prompt import Message, PromptBuilder
from ragzip.types import Document
from ragzip.vllm.plan import PARAMS_KEY


@dataclass(frozen=True, slots=True)
class LaidOutPrompt:
    """Token ids for `/v1/completions`, the spans for the connector, and the order the documents went in."""

    token_ids: list[int]
    spans: list[dict[str, Any]]
    order: list[int]

    def kv_transfer_params(self) -> dict[str, Any]:
        return {PARAMS_KEY: {"spans": self.spans}}


def document_digest(token_ids: Sequence[int]) -> str:
    """A document's name in the spans: blake2b of its token ids (platform independent, as store keys are)."""
    return hashlib.blake2b(np.asarray(list(token_ids), dtype="<i8").tobytes(), digest_size=8).hexdigest()


def lay_out(builder: PromptBuilder, question: str, documents: Sequence[Document], *, system: str | None = None,
            history: Sequence[Message] = (), canonical: bool = True) -> LaidOutPrompt:
    """The answer prompt as vLLM receives it from the proxy.

    Args:
        builder: a `PromptBuilder` on the upstream model's tokenizer.
        question, documents, system, history: as `PromptBuilder.pieces` takes them.
        canonical: sort the documents by their digest (default); False keeps the caller's order.
    """
    pieces = builder.pieces(question, documents, system=system, history=history)
    digests = [document_digest(d) for d in pieces.documents]
    order = sorted(range(len(digests)), key=digests.__getitem__) if canonical else list(range(len(digests)))
    ids = list(pieces.header)
    spans = []
    for i in order:
        doc = pieces.documents[i]
        spans.append({"start": len(ids), "end": len(ids) + len(doc), "doc": digests[i]})
        ids += doc
    return LaidOutPrompt(ids + pieces.tail, spans, order)


__all__ = ["LaidOutPrompt", "document_digest", "lay_out"]
