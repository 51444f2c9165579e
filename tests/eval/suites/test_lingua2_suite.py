"""`ragzip eval lingua2` quality figures: survival next to its baselines on the same questions, with CIs."""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


@pytest.fixture(scope="module")
def squad_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    held_out = json.loads((FIXTURES / "lingua2_squad.json").read_text(encoding="utf-8"))  # see NOTICE.lingua2
    path = tmp_path_factory.mktemp("l2suite") / "squad.jsonl"
    rows = [{"id": r["id"], "question": r["question"], "answers": r["answers"],
             "contexts": [{"title": r["title"], "text": r["text"]}]} for r in held_out["squad"][:8]]
    # two questions over one passage: the query effect is measured on passages asked twice
    same = held_out["same_passage"]
    rows += [{"id": q["id"], "question": q["question"], "answers": q["answers"],
              "contexts": [{"title": same["title"], "text": same["text"]}]} for q in same["questions"][:2]]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def _norm(text: str) -> str:
    """SQuAD v1.1's official answer normalisation (its evaluate script): lower case, no punctuation, no articles."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _recount(path: Path, rate: float) -> tuple[float, float]:
    """Answer survival (all questions; those answerable from the full text) recounted here, outside the suite."""
    from ragzip import RagZip

    rz = RagZip("lingua2")  # the suite's compressor: the default counter, query-aware when there is a question
    kept, answerable = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        text = f" {_norm(rz.compress(row['question'], row['contexts'], rate=rate).text)} "
        survived = any(f" {_norm(a)} " in text for a in row["answers"])
        kept.append(survived)
        if any(f" {_norm(a)} " in f" {_norm(row['contexts'][0]['text'])} " for a in row["answers"]):
            answerable.append(survived)
    return sum(kept) / len(kept), sum(answerable) / len(answerable)


def test_quality_keys_with_baselines_and_cis(squad_file: Path) -> None:
    from ragzip.eval.suites.lingua2 import BASELINES, run

    out = run(squad_file, limit=None, seed=0, options={"parity": "0", "rates": "0.5,0.33"})
    assert out["examples"] == 10 and out["query_aware"] == "auto"
    assert out["rate_cap_violations"] == 0 and out["rate_error_max"] <= 1e-9
    for rate in ("0.5", "0.33"):
        survival, answerable = _recount(squad_file, float(rate))
        assert out[f"answer_survival_{rate}"] == pytest.approx(survival, abs=1e-4)
        assert out[f"answer_survival_answerable_{rate}"] == pytest.approx(answerable, abs=1e-4)
        lo, hi = out[f"answer_survival_ci_{rate}"]
        assert hi - lo > 0 or survival in (0.0, 1.0)  # an interval, not a point, unless every answer went one way
        for name in BASELINES:
            assert len(out[f"vs_{name}.survival_delta_ci_{rate}"]) == 2
    assert out["answer_survival_0.5"] > out["answer_survival_random_0.5"]
    assert out["answer_survival_0.5"] >= out["answer_survival_llmlingua_0.5"]
    assert out["query_effect_passages"] == 2 and out["query_effect_distinct_share"] == 1.0
    assert "parity_word_agreement" not in out  # parity=0 skips the llmlingua comparison
