"""Measure how next-token predictions react to KV error: continuation quality and per-layer sensitivity."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ragzip.kvstore.codecs.cachegen import CacheGenProfile

if TYPE_CHECKING:
    import torch

    from ragzip.kvstore.record import ChunkRecord, LayerKV


def continuation_logits(model: Any, layers: Sequence[LayerKV], cont_ids: Sequence[int]) -> torch.Tensor:
    """Logits [T, V] (float32) of `cont_ids` run after a chunk whose cache is `layers` ([H_kv, S, D] each)."""
    import torch
    from transformers import DynamicCache

    device = next(model.parameters()).device
    cache = DynamicCache(ddp_cache_data=[(k.unsqueeze(0).to(device), v.unsqueeze(0).to(device)) for k, v in layers])
    ids = torch.tensor([list(cont_ids)], dtype=torch.long, device=device)  # [1, T]
    with torch.no_grad():
        out = model(input_ids=ids, cache=cache, use_cache=True)
    return out.logits[0].float()


def agreement(ref: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, mean KL(ref || other) in nats) over positions of two [T, V] logit tensors."""
    import torch

    top1 = (ref.argmax(-1) == other.argmax(-1)).float().mean().item()
    lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(other, -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    return top1, max(kl, 0.0)


def _noisy(x: torch.Tensor, step: float, gen: torch.Generator) -> torch.Tensor:
    import torch

    xf = x.float()
    rms = xf.pow(2).mean(dim=(0, 2), keepdim=True).sqrt()  # [1, S, 1], the codec's per-token scale
    noise = (torch.rand(xf.shape, generator=gen) - 0.5) * step * rms
    return (xf + noise).to(x.dtype)


def measure_sensitivity(model: Any, samples: Sequence[tuple[ChunkRecord, Sequence[int]]], *, step: float = 0.25,
                        seed: int = 0) -> CacheGenProfile:
    """Per-(layer, K/V) next-token KL caused by quantization-like noise of `step` (in token-RMS units).

    For each sample (a chunk record and a continuation) and each layer and kind, uniform noise of width `step`
    is added to that one tensor, and the continuation's KL against the clean cache is measured.
    Sensitivity = mean KL / step^2 (KL grows with the square of a small step).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    num_layers = samples[0][0].num_layers
    sums = [[0.0, 0.0] for _ in range(num_layers)]
    for record, cont in samples:
        ref = continuation_logits(model, record.layers, cont)
        for li in range(num_layers):
            for kind in (0, 1):
                layers = list(record.layers)
                pair = list(layers[li])
                pair[kind] = _noisy(pair[kind], step, gen)
                layers[li] = (pair[0], pair[1])
                _, kl = agreement(ref, continuation_logits(model, layers, cont))
                sums[li][kind] += kl
    n = len(samples)
    sens = tuple((a / n / step**2, b / n / step**2) for a, b in sums)
    return CacheGenProfile(samples[0][0].fingerprint, sens)
