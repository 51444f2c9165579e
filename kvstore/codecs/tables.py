"""Integer frequency tables shared by the entropy-coded codecs (cachegen, kvtc).

Tables are integers in the payload, so encoder and decoder build bit-identical models on every platform
(a float-parametrised model could differ in the last bit across libm versions).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ragzip.errors import CodecError


def frequency_table(vals: np.ndarray) -> tuple[int, np.ndarray]:
    """(lowest symbol, uint16 frequencies of lo..hi) for integer `vals`; at least two entries."""
    lo, hi = int(vals.min()), int(vals.max())
    hi = max(hi, lo + 1)  # constriction needs two or more symbols in a table
    counts = np.bincount(vals - lo, minlength=hi - lo + 1).astype(np.float64)
    freq = np.where(counts > 0, np.maximum(1, np.round(counts / counts.max() * 65535)), 0).astype("<u2")
    return lo, freq


def pack_table(lo: int, freq: np.ndarray, size_dtype: str) -> bytes:
    """`lo` as <i2, the table size as `size_dtype` (<i2 in cachegen v1 blobs, <u2 in kvtc), then frequencies."""
    return np.array([lo], "<i2").tobytes() + np.array([freq.size], size_dtype).tobytes() + freq.tobytes()


def read_table(view: memoryview, pos: int, size_dtype: str, codec: str) -> tuple[int, np.ndarray, int]:
    """Parse one `pack_table` record at `pos`: (lo, freq, next position); CodecError if invalid or truncated."""
    if pos + 4 > len(view):
        raise CodecError(f"{codec} payload is truncated")
    lo = int(np.frombuffer(view[pos:pos + 2], dtype="<i2")[0])
    size = int(np.frombuffer(view[pos + 2:pos + 4], dtype=size_dtype)[0])
    pos += 4
    if size < 2 or pos + 2 * size > len(view):
        raise CodecError(f"{codec} frequency table is invalid or truncated")
    freq = np.frombuffer(view[pos:pos + 2 * size], dtype="<u2")
    if not freq.any():
        raise CodecError(f"{codec} frequency table is empty")
    return lo, freq, pos + 2 * size


def categorical(freq: np.ndarray) -> Any:
    """The constriction model of a frequency table."""
    import constriction

    p = freq.astype(np.float64)
    return constriction.stream.model.Categorical(p / p.sum(), perfect=False)
