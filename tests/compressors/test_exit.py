from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
    # A hard cap wins over min_keep: under a budget smaller than any sentence the best sentence is cut to the
    # leading words that fit, still source text.
    tiny = make(min_keep=2).compress(QUERY, DOCS, Budget.tokens(3))
    assert tiny.tokens_after <= 3
    assert "Paris is the capital of France.".startswith(tiny.text) and tiny.text


def test_options_accept_cli_strings_and_reject_bad_values() -> None:
    comp = make(threshold="0.25", min_keep="3", batch_size="4")
    assert comp.options.threshold == 0.25 and comp.options.min_keep == 3 and comp.options.batch_size == 4
    with pytest.raises(ConfigError, match="valid"):
        ExitCompressor(WS, scorer="bm25")
    with pytest.raises(ConfigError, match="threshold"):
        make(threshold="high")
    with pytest.raises(ConfigError, match="min_keep"):
        make(min_keep="-1")
    with pytest.raises(ConfigError, match=r"unknown option.*temperature.*valid: \[.*threshold"):
        get_compressor("exit", counter=WS, temperature="0.1")
    with pytest.raises(ConfigError, match="doc_weight"):
        make(doc_weight="1.5")


def test_doc_weight_fuses_document_scores_into_the_selection() -> None:
    plain = make().compress(QUERY, DOCS).stages[0].info["sentence_scores"]
    fused = make(doc_weight="0.5", neighbor_weight="0").compress(QUERY, DOCS).stages[0].info["sentence_scores"]
    assert fused["a"][0] == plain["a"][0]  # the document's best sentence keeps its score
    assert fused["a"][1] == pytest.approx(0.5 * plain["a"][1] + 0.5 * plain["a"][0], abs=1e-4)


def _fixture_examples() -> list[tuple[Any, list[Document]]]:
    from ragzip.eval.datasets import parse_example

    examples = [parse_example(obj) for obj in json.loads(FIXTURE.read_text())]
    return [(ex, ex.documents()) for ex in examples]


def _support(example: Any, docs: list[Document], result: Any) -> tuple[int, int]:
    """(supporting sentences kept, supporting sentences), as the extractive eval counts them (>= 90% kept)."""
    from ragzip.eval.suites.extractive import support_counts

    hit, total, _, _ = support_counts(example, docs, result)
    return hit, total


def test_shipped_encoder_keeps_the_supporting_sentences_of_held_out_questions() -> None:
    comp = get_compressor("exit")  # the defaults: shipped weights, the local LLM's tokenizer for budgets
    kept_threshold = kept_at_fifth = kept_auto = 0
    for example, docs in _fixture_examples():
        result = comp.compress(example.question, docs, Budget.score(0.5))  # threshold mode
        kept_threshold += _support(example, docs, result)[0]
        assert result.tokens_after < 0.6 * result.tokens_before
        auto = comp.compress(example.question, docs)  # the default: auto, coverage 0.95
        assert auto.stages[0].info["mode"] == "auto"
        kept_auto += _support(example, docs, auto)[0]
        assert auto.tokens_after < 0.8 * auto.tokens_before
        # A quarter, counted exactly (separators included; at 0.2 the old count overshot the cap by ~10 tokens).
        kept_at_fifth += _support(example, docs, comp.compress(example.question, docs, Budget.ratio(0.25)))[0]
    assert kept_threshold >= 3 and kept_at_fifth >= 3  # of the 4 supporting sentences
    assert kept_auto == 4


@pytest.mark.parametrize("hops", [1, 2])
@pytest.mark.parametrize("budget", [Budget.ratio(1 / 3), Budget.ratio(0.2), Budget.tokens(60)])
def test_real_budgets_are_never_exceeded_and_mostly_used(hops: int, budget: Budget) -> None:
    counter = get_token_counter(None)
    comp = get_compressor("exit", counter=counter, hops=hops)
    for example, docs in _fixture_examples():
        result = comp.compress(example.question, docs, budget)
        limit = budget.token_limit(result.tokens_before)
        assert limit is not None
        used = counter.count(result.text)  # what the LLM gets: separators included
        assert used == result.tokens_after and 0.75 * limit <= used <= limit, (used, limit)


