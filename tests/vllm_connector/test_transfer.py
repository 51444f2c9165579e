"""The worker half's rules without vLLM: what is saved, what is loaded where, and that a bad entry never reaches
the cache (the connector then reports the blocks and vLLM recomputes them)."""

from __future__ import annotations

import random

import pytest
import torch

from ragzip.kernels.rope import default_inv_freq, rerotate_keys
from ragzip.kvstore.stores.disk import DiskStore
from ragzip.vllm.paged import PagedLayout, split_cache
from ragzip.vllm.plan import Load, Span, plan_claim, segments
from ragzip.vllm.transfer import build_records, entry_problem, load_entry

FP = "vllm-llama-bfloat16-0123456789abcdef"
N, H, D, LAYERS = 8, 2, 8, 3


def plain_writer(key, value, key_cache, value_cache, slots) -> None:
    b, o = slots // N, slots % N
    key_cache[b, :, o] = key
    value_cache[b, :, o] = value


LAYOUT = PagedLayout.probe(plain_writer, block_size=N, heads=H, head_dim=D, dtype=torch.float32)


def caches(blocks: int = 12) -> list[torch.Tensor]:
    return [torch.zeros(blocks, H, N, 2 * D) for _ in range(LAYERS)]


def request() -> tuple[list[int], list[Span]]:
    rng = random.Random(0)
    ids = [rng.randrange(5, 999) for _ in range(40)]
    return ids, [Span(6, 20), Span(20, 36)]


