"""`ragzip eval fidelity`: does a compressed context keep the answers? Reader-judged, with baselines and CIs.

For every method on the same questions: tokens kept (counted with the reader's tokenizer, the target LLM here),
gold-answer survival, supporting-sentence recall where the data labels sentences, the reader's greedy EM/F1
(SQuAD normalisation, max over gold answers) and the teacher-forced NLL of the gold answer. `none`, `random` and
`embed-topk` are always added at the same budgets as references (for a method without a token budget, at the
rate it achieved), and each method's F1 and NLL are compared with `none` on the same questions by a paired
bootstrap 95% CI (`f1_delta_ci`, `nll_delta_ci`), and with `embed-topk` at its budget (`vs_embed_topk`): the bar a
method has to clear to earn its cost.

Methods are `method@budget` items: `exit@0.33` (rate), `exit@200` (target tokens), `exit@t0.5` (threshold), or a
bare `exit` (the method's own default budget); a method may be a pipeline (`exit+lingua2@0.33`).

Options (`-O key=value`): ``methods`` and ``reader`` (also `--methods`/`--reader` on the CLI), ``tokenizer``
(counts budgets; default the reader's), ``dtype`` (reader dtype, default auto), ``max_new_tokens`` (32),
``cache`` (1: reuse reader outputs from the cache dir; 0: off; or a SQLite path), ``exclude_trained`` (1: skip
the HotpotQA questions the shipped EXIT encoder was trained on), ``references`` (1: add the reference rows),
``progress`` (1: a progress bar on stderr).
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragzip.budget import Budget
from ragzip.errors import BudgetError, ConfigError, InputError
from ragzip.eval.datasets import load_examples
from ragzip.eval.metrics import answer_survival, exact_match, f1_score, paired_bootstrap_ci
from ragzip.eval.suites.extractive import support_counts, trained_ids
from ragzip.options import parse_bool, refuse_unknown
from ragzip.types import Document

DEFAULT_METHODS = "none,exit@0.33,embed-topk@0.33,random@0.33,lingua2@0.5,exit+lingua2@0.33"
REFERENCES = ("random", "embed-topk")
_KEYS = ("methods", "reader", "tokenizer", "dtype", "max_new_tokens", "cache", "exclude_trained", "references",
         "progress")
_INT = re.compile(r"^\d+$")
# The columns a person reads first (CLI table, report, README).
ROW_COLUMNS = ("label", "rate", "tokens_kept", "answer_survival", "support_recall", "em", "f1", "f1_delta",
               "f1_delta_ci", "nll", "nll_delta", "nll_delta_ci", "nll_vs_embed_topk")


@dataclass(frozen=True, slots=True)
class MethodSpec:
    method: str
    budget: Budget
    budget_text: str  # as written after '@' ("" for the default budget)

    @property
    def label(self) -> str:
        return f"{self.method}@{self.budget_text}" if self.budget_text else self.method

    @property
    def has_token_budget(self) -> bool:
        return not self.budget.is_unbounded


def parse_budget_text(text: str) -> Budget:
    """`0.33` a rate, `200` target tokens, `t0.5` a threshold, `auto` / `auto0.9` the auto budget (its coverage),
    `` the default budget."""
    try:
        if not text:
            return Budget()
        if text.lower().startswith("auto"):
            rest = text[4:]
            return Budget.auto(float(rest)) if rest else Budget.auto()
        if text[0] in "tT":
            return Budget.score(float(text[1:]))
        if _INT.match(text):
            return Budget.tokens(int(text))
        return Budget.ratio(float(text))
    except BudgetError as exc:
        raise BudgetError(f"budget {text!r}: {exc}") from None
    except ValueError:
        raise ConfigError(f"budget {text!r} is not a rate (0.33), a token count (200), a threshold (t0.5) or auto "
                          f"(auto, auto0.9)") from None


def parse_methods(text: str) -> list[MethodSpec]:
    """Comma-separated `method@budget` items, in order, duplicates removed."""
    specs: list[MethodSpec] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        method, _, budget_text = item.partition("@")
        method, budget_text = method.strip(), budget_text.strip()
        if not method:
            raise ConfigError(f"method item {item!r} has no method name")
        if method == "none":
            budget_text = ""
        spec = MethodSpec(method, parse_budget_text(budget_text), budget_text)
        if spec.label not in {s.label for s in specs}:
            specs.append(spec)
    if not specs:
        raise ConfigError("no methods given; e.g. --methods none,exit@0.33,lingua2@0.5")
    return specs


def _with_references(specs: list[MethodSpec], *, enabled: bool) -> list[MethodSpec]:
    """`none` first, then the methods, each token budget followed by its missing reference rows."""
    out = [MethodSpec("none", Budget(), "")]
    for spec in specs:
        if spec.method == "none":
            continue
        out.append(spec)
        if enabled and spec.has_token_budget:
            out += [MethodSpec(r, spec.budget, spec.budget_text) for r in REFERENCES]
    seen: set[str] = set()
    return [s for s in out if not (s.label in seen or seen.add(s.label))]  # type: ignore[func-returns-value]


def _reader_cache(value: str) -> Any:
    from ragzip.eval.reader import ReaderCache

    try:
        enabled = parse_bool(value, "cache")
    except ConfigError:
        return ReaderCache(Path(value))  # a path of its own
    if not enabled:
        return None
    from ragzip.settings import Settings

    return ReaderCache(Settings().cache_dir / "eval" / "reader_cache.sqlite")


def _progress(enabled: bool, total: int) -> tuple[Any, Callable[[str], None]]:
    from contextlib import nullcontext

    if not enabled:
        return nullcontext(), lambda _label: None
    from ragzip.progress import Progress

    bar = Progress("fidelity", total=total)
    return bar, lambda label: bar.advance(1, label)


def format_cell(value: Any) -> str:
    """A row value for a table: 3 decimals below 1, one above, CIs as [lo, hi], blanks for None."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1 else f"{value:.1f}"
    if isinstance(value, list):
        return "[" + ", ".join(format_cell(v) for v in value) + "]"
    return str(value)


