"""FAISS vector index over documents: exact (flat) or approximate (HNSW), incremental adds, save/load.

Saved as three files: `index.faiss` (faiss's own format), `documents.jsonl` (one document a line) and
`meta.json`; nothing is pickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any

from ragzip.errors import ConfigError, InputError
from ragzip.options import parse_enum
from ragzip.threads import limit_blas_threads
from ragzip.types import Document

FORMAT_VERSION = 1


class IndexKind(str, Enum):
    FLAT = "flat"  # exact inner product
    HNSW = "hnsw"  # approximate, incremental, no training


def _new_faiss_index(kind: IndexKind, dim: int, hnsw_m: int) -> Any:
    import faiss

    limit_blas_threads()

    if kind is IndexKind.FLAT:
        return faiss.IndexFlatIP(dim)
    index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efSearch = 64
    return index


class VectorIndex:
    """Documents + their embeddings in a FAISS index; search returns (Document, cosine score)."""

    def __init__(self, dim: int, *, kind: str | IndexKind = IndexKind.FLAT, embedder: str | None = None,
                 hnsw_m: int = 32) -> None:
        if dim <= 0:
            raise ConfigError(f"dim must be positive, got {dim}")
        self.dim = dim
        self.kind = parse_enum(IndexKind, kind, "index kind")
        self.embedder = embedder
        self.hnsw_m = hnsw_m
        self.index = _new_faiss_index(self.kind, dim, hnsw_m)
        self.documents: list[Document] = []

    def __len__(self) -> int:
        return len(self.documents)

    def add(self, documents: Sequence[Document], embeddings: Any) -> None:
        import numpy as np

        emb = np.ascontiguousarray(embeddings, dtype="float32")
        if emb.ndim != 2 or emb.shape != (len(documents), self.dim):
            raise InputError(f"expected embeddings of shape ({len(documents)}, {self.dim}), got {emb.shape}")
        known = {d.id for d in self.documents}
        for d in documents:
            if d.id in known:
                raise InputError(f"document id {d.id!r} is already in the index")
            known.add(d.id)
        self.index.add(emb)
        self.documents.extend(documents)

    def search(self, query_embedding: Any, k: int = 5) -> list[tuple[Document, float]]:
        import numpy as np

        if k <= 0:
            raise ConfigError(f"k must be positive, got {k}")
        if not self.documents:
            return []
        q = np.ascontiguousarray(query_embedding, dtype="float32").reshape(1, self.dim)
        scores, ids = self.index.search(q, min(k, len(self.documents)))
        return [(self.documents[i], float(s)) for s, i in zip(scores[0], ids[0]) if i >= 0]

    def save(self, path: str | Path) -> None:
        """Write the index folder; files are replaced atomically one by one."""
        import faiss

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(path / "index.faiss.tmp"))
        os.replace(path / "index.faiss.tmp", path / "index.faiss")
        with open(path / "documents.jsonl.tmp", "w", encoding="utf-8") as fh:
            for d in self.documents:
                fh.write(json.dumps({"id": d.id, "title": d.title, "text": d.text, "metadata": dict(d.metadata)},
                                    ensure_ascii=False) + "\n")
        os.replace(path / "documents.jsonl.tmp", path / "documents.jsonl")
        meta = {"format_version": FORMAT_VERSION, "dim": self.dim, "kind": self.kind.value, "hnsw_m": self.hnsw_m,
                "embedder": self.embedder, "count": len(self.documents)}
        (path / "meta.json.tmp").write_text(json.dumps(meta, indent=1))
        os.replace(path / "meta.json.tmp", path / "meta.json")

    @classmethod
    def load(cls, path: str | Path) -> VectorIndex:
        import faiss

        limit_blas_threads()
        path = Path(path)
        try:
            meta = json.loads((path / "meta.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{path} is not a ragzip index ({exc})") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise InputError(f"{path}: unsupported index format {meta.get('format_version')!r}")
        self = cls(int(meta["dim"]), kind=meta["kind"], embedder=meta.get("embedder"), hnsw_m=int(meta["hnsw_m"]))
        self.index = faiss.read_index(str(path / "index.faiss"))
        with open(path / "documents.jsonl", encoding="utf-8") as fh:
            for line in fh:
                o = json.loads(line)
                self.documents.append(Document(o["id"], o["text"], o.get("title", ""), o.get("metadata") or {}))
        if self.index.ntotal != len(self.documents) or self.index.d != self.dim or len(self.documents) != meta["count"]:
            raise InputError(f"{path}: index and documents disagree ({self.index.ntotal} vectors, "
                             f"{len(self.documents)} documents, meta count {meta['count']})")
        return self
