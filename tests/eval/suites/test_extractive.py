from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ragzip.errors import ConfigError
from ragzip.eval.suites import extractive

FIXTURE = Path(__file__).parent.parent.parent / "fixtures" / "exit" / "hotpotqa_heldout2.json"


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    path = tmp_path / "normalized.jsonl"
    path.write_text("".join(json.dumps(ex) + "\n" for ex in json.loads(FIXTURE.read_text())))
    return path


def test_gold_spans_trim_and_locate_sentences() -> None:
    text = "A b. C d."
    assert extractive.gold_spans(text, ["A b.", " C d."]) == [(0, 4), (5, 9)]


def test_suite_reports_the_issue_keys(data: Path) -> None:
    out = extractive.run(data, limit=2, seed=0, options={"scorers": "encoder", "rates": "0.3333"})
    for key in ("support_recall", "support_precision", "token_ratio", "answer_survival", "encoder_ms_per_query",
                "support_recall@rate0.33", "token_ratio@rate0.33"):
        assert isinstance(out[key], float) and math.isfinite(out[key]), key
    assert 0.0 < out["support_recall@rate0.33"] <= 1.0
    assert out["token_ratio@rate0.33"] <= 0.3333 + 1e-9
    json.dumps(out)
    with pytest.raises(ConfigError, match="unknown options"):
        extractive.run(data, limit=1, seed=0, options={"temperature": "1"})
