from __future__ import annotations

import json
import struct
from collections.abc import Callable

import pytest

from ragzip.errors import CodecError
from ragzip.kvstore.blob import ForeignModelError, decode_record, encode_record, read_header
from ragzip.kvstore.codecs import get_codec
from ragzip.kvstore.record import ChunkRecord, same_layers


def test_round_trip_and_header(record_factory: Callable[..., ChunkRecord]) -> None:
    record = record_factory()
    blob = encode_record(record, get_codec("raw"))
    header = read_header(blob)
    assert header["codec"] == "raw" and header["key"] == record.key and header["num_tokens"] == record.num_tokens
    back = decode_record(blob, expected_key=record.key, expected_fingerprint="test-fp")
    assert same_layers(back.layers, record.layers)
    with pytest.raises(ForeignModelError):
        decode_record(blob, expected_fingerprint="other")


def _with_header(record: ChunkRecord, **changes: object) -> bytes:
    """A blob whose header was edited (checksum recomputed, so only the header checks can catch it)."""
    import hashlib

    blob = encode_record(record, get_codec("raw"))
    n = struct.unpack_from("<I", blob, 6)[0]
    header = json.loads(blob[10:10 + n])
    header.update(changes)
    header = {k: v for k, v in header.items() if v is not None}  # None = drop the field
    head = json.dumps(header).encode()
    body = blob[:4] + struct.pack("<HI", 1, len(head)) + head + blob[10 + n:-32]
    return body + hashlib.blake2b(body, digest_size=32).digest()


@pytest.mark.parametrize("change", [
    {"shapes": [[[2, 12, 8], [2, 12, 8]]] * 2},  # wrong layer count
    {"shapes": [[[2, 1 << 20, 1 << 12], [2, 12, 8]]] * 3},  # absurd size
    {"dtype": "object"},
    {"codec": "pickle"},
    {"num_tokens": "12"},
    {"payload_len": 5},
    {"context": "1,2"},
    {"context": [1, -2]},
])
def test_bad_headers_are_rejected(record_factory: Callable[..., ChunkRecord], change: dict[str, object]) -> None:
    with pytest.raises(CodecError):
        decode_record(_with_header(record_factory(), **change))


def test_not_a_blob() -> None:
    for data in (b"", b"RZKV", b"XXXX" + b"\x00" * 64, b"RZKV\x09\x00" + b"\x00" * 64):
        with pytest.raises(CodecError):
            decode_record(data)


def test_context_round_trips_and_older_blobs_without_it_still_read(record_factory: Callable[..., ChunkRecord]) -> None:
    import dataclasses

    base = record_factory()
    conditioned = dataclasses.replace(base, start=3, context=(7, 8, 9))
    back = decode_record(encode_record(conditioned, get_codec("raw")), expected_key=conditioned.key)
    assert back.context == (7, 8, 9) and back.start == 3 and back.key == conditioned.key != base.key
    legacy = _with_header(base, context=None)  # what format version 1 wrote before conditioned chunks
    assert decode_record(legacy, expected_key=base.key).context == ()
    # a context edited in (without the key matching) is caught as a foreign entry
    with pytest.raises(ForeignModelError):
        decode_record(_with_header(base, context=[1, 2]))


def test_a_blob_of_another_codec_version_is_refused(record_factory: Callable[..., ChunkRecord]) -> None:
    codec = get_codec("int8")

    class NextInt8(type(codec)):  # type: ignore[misc]
        version = codec.version + 1  # the same codec name, written by a newer release

    with pytest.raises(CodecError, match="version"):
        decode_record(encode_record(record_factory(), NextInt8()))
    assert decode_record(encode_record(record_factory(), codec)).num_tokens > 0  # the current version reads
