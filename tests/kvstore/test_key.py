from __future__ import annotations

from ragzip.kvstore.key import chunk_key, fingerprint_tag, is_chunk_key


def test_key_is_stable_and_position_independent() -> None:
    a = chunk_key("fp", [1, 2, 3])
    assert a == chunk_key("fp", (1, 2, 3)) and is_chunk_key(a)
    assert a.startswith(fingerprint_tag("fp") + "-")


def test_key_changes_with_model_and_tokens() -> None:
    a = chunk_key("fp", [1, 2, 3])
    assert a != chunk_key("fp2", [1, 2, 3])
    assert a != chunk_key("fp", [1, 2, 4])
    assert a != chunk_key("fp", [1, 2])
    assert not is_chunk_key("../etc/passwd")


def test_context_is_part_of_the_key_and_empty_context_keeps_old_keys() -> None:
    assert chunk_key("fp", [1, 2, 3], ()) == chunk_key("fp", [1, 2, 3])
    keys = {chunk_key("fp", [1, 2, 3]), chunk_key("fp", [1, 2, 3], [9]), chunk_key("fp", [1, 2, 3], [9, 9])}
    assert len(keys) == 3
