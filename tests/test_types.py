from __future__ import annotations

import pytest

from ragzip.budget import Budget
from ragzip.errors import BudgetError, InputError
from ragzip.spans import assemble, compose
from ragzip.types import CompressedDocument, CompressionResult, Document, Span


def test_budget_requires_at_most_one_field() -> None:
    with pytest.raises(BudgetError):
        Budget(rate=0.5, target_tokens=10)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_budget_rejects_bad_rates(bad: float) -> None:
    with pytest.raises(BudgetError):
        Budget.ratio(bad)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_budget_rejects_bad_token_caps(bad: object) -> None:
    with pytest.raises(BudgetError):
        Budget.tokens(bad)  # type: ignore[arg-type]


def test_budget_token_limit_arithmetic() -> None:
    assert Budget.ratio(0.3).token_limit(1000) == 300
    assert Budget.ratio(0.5).token_limit(3) == 1
    assert Budget.ratio(0.01).token_limit(10) == 1  # never zero for a non-empty input
    assert Budget.ratio(0.5).token_limit(0) == 0
    assert Budget.tokens(128).token_limit(10_000) == 128
    assert Budget.score(0.5).token_limit(1000) is None
    assert Budget().is_unbounded and not Budget.ratio(0.5).is_unbounded


def test_span_validation() -> None:
    with pytest.raises(InputError):
        Span("d", 5, 2)


def test_assemble_records_provenance() -> None:
    doc = Document("d1", "Alpha beta. Gamma delta. Epsilon.", "T")
    out = assemble(doc, [(0, 11), (25, 33)])
    assert out.text == "Alpha beta. Epsilon."
    for span, (a, b) in zip(out.spans, out.offsets):
        assert out.text[a:b] == doc.text[span.start:span.end]


def test_compose_maps_through_two_stages() -> None:
    doc = Document("d1", "one two three four five six")
    first = assemble(doc, [(0, 7), (14, 18), (24, 27)])  # "one two four six"
    assert first.text == "one two four six"
    second = assemble(Document("d1", first.text), [(4, 12)])  # "two four" crosses a piece boundary
    mapped = compose(first, second)
    assert mapped.text == "two four"
    assert [(s.start, s.end) for s in mapped.spans] == [(4, 7), (14, 18)]
    for span, (a, b) in zip(mapped.spans, mapped.offsets):
        assert mapped.text[a:b] == doc.text[span.start:span.end]


def test_result_contract_and_rate() -> None:
    doc = CompressedDocument("a", "kept", "Title", (Span("a", 3, 7),), ((0, 4),))
    result = CompressionResult("exit", (doc,), 10, 4, 0.01)
    contract = result.to_contract()
    assert contract["contexts"] == [{"id": "a", "title": "Title", "text": "kept", "spans": [[3, 7]], "scores": []}]
    assert contract["rate"] == pytest.approx(0.4)
    assert result.text == "kept"
    assert CompressionResult("none", (), 0, 0, 0.0).rate is None  # nothing to keep: no rate


def test_document_text_must_be_string() -> None:
    with pytest.raises(InputError):
        Document("x", None)  # type: ignore[arg-type]
