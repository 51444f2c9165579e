"""LLMLingua-2-style token-level compression: a token classifier scores words, the best ones are kept.

Two modes:
* ``reference`` reproduces the `llmlingua` 0.2.2 `compress_prompt_llmlingua2` decisions word for word (the same
  chunking, word merging, force tokens, digits, drop_consecutive and per-window percentile threshold) with the
  per-token Python replaced by numpy; budgets are counted with this compressor's `counter` (pass a cl100k counter
  to match the reference's tiktoken counts exactly).
* ``exact`` (default) scores whitespace words (CJK runs split at token pieces) and keeps the best ones across all
  windows and documents so that the output meets `target_tokens` (or the rate) as counted by `counter`; structure
  (tables, JSON, code, URLs, numbers) is kept or dropped whole, line breaks between kept pieces survive, and with
  a question the budget is spread coarse-to-fine: sentences relevant to it keep more of their words.

In both modes the output is a subsequence of source words, assembled from source character spans.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache
from typing import Any

import numpy as np

from ragzip.budget import Budget
from ragzip.compressors.base import BaseCompressor, CompressionRequest, PrefetchMemo, joined_tokens, parsed_requests
from ragzip.compressors.calibration import Calibration, auto_select, load_calibration
from ragzip.compressors.lingua2_model import DEFAULT_MODEL, WEIGHTS_DIR, TokenClassifier, load_token_classifier
from ragzip.compressors.lingua2_select import UnitScores, kept_runs, render, run_scores, select_units
from ragzip.compressors.lingua2_words import (
    build_tables,
    detect_rule,
    merge_words,
    reference_chunks,
    sentence_windows,
    text_units,
    word_strings,
)
from ragzip.compressors.protect import structure_groups, units_touching
from ragzip.errors import BudgetError, ConfigError
from ragzip.options import bounds, parse_bool
from ragzip.spans import assemble
from ragzip.tokens import TokenCounter
from ragzip.types import CompressedDocument, Document

DEFAULT_RATE = 0.5
# Exact mode reads a document longer than one encoder window (510 tokens) in windows of this many tokens: on CPU,
# attention over 512 tokens is ~40% of the forward, and 254-token windows made a 10k-token text 1.24x faster with
# the same answer survival (README).
DEFAULT_WINDOW_TOKENS = 254
# Tuned on the tuning split of unseen SQuAD passages (scripts/lingua2_splits.py; survival at three rates and the
# 0.5B reader's F1, README): a word's score is
# (1 - DEFAULT_QUERY_WEIGHT) * classifier + DEFAULT_QUERY_WEIGHT * relevance, and its relevance is
# (1 - DEFAULT_ANSWER_SHARE) * its sentence's EXIT probability + DEFAULT_ANSWER_SHARE * its answer probability.
DEFAULT_QUERY_WEIGHT = 0.95
DEFAULT_ANSWER_SHARE = 0.3
_STOP = frozenset("a an the of to in on at for and or is are was were be it this that with as by from what who "
                  "when where which how why did does do".split())


class Mode(str, Enum):
    EXACT = "exact"
    REFERENCE = "reference"


class QueryAware(str, Enum):
    AUTO = "auto"  # on whenever the request has a question
    ON = "on"
    OFF = "off"


class Relevance(str, Enum):
    EXIT = "exit"
    LEXICAL = "lexical"


# The relevance `prefetched` computed for a batch of requests: per (query, title, text, sentence spans) the
# document's sentence, answer and keep probabilities (a document's relevance depends only on the query and the
# document, so a memo hit is what a fresh forward gives).
_DocKey = tuple[str, str, str, str, tuple[tuple[int, int], ...]]  # (query, id, title, text, sentence spans)
_PREFETCHED = PrefetchMemo("lingua2_prefetched")


@lru_cache(maxsize=1)
def relevance_scorer() -> Any:
    """The `QueryScorer` (EXIT encoder + answer head) shared by every lingua2 compressor of the process."""
    from ragzip.compressors.lingua2_query import QueryScorer

    return QueryScorer()


def _parse_query_aware(value: Any, name: str) -> QueryAware:
    if isinstance(value, QueryAware):
        return value
    if isinstance(value, str) and value.strip().lower() in ("auto", "on", "off"):
        return QueryAware(value.strip().lower())
    return QueryAware.ON if parse_bool(value, name) else QueryAware.OFF


class WordProb(str, Enum):
    MEAN = "mean"
    FIRST = "first"


def _parse_tokens(value: Any, name: str = "force_tokens") -> tuple[str, ...]:
    """Force tokens from a sequence, a JSON list string, or a comma-separated string."""
    if value is None:
        return ()
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("["):
            try:
                value = json.loads(stripped)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"force_tokens is not a valid JSON list: {exc}") from None
        else:
            return tuple(t.strip() for t in value.split(",") if t.strip())
    if not all(isinstance(t, str) and t for t in value):
        raise ConfigError("force_tokens must be non-empty strings")
    return tuple(value)


@dataclass(frozen=True, slots=True)
class Lingua2Options:
    """Settings of a `Lingua2Compressor` (see its docstring); strings from the CLI are parsed. `model` None is
    ragzip's classifier; `protect` None means on in exact mode; `query_aware` auto is off in reference mode."""

    model: str | None = None
    mode: Mode = Mode.EXACT
    query_aware: QueryAware = field(default=QueryAware.AUTO, metadata={"parse": _parse_query_aware})
    relevance: Relevance = Relevance.EXIT
    force_tokens: tuple[str, ...] = field(default=(), metadata={"parse": _parse_tokens})
    keep_digits: bool = False
    drop_consecutive: bool = False
    word_prob: WordProb = WordProb.MEAN
    protect: bool | None = None
    context_filter: bool = False
    query_weight: float = field(default=DEFAULT_QUERY_WEIGHT, metadata=bounds(low=0.0, high=1.0))
    answer_share: float = field(default=DEFAULT_ANSWER_SHARE, metadata=bounds(low=0.0, high=1.0))
    answer_gap_fill: bool = True
    one_pass: bool = True
    batch_size: int = field(default=4, metadata=bounds(low=1))
    window_tokens: int = field(default=DEFAULT_WINDOW_TOKENS, metadata=bounds(low=16))
    dtype: str = "auto"
    device: str = "auto"

    def __post_init__(self) -> None:
        reference = self.mode is Mode.REFERENCE
        if self.model is None:
            object.__setattr__(self, "model", DEFAULT_MODEL)
        if self.protect is None:
            object.__setattr__(self, "protect", not reference)
        if reference and self.query_aware is QueryAware.AUTO:
            object.__setattr__(self, "query_aware", QueryAware.OFF)  # the reference ignores the question
        if reference and (self.query_aware is QueryAware.ON or self.protect):
            raise ConfigError("query_aware and protect need mode=exact; reference mode reproduces llmlingua as is")
        if not reference and self.context_filter:
            raise ConfigError("context_filter is the reference's document filter; use it with mode=reference")
        if reference and self.dtype not in ("auto", "float32", "fp32"):
            raise ConfigError("reference mode computes in float32 (its parity with llmlingua depends on it)")


