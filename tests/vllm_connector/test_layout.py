"""The prompt the proxy sends to vLLM: a set of documents in any order is one prompt, with honest spans."""

from __future__ import annotations

import pytest

from ragzip.prompt import PromptBuilder
from ragzip.registry import load_tokenizer
from ragzip.types import Document
from ragzip.vllm.layout import lay_out
from ragzip.vllm.plan import parse_spans

DOCS = [Document("a", "Paris is the capital of France.", "France"),
        Document("b", "The Nile flows north into the Mediterranean Sea."),
        Document("c", "Mount Kilimanjaro is the highest mountain in Africa.", "Kilimanjaro")]


@pytest.fixture(scope="module")
def builder() -> PromptBuilder:
    return PromptBuilder(load_tokenizer("smollm2-135m-instruct"))  # the shipped tokenizer files


def test_a_set_in_any_order_is_the_same_prompt(builder: PromptBuilder) -> None:
    one = lay_out(builder, "Where is Paris?", DOCS)
    other = lay_out(builder, "Where is Paris?", [DOCS[2], DOCS[0], DOCS[1]])
    assert one.token_ids == other.token_ids and one.spans == other.spans
    # The caller's order when asked.
    kept = lay_out(builder, "Where is Paris?", [DOCS[2], DOCS[0], DOCS[1]], canonical=False)
    assert kept.order == [0, 1, 2] and kept.token_ids != one.token_ids


def test_spans_name_each_documents_own_tokens(builder: PromptBuilder) -> None:
    laid = lay_out(builder, "Where is Paris?", DOCS, system="Be brief.")
    pieces = builder.pieces("Where is Paris?", DOCS, system="Be brief.")
    assert laid.token_ids[:len(pieces.header)] == pieces.header
    assert laid.token_ids[-len(pieces.tail):] == pieces.tail
    for span, i in zip(laid.spans, laid.order, strict=True):
        assert laid.token_ids[span["start"]:span["end"]] == pieces.documents[i]
    # What the connector parses back is what was laid out.
    spans = parse_spans(laid.kv_transfer_params(), len(laid.token_ids))
    assert spans is not None and [(s.start, s.end) for s in spans] == [(s["start"], s["end"]) for s in laid.spans]
    assert spans[0].start == len(pieces.header) and spans[-1].end == len(laid.token_ids) - len(pieces.tail)


def test_the_documents_are_the_same_tokens_wherever_they_appear(builder: PromptBuilder) -> None:
    a = lay_out(builder, "Q1?", DOCS[:2])
    b = lay_out(builder, "Another question?", DOCS)
    doc_tokens = {s["doc"]: a.token_ids[s["start"]:s["end"]] for s in a.spans}
    for s in b.spans:
        if s["doc"] in doc_tokens:
            assert b.token_ids[s["start"]:s["end"]] == doc_tokens[s["doc"]]
