"""CacheGen-style codec: per-(layer, token) scaling, per-(layer, kind) step sizes from measured sensitivity,
optional delta-to-anchor token groups, and arithmetic coding with per-(layer, head, channel) Laplace models.

For each layer and each of K, V (`x [H_kv, S, D]`):

1. A scale per (layer, token): r[s] = RMS of x[:, s, :], stored as a log2 code in one byte.
2. Uniform quantization of y = x / r[s] with the step of this (layer, kind): q = round(y / step). Steps come
   from a `CacheGenProfile` (step ∝ 1/sqrt(measured sensitivity), so every (layer, kind) adds about the same
   next-token KL) or, without one, from CacheGen's fixed bands (finer early layers).
3. Optional change-based coding: tokens in groups of `group` tokens are coded as the integer difference from the
   group's first (anchor) token. On one grid this is a lossless transform of the symbols, so it only changes the
   size; the encoder keeps it for a (layer, kind) only where it measures fewer bits, and the meta records where.
4. Range coding (constriction) per (layer, kind, head, channel) and stream (anchors / deltas): each channel is
   centred on its median and coded with the empirical frequency table of its spread class (half-octave
   classes of mean |symbol|). Medians, classes and tables are side information inside the payload, so they
   are counted in bits per element.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ragzip.errors import CodecError, ConfigError
from ragzip.kvstore.codecs.tables import categorical, frequency_table, pack_table, read_table

if TYPE_CHECKING:
    import torch

    from ragzip.kvstore.codecs import Shape
    from ragzip.kvstore.record import LayerKV

# Base step (in units of a token's RMS) of each level for a layer of average sensitivity; level 0 is the finest.
LEVEL_STEPS = (0.06, 0.1, 0.15, 0.22, 0.3, 0.4)
DEFAULT_LEVEL = 3
_MIN_B = 0.02
_NUM_CLASSES = 24
_MAX_SYMBOL = 32000


@dataclass(frozen=True, slots=True)
class CacheGenProfile:
    """Measured sensitivity of next-token predictions to quantization noise in each layer's K and V.

    `sensitivity[l] = (s_K, s_V)`: mean next-token KL per unit of squared step (see `ragzip.kvstore.calibrate`).
    """

    fingerprint: str
    sensitivity: tuple[tuple[float, float], ...]

    def steps(self, base: float) -> list[tuple[float, float]]:
        """Step per (layer, kind): equal KL contribution everywhere, geometric mean step = `base`."""
        s = np.asarray(self.sensitivity, dtype=np.float64).clip(min=1e-12)
        rel = 1.0 / np.sqrt(s / math.exp(float(np.log(s).mean())))
        rel = rel.clip(1 / 16, 16)
        return [(float(base * a), float(base * b)) for a, b in rel]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"fingerprint": self.fingerprint, "sensitivity": self.sensitivity}))

    @classmethod
    def load(cls, path: str | Path) -> CacheGenProfile:
        """Load a saved profile, or a shipped one by model alias (see `shipped_profiles()`)."""
        if not Path(path).exists():
            shipped = Path(__file__).parent / f"cachegen_profile.{path}.json"
            if not shipped.exists():
                raise ConfigError(f"no CacheGen profile file {path!r} and no shipped profile of that name; "
                                  f"shipped: {shipped_profiles()}")
            path = shipped
        data = json.loads(Path(path).read_text())
        try:
            sens = tuple((float(a), float(b)) for a, b in data["sensitivity"])
            return cls(str(data["fingerprint"]), sens)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{path} is not a CacheGen profile: {exc}") from None


def shipped_profiles() -> list[str]:
    """Model aliases with a measured profile shipped in the package."""
    prefix = "cachegen_profile."
    return sorted(p.name[len(prefix):-len(".json")] for p in Path(__file__).parent.glob(prefix + "*.json"))


def banded_steps(num_layers: int, base: float) -> list[tuple[float, float]]:
    """CacheGen's fixed schedule: first third of layers 0.5x the step, middle 1x, last third 1.5x."""
    out = []
    for i in range(num_layers):
        f = 0.5 if i < num_layers / 3 else (1.0 if i < 2 * num_layers / 3 else 1.5)
        out.append((base * f, base * f))
    return out


