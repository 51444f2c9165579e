from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from ragzip.budget import Budget
from ragzip.compressors.exit import ExitCompressor, candidate_spans
from ragzip.compressors.registry import get_compressor
from ragzip.errors import ConfigError
from ragzip.tokens import get_token_counter
from ragzip.types import Document

FIXTURE = Path(__file__).parent.parent / "fixtures" / "exit" / "hotpotqa_heldout2.json"
WS = get_token_counter("whitespace")


class KeywordScorer:
    """Scores a sentence by the fraction of query words it contains (deterministic, no model)."""

    name = "keyword"

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[tuple[str, str, list[tuple[int, int]]]]]] = []

    def score(self, query: str, documents: Sequence[tuple[str, str, Sequence[tuple[int, int]]]]) -> list[list[float]]:
        self.calls.append((query, [(t, x, list(s)) for t, x, s in documents]))
        words = {w.strip("?.,").lower() for w in query.split()}
        out = []
        for _title, text, spans in documents:
            row = []
            for a, b in spans:
                toks = {w.strip("?.,").lower() for w in text[a:b].split()}
                row.append(len(words & toks) / max(1, len(words)))
            out.append(row)
        return out


DOCS = [
    Document("a", "Paris is the capital of France. It has many museums. The Louvre is in Paris.", title="Paris"),
    Document("b", "Bananas are yellow. Monkeys like bananas.", title="Fruit"),
    Document("c", "The capital of Italy is Rome. Rome has the Colosseum.", title="Rome"),
]
QUERY = "What is the capital of France?"


def make(**kw: object) -> ExitCompressor:
    return ExitCompressor(WS, scorer=KeywordScorer(), **kw)  # type: ignore[arg-type]


def test_candidates_are_sentences_of_the_text_never_the_title() -> None:
    doc = DOCS[0]
    spans = candidate_spans(doc)
    assert [doc.text[a:b] for a, b in spans] == ["Paris is the capital of France.", "It has many museums.",
                                                 "The Louvre is in Paris."]
    assert candidate_spans(Document("e", "   ", title="Only a title")) == []
    scorer = KeywordScorer()
    ExitCompressor(WS, scorer=scorer).compress(QUERY, DOCS)
    _, docs = scorer.calls[0]
    assert docs[0][0] == "Paris" and all(docs[0][1][a:b] != "Paris" for a, b in docs[0][2])


def test_threshold_mode_keeps_order_drops_empty_documents_and_traces_spans() -> None:
    result = make(threshold=0.5).compress(QUERY, DOCS)
    assert [d.id for d in result.documents] == ["a", "c"]
    assert result.documents[0].text == "Paris is the capital of France."
    assert result.documents[1].text == "The capital of Italy is Rome."
    for doc in result.documents:
        src = next(d for d in DOCS if d.id == doc.id)
        for span, (o1, o2) in zip(doc.spans, doc.offsets):
            assert src.text[span.start:span.end] == doc.text[o1:o2]
        assert len(doc.scores) == len(doc.spans) and all(s >= 0.5 for s in doc.scores)
    assert result.text == "Paris is the capital of France.\n\nThe capital of Italy is Rome."
    info = result.stages[0].info
    assert info["mode"] == "threshold" and info["num_sentences"] == 7
    assert set(info["sentence_scores"]) == {"a", "b", "c"}  # type: ignore[arg-type]


def test_kept_sentences_of_one_document_are_joined_by_a_space_in_original_order() -> None:
    result = make(threshold=0.1).compress("Paris Louvre capital France", DOCS[:1])
    assert result.documents[0].text == "Paris is the capital of France. The Louvre is in Paris."


def test_budget_threshold_overrides_the_default_threshold() -> None:
    loose = make(threshold=0.9).compress(QUERY, DOCS, Budget.score(0.1))
    assert loose.stages[0].info["threshold"] == 0.1
    assert [d.id for d in loose.documents] == ["a", "c"] and loose.stages[0].info["num_kept"] == 4
    strict = make(threshold=0.1).compress(QUERY, DOCS, Budget.score(0.9))
    assert strict.stages[0].info["num_kept"] == 1


