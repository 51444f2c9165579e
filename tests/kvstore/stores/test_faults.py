"""Store-down, eviction, concurrent writers and kill-during-write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ragzip.kvstore.loader import get_or_compute
from ragzip.kvstore.record import ChunkRecord
from ragzip.kvstore.stores.disk import DiskStore
from ragzip.kvstore.stores.memory import MemoryStore
from ragzip.kvstore.stores.redis import RedisStore


def test_redis_down_means_recompute(tiny_llama: torch.nn.Module) -> None:
    store = RedisStore("redis://127.0.0.1:1/0", timeout_s=0.2, retry_after_s=60)
    record, hit = get_or_compute(store, tiny_llama, [1, 2, 3])
    assert not hit and record.num_tokens == 3
    stats = store.stats()
    assert stats["errors"] >= 1 and stats["available"] is False and stats["last_error"]


def test_disk_down_means_recompute(tmp_path: Path, tiny_llama: torch.nn.Module) -> None:
    store = DiskStore(tmp_path / "kv")
    record, _ = get_or_compute(store, tiny_llama, [1, 2, 3])
    entry = store._path(record.key)
    entry.unlink()
    entry.mkdir()  # reading a folder fails with an OSError, as an unreadable disk would
    _, hit = get_or_compute(store, tiny_llama, [1, 2, 3])
    assert not hit and store.stats()["errors"] >= 1


def test_memory_lru_evicts_by_bytes(record_factory: Callable[..., ChunkRecord]) -> None:
    a, b, c = (record_factory(seed=i) for i in range(3))
    store = MemoryStore(max_bytes=a.nbytes * 2 + 10)
    store.put(a.key, a)
    store.put(b.key, b)
    assert store.get(a.key) is not None  # a is now the most recent
    store.put(c.key, c)
    assert store.contains(a.key) and not store.contains(b.key) and store.contains(c.key)
    assert store.stats()["evictions"] == 1 and store.stats()["bytes"] <= store.max_bytes


def test_disk_cap_evicts_least_recently_used(tmp_path: Path, record_factory: Callable[..., ChunkRecord]) -> None:
    records = [record_factory(seed=i) for i in range(6)]
    probe = DiskStore(tmp_path / "probe")
    probe.put(records[0].key, records[0])
    size = probe.stats()["bytes"]
    store = DiskStore(tmp_path / "kv", max_bytes=size * 4, low_water=1.0)
    for i, r in enumerate(records[:4]):
        store.put(r.key, r)
        os.utime(store._path(r.key), (1000 + i, 1000 + i))
    assert store.get(records[0].key) is not None  # refreshes its mtime
    store.put(records[4].key, records[4])
    assert store.contains(records[0].key) and not store.contains(records[1].key)
    assert store.stats()["bytes"] <= store.max_bytes and store.stats()["evictions"] == 1


_WRITER = textwrap.dedent("""
    import sys, torch
    from ragzip.kvstore.record import ChunkRecord
    from ragzip.kvstore.stores.disk import DiskStore
    root, worker, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    store = DiskStore(root, max_bytes=int(sys.argv[5]))
    for i in range(n):
        seed = i % 7  # workers overwrite each other's keys on purpose
        g = torch.Generator().manual_seed(seed)
        layers = [(torch.randn(2, size, 8, generator=g), torch.randn(2, size, 8, generator=g)) for _ in range(2)]
        rec = ChunkRecord("test-fp", tuple(range(seed, seed + size)), 0, layers, torch.float32)
        store.put(rec.key, rec)
        got = store.get(rec.key)
        assert got is None or got.token_ids == rec.token_ids
    print(store.stats()["corrupt"])
""")


def _spawn(root: Path, worker: int, n: int, size: int, cap: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", _WRITER, str(root), str(worker), str(n), str(size), str(cap)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_concurrent_writer_processes(tmp_path: Path) -> None:
    root = tmp_path / "kv"
    cap = 5 * 5000
    procs = [_spawn(root, w, 15, 64, cap) for w in range(3)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert out.strip() == "0"  # no process ever read a torn or corrupt entry
    store = DiskStore(root, max_bytes=cap)
    assert store.verify()["corrupt"] == 0
    assert store.stats()["bytes"] <= cap


def test_kill_during_write_leaves_no_corrupt_entry(tmp_path: Path) -> None:
    root = tmp_path / "kv"
    proc = _spawn(root, 0, 10_000, 4096, 1 << 30)  # ~0.5 MB records, written in a loop
    deadline = time.time() + 30
    while time.time() < deadline and not any(root.glob("*/*.kv")):
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    store = DiskStore(root, tmp_grace_s=0.0)
    result = store.verify()
    assert result["ok"] >= 1 and result["corrupt"] == 0
    assert store.sweep() == 0  # orphaned temporary files are swept
