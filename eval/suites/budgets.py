"""`ragzip eval budgets`: does every method keep its budget, exactly and fully?

For each method and budget, on every example: the limit (from the count of the joined input), the exact count of
`result.text` (what the LLM gets, separators included), whether `tokens_after` reports that count, and how much of
the limit is used. Reports violations (text over the limit), misreports (`tokens_after` != the count), the largest
overshoot, and the fill (count / limit: mean and 5th percentile), per method and budget.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from ragzip.budget import Budget
from ragzip.errors import ConfigError
from ragzip.eval.datasets import load_examples
from ragzip.options import refuse_unknown

DEFAULT_METHODS = "truncate,random,embed-topk,exit,lingua2,crag,exit+lingua2,crag+exit+lingua2"
DEFAULT_BUDGETS = "0.3,200"  # a rate and a token cap


def parse_budgets(text: str) -> list[Budget]:
    out = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        try:
            out.append(Budget.tokens(int(item)) if item.isdigit() else Budget.ratio(float(item)))
        except ValueError:
            raise ConfigError(f"budget {item!r} is neither a rate (0.3) nor a token cap (200)") from None
    if not out:
        raise ConfigError("no budgets given; e.g. budgets=0.3,200")
    return out


def run(data: Path, *, limit: int | None, seed: int, options: dict[str, str]) -> dict[str, Any]:
    from ragzip.pipeline import build_compressor
    from ragzip.tokens import get_token_counter

    refuse_unknown(options, ("methods", "budgets", "tokenizer", "skip"), "eval suite 'budgets'")
    methods = [m for m in options.get("methods", DEFAULT_METHODS).split(",") if m]
    budgets = parse_budgets(options.get("budgets", DEFAULT_BUDGETS))
    skip = int(options.get("skip", "0"))
    examples = [e for e in load_examples(data, None if limit is None else limit + skip) if e.contexts][skip:]
    if not examples:
        raise ConfigError(f"no examples with contexts in {data}")
    counter = get_token_counter(options.get("tokenizer") or None)
    rows = []
    for method in methods:
        compressor = build_compressor(method, counter=counter, options={"seed": seed} if method == "random" else {})
        for budget in budgets:
            fills, over, misreported, worst, seconds = [], 0, 0, 0, 0.0
            for ex in examples:
                docs = ex.documents()
                start = time.perf_counter()
                result = compressor.compress(ex.question, docs, budget)
                seconds += time.perf_counter() - start
                cap = budget.token_limit(counter.count("\n\n".join(d.text for d in docs if d.text.strip())))
                used = counter.count(result.text)
                over += used > (cap or 0)
                worst = max(worst, used - (cap or 0))
                misreported += used != result.tokens_after
                fills.append(used / cap if cap else 1.0)
            fills.sort()
            rows.append({"method": method, "budget": budget.describe(), "n": len(examples), "over_limit": over,
                         "max_overshoot": worst, "misreported": misreported,
                         "fill_mean": round(statistics.fmean(fills), 4),
                         "fill_p5": round(fills[int(0.05 * (len(fills) - 1))], 4),
                         "ms_per_query": round(1000 * seconds / len(examples), 1)})
    return {"dataset": str(data), "tokenizer": counter.name, "n": len(examples), "skip": skip, "rows": rows,
            "over_limit_total": sum(r["over_limit"] for r in rows),
            "misreported_total": sum(r["misreported"] for r in rows)}