def test_real_second_pass_reaches_the_bridge_paragraph() -> None:
    from ragzip.compressors.exit import expand_query
    from ragzip.compressors.exit_scorers import EncoderScorer

    calls: list[str] = []

    class Recording(EncoderScorer):
        def score_documents(self, query, documents):  # type: ignore[no-untyped-def]
            calls.append(query)
            return super().score_documents(query, documents)

    example, docs = _fixture_examples()[0]  # bridge: the actor (Paul Gross) -> his daughter's paragraph
    question = example.question
    one = get_compressor("exit", hops=1)
    two = ExitCompressor(scorer=Recording(), hops=2)
    first, second = one.score(question, docs), two.score(question, docs)
    assert len(calls) == 2 and calls[0] == question and calls[1].startswith(question + " ")
    spans = [candidate_spans(d) for d in docs]
    sentences, doc_scores = one.score_passes(question, docs, spans)
    assert doc_scores is not None  # the shipped weights have a document head: it picks the evidence document
    top = max(range(len(docs)), key=lambda d: doc_scores[d])
    a, b = spans[top][max(range(len(spans[top])), key=lambda i: sentences[top][i])]
    assert calls[1] == expand_query(question, docs[top].title, docs[top].text[a:b])
    for a, b in zip(first, second):  # the better of the two passes: no score goes down
        assert all(y.score >= x.score - 0.02 for x, y in zip(a, b))  # (bf16 noise between separate forwards)
    assert _support(example, docs, two.compress(question, docs, Budget.ratio(1 / 3))) == (2, 2)


BRIDGE_QUERY = "Which city is the birthplace of the director of Jaws?"
BRIDGE_DOCS = [
    Document("film", "Jaws is a 1975 film directed by Steven Spielberg. It was a box-office hit.", title="Jaws"),
    Document("person", "Spielberg was born in Cincinnati. He grew up in Arizona.", title="Steven Spielberg"),
    Document("noise", "Sharks live in every ocean. Some sharks are large.", title="Sharks"),
]


def test_second_pass_expands_the_question_with_the_best_evidence_and_reaches_the_bridge_document() -> None:
    from ragzip.compressors.exit import expand_query

    one = ExitCompressor(WS, scorer=KeywordScorer(), hops=1).compress(BRIDGE_QUERY, BRIDGE_DOCS)
    assert one.stages[0].info["sentence_scores"]["person"] == [0.0, 0.0]  # no word shared with the question
    scorer = KeywordScorer()
    two = ExitCompressor(WS, scorer=scorer, hops="2", threshold=0.05).compress(BRIDGE_QUERY, BRIDGE_DOCS)
    assert len(scorer.calls) == 2
    expanded, second_docs = scorer.calls[1]
    assert expanded == expand_query(BRIDGE_QUERY, "Jaws", "Jaws is a 1975 film directed by Steven Spielberg.")
    assert [t for t, _, _ in second_docs] == ["Steven Spielberg", "Sharks"]  # the evidence document is not re-scored
    scores = two.stages[0].info["sentence_scores"]
    assert scores["person"][0] > 0.0 and two.stages[0].info["hops"] == 2
    assert "Spielberg was born in Cincinnati." in two.text
    # each score is the better of the two passes: nothing the first pass found is lost
    first = one.stages[0].info["sentence_scores"]
    assert all(b >= a for d in first for a, b in zip(first[d], scores[d]))
    with pytest.raises(ConfigError, match="hops"):
        ExitCompressor(WS, scorer=KeywordScorer(), hops=3)


def test_a_sentence_opening_with_a_pronoun_brings_its_predecessor_within_the_budget() -> None:
    query = "many museums"
    alone = make().compress(query, DOCS[:1], Budget.tokens(6))  # off by default
    assert alone.text == "It has many museums."
    both = make(keep_antecedents="true").compress(query, DOCS[:1], Budget.tokens(12))
    assert both.text == "Paris is the capital of France. It has many museums."
    assert both.tokens_after <= 12
    tight = make(keep_antecedents=True).compress(query, DOCS[:1], Budget.tokens(6))  # no room: the sentence alone
    assert tight.text == "It has many museums." and tight.tokens_after <= 6
    threshold = make(threshold=0.5, keep_antecedents=True).compress(query, DOCS[:1])
    assert threshold.text == "Paris is the capital of France. It has many museums."
    with pytest.raises(ConfigError, match="keep_antecedents"):
        make(keep_antecedents="maybe")


