"""`ragzip eval baselines`: any method (default: the baselines) on a common-schema dataset.

Reports per method: tokens kept, achieved vs requested rate (rate adherence), answer-string survival, latency,
and optionally (`reader=1`) reader EM/F1 with the local LLM on the compressed vs the uncompressed context.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ragzip.budget import Budget
from ragzip.errors import ConfigError
from ragzip.eval.datasets import load_examples
from ragzip.eval.metrics import answer_survival, exact_match, f1_score
from ragzip.options import refuse_unknown


def run(data: Path, *, limit: int | None, seed: int, options: dict[str, str]) -> dict[str, Any]:
    from ragzip.pipeline import build_compressor
    from ragzip.tokens import get_token_counter

    refuse_unknown(options, ("methods", "rate", "reader", "tokenizer", "llm"), "eval suite 'baselines'")
    methods = str(options.get("methods", "truncate,random,embed-topk")).split(",")
    rate = float(options.get("rate", 0.5))
    use_reader = str(options.get("reader", "0")).lower() in ("1", "true", "yes")
    examples = [e for e in load_examples(data, limit) if e.contexts]
    if not examples:
        raise ConfigError(f"no examples with contexts in {data}")
    counter = get_token_counter(options.get("tokenizer"))
    engine = None
    if use_reader:
        from ragzip.engine import LocalEngine

        engine = LocalEngine(options.get("llm"))
    results: dict[str, Any] = {"dataset": str(data), "num_examples": len(examples), "rate_requested": rate,
                               "methods": {}}
    if engine is not None:
        preds = [engine.answer(e.question, e.documents()) for e in examples]
        results["f1_uncompressed"] = sum(f1_score(p, e.answers) for p, e in zip(preds, examples)) / len(examples)
        results["em_uncompressed"] = sum(exact_match(p, e.answers) for p, e in zip(preds, examples)) / len(examples)
    for method in methods:
        options_for = {"seed": seed} if method == "random" else {}
        compressor = build_compressor(method, counter=counter, options=options_for)
        rows = []
        for ex in examples:
            start = time.perf_counter()
            res = compressor.compress(ex.question, ex.documents(), Budget.ratio(rate))
            row = {"rate": res.rate, "seconds": time.perf_counter() - start,
                   "survival": answer_survival(res.text, ex.answers) if ex.answers else None}
            if engine is not None:
                from ragzip.types import Document

                pred = engine.answer(ex.question, [Document(d.id, d.text, d.title) for d in res.documents])
                row["f1"] = f1_score(pred, ex.answers)
                row["em"] = exact_match(pred, ex.answers)
            rows.append(row)
        n = len(rows)
        summary = {
            "rate_achieved_mean": sum(r["rate"] for r in rows) / n,
            "rate_error_max": max(r["rate"] - rate for r in rows),
            "ms_per_query": 1000 * sum(r["seconds"] for r in rows) / n,
        }
        surv = [r["survival"] for r in rows if r["survival"] is not None]
        if surv:
            summary["answer_survival"] = sum(surv) / len(surv)
        if engine is not None:
            summary["f1"] = sum(r["f1"] for r in rows) / n
            summary["em"] = sum(r["em"] for r in rows) / n
        results["methods"][method] = summary
        for key, value in summary.items():
            results[f"{method}.{key}"] = value
    return results
