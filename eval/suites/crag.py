"""Eval suite "crag": CRAG clustering on multi-item summarisation sets (FewSum Amazon reviews, multi_news).

`ragzip eval crag --data PATH --limit N --json OUT [--option k=v ...]` measures, per example:

* tokens before / after compression against the number of items, and how both grow as the number of items doubles
  (the first 1, 2, 4, ... items of each example are compressed alone);
* ROUGE-L (F, best over the human references) of a summary the local LLM writes from the compressed items and from
  all items (the same prompt, greedy decoding). Skip this part with `--option summaries=false`.

Options (strings): the CragCompressor ones (`k`, `mode`, `per_cluster`, `alpha`, `llm`, `max_k`), a budget
(`rate` or `target_tokens`; none by default, so k comes from the silhouette unless `k` is given), `reader` (local
LLM that writes the summaries, default the embedded one), `max_new_tokens` (summary length, default 128),
`max_input_tokens` (longest summary prompt, default 3072; longer inputs are cut), `unit` (multi_news items:
paragraph | passage), `tokenizer` (token counter, default the local LLM's), `growth` (true/false), `summaries`
(true/false), `cache` (true/false: reuse reader summaries across runs).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ragzip.budget import Budget
from ragzip.compressors.crag import CragCompressor
from ragzip.compressors.summarize import LocalSummarizer, SummaryCache, cached_summary
from ragzip.errors import ConfigError
from ragzip.eval.loaders_extra import detect_format, load_summary_examples
from ragzip.eval.metrics import rouge_l
from ragzip.options import parse_bool, refuse_unknown
from ragzip.tokens import TokenCounter, get_token_counter

_COMPRESSOR_KEYS = ("k", "mode", "per_cluster", "alpha", "llm", "max_k", "embedder")
_SUITE_KEYS = ("rate", "target_tokens", "reader", "max_new_tokens", "max_input_tokens", "unit", "tokenizer", "growth",
               "summaries", "cache", "cache_dir")


class MemoEncoder:
    """Wraps a sentence-transformers model and remembers each text's embedding (the growth runs re-embed subsets)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self._memo: dict[str, np.ndarray] = {}

    def encode(self, texts: Sequence[str], **kw: Any) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self._memo]
        if missing:
            for t, v in zip(missing, self.model.encode(missing, **kw)):
                self._memo[t] = np.asarray(v, dtype=np.float32)
        return np.stack([self._memo[t] for t in texts])


def _budget(options: dict[str, str]) -> Budget:
    try:
        if "rate" in options:
            return Budget.ratio(float(options["rate"]))
        if "target_tokens" in options:
            return Budget.tokens(int(options["target_tokens"]))
    except ValueError as exc:
        raise ConfigError(f"crag suite: bad budget option ({exc})") from None
    return Budget()


def _flag(options: dict[str, str], key: str, default: bool) -> bool:
    return parse_bool(options.get(key, default), f"crag suite option {key}")


def _growth(compressor: CragCompressor, examples: Sequence[Any], budget: Budget) -> tuple[list[dict], float, float]:
    """Compress the first 1, 2, 4, ... items of each example; mean tokens per level and mean growth per doubling."""
    levels: dict[int, list[tuple[int, int, int]]] = {}
    after_ratios, before_ratios = [], []
    for ex in examples:
        prev = None
        n = 1
        while n <= len(ex.items):
            res = compressor.compress("", ex.items[:n], budget)
            levels.setdefault(n, []).append((res.tokens_before, res.tokens_after, int(res.stages[0].info["k"])))
            if prev is not None and prev[0] and prev[1]:
                before_ratios.append(res.tokens_before / prev[0])
                after_ratios.append(res.tokens_after / prev[1])
            prev = (res.tokens_before, res.tokens_after)
            n *= 2
    table = [{"items": n, "examples": len(rows), "tokens_before": round(statistics.mean(r[0] for r in rows), 2),
              "tokens_after": round(statistics.mean(r[1] for r in rows), 2),
              "k": round(statistics.mean(r[2] for r in rows), 2)} for n, rows in sorted(levels.items())]

    def geo(xs: list[float]) -> float:
        return round(math.exp(statistics.mean(math.log(x) for x in xs)), 4) if xs else float("nan")

    return table, geo(before_ratios), geo(after_ratios)


