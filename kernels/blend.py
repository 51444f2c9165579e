"""Blended prefill (CacheBlend-style selective recompute) over reused chunk caches.

Layer by layer: the first ``check_layer`` layers run on every token; at the check layer each token's
fresh K (or V) is compared with its reused, re-rotated one and only the most deviating tokens (plus the
prompt's last tokens and every token without a cached entry) go on; from then on only those rows are
recomputed, their fresh K/V are scattered into the reused cache, and they attend over the whole cache
under an exact causal mask by global position. With gradual filtering the set shrinks over a few layers.

Example:
    >>> adapter = HFAdapter(model)
    >>> segs = [Segment(header_ids, header_kv), Segment(chunk_ids, chunk_kv), Segment(question_ids)]
    >>> result = blended_prefill(adapter, segs, BlendConfig(recompute_ratio=0.15))
    >>> next_token = int(result.logits.argmax())
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import Tensor

from ragzip.kernels.attention import causal_mask
from ragzip.kernels.errors import KernelConfigError, UnsupportedModelError
from ragzip.kernels.hf_adapter import HFAdapter, LayerKV, ScatterCache
from ragzip.kernels.rope import rope_cos_sin
from ragzip.kernels.select import (
    gradual_ratios,
    kv_deviation,
    num_to_select,
    query_attention,
    random_scores,
    select_tokens,
)


class Deviation(str, Enum):
    """Which states score a token's deviation at the check layer(s)."""

    VALUE = "value"
    KEY = "key"
    KV = "kv"
    RANDOM = "random"
    QUERY = "query"  # the question's attention alone (ProphetKV); mix with a deviation via query_weight


@dataclass(frozen=True, slots=True)
class BlendConfig:
    """Fixed hyperparameters of selective recompute.

    Attributes:
        recompute_ratio: share of reused tokens recomputed after the check layer(s), in [0, 1].
        check_layer: layers before it run on every token; selection happens at it (>= 0).
        deviation: selection strategy (value / key / kv deviation, or random as a control).
        gradual_layers: 0 = one-shot selection; n > 0 = gradual filtering, shrinking from
            ``gradual_start_ratio`` to ``recompute_ratio`` over n further layers.
        gradual_start_ratio: the first set's size for gradual filtering (default ``min(1, 2 * ratio)``).
        num_last_tokens: prompt tail always recomputed.
        query_weight: share of the question's attention in the selection score, mixed with the deviation
            (each normalised to sum 1 over the candidates); 0 = deviation alone. Ignored for random/query.
            Default 0.5: on held-out MuSiQue questions at 15 % it cuts Qwen2.5-0.5B's KL to full prefill to 0.74x
            plain reuse where value deviation alone gives 0.97x, and ties value deviation on SmolLM2 (0.151 vs
            0.149, top-1 0.868 vs 0.845), at ~10 % more TTFT (the question reads tokens late in the prompt).
        chunk_head_tokens: the first k tokens of every reused, inexact segment are always recomputed (EPIC's
            LegoLink); they count against the ratio's budget.
        fresh_check_kv: write the fresh K/V of every scored token at a check layer (they are computed
            anyway and exact at the first one); False keeps reused K/V for unselected tokens, so that
            ratio 0 is exactly plain reuse.
        row_groups: recomputed rows are run in up to this many position-ordered groups, each attending only
            to the keys before its last row (same result, less attention work); 1 = one pass.
        seed: seed of the random control.
    """

    recompute_ratio: float = 0.15
    check_layer: int = 1
    deviation: Deviation = Deviation.VALUE
    gradual_layers: int = 0
    gradual_start_ratio: float | None = None
    num_last_tokens: int = 1
    query_weight: float = 0.5
    chunk_head_tokens: int = 0
    fresh_check_kv: bool = True
    row_groups: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.recompute_ratio <= 1.0:
            raise KernelConfigError(f"recompute_ratio must be in [0, 1], got {self.recompute_ratio}")
        if self.check_layer < 0 or self.gradual_layers < 0 or self.num_last_tokens < 1 or self.chunk_head_tokens < 0:
            raise KernelConfigError("check_layer, gradual_layers and chunk_head_tokens must be >= 0, "
                                    "num_last_tokens >= 1")
        if self.row_groups < 1:
            raise KernelConfigError(f"row_groups must be >= 1, got {self.row_groups}")
        if not 0.0 <= self.query_weight <= 1.0:
            raise KernelConfigError(f"query_weight must be in [0, 1], got {self.query_weight}")
        if self.gradual_start_ratio is not None and not 0.0 < self.gradual_start_ratio <= 1.0:
            raise KernelConfigError(f"gradual_start_ratio must be in (0, 1], got {self.gradual_start_ratio}")
        if self.deviation not in {d.value for d in Deviation}:
            raise KernelConfigError(f"unknown deviation {self.deviation!r}; valid: {[d.value for d in Deviation]}")
        object.__setattr__(self, "deviation", Deviation(self.deviation))

    def layer_ratios(self) -> list[float]:
        start = self.gradual_start_ratio or min(1.0, 2.0 * self.recompute_ratio)
        return gradual_ratios(self.recompute_ratio, start_ratio=start, num_layers=self.gradual_layers)


