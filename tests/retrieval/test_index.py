from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ragzip.errors import InputError
from ragzip.retrieval.index import VectorIndex
from ragzip.types import Document


def _random_unit(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype("float32")
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_save_load_round_trip_and_incremental_add(kind: str, tmp_path: Path) -> None:
    dim = 16
    emb = _random_unit(50, dim, 0)
    docs = [Document(f"d{i}", f"text {i}", metadata={"n": i}) for i in range(50)]
    index = VectorIndex(dim, kind=kind)
    index.add(docs[:30], emb[:30])
    index.add(docs[30:], emb[30:])  # incremental
    before = index.search(emb[42], k=3)
    assert before[0][0].id == "d42" and before[0][1] == pytest.approx(1.0, abs=1e-5)
    index.save(tmp_path / "idx")
    loaded = VectorIndex.load(tmp_path / "idx")
    assert len(loaded) == 50 and loaded.kind.value == kind
    after = loaded.search(emb[42], k=3)
    assert [(d.id, round(s, 5)) for d, s in after] == [(d.id, round(s, 5)) for d, s in before]
    assert after[0][0].metadata == {"n": 42}


def test_rejects_duplicates_and_bad_shapes(tmp_path: Path) -> None:
    index = VectorIndex(4)
    index.add([Document("a", "x")], _random_unit(1, 4, 1))
    with pytest.raises(InputError):
        index.add([Document("a", "y")], _random_unit(1, 4, 2))
    with pytest.raises(InputError):
        index.add([Document("b", "y")], _random_unit(1, 5, 2))
    (tmp_path / "broken").mkdir()
    with pytest.raises(InputError):
        VectorIndex.load(tmp_path / "broken")


def test_retriever_finds_the_relevant_chunk() -> None:
    from ragzip.retrieval.retriever import Retriever
    from ragzip.tokens import WhitespaceCounter

    r = Retriever(counter=WhitespaceCounter(), chunk_tokens=50)
    r.add([Document("paris", "Paris is the capital and largest city of France."),
           Document("oxygen", "Oxygen is a chemical element with symbol O and atomic number 8."),
           Document("rhine", "The Rhine flows into the North Sea.")])
    hits = r.search("What is the atomic number of oxygen?", k=2)
    assert hits[0][0].id == "oxygen#0"
