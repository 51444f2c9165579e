"""Moving one entry between the store and vLLM's paged cache: verify, (re-rotate,) write; or gather and build.

The connector's worker half runs these per load and per save; they need torch but not vLLM, so the fallback rules
(a missing, corrupt, foreign or mismatched entry is never written into the cache) are tested in the default suite.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ragzip.kernels.rope import rerotate_keys
from ragzip.kvstore.record import ChunkRecord
from ragzip.kvstore.stores.base import ChunkStore
from ragzip.vllm.paged import PagedLayout
from ragzip.vllm.plan import Load, Segment, moved_fingerprint, slots_for


def entry_problem(record: ChunkRecord | None, load: Load, prompt: Sequence[int], *, fingerprint: str,
                  num_layers: int, dtype: torch.dtype) -> str | None:
    """Why `record` may not fill `load` of `prompt` (None when it may).

    The store already checked the blob's checksum and that its key is the hash of its own fingerprint, tokens and
    context; this checks that they are this request's: this model (or its moved-entry fingerprint), the segment's
    tokens, the exact prefix before them (none for a moved entry), and the cache's layer count and dtype.
    """
    if record is None:
        return "missing or corrupt"
    seg = load.segment
    if record.fingerprint != (moved_fingerprint(fingerprint) if load.moved else fingerprint):
        return "another model's entry"
    if list(record.token_ids) != list(prompt[seg.start:seg.end]):
        return "token ids differ"
    if record.context != (() if load.moved else tuple(prompt[:seg.start])):
        return "context differs"
    if record.num_layers != num_layers or record.dtype != dtype:
        return f"{record.num_layers} layers of {record.dtype}; the cache has {num_layers} of {dtype}"
    return None


def load_entry(store: ChunkStore, load: Load, prompt: Sequence[int], *, fingerprint: str,
               caches: Sequence[torch.Tensor], layout: PagedLayout, block_ids: Sequence[int],
               inv_freq: torch.Tensor | None) -> str | None:
    """Write tokens `[load.lo, load.hi)` of the entry into the request's blocks; None on success, else why not
    (and nothing was written). A moved entry's keys are re-rotated to the segment's position."""
    seg = load.segment
    key = seg.moved_key if load.moved else seg.key
    if key is None:
        return "no key"
    record = store.get(key)
    problem = entry_problem(record, load, prompt, fingerprint=fingerprint, num_layers=len(caches),
                            dtype=caches[0].dtype)
    if problem is not None:
        return problem
    assert record is not None
    delta = seg.start - record.start
    if load.moved and delta and inv_freq is None:
        return "a moved entry needs the model's RoPE frequencies"
    slots = slots_for(block_ids, layout.block_size, load.lo, load.hi)
    a, b = load.lo - seg.start, load.hi - seg.start
    for cache, (k, v) in zip(caches, record.layers, strict=True):
        k = k[:, a:b]
        if load.moved and delta:
            assert inv_freq is not None
            k = rerotate_keys(k, delta, inv_freq)
        layout.scatter(cache, slots, k, v[:, a:b])
    return None


def build_records(fingerprint: str, segment: Segment, prompt: Sequence[int],
                  layers: Sequence[tuple[torch.Tensor, torch.Tensor]], *, moved: bool) -> list[tuple[str, ChunkRecord]]:
    """The entries to store for a computed segment: the exact one (after its prefix) and, when `moved`, the
    position-free one."""
    tokens = list(prompt[segment.start:segment.end])
    types = ("full_attention",) * len(layers)
    dtype = layers[0][0].dtype
    out = [(segment.key, ChunkRecord(fingerprint, tokens, segment.start, list(layers), dtype, types,
                                     context=list(prompt[:segment.start])))]
    if moved and segment.moved_key is not None:
        out.append((segment.moved_key, ChunkRecord(moved_fingerprint(fingerprint), tokens, segment.start,
                                                   list(layers), dtype, types)))
    return out


__all__ = ["build_records", "entry_problem", "load_entry"]
