"""get_or_compute: the one call the engine makes per chunk."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ragzip.kvstore.fingerprint import model_fingerprint
from ragzip.kvstore.key import chunk_key
from ragzip.kvstore.prefill import prefill_chunk
from ragzip.kvstore.record import ChunkRecord
from ragzip.kvstore.stores.base import ChunkStore


def get_or_compute(store: ChunkStore | None, model: Any, token_ids: Sequence[int],
                   context: Sequence[int] = ()) -> tuple[ChunkRecord, bool]:
    """Load a chunk's KV from `store`, or prefill it (after `context`) and store it.

    A miss, a bad entry or an unreachable store all end in a recompute (the store counts why); only a model
    error propagates. The record comes back on the model's device, in the model's dtype.

    Args:
        store: any ChunkStore, or None to always compute.
        model: a transformers causal LM.
        token_ids: the chunk's token ids.
        context: token ids the chunk is computed after (see `prefill_chunk`); part of the key.

    Returns:
        (record, hit) where hit says it came from the store.
    """
    ids = tuple(int(t) for t in token_ids)
    ctx = tuple(int(t) for t in context)
    fp = model_fingerprint(model)
    key = chunk_key(fp, ids, ctx)
    if store is not None:
        record = store.get(key)
        if record is not None and record.fingerprint == fp and record.token_ids == ids and record.context == ctx:
            return _to_model(record, model), True
    record = prefill_chunk(model, ids, ctx)
    if store is not None:
        store.put(key, record)
    return record, False


def _to_model(record: ChunkRecord, model: Any) -> ChunkRecord:
    param = next(model.parameters())
    if all(k.device == param.device and k.dtype == param.dtype for k, _ in record.layers):
        return record
    layers = [(k.to(param.device, param.dtype), v.to(param.device, param.dtype)) for k, v in record.layers]
    return ChunkRecord(record.fingerprint, record.token_ids, record.start, layers, param.dtype, record.layer_types,
                       record.context)