class DocHeadScorer(KeywordScorer):
    """KeywordScorer plus a fixed document score per title (as a scorer with a document head gives)."""

    def __init__(self, doc_scores: dict[str, float]) -> None:
        super().__init__()
        self.doc_scores = doc_scores

    def score_documents(self, query, documents):  # type: ignore[no-untyped-def]
        from ragzip.compressors.exit_encoder import DocumentScores

        return DocumentScores(self.score(query, documents), [self.doc_scores[t] for t, _, _ in documents])


def test_doc_weight_blends_the_document_head_score_when_the_scorer_has_one() -> None:
    scorer = DocHeadScorer({"Paris": 1.0, "Fruit": 0.0, "Rome": 0.0})
    info = ExitCompressor(WS, scorer=scorer, doc_weight="0.4").compress(QUERY, DOCS).stages[0].info
    plain = make().compress(QUERY, DOCS).stages[0].info["sentence_scores"]
    scores = info["sentence_scores"]
    assert scores["a"][1] == pytest.approx(0.6 * plain["a"][1] + 0.4 * 1.0, abs=1e-4)  # the head, not the best
    assert scores["c"][0] == pytest.approx(0.6 * plain["c"][0], abs=1e-4)                # sentence of the document
    default = ExitCompressor(WS, scorer=DocHeadScorer({"Paris": 1.0, "Fruit": 0.0, "Rome": 0.0})).compress(QUERY, DOCS)
    assert default.stages[0].info["sentence_scores"] == plain  # off by default


TABLE_DOC = Document("t", "Prices by city:\n\n| city | price |\n|---|---|\n| Paris | 10 |\n| Berlin | 12 |\n"
                          "| Rome | 9 |\n| Madrid | 11 |\n| Oslo | 20 |\n\nOslo is the most expensive city in the "
                          "table, and many people visit it every year for the fjords.", "Prices")


def test_a_table_is_split_into_rows_and_a_kept_row_brings_its_header() -> None:
    from ragzip.compressors.exit import candidate_spans, table_header

    spans = candidate_spans(TABLE_DOC)
    lines = [TABLE_DOC.text[a:b] for a, b in spans]
    assert "| Rome | 9 |" in lines and "| city | price |" in lines  # rows are units, not one 40-token "sentence"
    rome = lines.index("| Rome | 9 |")
    assert [lines[i] for i in table_header(TABLE_DOC.text, spans, rome)] == ["| city | price |", "|---|---|"]
    assert table_header(TABLE_DOC.text, spans, 0) == []  # prose has no header

    class RowScorer:  # only the answer row looks relevant: the header must come with it all the same
        name = "row"

        def score(self, query: str, documents: Any) -> list[list[float]]:
            return [[0.99 if "Rome" in text[a:b] else 0.01 for a, b in spans] for _, text, spans in documents]

    for comp in (get_compressor("exit", counter=WS), ExitCompressor(WS, scorer=RowScorer())):
        for budget in (None, Budget.ratio(0.4), Budget.score(0.5)):
            result = comp.compress("What is the price in Rome?", [TABLE_DOC], budget)
            text = result.text
            assert "| city | price |\n|---|---|\n" in text and "| Rome | 9 |" in text  # one row a line
            assert "\n\n|" not in text.split("| city")[1]  # no blank line inside the table


def test_structure_lines_of_a_json_block_are_units() -> None:
    from ragzip.compressors.exit import candidate_spans

    doc = Document("j", 'The service is configured in JSON:\n{\n  "name": "gateway",\n  "port": 8080,\n'
                        '  "workers": 4\n}')
    lines = [doc.text[a:b] for a, b in candidate_spans(doc)]
    assert '"port": 8080,' in lines and len(lines) >= 5
    prose = Document("p", "A wrapped paragraph of prose\ncontinues on the next line and\nends here.")
    assert len(candidate_spans(prose)) == 1  # wrapped prose stays one sentence
