"""ragzip: RAG context compression middleware.

Example:
    >>> from ragzip import RagZip, Budget
    >>> result = RagZip("exit").compress(query, documents, budget=Budget.ratio(0.3))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "CompressedDocument",
    "CompressionRequest",
    "CompressionResult",
    "Document",
    "LocalEngine",
    "Pipeline",
    "RagZip",
    "RagzipError",
    "Span",
]

_EXPORTS = {
    "Budget": "ragzip.budget",
    "CompressedDocument": "ragzip.types",
    "CompressionRequest": "ragzip.compressors.base",
    "CompressionResult": "ragzip.types",
    "Document": "ragzip.types",
    "Span": "ragzip.types",
    "LocalEngine": "ragzip.engine",
    "Pipeline": "ragzip.pipeline",
    "RagZip": "ragzip.api",
    "RagzipError": "ragzip.errors",
}

if TYPE_CHECKING:
    from ragzip.api import RagZip
    from ragzip.budget import Budget
    from ragzip.compressors.base import CompressionRequest
    from ragzip.engine import LocalEngine
    from ragzip.errors import RagzipError
    from ragzip.pipeline import Pipeline
    from ragzip.types import CompressedDocument, CompressionResult, Document, Span


def __getattr__(name: str) -> Any:
    # Lazy: `import ragzip` must not import torch or transformers.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ragzip' has no attribute {name!r}")
