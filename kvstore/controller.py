"""The loading controller: per chunk, load its KV (at which level) or recompute it from text.

It compares two estimates from measured speeds: load = bytes / store bandwidth + elements / decode speed of the
codec, recompute = tokens / prefill speed. Among the stored levels whose load time beats recompute, it takes
the finest one (best quality); if none does, it recomputes. Every decision keeps its numbers and a reason.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ragzip.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Speeds:
    """Measured speeds. `decode_bytes_per_s` is in decoded KV bytes per second, per codec name;
    `stored_fraction` is stored bytes / decoded bytes per codec (its compression), to estimate an entry's size
    before fetching it."""

    store_bytes_per_s: float
    prefill_tokens_per_s: float
    decode_bytes_per_s: Mapping[str, float] = field(default_factory=dict)
    stored_fraction: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.store_bytes_per_s <= 0 or self.prefill_tokens_per_s <= 0:
            raise ConfigError("speeds must be positive")


@dataclass(frozen=True, slots=True)
class Option:
    """One stored encoding of a chunk: codec (e.g. "cachegen:3"), stored bytes, and quality rank (0 = best)."""

    codec: str
    stored_bytes: int
    quality_rank: int = 0


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one chunk, and why."""

    action: str  # "load" or "recompute"
    codec: str | None
    load_s: float | None
    recompute_s: float
    reason: str


class LoadingController:
    """Decides load-vs-recompute per chunk from measured speeds; `stats()` explains the decisions.

    Args:
        speeds: measured store bandwidth, prefill and decode speeds (see `measure_speeds`).
        margin: load only if its estimate is below `margin` x the recompute estimate (covers estimate noise).
    """

    def __init__(self, speeds: Speeds, *, margin: float = 1.0) -> None:
        self.speeds = speeds
        self.margin = margin
        self._counts: Counter[str] = Counter()
        self._last: list[Decision] = []

    def estimate_load_s(self, option: Option, kv_bytes: int) -> float:
        decode = self.speeds.decode_bytes_per_s.get(option.codec)
        if decode is None:
            raise ConfigError(f"no measured decode speed for codec {option.codec!r}")
        return option.stored_bytes / self.speeds.store_bytes_per_s + kv_bytes / decode

    def option(self, codec: str, kv_bytes: int) -> Option:
        """The `Option` of an entry stored with ``codec`` whose decoded KV is ``kv_bytes`` (size estimated)."""
        return Option(codec, round(kv_bytes * self.speeds.stored_fraction.get(codec, 1.0)))

    def decide(self, num_tokens: int, kv_bytes: int, options: Sequence[Option]) -> Decision:
        """Choose for one chunk of `num_tokens` whose decoded KV is `kv_bytes`, given the stored `options`."""
        recompute_s = num_tokens / self.speeds.prefill_tokens_per_s
        timed = sorted(((o.quality_rank, self.estimate_load_s(o, kv_bytes), o) for o in options),
                       key=lambda t: (t[0], t[1]))
        decision = None
        for _rank, load_s, opt in timed:
            if load_s < self.margin * recompute_s:
                decision = Decision("load", opt.codec, load_s, recompute_s,
                                    f"load {opt.codec}: {load_s * 1e3:.1f} ms < recompute {recompute_s * 1e3:.1f} ms")
                break
        if decision is None:
            if timed:
                best = min(t[1] for t in timed)
                reason = f"recompute: fastest load {best * 1e3:.1f} ms >= recompute {recompute_s * 1e3:.1f} ms"
            else:
                reason = "recompute: not in the store"
            decision = Decision("recompute", None, None, recompute_s, reason)
        self._counts[decision.action if decision.codec is None else f"load:{decision.codec}"] += 1
        self._last = (self._last + [decision])[-32:]
        return decision

    def stats(self) -> dict[str, Any]:
        """Decision counts, the speeds they used, and the last decisions with their reasons."""
        return {"decisions": dict(self._counts), "speeds": asdict(self.speeds),
                "recent": [asdict(d) for d in self._last]}


def measure_speeds(store: Any, model: Any, token_ids: Sequence[int], codecs: Sequence[str]) -> Speeds:
    """Measure prefill speed, store bandwidth and decode speed of `codecs` on one sample chunk.

    Writes the sample under its key with each codec (the entry is left in the store, holding the last codec).
    """
    from ragzip.kvstore.blob import decode_record, encode_record
    from ragzip.kvstore.codecs import get_codec
    from ragzip.kvstore.prefill import prefill_chunk

    t = time.perf_counter()
    record = prefill_chunk(model, token_ids)
    prefill_tps = record.num_tokens / (time.perf_counter() - t)
    decode: dict[str, float] = {}
    fraction: dict[str, float] = {}
    bandwidth = []
    for name in codecs:
        blob = encode_record(record, get_codec(name))
        fraction[name] = len(blob) / max(1, record.nbytes)
        t = time.perf_counter()
        decode_record(blob)
        decode[name] = record.nbytes / max(time.perf_counter() - t, 1e-9)
        store.put_blob(record.key, blob)
        t = time.perf_counter()
        got = store.get_blob(record.key)
        if got is not None:
            bandwidth.append(len(got) / max(time.perf_counter() - t, 1e-9))
    if not bandwidth:
        raise ConfigError("the store did not return the sample entry; cannot measure its bandwidth")
    return Speeds(store_bytes_per_s=min(bandwidth), prefill_tokens_per_s=prefill_tps, decode_bytes_per_s=decode,
                  stored_fraction=fraction)
