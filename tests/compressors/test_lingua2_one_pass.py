"""Query-aware lingua2 in one encoder pass: P(keep) comes from the keep head on the EXIT relevance forward (the
classifier distilled onto the EXIT encoder), not from a second pass of the classifier."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ragzip.compressors.lingua2 import Lingua2Compressor, relevance_scorer
from ragzip.compressors.lingua2_model import TokenClassifier
from ragzip.text import split_sentences
from ragzip.tokens import get_token_counter
from ragzip.types import Document

SQUAD = json.loads((Path(__file__).resolve().parents[1] / "fixtures" / "lingua2_squad.json").read_text())["squad"]


@pytest.fixture(scope="module")
def counter() -> Any:
    return get_token_counter(None)


def _refuse(*_: Any, **__: Any) -> Any:
    raise AssertionError("the classifier ran a pass of its own")


def test_with_a_question_the_classifier_runs_no_pass_of_its_own(counter: Any, monkeypatch: Any) -> None:
    rec = SQUAD[0]
    doc = [Document(rec["id"], rec["text"], rec["title"])]
    one = Lingua2Compressor(counter)
    monkeypatch.setattr(TokenClassifier, "keep_probs", _refuse)
    result = one.compress(rec["question"], doc, 0.5)
    assert result.stages[0].info["one_pass"] is True and result.stages[0].info["windows"] == 0
    with pytest.raises(AssertionError, match="pass of its own"):  # without a question there is no relevance pass
        one.compress("", doc, 0.5)
    with pytest.raises(AssertionError, match="pass of its own"):  # one_pass=False: the classifier's own pass
        Lingua2Compressor(counter, one_pass=False).compress(rec["question"], doc, 0.5)


def test_a_sentence_longer_than_the_encoder_window_falls_back_to_the_classifier(counter: Any,
                                                                               monkeypatch: Any) -> None:
    """The EXIT windows keep only the head of an over-long sentence; the tokens they did not read are scored by
    the classifier (only those), the rest still from the forward."""
    long_text = " ".join(f"word{i}" for i in range(700))  # one 'sentence' of ~2,000 encoder tokens
    comp = Lingua2Compressor(counter)
    calls: list[int] = []
    original = TokenClassifier.keep_probs

    def counted(self: Any, windows: Any, **kw: Any) -> Any:
        calls.append(len(windows))
        return original(self, windows, **kw)

    monkeypatch.setattr(TokenClassifier, "keep_probs", counted)
    rec = SQUAD[1]
    result = comp.compress(rec["question"], [Document("short", rec["text"]), Document("long", long_text)], 0.5)
    assert len(calls) == 1 and result.stages[0].info["windows"] == calls[0] >= 1  # only the unread tail's windows
    unread = len(comp.classifier.encode([long_text])[0][0]) - 380  # more than the EXIT window's room is unread
    assert calls[0] <= -(-unread // (comp.classifier.max_seq_len - 2)) + 1
    assert all(np.isfinite(s.score).all() for s in comp.unit_scores(rec["question"], [Document("l", long_text)])[0])


def test_the_keep_head_agrees_with_the_classifier_it_was_distilled_from(counter: Any) -> None:
    """On held-out paragraphs the keep head's token probabilities follow the classifier's (dev correlation at
    training 0.75; a head that ignores its input or is inverted is far below the bar)."""
    comp = Lingua2Compressor(counter, one_pass=False)
    mine, theirs = [], []
    for rec in SQUAD:
        encs, probs, _ = comp.token_keep_probs([rec["text"]])
        rel = relevance_scorer().score(rec["question"], [(rec["title"], rec["text"], split_sentences(rec["text"]))])
        starts, keep = rel.token_starts[0], rel.token_keep[0]
        by_start = dict(zip(starts.tolist(), keep.tolist()))
        for (a, _), p in zip(encs[0][1].tolist(), probs[0].tolist()):
            if a in by_start:
                mine.append(by_start[a])
                theirs.append(p)
    assert len(mine) > 1000
    assert float(np.corrcoef(mine, theirs)[0, 1]) > 0.6


def test_exit_and_lingua2_share_one_forward(monkeypatch: Any) -> None:
    """In `exit+lingua2` the EXIT stage's scores and lingua2's relevance come from one forward per request (one
    batched forward for a batch), and the EXIT stage's scores are exactly its own forward's."""
    from ragzip import RagZip
    from ragzip.compressors.exit_scorers import EncoderScorer
    from ragzip.compressors.lingua2_query import QueryScorer

    rz = RagZip("exit+lingua2")
    recs = SQUAD[:3]
    docs = [[Document(r["id"], r["text"], r["title"]), Document("other", SQUAD[5]["text"], SQUAD[5]["title"])]
            for r in recs]
    own = RagZip("exit").compressor.stages[0]
    expected = [{d.id: [round(c.score, 4) for c in cands] for d, cands in zip(ds, own.score(r["question"], ds))}
                for r, ds in zip(recs, docs)]
    calls: list[int] = []
    original = QueryScorer.score_many

    def counted(self: Any, jobs: Any) -> Any:
        calls.append(len(jobs))
        return original(self, jobs)

    monkeypatch.setattr(QueryScorer, "score_many", counted)
    monkeypatch.setattr(EncoderScorer, "score_documents", _refuse)
    monkeypatch.setattr(EncoderScorer, "score_many", _refuse)
    monkeypatch.setattr(TokenClassifier, "keep_probs", _refuse)
    single = rz.compress(recs[0]["question"], docs[0])
    assert calls == [1]
    assert single.stages[0].info["sentence_scores"] == expected[0]
    assert single.stages[1].info["one_pass"] is True
    calls.clear()
    many = rz.compress_many([(r["question"], ds) for r, ds in zip(recs, docs)])
    assert calls == [3]
    for got, want in zip([m.stages[0].info["sentence_scores"] for m in many], expected):
        assert got.keys() == want.keys()  # batched in bf16: the same scores up to the batch shape's rounding
        assert all(g == pytest.approx(w, abs=0.02) for k in got for g, w in zip(got[k], want[k]))


def test_relevance_maps_onto_the_kept_text() -> None:
    """Kept pieces are verbatim spans: a token at original position p of a piece [o, o + n) kept at text offset a
    lands at a + p - o; a kept sentence takes the probability of the original sentence it came from."""
    from ragzip.compressors.handoff import DocRelevance, on_kept_text
    from ragzip.spans import assemble

    text = "Alpha one. Beta two. Gamma three."
    original = DocRelevance(spans=((0, 10), (11, 20), (21, 33)), sentences=(0.1, 0.5, 0.9),
                            token_starts=np.array([0, 6, 11, 16, 21, 27]), answer=np.array([.1, .2, .3, .4, .5, .6]),
                            keep=np.array([.9, .8, .7, .6, .5, .4]))
    kept = assemble(Document("d", text), [(0, 10), (21, 33)], sep=" ")
    assert kept.text == "Alpha one. Gamma three."
    sentences, starts, answer, keep = on_kept_text(kept, original, [(0, 10), (11, 23)])
    assert sentences == [0.1, 0.9]
    assert starts.tolist() == [0, 6, 11, 17] and answer.tolist() == [.1, .2, .5, .6]
    assert keep is not None and keep.tolist() == [.9, .8, .5, .4]
    # a kept-text sentence made of several candidate spans (a table's lines) takes the best of them
    whole = assemble(Document("d", text), [(0, 33)])
    assert on_kept_text(whole, original, [(0, 33)])[0] == [0.9]
