"""Eval suite "extractive": EXIT-style sentence selection on data with sentence-level supporting facts.

`ragzip eval extractive --data PATH --limit N --json OUT [--option k=v ...]` reports, for the encoder scorer at its
default budget (`auto`: calibrated coverage 0.95; ``default_budget`` says which) and at token budgets (default 1/3
and 1/5 of the tokens):

* ``support_recall``: share of gold supporting sentences kept (a sentence counts when >= 90% of its characters are
  in kept spans); ``support_precision``: share of kept sentences that are mostly supporting text;
* ``token_ratio`` (tokens kept / tokens in, the local LLM's tokenizer) and ``answer_survival`` (a gold answer string
  still in the compressed text);
* latency per question of each scorer on the same questions, side by side (``encoder_ms_per_query``,
  ``causal_ms_per_query``, ``speedup_encoder_vs_causal``) and the causal-LM scorer's recall;
* with ``reader=1``, reader EM/F1 of the local LLM (`ragzip.engine.LocalEngine`) on uncompressed vs compressed
  context.

At each budget rate, also: a 95% bootstrap CI over questions (``support_recall_ci@rate0.33``), recall by hop
(``support_recall_hop1@...``: supporting documents the question names or that no other supporting document names;
``..._hop2``: bridge documents reached only through another supporting document), the same figures for each
baseline on the same questions and budget (``embed-topk.support_recall@rate0.33``, ``random...``) with the paired
difference and its CI (``vs_embed-topk.support_recall_delta@rate0.33``, ``..._delta_ci@...``), and, with
``previous_weights``, for the previous scorer (``previous.*``: those weights, one pass, no document blend, no
antecedents).

At the default budget, also: ``support_recall_ci``, ``answer_survival_of_present`` (among the questions whose
answer is in the uncompressed context; ``num_answer_present``), ``guarded_share`` (the guard kept more),
``expected_coverage_mean``, each baseline at the tokens the default kept on each question
(``embed-topk.support_recall@default``, ``..._delta_ci@default``) and the previous default budget, the 0.5
threshold (``previous_default.*``).

Options (strings): ``threshold`` (0.5), ``rates`` ("0.3333,0.2"), ``scorers`` ("encoder,causal-lm"),
``causal_model`` (default: the embedded SmolLM2), ``causal_limit`` (questions for the slow scorer, default 5),
``reader`` (0/1), ``reader_model``, ``reader_limit`` (default all), ``exclude_trained`` (1: skip the HotpotQA
questions the shipped encoder was trained on, listed in its ``train_meta.json``), ``weights`` (encoder weights
folder), ``baselines`` ("embed-topk,random"), ``previous_weights`` (a weights folder to compare against), ``hops``
(1 or 2, the compressor's option).
"""

from __future__ import annotations

import json
import re
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ragzip.budget import Budget
from ragzip.errors import InputError
from ragzip.eval.datasets import Example, load_examples, sentence_spans
from ragzip.eval.metrics import answer_survival, exact_match, f1_score, ratio_bootstrap_ci
from ragzip.options import refuse_unknown
from ragzip.types import CompressionResult, Document

_KEYS = ("threshold", "rates", "scorers", "causal_model", "causal_limit", "reader", "reader_model", "reader_limit",
         "exclude_trained", "weights", "baselines", "previous_weights", "hops")
_COVERED = 0.9


gold_spans = sentence_spans  # the dataset's sentences located in the text


def _name(text: str) -> str:
    return " ".join(re.sub(r"\W+", " ", text.split(" (")[0].lower()).split())


def document_hops(example: Example) -> dict[int, int]:
    """Hop of each supporting context: 2 for a bridge document (its title is named by another supporting document
    but not by the question), else 1 (named by the question, or a comparison's parallel document)."""
    support = [i for i, c in enumerate(example.contexts) if c.supporting_sentence_ids]
    question = f" {_name(example.question)} "
    hops = {}
    for i in support:
        title = _name(example.contexts[i].title)
        named_by_other = bool(title) and any(f" {title} " in f" {_name(example.contexts[j].text)} "
                                             for j in support if j != i)
        hops[i] = 2 if named_by_other and f" {title} " not in question else 1
    if hops and all(h == 2 for h in hops.values()):  # documents naming each other: no order to tell
        hops = dict.fromkeys(hops, 1)
    return hops


