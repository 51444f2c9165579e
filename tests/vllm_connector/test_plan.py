"""The vLLM connector's decisions, without vLLM: spans, segments and keys, the claim, what is saved, slots."""

from __future__ import annotations

import random

import pytest
import torch

from ragzip.errors import ConfigError
from ragzip.kvstore.record import ChunkRecord
from ragzip.kvstore.stores.memory import MemoryStore
from ragzip.vllm.plan import (
    Claim,
    Load,
    Segment,
    Span,
    moved_fingerprint,
    parse_spans,
    plan_claim,
    segments,
    slots_for,
    to_save,
)

FP = "vllm-llama-bfloat16-0123456789abcdef"
BLOCK = 16


def prompt(header: int, docs: list[int], tail: int, seed: int = 0) -> tuple[list[int], list[Span]]:
    rng = random.Random(seed)
    ids = [rng.randrange(5, 30000) for _ in range(header)]
    spans = []
    for n in docs:
        spans.append(Span(len(ids), len(ids) + n))
        ids += [rng.randrange(5, 30000) for _ in range(n)]
    return ids + [rng.randrange(5, 30000) for _ in range(tail)], spans


def test_parse_spans_accepts_objects_and_pairs() -> None:
    got = parse_spans({"ragzip": {"spans": [{"start": 3, "end": 9, "doc": "a"}, [9, 12]]}}, 20)
    assert got == [Span(3, 9, "a"), Span(9, 12, None)]
    assert parse_spans(None, 20) is None
    assert parse_spans({"other": 1}, 20) is None


@pytest.mark.parametrize("spans", [
    [[5, 3]],                      # empty / reversed
    [[0, 5], [4, 8]],              # overlapping
    [[0, 25]],                     # past the prompt
    [[True, 4]],                   # a bool is not a position
    [[0, "4"]],
    [{"start": 0, "end": 4, "doc": 7}],
    [[0, 1, 2]],
    "0-4",
])
def test_parse_spans_refuses_malformed_input(spans: object) -> None:
    with pytest.raises(ConfigError):
        parse_spans({"ragzip": {"spans": spans}}, 20)


def test_parse_spans_bounds_the_count() -> None:
    with pytest.raises(ConfigError, match="at most"):
        parse_spans({"ragzip": {"spans": [[i, i + 1] for i in range(600)]}}, 1000)


def test_segment_keys_are_exact_for_the_prefix_and_free_of_it_when_moved() -> None:
    ids, spans = prompt(10, [20, 30], 5)
    segs = segments(FP, ids, spans, chunk_tokens=32, moved=True)
    assert [(s.start, s.end) for s in segs] == [(0, 10), (10, 30), (30, 60)]
    assert segs[0].moved_key is None and segs[1].moved_key and segs[2].moved_key
    # The second document after another first one: another exact key, the same moved key.
    other_first = ids[:10] + [7] * 20 + ids[30:]
    again = segments(FP, other_first, spans, chunk_tokens=32, moved=True)
    assert again[2].key != segs[2].key
    assert again[2].moved_key == segs[2].moved_key
    assert again[0].key == segs[0].key
    # Another model: other keys throughout.
    assert all(a.key != b.key for a, b in zip(segs, segments("x" + FP, ids, spans, chunk_tokens=32), strict=True))
    assert all(s.moved_key is None for s in segments(FP, ids, spans, chunk_tokens=32))


def test_segments_without_spans_are_whole_chunks_and_a_gap_ends_the_spans() -> None:
    ids, _ = prompt(100, [], 0)
    assert [(s.start, s.end) for s in segments(FP, ids, None, chunk_tokens=32)] == [(0, 32), (32, 64), (64, 96)]
    gapped = [Span(10, 20), Span(25, 40)]
    assert [(s.start, s.end) for s in segments(FP, ids, gapped, chunk_tokens=32)] == [(0, 10), (10, 20)]


def test_claim_is_the_available_run_cut_to_a_block_and_short_of_the_last_token() -> None:
    ids, spans = prompt(10, [40, 40], 3)  # 93 tokens: segments end at 10, 50, 90
    segs = segments(FP, ids, spans, chunk_tokens=32)
    claim = plan_claim(segs, len(ids), 0, BLOCK, lambda key: True)
    assert claim.end == 80  # the run reaches 90; one short of the prompt is 92; block-aligned: 80
    assert claim.tokens == 80
    assert [(ld.lo, ld.hi) for ld in claim.loads] == [(0, 10), (10, 50), (50, 80)]
    # Everything cached, prompt ends on a block: vLLM still computes the last token itself.
    ids2, spans2 = prompt(16, [16, 32], 0)  # 64 tokens
    assert plan_claim(segments(FP, ids2, spans2, chunk_tokens=32), 64, 0, BLOCK, lambda k: True).end == 48


def test_claim_stops_at_the_first_miss() -> None:
    ids, spans = prompt(10, [40, 40], 3)
    segs = segments(FP, ids, spans, chunk_tokens=32)
    missing = segs[1].key
    claim = plan_claim(segs, len(ids), 0, BLOCK, lambda key: key != missing)
    assert claim.end == 0 and claim.tokens == 0 and claim.loads == []  # 10 tokens do not fill a block


