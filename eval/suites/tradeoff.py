"""`ragzip eval tradeoff`: quality against compression for every method and setting on one QA dataset.

Each point is (method, setting): tokens kept / tokens in, reader EM/F1 with the local LLM on the compressed
context, gold-answer survival, supporting-sentence recall (when the data labels supporting sentences; a sentence
counts as kept when at least half of its characters survive), and compressor latency per query. The uncompressed
context and random sentence dropping at the same rates are the baselines on the same axes.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragzip.budget import Budget
from ragzip.errors import ConfigError
from ragzip.eval.datasets import Example, load_examples, sentence_spans
from ragzip.eval.metrics import answer_survival, exact_match, f1_score
from ragzip.types import CompressionResult, Document


@dataclass(frozen=True, slots=True)
class Setting:
    family: str  # one curve per family
    method: str
    label: str
    budget: Budget
    options: dict[str, Any] = field(default_factory=dict)


def default_settings(quick: bool) -> list[Setting]:
    rates = (0.5, 0.33, 0.2)
    out = [Setting("uncompressed", "none", "none", Budget())]
    for r in rates:
        out.append(Setting("random", "random", f"random r={r}", Budget.ratio(r)))
    out.append(Setting("truncate", "truncate", "truncate r=0.33", Budget.ratio(0.33)))
    out.append(Setting("embed-topk", "embed-topk", "embed-topk r=0.33", Budget.ratio(0.33)))
    out.append(Setting("exit", "exit", "exit thr=0.5", Budget()))
    for r in rates[1:]:
        out.append(Setting("exit", "exit", f"exit r={r}", Budget.ratio(r)))
    for r in rates[:2]:
        out.append(Setting("lingua2", "lingua2", f"lingua2 r={r}", Budget.ratio(r)))
    out.append(Setting("exit+lingua2", "exit+lingua2", "exit+lingua2 r=0.2", Budget.ratio(0.2)))
    if not quick:
        out.append(Setting("exit", "exit", "exit thr=0.3", Budget.score(0.3)))
        out.append(Setting("lingua2", "lingua2", "lingua2 r=0.2", Budget.ratio(0.2)))
        for k in (2, 4):
            out.append(Setting("crag", "crag", f"crag k={k}", Budget(), {"k": k}))
        out.append(Setting("crag+exit", "crag+exit", "crag+exit", Budget(), {}))
    return out


def _support_ranges(ex: Example) -> dict[str, list[tuple[int, int]]]:
    """Char ranges of the labelled supporting sentences, by document id."""
    out: dict[str, list[tuple[int, int]]] = {}
    for doc, ctx in zip(ex.documents(), ex.contexts):
        if ctx.sentences and ctx.supporting_sentence_ids:
            spans = sentence_spans(ctx.text, ctx.sentences)
            out[doc.id] = [spans[j] for j in ctx.supporting_sentence_ids if j < len(spans)]
    return out


def support_recall(result: CompressionResult, support: dict[str, list[tuple[int, int]]]) -> tuple[int, int]:
    """(recalled, total) supporting sentences for one example."""
    kept: dict[str, list[tuple[int, int]]] = {}
    for d in result.documents:
        for s in d.spans:
            kept.setdefault(s.doc_id, []).append((s.start, s.end))
    hit = total = 0
    for doc_id, ranges in support.items():
        for a, b in ranges:
            total += 1
            covered = sum(max(0, min(b, e) - max(a, s)) for s, e in kept.get(doc_id, []))
            hit += covered * 2 >= (b - a)
    return hit, total


def run(data: Path, *, limit: int | None, seed: int, options: dict[str, str]) -> dict[str, Any]:
    from ragzip.engine import LocalEngine
    from ragzip.pipeline import build_compressor
    from ragzip.tokens import get_token_counter

    quick = str(options.get("quick", "0")).lower() in ("1", "true", "yes")
    use_reader = str(options.get("reader", "1")).lower() in ("1", "true", "yes")
    wanted = {s.strip() for s in options.get("methods", "").split(",") if s.strip()}
    settings = [s for s in default_settings(quick) if not wanted or s.family in wanted]
    examples = [e for e in load_examples(data, limit) if e.contexts]
    if not examples:
        raise ConfigError(f"no examples with contexts in {data}")
    counter = get_token_counter(options.get("tokenizer"))
    engine = LocalEngine(options.get("llm")) if use_reader else None
    compressors: dict[tuple[str, str], Any] = {}
    points, latency = [], []
    for st in settings:
        key = (st.method, repr(sorted(st.options.items())))
        if key not in compressors:
            opts = {**st.options, **({"seed": seed} if st.method == "random" else {})}
            compressors[key] = build_compressor(st.method, counter=counter, options=opts)
        comp = compressors[key]
        comp.compress(examples[0].question, examples[0].documents(), st.budget)  # warm-up: model loads untimed
        rows = []
        for ex in examples:
            start = time.perf_counter()
            res = comp.compress(ex.question, ex.documents(), st.budget)
            ms = 1000 * (time.perf_counter() - start)
            hit, total = support_recall(res, _support_ranges(ex))
            row = {"ratio": res.rate, "ms": ms, "tokens_before": res.tokens_before, "hit": hit, "total": total,
                   "survival": answer_survival(res.text, ex.answers) if ex.answers else None}
            if engine is not None:
                pred = engine.answer(ex.question, [Document(d.id, d.text, d.title) for d in res.documents])
                row["f1"], row["em"] = f1_score(pred, ex.answers), exact_match(pred, ex.answers)
            rows.append(row)
            latency.append({"family": st.family, "label": st.label, "tokens_before": res.tokens_before, "ms": ms})
        total_support = sum(r["total"] for r in rows)
        surv = [r["survival"] for r in rows if r["survival"] is not None]
        point: dict[str, Any] = {
            "family": st.family, "label": st.label, "method": st.method, "budget": st.budget.describe(),
            "token_ratio": statistics.fmean(r["ratio"] for r in rows),
            "ms_per_query": statistics.fmean(r["ms"] for r in rows),
            "answer_survival": statistics.fmean(surv) if surv else None,
            "support_recall": sum(r["hit"] for r in rows) / total_support if total_support else None,
        }
        if engine is not None:
            point["f1"] = 100 * statistics.fmean(r["f1"] for r in rows)
            point["em"] = 100 * statistics.fmean(r["em"] for r in rows)
        points.append(point)
    base = next((p for p in points if p["family"] == "uncompressed"), None)
    return {
        "dataset": str(data), "num_examples": len(examples), "seed": seed, "quick": quick,
        "reader": (options.get("llm") or "smollm2-135m-instruct") if engine else None,
        "f1_uncompressed": base.get("f1") if base else None,
        "points": points, "latency": latency,
    }