@pytest.mark.parametrize("budget", [Budget.ratio(0.3), Budget.ratio(0.5), Budget.tokens(7), Budget.tokens(12)])
def test_budget_mode_never_exceeds_the_cap_and_prefers_high_scores(budget: Budget) -> None:
    result = make().compress(QUERY, DOCS, budget)
    limit = budget.token_limit(result.tokens_before)
    assert limit is not None and 0 < result.tokens_after <= limit
    assert result.stages[0].info["mode"] == "budget"
    assert result.documents[0].text.startswith("Paris is the capital of France.")


def test_min_keep_keeps_the_best_sentence_when_nothing_passes() -> None:
    result = make(threshold=0.99).compress(QUERY, DOCS)
    assert [d.text for d in result.documents] == ["Paris is the capital of France."]
    nothing = make(threshold=0.99, min_keep=0).compress(QUERY, DOCS)
    assert nothing.documents == () and nothing.text == ""
    # A budget smaller than any sentence still keeps min_keep sentences (the one documented overrun).
    tiny = make(min_keep=2).compress(QUERY, DOCS, Budget.tokens(1))
    assert sum(len(d.spans) for d in tiny.documents) == 2


def test_options_accept_cli_strings_and_reject_bad_values() -> None:
    comp = make(threshold="0.25", min_keep="3", batch_size="4")
    assert comp.threshold == 0.25 and comp.min_keep == 3
    with pytest.raises(ConfigError, match="valid"):
        ExitCompressor(WS, scorer="bm25")
    with pytest.raises(ConfigError, match="threshold"):
        make(threshold="high")
    with pytest.raises(ConfigError, match="min_keep"):
        make(min_keep="-1")
    with pytest.raises(ConfigError, match="invalid options"):
        get_compressor("exit", counter=WS, temperature="0.1")
    with pytest.raises(ConfigError, match="doc_weight"):
        make(doc_weight="1.5")


def test_doc_weight_fuses_document_scores_into_the_selection() -> None:
    plain = make().compress(QUERY, DOCS).stages[0].info["sentence_scores"]
    fused = make(doc_weight="0.5", neighbor_weight="0").compress(QUERY, DOCS).stages[0].info["sentence_scores"]
    assert fused["a"][0] == plain["a"][0]  # the document's best sentence keeps its score
    assert fused["a"][1] == pytest.approx(0.5 * plain["a"][1] + 0.5 * plain["a"][0], abs=1e-4)


def test_shipped_encoder_ranks_supporting_sentences_above_distractors() -> None:
    comp = get_compressor("exit", counter=WS)  # the default: the encoder weights installed with the package
    for example in json.loads(FIXTURE.read_text()):
        docs = [Document(str(i), c["text"], title=c["title"]) for i, c in enumerate(example["contexts"])]
        per_doc = comp.score(example["question"], docs)
        support, other = [], []
        for ctx, cands in zip(example["contexts"], per_doc):
            gold = {ctx["sentences"][i].strip() for i in ctx["supporting_sentence_ids"]}
            for c in cands:
                (support if ctx["text"][c.start:c.end] in gold else other).append(c.score)
        assert support and min(support) > 0.5, support
        assert min(support) > sorted(other)[len(other) // 2]  # above the median distractor
        assert max(support) > max(other) - 1e-6 or sum(s > max(support) for s in other) <= 2
        result = comp.compress(example["question"], docs, Budget.ratio(1 / 3))
        kept = {result.documents[k].text[o1:o2] for k in range(len(result.documents))
                for o1, o2 in result.documents[k].offsets}
        assert any(s in kept for ctx in example["contexts"]
                   for s in (ctx["sentences"][i].strip() for i in ctx["supporting_sentence_ids"]))
        assert result.tokens_after <= Budget.ratio(1 / 3).token_limit(result.tokens_before)  # type: ignore[operator]
