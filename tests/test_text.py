from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ragzip.text import split_sentences


def test_splits_tricky_text_with_offsets() -> None:
    text = 'Dr. Smith went to Washington D.C. on Jan. 5. He said: "It is 3.5 km away." Then he left!\n\nNew one? Yes.'
    got = [text[a:b] for a, b in split_sentences(text)]
    assert got == ["Dr. Smith went to Washington D.C. on Jan. 5.", 'He said: "It is 3.5 km away."', "Then he left!",
                   "New one?", "Yes."]


@settings(max_examples=60, deadline=None)
@given(st.text(min_size=0, max_size=300))
def test_spans_are_ordered_trimmed_and_in_bounds(text: str) -> None:
    last = 0
    for a, b in split_sentences(text):
        assert last <= a < b <= len(text)
        assert not text[a].isspace() and not text[b - 1].isspace()
        last = b