@dataclass(frozen=True, slots=True)
class LabeledWords:
    """Reference-mode words of one document: source char ranges, word strings and keep labels."""

    spans: np.ndarray  # [W, 2]
    words: list[str]
    labels: np.ndarray  # [W] bool


class Lingua2Compressor(BaseCompressor):
    """LLMLingua-2-style token-level pruning with exact budgets, structure protection and faithful spans.

    Args:
        counter: the target LLM's token counter (budgets are counted with it).
        model: token classifier: ragzip's default, a local folder or a Hugging Face name such as
            ``microsoft/llmlingua-2-xlm-roberta-large-meetingbank``.
        mode: "exact" (default) or "reference" (word-for-word parity with `llmlingua`).
        query_aware: "auto" (default: on whenever the request has a question), true or false. On, exact mode is
            coarse-to-fine: each word's score blends its sentence's relevance to the question (`relevance`) with
            the classifier's keep probability, so the budget goes to answer-bearing sentences first.
        relevance: the coarse scorer: "exit" (the EXIT encoder's sentence probabilities, default) or "lexical"
            (query-word overlap; no second model).
        force_tokens: strings always kept (a JSON list or comma-separated string from the CLI).
        keep_digits: always keep words containing a digit.
        drop_consecutive: drop a force token repeating the previous kept force token with nothing kept between.
        word_prob: "mean" or "first" subword probability per word.
        protect: keep structure whole or drop it whole (exact mode; default on): code blocks, inline code, JSON
            values, URLs, e-mails, numbers, table rows (with their header); see `protect.structure_groups`.
        context_filter: reference mode: drop whole low-scoring documents first, as the reference's
            `use_context_level_filter`.
        query_weight: weight of query relevance when query-aware (0..1, default DEFAULT_QUERY_WEIGHT).
        answer_share: share of the answer-token probability (vs the sentence probability) in the relevance
            (0..1, default DEFAULT_ANSWER_SHARE; "exit" relevance only).
        one_pass: query-aware with "exit" relevance and the shipped classifier: read P(keep) from the keep head
            on the relevance forward (the classifier distilled onto the EXIT encoder, `weights/lingua2_keep`) instead
            of a second encoder pass (default True; False: the classifier's own pass, as before).
        batch_size: encoder windows per forward pass.
        window_tokens: exact mode's encoder window for documents longer than one full window, cut at sentence ends
            (default DEFAULT_WINDOW_TOKENS; shorter windows are faster on CPU, where attention over 512 tokens is
            ~40% of the forward). A document that fits one full window is always read whole.
        dtype: classifier dtype in exact mode: "auto" (bf16 where the CPU has native bf16: faster, scores differ
            from fp32 in the third decimal; see README), "float32" or "bfloat16". Reference mode always runs in
            float32, as llmlingua does.

    Example:
        >>> from ragzip.tokens import get_token_counter
        >>> comp = Lingua2Compressor(counter=get_token_counter("whitespace"))
        >>> comp.compress("", [Document("d", "some long context ...")], Budget.ratio(0.5)).text  # doctest: +SKIP
    """

    name = "lingua2"
    Options = Lingua2Options
    options: Lingua2Options
    budget_kinds = frozenset({"rate", "target_tokens", "threshold", "auto"})
    fit_unit = "word"
    counts_separators = True  # exact mode's selection counts the joined context (lingua2_select)

    def __init__(self, counter: TokenCounter, options: Lingua2Options | Mapping[str, Any] | None = None,
                 **values: Any) -> None:
        super().__init__(counter, options, **values)
        o: Lingua2Options = self.options
        self.dtype = "float32" if o.mode is Mode.REFERENCE else o.dtype
        self.classifier: TokenClassifier = load_token_classifier(str(o.model), self.dtype, o.device)
        self.rule = detect_rule(self.classifier.tokenizer)
        self.tables = build_tables(self.classifier.tokenizer, self.rule, o.force_tokens)
        # Word score -> P(the word is part of the answer), fitted for the shipped model with the default query
        # blend (scripts/calibrate_auto.py); None for other models (their raw scores are used as they are).
        shipped = o.model == DEFAULT_MODEL and o.mode is Mode.EXACT
        self.calibration: Calibration | None = load_calibration(WEIGHTS_DIR) if shipped else None

    @property
    def default_budget(self) -> Budget:
        """auto in exact mode; reference mode keeps llmlingua's default rate."""
        return Budget() if self.options.mode is Mode.REFERENCE else Budget.auto()

    def _inner_budget(self, budget: Budget, limit: int | None, documents: Sequence[Document]) -> Budget:
        if self.options.mode is Mode.REFERENCE:  # the reference's own rate semantics (parity with llmlingua)
            return budget
        return super()._inner_budget(budget, limit, documents)

    # ------------------------------------------------------------------ dispatch
    def _compress(self, query: str, documents: Sequence[Document], budget: Budget, tokens: Sequence[int]
                  ) -> tuple[list[CompressedDocument], dict[str, object]]:
        if self.options.mode is Mode.REFERENCE:
            if budget.is_auto:
                raise BudgetError("lingua2 mode=reference takes a rate or target_tokens budget (llmlingua's); "
                                  "auto needs mode=exact")
            labeled = self.label_words([d.text for d in documents], budget)
            out = [assemble(d, kept_runs(lw.spans, lw.labels)) for d, lw in zip(documents, labeled)]
            return out, {"mode": "reference", "words": int(sum(len(lw.words) for lw in labeled)),
                         "kept_words": int(sum(lw.labels.sum() for lw in labeled))}
        return self._exact(query, documents, budget)

    # ------------------------------------------------------------------ reference mode
    def label_words(self, texts: Sequence[str], budget: Budget | None = None) -> list[LabeledWords]:
        """Reference-mode keep labels for the words of each text (what `llmlingua` reports as word labels)."""
        opts, tables, clf = self.options, self.tables, self.classifier
        budget = budget or Budget.ratio(DEFAULT_RATE)
        if budget.threshold is not None:
            raise ConfigError("reference mode takes a rate or target_tokens budget, not a threshold")
        n_orig = sum(self.counter.count_batch(list(texts)))
        rate = budget.rate if budget.rate is not None else DEFAULT_RATE
        encs = clf.encode(texts)
        chunks = [reference_chunks(ids, tables.is_chunk_end, clf.max_seq_len - 2) for ids, _ in encs]
        flat = [(d, a, b) for d, doc_chunks in enumerate(chunks) for a, b in doc_chunks]
        bodies = [encs[d][0][a:b] for d, a, b in flat]
        probs = clf.keep_probs(bodies, batch_size=opts.batch_size,
                               add_sep=[len(w) <= clf.max_seq_len - 2 for w in bodies], reference_wrap=True)
        mode = opts.word_prob.value
        words = [merge_words(ids, p, tables, mode=mode, keep_digits=opts.keep_digits) for ids, p in zip(bodies, probs)]
        strings = [word_strings(ids, w, tables) for ids, w in zip(bodies, words)]
        keep_doc = np.ones(len(texts), dtype=bool)
        if opts.context_filter and len(texts) > 1:
            keep_doc, n_reserved = self._context_filter(budget, rate, n_orig, flat, bodies, words)
            if budget.target_tokens is not None:
                rate = min(budget.target_tokens / max(1, n_reserved), 1.0)
        elif budget.target_tokens is not None:
            rate = min(budget.target_tokens / max(1, n_orig), 1.0)
        costs = self._costs([s for i, ss in enumerate(strings) if keep_doc[flat[i][0]] for s in ss])
        per_doc: list[list[tuple[np.ndarray, list[str], np.ndarray]]] = [[] for _ in texts]
        for (d, a, _), ids, w, ss in zip(flat, bodies, words, strings):
            offs = encs[d][1][a:][w.token_pos]
            last = np.append(w.first[1:], len(w.token_pos)) - 1
            spans = np.stack([offs[w.first, 0], offs[last, 1]], axis=1) if len(w.first) else np.zeros((0, 2), int)
            labels = self._reference_keep(w.prob, ss, costs, 1.0 - rate) if keep_doc[d] else np.zeros(len(ss), bool)
            per_doc[d].append((spans, ss, labels))
        return [LabeledWords(np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, 2), int),
                             [s for p in parts for s in p[1]],
                             np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, bool))
                for parts in per_doc]

    def _costs(self, strings: Sequence[str]) -> dict[str, int]:
        unique = sorted(set(strings))
        return dict(zip(unique, self.counter.count_batch(unique)))

    def _reference_keep(self, prob: np.ndarray, strings: list[str], costs: dict[str, int],
                        reduce_rate: float) -> np.ndarray:
        if len(prob) == 0:
            return np.zeros(0, dtype=bool)
        if reduce_rate <= 0:
            return np.ones(len(prob), dtype=bool)
        prob = prob.astype(np.float64)
        force = np.array([s in self.options.force_tokens for s in strings]) if self.options.force_tokens else \
            np.zeros(len(prob), dtype=bool)
        if self.options.drop_consecutive and force.any():
            thr0 = np.percentile(prob, int(100 * reduce_rate))
            between = np.cumsum(~force & (prob > thr0))
            f = np.flatnonzero(force)
            for k in range(1, len(f)):  # one step per force word; the rest stays vectorised
                if between[f[k]] == between[f[k - 1]] and strings[f[k]] == strings[f[k - 1]]:
                    prob[f[k]] = 0.0
        weights = np.array([costs[s] for s in strings], dtype=np.int64)
        thr = np.percentile(np.repeat(prob, weights), int(100 * reduce_rate + 1)) if weights.sum() else 1.0
        keep = (prob > thr) | ((thr == 1.0) & (prob == thr))
        if self.options.drop_consecutive and force.any():
            kept = np.flatnonzero(keep)
            for j in range(1, len(kept)):
                i, prev = kept[j], kept[j - 1]
                if force[i] and strings[i] == strings[prev]:
                    keep[i] = False
        return keep

    def _context_filter(self, budget: Budget, rate: float, n_orig: int, flat: list[tuple[int, int, int]],
                        bodies: list[np.ndarray], words: list[Any]) -> tuple[np.ndarray, int]:
        n_docs = 1 + max(d for d, _, _ in flat)
        ctx_rate = (rate + 1.0) / 2 if budget.target_tokens is None else min(2 * budget.target_tokens / n_orig, 1.0)
        per_doc: list[list[np.ndarray]] = [[] for _ in range(n_docs)]
        for (d, _, _), w in zip(flat, words):
            per_doc[d].append(w.prob_no_force)
        # float32 running sums, as the reference's Python `sum` over float32 scalars
        ctx_prob = np.array([np.cumsum(np.concatenate(ps), dtype=np.float32)[-1] / np.float32(sum(map(len, ps)))
                             for ps in per_doc], dtype=np.float32)
        keep = ctx_prob >= np.percentile(ctx_prob, int(100 * (1 - ctx_rate)))
        detok = self.classifier.tokenizer.convert_tokens_to_string
        chunk_text = [detok(list(self.tables.tokens[ids])) for ids in bodies]
        n_reserved = sum(c for (d, _, _), c in zip(flat, self.counter.count_batch(chunk_text)) if keep[d])
        return keep, n_reserved

    # ------------------------------------------------------------------ exact mode
    def unit_scores(self, query: str, documents: Sequence[Document]) -> tuple[list[UnitScores], dict[str, object]]:
        """Exact mode's scored word units of each document (classifier keep probability, blended with the
        question's relevance when query-aware) and what was computed (for stats)."""
        opts = self.options
        texts = [d.text for d in documents]
        query_on = opts.query_aware is not QueryAware.OFF and bool(query.strip())
        exit_rel = self._exit_relevance(query, documents) if query_on and opts.relevance is Relevance.EXIT else None
        keep = exit_rel[1].token_keep if exit_rel is not None and self.one_pass else None
        if keep is not None:  # one pass: P(keep) from the keep head on the relevance forward
            encs = self.classifier.encode(texts)
            tok_probs, num_windows = self._keep_from_forward(texts, encs, exit_rel[1].token_starts, keep)
        else:
            encs, tok_probs, num_windows = self.token_keep_probs(texts)
        relevance = self._relevance(query, documents, exit_rel) if query_on else [None] * len(documents)
        scores = []
        for doc, (ids, offs), p, rel in zip(documents, encs, tok_probs, relevance):
            units = text_units(doc.text, offs[:, 0])
            score = _unit_prob(units, offs, p, ~self.tables.is_special[ids], opts.word_prob)
            if rel is not None:
                score = (1 - opts.query_weight) * score + opts.query_weight * rel(units)
            structure = structure_groups(doc.text, units) if opts.protect else None
            scores.append(UnitScores(units, score, self._forced(doc.text, units),
                                     None if structure is None else structure.group,
                                     None if structure is None else structure.requires))
        return scores, {"query_aware": query_on, "windows": num_windows, "one_pass": keep is not None}

    @property
    def one_pass(self) -> bool:
        """Whether query-aware scoring reads P(keep) from the relevance forward (the keep head, distilled from the
        shipped classifier) instead of running the classifier: the shipped model with `one_pass` on."""
        return self.options.one_pass and self.options.model == DEFAULT_MODEL

    def _keep_from_forward(self, texts: Sequence[str], encs: Sequence[Any], starts: Sequence[np.ndarray],
                           keep: Sequence[np.ndarray]) -> tuple[list[np.ndarray], int]:
        """The classifier's tokens' P(keep) from the keep head's, matched by char start (both tokenizers are the
        same MiniLM vocabulary). Tokens the forward did not read (the tail of a sentence longer than the encoder
        window) are scored by the classifier, run on those token runs only (in windows of its length)."""
        out: list[np.ndarray] = []
        runs: list[tuple[int, int, int]] = []  # (document, first token, end token) the classifier must score
        full = self.classifier.max_seq_len - 2
        for d, ((_, offs), st, kp) in enumerate(zip(encs, starts, keep)):
            pos = np.searchsorted(st, offs[:, 0]) if len(st) else np.zeros(len(offs), dtype=np.int64)
            found = (pos < len(st)) & (st[np.minimum(pos, max(0, len(st) - 1))] == offs[:, 0]) if len(st) else \
                np.zeros(len(offs), dtype=bool)
            probs = np.where(found, kp[np.minimum(pos, max(0, len(kp) - 1))] if len(kp) else 0.0, np.nan)
            out.append(probs.astype(np.float32))
            gaps = np.flatnonzero(np.diff(np.concatenate([[0], (~found).astype(np.int8), [0]])))
            for a, b in zip(gaps[::2].tolist(), gaps[1::2].tolist()):
                runs += [(d, lo, min(b, lo + full)) for lo in range(a, b, full)]
        if runs:
            probs = self.classifier.keep_probs([encs[d][0][a:b] for d, a, b in runs],
                                               batch_size=self.options.batch_size)
            for (d, a, b), p in zip(runs, probs):
                out[d][a:b] = p
        return out, len(runs)

    def token_keep_probs(self, texts: Sequence[str]) -> tuple[list[Any], list[np.ndarray], int]:
        """The classifier's P(keep) for every token of each text: (encodings, probabilities, windows read). A text
        that fits one window is read whole; a longer one in sentence-aligned windows of `window_tokens`."""
        opts, clf = self.options, self.classifier
        encs = clf.encode(texts)
        full = clf.max_seq_len - 2
        windows = [sentence_windows(t, offs, full if len(offs) <= full else min(opts.window_tokens, full))
                   for t, (_, offs) in zip(texts, encs)]
        flat = [(d, a, b) for d, ws in enumerate(windows) for a, b in ws]
        probs = clf.keep_probs([encs[d][0][a:b] for d, a, b in flat], batch_size=opts.batch_size)
        tok_probs = [np.zeros(len(ids), dtype=np.float32) for ids, _ in encs]
        for (d, a, b), p in zip(flat, probs):
            tok_probs[d][a:b] = p
        return encs, tok_probs, len(flat)

    def _exact(self, query: str, documents: Sequence[Document], budget: Budget
               ) -> tuple[list[CompressedDocument], dict[str, object]]:
        opts = self.options
        texts = [d.text for d in documents]
        scores, seen = self.unit_scores(query, documents)
        drop = opts.force_tokens if opts.drop_consecutive else ()
        auto: dict[str, object] | None = None
        if budget.is_auto:
            kept, auto = self._auto(texts, scores, budget, bool(seen["query_aware"]), drop)
        else:
            kept = select_units(texts, scores, budget, self.counter, default_rate=DEFAULT_RATE, drop_repeats=drop)
        out = [assemble(d, kept_runs(s.units, k), scores=run_scores(s.units, k, s.score), keep_line_breaks=True)
               for d, s, k in zip(documents, scores, kept)]
        info: dict[str, object] = {
            "mode": "exact", **seen, "words": int(sum(len(s.units) for s in scores)),
            "kept_words": int(sum(k.sum() for k in kept))}
        if auto is not None:
            info["auto"] = auto
        return [o for o in out if o.text], info

    def _auto(self, texts: Sequence[str], scores: Sequence[UnitScores], budget: Budget, query_on: bool,
              drop: Sequence[str]) -> tuple[list[np.ndarray], dict[str, object]]:
        """The auto budget over words: with a question, the words in score order until the calibrated expected
        coverage of the answer's words reaches the target (the guard may keep everything); without one there is
        no evidence to cover, so the previous default rate applies. `max_tokens` caps either."""
        cap = budget.max_tokens
        if not query_on:
            limit = Budget.ratio(DEFAULT_RATE).token_limit(joined_tokens(self.counter, list(texts))) or 1
            kept = select_units(texts, scores, Budget.tokens(min(limit, cap or limit)), self.counter,
                                default_rate=DEFAULT_RATE, drop_repeats=drop)
            return kept, {"coverage": budget.coverage, "expected_coverage": None,
                          "fallback": f"rate={DEFAULT_RATE:g} (no question to cover)"}
        raw = np.concatenate([s.score for s in scores]) if scores else np.zeros(0)
        calibration = self.calibration
        probs = calibration(raw) if calibration is not None else np.clip(raw, 0.0, 1.0)
        lengths = np.concatenate([s.units[:, 1] - s.units[:, 0] for s in scores]) if scores else np.zeros(0)
        # Ties in calibrated probability (isotonic maps are flat in stretches) are broken by the raw score.
        choice = auto_select(probs, lengths.tolist(), budget, order=np.lexsort((np.arange(len(raw)), -raw)).tolist())
        if choice.guard is not None and budget.on_unsure == "keep":
            kept = [np.ones(len(s.units), dtype=bool) for s in scores]
        elif not choice.keep:  # no words at all
            kept = [np.zeros(len(s.units), dtype=bool) for s in scores]
        else:
            floor = float(raw[choice.keep].min()) if choice.keep else float("inf")
            kept = select_units(texts, scores, Budget.score(floor), self.counter, default_rate=DEFAULT_RATE,
                                drop_repeats=drop)
        if cap is not None and joined_tokens(self.counter, _rendered(texts, scores, kept)) > cap:
            kept = select_units(texts, scores, Budget.tokens(cap), self.counter, default_rate=DEFAULT_RATE,
                                drop_repeats=drop)
        flat_kept = np.concatenate(kept) if kept else np.zeros(0, dtype=bool)
        total = float(probs.sum())
        reached = float(probs[flat_kept].sum() / total) if total else 1.0
        return kept, {"coverage": budget.coverage, "expected_coverage": round(reached, 4), "guard": choice.guard,
                      "calibrated": calibration is not None}

    @contextmanager
    def prefetched(self, requests: Sequence[CompressionRequest]) -> Iterator[None]:
        """With a question and EXIT relevance, the relevance forwards of every request run batched together
        (`QueryScorer.score_many`); the `compress` calls inside the context read them."""
        o = self.options
        if o.mode is Mode.REFERENCE or o.query_aware is QueryAware.OFF or o.relevance is not Relevance.EXIT:
            yield
            return
        parsed = [(query, docs) for query, docs in parsed_requests(requests) if query.strip()]
        jobs = [(query, [(d.title, d.text, self._sentences(d)) for d in docs]) for query, docs in parsed]
        memo: dict[_DocKey, tuple[Any, ...]] = {}
        for (query, docs), (_, inputs), rel in zip(parsed, jobs, relevance_scorer().score_many(jobs) if jobs else []):
            for d, (doc, (_, _, spans)) in enumerate(zip(docs, inputs)):
                keep = rel.token_keep[d] if rel.token_keep is not None else None
                memo[(query, doc.id, doc.title, doc.text, tuple(spans))] = (
                    rel.sentences[d], rel.token_starts[d], rel.token_probs[d], keep)
        with _PREFETCHED.holding(self, memo):
            yield

    @property
    def takes_exit_relevance(self) -> bool:
        """Whether this stage can read its relevance from an EXIT stage's forward (`compressors/handoff.py`):
        exact mode, query-aware, EXIT relevance, one pass."""
        o = self.options
        return (o.mode is Mode.EXACT and o.query_aware is not QueryAware.OFF and o.relevance is Relevance.EXIT
                and self.one_pass)

    def using_relevance(self, query: str, kept: Sequence[CompressedDocument], relevance: Mapping[str, Any]
                        ) -> AbstractContextManager[None]:
        """A context in which `compress(query, [k.as_document() for k in kept])` reads its relevance from the
        forward an EXIT stage ran on the original documents (`relevance`: `handoff.DocRelevance` by document id),
        mapped onto the kept text, instead of running its own."""
        from ragzip.compressors.handoff import on_kept_text

        memo: dict[_DocKey, tuple[Any, ...]] = {}
        for k in kept:
            if k.id in relevance:
                spans = self._sentences(k.as_document())
                memo[(query, k.id, k.title, k.text, tuple(spans))] = on_kept_text(k, relevance[k.id], spans)
        return _PREFETCHED.holding(self, memo)

    @staticmethod
    def _sentences(doc: Document) -> list[tuple[int, int]]:
        """The sentence spans the relevance forward scores (none for a blank document)."""
        from ragzip.text import split_sentences

        return split_sentences(doc.text) if doc.text.strip() else []

    def _exit_relevance(self, query: str, documents: Sequence[Document]
                        ) -> tuple[list[list[tuple[int, int]]], Any]:
        """Each document's sentence spans and the EXIT forward's relevance (`QueryRelevance`) for `query`."""
        from ragzip.compressors.lingua2_query import QueryRelevance

        spans = [self._sentences(d) for d in documents]
        memo = _PREFETCHED.get(self)
        if memo is not None:
            hits = [memo.get((query, d.id, d.title, d.text, tuple(s))) for d, s in zip(documents, spans)]
            found = [h for h in hits if h is not None]
            if len(found) == len(hits):
                keep = None if any(h[3] is None for h in found) else [h[3] for h in found]
                return spans, QueryRelevance([h[0] for h in found], [h[1] for h in found], [h[2] for h in found],
                                             keep)
        return spans, relevance_scorer().score(query, [(d.title, d.text, s) for d, s in zip(documents, spans)])

    def _relevance(self, query: str, documents: Sequence[Document], exit_rel: Any = None) -> list[Any]:
        """Per document, a function units [U, 2] -> [U] query relevance in [0, 1] (the coarse stage).

        "exit": every sentence gets the EXIT encoder's probability of helping answer the query, in the context of
        its document; a word inherits its sentence's probability, so answer-bearing sentences keep more words.
        "lexical": query-word overlap (`_query_relevance`). `exit_rel`: `_exit_relevance`'s result, when computed.
        """
        if self.options.relevance is Relevance.LEXICAL:
            qwords = {w for w in re.findall(r"\w+", query.lower()) if w not in _STOP}
            return [(lambda units, t=d.text: _query_relevance(t, units, qwords)) if qwords else None
                    for d in documents]
        from ragzip.compressors.lingua2_query import unit_max

        spans, rel = exit_rel if exit_rel is not None else self._exit_relevance(query, documents)
        share = self.options.answer_share
        out = []
        for d, doc_spans in enumerate(spans):
            if not doc_spans:
                out.append(None)
                continue
            starts = np.array([a for a, _ in doc_spans], dtype=np.int64)
            sent_p = np.asarray(rel.sentences[d], dtype=np.float64)

            def score(units: np.ndarray, st: np.ndarray = starts, sp: np.ndarray = sent_p, d: int = d) -> np.ndarray:
                sentence = sp[np.maximum(0, np.searchsorted(st, units[:, 0], side="right") - 1)]
                answer = unit_max(units, rel.token_starts[d], rel.token_probs[d])
                if len(answer) > 2 and self.options.answer_gap_fill:  # an answer is a span: fill one-word gaps
                    answer[1:-1] = np.maximum(answer[1:-1], np.minimum(answer[:-2], answer[2:]))
                return (1 - share) * sentence + share * answer

            out.append(score)
        return out

    def _forced(self, text: str, units: np.ndarray) -> np.ndarray:
        """Units the user asked to keep (force tokens, digits). Protected structure is not forced: it is kept or
        dropped whole by relevance, so it never crowds the relevant words out of a tight budget."""
        forced = np.zeros(len(units), dtype=bool)
        if self.options.keep_digits:
            forced |= units_touching(_pattern_mask(text, r"\d"), units)
        if self.options.force_tokens:
            pattern = "|".join(re.escape(t) for t in sorted(self.options.force_tokens, key=len, reverse=True))
            forced |= units_touching(_pattern_mask(text, pattern), units)
        return forced


