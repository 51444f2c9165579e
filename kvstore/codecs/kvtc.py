"""KVTC-style transform codec: a calibrated decorrelating transform per (layer, K/V, head), uniform steps
allocated by measured sensitivity, and range coding of the transformed symbols.

For each layer and each of K, V (`x [H_kv, S, D]`, keys first rotated back to their pre-RoPE values):

1. Each token's heads side by side (`[S, H_kv * D]`), `y = x @ T[l, kind] - m[l, kind]`. `T` is a weighted PCA
   measured once per model (`KVTCProfile`, `ragzip.kvstore.calibrate.calibrate_kvtc`): keys are weighted by the
   queries' energy in each RoPE frequency plane and values by each head's output projection (`W_o^T W_o`), so
   squared error in `y` is error in attention logits and in the layer's output, not in raw K/V; the PCA then
   decorrelates the channels, across heads too (that doubles the coding gain of a per-head PCA on SmolLM2).
2. `q = round(y / step[l, kind])`: one uniform step per (layer, kind), `step = sqrt(kl / (2 L s))` for the
   level's target next-token KL and the measured sensitivity `s` (KL per unit of squared step), so each tensor
   adds about `kl / 2L`. Equal steps over components are the MSE-optimal choice under entropy coding; components
   whose spread is below the step quantize to zero and cost no bits at all (their class is "zero").
   Each component's mean over this chunk is stored (fp16) and subtracted first: without it a near-constant
   component rounds to the same error on every token, which attention does not average away.
3. Tokens whose transformed RMS is far above the tensor's median, and position 0 (the attention sink of a
   chunk computed alone), are stored as fp16 and their symbols zeroed.
4. Symbols are ANS-coded (constriction) with one integer frequency table per spread class, shared by every
   component of the record in that class: one decoder call per class, no per-symbol Python.

Every blob names the profile's digest; decoding needs the same profile (shipped ones are found by name).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ragzip.errors import CodecError, ConfigError
from ragzip.kvstore.codecs import MissingProfileError
from ragzip.kvstore.codecs.tables import categorical, frequency_table, pack_table, read_table
from ragzip.threads import limit_blas_threads

if TYPE_CHECKING:
    import torch

    from ragzip.kvstore.codecs import Shape
    from ragzip.kvstore.record import LayerKV

# Target next-token KL (nats, whole record) of each level; level 0 is the finest.
LEVEL_KL = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032)
DEFAULT_LEVEL = 2
OUTLIER_RATIO = 8.0
_ZERO_CLASS = 255
_NUM_CLASSES = 40
_MAX_SYMBOL = 32000
_PREFIX = "kvtc_profile."


@dataclass(frozen=True, eq=False)
class KVTCProfile:
    """A model's calibrated transforms and sensitivities.

    Attributes:
        name: a short label (a shipped profile's model alias).
        fingerprint: `model_fingerprint` of the model it was measured on (informational: the transform is a
            property of the weights, so a profile may serve another dtype of the same model).
        inv_freq: `[L, D/2]` float64 unscaled RoPE inverse frequencies per layer (undo/redo the key rotation).
        forward: `[L, 2, F, F]` float32 transform per (layer, K/V), F = H_kv * D: `y = x @ forward - mean`.
        inverse: `[L, 2, F, F]` float32, its inverse (not saved: recomputed in float64 on load).
        mean: `[L, 2, F]` float32 mean of `x @ forward` on the calibration data.
        sensitivity: `[L, 2]` float64 next-token KL per unit of squared step in the transformed domain.
    """

    name: str
    fingerprint: str
    inv_freq: np.ndarray
    forward: np.ndarray
    inverse: np.ndarray
    mean: np.ndarray
    sensitivity: np.ndarray

    def __post_init__(self) -> None:
        f = self.forward
        if f.ndim != 4 or f.shape[1] != 2 or f.shape[2] != f.shape[3] or self.inv_freq.ndim != 2:
            raise ConfigError(f"KVTC profile transform must be [L, 2, F, F], got {list(f.shape)}")
        num_layers, _, width, _ = f.shape
        if width % (2 * self.inv_freq.shape[1]):
            raise ConfigError(f"KVTC profile width {width} is not a whole number of heads")
        want = {"inverse": (f.shape, self.inverse.shape), "mean": ((num_layers, 2, width), self.mean.shape),
                "sensitivity": ((num_layers, 2), self.sensitivity.shape),
                "inv_freq": ((num_layers, self.inv_freq.shape[1]), self.inv_freq.shape)}
        for field, (expected, got) in want.items():
            if tuple(expected) != tuple(got):
                raise ConfigError(f"KVTC profile {field} has shape {list(got)}, expected {list(expected)}")
        arrays = (self.forward, self.inverse, self.mean, self.sensitivity, self.inv_freq)
        if not all(np.isfinite(a).all() for a in arrays):
            raise ConfigError("KVTC profile holds non-finite values")

    @property
    def num_layers(self) -> int:
        return int(self.forward.shape[0])

    @property
    def head_dim(self) -> int:
        return int(2 * self.inv_freq.shape[1])

    @property
    def heads(self) -> int:
        return int(self.forward.shape[2]) // self.head_dim

    @cached_property  # hashing ~10 MB of arrays costs ~10 ms: once per profile, not once per blob
    def digest(self) -> str:
        """16 hex digits over the saved arrays: what a blob records and decoding checks."""
        h = hashlib.blake2b(digest_size=8)
        for a in (self.inv_freq, self.forward, self.mean, self.sensitivity):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()

    def steps(self, kl: float) -> np.ndarray:
        """`[L, 2]` float32 steps for a target total KL: each of the 2L tensors adds `kl / 2L`."""
        per_tensor = kl / (2 * self.num_layers)
        s = self.sensitivity.clip(min=1e-12)
        steps = np.sqrt(per_tensor / s)
        gm = math.exp(float(np.log(steps).mean()))
        return steps.clip(gm / 64, gm * 64).astype(np.float32)

    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save_file

        tensors = {"inv_freq": self.inv_freq.astype(np.float64), "forward": self.forward.astype(np.float32),
                   "mean": self.mean.astype(np.float32),
                   "sensitivity": self.sensitivity.astype(np.float64)}
        save_file(tensors, str(path), metadata={"name": self.name, "fingerprint": self.fingerprint,
                                                "format": "ragzip-kvtc-profile-1"})

    @classmethod
    def load(cls, path: str | Path) -> KVTCProfile:
        """Load a saved profile (safetensors: no pickle), or a shipped one by model alias (read once per process)."""
        p = Path(path)
        if not p.exists():
            if not (Path(__file__).parent / f"{_PREFIX}{path}.safetensors").exists():
                raise ConfigError(f"no KVTC profile file {str(path)!r} and no shipped profile of that name; "
                                  f"shipped: {shipped_kvtc_profiles()}")
            return _load_shipped(str(path))
        return cls._read(p)

    @classmethod
    def _read(cls, p: Path) -> KVTCProfile:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(p), framework="numpy") as fh:
                meta = fh.metadata() or {}
                if meta.get("format") != "ragzip-kvtc-profile-1":
                    raise ConfigError(f"{p} is not a ragzip KVTC profile")
                arrays = {k: fh.get_tensor(k) for k in ("inv_freq", "forward", "mean", "sensitivity")}
        except (SafetensorError, OSError, KeyError) as exc:
            raise ConfigError(f"cannot read KVTC profile {p}: {exc}") from None
        limit_blas_threads()  # numpy's BLAS beside torch's threads turned this inverse from 0.2 s into 10 s
        try:
            inverse = np.linalg.inv(arrays["forward"].astype(np.float64)).astype(np.float32)
        except np.linalg.LinAlgError:
            raise ConfigError(f"KVTC profile {p} has a singular transform") from None
        profile = cls(name=meta.get("name", p.stem), fingerprint=meta.get("fingerprint", ""), inverse=inverse,
                      **arrays)
        register_profile(profile)
        return profile


_REGISTERED: dict[str, KVTCProfile] = {}


@cache
def _load_shipped(alias: str) -> KVTCProfile:
    # Several codecs (one per level) and every decode of a foreign digest would otherwise re-read ~9 MB.
    return KVTCProfile._read(Path(__file__).parent / f"{_PREFIX}{alias}.safetensors")


def register_profile(profile: KVTCProfile) -> None:
    """Make `profile` available to decoders in this process (loading or passing one to a codec does this)."""
    _REGISTERED[profile.digest] = profile


def shipped_kvtc_profiles() -> list[str]:
    """Model aliases with a KVTC profile shipped in the package."""
    return sorted(p.name[len(_PREFIX):-len(".safetensors")]
                  for p in Path(__file__).parent.glob(_PREFIX + "*.safetensors"))


def _find_profile(digest: str, name: str) -> KVTCProfile:
    if digest in _REGISTERED:
        return _REGISTERED[digest]
    if name in shipped_kvtc_profiles():
        profile = KVTCProfile.load(name)
        if profile.digest == digest:
            return profile
    raise MissingProfileError(f"KV entry was encoded with KVTC profile {name!r} ({digest}), which is not loaded "
                              f"here; load it with KVTCProfile.load(path) or pass it to KVTCCodec(profile=...)")


class KVTCCodec:
    """Transform-coded KV at one of several quality levels.

    Args:
        level: 0 (finest) .. len(LEVEL_KL)-1 (see `LEVEL_KL`, the target next-token KL), or `kl=<float>`.
        profile: a KVTCProfile, a saved profile's path or a shipped model alias (`shipped_kvtc_profiles()`);
            required to encode, found from the blob when decoding.
        outlier_ratio: tokens whose transformed RMS exceeds this many times the median are stored as fp16.
    """

    name = "kvtc"
    version = 1

    def __init__(self, level: int | str = DEFAULT_LEVEL, profile: KVTCProfile | str | Path | None = None, *,
                 kl: float | None = None, outlier_ratio: float = OUTLIER_RATIO) -> None:
        if kl is None:
            try:
                lv = int(level)
            except (TypeError, ValueError):
                raise ConfigError(f"kvtc level must be an integer 0..{len(LEVEL_KL) - 1}; got {level!r}") from None
            if not 0 <= lv < len(LEVEL_KL):
                raise ConfigError(f"kvtc level must be 0..{len(LEVEL_KL) - 1}; got {level}")
            kl = LEVEL_KL[lv]
        if not 0 < float(kl) < 10:
            raise ConfigError(f"kvtc kl target must be in (0, 10); got {kl}")
        if not float(outlier_ratio) > 1:
            raise ConfigError(f"kvtc outlier_ratio must be > 1; got {outlier_ratio}")
        self.level, self.kl, self.outlier_ratio = level, float(kl), float(outlier_ratio)
        self.profile = KVTCProfile.load(profile) if isinstance(profile, (str, Path)) else profile
        if self.profile is not None:
            register_profile(self.profile)

    def _require_profile(self, layers: Sequence[LayerKV]) -> KVTCProfile:
        p = self.profile
        if p is None:
            raise ConfigError(f"the kvtc codec needs a profile to encode (shipped: {shipped_kvtc_profiles()}; "
                              f"build one with ragzip.kvstore.calibrate.calibrate_kvtc)")
        if len(layers) != p.num_layers:
            raise ConfigError(f"KVTC profile {p.name!r} has {p.num_layers} layers, the record {len(layers)}")
        for k, v in layers:
            for t in (k, v):
                if t.shape[0] != p.heads or t.shape[2] != p.head_dim:
                    raise ConfigError(f"KVTC profile {p.name!r} is for [{p.heads}, S, {p.head_dim}] heads, the "
                                      f"record has {list(t.shape)}")
        return p

    def encode(self, layers: Sequence[LayerKV], *, start: int = 0) -> tuple[dict[str, Any], bytes]:
        import torch

        p = self._require_profile(layers)
        steps = p.steps(self.kl)
        parts: list[bytes] = [steps.astype("<f4").tobytes()]
        symbols: list[np.ndarray] = []  # one [F, S] block per tensor
        for li, (k, v) in enumerate(layers):
            for kind, x in ((0, k), (1, v)):
                x32 = x.detach().to(torch.float32).cpu()
                xf = _rotate(x32, p.inv_freq[li], start, inverse=True) if kind == 0 else x32
                y = _tokens_by_heads(xf.numpy()) @ p.forward[li, kind] - p.mean[li, kind]  # [S, F]
                token_rms = np.sqrt((y.astype(np.float64) ** 2).mean(axis=1))  # [S]
                is_out = token_rms > self.outlier_ratio * max(float(np.median(token_rms)), 1e-12)
                if start == 0:
                    is_out[0] = True  # position 0 is the attention sink: its value error reaches every query
                outliers = np.flatnonzero(is_out)
                raw = x32.numpy()[:, outliers, :].astype("<f2")
                parts.append(np.array([outliers.size], "<u4").tobytes() + outliers.astype("<u4").tobytes()
                             + raw.tobytes())
                # The chunk's own mean per component, exact (fp16): rounding a near-constant component would
                # give every token the same error, which attention does not average away (values especially).
                keep = np.setdiff1d(np.arange(y.shape[0]), outliers)
                centre = (y[keep].mean(axis=0) if keep.size else np.zeros(y.shape[1])).astype("<f2")
                parts.append(centre.tobytes())
                q = np.rint((y - centre.astype(np.float32)) / steps[li, kind])
                q[outliers] = 0
                if np.abs(q).max(initial=0) > _MAX_SYMBOL:
                    raise CodecError("kvtc symbols out of range (the profile does not fit this data)")
                symbols.append(np.ascontiguousarray(q.astype(np.int32).T))
        parts.append(_code_components(symbols))
        meta = {"profile": p.digest, "profile_name": p.name, "kl": self.kl, "start": int(start)}
        return meta, b"".join(parts)

    def decode(self, meta: dict[str, Any], payload: bytes, shapes: Sequence[tuple[Shape, Shape]],
               dtype: torch.dtype) -> list[LayerKV]:
        import torch

        digest, pname, start = meta.get("profile"), meta.get("profile_name"), meta.get("start")
        if not (isinstance(digest, str) and isinstance(pname, str) and isinstance(start, int) and start >= 0):
            raise CodecError("kvtc meta is malformed")
        p = self.profile if self.profile is not None and self.profile.digest == digest else _find_profile(digest,
                                                                                                           pname)
        if len(shapes) != p.num_layers or any(s[0] != p.heads or s[2] != p.head_dim for pair in shapes for s in pair):
            raise CodecError("kvtc payload shapes do not match its profile")
        view = memoryview(payload)
        n_steps = 8 * p.num_layers
        if len(view) < n_steps:
            raise CodecError("kvtc payload is truncated")
        steps = np.frombuffer(view[:n_steps], dtype="<f4").reshape(p.num_layers, 2)
        if not (np.isfinite(steps).all() and (steps > 0).all()):
            raise CodecError("kvtc steps are invalid")
        pos = n_steps
        side: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (fp16 token indices, their values, centre)
        for _li, pair in enumerate(shapes):
            for h, s, d in pair:
                if pos + 4 > len(view):
                    raise CodecError("kvtc payload is truncated")
                n = int(np.frombuffer(view[pos:pos + 4], dtype="<u4")[0])
                end = pos + 4 + 4 * n + 2 * h * n * d
                if n > s or end > len(view):
                    raise CodecError("kvtc outlier block is invalid or truncated")
                idx = np.frombuffer(view[pos + 4:pos + 4 + 4 * n], dtype="<u4").astype(np.int64)
                if n and idx.max() >= s:
                    raise CodecError("kvtc outlier index out of range")
                raw = np.frombuffer(view[pos + 4 + 4 * n:end], dtype="<f2").reshape(h, n, d)
                if end + 2 * h * d > len(view):
                    raise CodecError("kvtc payload is truncated")
                centre = np.frombuffer(view[end:end + 2 * h * d], dtype="<f2").astype(np.float32)
                side.append((idx, raw, centre))
                pos = end + 2 * h * d
        rows = [h * d for pair in shapes for h, _s, d in pair]
        tokens = [s for pair in shapes for _h, s, _d in pair]
        blocks = _decode_components(view[pos:], rows, tokens)
        out: list[LayerKV] = []
        for li, pair in enumerate(shapes):
            kv = []
            for kind, (h, s, d) in enumerate(pair):
                i = 2 * li + kind
                y = blocks[i].T.astype(np.float32) * steps[li, kind]  # [S, F]
                idx, raw, centre = side[i]
                x = (y + (centre + p.mean[li, kind])) @ p.inverse[li, kind]  # [S, F]
                t = torch.from_numpy(np.ascontiguousarray(x.reshape(s, h, d).transpose(1, 0, 2)))
                if kind == 0:
                    t = _rotate(t, p.inv_freq[li], start, inverse=False)
                if idx.size:
                    t[:, torch.from_numpy(idx), :] = torch.from_numpy(raw.astype(np.float32))
                kv.append(t.to(dtype))
            out.append((kv[0], kv[1]))
        return out


def _tokens_by_heads(x: np.ndarray) -> np.ndarray:
    """[H, S, D] -> [S, H * D]: one row per token, its heads side by side."""
    h, s, d = x.shape
    return x.transpose(1, 0, 2).reshape(s, h * d)


def _rotate(x: torch.Tensor, inv_freq: np.ndarray, start: int, *, inverse: bool) -> torch.Tensor:
    """Undo (inverse=True) or apply the RoPE rotation of positions start..start+S-1 on `x [H, S, D]` (float32)."""
    import torch

    from ragzip.kernels.rope import apply_rotation, rope_cos_sin

    positions = torch.arange(start, start + x.shape[1])
    cos, sin = rope_cos_sin(torch.from_numpy(np.asarray(inv_freq, dtype=np.float64)), positions)
    return apply_rotation(x, cos, -sin if inverse else sin)


# --- entropy coding ---------------------------------------------------------------------------------------------------
def _classes(spread: np.ndarray) -> np.ndarray:
    """Quarter-octave classes of mean |centred symbol| (class 0 = nearly always zero)."""
    return np.clip(np.round(np.log2(spread + 1e-3) * 4) + 28, 0, _NUM_CLASSES - 1).astype(np.uint8)


def _code_components(blocks: Sequence[np.ndarray]) -> bytes:
    """Range-code every component row of every tensor block ([rows, S] int32 each).

    Layout: per row a class byte (255 = all zero); per present class its symbol range and uint16 frequencies;
    then the u32 word count and words. Rows of one class are coded together, in row order. Rows are already
    centred (the chunk's mean per component is subtracted before rounding), so no per-row offset is stored.
    """
    import constriction

    centred = np.concatenate(blocks, axis=0)  # [R, S]
    zero = ~centred.any(axis=1)
    cls = _classes(np.abs(centred).mean(axis=1))
    cls[zero] = _ZERO_CLASS
    side = [cls.tobytes()]
    coded = []
    for k in np.unique(cls[~zero]):
        vals = centred[cls == k].reshape(-1)
        lo, freq = frequency_table(vals)
        side.append(pack_table(lo, freq, "<u2"))
        coded.append(((vals - lo).astype(np.int32), freq))
    # ANS is a stack: encode the classes last-first so the decoder reads them first-first.
    enc = constriction.stream.stack.AnsCoder()
    for vals, freq in reversed(coded):
        enc.encode_reverse(vals, categorical(freq))
    words = enc.get_compressed().astype("<u4")
    return b"".join(side) + np.array([words.size], "<u4").tobytes() + words.tobytes()


def _decode_components(view: memoryview, rows: Sequence[int], tokens: Sequence[int]) -> list[np.ndarray]:
    import constriction

    if len(set(tokens)) != 1:
        raise CodecError("kvtc tensors must all hold the same tokens")
    s, total = tokens[0], sum(rows)
    if len(view) < total:
        raise CodecError("kvtc payload is truncated")
    cls = np.frombuffer(view[:total], dtype=np.uint8)
    pos = total
    present = np.unique(cls[cls != _ZERO_CLASS])
    tables = []
    for _k in present:
        lo, freq, pos = read_table(view, pos, "<u2", "kvtc")
        tables.append((lo, freq))
    if pos + 4 > len(view):
        raise CodecError("kvtc payload is truncated")
    n_words = int(np.frombuffer(view[pos:pos + 4], dtype="<u4")[0])
    pos += 4
    if pos + 4 * n_words != len(view):
        raise CodecError("kvtc payload length does not match its word count")
    words = np.frombuffer(view[pos:], dtype="<u4").astype(np.uint32)
    q = np.zeros((total, s), dtype=np.int32)
    dec = constriction.stream.stack.AnsCoder(words)
    try:
        for k, (lo, freq) in zip(present, tables):
            sel = cls == k
            vals = dec.decode(categorical(freq), int(sel.sum()) * s)
            q[sel] = np.asarray(vals, dtype=np.int32).reshape(-1, s) + lo
    except (ValueError, RuntimeError, AssertionError) as exc:
        raise CodecError(f"kvtc entropy decoding failed: {exc}") from None
    out, off = [], 0
    for r in rows:
        out.append(q[off:off + r])
        off += r
    return out