def test_claim_starts_where_vllm_holds_the_prefix_and_skips_lookups_before_it() -> None:
    ids, spans = prompt(10, [40, 40], 3)
    segs = segments(FP, ids, spans, chunk_tokens=32)
    asked: list[str] = []

    def available(key: str) -> bool:
        asked.append(key)
        return True

    claim = plan_claim(segs, len(ids), 48, BLOCK, available)
    assert segs[0].key not in asked  # held by vLLM already
    assert (claim.computed, claim.end, claim.tokens) == (48, 80, 32)
    assert [(ld.segment.start, ld.lo, ld.hi) for ld in claim.loads] == [(10, 48, 50), (50, 50, 80)]
    # vLLM already holds more than the store offers: nothing to claim.
    assert plan_claim(segs, len(ids), 80, BLOCK, available).tokens == 0


def test_moved_documents_fill_a_miss_and_mark_where_saving_must_stop() -> None:
    ids, spans = prompt(10, [40, 40], 3)
    segs = segments(FP, ids, spans, chunk_tokens=32, moved=True)
    exact_missing = segs[1].key
    claim = plan_claim(segs, len(ids), 0, BLOCK, lambda key: key != exact_missing)
    assert claim.end == 80
    assert [ld.moved for ld in claim.loads] == [False, True, False]
    assert claim.first_moved == 10
    saved = to_save(segs, 0, len(ids), stop_at=claim.first_moved, present=lambda k: False)
    assert [s.start for s in saved] == [0]  # nothing from the moved document on is saved under an exact key


def test_to_save_takes_segments_completed_in_this_step_and_not_stored() -> None:
    ids, spans = prompt(10, [40, 40], 3)
    segs = segments(FP, ids, spans, chunk_tokens=32)
    assert [s.end for s in to_save(segs, 0, 64, stop_at=None, present=lambda k: False)] == [10, 50]
    assert [s.end for s in to_save(segs, 64, 93, stop_at=None, present=lambda k: False)] == [90]
    stored = segs[0].key
    assert [s.end for s in to_save(segs, 0, 93, stop_at=None, present=lambda k: k == stored)] == [50, 90]


def test_slots_follow_the_request_blocks() -> None:
    assert slots_for([7, 2], 4, 2, 6) == [30, 31, 8, 9]
    with pytest.raises(ConfigError):
        slots_for([7, 2], 4, 6, 9)


def test_claim_invariants_on_random_prompts() -> None:
    rng = random.Random(1)
    for trial in range(300):
        docs = [rng.randrange(1, 60) for _ in range(rng.randrange(0, 6))]
        ids, spans = prompt(rng.randrange(0, 30), docs, rng.randrange(0, 20), seed=trial)
        if not ids:
            continue
        segs = segments(FP, ids, spans or None, chunk_tokens=32, moved=rng.random() < 0.5)
        present = {s.key for s in segs if rng.random() < 0.8} | {s.moved_key for s in segs if rng.random() < 0.5}
        computed = rng.randrange(0, len(ids) // BLOCK + 1) * BLOCK
        claim = plan_claim(segs, len(ids), computed, BLOCK, present.__contains__)
        assert claim.end % BLOCK == 0 and claim.end <= max(len(ids) - 1, computed)
        assert claim.end >= computed
        pos = computed
        for ld in claim.loads:  # contiguous from what vLLM holds, each inside its segment, found in the store
            assert ld.lo == pos and ld.segment.start <= ld.lo < ld.hi <= ld.segment.end
            assert (ld.segment.moved_key if ld.moved else ld.segment.key) in present
            pos = ld.hi
        assert pos == (claim.end if claim.loads else computed)


def test_a_claim_reports_its_size() -> None:
    seg = Segment(0, 32, "k")
    assert Claim(16, 48, [Load(seg, 16, 32)]).tokens == 32
    assert Claim(16, 16).tokens == 0


def test_the_records_the_connector_writes_are_stored_under_the_keys_plan_computes() -> None:
    """`ByteStore.put` refuses a record whose own key differs, and the blob format checks every header field: both
    kinds of entry must round-trip through a real store."""
    ids, spans = prompt(10, [20, 30], 5)
    seg = segments(FP, ids, spans, chunk_tokens=32, moved=True)[2]
    layers = [(torch.randn(2, seg.end - seg.start, 4), torch.randn(2, seg.end - seg.start, 4)) for _ in range(3)]
    store = MemoryStore(1 << 20)
    store.put(seg.key, ChunkRecord(FP, ids[seg.start:seg.end], seg.start, layers, torch.float32,
                                   context=ids[:seg.start]))
    assert seg.moved_key is not None
    store.put(seg.moved_key, ChunkRecord(moved_fingerprint(FP), ids[seg.start:seg.end], seg.start, layers,
                                         torch.float32))
    exact, moved = store.get(seg.key), store.get(seg.moved_key)
    assert exact is not None and exact.context == tuple(ids[:seg.start])
    assert moved is not None and moved.context == () and moved.start == seg.start
    assert store.stats()["corrupt"] == 0
