"""Chunk keys: a position-independent hash of (model fingerprint, conditioning prefix, token ids)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import numpy as np

_KEY_RE = re.compile(r"^[0-9a-f]{12}-[0-9a-f]{32}$")


def fingerprint_tag(fingerprint: str) -> str:
    """The 12-hex-digit prefix every key of one model shares (lets stores list or evict one model's entries)."""
    return hashlib.blake2b(fingerprint.encode("utf-8"), digest_size=6).hexdigest()


def chunk_key(fingerprint: str, token_ids: Sequence[int], context: Sequence[int] = ()) -> str:
    """Key of one chunk's KV: `<model tag>-<blake2b of fingerprint, context and token ids>`.

    The key does not depend on where the chunk appears in a prompt, so the same chunk is found wherever it is
    reused. Token ids are hashed as little-endian int64, so the key is the same on every platform. A chunk
    computed after a conditioning prefix (`context`, e.g. the prompt's chat header) is another entry than the
    same chunk computed alone; an empty context hashes exactly as before contexts existed.

    Args:
        fingerprint: `model_fingerprint(model)`.
        token_ids: the chunk's token ids.
        context: the token ids the chunk was prefilled after (not stored in the entry's K/V).

    Returns:
        A 45-character string of `[0-9a-f-]`, safe as a file name and a Redis key.
    """
    ids = np.asarray(list(token_ids), dtype="<i8")
    h = hashlib.blake2b(digest_size=16)
    h.update(fingerprint.encode("utf-8"))
    h.update(b"\x00")
    h.update(ids.tobytes())
    if len(context):
        h.update(b"\x01")
        h.update(np.asarray(list(context), dtype="<i8").tobytes())
    return f"{fingerprint_tag(fingerprint)}-{h.hexdigest()}"


def is_chunk_key(key: str) -> bool:
    """Whether `key` has the shape `chunk_key` produces (stores refuse anything else as a file name)."""
    return bool(_KEY_RE.match(key))
