"""`ragzip eval blend` end to end on a tiny random Llama with the real tokenizer and the fixture MuSiQue question."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ragzip.errors import ConfigError
from ragzip.eval.suites import blend
from ragzip.eval.suites.blend import premise_check

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


def test_blend_suite_reports_answer_agreement_auto_and_the_premise_check(
        tiny_reader: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAGZIP_CACHE_DIR", str(tmp_path))  # the tiny model's qualification is cached here
    out = blend.run(DATA, limit=1, seed=0, options={
        "model": tiny_reader, "strategies": "false", "ratios": "0.15,0.5", "max_new_tokens": "6", "warmup": "false",
        "store": "memory", "previous": "false", "check_layer": "0"})
    verdict = out["auto_qualification"]
    assert list((tmp_path / "kv-qualify").glob("*.json"))  # auto calibrated the model once, before timing
    for method, mode in (("auto", "auto"), ("blend_15", "blend15"), ("full_reuse", "full_reuse"),
                         ("blend_50", "blend50")):
        for key in ("agree_exact", "agree_f1", "first_token_kl", "first_token_agree", "f1", "ttft_speedup"):
            assert f"{key}_{mode}" in out, f"{key}_{mode}"
        same = [a == f for a, f in zip(out["answers"][method], out["answers"]["full"])]
        assert out[f"agree_exact_{mode}"] == sum(same) / len(same)
    if not verdict["qualified"]:  # auto then computes everything: full prefill's answer, token for token
        assert out["agree_exact_auto"] == 1.0 and out["first_token_kl_auto"] < 1e-6
    # plain reuse of the tiny model's caches changes the first answer token's distribution; recompute shrinks it
    assert out["first_token_kl_full_reuse"] > out["first_token_kl_blend50"] > -1e-5
    assert 0 < out["premise_selected_share"] <= out["premise_oracle_share"] <= 1
    assert out["premise_selected_share_50"] >= out["premise_selected_share"]
    assert -1 <= out["premise_spearman"] <= 1 and out["premise_check_layer"] == 0


def test_premise_check_measures_what_the_check_layer_selection_holds_of_deeper_layers_deviation() -> None:
    import torch

    n, eligible = 10, torch.ones(10, dtype=torch.bool)
    eligible[0] = False  # an exact header token: never a candidate

    def layers(devs: list[list[float]]) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[Any]]:
        full = [(torch.zeros(1, 1, n, 2), torch.zeros(1, 1, n, 2)) for _ in devs]
        reused = []
        for d in devs:
            v = torch.zeros(1, 1, n, 2)
            v[0, 0, :, 0] = torch.tensor(d).sqrt()  # squared deviation d per token
            reused.append((torch.zeros(1, 1, n, 2), v))
        return full, reused

    rising = [0.0] + [float(i) for i in range(1, n)]
    same = premise_check(*layers([rising, rising, rising]), eligible, check_layer=0, ratio=0.2)
    assert same["selected"] == pytest.approx([17 / 45, 17 / 45]) and same["selected"] == same["oracle"]
    assert same["spearman"] == pytest.approx([1.0, 1.0])
    flipped = premise_check(*layers([rising, [0.0] + rising[:0:-1]]), eligible, check_layer=0, ratio=0.2)
    assert flipped["selected"] == pytest.approx([3 / 45]) and flipped["oracle"] == pytest.approx([17 / 45])
    assert flipped["spearman"] == pytest.approx([-1.0])
