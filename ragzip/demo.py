"""`ragzip demo`: index a bundled corpus, retrieve, compress, answer with the local LLM."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

from ragzip.budget import Budget
from ragzip.types import Document


def load_demo_corpus() -> tuple[list[Document], list[dict[str, Any]]]:
    """The bundled corpus (18 SQuAD paragraphs, CC BY-SA 4.0; see ragzip/data/NOTICE) and its questions."""
    data = json.loads(resources.files("ragzip").joinpath("data/demo_corpus.json").read_text(encoding="utf-8"))
    docs = [Document(d["id"], d["text"], d["title"]) for d in data["documents"]]
    return docs, data["questions"]


def run_demo(*, method: str, rate: float | None, llm: str | None, k: int,
             log: Callable[[str], Any] = print) -> list[dict[str, Any]]:
    from ragzip.engine import LocalEngine
    from ragzip.eval.metrics import f1_score
    from ragzip.pipeline import build_compressor
    from ragzip.retrieval.retriever import Retriever
    from ragzip.tokens import get_token_counter

    docs, questions = load_demo_corpus()
    counter = get_token_counter(None)
    start = time.perf_counter()
    retriever = Retriever(counter=counter, chunk_tokens=128)
    num_chunks = retriever.add(docs)
    log(f"indexed {len(docs)} documents as {num_chunks} chunks in {time.perf_counter() - start:.1f}s")
    compressor = build_compressor(method, counter=counter)
    engine = LocalEngine(llm)
    log(f"local LLM: {engine.model.config._name_or_path or llm} ({engine.dtype}); compressor: {method}")
    budget = Budget(rate=rate)
    rows = []
    for q in questions:
        hits = [d for d, _ in retriever.search(q["question"], k)]
        result = compressor.compress(q["question"], hits, budget)
        kept = [Document(d.id, d.text, d.title) for d in result.documents]
        full = engine.answer(q["question"], hits)
        compressed = engine.answer(q["question"], kept)
        rows.append({
            "question": q["question"], "tokens_before": result.tokens_before, "tokens_after": result.tokens_after,
            "rate": result.rate, "seconds": result.seconds, "answer_full": full, "answer_compressed": compressed,
            "gold": q["answers"][0], "f1_full": f1_score(full, q["answers"]),
            "f1_compressed": f1_score(compressed, q["answers"]),
        })
    return rows
