"""Raw codec: tensor bytes as they are (exact), optionally cast to fp16/bf16 first."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ragzip.errors import CodecError, ConfigError

if TYPE_CHECKING:
    import torch

    from ragzip.kvstore.codecs import Shape
    from ragzip.kvstore.record import LayerKV

DTYPES = ("float32", "float16", "bfloat16")


def torch_dtype(name: str) -> torch.dtype:
    """`"bfloat16"` -> `torch.bfloat16`, only for the KV dtypes we store."""
    import torch

    if name not in DTYPES:
        raise CodecError(f"unsupported KV dtype {name!r}; valid: {list(DTYPES)}")
    return getattr(torch, name)  # type: ignore[no-any-return]


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise CodecError(f"unsupported KV dtype {name!r}; valid: {list(DTYPES)}")
    return name


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    """Little-endian bytes of a tensor (any of DTYPES)."""
    import torch

    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def tensor_from_bytes(buf: bytes | memoryview, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of `tensor_to_bytes` (copies, so the result owns writable memory)."""
    import torch

    n = 1
    for s in shape:
        n *= int(s)
    width = torch.empty((), dtype=dtype).element_size()
    if len(buf) != n * width:
        raise CodecError(f"expected {n * width} bytes for {tuple(shape)} {dtype}, got {len(buf)}")
    raw = torch.frombuffer(bytearray(buf), dtype=torch.uint8) if n else torch.empty(0, dtype=torch.uint8)
    return raw.view(dtype).reshape(tuple(int(s) for s in shape))


class RawCodec:
    """Exact storage in the record's dtype, or cast to `dtype` ("float16" / "bfloat16") to halve fp32 records.

    Args:
        dtype: storage dtype; None keeps the record's dtype (exact round trip).
    """

    name = "raw"
    version = 1

    def __init__(self, dtype: str | None = None) -> None:
        if dtype is not None and dtype not in DTYPES:
            raise ConfigError(f"raw codec dtype must be one of {list(DTYPES)}, got {dtype!r}")
        self.dtype = dtype

    def encode(self, layers: Sequence[LayerKV], *, start: int = 0) -> tuple[dict[str, Any], bytes]:
        store = torch_dtype(self.dtype) if self.dtype else layers[0][0].dtype
        parts = [tensor_to_bytes(t.to(store)) for k, v in layers for t in (k, v)]
        return {"dtype": dtype_name(store)}, b"".join(parts)

    def decode(self, meta: dict[str, Any], payload: bytes, shapes: Sequence[tuple[Shape, Shape]],
               dtype: torch.dtype) -> list[LayerKV]:
        store = torch_dtype(str(meta.get("dtype")))
        width = store.itemsize
        view = memoryview(payload)
        out: list[LayerKV] = []
        pos = 0
        for k_shape, v_shape in shapes:
            pair = []
            for shape in (k_shape, v_shape):
                n = shape[0] * shape[1] * shape[2] * width
                if pos + n > len(view):
                    raise CodecError("raw payload is truncated")
                pair.append(tensor_from_bytes(view[pos:pos + n], store, shape).to(dtype))
                pos += n
            out.append((pair[0], pair[1]))
        if pos != len(view):
            raise CodecError(f"raw payload has {len(view) - pos} unexpected trailing bytes")
        return out
