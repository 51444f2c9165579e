"""ChunkRecord: the per-layer K and V of one chunk prefilled alone."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ragzip.errors import CodecError
from ragzip.kvstore.key import chunk_key

if TYPE_CHECKING:
    import torch

LayerKV = tuple["torch.Tensor", "torch.Tensor"]


@dataclass(slots=True)
class ChunkRecord:
    """One chunk's KV cache, computed at positions `start .. start + S - 1` after `context` (if any).

    Attributes:
        fingerprint: `model_fingerprint(model)` of the model that computed it.
        token_ids: the chunk's token ids (S of them).
        start: the position of the first token when it was computed (`len(context)` for `prefill_chunk`).
        layers: one `(K, V)` pair per decoder layer, each `[H_kv, S, D]` (no batch dimension). Sliding-window
            layers hold the whole chunk too.
        dtype: the dtype K and V were computed in (a decoded record is cast back to it).
        layer_types: `config.layer_types` (e.g. `"full_attention"`, `"sliding_attention"`), one per layer.
        context: token ids the chunk was prefilled after (a chat header that takes the attention sink, so the
            chunk's own first tokens do not); their K/V are not part of the record.
    """

    fingerprint: str
    token_ids: tuple[int, ...]
    start: int
    layers: list[LayerKV]
    dtype: torch.dtype
    layer_types: tuple[str, ...] = field(default=())
    context: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        self.token_ids = tuple(int(t) for t in self.token_ids)
        self.context = tuple(int(t) for t in self.context)
        self.layer_types = tuple(self.layer_types) or ("full_attention",) * len(self.layers)
        self.validate()

    @property
    def key(self) -> str:
        """`chunk_key(fingerprint, token_ids, context)`."""
        return chunk_key(self.fingerprint, self.token_ids, self.context)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def positions(self) -> range:
        """The positions the chunk was computed at."""
        return range(self.start, self.start + self.num_tokens)

    @property
    def nbytes(self) -> int:
        """Bytes held by the K/V tensors."""
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)

    def validate(self) -> None:
        """Check shapes and metadata agree.

        Raises:
            CodecError: the layers are not `[H_kv, S, D]` with S = len(token_ids), or layer_types mismatch.
        """
        if self.start < 0:
            raise CodecError(f"chunk record start must be >= 0, got {self.start}")
        if len(self.layer_types) != len(self.layers):
            raise CodecError(f"{len(self.layer_types)} layer types for {len(self.layers)} layers")
        for i, (k, v) in enumerate(self.layers):
            if k.dim() != 3 or v.dim() != 3 or k.shape[1] != self.num_tokens or v.shape[1] != self.num_tokens:
                raise CodecError(
                    f"layer {i}: K {tuple(k.shape)} / V {tuple(v.shape)} are not [H_kv, {self.num_tokens}, D]"
                )

    def to_cache_data(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer `(K, V)` with a batch dimension, `[1, H_kv, S, D]`, as `DynamicCache(ddp_cache_data=...)` takes."""
        return [(k.unsqueeze(0), v.unsqueeze(0)) for k, v in self.layers]


def same_layers(a: Sequence[LayerKV], b: Sequence[LayerKV]) -> bool:
    """Exact equality of two layer lists (shapes, dtypes and values)."""
    import torch

    return len(a) == len(b) and all(
        ka.dtype == kb.dtype and torch.equal(ka, kb) and torch.equal(va, vb) for (ka, va), (kb, vb) in zip(a, b)
    )
