"""The auto budget: calibration files, the coverage rule, the guard, and auto through EXIT, lingua2 and pipelines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ragzip.budget import Budget, to_budget
from ragzip.compressors.calibration import (
    CALIBRATION_FILE,
    Calibration,
    auto_select,
    fit_isotonic,
    guard_reason,
    load_calibration,
)
from ragzip.compressors.exit_encoder import WEIGHTS_DIR as EXIT_DIR
from ragzip.compressors.lingua2_model import WEIGHTS_DIR as LINGUA2_DIR
from ragzip.compressors.registry import get_compressor
from ragzip.errors import BudgetError, ConfigError
from ragzip.pipeline import build_compressor
from ragzip.tokens import get_token_counter
from ragzip.types import Document

QUESTION = "Where does the Rhine end?"
DOCS = [
    Document("r", "The Rhine rises in the Swiss Alps. The Rhine ends in the North Sea near Rotterdam. It is one of the "
                  "longest rivers of Europe.", "Rhine"),
    Document("p", "Paris is the capital of France. The Louvre is the largest art museum. Paris hosted the Olympics.",
             "Paris"),
    Document("k", "Kangaroos live in Australia. They carry their young in a pouch. A group is called a mob.",
             "Kangaroo"),
]


# ---------------------------------------------------------------- budgets

def test_auto_budget_round_trips_and_refuses_bad_values() -> None:
    b = Budget.auto(0.9, max_tokens=50, min_rate=0.2, on_unsure="compress")
    assert b.kind == "auto" and b.token_limit(1000) == 50
    assert b.as_dict() == {"auto": {"coverage": 0.9, "max_tokens": 50, "min_rate": 0.2, "on_unsure": "compress"}}
    assert to_budget(b.as_dict()) == b
    assert to_budget("auto") == Budget.auto() and Budget.auto().as_dict() == {"auto": {"coverage": 0.95}}
    assert to_budget({"auto": 0.8}) == Budget.auto(0.8) and to_budget(coverage=0.7) == Budget.auto(0.7)
    assert Budget.auto().token_limit(1000) is None
    for bad in ({"auto": {"coverage": 0}}, {"auto": {"coverage": 1.5}}, {"auto": {"cover": 0.9}},
                {"auto": {"on_unsure": "panic"}}, {"auto": 0.9, "rate": 0.5}, "half"):
        with pytest.raises(BudgetError):
            to_budget(bad)
    with pytest.raises(BudgetError, match="bound an auto budget"):
        Budget(rate=0.5, max_tokens=10)


# ---------------------------------------------------------------- calibration files

@pytest.mark.parametrize("folder", [EXIT_DIR, LINGUA2_DIR], ids=["exit", "lingua2"])
def test_shipped_calibrations_load_and_are_monotone(folder: Path) -> None:
    cal = load_calibration(folder)
    assert cal is not None and "calibrate_auto.py" in cal.fitted_on
    grid = np.linspace(0.0, 1.0, 501)
    probs = cal(grid)
    assert np.all(np.diff(probs) >= 0) and probs.min() >= 0.0 and probs.max() <= 1.0
    assert probs[-1] - probs[0] > 0.5  # it separates: a top score means far more than a bottom one
    assert (folder / CALIBRATION_FILE).stat().st_size < 1_000_000


def test_bad_calibration_files_are_refused(tmp_path: Path) -> None:
    good = Calibration((0.0, 0.5, 1.0), (0.0, 0.2, 0.9), "test").to_json()
    cases = {
        "decreasing": {**good, "ys": [0.0, 0.9, 0.2]},
        "unsorted": {**good, "xs": [0.0, 1.0, 0.5]},
        "out of range": {**good, "ys": [0.0, 0.5, 1.5]},
        "not finite": {**good, "ys": [0.0, 0.5, float("inf")]},
        "wrong format": {**good, "format": "pickle"},
        "mismatched": {**good, "ys": [0.0, 0.5]},
        "empty": {**good, "xs": [], "ys": []},
    }
    for name, data in cases.items():
        (tmp_path / CALIBRATION_FILE).write_text(json.dumps(data))
        with pytest.raises(ConfigError):
            load_calibration(tmp_path)
            pytest.fail(name)
    (tmp_path / CALIBRATION_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        load_calibration(tmp_path)
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps(good))
    assert load_calibration(tmp_path) == Calibration.from_json(good)
    assert load_calibration(tmp_path / "missing") is None


def test_isotonic_fit_is_monotone_and_matches_the_label_rates() -> None:
    rng = np.random.default_rng(0)
    scores = rng.random(4000)
    labels = (rng.random(4000) < scores ** 2).astype(int)  # true P(needed | s) = s^2
    cal = fit_isotonic(scores.tolist(), labels.tolist())
    assert np.all(np.diff(cal.ys) >= 0)
    assert cal([0.5])[0] == pytest.approx(0.25, abs=0.08) and cal([0.9])[0] == pytest.approx(0.81, abs=0.08)


# ---------------------------------------------------------------- the coverage rule and the guard

def test_auto_select_stops_once_the_expected_coverage_is_reached() -> None:
    probs = [0.05, 0.8, 0.1, 0.05]
    assert auto_select(probs, [1] * 4, Budget.auto(0.8)).keep == [1]
    choice = auto_select(probs, [1] * 4, Budget.auto(0.9))
    assert choice.keep == [1, 2] and choice.expected_coverage == pytest.approx(0.9) and choice.guard is None
    assert auto_select(probs, [1] * 4, Budget.auto(1.0)).keep == [1, 2, 0, 3]
    # min_rate: more units, in the same order, until that share of the cost is kept
    assert auto_select(probs, [10, 10, 10, 10], Budget.auto(0.8, min_rate=0.5)).keep == [1, 2]
    assert auto_select([], [], Budget.auto()).keep == []


def test_the_guard_keeps_everything_when_no_unit_is_clearly_needed() -> None:
    low = [0.02, 0.05, 0.03, 0.01]
    flat = [0.40, 0.42, 0.41, 0.40, 0.39]
    assert guard_reason(np.array(low)) == "low_scores" and guard_reason(np.array(flat)) == "flat_scores"
    assert guard_reason(np.array([0.9, 0.05, 0.02])) is None
    for probs in (low, flat):
        keep = auto_select(probs, [1] * len(probs), Budget.auto(0.5)).keep
        assert sorted(keep) == list(range(len(probs)))
        unsure = auto_select(probs, [1] * len(probs), Budget.auto(0.5, on_unsure="compress"))
        assert 0 < len(unsure.keep) < len(probs) and unsure.guard is not None


# ---------------------------------------------------------------- through the compressors

@pytest.fixture(scope="module")
def exit_() -> object:
    return get_compressor("exit", counter=get_token_counter("whitespace"))


def test_exit_defaults_to_auto_and_more_coverage_keeps_more(exit_: object) -> None:
    result = exit_.compress(QUESTION, DOCS)  # type: ignore[attr-defined]
    info = result.stages[0].info
    assert info["mode"] == "auto" and result.budget == {"auto": {"coverage": 0.95}}
    assert result.auto["coverage"] == 0.95 and result.auto["guard"] is None
    assert result.auto["expected_coverage"] >= 0.95
    assert "North Sea" in result.text and result.tokens_after < result.tokens_before
    kept = [exit_.compress(QUESTION, DOCS, Budget.auto(c)).tokens_after for c in (0.3, 0.95, 1.0)]  # type: ignore
    assert kept[0] < kept[1] <= kept[2] <= result.tokens_before
    contract = result.to_contract()
    assert contract["budget"] == {"auto": {"coverage": 0.95}} and contract["auto"] == result.auto


def test_exit_auto_keeps_the_cap_and_threshold_option_keeps_threshold_mode(exit_: object) -> None:
    for cap in (10, 20, 30):
        result = exit_.compress(QUESTION, DOCS, Budget.auto(1.0, max_tokens=cap))  # type: ignore[attr-defined]
        assert 0 < result.tokens_after <= cap and exit_.counter.count(result.text) <= cap  # type: ignore
        assert "fit_dropped" not in result.stages[0].info  # the selection itself met the cap
    legacy = get_compressor("exit", counter=get_token_counter("whitespace"), threshold=0.5)
    assert legacy.compress(QUESTION, DOCS).stages[0].info["mode"] == "threshold"


def test_exit_guard_keeps_the_context_when_nothing_is_relevant(exit_: object) -> None:
    unrelated = "What is the boiling point of liquid nitrogen in kelvin?"
    result = exit_.compress(unrelated, DOCS)  # type: ignore[attr-defined]
    assert result.auto["guard"] in ("low_scores", "flat_scores")
    assert result.tokens_after == result.tokens_before  # on_unsure="keep": nothing is cut on a guess
    squeezed = exit_.compress(unrelated, DOCS, Budget.auto(0.5, on_unsure="compress"))  # type: ignore
    assert 0 < squeezed.tokens_after < result.tokens_before and squeezed.text.strip()  # never emptied


def test_lingua2_auto_with_and_without_a_question() -> None:
    lingua = get_compressor("lingua2", counter=get_token_counter("whitespace"))
    doc = [Document("r", "The Rhine is a river that rises in the Swiss Alps and flows north through Germany. "
                         "It finally ends in the North Sea near the Dutch city of Rotterdam, after 1,230 km.")]
    result = lingua.compress(QUESTION, doc)
    info = result.stages[0].info["auto"]
    assert info["calibrated"] and info["expected_coverage"] >= 0.95 or info["guard"]
    assert "North Sea" in result.text and result.tokens_after < result.tokens_before
    tighter = lingua.compress(QUESTION, doc, Budget.auto(0.5))
    assert tighter.tokens_after <= result.tokens_after
    no_question = lingua.compress(None, doc)
    assert "no question" in no_question.auto["guard"] and no_question.rate <= 0.5
    reference = get_compressor("lingua2", counter=get_token_counter("whitespace"), mode="reference")
    with pytest.raises(BudgetError, match="auto needs mode=exact"):
        reference.compress(QUESTION, doc, Budget.auto())


def test_a_pipeline_shares_the_coverage_among_its_calibrated_stages() -> None:
    pipe = build_compressor("exit+lingua2", counter=get_token_counter("whitespace"))
    result = pipe.compress(QUESTION, DOCS, Budget.auto(0.9, max_tokens=12))
    shares = [s.info["budget"] for s in result.stages]
    assert shares == ["auto(coverage=0.948683, max_tokens=18)", "auto(coverage=0.948683, max_tokens=12)"]
    assert result.tokens_after <= 12 and result.auto["coverage"] == 0.9
    assert build_compressor("crag+exit", counter=get_token_counter("whitespace")).default_budget() == Budget.auto()
    with pytest.raises(BudgetError, match="does not take an auto budget"):
        build_compressor("embed-topk", counter=get_token_counter("whitespace")).compress(QUESTION, DOCS, "auto")


def test_a_stage_with_a_default_of_its_own_keeps_it_on_every_surface() -> None:
    from ragzip import RagZip
    from ragzip.batch_ray import _Worker
    from ragzip.llmlingua import PromptCompressor

    legacy = RagZip("exit", tokenizer="whitespace", threshold=0.5).compress(QUESTION, DOCS)
    assert legacy.budget == {"threshold": 0.5} and legacy.stages[0].info["mode"] == "threshold"
    reference = RagZip("lingua2", tokenizer="whitespace", mode="reference").compress(None, DOCS)
    assert reference.stages[0].info["mode"] == "reference" and reference.auto is None
    dropin = PromptCompressor(use_llmlingua2=True, mode="reference").compress_prompt([d.text for d in DOCS])
    assert dropin["ragzip"]["budget"] == {"rate": 0.5}  # llmlingua's own default, as before
    assert _Worker("exit", Budget.auto(0.9).as_dict(), {}, "whitespace").budget == Budget.auto(0.9)  # Ray rows


def test_auto_on_an_empty_context_and_a_tiny_cap() -> None:
    pipe = build_compressor("exit+lingua2", counter=get_token_counter("whitespace"))
    empty = pipe.compress(QUESTION, [Document("e", "   ")], Budget.auto(0.9, max_tokens=5))
    assert empty.tokens_after == 0 and empty.text == ""
    assert pipe.compress(QUESTION, DOCS, Budget.auto(1e-7)).tokens_after > 0


def test_render_puts_each_kept_piece_under_its_title() -> None:
    from ragzip.prompt import document_text

    result = get_compressor("exit", counter=get_token_counter("whitespace")).compress(QUESTION, DOCS)
    rendered = result.render()
    assert rendered.startswith("Rhine\nThe Rhine") and "North Sea" in rendered
    assert result.render(titles=False) == result.text and "Rhine\n" not in result.text
    assert rendered == "\n\n".join(document_text(d.as_document()).strip() for d in result.documents)
