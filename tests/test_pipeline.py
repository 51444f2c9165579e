from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragzip import Budget, RagZip
from ragzip.errors import ConfigError
from ragzip.pipeline import Pipeline, build_compressor
from ragzip.tokens import WhitespaceCounter
from ragzip.types import Document

DOCS = [
    Document("r", "The Rhine rises in the Swiss Alps. It ends in the North Sea. It is 1,230 km long.", "Rhine"),
    Document("p", "Paris is the capital of France. It has many museums. The Louvre is the largest."),
]


def test_pipeline_keeps_stats_and_meets_overall_cap() -> None:
    counter = WhitespaceCounter()
    pipe = build_compressor("embed-topk+truncate", counter=counter)
    result = pipe.compress("Where does the Rhine end?", DOCS, Budget.tokens(6))
    assert [s.name for s in result.stages] == ["embed-topk", "truncate"]
    assert result.tokens_after <= 6 and result.tokens_before == 33
    originals = {d.id: d.text for d in DOCS}
    for doc in result.documents:
        for span, (a, b) in zip(doc.spans, doc.offsets):
            assert doc.text[a:b] == originals[doc.id][span.start:span.end]


class _DropAll:
    name = "drop-all"

    def compress(self, query, documents, budget, *, input_tokens=None):  # type: ignore[no-untyped-def]
        from ragzip.types import CompressionResult

        return CompressionResult(self.name, (), 10, 0, 0.0)


def test_a_stage_that_leaves_nothing_falls_back_to_min_keep() -> None:
    pipe = Pipeline([_DropAll()], counter=WhitespaceCounter())
    result = pipe.compress("q", DOCS, Budget())
    assert result.text == "The Rhine rises in the Swiss Alps."
    assert result.stages[0].info["fallback"] == "min_keep"
    assert result.tokens_after == 7 and result.stages[0].tokens_after == 7  # counted, though the stage did not


def test_config_file_pipelines(tmp_path: Path) -> None:
    cfg = tmp_path / "pipe.json"
    cfg.write_text(json.dumps({"stages": [{"method": "embed-topk", "budget": {"rate": 0.8}},
                                          {"method": "random", "options": {"unit": "word", "seed": 3}}]}))
    pipe = build_compressor(str(cfg), counter=WhitespaceCounter())
    assert pipe.name == "embed-topk+random"
    result = pipe.compress("Rhine?", DOCS, Budget.ratio(0.5))
    assert 0 < result.tokens_after <= 16
    cfg.write_text(json.dumps({"stages": [{"method": "truncate", "budget": {"ratio": 0.5}}]}))
    with pytest.raises(ConfigError, match="unknown budget keys"):
        build_compressor(str(cfg), counter=WhitespaceCounter())


def test_facade_accepts_strings_and_dicts() -> None:
    rz = RagZip("truncate", tokenizer="whitespace")
    result = rz.compress("q", ["one two three four", {"id": "x", "text": "five six"}], Budget.ratio(0.5))
    assert result.text == "one two three"
    assert result.documents[0].id == "0"
    with pytest.raises(ConfigError):
        RagZip("truncate", tokenizer="whitespace", bogus=1)
