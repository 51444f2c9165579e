"""Compute one chunk's KV alone with a transformers causal LM."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ragzip.errors import InputError
from ragzip.kvstore.fingerprint import model_fingerprint
from ragzip.kvstore.record import ChunkRecord


def layer_types_of(model: Any) -> tuple[str, ...]:
    """`config.layer_types`, or all `"full_attention"` for models that do not declare them."""
    config = model.config.get_text_config(decoder=True)
    n = int(config.num_hidden_layers)
    types = getattr(config, "layer_types", None)
    return tuple(types) if types else ("full_attention",) * n


def prefill_chunk(model: Any, token_ids: Sequence[int]) -> ChunkRecord:
    """Prefill `token_ids` alone at positions 0..S-1 and return every layer's K and V.

    A plain `DynamicCache()` (one full layer per decoder layer) is used on purpose: with
    `DynamicCache(config=...)` Gemma-3's sliding layers would keep only the last `sliding_window - 1` tokens,
    while a record must hold the whole chunk. The attention masks (sliding ones included) come from the model's
    config, not from the cache, so the values are the same.

    Args:
        model: a transformers causal LM (Llama, Qwen2, Gemma-3 ... families) in eval mode.
        token_ids: the chunk's token ids, at least one.

    Returns:
        A ChunkRecord with `start=0`, layers `[H_kv, S, D]` in the model's dtype.

    Raises:
        InputError: empty chunk.
    """
    import torch
    from transformers import DynamicCache

    ids = [int(t) for t in token_ids]
    if not ids:
        raise InputError("cannot prefill an empty chunk")
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)  # [1, S]
    cache = DynamicCache()
    with torch.no_grad():
        # The decoder alone: the LM head's logits are not needed for K/V.
        model.model(input_ids=input_ids, cache=cache, use_cache=True)
    # [H_kv, S, D] per layer (batch dimension dropped)
    layers = [(layer.keys[0].detach().clone(), layer.values[0].detach().clone()) for layer in cache.layers]
    return ChunkRecord(
        fingerprint=model_fingerprint(model),
        token_ids=tuple(ids),
        start=0,
        layers=layers,
        dtype=layers[0][0].dtype,
        layer_types=layer_types_of(model),
    )