def run(data: Path, *, limit: int | None, seed: int, options: dict[str, str]) -> dict:
    """Run the suite on a FewSum or multi_news file/folder; returns the JSON-able figures."""
    refuse_unknown(options, _COMPRESSOR_KEYS + _SUITE_KEYS, "eval suite 'crag'")
    data = Path(data)
    fmt = detect_format(data)
    examples = [ex for ex in load_summary_examples(data, limit, unit=options.get("unit", "paragraph")) if ex.items]
    counter: TokenCounter = get_token_counter(options.get("tokenizer") or None)
    from ragzip.registry import load_embedder

    encoder = MemoEncoder(load_embedder(options.get("embedder") or None))
    comp_opts: dict[str, Any] = {k: options[k] for k in _COMPRESSOR_KEYS if k in options and k != "embedder"}
    if options.get("cache_dir"):
        comp_opts["cache_dir"] = options["cache_dir"]
    compressor = CragCompressor(counter=counter, embedder=encoder, seed=seed, **comp_opts)
    budget = _budget(options)
    use_summaries = _flag(options, "summaries", True)
    reader = LocalSummarizer(options.get("reader") or None, max_input_tokens=int(options.get("max_input_tokens", 3072)))
    max_new = int(options.get("max_new_tokens", 128))
    cache = None
    if _flag(options, "cache", True) and use_summaries:
        from ragzip.registry import default_cache_dir

        cache = SummaryCache(Path(options.get("cache_dir") or default_cache_dir()) / "eval_summaries.sqlite")

    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for ex in examples:
        res = compressor.compress("", ex.items, budget)
        row: dict[str, Any] = {"id": ex.id, "items": len(ex.items), "tokens_before": res.tokens_before,
                               "tokens_after": res.tokens_after, "k": res.stages[0].info["k"],
                               "kept": len(res.documents), "compress_seconds": round(res.seconds, 4)}
        if use_summaries:
            full, _ = cached_summary(reader, [d.text for d in ex.items], max_new_tokens=max_new, cache=cache)
            comp, _ = cached_summary(reader, [d.text for d in res.documents], max_new_tokens=max_new, cache=cache)
            row.update(rougeL_full=round(rouge_l(full, ex.references), 4),
                       rougeL_compressed=round(rouge_l(comp, ex.references), 4),
                       summary_full=full, summary_compressed=comp)
        rows.append(row)
    if not rows:
        raise ConfigError(f"crag suite: no examples with items in {data}")

    before, after = sum(r["tokens_before"] for r in rows), sum(r["tokens_after"] for r in rows)
    out: dict[str, Any] = {
        "dataset": fmt, "examples": len(rows), "budget": budget.describe(), "seed": seed,
        "options": dict(sorted(options.items())),
        "token_reduction": round(statistics.mean(1 - r["tokens_after"] / r["tokens_before"] for r in rows
                                                 if r["tokens_before"]), 4),
        "token_reduction_total": round(1 - after / before, 4) if before else 0.0,
        "mean_items": round(statistics.mean(r["items"] for r in rows), 2),
        "mean_k": round(statistics.mean(r["k"] for r in rows), 2),
        "mean_tokens_before": round(before / len(rows), 2), "mean_tokens_after": round(after / len(rows), 2),
    }
    if use_summaries:
        out["rougeL_compressed"] = round(statistics.mean(r["rougeL_compressed"] for r in rows), 4)
        out["rougeL_full"] = round(statistics.mean(r["rougeL_full"] for r in rows), 4)
        out["rougeL_ratio"] = round(out["rougeL_compressed"] / out["rougeL_full"], 4) if out["rougeL_full"] else None
        out["reader"] = reader.name
    if _flag(options, "growth", True):
        table, before_growth, after_growth = _growth(compressor, examples, budget)
        out["growth"] = table
        out["tokens_before_growth_per_doubling"] = before_growth
        out["tokens_after_growth_per_doubling"] = after_growth
    out["seconds"] = round(time.perf_counter() - started, 2)
    out["per_example"] = rows
    return out
