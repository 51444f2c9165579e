"""Sentence-transformers embeddings (normalised, so inner product = cosine)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class Embedder:
    """Wraps a SentenceTransformer resolved by the model registry (default: packaged all-MiniLM-L6-v2)."""

    def __init__(self, name: str | None = None, *, batch_size: int = 64, device: str | None = "auto") -> None:
        from ragzip.registry import DEFAULT_EMBEDDER, load_embedder

        self.name = name or DEFAULT_EMBEDDER
        self.model: Any = load_embedder(name, device)
        self.batch_size = batch_size
        # sentence-transformers 6 renamed the getter; accept both.
        getter = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(getter())

    def encode(self, texts: Sequence[str]) -> Any:
        """float32 array [N, dim], L2-normalised."""
        import numpy as np

        if not texts:
            return np.zeros((0, self.dim), dtype="float32")
        emb = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(emb, dtype="float32")
