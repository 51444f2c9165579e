from __future__ import annotations

import pytest

from ragzip.errors import InputError
from ragzip.server.context import COMPRESSED_MARK, extract, inject, parse_block, render_block
from ragzip.types import Document


def test_block_with_document_elements_round_trips() -> None:
    docs = [Document("a", "Paris is in France.", 'Cap "ital"'), Document("b", "Bread is food.")]
    rendered = render_block(docs)
    head = f"<documents {COMPRESSED_MARK}>"
    assert rendered.startswith(head)
    parsed = parse_block(rendered[len(head):-len("</documents>")])
    assert [(d.id, d.title, d.text) for d in parsed] == [("a", 'Cap "ital"', "Paris is in France."),
                                                          ("b", "", "Bread is food.")]


def test_plain_block_splits_paragraphs_and_duplicate_ids_fail() -> None:
    assert [d.text for d in parse_block("\none\n\n two \n\n\n")] == ["one", "two"]
    with pytest.raises(InputError):
        parse_block('<document id="x">a</document><document id="x">b</document>')


def test_block_is_replaced_in_place_and_query_excludes_it() -> None:
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Context: <documents>\nA.\n\nB.\n</documents> Question: what is A?"}]
    ctx = extract(messages, None)
    assert ctx.source == "messages" and [d.text for d in ctx.documents] == ["A.", "B."]
    assert ctx.query == "Context: Question: what is A?"
    out = inject(ctx, [Document("block-0", "A.")])
    head = f"Context: <documents {COMPRESSED_MARK}>\n"
    assert out[1]["content"].startswith(head + "<document id=\"block-0\">\nA.\n</document>")
    assert out[1]["content"].endswith("</documents> Question: what is A?") and out[0] == messages[0]


def test_explicit_documents_go_before_the_last_user_turn_including_content_parts() -> None:
    messages = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": [{"type": "text", "text": "Who?"}]}]
    ctx = extract(messages, [Document("d", "Text.")])
    assert ctx.query == "Who?" and ctx.source == "documents"
    out = inject(ctx, [Document("d", "Text.")])
    assert out[2]["content"][0]["text"].startswith("<documents ") and out[2]["content"][1]["text"] == "Who?"
    assert out[0]["content"] == "first" and messages[2]["content"][0] == {"type": "text", "text": "Who?"}


def test_a_block_ragzip_rendered_is_recognised_as_already_compressed() -> None:
    ctx = extract([{"role": "user", "content": "Context: <documents>\nA.\n</documents> Who?"}], None)
    assert not ctx.already_compressed
    rendered = inject(ctx, [Document("block-0", "A.")])  # what a ragzip server in front sends on
    again = extract(rendered, None)
    assert again.already_compressed and [d.text for d in again.documents] == ["A."] and again.query == "Context: Who?"


def test_no_context_leaves_messages_alone() -> None:
    messages = [{"role": "user", "content": "Hello"}]
    ctx = extract(messages, None)
    assert ctx.source == "none" and ctx.query == "Hello" and inject(ctx, []) == messages
