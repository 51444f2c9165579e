from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ragzip.errors import ConfigError
from ragzip.kvstore.controller import LoadingController, Option, Speeds, measure_speeds
from ragzip.kvstore.stores.disk import DiskStore


def _controller() -> LoadingController:
    speeds = Speeds(store_bytes_per_s=100e6, prefill_tokens_per_s=1000,
                    decode_bytes_per_s={"raw": 1e9, "int8": 500e6, "cachegen:3": 5e6})
    return LoadingController(speeds)


def test_prefers_finest_level_that_beats_recompute() -> None:
    c = _controller()
    opts = [Option("raw", 20_000_000, 0), Option("int8", 10_000_000, 1), Option("cachegen:3", 5_000_000, 2)]
    # 500 tokens recompute 0.5 s; raw load 0.2 + 0.02 s -> load raw (best quality)
    d = c.decide(500, 20_000_000, opts)
    assert d.action == "load" and d.codec == "raw" and "recompute" in d.reason
    # 10 tokens recompute 10 ms: nothing loads faster
    d = c.decide(10, 20_000_000, opts)
    assert d.action == "recompute" and d.codec is None and "fastest load" in d.reason
    assert c.decide(100, 1000, []).reason == "recompute: not in the store"
    stats = c.stats()
    assert stats["decisions"] == {"load:raw": 1, "recompute": 2} and len(stats["recent"]) == 3


def test_slow_store_picks_smaller_encoding() -> None:
    speeds = Speeds(store_bytes_per_s=20e6, prefill_tokens_per_s=1000,
                    decode_bytes_per_s={"raw": 1e9, "int8": 500e6})
    d = LoadingController(speeds).decide(500, 20_000_000, [Option("raw", 20_000_000, 0), Option("int8", 5_000_000, 1)])
    assert d.codec == "int8"


def test_bad_inputs() -> None:
    with pytest.raises(ConfigError):
        Speeds(0, 1)
    with pytest.raises(ConfigError):
        _controller().decide(10, 10, [Option("int4", 5)])


def test_measure_speeds(tmp_path: Path, tiny_llama: torch.nn.Module) -> None:
    speeds = measure_speeds(DiskStore(tmp_path / "kv"), tiny_llama, list(range(1, 40)), ["raw", "int8"])
    assert speeds.prefill_tokens_per_s > 0 and speeds.store_bytes_per_s > 0
    assert set(speeds.decode_bytes_per_s) == {"raw", "int8"}