@dataclass(frozen=True, slots=True)
class Segment:
    """A run of prompt tokens and, if reused, its cached K/V.

    Attributes:
        token_ids: the segment's token ids.
        kv: per layer ``(K, V)``, each ``[H_kv, S, D]`` (or ``[1, H_kv, S, D]``), cached at positions
            ``kv_start .. kv_start + S - 1``; None = no cached entry (always recomputed).
        kv_start: the position the cached entry started at.
        exact: the cached entry is exactly what a full prefill computes here (a true prompt prefix at its own
            positions): never selected for recompute, and not counted in the ratio's base.
    """

    token_ids: Sequence[int]
    kv: Sequence[LayerKV] | None = None
    kv_start: int = 0
    exact: bool = False


@dataclass(slots=True)
class BlendResult:
    """Output of one blended prefill (per request, never shared)."""

    logits: Tensor  # [V] float32, next-token logits after the prompt
    kv: list[LayerKV]  # per layer [1, H_kv, N, D], the fused cache
    num_tokens: int
    num_reused: int  # tokens with a cached entry
    selected: list[int] = field(default_factory=list)  # rows recomputed per layer
    final_index: Tensor | None = None  # [r] tokens recomputed in the last layer

    @property
    def recomputed_tokens(self) -> int:
        """Token-layers recomputed, in units of whole-prompt layers' tokens (sum over layers / num_layers)."""
        return round(sum(self.selected) / max(1, len(self.selected)))


def fuse_caches(adapter: HFAdapter, segments: Sequence[Segment], num_tokens: int) -> tuple[list[LayerKV], Tensor]:
    """Concatenate the segments' caches, keys re-rotated to their global positions (plain reuse).

    Returns:
        Per layer ``(K, V)`` ``[1, H_kv, N, D]`` (zeros where a segment has no cache) and ``[N]`` bool,
        True where a token has a cached entry.
    """
    device, dtype = adapter.device, adapter.dtype
    shape = (1, adapter.num_kv_heads, num_tokens, adapter.head_dim)
    cached = torch.zeros(num_tokens, dtype=torch.bool, device=device)
    delta = torch.zeros(num_tokens, dtype=torch.long)
    start = 0
    for seg in segments:
        n = len(seg.token_ids)
        if seg.kv is not None:
            if len(seg.kv) != adapter.num_layers:
                raise KernelConfigError(f"segment cache has {len(seg.kv)} layers, the model {adapter.num_layers}")
            cached[start : start + n] = True
            delta[start : start + n] = start - seg.kv_start
        start += n
    # One buffer per K and V for all layers: large fresh allocations are slow (page faults), so make few.
    keys = torch.empty((adapter.num_layers, *shape), dtype=dtype, device=device)  # [L, 1, H_kv, N, D]
    values = torch.empty_like(keys)
    if not bool(cached.all()):
        keys[:, :, :, ~cached] = 0
        values[:, :, :, ~cached] = 0
    tables: dict[int, tuple[Tensor, Tensor]] = {}
    scratch = torch.empty(shape, dtype=torch.float32, device=device) if bool((delta != 0).any()) else None
    out: list[LayerKV] = []
    for layer_idx in range(adapter.num_layers):
        key, value = keys[layer_idx], values[layer_idx]  # [1, H_kv, N, D]
        start = 0
        for seg in segments:
            n = len(seg.token_ids)
            if seg.kv is not None:
                k, v = seg.kv[layer_idx]
                if k.shape[-2] != n:
                    raise KernelConfigError(f"segment cache holds {k.shape[-2]} tokens, the segment {n}")
                key[0, :, start : start + n] = k.reshape(-1, n, adapter.head_dim)
                value[0, :, start : start + n] = v.reshape(-1, n, adapter.head_dim)
            start += n
        if scratch is not None:
            inv_freq = adapter.inv_freq(layer_idx)
            tbl = tables.get(id(inv_freq))
            if tbl is None:
                cos, sin = rope_cos_sin(inv_freq, delta, dtype=torch.float32)  # [N, D]
                tbl = tables[id(inv_freq)] = (cos.to(device), sin.to(device))
            _rotate_in_place(key, *tbl, scratch)
        out.append((key, value))
    return out, cached