def support_counts(example: Example, docs: Sequence[Document], result: CompressionResult,
                   hop: int | None = None) -> tuple[int, int, int, int]:
    """(supporting sentences kept, supporting sentences, kept sentences that are supporting, kept sentences).

    With `hop`, only the supporting sentences of documents of that hop (see `document_hops`) are counted."""
    kept: dict[str, list[tuple[int, int]]] = {}
    for d in result.documents:
        kept.setdefault(d.id, []).extend((s.start, s.end) for s in d.spans)
    hit = total = good = num_kept = 0
    hops = document_hops(example) if hop is not None else {}
    for i, (ctx, doc) in enumerate(zip(example.contexts, docs)):
        if hop is not None and hops.get(i) != hop:
            continue
        spans = gold_spans(ctx.text, ctx.sentences or ())
        support = [spans[i] for i in ctx.supporting_sentence_ids if i < len(spans)]
        mine = kept.get(doc.id, [])
        for a, b in support:
            total += 1
            covered = sum(max(0, min(b, q) - max(a, p)) for p, q in mine)
            hit += covered >= _COVERED * (b - a)
        for p, q in mine:
            num_kept += 1
            overlap = sum(max(0, min(b, q) - max(a, p)) for a, b in support)
            good += overlap >= 0.5 * (q - p)
    return hit, total, good, num_kept


def _aggregate(rows: list[tuple[Example, list[Document], CompressionResult]]) -> dict[str, float]:
    hit = total = good = num_kept = 0
    for ex, docs, res in rows:
        h, t, g, k = support_counts(ex, docs, res)
        hit, total, good, num_kept = hit + h, total + t, good + g, num_kept + k
    before = sum(r.tokens_before for _, _, r in rows)
    after = sum(r.tokens_after for _, _, r in rows)
    return {
        "support_recall": hit / total if total else float("nan"),
        "support_precision": good / num_kept if num_kept else 0.0,
        "token_ratio": after / before if before else 1.0,
        "compression_x": before / after if after else float("inf"),
        "answer_survival": statistics.fmean(answer_survival(r.text, ex.answers) for ex, _, r in rows),
        "num_questions": float(len(rows)),
    }


