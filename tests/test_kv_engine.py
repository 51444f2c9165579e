from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ragzip.errors import ConfigError
from ragzip.kernels.blend import BlendConfig
from ragzip.kv_engine import KVReuseEngine, ReuseMode
from ragzip.types import Document


@pytest.fixture(scope="module")
def engine_parts(word_llm: tuple[Any, Any]) -> tuple[Any, Any]:
    return word_llm


DOCS = [
    Document("1", "the river is the largest river of the country and the capital city is on the river", "river"),
    Document("2", "the author wrote a novel in the year of the war and was educated in a college"),
    Document("3", "the band played music and won the first album of the year with the king and queen"),
]


def _engine(parts: tuple[Any, Any], **kw: Any) -> KVReuseEngine:
    kw.setdefault("mode", ReuseMode.BLEND)  # these tests hold the blend's mechanics; auto: tests/test_kv_qualify.py
    return KVReuseEngine(parts[0], parts[1], **kw)


def test_pieces_are_stable_across_order_and_neighbours(engine_parts: tuple[Any, Any]) -> None:
    engine = _engine(engine_parts, run_self_check=False)
    a = engine.pieces("who wrote the novel ?", DOCS)
    b = engine.pieces("where is the river ?", list(reversed(DOCS)))
    assert a.header == b.header and a.documents[0] == b.documents[2]
    assert a.token_ids == a.header + a.documents[0] + a.documents[1] + a.documents[2] + a.tail


def test_store_hits_after_first_request(engine_parts: tuple[Any, Any], tmp_path: Path) -> None:
    from ragzip.kvstore.stores.disk import DiskStore

    engine = _engine(engine_parts, store=DiskStore(tmp_path))
    engine.prefill("who wrote the novel ?", DOCS)
    assert (engine.stats.hits, engine.stats.misses) == (0, 3)  # 3 documents (the header is not counted)
    engine.prefill("where is the river ?", list(reversed(DOCS)))
    assert (engine.stats.hits, engine.stats.misses) == (3, 0)
    assert engine.stats.ttft_s > 0 and engine.stats.reused_tokens > 0
    assert 0 < engine.stats.recomputed_tokens < engine.stats.prompt_tokens


def test_ratio_one_blend_matches_full_prefill_and_generation(engine_parts: tuple[Any, Any]) -> None:
    engine = _engine(engine_parts, blend=BlendConfig(recompute_ratio=1.0))
    q = "who wrote the novel ?"
    full = engine.prefill(q, DOCS, mode="full")
    blend = engine.prefill(q, DOCS, mode="blend")
    torch.testing.assert_close(blend.logits, full.logits, atol=1e-5, rtol=1e-5)
    target = list(engine.generate_ids(engine.prefill(q, DOCS, mode="full"), max_new_tokens=6))
    assert list(engine.generate_ids(blend, max_new_tokens=6)) == target
    assert engine.answer(q, DOCS, max_new_tokens=6) == engine.answer(q, DOCS, max_new_tokens=6, mode="full")
    assert "".join(engine.stream(q, DOCS, max_new_tokens=6)).strip() == engine.answer(q, DOCS, max_new_tokens=6)


def test_reuse_mode_equals_blend_at_ratio_zero(engine_parts: tuple[Any, Any]) -> None:
    engine = _engine(engine_parts, run_self_check=False)
    q = "where is the capital city ?"
    reuse = engine.prefill(q, DOCS, mode=ReuseMode.REUSE)
    zero = engine.prefill(q, DOCS, mode="blend", blend=BlendConfig(recompute_ratio=0.0, fresh_check_kv=False))
    torch.testing.assert_close(zero.logits, reuse.logits, atol=1e-5, rtol=1e-5)
    prefix = engine.prefill(q, DOCS, mode="prefix")
    full = engine.prefill(q, DOCS, mode="full")
    assert prefix.num_tokens == full.num_tokens
    # header + first document reused exactly, the rest computed: the same as a full prefill, and it generates alike
    torch.testing.assert_close(prefix.logits, full.logits, atol=1e-5, rtol=1e-5)
    assert list(engine.generate_ids(prefix, max_new_tokens=5)) == list(engine.generate_ids(full, max_new_tokens=5))
    engine.prefill(q, DOCS, mode="prefix")
    assert engine.stats.reused_tokens > 0  # header + first document are over a third of this prompt
    engine.prefill(q, DOCS * 3, mode="prefix")  # a short prefix does not pay: a plain full prefill instead
    assert (engine.stats.reused_tokens, engine.stats.recomputed_tokens) == (0, engine.stats.prompt_tokens)
    full = engine.prefill(q, DOCS, mode="full")
    # The first document at its true place is exact; with one document prefix caching equals full prefill.
    one_prefix = engine.prefill(q, DOCS[:1], mode="prefix")
    torch.testing.assert_close(one_prefix.logits, engine.prefill(q, DOCS[:1], mode="full").logits, atol=1e-5,
                               rtol=1e-5)
    rows = engine.teacher_forced_logits(full, [3, 4, 5])
    assert rows.shape == (3, len(engine_parts[1]))