def row_cells(row: dict[str, Any], columns: Sequence[str] = ROW_COLUMNS) -> list[str]:
    """A result row as table cells; `nll_vs_embed_topk` is the paired NLL difference to embed-topk with its CI."""
    vs = row.get("vs_embed_topk") or {}
    derived = {"nll_vs_embed_topk": f"{format_cell(vs['nll_delta'])} {format_cell(vs['nll_delta_ci'])}"
               if vs.get("nll_delta_ci") else ""}
    return [derived[c] if c in derived else format_cell(row.get(c)) for c in columns]


def _mean(xs: Sequence[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def paired_deltas(per_q: Sequence[dict[str, Any]], base: Sequence[dict[str, Any]], seed: int) -> dict[str, Any]:
    """Mean per-question F1 (points) and NLL differences to `base` on the same questions, with bootstrap CIs."""
    f1_diffs = [100 * (q["f1"] - b["f1"]) for q, b in zip(per_q, base)]
    nll_diffs = [q["nll"] - b["nll"] for q, b in zip(per_q, base) if q["nll"] is not None and b["nll"] is not None]
    return {"f1_delta": statistics.fmean(f1_diffs), "f1_delta_ci": list(paired_bootstrap_ci(f1_diffs, seed=seed)),
            "nll_delta": _mean(nll_diffs),
            "nll_delta_ci": list(paired_bootstrap_ci(nll_diffs, seed=seed)) if nll_diffs else None}


def _row(spec: MethodSpec, per_q: list[dict[str, Any]], base: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    hits, totals = sum(q["hit"] for q in per_q), sum(q["total"] for q in per_q)
    surv = [q["survival"] for q in per_q if q["survival"] is not None]
    nlls = [q["nll"] for q in per_q if q["nll"] is not None]
    return {
        "method": spec.method, "budget": spec.budget.describe(), "label": spec.label, "n": len(per_q),
        "tokens_kept": statistics.fmean(q["tokens_after"] for q in per_q),
        "tokens_in": statistics.fmean(q["tokens_before"] for q in per_q),
        "rate": statistics.fmean(q["rate"] for q in per_q),
        "answer_survival": _mean(surv),
        "support_recall": hits / totals if totals else None,
        "em": 100 * statistics.fmean(q["em"] for q in per_q),
        "f1": 100 * statistics.fmean(q["f1"] for q in per_q),
        "ms_per_query": statistics.fmean(q["ms"] for q in per_q),
        "nll": _mean(nlls),
        **paired_deltas(per_q, base, seed),
    }


def run(data: Path, *, limit: int | None, seed: int, options: dict[str, str]) -> dict[str, Any]:
    """Run the suite on a common-schema file or folder; returns `{"reader", "n", "rows": [...], ...}`."""
    from ragzip.eval.reader import DEFAULT_READER, Reader
    from ragzip.pipeline import build_compressor
    from ragzip.tokens import get_token_counter

    refuse_unknown(options, _KEYS, "eval suite 'fidelity'")
    with_refs = parse_bool(options.get("references", "1"), "references")
    specs = _with_references(parse_methods(options.get("methods") or DEFAULT_METHODS), enabled=with_refs)
    skip = trained_ids() if parse_bool(options.get("exclude_trained", "1"), "exclude_trained") else set()
    examples = [ex for ex in load_examples(data) if ex.id not in skip and ex.contexts and ex.question][:limit]
    if not examples:
        raise InputError(f"{data}: no examples with a question and contexts (after excluding trained ids)")
    reader_name = options.get("reader") or DEFAULT_READER
    reader = Reader(reader_name, dtype=options.get("dtype", "auto"),
                    max_new_tokens=int(options.get("max_new_tokens", "32")),
                    cache=_reader_cache(options.get("cache", "1")))
    counter = get_token_counter(options.get("tokenizer") or reader_name)
    docs = {ex.id: ex.documents() for ex in examples}

    per_method: dict[str, list[dict[str, Any]]] = {}
    reference_budget: dict[str, str] = {}  # label -> the budget its reference rows ran at
    rows: list[dict[str, Any]] = []
    num_matched = sum(1 for s in specs if not s.has_token_budget and s.method != "none") * len(REFERENCES) * with_refs
    bar, advance = _progress(parse_bool(options.get("progress", "0"), "progress"),
                             (len(specs) + num_matched) * len(examples))
    start = time.perf_counter()
    queue = list(specs)
    with bar:
        while queue:
            spec = queue.pop(0)
            compressor = build_compressor(spec.method, counter=counter,
                                          options={"seed": seed} if spec.method == "random" else None)
            compressor.compress(examples[0].question, docs[examples[0].id], spec.budget)  # warm-up: loads untimed
            per_q = []
            for ex in examples:
                t0 = time.perf_counter()
                res = compressor.compress(ex.question, docs[ex.id], spec.budget)
                ms = 1000 * (time.perf_counter() - t0)
                hit, total, _, _ = support_counts(ex, docs[ex.id], res)
                kept = [Document(d.id, d.text, d.title) for d in res.documents]
                read = reader.read(ex.question, kept, ex.answers)
                per_q.append({
                    "id": ex.id, "tokens_before": res.tokens_before, "tokens_after": res.tokens_after,
                    "rate": res.rate, "ms": ms, "hit": hit, "total": total, "answer": read.answer,
                    "survival": answer_survival(res.text, ex.answers) if ex.answers else None,
                    "f1": f1_score(read.answer, ex.answers), "em": exact_match(read.answer, ex.answers),
                    "nll": read.nll,
                })
                advance(spec.label)
            per_method[spec.label] = per_q
            rows.append(_row(spec, per_q, per_method["none"], seed))
            reference_budget[spec.label] = spec.budget_text
            if with_refs and spec.method != "none" and not spec.has_token_budget:
                # No token budget of its own: the references run at the rate this method achieved.
                matched = f"{max(0.01, min(1.0, round(rows[-1]['rate'], 2))):g}"
                reference_budget[spec.label] = matched
                refs = [MethodSpec(r, Budget.ratio(float(matched)), matched) for r in REFERENCES]
                queue[:0] = [r for r in refs if r.label not in per_method and r.label not in {q.label for q in queue}]
    if reader.cache is not None:
        reader.cache.close()
    for row in rows:  # the bar a method has to clear: embedding top-k at the same budget, on the same questions
        ref = per_method.get(f"embed-topk@{reference_budget[row['label']]}")
        if row["method"] not in ("none", "embed-topk") and ref is not None:
            row["vs_embed_topk"] = paired_deltas(per_method[row["label"]], ref, seed)
    return {
        "reader": reader_name, "n": len(examples), "rows": rows,
        "data": str(data), "seed": seed, "tokenizer": counter.name, "reader_dtype": str(reader.engine.dtype),
        "num_excluded_trained": len(skip), "seconds": round(time.perf_counter() - start, 1),
        "f1_uncompressed": rows[0]["f1"],
        "answers": {label: [{"id": q["id"], "answer": q["answer"], "f1": q["f1"], "nll": q["nll"]} for q in qs]
                    for label, qs in per_method.items()},
        "latency": [{"method": r["method"], "label": r["label"], "tokens_before": q["tokens_before"], "ms": q["ms"]}
                    for r in rows for q in per_method[r["label"]]],
    }
