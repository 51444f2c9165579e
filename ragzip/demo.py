"""`ragzip demo`: index a bundled corpus, retrieve, compress, answer with a local LLM from full and compressed context.

The default is what every surface does when given no budget: EXIT with the `auto` budget (keep sentences until the
calibrated expected coverage of the needed evidence reaches 0.95; the guard keeps more when unsure). The corpus
is 38 SQuAD paragraphs the shipped models never trained or were calibrated on (scripts/build_demo_corpus.py); the
answers come from Qwen2.5-Coder-0.5B-Instruct when its packages are installed (`make demo` installs them), else
from the embedded 135M SmolLM2.
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


def load_demo_corpus() -> tuple[list[Document], list[dict[str, Any]]]:
    """The bundled corpus (38 SQuAD paragraphs, 38 questions, CC BY-SA 4.0; see ragzip/data/NOTICE)."""
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


def run_demo(*, method: str = DEMO_METHOD, budget: Budget | None = None, llm: str | None = None, k: int = 4,
             log: Callable[[str], Any] = print, device: str | None = "auto",
             limit: int | None = None) -> list[dict[str, Any]]:
    """Rows of the demo table, one per question (the first `limit` questions). `budget` None means the method's
    default (auto for EXIT)."""
    from ragzip.answer import Answerer
    from ragzip.engine import LocalEngine
    from ragzip.eval.metrics import answer_survival, f1_score
    from ragzip.pipeline import build_compressor
    from ragzip.retrieval.retriever import Retriever
    from ragzip.tokens import get_token_counter

    if llm is None:
        llm, hint = default_demo_llm()
        if hint:
            log(hint)
    docs, questions = load_demo_corpus()
    questions = questions[:limit] if limit is not None else questions
    counter = get_token_counter(llm)  # budgets in the answering LLM's tokens
    start = time.perf_counter()
    retriever = Retriever(counter=counter, chunk_tokens=128, device=device)
    num_chunks = retriever.add(docs)
    log(f"indexed {len(docs)} documents as {num_chunks} chunks in {time.perf_counter() - start:.1f}s")
    engine = LocalEngine(llm, device=device)
    compressor = build_compressor(method, counter=counter, device=device)
    answerer = Answerer(engine, compressor, retriever=retriever, k=k)
    budget = budget if budget is not None and budget.kind else compressor.default_budget()
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
            "f1_compressed": f1_score(compressed, q["answers"]), "guard": _guard(result),
            "answer_in_full": bool(answer_survival("\n\n".join(h.text for h in hits), q["answers"])),
            "answer_in_compressed": bool(answer_survival(result.text, q["answers"])),
        })
    return rows


def _guard(result: Any) -> str | None:
    """The auto guard's reason when it kept more than the coverage asked for (any stage), else None."""
    for stage in result.stages:
        auto = stage.info.get("auto")
        if isinstance(auto, dict) and auto.get("guard"):
            return str(auto["guard"])
    return None


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The demo's verdict: mean F1 full vs compressed, their paired difference with a bootstrap 95% CI, the mean
    rate and the tokens saved."""
    from ragzip.eval.metrics import paired_bootstrap_ci

    n = len(rows)
    if not n:
        return {"n": 0}
    diffs = [r["f1_compressed"] - r["f1_full"] for r in rows]
    before, after = sum(r["tokens_before"] for r in rows), sum(r["tokens_after"] for r in rows)
    return {"n": n, "f1_full": sum(r["f1_full"] for r in rows) / n,
            "f1_compressed": sum(r["f1_compressed"] for r in rows) / n, "f1_delta": sum(diffs) / n,
            "f1_delta_ci": paired_bootstrap_ci(diffs), "mean_rate": sum(r["rate"] for r in rows) / n,
            "tokens_before": before, "tokens_after": after, "fewer_tokens": before / after if after else float("inf"),
            "guarded": sum(1 for r in rows if r.get("guard")),
            "answers_in_full": sum(1 for r in rows if r.get("answer_in_full")),
            "answers_kept": sum(1 for r in rows if r.get("answer_in_full") and r.get("answer_in_compressed"))}
