from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragzip.errors import ConfigError
from ragzip.eval.suites.crag import run

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "crag"


def test_token_figures_without_the_llm() -> None:
    out = run(FIXTURES / "fewsum_mini.csv", limit=None, seed=0,
              options={"tokenizer": "whitespace", "summaries": "false", "k": "2"})
    json.dumps(out)  # JSON-able
    assert out["dataset"] == "fewsum" and out["examples"] == 2
    assert 0.0 < out["token_reduction"] < 1.0
    assert out["mean_k"] == 2
    first = out["per_example"][0]
    assert first["items"] == 4 and first["kept"] == 2 and first["tokens_after"] < first["tokens_before"]
    growth = out["growth"]
    assert [g["items"] for g in growth] == [1, 2, 4]
    assert growth[0]["tokens_after"] == growth[0]["tokens_before"]  # one item: nothing to cluster
    assert out["tokens_before_growth_per_doubling"] > out["tokens_after_growth_per_doubling"]
    assert "rougeL_full" not in out


def test_budget_option_and_multi_news() -> None:
    out = run(FIXTURES / "multi_news_mini.jsonl", limit=1, seed=0,
              options={"tokenizer": "whitespace", "summaries": "false", "growth": "false", "target_tokens": "12"})
    assert out["dataset"] == "multi_news" and out["budget"] == "target_tokens=12"
    assert out["per_example"][0]["tokens_after"] <= 12 and "growth" not in out


def test_unknown_option_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"unknown option\(s\)"):
        run(FIXTURES / "fewsum_mini.csv", limit=1, seed=0, options={"colour": "red"})


@pytest.mark.slow
def test_rouge_with_the_local_llm(tmp_path: Path) -> None:
    out = run(FIXTURES / "fewsum_mini.csv", limit=1, seed=0,
              options={"k": "2", "growth": "false", "max_new_tokens": "32", "cache_dir": str(tmp_path)})
    row = out["per_example"][0]
    assert out["token_reduction"] == pytest.approx(1 - row["tokens_after"] / row["tokens_before"], abs=1e-4)
    assert out["token_reduction"] > 0 and out["rougeL_full"] > 0 and out["rougeL_compressed"] > 0
    assert row["summary_full"]
