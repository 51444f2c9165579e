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
    assert out["token_ratio@rate0.33"] <= 0.3333 + 1e-9
    json.dumps(out)
    with pytest.raises(ConfigError, match=r"unknown option\(s\)"):
        extractive.run(data, limit=1, seed=0, options={"temperature": "1"})


def _inverted_weights(folder: Path) -> Path:
    """A copy of the shipped scorer whose sentence head is negated: a "previous" scorer that ranks sentences the
    other way round, so the current-vs-previous delta has something to measure."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from ragzip.compressors.exit_encoder import WEIGHTS_DIR

    shutil.copytree(WEIGHTS_DIR, folder)
    state = load_file(str(folder / "model.safetensors"))
    state["head.2.weight"] = -state["head.2.weight"]
    state["head.2.bias"] = -state["head.2.bias"]
    save_file(state, str(folder / "model.safetensors"))
    return folder


def test_baselines_and_the_previous_scorer_sit_beside_exit_at_each_budget_with_cis(data: Path,
                                                                                   tmp_path: Path) -> None:
    previous = _inverted_weights(tmp_path / "previous")
    out = extractive.run(data, limit=2, seed=0, options={
        "scorers": "encoder", "rates": "0.2", "baselines": "embed-topk,random", "previous_weights": str(previous)})
    for prefix in ("", "embed-topk.", "random.", "previous."):
        assert out[f"{prefix}token_ratio@rate0.20"] <= 0.2 + 1e-9
        assert f"{prefix}support_recall_hop1@rate0.20" in out
    for name in ("embed-topk", "random", "previous"):
        delta = out[f"vs_{name}.support_recall_delta@rate0.20"]
        assert delta == pytest.approx(out["support_recall@rate0.20"] - out[f"{name}.support_recall@rate0.20"])
    # the scorer that ranks sentences backwards keeps less of the support than the shipped one
    assert out["vs_previous.support_recall_delta@rate0.20"] > 0
    assert out["support_recall@rate0.20"] > out["previous.support_recall@rate0.20"]
    assert out["support_sentences_hop1"] + out["support_sentences_hop2"] == 4  # 2 questions x 2 sentences
    json.dumps(out)


def test_document_hops_mark_bridge_documents_reached_through_another() -> None:
    from ragzip.eval.datasets import Context, Example

    bridge = Example("b", "Where was the director of Jaws born?", ("Cincinnati",), (
        Context("Jaws", "Jaws is a film by Steven Spielberg.", ("Jaws is a film by Steven Spielberg.",), True, (0,)),
        Context("Steven Spielberg", "He was born in Cincinnati.", ("He was born in Cincinnati.",), True, (0,)),
        Context("Sharks", "Sharks swim.", ("Sharks swim.",), False, ())))
    assert extractive.document_hops(bridge) == {0: 1, 1: 2}
    comparison = Example("c", "Is Jaws older than Sharks?", ("yes",), (
        Context("Jaws", "Jaws (1975).", ("Jaws (1975).",), True, (0,)),
        Context("Sharks", "Sharks (1990).", ("Sharks (1990).",), True, (0,))))
    assert extractive.document_hops(comparison) == {0: 1, 1: 1}


def test_ratio_bootstrap_ci_pools_questions_and_pairs_a_baseline() -> None:
    from ragzip.eval.metrics import ratio_bootstrap_ci

    lo, hi = ratio_bootstrap_ci([1, 2, 1, 2] * 10, [2, 2, 2, 2] * 10)
    assert lo < 0.75 < hi and hi - lo < 0.3
    lo, hi = ratio_bootstrap_ci([2] * 20, [2] * 20, baseline=([1] * 20, [2] * 20))
    assert lo == hi == pytest.approx(0.5)  # the same gain on every question: no spread
    assert all(map(math.isnan, ratio_bootstrap_ci([], [])))
