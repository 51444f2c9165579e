"""Per-token KV deviation and top-k token selection for selective recompute."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def kv_deviation(fresh: Tensor, cached: Tensor) -> Tensor:
    """Squared L2 deviation of each token's fresh K (or V) from its reused one, summed over KV heads.

    Args:
        fresh: ``[B, H_kv, S, D]`` or ``[H_kv, S, D]`` states recomputed in the full context.
        cached: same shape, the reused (re-rotated) states.

    Returns:
        ``[S]`` deviations (float32), batch summed.
    """
    diff = fresh.float() - cached.float()  # [..., H_kv, S, D]
    per_head = diff.pow(2).sum(dim=-1)  # [..., H_kv, S]
    return per_head.reshape(-1, per_head.shape[-1]).sum(dim=0)  # [S]


def num_to_select(num_candidates: int, ratio: float) -> int:
    """How many of ``num_candidates`` reused tokens a ``ratio`` in [0, 1] recomputes (rounded up)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    return min(num_candidates, math.ceil(ratio * num_candidates - 1e-9))


def select_tokens(scores: Tensor, forced: Tensor, num_select: int, eligible: Tensor | None = None) -> Tensor:
    """Indices of the ``num_select`` highest-scoring eligible unforced tokens plus every forced one, ascending.

    Args:
        scores: ``[S]`` deviation (or any priority) per token.
        forced: ``[S]`` bool, tokens always kept (the prompt's last tokens, tokens with no cached entry).
        num_select: how many unforced tokens to keep (clamped to the number available).
        eligible: ``[S]`` bool, tokens that may be selected (default: all); e.g. not an exact prefix.

    Returns:
        ``[S']`` int64 indices into the ``S`` tokens, sorted ascending.
    """
    free = ~forced if eligible is None else eligible & ~forced
    masked = scores.float().masked_fill(~free, float("-inf"))  # [S]
    k = max(0, min(num_select, int(free.sum())))
    top = torch.topk(masked, k).indices if k else torch.empty(0, dtype=torch.long, device=scores.device)
    keep = forced.clone()
    keep[top] = True
    return keep.nonzero().squeeze(-1)


def query_attention(query: Tensor, key: Tensor, q_pos: Tensor, *, scaling: float) -> Tensor:
    """How much the question attends to each token: mean softmax attention of ``query`` rows over ``key``.

    ProphetKV's signal: tokens the question reads are the ones whose stale K/V would hurt the answer.

    Args:
        query: ``[1, H, q, D]`` rotated queries of the question tokens.
        key: ``[1, H_kv, N, D]`` rotated keys of every prompt token (positions ``0..N-1``).
        q_pos: ``[q]`` global positions of the queries (causal: a query sees keys at or before it).
        scaling: the attention softmax scale.

    Returns:
        ``[N]`` float32 attention mass per key, averaged over heads and queries (sums to 1).
    """
    _, num_heads, q, head_dim = query.shape
    num_kv_heads, n = key.shape[1], key.shape[2]
    groups = num_heads // num_kv_heads
    qg = query.float().reshape(num_kv_heads, groups * q, head_dim)  # [H_kv, G*q, D]
    logits = torch.bmm(qg, key[0].float().transpose(1, 2)) * scaling  # [H_kv, G*q, N]
    visible = torch.arange(n, device=key.device)[None, :] <= q_pos.repeat(groups)[:, None]  # [G*q, N]
    probs = logits.masked_fill(~visible, float("-inf")).softmax(-1)
    return probs.mean(dim=(0, 1))  # [N]


def random_scores(num_tokens: int, *, seed: int, device: torch.device | str = "cpu") -> Tensor:
    """Uniform random priorities: the control selection strategy."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.rand(num_tokens, generator=gen).to(device)


def gradual_ratios(final_ratio: float, *, start_ratio: float, num_layers: int) -> list[float]:
    """Selection ratios (of all reused tokens) for ``num_layers + 1`` consecutive filtering layers.

    The set starts at ``start_ratio`` at the check layer and shrinks geometrically to ``final_ratio``
    over the next ``num_layers`` layers (CacheBlend's gradual filtering). ``num_layers = 0`` gives
    ``[final_ratio]``: one-shot selection.
    """
    if num_layers <= 0 or start_ratio <= final_ratio or final_ratio <= 0.0:
        return [final_ratio]
    step = (final_ratio / start_ratio) ** (1.0 / num_layers)
    return [start_ratio * step**i for i in range(num_layers)] + [final_ratio]
