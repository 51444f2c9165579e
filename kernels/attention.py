"""Partial attention of selected queries over a whole KV cache, with an exact causal mask by global position."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def causal_mask(
    q_pos: Tensor, kv_pos: Tensor, *, sliding_window: int | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Additive 4D mask letting query ``i`` see key ``j`` iff ``kv_pos[j] <= q_pos[i]`` (and within the window).

    Args:
        q_pos: ``[r]`` global positions of the queries (any order, need not be contiguous).
        kv_pos: ``[N]`` global positions of the keys.
        sliding_window: for sliding layers, also require ``q_pos - kv_pos < sliding_window`` (HF convention).
        dtype: the query dtype; masked entries hold ``finfo(dtype).min``.

    Returns:
        ``[1, 1, r, N]`` float mask (0 = visible).
    """
    dist = q_pos[:, None] - kv_pos[None, :]  # [r, N]
    visible = dist >= 0
    if sliding_window is not None:
        visible &= dist < sliding_window
    mask = torch.zeros(visible.shape, dtype=dtype, device=q_pos.device)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[None, None]  # [1, 1, r, N]


def partial_attention(
    query: Tensor, key: Tensor, value: Tensor, q_pos: Tensor, *, scaling: float, sliding_window: int | None = None
) -> Tensor:
    """Reference attention of ``r`` selected queries over all ``N`` cached keys (positions ``0..N-1``).

    GQA is handled by folding the ``G`` query groups into the query axis instead of repeating K/V.

    Args:
        query: ``[B, H, r, D]`` rotated queries.
        key: ``[B, H_kv, N, D]`` rotated keys (fresh rows already scattered in).
        value: ``[B, H_kv, N, D]``.
        q_pos: ``[r]`` global positions of the queries.
        scaling: softmax scale.
        sliding_window: window of a sliding layer, or None.

    Returns:
        ``[B, r, H, D]`` attention output (HF attention-function layout).
    """
    batch, num_heads, r, head_dim = query.shape
    num_kv_heads, n = key.shape[1], key.shape[2]
    groups = num_heads // num_kv_heads
    q = query.reshape(batch, num_kv_heads, groups * r, head_dim)  # [B, H_kv, G*r, D]
    kv_pos = torch.arange(n, device=query.device)
    mask = causal_mask(q_pos, kv_pos, sliding_window=sliding_window, dtype=query.dtype)  # [1, 1, r, N]
    mask = mask.repeat(1, 1, groups, 1)  # [1, 1, G*r, N]
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)  # [B, H_kv, G*r, D]
    return out.reshape(batch, num_heads, r, head_dim).transpose(1, 2)  # [B, r, H, D]


def scatter_kv(cache_states: Tensor, index: Tensor, fresh_states: Tensor) -> Tensor:
    """Write fresh rows into a reused cache in place.

    Args:
        cache_states: ``[B, H_kv, N, D]`` reused keys or values.
        index: ``[r]`` token positions of the fresh rows.
        fresh_states: ``[B, H_kv, r, D]``.

    Returns:
        ``cache_states`` (modified in place).
    """
    if fresh_states.shape[2] == cache_states.shape[2]:
        cache_states.copy_(fresh_states)
    else:
        cache_states.index_copy_(2, index, fresh_states.to(cache_states.dtype))
    return cache_states
