"""The blending gate (`ragzip.kv_qualify`) and `ReuseMode.AUTO`: a model whose reused caches change the answers is
marked unqualified and `auto` then answers exactly as full prefill; a model whose blend keeps them blends; verdicts
are cached as checked JSON; an explicit blend on an unqualified model runs with a warning."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from ragzip.errors import ConfigError
from ragzip.kv_engine import KVReuseEngine
from ragzip.kv_qualify import Qualification, cached_qualification, calibration_prompts, load_or_qualify, qualify
from ragzip.kvstore.codecs.raw import RawCodec
from ragzip.kvstore.stores.memory import MemoryStore
from ragzip.types import Document

QUESTIONS = ["who wrote the novel ?", "where is the river ?", "what did the band win ?", "who was educated ?",
             "what is the capital city ?", "which year was the war ?"]


class ScrambledValues(RawCodec):
    """A deliberately broken cache: values come back from the store replaced by noise (keys intact)."""

    name = "scrambled"

    def decode(self, meta: dict[str, Any], payload: bytes, shapes: Any, dtype: torch.dtype) -> list[Any]:
        gen = torch.Generator().manual_seed(7)
        return [(k, torch.randn(v.shape, generator=gen).to(dtype) * 4) for k, v in super().decode(
            meta, payload, shapes, dtype)]


DOCS = [
    Document("r", "the largest river of the country is on the capital city and the island", "river"),
    Document("n", "the novel was wrote by the author who was born in the year of the war"),
    Document("b", "the band won the first album of the year and played music for the king"),
]
PROMPTS = [(q, DOCS[i % 3:] + DOCS[: i % 3]) for i, q in enumerate(QUESTIONS)]


def _engine(word_llm: tuple[Any, Any], codec: Any, tmp_path: Path, **kw: Any) -> KVReuseEngine:
    return KVReuseEngine(word_llm[0], word_llm[1], store=MemoryStore(codec=codec), run_self_check=False,
                         qualification_dir=tmp_path, **kw)


def test_a_broken_cache_is_unqualified_and_auto_then_answers_exactly_as_full_prefill(
        word_llm: tuple[Any, Any], tmp_path: Path) -> None:
    engine = _engine(word_llm, ScrambledValues(), tmp_path)
    verdict = qualify(engine, prompts=PROMPTS, ratios=(0.15, 0.3, 0.5), max_new_tokens=6)
    assert not verdict.qualified and verdict.ratio is None and "not qualified" in verdict.reason
    assert set(verdict.agreement) == {"0.15", "0.3", "0.5"}
    # the broken caches do change the blended answers (what the gate caught)
    assert any(engine.answer(q, d, max_new_tokens=6, mode="blend") != engine.answer(q, d, max_new_tokens=6,
                                                                                     mode="full") for q, d in PROMPTS)
    engine = _engine(word_llm, ScrambledValues(), tmp_path, qualification=verdict)
    for q, docs in PROMPTS:
        auto = engine.prefill(q, docs)  # the default mode
        assert engine.stats.requested == "auto" and engine.stats.mode in ("prefix", "full")
        assert "not qualified" in engine.stats.reason and engine.stats.as_dict()["mode"] == engine.stats.mode
        full = engine.prefill(q, docs, mode="full")
        torch.testing.assert_close(auto.logits, full.logits, atol=1e-5, rtol=1e-5)
        assert engine.answer(q, docs, max_new_tokens=6) == engine.answer(q, docs, max_new_tokens=6, mode="full")


def test_a_blend_that_keeps_the_answers_qualifies_and_auto_blends_at_that_ratio(
        word_llm: tuple[Any, Any], tmp_path: Path) -> None:
    engine = _engine(word_llm, None, tmp_path)
    verdict = qualify(engine, prompts=PROMPTS, ratios=(1.0,), max_new_tokens=6)  # full recompute: exact
    assert verdict.qualified and verdict.ratio == 1.0 and verdict.agreement == {"1": [6, 6]}
    engine = _engine(word_llm, None, tmp_path, qualification=verdict)
    q, docs = PROMPTS[0]
    engine.warm(docs)
    auto = engine.prefill(q, docs)
    assert (engine.stats.mode, engine.stats.ratio, engine.stats.hits) == ("blend", 1.0, 3)
    assert "qualified for blending at 100%" in engine.stats.reason
    torch.testing.assert_close(auto.logits, engine.prefill(q, docs, mode="full").logits, atol=1e-5, rtol=1e-5)
    # a verdict covers prompts up to 1.25x its longest calibration prompt: a longer one is not blended
    assert verdict.max_prompt_tokens == max(len(engine.pieces(q, d).token_ids) for q, d in PROMPTS)
    engine.prefill(q, docs * 2)
    assert engine.stats.mode in ("prefix", "full") and "this prompt has" in engine.stats.reason


def test_explicit_blend_on_an_unqualified_model_runs_with_a_warning(word_llm: tuple[Any, Any], tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    unqualified = Qualification(False, None, "not qualified for blending: test")
    engine = _engine(word_llm, None, tmp_path, qualification=unqualified)
    with caplog.at_level("WARNING", logger="ragzip.kv_engine"):
        engine.prefill(QUESTIONS[0], DOCS, mode="blend")
    assert engine.stats.mode == "blend" and "did not qualify" in str(engine.stats.warning)
    assert engine.stats.as_dict()["warning"] == engine.stats.warning and "did not qualify" in caplog.text
    engine.prefill(QUESTIONS[0], DOCS, mode="full")
    assert engine.stats.warning is None and "warning" not in engine.stats.as_dict()
    qualified = _engine(word_llm, None, tmp_path, qualification=Qualification(True, 0.3, "qualified"))
    qualified.prefill(QUESTIONS[0], DOCS, mode="blend")
    assert qualified.stats.warning is None


def test_verdicts_are_cached_per_identity_and_bad_files_are_recomputed(
        tiny_reader: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ragzip.registry import load_causal_lm

    model, tokenizer = load_causal_lm(tiny_reader, dtype=torch.float32)
    engine = KVReuseEngine(model, tokenizer, run_self_check=False, qualification_dir=tmp_path)
    calls: list[int] = []
    real = qualify

    def counting(*args: Any, **kwargs: Any) -> Qualification:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr("ragzip.kv_qualify.qualify", counting)
    first = load_or_qualify(engine, cache_dir=tmp_path, prompts=2, ratios=(0.5, 1.0), max_new_tokens=4)
    files = list((tmp_path / "kv-qualify").glob("*.json"))
    assert len(files) == 1 and len(calls) == 1 and first.identity["fingerprint"] == engine.fingerprint
    assert json.loads(files[0].read_text())["qualified"] == first.qualified
    again = load_or_qualify(engine, cache_dir=tmp_path, prompts=2, ratios=(0.5, 1.0), max_new_tokens=4)
    assert len(calls) == 1 and again == first  # read back, not recalibrated
    # another blend configuration is another identity: calibrated again, in its own file
    other = KVReuseEngine(model, tokenizer, run_self_check=False, blend=type(engine.blend)(query_weight=0.0))
    load_or_qualify(other, cache_dir=tmp_path, prompts=2, ratios=(0.5, 1.0), max_new_tokens=4)
    assert len(calls) == 2 and len(list((tmp_path / "kv-qualify").glob("*.json"))) == 2
    # a corrupt file and a file for another model are dropped and recomputed
    files[0].write_text("{not json")
    load_or_qualify(engine, cache_dir=tmp_path, prompts=2, ratios=(0.5, 1.0), max_new_tokens=4)
    assert len(calls) == 3 and json.loads(files[0].read_text())["identity"]["fingerprint"] == engine.fingerprint
    data = json.loads(files[0].read_text())
    data["identity"]["fingerprint"] = "llama-float32-0000000000000000"
    files[0].write_text(json.dumps(data))
    load_or_qualify(engine, cache_dir=tmp_path, prompts=2, ratios=(0.5, 1.0), max_new_tokens=4)
    assert len(calls) == 4
    data = json.loads(files[0].read_text())
    data["ratio"], data["qualified"] = 0.2, True  # a ratio the ladder never tried
    files[0].write_text(json.dumps(data))
    assert load_or_qualify(engine, cache_dir=tmp_path, prompts=2, ratios=(0.5, 1.0), max_new_tokens=4).ratio != 0.2
    assert len(calls) == 5
    # the engine reads a cached verdict at construction and computes nothing; it never adopts a weaker
    # calibration (2 prompts, another ladder), only the default one with other prompt lengths
    assert cached_qualification(engine, tmp_path) is None
    longer = load_or_qualify(engine, cache_dir=tmp_path, docs_per_prompt=2)
    found = cached_qualification(engine, tmp_path)
    assert found == longer and found.identity["blend"] == first.identity["blend"] and len(calls) == 6
    assert found.max_prompt_tokens == max(len(engine.pieces(q, d).token_ids) for q, d in calibration_prompts(10, 2))


def test_calibration_prompts_are_multi_document_and_deterministic() -> None:
    prompts = calibration_prompts(10)
    assert prompts == calibration_prompts(10) and len(prompts) == 10
    assert all(len(docs) == 6 for _, docs in prompts)
    places = [[d.id for d in docs].index(next(d.id for d in docs if q_in(q, d))) for q, docs in prompts[:3]]
    assert places == [0, 1, 2]  # the gold paragraph rotates through the prompt
    with pytest.raises(ConfigError):
        calibration_prompts(0)
    with pytest.raises(ConfigError, match="ascending"):
        qualify(None, ratios=(0.5, 0.2))  # type: ignore[arg-type]


def q_in(question: str, doc: Document) -> bool:
    from ragzip.demo import load_demo_corpus

    _, questions = load_demo_corpus()
    return next(x["source"] for x in questions if x["question"] == question) == doc.id


def test_kv_qualify_command_prints_and_caches_the_verdict(tiny_reader: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from ragzip.kvstore.cli import app

    monkeypatch.setenv("RAGZIP_CACHE_DIR", str(tmp_path))
    args = ["qualify", tiny_reader, "--dtype", "float32", "--prompts", "2", "--ratios", "1.0"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["qualified"] is True and out["ratio"] == 1.0 and out["agreement"] == {"1": [2, 2]}
    assert len(list((tmp_path / "kv-qualify").glob("*.json"))) == 1
    bad = CliRunner().invoke(app, ["qualify", tiny_reader, "--ratios", "0.5,0.2"])
    assert bad.exit_code == 2 and "ascending" in bad.output
    assert CliRunner().invoke(app, ["qualify", tiny_reader, "--ratios", "half"]).exit_code == 2



def test_a_store_without_a_codec_is_qualified_as_plain_records(word_llm: tuple[Any, Any], tmp_path: Path) -> None:
    from ragzip.kv_qualify import identity

    store = MemoryStore()
    del store.codec  # a custom ChunkStore need not have one
    engine = KVReuseEngine(word_llm[0], word_llm[1], store=store, run_self_check=False, qualification_dir=tmp_path)
    assert identity(engine, ratios=(1.0,), threshold=0.9, prompts=1, max_new_tokens=4)["codec"] == "none"
    assert qualify(engine, prompts=PROMPTS[:2], ratios=(1.0,), max_new_tokens=4).qualified
