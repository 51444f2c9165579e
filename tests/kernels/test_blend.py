from __future__ import annotations

from typing import Any

import pytest
import torch

from ragzip.errors import ConfigError, UnsupportedModelError
from ragzip.kernels.blend import (
    BlendConfig,
    Segment,
    blended_prefill,
    compute_chunk_kv,
    fuse_caches,
    self_check,
)
from ragzip.kernels.hf_adapter import HFAdapter

FAMILIES = ["llama", "qwen2", "gemma3"]


def _prompt(
    seed: int = 0, sizes: tuple[int, ...] = (14, 20, 17, 12), tail: int = 5
) -> tuple[list[int], list[list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    chunks = [torch.randint(3, 99, (n,), generator=gen).tolist() for n in sizes]
    return torch.randint(3, 99, (tail,), generator=gen).tolist(), chunks


def _segments(adapter: HFAdapter, chunks: list[list[int]], tail: list[int]) -> list[Segment]:
    return [Segment(c, compute_chunk_kv(adapter, c)) for c in chunks] + [Segment(tail)]


def _reference(adapter: HFAdapter, ids: list[int]) -> torch.Tensor:
    logits, _ = adapter.full_prefill(torch.tensor([ids]))
    return logits


def _kl(ref: torch.Tensor, other: torch.Tensor) -> float:
    p = ref.log_softmax(-1)
    return float((p.exp() * (p - other.log_softmax(-1))).sum())


@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_one_reproduces_full_prefill(tiny_model: Any, family: str) -> None:
    adapter = HFAdapter(tiny_model(family))
    tail, chunks = _prompt()
    ids = [t for c in chunks for t in c] + tail
    out = blended_prefill(adapter, _segments(adapter, chunks, tail), BlendConfig(recompute_ratio=1.0))
    torch.testing.assert_close(out.logits, _reference(adapter, ids), atol=1e-5, rtol=1e-5)
    assert out.selected == [len(ids)] * adapter.num_layers


@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_zero_equals_plain_reuse_with_corrected_positions(tiny_model: Any, family: str) -> None:
    adapter = HFAdapter(tiny_model(family))
    tail, chunks = _prompt(1)
    segs = _segments(adapter, chunks, tail)
    n_cached = sum(len(c) for c in chunks)
    cfg = BlendConfig(recompute_ratio=0.0, fresh_check_kv=False)
    out = blended_prefill(adapter, segs, cfg)
    kv, cached = fuse_caches(adapter, segs[:-1], n_cached)
    assert bool(cached.all())
    cache = adapter.make_cache(kv)
    with torch.inference_mode():
        plain = adapter.forward_with_cache(torch.tensor([tail]), cache, n_cached, logits_to_keep=1)[-1]
    torch.testing.assert_close(out.logits, plain, atol=1e-5, rtol=1e-5)
    assert out.selected[adapter.num_layers - 1] == len(tail)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_quality_improves_with_ratio(tiny_model: Any, family: str) -> None:
    adapter = HFAdapter(tiny_model(family))
    ratios = [0.0, 0.3, 0.7, 1.0]
    kls = {r: 0.0 for r in ratios}
    for seed in range(3):
        tail, chunks = _prompt(seed + 10)
        ref = _reference(adapter, [t for c in chunks for t in c] + tail)
        segs = _segments(adapter, chunks, tail)
        for r in ratios:
            cfg = BlendConfig(recompute_ratio=r, fresh_check_kv=False, deviation="kv")
            kls[r] += _kl(ref, blended_prefill(adapter, segs, cfg).logits)
    assert kls[0.0] > kls[0.3] > kls[0.7] > kls[1.0] - 1e-6
    assert kls[1.0] < 1e-8


def test_gradual_filtering_and_strategies_run(tiny_model: Any) -> None:
    adapter = HFAdapter(tiny_model("llama"))
    tail, chunks = _prompt(3)
    segs = _segments(adapter, chunks, tail)
    n_cached = sum(len(c) for c in chunks)
    out = blended_prefill(adapter, segs, BlendConfig(recompute_ratio=0.2, gradual_layers=2, gradual_start_ratio=0.8))
    sel = out.selected
    assert sel[0] == n_cached + len(tail) and sel[1] > sel[2] > sel[3]
    assert sel[3] == pytest.approx(0.2 * n_cached + len(tail), abs=1)
    for deviation in ["key", "value", "kv", "random"]:
        blended_prefill(adapter, segs, BlendConfig(recompute_ratio=0.2, deviation=deviation))
    with pytest.raises(ConfigError, match="valid"):
        BlendConfig(deviation="nope")


def test_final_tokens_always_recomputed(tiny_model: Any) -> None:
    adapter = HFAdapter(tiny_model("llama"))
    _, chunks = _prompt(4)
    segs = [Segment(c, compute_chunk_kv(adapter, c)) for c in chunks]  # the last token is cached too
    out = blended_prefill(adapter, segs, BlendConfig(recompute_ratio=0.0, num_last_tokens=3))
    n = sum(len(c) for c in chunks)
    assert out.final_index is not None and out.final_index.tolist() == [n - 3, n - 2, n - 1]


def test_eager_attention_matches_too(tiny_model: Any) -> None:
    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    adapter = HFAdapter(model)
    tail, chunks = _prompt(5)
    out = blended_prefill(adapter, _segments(adapter, chunks, tail), BlendConfig(recompute_ratio=1.0))
    torch.testing.assert_close(out.logits, _reference(adapter, [t for c in chunks for t in c] + tail), atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_self_check_passes_on_supported_models(tiny_model: Any, family: str) -> None:
    report = self_check(HFAdapter(tiny_model(family)))
    assert report.passed and report.full_vs_reference < 1e-4 and report.rerotation < 1e-4


class _WrongFrequencies(HFAdapter):
    def inv_freq(self, layer_idx: int) -> torch.Tensor:
        return super().inv_freq(layer_idx) * 1.05


def test_self_check_refuses_a_broken_model(tiny_model: Any) -> None:
    with pytest.raises(UnsupportedModelError, match="self-check failed"):
        self_check(_WrongFrequencies(tiny_model("llama")))


def test_unsupported_attention_is_refused(tiny_model: Any) -> None:
    model = tiny_model("llama")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UnsupportedModelError, match="sdpa"):
        HFAdapter(model)
