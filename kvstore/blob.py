"""The stored byte format of a ChunkRecord: a typed header, token ids, a codec payload and a checksum.

```
b"RZKV" | u16 format version | u32 header length | header (UTF-8 JSON) | token ids (<i4) | payload | blake2b-256
```

The header names the codec, its meta, the fingerprint, key, dtype, start, conditioning context
(token ids the chunk was prefilled after; absent in older blobs = none), layer types and every layer's shape;
the checksum covers everything before it. Nothing here unpickles or `torch.load`s: a blob from a shared store
can at worst fail to decode, which raises CodecError.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import numpy as np

from ragzip.errors import CodecError, ConfigError
from ragzip.kvstore.codecs import Codec, codec_class
from ragzip.kvstore.codecs.raw import dtype_name, torch_dtype
from ragzip.kvstore.key import chunk_key
from ragzip.kvstore.record import ChunkRecord

MAGIC = b"RZKV"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<4sHI")
_DIGEST = 32
MAX_HEADER_BYTES = 1 << 20
MAX_ELEMENTS = 1 << 31
MAX_CONTEXT_TOKENS = 1 << 16


def _digest(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=_DIGEST).digest()


def encode_record(record: ChunkRecord, codec: Codec) -> bytes:
    """Serialize `record` with `codec` into a self-describing, checksummed blob."""
    meta, payload = codec.encode(record.layers, start=record.start)
    header = {
        "codec": codec.name,
        "codec_version": codec.version,
        "codec_meta": meta,
        "fingerprint": record.fingerprint,
        "key": record.key,
        "start": record.start,
        "context": list(record.context),
        "dtype": dtype_name(record.dtype),
        "layer_types": list(record.layer_types),
        "shapes": [[list(k.shape), list(v.shape)] for k, v in record.layers],
        "num_tokens": record.num_tokens,
        "payload_len": len(payload),
    }
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    tokens = np.asarray(record.token_ids, dtype="<i4").tobytes()
    body = b"".join([_PREFIX.pack(MAGIC, FORMAT_VERSION, len(head)), head, tokens, payload])
    return body + _digest(body)


def read_header(blob: bytes | memoryview) -> dict[str, Any]:
    """Parse and sanity-check the header without verifying the checksum or decoding the payload.

    Raises:
        CodecError: not a ragzip KV blob, an unknown version, or a malformed/truncated header.
    """
    view = memoryview(blob)
    if len(view) < _PREFIX.size + _DIGEST:
        raise CodecError(f"KV blob too short ({len(view)} bytes)")
    magic, version, head_len = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise CodecError("not a ragzip KV blob (bad magic)")
    if version != FORMAT_VERSION:
        raise CodecError(f"unsupported KV blob format version {version}")
    if head_len > MAX_HEADER_BYTES or _PREFIX.size + head_len > len(view):
        raise CodecError(f"KV blob header length {head_len} is invalid or truncated")
    try:
        header = json.loads(bytes(view[_PREFIX.size:_PREFIX.size + head_len]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CodecError(f"KV blob header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise CodecError("KV blob header is not an object")
    _check_header(header)
    header["_header_len"] = head_len
    return header


def _check_header(h: dict[str, Any]) -> None:
    need = {"codec": str, "codec_version": int, "codec_meta": dict, "fingerprint": str, "key": str, "start": int,
            "dtype": str, "layer_types": list, "shapes": list, "num_tokens": int, "payload_len": int}
    for name, typ in need.items():
        if not isinstance(h.get(name), typ) or isinstance(h.get(name), bool):
            raise CodecError(f"KV blob header field {name!r} is missing or not {typ.__name__}")
    s = h["num_tokens"]
    if s < 1 or h["start"] < 0 or h["payload_len"] < 0 or len(h["layer_types"]) != len(h["shapes"]):
        raise CodecError("KV blob header has inconsistent sizes")
    total = 0
    for pair in h["shapes"]:
        if not (isinstance(pair, list) and len(pair) == 2):
            raise CodecError("KV blob header shapes must be [[K shape], [V shape]] per layer")
        for shape in pair:
            if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(x, int) and x > 0 for x in shape)):
                raise CodecError(f"bad tensor shape {shape!r} in KV blob header")
            if shape[1] != s:
                raise CodecError(f"tensor shape {shape} does not hold {s} tokens")
            total += shape[0] * shape[1] * shape[2]
    if total > MAX_ELEMENTS:
        raise CodecError(f"KV blob declares {total} elements, more than the {MAX_ELEMENTS} limit")
    context = h.get("context", [])  # absent in blobs written before conditioned chunks: computed alone
    if not (isinstance(context, list) and len(context) <= MAX_CONTEXT_TOKENS
            and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 1 << 31 for t in context)):
        raise CodecError(f"KV blob header field 'context' must be at most {MAX_CONTEXT_TOKENS} token ids")
    torch_dtype(h["dtype"])


def decode_record(blob: bytes | memoryview, *, expected_key: str | None = None,
                  expected_fingerprint: str | None = None, codec: Codec | None = None) -> ChunkRecord:
    """Verify and decode a blob.

    Args:
        blob: bytes from `encode_record`.
        expected_key: the store key it was read under; a mismatch means a misplaced or foreign entry.
        expected_fingerprint: the model the caller runs; a mismatch raises `ForeignModelError`.
        codec: the caller's configured codec; used when the blob names the same codec (it may hold state a
            default instance lacks, such as a KVTC profile), otherwise a default instance decodes.

    Raises:
        CodecError: corrupt, truncated or unknown data (`ForeignModelError` for another model's entry).
    """
    view = memoryview(blob)
    header = read_header(view)
    body_len = len(view) - _DIGEST
    if _digest(view[:body_len]) != bytes(view[body_len:]):
        raise CodecError("KV blob checksum mismatch (corrupt or truncated)")
    off = _PREFIX.size + header["_header_len"]
    s = header["num_tokens"]
    if off + 4 * s + header["payload_len"] != body_len:
        raise CodecError("KV blob length does not match its header")
    tokens = tuple(int(t) for t in np.frombuffer(view[off:off + 4 * s], dtype="<i4"))
    fp = header["fingerprint"]
    if expected_fingerprint is not None and fp != expected_fingerprint:
        raise ForeignModelError(f"KV entry was computed by model {fp}, not {expected_fingerprint}")
    context = tuple(header.get("context", ()))
    key = chunk_key(fp, tokens, context)
    if key != header["key"] or (expected_key is not None and key != expected_key):
        raise ForeignModelError("KV entry key does not match its fingerprint and token ids")
    try:
        cls = codec_class(header["codec"])
    except ConfigError:
        raise CodecError(f"KV blob uses an unknown codec {header['codec']!r}") from None
    if header["codec_version"] != cls.version:
        raise CodecError(f"KV codec {header['codec']!r} version {header['codec_version']} is not supported")
    dtype = torch_dtype(header["dtype"])
    shapes = [(tuple(k), tuple(v)) for k, v in header["shapes"]]
    payload = view[off + 4 * s:body_len]
    decoder = codec if codec is not None and codec.name == header["codec"] else cls()
    layers = decoder.decode(header["codec_meta"], bytes(payload), shapes, dtype)
    return ChunkRecord(fingerprint=fp, token_ids=tokens, start=header["start"], layers=layers, dtype=dtype,
                       layer_types=tuple(header["layer_types"]), context=context)


class ForeignModelError(CodecError):
    """A stored entry belongs to another model (or to another key)."""
