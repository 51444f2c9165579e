"""`ragzip demo`: index a bundled corpus, retrieve, compress, answer with a local LLM from full and compressed context.

The default setting (EXIT at rate DEMO_RATE) was chosen by measurement with `ragzip eval fidelity` on held-out
multi-hop dev questions (see the README's results); the answers come from Qwen2.5-Coder-0.5B-Instruct when its
packages are installed (`make demo` installs them), else from the embedded 135M SmolLM2.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

from ragzip.budget import Budget
from ragzip.types import Document

DEMO_METHOD = "exit"
DEMO_RATE = 0.4


def load_demo_corpus() -> tuple[list[Document], list[dict[str, Any]]]:
    """The bundled corpus (18 SQuAD paragraphs, 12 questions, CC BY-SA 4.0; see ragzip/data/NOTICE)."""
    data = json.loads(resources.files("ragzip").joinpath("data/demo_corpus.json").read_text(encoding="utf-8"))
    docs = [Document(d["id"], d["text"], d["title"]) for d in data["documents"]]
    return docs, data["questions"]


def default_demo_llm() -> tuple[str | None, str | None]:
    """(LLM for the demo, a one-line hint when the better reader is not installed)."""
    from ragzip.registry import DEFAULT_READER, PACKAGED_LLMS, packaged_llm_installed

    if packaged_llm_installed(DEFAULT_READER):
        return DEFAULT_READER, None
    return None, (f"answers come from the 135M default LLM; for a reader that can answer, "
                  f"{PACKAGED_LLMS[DEFAULT_READER].install_hint}")


def run_demo(*, method: str = DEMO_METHOD, rate: float | None = None, llm: str | None = None, k: int = 4,
             log: Callable[[str], Any] = print, device: str | None = "auto") -> list[dict[str, Any]]:
    """Rows of the demo table. `rate` None means DEMO_RATE for the default method, else the method's own default."""
    from ragzip.answer import Answerer
    from ragzip.engine import LocalEngine
    from ragzip.eval.metrics import f1_score
    from ragzip.pipeline import build_compressor
    from ragzip.retrieval.retriever import Retriever
    from ragzip.tokens import get_token_counter

    if rate is None and method == DEMO_METHOD:
        rate = DEMO_RATE
    if llm is None:
        llm, hint = default_demo_llm()
        if hint:
            log(hint)
    docs, questions = load_demo_corpus()
    counter = get_token_counter(llm)  # budgets in the answering LLM's tokens
    start = time.perf_counter()
    retriever = Retriever(counter=counter, chunk_tokens=128, device=device)
    num_chunks = retriever.add(docs)
    log(f"indexed {len(docs)} documents as {num_chunks} chunks in {time.perf_counter() - start:.1f}s")
    engine = LocalEngine(llm, device=device)
    answerer = Answerer(engine, build_compressor(method, counter=counter, device=device), retriever=retriever, k=k)
    budget = Budget(rate=rate)
    log(f"local LLM: {llm or 'smollm2-135m-instruct'} ({engine.dtype}); compressor: {method} {budget.describe()}")
    rows = []
    for q in questions:
        hits = [d for d, _ in retriever.search(q["question"], k)]
        result = answerer.context(q["question"], hits, budget)
        full = answerer.answer(q["question"], hits, max_new_tokens=32)
        compressed = answerer.answer(q["question"], result, max_new_tokens=32)
        rows.append({
            "question": q["question"], "tokens_before": result.tokens_before, "tokens_after": result.tokens_after,
            "rate": result.rate, "seconds": result.seconds, "answer_full": full, "answer_compressed": compressed,
            "gold": q["answers"][0], "f1_full": f1_score(full, q["answers"]),
            "f1_compressed": f1_score(compressed, q["answers"]),
        })
    return rows