class CacheGenCodec:
    """Entropy-coded KV at one of several quality levels.

    Args:
        level: 0 (finest) .. len(LEVEL_STEPS)-1, or a float base step.
        profile: a CacheGenProfile, the path of a saved one, or a shipped model alias (`shipped_profiles()`,
            e.g. "smollm2-135m-instruct"); None uses fixed layer bands (measured worse, see the README).
        group: tokens per delta group (anchor + group-1 deltas); 0 disables delta coding.
        delta: "auto" (per (layer, kind), whichever measures smaller), "on" or "off".
    """

    name = "cachegen"
    version = 1

    def __init__(self, level: int | str | float = DEFAULT_LEVEL, profile: CacheGenProfile | str | Path | None = None,
                 *, group: int | str = 10, delta: str = "auto") -> None:
        level_f = float(level)
        if level_f.is_integer() and 0 <= level_f < len(LEVEL_STEPS):
            self.base_step = LEVEL_STEPS[int(level_f)]
        elif 0 < level_f < 1 and not level_f.is_integer():
            self.base_step = level_f
        else:
            raise ConfigError(f"cachegen level must be 0..{len(LEVEL_STEPS) - 1} or a base step in (0, 1); got {level}")
        self.level = level
        self.profile = CacheGenProfile.load(profile) if isinstance(profile, (str, Path)) else profile
        self.group = int(group)
        if delta not in ("auto", "on", "off"):
            raise ConfigError(f"cachegen delta must be auto, on or off; got {delta!r}")
        self.delta = delta
        self.last_delta_used: list[tuple[bool, bool]] = []

    def steps_for(self, num_layers: int) -> list[tuple[float, float]]:
        if self.profile is None:
            return banded_steps(num_layers, self.base_step)
        if len(self.profile.sensitivity) != num_layers:
            raise ConfigError(f"CacheGen profile has {len(self.profile.sensitivity)} layers, the record {num_layers}")
        return self.profile.steps(self.base_step)

    def encode(self, layers: Sequence[LayerKV], *, start: int = 0) -> tuple[dict[str, Any], bytes]:
        steps = self.steps_for(len(layers))
        parts: list[bytes] = []
        tensors_meta = []
        self.last_delta_used = []
        for (k, v), (sk, sv) in zip(layers, steps):
            used = []
            for x, step in ((k, sk), (v, sv)):
                tmeta, blob = _encode_tensor(x, step, self.group, self.delta)
                tensors_meta.append(tmeta)
                used.append(bool(tmeta["delta"]))
                parts.append(blob)
            self.last_delta_used.append((used[0], used[1]))
        return {"group": self.group, "tensors": tensors_meta}, b"".join(parts)

    def decode(self, meta: dict[str, Any], payload: bytes, shapes: Sequence[tuple[Shape, Shape]],
               dtype: torch.dtype) -> list[LayerKV]:
        tensors = meta.get("tensors")
        group = meta.get("group")
        if not isinstance(tensors, list) or len(tensors) != 2 * len(shapes) or not isinstance(group, int):
            raise CodecError("cachegen meta does not match the record's layers")
        view = memoryview(payload)
        pos = 0
        decoded = []
        for i, shape in enumerate(s for pair in shapes for s in pair):
            x, pos = _decode_tensor(tensors[i], view, pos, shape, group)
            decoded.append(x.to(dtype))
        if pos != len(view):
            raise CodecError(f"cachegen payload has {len(view) - pos} unexpected trailing bytes")
        return [(decoded[2 * i], decoded[2 * i + 1]) for i in range(len(shapes))]


