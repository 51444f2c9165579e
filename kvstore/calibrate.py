"""Measure how next-token predictions react to KV error: continuation quality and per-layer sensitivity."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ragzip.kvstore.codecs.cachegen import CacheGenProfile

if TYPE_CHECKING:
    import torch

    from ragzip.kvstore.codecs.kvtc import KVTCProfile
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


def calibrate_kvtc(model: Any, samples: Sequence[tuple[Sequence[int], Sequence[int]]], *, name: str,
                   noise: float = 0.05, sensitivity_samples: int = 3, seed: int = 0) -> KVTCProfile:
    """Measure a KVTC profile: a weighted PCA transform per (layer, K/V) over all KV heads, and per-tensor
    sensitivity.

    Args:
        model: a causal LM the chunk-KV path supports (Llama, Qwen2, Gemma-3 families); fp32 measures best.
        samples: (chunk token ids, continuation token ids) pairs; a few chunks of a few hundred tokens suffice.
        name: the profile's label (blobs name it; a shipped profile's name is its model alias).
        noise: the sensitivity probe's uniform noise width, relative to each transformed tensor's RMS.
        sensitivity_samples: how many of the samples the (slow: 2L continuations each) sensitivity probe uses.

    Keys are weighted per RoPE frequency plane by the mean energy of the queries that read them (rotation
    keeps a plane's energy, so the weight holds at every position), values by `W_o^T W_o` of the query heads
    that share the KV head; a PCA of the weighted vectors gives the transform. The first token of each
    chunk is left out of the statistics (an attention sink when the chunk starts at position 0).
    """
    import dataclasses

    import numpy as np
    import torch

    from ragzip.kernels.hf_adapter import HFAdapter
    from ragzip.kvstore.codecs.kvtc import KVTCProfile, _rotate, _tokens_by_heads
    from ragzip.kvstore.fingerprint import model_fingerprint
    from ragzip.kvstore.prefill import prefill_chunk

    if not samples:
        raise ValueError("calibrate_kvtc needs at least one sample")
    adapter = HFAdapter(model)
    n_layers, hkv, d = adapter.num_layers, adapter.num_kv_heads, adapter.head_dim
    hq = adapter.config.num_attention_heads
    group = hq // hkv
    energy = torch.zeros(n_layers, hkv, d // 2, dtype=torch.float64)
    count = [0] * n_layers

    def hook(layer_idx: int) -> Any:
        def fn(_mod: Any, _inp: Any, out: torch.Tensor) -> None:
            q = out.detach().double().reshape(-1, hkv, group, d)  # [S, H_kv, G, D] before RoPE
            energy[layer_idx] += (q[..., : d // 2] ** 2 + q[..., d // 2:] ** 2).sum(dim=(0, 2))
            count[layer_idx] += q.shape[0] * group
        return fn

    handles = [layer.self_attn.q_proj.register_forward_hook(hook(i)) for i, layer in enumerate(adapter.layers)]
    try:
        records = [prefill_chunk(model, ids) for ids, _ in samples]
    finally:
        for h in handles:
            h.remove()
    inv_freq = np.stack([adapter.inv_freq(i).double().numpy() for i in range(n_layers)])  # [L, D/2]
    width = hkv * d
    forward = np.zeros((n_layers, 2, width, width), np.float32)
    inverse = np.zeros_like(forward)
    mean = np.zeros((n_layers, 2, width), np.float32)
    for li in range(n_layers):
        w_o = adapter.layers[li].self_attn.o_proj.weight.detach().double().cpu()  # [hidden, H * D]
        for kind in (0, 1):
            xs = []
            for r in records:
                x = r.layers[li][kind].float().cpu()
                xs.append((_rotate(x, inv_freq[li], r.start, inverse=True) if kind == 0 else x)[:, 1:])
            data = torch.from_numpy(_tokens_by_heads(torch.cat(xs, dim=1).numpy())).double()  # [N, H_kv * D]
            weight = torch.zeros(width, width, dtype=torch.float64)  # block-diagonal, one block per head
            for h in range(hkv):
                if kind == 0:
                    plane = (energy[li, h] / max(1, count[li])).clamp(min=1e-8).sqrt()
                    block = torch.diag(torch.cat([plane, plane]))
                else:
                    heads = [w_o[:, (h * group + g) * d:(h * group + g + 1) * d] for g in range(group)]
                    m = sum(b.T @ b for b in heads) + 1e-9 * torch.eye(d, dtype=torch.float64)
                    block = torch.linalg.cholesky(m)  # m = block @ block.T: |e @ block|^2 = e^T m e
                weight[h * d:(h + 1) * d, h * d:(h + 1) * d] = block
            y = data @ weight
            centre = y.mean(0)
            _, vecs = torch.linalg.eigh((y - centre).T @ (y - centre) / y.shape[0])
            t = weight @ vecs.flip(1)  # components by decreasing variance
            forward[li, kind] = t.float().numpy()
            inverse[li, kind] = np.linalg.inv(t.float().numpy().astype(np.float64)).astype(np.float32)  # as load()
            mean[li, kind] = (data @ t).mean(0).float().numpy()
    transforms = KVTCProfile(name=name, fingerprint=model_fingerprint(model), inv_freq=inv_freq, forward=forward,
                             inverse=inverse, mean=mean, sensitivity=np.zeros((n_layers, 2)))
    sens = _kvtc_sensitivity(model, transforms, records[:sensitivity_samples],
                             [c for _, c in samples[:sensitivity_samples]], noise, seed)
    return dataclasses.replace(transforms, sensitivity=sens)


def _kvtc_sensitivity(model: Any, profile: KVTCProfile, records: Sequence[ChunkRecord],
                      conts: Sequence[Sequence[int]], noise: float, seed: int) -> Any:
    """[L, 2] KL per unit squared step: uniform noise in one tensor's transformed domain at a time."""
    import numpy as np
    import torch

    from ragzip.kvstore.codecs.kvtc import _rotate, _tokens_by_heads

    gen = np.random.default_rng(seed)
    n_layers = profile.num_layers
    sens = np.zeros((n_layers, 2))
    for record, cont in zip(records, conts):
        ref = continuation_logits(model, record.layers, cont)
        for li in range(n_layers):
            for kind in (0, 1):
                x = record.layers[li][kind].float().cpu()
                xr = _rotate(x, profile.inv_freq[li], record.start, inverse=True) if kind == 0 else x
                y = _tokens_by_heads(xr.numpy()) @ profile.forward[li, kind]  # [S, F]
                # relative to the spread around the mean (keys carry large constant offsets)
                width = noise * float(np.sqrt(((y - profile.mean[li, kind])[1:] ** 2).mean()))
                y = y + (gen.random(y.shape, dtype=np.float32) - 0.5) * width
                h, s, d = x.shape
                back = torch.from_numpy(np.ascontiguousarray(
                    (y @ profile.inverse[li, kind]).reshape(s, h, d).transpose(1, 0, 2)))
                if kind == 0:
                    back = _rotate(back, profile.inv_freq[li], record.start, inverse=False)
                back[:, 0] = x[:, 0]  # the sink token is stored exactly by the codec
                layers = list(record.layers)
                pair = list(layers[li])
                pair[kind] = back.to(record.dtype)
                layers[li] = (pair[0], pair[1])
                _, kl = agreement(ref, continuation_logits(model, layers, cont))
                sens[li, kind] += kl / width**2 / len(records)
    return sens
