"""Per-token quantization baselines: int8 and int4, one fp16 absmax scale per (head, token).

These are the baselines CacheGen-style coding is measured against (8.25 and 4.25 bits per element for head
dim 64: the fp16 scale adds 16 / D bits).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ragzip.errors import CodecError

if TYPE_CHECKING:
    import torch

    from ragzip.kvstore.codecs import Shape
    from ragzip.kvstore.record import LayerKV


def _quantize(x: torch.Tensor, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """x [H_kv, S, D] -> (int8 codes [H_kv, S, D] in [-qmax, qmax], fp16 scales [H_kv, S])."""
    import torch

    xf = x.detach().to(torch.float32).cpu()
    scale = (xf.abs().amax(dim=-1) / qmax).to(torch.float16)  # [H_kv, S]; fp16 is what the decoder sees
    safe = scale.to(torch.float32).clamp_min(torch.finfo(torch.float16).tiny).unsqueeze(-1)  # [H_kv, S, 1]
    codes = torch.round(xf / safe).clamp(-qmax, qmax).to(torch.int8)
    return codes.numpy(), scale.numpy()


def _dequantize(codes: np.ndarray, scales: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    import torch

    x = torch.from_numpy(codes.astype(np.float32)) * torch.from_numpy(scales.astype(np.float32))[..., None]
    return x.to(dtype)


def _pack4(codes: np.ndarray) -> bytes:
    flat = (codes.reshape(-1).astype(np.int16) + 8).astype(np.uint8)  # [-7, 7] -> [1, 15]
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def _unpack4(buf: bytes, n: int) -> np.ndarray:
    packed = np.frombuffer(buf, dtype=np.uint8)
    flat = np.empty(packed.size * 2, dtype=np.int8)
    flat[0::2] = (packed & 0x0F).astype(np.int8) - 8
    flat[1::2] = (packed >> 4).astype(np.int8) - 8
    return flat[:n]


class _PerTokenCodec:
    name = ""
    version = 1
    bits = 8

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def _code_bytes(self, n: int) -> int:
        return n if self.bits == 8 else (n + 1) // 2

    def encode(self, layers: Sequence[LayerKV], *, start: int = 0) -> tuple[dict[str, Any], bytes]:
        parts: list[bytes] = []
        for k, v in layers:
            for t in (k, v):
                codes, scales = _quantize(t, self.qmax)
                parts.append(scales.astype("<f2").tobytes())
                parts.append(codes.tobytes() if self.bits == 8 else _pack4(codes))
        return {"bits": self.bits}, b"".join(parts)

    def decode(self, meta: dict[str, Any], payload: bytes, shapes: Sequence[tuple[Shape, Shape]],
               dtype: torch.dtype) -> list[LayerKV]:
        if meta.get("bits") != self.bits:
            raise CodecError(f"{self.name} payload declares bits={meta.get('bits')!r}")
        view = memoryview(payload)
        pos = 0
        out: list[LayerKV] = []
        for pair_shapes in shapes:
            pair = []
            for h, s, d in pair_shapes:
                n_scale, n = h * s * 2, h * s * d
                n_codes = self._code_bytes(n)
                if pos + n_scale + n_codes > len(view):
                    raise CodecError(f"{self.name} payload is truncated")
                scales = np.frombuffer(view[pos:pos + n_scale], dtype="<f2").reshape(h, s)
                pos += n_scale
                chunk = view[pos:pos + n_codes]
                codes = np.frombuffer(chunk, dtype=np.int8) if self.bits == 8 else _unpack4(bytes(chunk), n)
                pos += n_codes
                pair.append(_dequantize(codes.reshape(h, s, d), scales, dtype))
            out.append((pair[0], pair[1]))
        if pos != len(view):
            raise CodecError(f"{self.name} payload has {len(view) - pos} unexpected trailing bytes")
        return out


class Int8Codec(_PerTokenCodec):
    """Symmetric int8 per (head, token), fp16 scale. Max abs error: scale / 2 = absmax / 254."""

    name = "int8"
    bits = 8


class Int4Codec(_PerTokenCodec):
    """Symmetric int4 ([-7, 7]) per (head, token), two codes a byte, fp16 scale. Max abs error: absmax / 14."""

    name = "int4"
    bits = 4
