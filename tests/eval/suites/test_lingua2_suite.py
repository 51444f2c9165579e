"""`ragzip eval lingua2` quality figures: survival next to its baselines on the same questions, with CIs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


@pytest.fixture(scope="module")
def squad_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    records = json.loads((FIXTURES / "lingua2_squad.json").read_text(encoding="utf-8"))["squad"]
    path = tmp_path_factory.mktemp("l2suite") / "squad.jsonl"
    rows = [{"id": r["id"], "question": r["question"], "answers": r["answers"],
             "contexts": [{"title": r["title"], "text": r["text"]}]} for r in records[:8]]
    # a second question over the first passage: the query effect is measured on passages asked twice
    rows.append({**rows[0], "id": "second", "question": "Where was the game played?",
                 "answers": ["Levi's Stadium"]})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_quality_keys_with_baselines_and_cis(squad_file: Path) -> None:
    from ragzip.eval.suites.lingua2 import BASELINES, run

    out = run(squad_file, limit=None, seed=0, options={"parity": "0", "rates": "0.5,0.33"})
    assert out["examples"] == 9 and out["query_aware"] == "auto"
    assert out["rate_cap_violations"] == 0 and out["rate_error_max"] <= 1e-9
    for rate in ("0.5", "0.33"):
        ours = out[f"answer_survival_{rate}"]
        lo, hi = out[f"answer_survival_ci_{rate}"]
        assert 0.0 <= lo <= ours <= hi <= 1.0
        for name in BASELINES:
            assert 0.0 <= out[f"answer_survival_{name}_{rate}"] <= 1.0
            assert len(out[f"vs_{name}.survival_delta_ci_{rate}"]) == 2
        assert out[f"answer_survival_answerable_{rate}"] >= ours  # among answers present in the full context
    assert out["answer_survival_0.5"] > out["answer_survival_random_0.5"]
    assert out["answer_survival_0.5"] >= out["answer_survival_llmlingua_0.5"]
    assert out["query_effect_passages"] == 2 and out["query_effect_distinct_share"] == 1.0
    assert "parity_word_agreement" not in out  # parity=0 skips the llmlingua comparison
