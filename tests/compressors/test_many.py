"""Batching across requests: `compress_many` returns what one-by-one `compress` calls return, one bad request fails
only itself, the batched forwards are really used, and the EXIT encoder is loaded once per process per weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ragzip import CompressionRequest, RagZip
from ragzip.budget import Budget
from ragzip.errors import BudgetError, InputError
from ragzip.types import CompressionResult, Document

FIXTURE = Path(__file__).parent.parent / "fixtures" / "exit" / "hotpotqa_heldout2.json"


def _questions() -> list[tuple[str, list[Document]]]:
    """Held-out HotpotQA questions (fixture) plus short ones of different lengths, so batches mix window sizes."""
    records = json.loads(FIXTURE.read_text())
    out = [(r["question"], [Document(f"{r['id']}/{j}", c["text"], c.get("title", ""))
                            for j, c in enumerate(r["contexts"])]) for r in records]
    out += [("Where is the tower?", [Document("t", "The tower is in Paris. It is made of iron. Bread is baked.")]),
            ("Who wrote Hamlet?", [Document("h", "Hamlet is a tragedy. Shakespeare wrote it around 1600."),
                                   Document("p", "Paris is the capital of France. It has many museums.")])]
    return out


def _same(a: CompressionResult, b: CompressionResult) -> None:
    assert a.text == b.text
    assert [(d.id, d.offsets) for d in a.documents] == [(d.id, d.offsets) for d in b.documents]
    assert (a.tokens_before, a.tokens_after, a.budget, a.auto) == (b.tokens_before, b.tokens_after, b.budget, b.auto)


@pytest.fixture(scope="module")
def exit_fp32() -> RagZip:
    # fp32: batched and single forwards agree to ~1e-6, so kept units are identical (bf16 rounds differently with
    # the batch's shape; docs/speed.md gives how often that changes a kept unit).
    return RagZip("exit", dtype="float32")


@pytest.mark.parametrize("budget", [None, Budget.ratio(0.3), Budget.tokens(40), Budget.score(0.5)])
def test_compress_many_returns_what_single_calls_return(exit_fp32: RagZip, budget: Budget | None) -> None:
    questions = _questions()
    single = [exit_fp32.compress(q, docs, budget) for q, docs in questions]
    many = exit_fp32.compress_many([CompressionRequest(q, docs, budget) for q, docs in questions])
    assert len(many) == len(single)
    for a, b in zip(single, many):
        _same(a, b)


def test_the_batched_scores_are_what_the_compress_calls_use(exit_fp32: RagZip, monkeypatch: Any) -> None:
    """Inside compress_many every first-pass score comes from the one batched pass: the per-request forward is
    never called (and outside it, it is)."""
    questions = _questions()
    scorer = exit_fp32.compressor.stages[0].scorer
    calls: list[int] = []
    original = scorer.score_many

    def counted(jobs: Any) -> Any:
        calls.append(len(jobs))
        return original(jobs)

    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("a per-request forward ran inside compress_many")

    monkeypatch.setattr(scorer, "score_many", counted)
    monkeypatch.setattr(scorer, "score_documents", refuse)
    results = exit_fp32.compress_many([(q, docs) for q, docs in questions])
    assert calls == [len(questions)] and len(results) == len(questions)
    with pytest.raises(AssertionError, match="per-request forward"):
        exit_fp32.compress(*questions[0])


def test_one_bad_request_fails_only_itself(exit_fp32: RagZip) -> None:
    (q0, d0), (q1, d1) = _questions()[-2:]
    requests = [(q0, d0), (q1, [{"title": "no text"}]), (q1, d1, "most of it"), (q1, d1, 0.5)]
    out = exit_fp32.compress_many(requests, return_exceptions=True)
    assert isinstance(out[1], InputError) and isinstance(out[2], BudgetError)
    _same(out[0], exit_fp32.compress(q0, d0))
    _same(out[3], exit_fp32.compress(q1, d1, 0.5))
    with pytest.raises(InputError):
        exit_fp32.compress_many(requests)


def test_a_pipeline_batches_its_first_stage_and_loads_the_exit_encoder_once() -> None:
    from ragzip.compressors.lingua2 import relevance_scorer

    rz = RagZip("exit+lingua2", exit={"dtype": "auto"})
    exit_stage = rz.compressor.stages[0]
    # lingua2's query scorer reads the very encoder the EXIT stage loaded (one copy per weights, dtype, device)
    assert relevance_scorer().model is exit_stage.scorer.model
    questions = _questions()[-2:]
    single = [rz.compress(q, docs, 0.5) for q, docs in questions]
    many = rz.compress_many([(q, docs, 0.5) for q, docs in questions])
    assert [r.method for r in many] == ["exit+lingua2"] * 2
    assert all(r.tokens_after <= Budget.ratio(0.5).token_limit(r.tokens_before) for r in many)
    assert [r.tokens_before for r in many] == [r.tokens_before for r in single]


def test_requests_must_be_requests(exit_fp32: RagZip) -> None:
    from ragzip.errors import ConfigError

    with pytest.raises(ConfigError, match="CompressionRequest"):
        exit_fp32.compress_many(["just a string"])  # type: ignore[list-item]


def test_lingua2_batches_its_relevance_forwards(monkeypatch: Any) -> None:
    """Query-aware lingua2: inside compress_many the relevance forward of every request ran in one batched call;
    a single request through compress_many is exactly compress."""
    from ragzip.compressors.lingua2_query import QueryScorer

    rz = RagZip("lingua2")
    questions = _questions()
    single = [rz.compress(q, docs, 0.5) for q, docs in questions]
    _same(rz.compress_many([(questions[0][0], questions[0][1], 0.5)])[0], single[0])
    calls: list[int] = []
    original = QueryScorer.score_many

    def counted(self: Any, jobs: Any) -> Any:
        calls.append(len(jobs))
        return original(self, jobs)

    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("a per-request relevance forward ran inside compress_many")

    monkeypatch.setattr(QueryScorer, "score_many", counted)
    monkeypatch.setattr(QueryScorer, "score", refuse)
    many = rz.compress_many([(q, docs, 0.5) for q, docs in questions])
    assert calls == [len(questions)]
    for a, b in zip(single, many):
        assert (a.tokens_before, a.budget) == (b.tokens_before, b.budget)
        assert b.tokens_after <= Budget.ratio(0.5).token_limit(b.tokens_before)
        assert b.stages[0].info["one_pass"] is True


def test_a_one_shot_iterable_of_documents_is_read_once_for_both_passes(exit_fp32: RagZip) -> None:
    q, docs = _questions()[-1]
    got = exit_fp32.compress_many([(q, (d for d in docs)), (q, iter(docs), 0.5)])
    _same(got[0], exit_fp32.compress(q, docs))
    _same(got[1], exit_fp32.compress(q, docs, 0.5))


def test_compress_batch_is_compress_many_with_one_budget(exit_fp32: RagZip) -> None:
    from ragzip.errors import ConfigError

    questions = _questions()[-2:]
    batch = exit_fp32.compress_batch([q for q, _ in questions], [d for _, d in questions], 0.5)
    for a, b in zip(batch, exit_fp32.compress_many([(q, d, 0.5) for q, d in questions])):
        _same(a, b)
    with pytest.raises(ConfigError, match="2 queries but 1 document lists"):
        exit_fp32.compress_batch([q for q, _ in questions], [questions[0][1]])
