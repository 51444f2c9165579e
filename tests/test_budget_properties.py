"""Property tests: on arbitrary unicode documents, every method and pipeline keeps the text sent to the LLM within
the cap (counted with the target tokenizer, separators included), reports exactly what it kept, and every kept
piece is source text at the offsets it claims."""

from __future__ import annotations

from functools import cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ragzip import Budget, RagZip
from ragzip.tokens import get_token_counter
from ragzip.types import CompressionResult, Document

METHODS = ["truncate", "random", "random@word", "embed-topk", "exit", "lingua2", "crag", "embed-topk+truncate",
           "crag+exit+lingua2"]

# Words from several scripts, digits, punctuation and emoji, so tokenizers split them in many ways.
LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFXYZ0123456789éüßøçñ" "пригдаБжЖ中文字日本語한국어αβγδ🙂🚀-'’,;:()%$"
WORD = st.text(alphabet=st.sampled_from(list(LETTERS)), min_size=1, max_size=12)
SENTENCE = st.lists(WORD, min_size=1, max_size=14).map(lambda ws: " ".join(ws) + ".")
DOCUMENT = st.one_of(
    st.lists(SENTENCE, min_size=1, max_size=6).map(" ".join),
    st.lists(SENTENCE, min_size=1, max_size=4).map("\n".join),
    st.sampled_from(["", "   ", "\n\n", "…", "🙂"]),
)
DOCUMENTS = st.lists(DOCUMENT, min_size=0, max_size=6)
BUDGET = st.one_of(st.integers(1, 120).map(Budget.tokens), st.floats(0.05, 1.0).map(Budget.ratio))
QUESTION = st.one_of(st.none(), SENTENCE)


@cache
def compressor(method: str) -> RagZip:
    name, _, unit = method.partition("@")
    return RagZip(name, unit=unit) if unit else RagZip(name)


def check(result: CompressionResult, docs: list[str], budget: Budget) -> None:
    counter = get_token_counter(None)
    before = counter.count("\n\n".join(d for d in docs if d.strip()))
    assert result.tokens_before == before
    assert result.tokens_after == counter.count(result.text)
    limit = budget.token_limit(before)
    assert limit is not None and result.tokens_after <= limit
    sources = {str(i): d for i, d in enumerate(docs)}
    for piece in result.documents:
        assert piece.text.strip()
        for span, (a, b) in zip(piece.spans, piece.offsets):
            assert sources[span.doc_id][span.start:span.end] == piece.text[a:b]
    assert result.rate is None if before == 0 else result.rate == pytest.approx(result.tokens_after / before)


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(docs=DOCUMENTS, question=QUESTION, budget=BUDGET)
def test_cap_holds_and_kept_text_is_source_text(method: str, docs: list[str], question: str | None,
                                                budget: Budget) -> None:
    check(compressor(method).compress(question, docs, budget), docs, budget)


@settings(max_examples=40, deadline=None)
@given(docs=st.lists(DOCUMENT, min_size=1, max_size=4), budget=BUDGET)
def test_documents_strings_and_dicts_give_the_same_result(docs: list[str], budget: Budget) -> None:
    rz = compressor("truncate")
    plain = rz.compress("q", docs, budget)
    as_docs = rz.compress("q", [Document(str(i), d) for i, d in enumerate(docs)], budget)
    as_dicts = rz.compress("q", [{"text": d} for d in docs], budget)
    def untimed(r: CompressionResult) -> dict:
        c = r.to_contract()
        return {**c, "seconds": 0, "stages": [{**s, "seconds": 0} for s in c["stages"]]}

    assert untimed(plain) == untimed(as_docs) == untimed(as_dicts)