def _rotate_in_place(key: Tensor, cos: Tensor, sin: Tensor, scratch: Tensor) -> None:
    """``key = key * cos + rotate_half(key) * sin`` without temporaries (``scratch`` is ``key``-shaped fp32)."""
    half = key.shape[-1] // 2
    scratch[..., :half].copy_(key[..., half:]).neg_()
    scratch[..., half:].copy_(key[..., :half])  # scratch = rotate_half(key)
    scratch.mul_(sin)
    if key.dtype == torch.float32:
        key.mul_(cos).add_(scratch)
    else:
        key.copy_(key.float().mul_(cos).add_(scratch))


def _deviation(cfg: BlendConfig, fresh: LayerKV, reused: LayerKV, index: Tensor, layer_idx: int) -> Tensor:
    if cfg.deviation is Deviation.RANDOM:
        return random_scores(index.numel(), seed=cfg.seed + layer_idx, device=index.device)
    score = torch.zeros(index.numel(), device=index.device)
    if cfg.deviation in (Deviation.KEY, Deviation.KV):
        score += kv_deviation(fresh[0], reused[0].index_select(2, index))
    if cfg.deviation in (Deviation.VALUE, Deviation.KV):
        score += kv_deviation(fresh[1], reused[1].index_select(2, index))
    return score


def _query_scores(adapter: HFAdapter, layer_idx: int, hidden: Tensor, pos_emb: tuple[Tensor, Tensor],
                  index: Tensor, queries: Tensor, key_cache: Tensor) -> Tensor:
    """``[r]`` attention of the question rows (``queries``, bool over ``index``) to each row of ``index``."""
    rows = queries.nonzero().squeeze(-1)
    q = adapter.project_q(layer_idx, hidden.index_select(1, rows), pos_emb[0].index_select(1, rows),
                          pos_emb[1].index_select(1, rows))  # [1, H, q, D]
    attn = query_attention(q, key_cache, index.index_select(0, rows), scaling=adapter.attention_scaling(layer_idx))
    return attn.index_select(0, index)  # [r]


def _share(score: Tensor, eligible: Tensor) -> Tensor:
    """``score`` normalised to sum 1 over ``eligible`` rows (zeros elsewhere)."""
    s = score.float().clamp_min(0) * eligible
    return s / s.sum().clamp_min(1e-30)