# --- one tensor ------------------------------------------------------------------------------------------------------
def _scales(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x [H_kv, S, D] -> (uint8 log2 codes [S], float scales [S]) with 1/8-octave resolution."""
    rms = np.sqrt((x.astype(np.float64) ** 2).mean(axis=(0, 2))).clip(min=2.0 ** -15)
    codes = np.clip(np.round(np.log2(rms) * 8) + 128, 0, 255).astype(np.uint8)
    return codes, _scale_values(codes)


def _scale_values(codes: np.ndarray) -> np.ndarray:
    return np.exp2((codes.astype(np.float64) - 128) / 8)


def _laplace_params(sym: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sym [H_kv, N, D] -> fp16 (mean, scale) per (head, channel), the values the decoder will see."""
    mu = np.median(sym, axis=1)
    b = np.abs(sym - mu[:, None, :]).mean(axis=1).clip(min=_MIN_B)
    return mu.astype(np.float16), b.astype(np.float16)


def _laplace_bits(sym: np.ndarray) -> float:
    """Estimated coded size of sym under its own per-channel Laplace (for the delta decision)."""
    mu, b = _laplace_params(sym)
    bf = b.astype(np.float64)[:, None, :]
    dist = np.abs(sym - mu.astype(np.float64)[:, None, :])
    # -log2 of the Laplace density integrated over a unit bin, approximated by the density (fine for ranking).
    return float((np.log2(2 * bf) + dist / bf * math.log2(math.e)).clip(min=0).sum())


def _streams(q: np.ndarray, group: int, use_delta: bool) -> tuple[np.ndarray, np.ndarray]:
    """q [H_kv, S, D] -> (anchor-or-plain symbols [H_kv, Na, D], delta symbols [H_kv, Nd, D])."""
    if not use_delta:
        return q, q[:, :0, :]
    s = q.shape[1]
    anchor_idx = np.arange(0, s, group)
    owner = (np.arange(s) // group) * group  # [S] anchor of each token
    is_delta = np.arange(s) % group != 0
    deltas = q[:, is_delta, :] - q[:, owner[is_delta], :]
    return q[:, anchor_idx, :], deltas


def _channel_classes(b: np.ndarray) -> np.ndarray:
    """Half-octave classes of per-channel spread: channels of one class share one frequency table."""
    return np.clip(np.round(np.log2(b + 0.05) * 2) + 8, 0, _NUM_CLASSES - 1).astype(np.uint8)


def _code(sym: np.ndarray) -> tuple[dict[str, Any], bytes]:
    """Range-code sym [H_kv, N, D] with per-(head, channel) centring and per-class empirical tables.

    Side information (all in the payload): an int16 median and a class byte per channel, and per class the
    symbol range and uint16 frequencies. Tables are integers, so encoder and decoder build bit-identical models
    on every platform (a float-parametrised model could differ in the last bit across libm versions).
    """
    import constriction

    h, n, d = sym.shape
    if n == 0:
        return {"n": 0}, b""
    ch = sym.transpose(0, 2, 1).reshape(h * d, n)  # [C, N], C = H_kv * D channels
    med = np.round(np.median(ch, axis=1)).astype(np.int64)
    centred = ch - med[:, None]
    if np.abs(centred).max() > _MAX_SYMBOL or np.abs(med).max() > _MAX_SYMBOL:
        raise CodecError("cachegen symbols out of range (step too small for this data)")
    cls = _channel_classes(np.abs(centred).mean(axis=1))
    side = [med.astype("<i2").tobytes(), cls.tobytes()]
    enc = constriction.stream.queue.RangeEncoder()
    for k in np.unique(cls):
        vals = centred[cls == k].reshape(-1)
        lo, freq = frequency_table(vals)
        side.append(pack_table(lo, freq, "<i2"))
        enc.encode((vals - lo).astype(np.int32), categorical(freq))
    words = enc.get_compressed().astype("<u4").tobytes()
    return {"n": int(n), "words": len(words) // 4}, b"".join(side) + words


def _encode_tensor(x: torch.Tensor, step: float, group: int, delta: str) -> tuple[dict[str, Any], bytes]:
    import torch

    xf = x.detach().to(torch.float32).cpu().numpy()  # [H_kv, S, D]
    codes, r = _scales(xf)
    q = np.round(xf / (r[None, :, None] * step)).astype(np.int64)
    use_delta = False
    if group > 1 and delta != "off" and q.shape[1] > 1:
        if delta == "on":
            use_delta = True
        else:
            a, d = _streams(q, group, True)
            use_delta = _laplace_bits(a) + _laplace_bits(d) < _laplace_bits(q)
    anchors, deltas = _streams(q, group, use_delta)
    meta_a, blob_a = _code(anchors)
    meta_d, blob_d = _code(deltas)
    meta = {"step": float(np.float32(step)), "delta": use_delta, "a": meta_a, "d": meta_d}
    return meta, codes.tobytes() + blob_a + blob_d


def _decode_stream(m: Any, view: memoryview, pos: int, h: int, d: int) -> tuple[np.ndarray, int]:
    import constriction

    if not isinstance(m, dict) or not isinstance(m.get("n"), int) or m["n"] < 0:
        raise CodecError("cachegen stream meta is malformed")
    n = m["n"]
    if n == 0:
        return np.zeros((h, 0, d), dtype=np.int64), pos
    words = m.get("words")
    c = h * d
    if not isinstance(words, int) or words < 0 or pos + 3 * c > len(view):
        raise CodecError("cachegen payload is truncated or its meta is inconsistent")
    med = np.frombuffer(view[pos:pos + 2 * c], dtype="<i2").astype(np.int64)
    cls = np.frombuffer(view[pos + 2 * c:pos + 3 * c], dtype=np.uint8)
    pos += 3 * c
    tables = []
    for _k in np.unique(cls):
        lo, freq, pos = read_table(view, pos, "<i2", "cachegen")
        tables.append((lo, freq))
    if pos + 4 * words > len(view):
        raise CodecError("cachegen payload is truncated")
    compressed = np.frombuffer(view[pos:pos + 4 * words], dtype="<u4").astype(np.uint32)
    pos += 4 * words
    centred = np.empty((c, n), dtype=np.int64)
    dec = constriction.stream.queue.RangeDecoder(compressed)
    try:
        for k, (lo, freq) in zip(np.unique(cls), tables):
            rows = cls == k
            vals = dec.decode(categorical(freq), int(rows.sum()) * n)
            centred[rows] = np.asarray(vals, dtype=np.int64).reshape(-1, n) + lo
    except (ValueError, RuntimeError, AssertionError) as exc:
        raise CodecError(f"cachegen range decoding failed: {exc}") from None
    sym = (centred + med[:, None]).reshape(h, d, n).transpose(0, 2, 1)  # [H_kv, N, D]
    return np.ascontiguousarray(sym), pos


def _decode_tensor(m: Any, view: memoryview, pos: int, shape: Shape, group: int) -> tuple[torch.Tensor, int]:
    import torch

    h, s, d = shape
    if not isinstance(m, dict) or not isinstance(m.get("step"), float) or not m["step"] > 0:
        raise CodecError("cachegen tensor meta is malformed")
    if pos + s > len(view):
        raise CodecError("cachegen payload is truncated")
    r = _scale_values(np.frombuffer(view[pos:pos + s], dtype=np.uint8))
    pos += s
    anchors, pos = _decode_stream(m.get("a"), view, pos, h, d)
    deltas, pos = _decode_stream(m.get("d"), view, pos, h, d)
    if m.get("delta"):
        if group < 2 or anchors.shape[1] != -(-s // group) or deltas.shape[1] != s - anchors.shape[1]:
            raise CodecError("cachegen delta streams do not match the token count")
        q = np.empty((h, s, d), dtype=np.int64)
        q[:, ::group, :] = anchors
        is_delta = np.arange(s) % group != 0
        owner = (np.arange(s) // group) * group
        q[:, is_delta, :] = deltas + q[:, owner[is_delta], :]
    else:
        if anchors.shape[1] != s:
            raise CodecError("cachegen stream does not match the token count")
        q = anchors
    x = q.astype(np.float32) * (r[None, :, None] * float(m["step"])).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(x)), pos