class _MemoScorer:
    """Reuses the scores of a (query, documents) pair: budgets after the timed pass need no new forwards."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.name = inner, inner.name
        self.memo: dict[Any, list[list[float]]] = {}

    def score(self, query: str, documents: Sequence[tuple[str, str, Sequence[tuple[int, int]]]]) -> list[list[float]]:
        key = (query, tuple((t, x, tuple(s)) for t, x, s in documents))
        if key not in self.memo:
            self.memo[key] = self.inner.score(query, documents)
        return self.memo[key]


def trained_ids(weights: str | None = None) -> set[str]:
    """Ids of the questions the EXIT encoder at `weights` (default: the shipped one) was trained or tuned on."""
    from ragzip.compressors.exit_encoder import WEIGHTS_DIR

    meta = Path(weights or WEIGHTS_DIR) / "train_meta.json"
    if not meta.is_file():
        return set()
    info = json.loads(meta.read_text())
    return set(info.get("train_ids", [])) | set(info.get("hotpot_train_ids", []))


def run(data: Path, *, limit: int | None, seed: int, options: dict[str, str]) -> dict[str, Any]:
    """Run the suite on a common-schema file or folder; returns the figures as a flat JSON-able dict."""
    from ragzip.compressors.exit import ExitCompressor

    refuse_unknown(options, _KEYS, "eval suite 'extractive'")
    # A threshold option makes threshold mode the encoder's default budget (as before auto); none: auto.
    given_threshold = float(options["threshold"]) if options.get("threshold") else None
    threshold = given_threshold if given_threshold is not None else 0.5
    rates = [float(r) for r in options.get("rates", "0.3333,0.2").split(",") if r]
    scorers = [s.strip() for s in options.get("scorers", "encoder,causal-lm").split(",") if s.strip()]
    weights = options.get("weights") or None
    skip = trained_ids(weights) if options.get("exclude_trained", "1") not in ("0", "false") else set()
    examples = [ex for ex in load_examples(data) if ex.id not in skip]
    examples = [ex for ex in examples if any(c.supporting_sentence_ids for c in ex.contexts)][:limit]
    if not examples:
        raise InputError(f"{data}: no examples with sentence-level supporting facts (after excluding trained ids)")

    encoder = ExitCompressor(scorer="encoder", weights=weights, threshold=given_threshold, hops=options.get("hops"))
    out: dict[str, Any] = {"data": str(data), "seed": seed, "num_excluded_trained": len(skip),
                           "threshold": threshold, "scorers": scorers}
    docs_of = {ex.id: ex.documents() for ex in examples}
    encoder.compress(examples[0].question, docs_of[examples[0].id])  # warm-up, not timed
    default_rows, enc_ms = [], []
    for ex in examples:
        start = time.perf_counter()
        res = encoder.compress(ex.question, docs_of[ex.id])
        enc_ms.append(1000 * (time.perf_counter() - start))
        default_rows.append((ex, docs_of[ex.id], res))
    out.update(_aggregate(default_rows))
    out["default_budget"] = encoder.default_budget.describe()
    out.update(_auto_figures(default_rows))
    out["encoder_ms_per_query"] = statistics.fmean(enc_ms)
    out["encoder_ms_per_query_median"] = statistics.median(enc_ms)
    out["uncompressed_answer_survival"] = statistics.fmean(
        answer_survival("\n\n".join(d.text for d in docs_of[ex.id]), ex.answers) for ex in examples)
    budget_rows: dict[float, list[tuple[Example, list[Document], CompressionResult]]] = {}
    timed_scorer, encoder.scorer = encoder.scorer, _MemoScorer(encoder.scorer)
    others = _comparisons(options, encoder.counter)
    mine_n, mine_d = _per_question(default_rows)
    previous = [(ex, docs, encoder.compress(ex.question, docs, Budget.score(threshold)))
                for ex, docs, _ in default_rows]
    out.update({f"previous_default.{k}": v for k, v in _aggregate(previous).items()})
    for name, compressor in others.items():  # the baselines at the tokens the default (auto) kept, per question
        theirs = [(ex, docs, compressor.compress(ex.question, docs, Budget.tokens(max(1, res.tokens_after))))
                  for ex, docs, res in default_rows]
        out.update({f"{name}.{k}@default": v for k, v in _aggregate(theirs).items()})
        their_n, their_d = _per_question(theirs)
        out[f"vs_{name}.support_recall_delta_ci@default"] = list(
            ratio_bootstrap_ci(mine_n, mine_d, baseline=(their_n, their_d), seed=seed))
    for rate in rates:
        rows = [(ex, docs_of[ex.id], encoder.compress(ex.question, docs_of[ex.id], Budget.ratio(rate)))
                for ex in examples]
        budget_rows[rate] = rows
        out.update(_budget_figures("", rows, rate))
        mine_n, mine_d = _per_question(rows)
        for name, compressor in others.items():
            theirs = [(ex, docs_of[ex.id], compressor.compress(ex.question, docs_of[ex.id], Budget.ratio(rate)))
                      for ex in examples]
            out.update(_budget_figures(f"{name}.", theirs, rate))
            their_n, their_d = _per_question(theirs)
            suffix = f"@rate{rate:.2f}"
            out[f"vs_{name}.support_recall_delta{suffix}"] = out[f"support_recall{suffix}"] - out[
                f"{name}.support_recall{suffix}"]
            out[f"vs_{name}.support_recall_delta_ci{suffix}"] = list(
                ratio_bootstrap_ci(mine_n, mine_d, baseline=(their_n, their_d), seed=seed))
    encoder.scorer = timed_scorer

    if "causal-lm" in scorers:
        out.update(_side_by_side(encoder, examples[: int(options.get("causal_limit", "5"))], docs_of,
                                 options.get("causal_model") or None, threshold))
    if options.get("reader", "0") not in ("0", "false", ""):
        reader_examples = examples[: int(options["reader_limit"])] if options.get("reader_limit") else examples
        out.update(_reader(reader_examples, docs_of, default_rows, budget_rows, options.get("reader_model") or None))
    return out


def _auto_figures(rows: list[tuple[Example, list[Document], CompressionResult]]) -> dict[str, Any]:
    """For an auto budget: the recall CI, how often the guard kept more, the mean expected coverage reached and
    the answer survival among questions whose answer is in the uncompressed context."""
    autos = [r.stages[-1].info.get("auto") for _, _, r in rows]
    present = [(ex, r) for ex, docs, r in rows if answer_survival("\n\n".join(d.text for d in docs), ex.answers)]
    out: dict[str, Any] = {"support_recall_ci": list(ratio_bootstrap_ci(*_per_question(rows))),
                           "answer_survival_of_present": (statistics.fmean(answer_survival(r.text, ex.answers)
                                                                           for ex, r in present)
                                                          if present else float("nan")),
                           "num_answer_present": len(present)}
    if all(isinstance(a, dict) for a in autos) and autos:
        out["guarded_share"] = sum(1 for a in autos if a.get("guard")) / len(autos)
        out["expected_coverage_mean"] = statistics.fmean(float(a.get("expected_coverage", 1.0)) for a in autos)
    return out


def _per_question(rows: list[tuple[Example, list[Document], CompressionResult]],
                  hop: int | None = None) -> tuple[list[int], list[int]]:
    counts = [support_counts(ex, docs, res, hop) for ex, docs, res in rows]
    return [c[0] for c in counts], [c[1] for c in counts]


def _budget_figures(prefix: str, rows: list[tuple[Example, list[Document], CompressionResult]],
                    rate: float) -> dict[str, Any]:
    """The `_aggregate` figures at one rate, the recall CI and recall by hop, keyed ``{prefix}{key}@rateR``."""
    suffix = f"@rate{rate:.2f}"
    out: dict[str, Any] = {f"{prefix}{k}{suffix}": v for k, v in _aggregate(rows).items()}
    out[f"{prefix}support_recall_ci{suffix}"] = list(ratio_bootstrap_ci(*_per_question(rows)))
    for hop in (1, 2):
        num, den = _per_question(rows, hop)
        out[f"{prefix}support_recall_hop{hop}{suffix}"] = sum(num) / sum(den) if sum(den) else float("nan")
        out[f"{prefix}support_sentences_hop{hop}"] = float(sum(den))
    return out


def _comparisons(options: dict[str, str], counter: Any) -> dict[str, Any]:
    """The compressors compared at every budget: the baselines, and the previous scorer when given."""
    from ragzip.compressors.exit import ExitCompressor
    from ragzip.compressors.registry import get_compressor

    names = [b.strip() for b in options.get("baselines", "embed-topk,random").split(",") if b.strip()]
    out: dict[str, Any] = {name: get_compressor(name, counter=counter) for name in names}
    if options.get("previous_weights"):
        out["previous"] = ExitCompressor(counter, scorer="encoder", weights=options["previous_weights"], hops=1,
                                         doc_weight=0.0, keep_antecedents=False)
    return out


def _side_by_side(encoder: Any, examples: list[Example], docs_of: dict[str, list[Document]], model: str | None,
                  threshold: float) -> dict[str, Any]:
    """Both scorers on the same questions, interleaved, so machine load affects both alike."""
    from ragzip.compressors.exit import ExitCompressor

    causal = ExitCompressor(scorer="causal-lm", model=model, threshold=threshold)
    causal.compress(examples[0].question, docs_of[examples[0].id][:1])  # warm-up, not timed
    enc_ms, lm_ms, enc_rows, lm_rows = [], [], [], []
    for ex in examples:
        docs = docs_of[ex.id]
        start = time.perf_counter()
        enc_rows.append((ex, docs, encoder.compress(ex.question, docs)))
        enc_ms.append(1000 * (time.perf_counter() - start))
        start = time.perf_counter()
        lm_rows.append((ex, docs, causal.compress(ex.question, docs)))
        lm_ms.append(1000 * (time.perf_counter() - start))
    lm = _aggregate(lm_rows)
    enc = _aggregate(enc_rows)
    return {
        "causal_model": model or "smollm2-135m-instruct (zero-shot)",
        "side_by_side_questions": len(examples),
        "side_by_side_encoder_ms_per_query": statistics.fmean(enc_ms),
        "causal_ms_per_query": statistics.fmean(lm_ms),
        "speedup_encoder_vs_causal": sum(lm_ms) / sum(enc_ms),
        "causal_support_recall": lm["support_recall"],
        "causal_support_precision": lm["support_precision"],
        "causal_token_ratio": lm["token_ratio"],
        "side_by_side_encoder_support_recall": enc["support_recall"],
        "side_by_side_encoder_token_ratio": enc["token_ratio"],
    }


def _reader(examples: list[Example], docs_of: dict[str, list[Document]], default_rows: list[Any],
            budget_rows: dict[float, list[Any]], model: str | None) -> dict[str, Any]:
    """Reader EM/F1 with the local LLM: uncompressed, compressed at the default threshold and at each budget."""
    from ragzip.engine import LocalEngine

    engine = LocalEngine(model)
    wanted = {ex.id for ex in examples}
    settings: dict[str, dict[str, list[Document]]] = {"uncompressed": {i: docs_of[i] for i in wanted}}
    settings["compressed"] = {ex.id: _as_docs(r) for ex, _, r in default_rows if ex.id in wanted}
    for rate, rows in budget_rows.items():
        settings[f"compressed@rate{rate:.2f}"] = {ex.id: _as_docs(r) for ex, _, r in rows if ex.id in wanted}
    out: dict[str, Any] = {"reader_model": model or "smollm2-135m-instruct", "reader_questions": len(examples)}
    for name, docs in settings.items():
        preds = {ex.id: engine.answer(ex.question, docs[ex.id]) for ex in examples}
        out[f"reader_em_{name}"] = statistics.fmean(exact_match(preds[ex.id], ex.answers) for ex in examples)
        out[f"reader_f1_{name}"] = statistics.fmean(f1_score(preds[ex.id], ex.answers) for ex in examples)
    return out


def _as_docs(result: CompressionResult) -> list[Document]:
    return [Document(d.id, d.text, d.title) for d in result.documents]