def test_unknown_mode_is_refused(engine_parts: tuple[Any, Any]) -> None:
    with pytest.raises(ConfigError, match="valid"):
        _engine(engine_parts, run_self_check=False, mode="sometimes")


def test_controller_loads_from_a_fast_store_and_recomputes_instead_of_a_slow_one(engine_parts: tuple[Any, Any]) -> None:
    from ragzip.kvstore.controller import LoadingController, Speeds

    q = "who wrote the novel ?"
    fast = LoadingController(Speeds(store_bytes_per_s=1e12, prefill_tokens_per_s=10.0,
                                    decode_bytes_per_s={"raw": 1e12}))
    engine = _engine(engine_parts, controller=fast)
    engine.warm(DOCS)
    engine.prefill(q, DOCS)
    assert (engine.stats.hits, engine.stats.misses, engine.stats.recomputed_chunks) == (3, 0, 0)
    assert all(r.startswith("load raw") for r in engine.stats.decisions) and len(engine.stats.decisions) == 3
    assert fast.stats()["decisions"] == {"load:raw": 3}

    slow = LoadingController(Speeds(store_bytes_per_s=1.0, prefill_tokens_per_s=1e9, decode_bytes_per_s={"raw": 1.0}))
    engine.controller = slow
    blend = engine.prefill(q, DOCS)
    assert (engine.stats.hits, engine.stats.recomputed_chunks) == (0, 3)
    assert all(r.startswith("recompute") for r in engine.stats.decisions)
    assert engine.stats.as_dict()["recomputed_chunks"] == 3
    # every document recomputed inside the prompt, after the exact header: the same as a full prefill
    torch.testing.assert_close(blend.logits, engine.prefill(q, DOCS, mode="full").logits, atol=1e-5, rtol=1e-5)


def test_documents_are_cached_after_the_header_and_the_client_conversation_is_kept(
        engine_parts: tuple[Any, Any]) -> None:
    engine = _engine(engine_parts, run_self_check=False)
    plain = engine.pieces("who wrote the novel ?", DOCS)
    assert plain.context == plain.header  # no client system prompt: the header is the cache context
    chat = engine.pieces("who wrote the novel ?", DOCS, system="reply with few words",
                         history=[{"role": "user", "content": "the king"}, {"role": "assistant", "content": "queen"}])
    assert chat.context == plain.context and chat.documents == plain.documents and chat.header != plain.header
    text = engine.tokenizer.decode(chat.header)
    assert "reply with few words" in text and "king" in text and "queen" in text
    engine.prefill("who wrote the novel ?", DOCS)
    record = engine.chunk_kv(plain.documents[0], plain.context)
    assert record.context == tuple(plain.context) and record.start == len(plain.context)


def test_default_engine_loads_the_embedded_model_passes_its_self_check_and_answers_from_reused_caches() -> None:
    from ragzip.engine import LocalEngine

    engine = KVReuseEngine()  # the embedded SmolLM2, an in-memory store, the self-check run
    assert engine.self_check is not None and engine.self_check.full_vs_reference < 5e-2
    docs = [Document("t", "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.", "Eiffel Tower")]
    first = engine.answer("In which city is the Eiffel Tower?", docs, max_new_tokens=16)
    assert engine.stats.misses == 1 and "Paris" in first
    again = engine.answer("In which city is the Eiffel Tower?", docs, max_new_tokens=16)
    assert engine.stats.hits == 1 and engine.stats.misses == 0 and again == first
    plain = LocalEngine(dtype="float32")  # the same prompt on the plain engine
    assert engine.pieces("Where?", docs).token_ids == plain.prompt_ids("Where?", docs)
