"""One behavioural suite every store passes (Redis against a real redis-server)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from ragzip.kvstore.blob import encode_record
from ragzip.kvstore.codecs import get_codec
from ragzip.kvstore.key import chunk_key
from ragzip.kvstore.loader import get_or_compute
from ragzip.kvstore.record import ChunkRecord, same_layers
from ragzip.kvstore.stores.base import ByteStore, ChunkStore
from ragzip.kvstore.stores.disk import DiskStore
from ragzip.kvstore.stores.memory import MemoryStore
from ragzip.kvstore.stores.redis import RedisStore

KINDS = ["memory", "memory-encoded", "disk", "redis"]


@pytest.fixture(params=KINDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ByteStore]:
    kind = request.param
    if kind == "memory":
        s: ByteStore = MemoryStore(1 << 24)
    elif kind == "memory-encoded":
        s = MemoryStore(1 << 24, codec="raw")
    elif kind == "disk":
        s = DiskStore(tmp_path / "kv", max_bytes=1 << 24)
    else:
        s = RedisStore(request.getfixturevalue("redis_url"), prefix=f"test:{uuid.uuid4().hex}:")
    yield s
    for key in s.keys():
        s.remove(key)
    s.close()


def test_protocol_round_trip_and_counters(store: ByteStore, record_factory: Callable[..., ChunkRecord]) -> None:
    assert isinstance(store, ChunkStore)
    record = record_factory()
    assert store.get(record.key) is None and not store.contains(record.key)
    store.put(record.key, record)
    assert store.contains(record.key)
    got = store.get(record.key)
    assert got is not None and got.token_ids == record.token_ids and got.fingerprint == record.fingerprint
    assert same_layers(got.layers, record.layers) and got.layer_types == record.layer_types
    stats = store.stats()
    assert (stats["hits"], stats["misses"], stats["puts"], stats["entries"]) == (1, 1, 1, 1)
    assert stats["bytes"] > 0 and stats["available"]
    assert store.keys() == [record.key]
    assert store.remove(record.key) and not store.remove(record.key) and store.get(record.key) is None


def test_lossy_codec_through_store(store: ByteStore, record_factory: Callable[..., ChunkRecord]) -> None:
    if isinstance(store, MemoryStore) and not store.is_encoded:
        pytest.skip("records mode keeps tensors as they are")
    store.codec = get_codec("int8")
    record = record_factory()
    store.put(record.key, record)
    got = store.get(record.key)
    assert got is not None
    torch.testing.assert_close(got.layers[0][0], record.layers[0][0], atol=0.05, rtol=0)


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "empty"])
def test_corrupt_entries_are_detected_counted_and_evicted(
        store: ByteStore, record_factory: Callable[..., ChunkRecord], damage: str) -> None:
    if isinstance(store, MemoryStore) and not store.is_encoded:
        pytest.skip("records mode holds no bytes")
    record = record_factory()
    blob = bytearray(encode_record(record, store.codec))
    if damage == "flip":
        blob[len(blob) // 2] ^= 0x40
    elif damage == "truncate":
        blob = blob[: len(blob) - 100]
    elif damage == "garbage":
        blob = bytearray(b"\x80\x04\x95pickle-looking bytes" * 5)
    else:
        blob = bytearray()
    store.put_blob(record.key, bytes(blob))
    assert store.get(record.key) is None
    assert store.stats()["corrupt"] == 1
    assert not store.contains(record.key)


def test_foreign_model_entry_is_detected(store: ByteStore, record_factory: Callable[..., ChunkRecord]) -> None:
    if isinstance(store, MemoryStore) and not store.is_encoded:
        pytest.skip("records mode holds no bytes")
    ours = record_factory(fingerprint="model-a")
    theirs = record_factory(fingerprint="model-b")  # same token ids, another model
    assert ours.token_ids == theirs.token_ids
    store.put_blob(ours.key, encode_record(theirs, store.codec))
    assert store.get(ours.key) is None
    assert store.stats()["foreign"] == 1 and not store.contains(ours.key)


def test_get_or_compute_recomputes_after_corruption(store: ByteStore, tiny_llama: torch.nn.Module) -> None:
    ids = [5, 6, 7, 8]
    first, hit1 = get_or_compute(store, tiny_llama, ids)
    second, hit2 = get_or_compute(store, tiny_llama, ids)
    assert (hit1, hit2) == (False, True) and same_layers(first.layers, second.layers)
    if isinstance(store, MemoryStore) and not store.is_encoded:
        return
    store.put_blob(first.key, b"RZKV" + b"\x00" * 64)
    third, hit3 = get_or_compute(store, tiny_llama, ids)
    assert not hit3 and same_layers(third.layers, first.layers)
    assert store.stats()["corrupt"] == 1 and store.contains(first.key)  # recomputed and stored again


def test_keys_must_be_chunk_keys(store: ByteStore) -> None:
    from ragzip.errors import ConfigError

    with pytest.raises(ConfigError):
        store.get("../../etc/passwd")
    assert store.get(chunk_key("nobody", [1])) is None
