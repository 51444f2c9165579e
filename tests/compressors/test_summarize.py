from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import httpx
import pytest

from ragzip.compressors.summarize import (
    LocalSummarizer,
    OpenAISummarizer,
    SummaryCache,
    cached_summary,
    make_summarizer,
    summary_messages,
)
from ragzip.errors import ConfigError, RagzipError


class CountingSummarizer:
    def __init__(self, name: str = "fake") -> None:
        self.name = name
        self.calls = 0

    def summarize(self, texts: Sequence[str], query: str = "", *, max_new_tokens: int = 96) -> str:
        self.calls += 1
        return f"{self.name}:{len(texts)}:{query}"


def test_messages_list_the_items_and_the_query() -> None:
    msgs = summary_messages(["a  ", "b"], query="battery?")
    assert msgs[0]["role"] == "system" and "battery?" in msgs[0]["content"]
    assert "Item 1: a\n\nItem 2: b" in msgs[1]["content"]
    assert "request" not in summary_messages(["a"])[0]["content"]


def test_cache_round_trip_and_persistence(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "s.sqlite"
    cache = SummaryCache(path)
    key = SummaryCache.key(["x", "y"], "p", "m", 32)
    assert cache.get(key) is None
    cache.put(key, "hello")
    assert SummaryCache(path).get(key) == "hello" and len(cache) == 1
    assert key != SummaryCache.key(["y", "x"], "p", "m", 32)
    assert key != SummaryCache.key(["x", "y"], "p", "other-model", 32)
    assert key != SummaryCache.key(["x", "y"], "p2", "m", 32)
    assert key != SummaryCache.key(["x", "y"], "p", "m", 64)


def test_cached_summary_is_keyed_by_members_prompt_and_model(tmp_path: Path) -> None:
    cache = SummaryCache(tmp_path / "c.sqlite")
    a, b = CountingSummarizer("a"), CountingSummarizer("b")
    assert cached_summary(a, ["t1", "t2"], cache=cache) == ("a:2:", False)
    assert cached_summary(a, ["t1", "t2"], cache=cache) == ("a:2:", True)
    assert cached_summary(a, ["t1", "t2"], "q", cache=cache) == ("a:2:q", False)  # the query is part of the prompt
    assert cached_summary(b, ["t1", "t2"], cache=cache) == ("b:2:", False)
    assert cached_summary(a, ["t1"], cache=cache) == ("a:1:", False)
    assert a.calls == 3 and b.calls == 1
    assert cached_summary(a, ["t1"], cache=None) == ("a:1:", False) and a.calls == 4


def test_openai_summarizer_posts_a_chat_completion() -> None:
    seen: dict = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["url"] = str(request.url)
        seen["auth"] = request.headers.get("authorization")
        seen["body"] = json.loads(request.content)
        return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": " Short. "}}]})

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        summ = OpenAISummarizer("http://llm.local/v1/", "tiny", api_key="k", client=client)
        assert summ.summarize(["one", "two"], max_new_tokens=20) == "Short."
    assert seen["url"] == "http://llm.local/v1/chat/completions"
    assert seen["auth"] == "Bearer k"
    assert seen["body"]["model"] == "tiny" and seen["body"]["max_tokens"] == 20
    assert seen["body"]["temperature"] == 0 and "Item 2: two" in seen["body"]["messages"][1]["content"]


@pytest.mark.parametrize("response", [httpx.Response(500, text="boom"), httpx.Response(200, json={"nope": 1})])
def test_openai_summarizer_errors_are_clear(response: httpx.Response) -> None:
    with httpx.Client(transport=httpx.MockTransport(lambda request: response)) as client:
        with pytest.raises(RagzipError, match="llm.local"):
            OpenAISummarizer("http://llm.local/v1", client=client).summarize(["x"])


def test_make_summarizer_dispatch() -> None:
    remote = make_summarizer("https://api.example/v1#gpt-x")
    assert isinstance(remote, OpenAISummarizer) and remote.model == "gpt-x"
    assert remote.base_url == "https://api.example/v1"
    local = make_summarizer(None)
    assert isinstance(local, LocalSummarizer) and local.name == "local:default"
    with pytest.raises(ConfigError):
        OpenAISummarizer("ftp://x")


@pytest.mark.slow
def test_local_summarizer_writes_a_summary_within_the_window() -> None:
    summ = LocalSummarizer(max_input_tokens=64)
    texts = ["The battery lasts two days on one charge. " * 8, "Battery life is great, two days per charge."]
    fitted = summ.fit_texts(texts)
    assert len(summ.engine.chat_ids(summary_messages(fitted))) <= 64
    out = summ.summarize(texts, max_new_tokens=24)
    assert isinstance(out, str) and out.strip()