@torch.inference_mode()
def blended_prefill(adapter: HFAdapter, segments: Sequence[Segment], config: BlendConfig | None = None) -> BlendResult:
    """Prefill a prompt made of reused and fresh segments with selective recompute.

    Args:
        adapter: the model's `HFAdapter`.
        segments: the prompt in order; their token ids concatenated are the prompt.
        config: blend hyperparameters (default `BlendConfig()`).

    Returns:
        A `BlendResult` with next-token logits and the fused cache.

    Raises:
        KernelConfigError: empty prompt, or caches that do not match their segments or the model.
    """
    cfg = config or BlendConfig()
    ids = [t for seg in segments for t in seg.token_ids]
    num_tokens = len(ids)
    if num_tokens == 0:
        raise KernelConfigError("cannot prefill an empty prompt")
    device = adapter.device
    kv, cached = fuse_caches(adapter, segments, num_tokens)
    forced = ~cached
    forced[-min(cfg.num_last_tokens, num_tokens) :] = True
    eligible = cached.clone()  # reused tokens that may be recomputed: not an exact prefix
    start = 0
    for seg in segments:
        n = len(seg.token_ids)
        if seg.kv is not None and seg.exact:
            eligible[start : start + n] = False
        elif seg.kv is not None and cfg.chunk_head_tokens:
            forced[start : start + min(n, cfg.chunk_head_tokens)] = True
        start += n
    num_reused = int(cached.sum())
    num_candidates = int(eligible.sum())
    num_head = int((forced & eligible).sum())  # chunk heads count against the ratio's budget
    queries = ~cached  # the question (and every other fresh token) scores attention for query-aware selection
    ratios = cfg.layer_ratios()
    first_check = min(cfg.check_layer, adapter.num_layers)
    check_layers = range(first_check, min(first_check + len(ratios), adapter.num_layers))

    index = torch.arange(num_tokens, device=device)  # [r] rows being recomputed
    hidden = adapter.embed(torch.tensor([ids], device=device))  # [1, N, hidden]
    if num_candidates == 0:  # only exact caches and fresh tokens (prefix caching): nothing to select
        index = forced.nonzero().squeeze(-1)
        hidden = hidden.index_select(1, index)
        check_layers = range(0)
    result = BlendResult(logits=torch.empty(0), kv=kv, num_tokens=num_tokens, num_reused=num_reused)
    pos_cache: dict[str, tuple[Tensor, Tensor]] = {}
    mask_cache: dict[int | None, list[tuple[tuple[int, int, int], Tensor]]] = {}
    kv_pos = torch.arange(num_tokens, device=device)
    for layer_idx in range(adapter.num_layers):
        position_ids = index[None]  # [1, r]
        layer_type = adapter.layer_types[layer_idx]
        if layer_type not in pos_cache:
            pos_cache[layer_type] = adapter.position_embeddings(layer_idx, hidden, position_ids)
        pos_emb = pos_cache[layer_type]
        if layer_idx in check_layers:
            fresh = adapter.project_kv(layer_idx, hidden, *pos_emb)  # 2 x [1, H_kv, r, D]
            rows_eligible = eligible.index_select(0, index)
            has_question = bool(queries.any())  # a prompt cached to its end has no question rows to ask
            use_query = has_question and (cfg.deviation is Deviation.QUERY or (
                cfg.query_weight > 0 and cfg.deviation is not Deviation.RANDOM))
            # The deviation compares fresh with reused K/V, so it is scored before the fresh rows are written.
            deviation = None if cfg.deviation is Deviation.QUERY and use_query else _deviation(
                cfg, fresh, kv[layer_idx], index, layer_idx)  # [r]
            if cfg.fresh_check_kv:
                ScatterCache(*kv[layer_idx], index).update(*fresh, layer_idx)
            if use_query:  # the question's attention over the keys as they are now (fresh where scattered)
                attn = _query_scores(adapter, layer_idx, hidden, pos_emb, index, queries.index_select(0, index),
                                     kv[layer_idx][0])
                w = cfg.query_weight
                score = attn if deviation is None else (1 - w) * _share(deviation, rows_eligible) + w * _share(
                    attn, rows_eligible)
            else:
                assert deviation is not None
                score = deviation
            ratio = ratios[layer_idx - first_check]
            budget = max(0, num_to_select(num_candidates, ratio) - num_head)
            keep = select_tokens(score, forced.index_select(0, index), budget, rows_eligible)  # [r']
            index, hidden = index.index_select(0, keep), hidden.index_select(1, keep)
            position_ids = index[None]
            pos_emb = (pos_emb[0].index_select(1, keep), pos_emb[1].index_select(1, keep))
            pos_cache = {t: (c.index_select(1, keep), s.index_select(1, keep)) for t, (c, s) in pos_cache.items()}
            mask_cache.clear()
        window = adapter.sliding_windows[layer_idx]
        full = index.numel() == num_tokens
        if full and adapter.can_use_implicit_causal(layer_idx, num_tokens):
            cache = ScatterCache(*kv[layer_idx], index)
            hidden = adapter.run_layer(layer_idx, hidden, position_ids, pos_emb, cache, attention_mask=None)
        else:
            if window not in mask_cache:  # the groups and their masks change only when the selection does
                mask_cache[window] = [((a, b, end), causal_mask(index[a:b], kv_pos[:end], sliding_window=window,
                                                                dtype=hidden.dtype))
                                      for a, b, end in _row_groups(index, cfg.row_groups)]
            parts = []
            for (a, b, end), mask in mask_cache[window]:
                cache = ScatterCache(*kv[layer_idx], index[a:b], limit=end)
                parts.append(adapter.run_layer(layer_idx, hidden[:, a:b], position_ids[:, a:b],
                                               (pos_emb[0][:, a:b], pos_emb[1][:, a:b]), cache, attention_mask=mask))
            hidden = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        result.selected.append(int(index.numel()))
    result.logits = adapter.logits(hidden[:, -1:])[0, -1]
    result.final_index = index
    return result


