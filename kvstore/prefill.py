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


def prefill_chunk(model: Any, token_ids: Sequence[int], context: Sequence[int] = ()) -> ChunkRecord:
    """Prefill `token_ids` after `context` (positions C..C+S-1) and return every layer's K and V of the chunk.

    With an empty context the chunk is computed alone from position 0, and its first tokens become attention
    sinks that no longer are once the chunk sits inside a prompt. Conditioning on the prompt's fixed header
    (system prompt, BOS) puts the sink where it will be at answer time, so the reused K/V stay close to what a
    full prefill computes (CacheBlend's own code prepends the prompt prefix; EPIC and APE discuss the sinks).

    A plain `DynamicCache()` (one full layer per decoder layer) is used on purpose: with
    `DynamicCache(config=...)` Gemma-3's sliding layers would keep only the last `sliding_window - 1` tokens,
    while a record must hold the whole chunk. The attention masks (sliding ones included) come from the model's
    config, not from the cache, so the values are the same.

    Args:
        model: a transformers causal LM (Llama, Qwen2, Gemma-3 ... families) in eval mode.
        token_ids: the chunk's token ids, at least one.
        context: token ids to prefill first; their K/V are dropped (the record keeps them in `context`).

    Returns:
        A ChunkRecord with `start=len(context)`, layers `[H_kv, S, D]` in the model's dtype.

    Raises:
        InputError: empty chunk.
    """
    import torch
    from transformers import DynamicCache

    ids = [int(t) for t in token_ids]
    ctx = [int(t) for t in context]
    if not ids:
        raise InputError("cannot prefill an empty chunk")
    device = next(model.parameters()).device
    input_ids = torch.tensor([ctx + ids], dtype=torch.long, device=device)  # [1, C + S]
    cache = DynamicCache()
    with torch.no_grad():
        # The decoder alone: the LM head's logits are not needed for K/V.
        model.model(input_ids=input_ids, cache=cache, use_cache=True)
    # [H_kv, S, D] per layer (batch dimension dropped)
    c = len(ctx)
    layers = [(layer.keys[0, :, c:].detach().clone(), layer.values[0, :, c:].detach().clone())
              for layer in cache.layers]
    return ChunkRecord(
        fingerprint=model_fingerprint(model),
        token_ids=tuple(ids),
        start=c,
        context=tuple(ctx),
        layers=layers,
        dtype=layers[0][0].dtype,
        layer_types=layer_types_of(model),
    )
