"""The README's Python examples run as written (the proxy one is in tests/server/test_readme_proxy.py)."""

from __future__ import annotations

import math
from typing import Any

import pytest


def _run(code: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the project's own README
    return namespace


def test_python_example(readme_example: Any) -> None:
    ns = _run(readme_example("python"))
    result, rz = ns["result"], ns["rz"]
    # the budget contract the README states: what the LLM gets, counted by the same tokenizer, within the cap
    assert result.tokens_after == rz.counter.count(result.text) <= math.floor(0.3 * result.tokens_before)
    assert result.tokens_before == rz.counter.count("\n\n".join(
        d["text"] if isinstance(d, dict) else d for d in ns["docs"]))
    source = {"rhine": ns["docs"][0]["text"], "1": ns["docs"][1]}
    for doc in result.documents:  # every kept piece is source text at the offsets it names
        for span, (a, b) in zip(doc.spans, doc.offsets):
            assert doc.text[a:b] == source[span.doc_id][span.start:span.end]
    assert "North Sea" in result.text


def test_auto_example(readme_example: Any, capsys: pytest.CaptureFixture[str]) -> None:
    ns = _run(readme_example("auto"))  # docs/auto.md: its asserts are the claims it makes
    assert ns["result"].auto["coverage"] == 0.95 and ns["capped"].budget["auto"]["max_tokens"] == 8
    assert "'coverage': 0.95" in capsys.readouterr().out


def test_langchain_example(readme_example: Any) -> None:
    ns = _run(readme_example("langchain"))
    docs = ns["docs"]
    assert docs and all("ragzip" in d.metadata for d in docs)
    meta = docs[0].metadata["ragzip"]
    assert meta["query_rate"] <= 0.3 and "Eiffel" in " ".join(d.page_content for d in docs)
    texts = ns["texts"]
    for d in docs:
        source = next(t for t in texts if d.page_content.split(" ")[0] in t)
        assert all(source[a:b] in d.page_content for a, b in d.metadata["ragzip"]["spans"])


def test_llmlingua_example(readme_example: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from ragzip.tokens import get_token_counter

    ns = _run(readme_example("llmlingua"))
    res = ns["res"]
    cl100k = get_token_counter("cl100k_base")  # llmlingua's counts are cl100k tokens of the whole prompt
    prompt = "\n\n".join(["Answer briefly.", *ns["contexts"], "Where does the Rhine end?"])
    assert res["origin_tokens"] == cl100k.count(prompt)
    assert res["compressed_tokens"] == cl100k.count(res["compressed_prompt"]) <= 30
    assert res["ratio"] == f"{res['origin_tokens'] / res['compressed_tokens']:.1f}x"
    assert "North Sea" in res["compressed_prompt"]
    printed = capsys.readouterr().out
    assert f"{res['origin_tokens']} {res['compressed_tokens']} {res['ratio']}" in printed


def test_llama_index_example(readme_example: Any, capsys: pytest.CaptureFixture[str]) -> None:
    ns = _run(readme_example("llama-index"))
    nodes = ns["response"].source_nodes
    assert nodes and "Eiffel" in capsys.readouterr().out
    sources = {d.metadata["source"]: d.text for d in ns["docs"]}
    for n in nodes:
        meta = n.node.metadata["ragzip"]
        assert meta["query_rate"] <= 0.5
        assert [sources[n.node.metadata["source"]][a:b] for a, b in meta["spans"]] == [
            n.node.get_content()[x:y] for x, y in _offsets(n.node.get_content(), sources[n.node.metadata["source"]],
                                                          meta["spans"])]


def _offsets(kept: str, source: str, spans: list[list[int]]) -> list[tuple[int, int]]:
    """Where each source span's text sits in the kept text, in order (the pieces are joined by separators)."""
    out, pos = [], 0
    for a, b in spans:
        at = kept.index(source[a:b], pos)
        out.append((at, at + b - a))
        pos = at + b - a
    return out


def test_vllm_layout_example(readme_example: Any, capsys: pytest.CaptureFixture[str]) -> None:
    ns = _run(readme_example("vllm-layout"))  # docs/vllm.md
    spans = ns["one"].kv_transfer_params()["ragzip"]["spans"]
    assert len(spans) == 2 and spans[0]["end"] == spans[1]["start"]
    assert "'spans'" in capsys.readouterr().out