def computed(prompt: list[int], block_ids: list[int]) -> list[torch.Tensor]:
    """A request's cache as vLLM would leave it: each token's K/V written at its slot."""
    torch.manual_seed(0)
    out = caches()
    for cache in out:
        kv = torch.randn(2, len(prompt), H, D)
        slots = torch.tensor([block_ids[p // N] * N + p % N for p in range(len(prompt))])
        plain_writer(kv[0], kv[1], *split_cache(cache), slots)
    return out


def save_all(store: DiskStore, prompt: list[int], spans: list[Span], block_ids: list[int], *, moved: bool) -> None:
    src = computed(prompt, block_ids)
    for seg in segments(FP, prompt, spans, chunk_tokens=N, moved=moved):
        slots = [block_ids[p // N] * N + p % N for p in range(seg.start, seg.end)]
        layers = [LAYOUT.gather(c, slots) for c in src]
        for key, record in build_records(FP, seg, prompt, layers, moved=moved):
            store.put(key, record)


def test_an_entry_saved_on_one_replica_loads_into_other_blocks_on_another(tmp_path) -> None:
    prompt, spans = request()
    store = DiskStore(tmp_path)
    save_all(store, prompt, spans, [0, 1, 2, 3, 4], moved=False)
    segs = segments(FP, prompt, spans, chunk_tokens=N)
    claim = plan_claim(segs, len(prompt), 8, N, store.contains)  # the other replica holds one block
    assert (claim.computed, claim.end) == (8, 32)
    target, blocks = caches(), [7, 3, 9, 1, 5]
    for load in claim.loads:
        assert load_entry(store, load, prompt, fingerprint=FP, caches=target, layout=LAYOUT, block_ids=blocks,
                          inv_freq=None) is None
    source = computed(prompt, [0, 1, 2, 3, 4])
    for src, dst in zip(source, target, strict=True):
        want = LAYOUT.gather(src, [p for p in range(8, 32)])
        got = LAYOUT.gather(dst, [blocks[p // N] * N + p % N for p in range(8, 32)])
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
        # Nothing outside the claim was touched: vLLM's own first block and the tail stay as they were.
        assert not dst[7].any() and not dst[5].any()


@pytest.mark.parametrize("damage", ["missing", "corrupt", "other_model", "other_prefix", "other_tokens"])
def test_a_bad_entry_is_refused_and_nothing_is_written(damage: str, tmp_path) -> None:
    prompt, spans = request()
    store = DiskStore(tmp_path)
    save_all(store, prompt, spans, [0, 1, 2, 3, 4], moved=False)
    seg = segments(FP, prompt, spans, chunk_tokens=N)[1]
    load, fingerprint, asked = Load(seg, seg.start, seg.end), FP, list(prompt)
    if damage == "missing":
        store.remove(seg.key)
    elif damage == "corrupt":
        blob = bytearray(store.get_blob(seg.key) or b"")
        blob[len(blob) // 2] ^= 0xFF
        store.put_blob(seg.key, bytes(blob))
    elif damage == "other_model":
        fingerprint = "vllm-llama-bfloat16-ffffffffffffffff"
    elif damage == "other_prefix":  # the request's prefix differs from the one the entry was computed after
        asked[0] += 1
    else:  # the request's tokens differ inside the segment (the plan and the request disagree)
        asked[seg.start + 1] += 1
    target = caches()
    problem = load_entry(store, load, asked, fingerprint=fingerprint, caches=target, layout=LAYOUT,
                         block_ids=[0, 1, 2, 3, 4], inv_freq=None)
    assert problem is not None
    assert all(not c.any() for c in target)
    if damage == "corrupt":
        assert store.stats()["corrupt"] == 1 and not store.contains(seg.key)  # evicted, counted


def test_entry_checks_cover_layers_and_dtype(tmp_path) -> None:
    prompt, spans = request()
    store = DiskStore(tmp_path)
    save_all(store, prompt, spans, [0, 1, 2, 3, 4], moved=False)
    seg = segments(FP, prompt, spans, chunk_tokens=N)[0]
    record = store.get(seg.key)
    load = Load(seg, 0, seg.end)
    assert entry_problem(record, load, prompt, fingerprint=FP, num_layers=LAYERS, dtype=torch.float32) is None
    assert "layers" in str(entry_problem(record, load, prompt, fingerprint=FP, num_layers=LAYERS + 1,
                                         dtype=torch.float32))
    assert "layers" in str(entry_problem(record, load, prompt, fingerprint=FP, num_layers=LAYERS,
                                         dtype=torch.bfloat16))


def test_a_moved_document_is_re_rotated_to_its_new_position(tmp_path) -> None:
    prompt, spans = request()
    store = DiskStore(tmp_path)
    save_all(store, prompt, spans, [0, 1, 2, 3, 4], moved=True)
    # The second document first, after the same header: its exact key misses, its moved entry is found.
    doc1, doc2 = prompt[6:20], prompt[20:36]
    swapped = prompt[:6] + doc2 + doc1 + prompt[36:]
    new_spans = [Span(6, 22), Span(22, 36)]
    segs = segments(FP, swapped, new_spans, chunk_tokens=N, moved=True)
    claim = plan_claim(segs, len(swapped), 0, N, store.contains)
    assert [ld.moved for ld in claim.loads] == [False, True, True]
    inv_freq = default_inv_freq(10000.0, D)
    target = caches()
    blocks = [0, 1, 2, 3, 4]
    for load in claim.loads:
        assert load_entry(store, load, swapped, fingerprint=FP, caches=target, layout=LAYOUT, block_ids=blocks,
                          inv_freq=inv_freq) is None
    source = computed(prompt, blocks)
    src_k, _ = LAYOUT.gather(source[0], list(range(20, 36)))  # doc2 where it was computed (20..35)
    got_k, got_v = LAYOUT.gather(target[0], list(range(6, 22)))  # ... now at 6..21
    assert torch.allclose(got_k, rerotate_keys(src_k, -14, inv_freq), atol=1e-5)
    assert not torch.equal(got_k, src_k)
    assert torch.equal(got_v, LAYOUT.gather(source[0], list(range(20, 36)))[1])
    # Without the frequencies a moved entry is refused rather than placed unrotated.
    assert load_entry(store, claim.loads[1], swapped, fingerprint=FP, caches=caches(), layout=LAYOUT,
                      block_ids=blocks, inv_freq=None) is not None