def _rendered(texts: Sequence[str], scores: Sequence[UnitScores], kept: Sequence[np.ndarray]) -> list[str]:
    return [render(t, s.units, k) for t, s, k in zip(texts, scores, kept)]


def _pattern_mask(text: str, pattern: str) -> np.ndarray:
    mask = np.zeros(len(text) + 1, dtype=np.int32)
    for m in re.finditer(pattern, text):
        mask[m.start()] += 1
        mask[m.end()] -= 1
    return np.cumsum(mask[:-1]) > 0


def _unit_prob(units: np.ndarray, offs: np.ndarray, p: np.ndarray, real: np.ndarray, mode: WordProb) -> np.ndarray:
    """[U] unit scores from token probabilities: mean (or first) over the tokens starting inside each unit."""
    if len(units) == 0:
        return np.zeros(0)
    unit_of = np.searchsorted(units[:, 0], offs[:, 0], side="right") - 1  # [T]
    ok = (unit_of >= 0) & real
    unit_of, pv = unit_of[ok], p[ok].astype(np.float64)
    fallback = float(pv.mean()) if len(pv) else 0.5
    counts = np.bincount(unit_of, minlength=len(units))
    if mode is WordProb.FIRST:
        score = np.full(len(units), fallback)
        first_tok = np.unique(unit_of, return_index=True)
        score[first_tok[0]] = pv[first_tok[1]]
        return score
    sums = np.bincount(unit_of, weights=pv, minlength=len(units))
    return np.where(counts > 0, sums / np.maximum(counts, 1), fallback)


def _query_relevance(text: str, units: np.ndarray, qwords: set[str]) -> np.ndarray:
    """[U] in [0, 1]: 1 for a unit naming a query word, else the share of query words in its line or sentence."""
    norm = [re.sub(r"\W", "", text[s:e].lower()) for s, e in units]
    hit = np.array([n in qwords or (len(n) > 3 and any(n.startswith(q[:4]) and len(q) > 3 for q in qwords))
                    for n in norm], dtype=np.float64)
    bounds = [m.end() for m in re.finditer(r"[.!?。！？\n]+", text)]
    sent = np.searchsorted(np.array(bounds, dtype=np.int64), units[:, 0], side="right")
    per_sent = np.bincount(sent, weights=hit) / max(1, len(qwords))
    return np.maximum(hit, np.minimum(1.0, per_sent[sent]) * 0.8)