def _row_groups(index: Tensor, num_groups: int) -> list[tuple[int, int, int]]:
    """Split the recomputed rows (ascending positions) into contiguous groups ``(a, b, key_end)``.

    A group's queries sit at positions below ``key_end = index[b - 1] + 1``, so its attention needs only keys
    ``[0, key_end)``; run group by group, a layer does about half the attention work of one pass over all keys,
    and stays exact: earlier groups' fresh K/V are scattered before later groups read them, and no group reads a
    later one's.
    """
    r = int(index.numel())
    g = max(1, min(num_groups, r // 64))
    bounds = [round(i * r / g) for i in range(g + 1)]
    return [(a, b, int(index[b - 1]) + 1) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


@dataclass(frozen=True, slots=True)
class SelfCheckReport:
    """Outcome of `self_check`: worst absolute logit differences on the probe."""

    full_vs_reference: float  # all-recompute blended prefill vs the model's own forward
    rerotation: float  # layer-0 keys of a re-rotated chunk vs the same keys computed in place


@torch.inference_mode()
def self_check(adapter: HFAdapter, *, probe_len: int = 48, atol: float | None = None) -> SelfCheckReport:
    """Compare blended and full prefill on a deterministic probe; raise if the model fails.

    Checks that (1) ratio-1 blending reproduces the model's own logits and (2) a chunk cached at
    position 0 and re-rotated to its place matches in-place layer-0 keys (which see no context).

    Raises:
        UnsupportedModelError: when either difference exceeds ``atol`` (default 1e-3 fp32, 5e-2 otherwise).
    """
    tol = atol if atol is not None else (1e-3 if adapter.dtype == torch.float32 else 5e-2)
    vocab = int(adapter.model.get_input_embeddings().num_embeddings)
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, max(4, min(vocab, 30000)), (probe_len,), generator=gen).tolist()
    third = probe_len // 3
    segs = [Segment(ids[:third]), Segment(ids[third : 2 * third]), Segment(ids[2 * third :])]
    ref_logits, ref_cache = adapter.full_prefill(torch.tensor([ids], device=adapter.device))
    full = blended_prefill(adapter, segs, BlendConfig(recompute_ratio=1.0))
    scale = max(1.0, float(ref_logits.abs().max()))
    d_full = float((full.logits - ref_logits).abs().max()) / scale
    alone = blended_prefill(adapter, [Segment(ids[third : 2 * third])], BlendConfig(recompute_ratio=1.0))
    chunk_kv = [(k[0], v[0]) for k, v in alone.kv]  # the chunk computed at positions 0.., [H_kv, S, D]
    moved, _ = fuse_caches(adapter, [Segment(ids[:third]), Segment(ids[third : 2 * third], chunk_kv)], 2 * third)
    in_place = full.kv[0][0][0, :, third : 2 * third]  # [H_kv, S, D]
    k0 = moved[0][0][0, :, third : 2 * third]
    d_rot = float((k0 - in_place).abs().max()) / max(1.0, float(in_place.abs().max()))
    if d_full > tol or d_rot > tol:
        raise UnsupportedModelError(
            f"blending self-check failed for {adapter.model_type!r}: relative logit error {d_full:.2e}, "
            f"re-rotation error {d_rot:.2e} (tolerance {tol:.0e}); refusing selective recompute for this model"
        )
    del ref_cache
    return SelfCheckReport(d_full, d_rot)
