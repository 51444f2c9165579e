"""`ragzip eval blend` end to end on a tiny random Llama with the real tokenizer and the fixture MuSiQue question."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragzip.errors import ConfigError
from ragzip.eval.suites import blend

DATA = Path(__file__).parent.parent.parent / "fixtures" / "report_data" / "musique_chunks_dev50"


def test_blend_suite_reports_methods_strategies_and_intervals(tiny_reader: str) -> None:
    out = blend.run(DATA, limit=1, seed=0, options={
        "model": tiny_reader, "strategies": "value,random,query", "strategy_ratios": "0.05,0.15",
        "max_new_tokens": "4", "warmup": "false", "store": "memory"})
    assert out["num_examples"] == 1 and out["main_blend"] == "blend_15"
    for key in ("ttft_speedup_vs_full", "f1_full", "f1_blend", "kl_blend", "kl_full_reuse", "top1_agreement_blend",
                "top1_agreement_full_reuse", "kl_blend_vs_full_reuse", "kl_full_reuse_alone", "kl_blend_15_alone",
                "speedup_prefix", "strategy_kl_query", "strategy_kl_random_5", "load_s_blend_15"):
        assert key in out, key
    # recomputing the selected tokens brings the blend closer to full prefill than plain reuse (here by orders of
    # magnitude: the tiny model's reused caches differ from full prefill's; the recomputed ones much less)
    assert out["kl_full_reuse"] > 10 * out["kl_blend"] and out["kl_full_reuse"] > 0
    assert out["kl_blend"] == pytest.approx(sum(out["per_method"]["blend_15"]["kl"]) /
                                            len(out["per_method"]["blend_15"]["kl"]))
    assert len(out["kl_blend_vs_full_reuse_ci"]) == 2 and out["best_strategy"] in {"value", "random", "query"}
    assert out["blend_config"]["recompute_ratio"] == 0.15
    per = out["per_method"]
    assert per["full"]["recomputed"] == [1.0]
    assert per["full_reuse"]["recomputed"][0] < per["blend_15"]["recomputed"][0] < per["blend_30"]["recomputed"][0] < 1


def test_blend_suite_refuses_unknown_options_and_strategies(tiny_reader: str) -> None:
    with pytest.raises(ConfigError, match=r"unknown option\(s\) .* for eval suite .blend."):
        blend.run(DATA, limit=1, seed=0, options={"ratio": "0.1"})
    with pytest.raises(ConfigError, match="unknown blend strategies"):
        blend.run(DATA, limit=1, seed=0, options={"model": tiny_reader, "strategies": "psychic"})
