"""Exact-mode behaviour of the LLMLingua-2-style compressor: budgets, faithfulness, protection, CJK, options."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ragzip.budget import Budget
from ragzip.compressors.lingua2 import Lingua2Compressor
from ragzip.errors import ConfigError
from ragzip.tokens import HFTokenCounter, TokenCounter, WhitespaceCounter
from ragzip.types import CompressionResult, Document

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SQUAD = json.loads((FIXTURES / "lingua2_squad.json").read_text(encoding="utf-8"))["squad"]

STRUCTURED = """Install the client and call the endpoint described at https://example.com/api/v2/docs?lang=en today.

| name | height | year |
|------|:------:|-----:|
| Eiffel Tower | 330 m | 1889 |
| Empire State Building | 443 m | 1931 |

```python
def area(radius):
    return 3.14159 * radius ** 2
```

The config is {"timeout": 30, "retries": 5} and the version is 2.4.1; everything else here is filler text that
the compressor may freely drop because it carries very little information at all, really, honestly.
"""
CJK = ("东京是日本的首都，也是世界上人口最多的城市之一。富士山位于东京西南方向，高度为3776米。"
       "今天天气很好，我们去公园散步吧。")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    from ragzip.eval.suites.lingua2 import build_tiny_classifier

    folder = build_tiny_classifier(tmp_path_factory.mktemp("l2"), "bert-base-multilingual-cased",
                                   [r["text"] for r in SQUAD], seed=1)
    return str(folder)


@pytest.fixture(scope="module")
def subword_counter() -> TokenCounter:
    from transformers import AutoTokenizer

    from ragzip.registry import resolve_embedder

    return HFTokenCounter(AutoTokenizer.from_pretrained(resolve_embedder()), "minilm")


def _check_faithful(docs: list[Document], result: CompressionResult) -> None:
    """Each output piece is source text at whole-word boundaries; the text is the pieces joined by spaces."""
    for doc, out in zip(docs, result.documents):
        pieces = []
        for span, (a, b) in zip(out.spans, out.offsets):
            src = doc.text[span.start:span.end]
            assert out.text[a:b] == src
            assert src and not src[0].isspace() and not src[-1].isspace()
            assert span.start == 0 or doc.text[span.start - 1].isspace() or _cjk(doc.text[span.start])
            assert span.end == len(doc.text) or doc.text[span.end].isspace() or _cjk(doc.text[span.end - 1])
            pieces.append(src)
        assert out.text == " ".join(pieces)
        starts = [s.start for s in out.spans]
        assert starts == sorted(starts)


def _cjk(ch: str) -> bool:
    from ragzip.compressors.lingua2_words import is_cjk

    return is_cjk(ch)


@pytest.mark.parametrize("target", [5, 17, 40, 111])
def test_target_tokens_is_met_exactly_with_whitespace_counter(tiny_bert: str, target: int) -> None:
    comp = Lingua2Compressor(counter=WhitespaceCounter(), model=tiny_bert, protect=False)
    docs = [Document(r["id"], r["text"]) for r in SQUAD[:4]]
    res = comp.compress("", docs, Budget.tokens(target))
    assert res.tokens_after == target  # one word = one token here, so the cap is hit exactly
    _check_faithful(docs, res)


@pytest.mark.parametrize("rate", [0.2, 0.33, 0.5, 0.8])
def test_rate_never_exceeds_and_lands_close_with_subword_counter(tiny_bert: str, subword_counter: TokenCounter,
                                                                 rate: float) -> None:
    comp = Lingua2Compressor(counter=subword_counter, model=tiny_bert)
    docs = [Document(r["id"], r["text"]) for r in SQUAD[:6]]
    res = comp.compress("", docs, Budget.ratio(rate))
    limit = Budget.ratio(rate).token_limit(res.tokens_before)
    assert limit is not None
    assert res.tokens_after <= limit
    assert res.tokens_after >= limit - 8  # within a word or two of the cap, across 6 documents and all windows
    _check_faithful(docs, res)


def test_long_text_over_many_windows_meets_the_cap(tiny_bert: str, subword_counter: TokenCounter) -> None:
    text = "\n".join(r["text"] for r in SQUAD) * 2  # ~4,500 tokens: 9+ encoder windows
    comp = Lingua2Compressor(counter=subword_counter, model=tiny_bert)
    res = comp.compress("", [Document("long", text)], Budget.tokens(700))
    assert 690 <= res.tokens_after <= 700
    assert res.stages[0].info["windows"] >= 9


def test_protected_structure_survives(tiny_bert: str) -> None:
    comp = Lingua2Compressor(counter=WhitespaceCounter(), model=tiny_bert)
    doc = Document("s", STRUCTURED)
    res = comp.compress("", [doc], Budget.ratio(0.6))
    out = res.text
    assert "https://example.com/api/v2/docs?lang=en" in out
    assert "```python\ndef area(radius):\n    return 3.14159 * radius ** 2\n```" in out
    assert "| name | height | year |\n|------|:------:|-----:|" in out
    body_rows = [line for line in out.split("\n") if line.startswith("|") and "---" not in line]
    assert all(line.count("|") == 4 for line in body_rows[1:])  # cell pipes of every row kept
    assert '{"timeout": 30, "retries": 5}' in out
    assert "2.4.1;" in out
    _check_faithful([doc], res)


def test_protect_off_allows_pruning_structure(tiny_bert: str) -> None:
    comp = Lingua2Compressor(counter=WhitespaceCounter(), model=tiny_bert, protect="false")
    res = comp.compress("", [Document("s", STRUCTURED)], Budget.ratio(0.3))
    assert "```python\ndef area(radius):\n    return 3.14159 * radius ** 2\n```" not in res.text


def test_cjk_is_split_into_pieces_without_mojibake(tiny_bert: str, subword_counter: TokenCounter) -> None:
    comp = Lingua2Compressor(counter=subword_counter, model=tiny_bert, protect=False)
    doc = Document("zh", CJK)
    res = comp.compress("", [doc], Budget.ratio(0.5))
    out = res.documents[0]
    assert "\ufffd" not in out.text
    assert 0 < len(out.text.replace(" ", "")) < len(CJK)
    assert all(ch in CJK for ch in out.text.replace(" ", ""))
    assert res.stages[0].info["words"] > 20  # CJK runs are split at token pieces, not kept as one "word"
    _check_faithful([doc], res)


def test_force_tokens_digits_and_query_aware(tiny_bert: str) -> None:
    text = SQUAD[0]["text"]
    base = Lingua2Compressor(counter=WhitespaceCounter(), model=tiny_bert, protect=False)
    forced = Lingua2Compressor(counter=WhitespaceCounter(), model=tiny_bert, protect=False,
                               force_tokens="Broncos,Super Bowl", keep_digits="1")
    res = forced.compress("", [Document("d", text)], Budget.ratio(0.5)).text
    assert res.count("Broncos") == text.count("Broncos")
    assert "Super Bowl" in res
    assert all(w in res.split() for w in re.findall(r"\S*\d\S*", text))
    question = "Which stadium in Santa Clara hosted the game?"
    qa = Lingua2Compressor(counter=WhitespaceCounter(), model=tiny_bert, protect=False, query_aware=True,
                           query_weight=0.7)
    assert not qa.is_query_agnostic and base.is_query_agnostic
    kept = qa.compress(question, [Document("d", text)], Budget.ratio(0.3)).text.split()
    plain = base.compress(question, [Document("d", text)], Budget.ratio(0.3)).text.split()
    hits = [w for w in ("stadium", "Santa", "Clara") if w in text]
    assert sum(any(h in k for k in kept) for h in hits) > sum(any(h in k for k in plain) for h in hits) or \
        all(any(h in k for k in kept) for h in hits)


def test_threshold_budget_and_drop_consecutive(tiny_bert: str) -> None:
    comp = Lingua2Compressor(counter=WhitespaceCounter(), model=tiny_bert, protect=False,
                             force_tokens=["--"], drop_consecutive=True)
    doc = Document("d", "alpha -- -- -- beta -- gamma " * 3)
    res = comp.compress("", [doc], Budget.score(0.0))  # threshold 0 keeps every word ...
    assert "-- --" not in res.text  # ... but repeated force tokens with nothing between collapse
    assert res.text.count("alpha") == 3


def test_options_parse_from_cli_strings_and_reject_bad_values(tiny_bert: str) -> None:
    from ragzip.compressors.registry import get_compressor

    comp = get_compressor("lingua2", counter=WhitespaceCounter(), model=tiny_bert, mode="reference",
                          query_aware="false", word_prob="first", protect="0", batch_size="2")
    assert comp.options.mode.value == "reference" and comp.options.word_prob.value == "first"
    assert comp.options.protect is False and comp.options.batch_size == 2
    for bad in ({"mode": "fast"}, {"word_prob": "max"}, {"protect": "maybe"}, {"force_tokens": "[1"},
                {"query_weight": "2"}, {"mode": "reference", "query_aware": True}, {"mode": "reference", "protect": 1},
                {"context_filter": "yes"}):
        with pytest.raises(ConfigError):
            Lingua2Compressor(counter=WhitespaceCounter(), model=tiny_bert, **bad)
    with pytest.raises(ConfigError):
        get_compressor("lingua2", counter=WhitespaceCounter(), model=tiny_bert, unknown_option=1)


def test_missing_model_is_a_clear_error() -> None:
    from ragzip.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError):
        Lingua2Compressor(counter=WhitespaceCounter(), model="/nonexistent/llmlingua-2-model")


def test_default_model_compresses() -> None:
    comp = Lingua2Compressor(counter=WhitespaceCounter())
    docs = [Document(r["id"], r["text"], r["title"]) for r in SQUAD[:2]]
    res = comp.compress("", docs, Budget.ratio(0.5))
    assert res.tokens_after <= Budget.ratio(0.5).token_limit(res.tokens_before)  # type: ignore[operator]
    assert [d.title for d in res.documents] == [d.title for d in docs]
    _check_faithful(docs, res)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(min_size=0, max_size=300), target=st.integers(min_value=1, max_value=60))
def test_arbitrary_unicode_is_faithful_and_capped(tiny_bert: str, text: str, target: int) -> None:
    comp = Lingua2Compressor(counter=WhitespaceCounter(), model=tiny_bert)
    doc = Document("u", text)
    res = comp.compress("", [doc], Budget.tokens(target))
    assert res.tokens_after <= target
    out = res.documents[0]
    for span, (a, b) in zip(out.spans, out.offsets):
        assert out.text[a:b] == text[span.start:span.end]
    assert out.text == " ".join(text[s.start:s.end] for s in out.spans)
    assert np.all(np.diff([s.start for s in out.spans]) > 0) if len(out.spans) > 1 else True
