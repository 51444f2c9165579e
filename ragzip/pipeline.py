"""Pipelines: compressor stages run in order under one budget, e.g. `crag+exit+lingua2`."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ragzip.budget import Budget, BudgetLike, to_budget
from ragzip.compressors import handoff
from ragzip.compressors.base import (
    CompressionRequest,
    PrefetchMemo,
    RequestLike,
    as_request,
    batch_requests,
    check_budget_kind,
    compress_each,
    fit_to_limit,
    joined_tokens,
    parsed_requests,
)
from ragzip.compressors.registry import COMPRESSORS, canonical_method, get_compressor
from ragzip.contract import DocumentLike, to_documents, to_question
from ragzip.errors import BudgetError, ConfigError
from ragzip.options import parse_options
from ragzip.spans import assemble, compose
from ragzip.text import split_sentences
from ragzip.tokens import TokenCounter, get_token_counter
from ragzip.types import CompressedDocument, CompressionResult, Document, StageStats

# An earlier stage keeps this many times what the next one may keep (the last keeps the final limit): room for
# the finer stages to choose, as LLMLingua's coarse-to-fine control does.
DEFAULT_STAGE_SLACK = 1.5


@dataclass(frozen=True, slots=True)
class StageSpec:
    """One stage: a registered compressor name, its options, and an optional budget of its own."""

    method: str
    options: Mapping[str, Any] = field(default_factory=dict)
    budget: Budget | None = None


def parse_budget(obj: Mapping[str, Any] | None, where: str = "budget") -> Budget | None:
    if not obj:
        return None
    if not isinstance(obj, Mapping):
        raise ConfigError(f"{where} must be an object like {{\"rate\": 0.3}}, got {type(obj).__name__}")
    try:
        return to_budget(obj)
    except BudgetError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def load_pipeline_config(path: str | Path) -> tuple[list[StageSpec], Budget | None, float]:
    """Read a pipeline file: `{"stages": [{"method", "options"?, "budget"?}, ...], "budget"?: {...},
    "stage_slack"?: 1.5}` (JSON). Returns the stages, the overall budget and the stage slack."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read pipeline config {path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list) or not data["stages"]:
        raise ConfigError(f"{path}: expected an object with a non-empty 'stages' list")
    specs = []
    for i, st in enumerate(data["stages"]):
        if not isinstance(st, dict) or not isinstance(st.get("method"), str):
            raise ConfigError(f"{path}: stage {i} needs a string 'method'")
        unknown = set(st) - {"method", "options", "budget"}
        if unknown:
            raise ConfigError(f"{path}: stage {i} has unknown keys {sorted(unknown)}; valid: budget, method, options")
        specs.append(StageSpec(st["method"], dict(st.get("options") or {}),
                               parse_budget(st.get("budget"), f"{path}: stage {i} budget")))
    unknown = set(data) - {"stages", "budget", "stage_slack"}
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; valid: budget, stage_slack, stages")
    slack = data.get("stage_slack", DEFAULT_STAGE_SLACK)
    if isinstance(slack, bool) or not isinstance(slack, (int, float)) or not 1.0 <= slack <= 100.0:
        raise ConfigError(f"{path}: stage_slack must be a number in [1, 100], got {slack!r}")
    return specs, parse_budget(data.get("budget"), f"{path}: budget"), float(slack)


def _min_keep(documents: Sequence[Document]) -> list[CompressedDocument]:
    """The smallest non-empty context: the first sentence of the first non-empty document."""
    for doc in documents:
        spans = split_sentences(doc.text)
        if spans:
            return [assemble(doc, [spans[0]])]
    return []


class Pipeline:
    """Runs compressors in order under one budget.

    The limit is computed from the token count of the ORIGINAL context (joined as `CompressionResult.text` is),
    and `count(result.text) <= limit` holds for the whole pipeline. With a token limit, stage i of n (unless it has
    a budget of its own) may keep `limit * stage_slack ** (n - 1 - i)` tokens: the last stage the limit itself, each
    earlier one a little more, so the later, finer stages have something to choose from and the pipeline fills its
    budget. Each stage's budget and where it came from are in its stats (`budget`, `budget_source`).
    With a threshold (or no) budget, earlier stages use their defaults and the last stage gets the budget.

    Example:
        >>> pipe = build_compressor("exit+lingua2")
        >>> result = pipe.compress("who wrote Hamlet?", docs, Budget.ratio(0.3))
    """

    def __init__(self, stages: Sequence[Any], *, counter: TokenCounter, stage_budgets: Sequence[Budget | None] = (),
                 budget: Budget | None = None, stage_slack: float = DEFAULT_STAGE_SLACK):
        if not stages:
            raise ConfigError("a pipeline needs at least one stage")
        self.stages = list(stages)
        self.stage_budgets = list(stage_budgets) or [None] * len(self.stages)
        if len(self.stage_budgets) != len(self.stages):
            raise ConfigError("one budget (or None) per stage")
        if not 1.0 <= stage_slack <= 100.0:
            raise ConfigError(f"stage_slack must be in [1, 100], got {stage_slack}")
        self.counter = counter
        self.budget = budget  # used when compress() is given none (a pipeline file's own budget)
        self.stage_slack = stage_slack
        self.name = "+".join(s.name for s in self.stages)

    @classmethod
    def from_specs(cls, specs: Sequence[StageSpec], *, counter: TokenCounter | None = None,
                   budget: Budget | None = None, stage_slack: float = DEFAULT_STAGE_SLACK,
                   device: str | None = None) -> Pipeline:
        """Build the stages; `device` goes to every model-backed stage whose options do not name one."""
        counter = counter or get_token_counter(None)
        stages = [get_compressor(s.method, counter=counter, **_with_device(s, device)) for s in specs]
        return cls(stages, counter=counter, stage_budgets=[s.budget for s in specs], budget=budget,
                   stage_slack=stage_slack)

    def _auto_stages(self) -> list[int]:
        """The stages an auto budget is shared among: those whose own default is auto (a calibrated method with its
        default options: not EXIT with a `threshold` option, not lingua2's reference mode) and that have no budget
        of their own."""
        return [i for i, (stage, own) in enumerate(zip(self.stages, self.stage_budgets))
                if own is None and "auto" in getattr(stage, "budget_kinds", ())
                and getattr(getattr(stage, "default_budget", None), "is_auto", False)]

    def default_budget(self) -> Budget:
        """What a call without a budget gets: this pipeline's own budget, else a single stage's own default (auto,
        a threshold, llmlingua's rate), else auto when a stage shares it."""
        if self.budget is not None:
            return self.budget
        if len(self.stages) == 1:
            own = getattr(self.stages[0], "default_budget", None)
            return own if isinstance(own, Budget) else Budget()
        return Budget.auto() if self._auto_stages() else Budget()

    def _stage_budget(self, i: int, budget: Budget, limit: int | None, tokens_before: int) -> tuple[Budget, str]:
        own, last = self.stage_budgets[i], len(self.stages) - 1
        if own is not None:
            return own, "own"
        if getattr(self.stages[i], "keeps_everything", False):
            return Budget(), "keeps everything"
        if budget.is_auto:
            # Each stage keeps what it keeps with its own coverage; the evidence reaching the reader is the product,
            # so k auto stages each get coverage ** (1 / k). A cap (max_tokens) is shared as a token cap would be.
            shared = self._auto_stages()
            if i not in shared:
                return Budget(), "default"
            coverage = float(budget.coverage or 1.0) ** (1.0 / len(shared))
            cap = None if limit is None else (
                max(1, limit) if i == last else self._derived_cap(i, limit, tokens_before))
            return Budget(coverage=max(1e-6, round(coverage, 6)), max_tokens=cap,
                          min_rate=budget.min_rate if i == shared[-1] else None,
                          on_unsure=budget.on_unsure), "auto share"
        if limit is None:
            return (budget, "final") if i == last else (Budget(), "default")
        if limit == 0:
            return Budget(), "empty input"
        if i == last:
            # A single stage takes the budget as given (the same limit on the same input; a method whose rate
            # means something of its own, as lingua2's reference mode, keeps that meaning).
            return (budget, "final") if i == 0 else (Budget.tokens(limit), "final")
        return Budget.tokens(self._derived_cap(i, limit, tokens_before)), "derived"

    def _derived_cap(self, i: int, limit: int, tokens_before: int) -> int:
        """An earlier stage's token cap: `limit * stage_slack^(stages after it)`, at most the input, at least 1."""
        return max(1, min(tokens_before, math.ceil(limit * self.stage_slack ** (len(self.stages) - 1 - i))))

    def compress(self, query: str | None, documents: Sequence[DocumentLike], budget: BudgetLike = None, *,
                 input_tokens: Sequence[int] | None = None, rate: float | None = None,
                 target_tokens: int | None = None, threshold: float | None = None,
                 coverage: float | None = None) -> CompressionResult:
        """Compress `documents` (as `RagZip.compress` takes them); the budget as `ragzip.budget.to_budget` takes
        it, else this pipeline's own budget, else the default."""
        given = to_budget(budget, rate=rate, target_tokens=target_tokens, threshold=threshold, coverage=coverage)
        budget = given if given is not None and given.kind else self.default_budget()
        query, documents = to_question(query), to_documents(documents)
        start = time.perf_counter()
        # Counted once here; every stage then counts only its output, which is the next stage's input.
        counts = list(input_tokens) if input_tokens is not None else self.counter.count_batch(
            [d.text for d in documents])
        tokens_before = joined_tokens(self.counter, [d.text for d in documents], counts)
        if budget.is_auto and not self._auto_stages():
            raise BudgetError(f"{self.name!r} does not take an auto budget (no calibrated stage); use rate or "
                              f"target_tokens")
        limit = budget.token_limit(tokens_before)
        current = [replace(assemble(d, [(0, len(d.text))]), tokens=n) for d, n in zip(documents, counts)]
        stats: list[StageStats] = []
        shared = len(self.stages) > 1 and handoff.pairs(self.stages[0], self.stages[1], query)
        relevance: dict[str, Any] = {}
        for i, stage in enumerate(self.stages):
            stage_budget, source = self._stage_budget(i, budget, limit, tokens_before)
            live = [c for c in current if c.text.strip()]
            inputs = [c.as_document() for c in live]
            context: AbstractContextManager[None] = nullcontext()
            if shared and i == 0:  # one forward for the EXIT stage and the lingua2 stage after it
                found = self._shared_relevance(query, inputs)
                relevance = {d.id: r for d, r in zip(inputs, found)}
                context = stage.using_scores(query, inputs, found)
            elif shared and i == 1:
                context = stage.using_relevance(query, live, relevance)
            with context:
                result = stage.compress(query, inputs, stage_budget, input_tokens=[c.tokens or 0 for c in live])
            kept = list(result.documents)
            info = dict(result.stages[0].info) if len(result.stages) == 1 else {}
            info.update(budget=stage_budget.describe(), budget_source=source)
            if not kept and inputs:
                kept = _min_keep(inputs)
                info["fallback"] = "min_keep"
            kept = self._counted(kept)
            by_id = {c.id: c for c in current}
            current = [replace(compose(by_id[k.id], k), tokens=k.tokens) if k.id in by_id else k for k in kept]
            stats.append(StageStats(stage.name, result.tokens_before,
                                    joined_tokens(self.counter, [c.text for c in current],
                                                  [c.tokens or 0 for c in current]), result.seconds, info))
        # The cap holds whatever a stage did (a plug-in stage, the min_keep fallback).
        everything = all(getattr(s, "keeps_everything", False) for s in self.stages)
        current, dropped = fit_to_limit([c for c in current if c.text.strip()], None if everything else limit,
                                        self.counter)
        if dropped:
            stats[-1] = replace(stats[-1], info={**stats[-1].info, "fit_dropped": dropped})
        current = self._counted(current)
        tokens_after = joined_tokens(self.counter, [c.text for c in current], [c.tokens or 0 for c in current])
        return CompressionResult(self.name, tuple(current), tokens_before, tokens_after,
                                 time.perf_counter() - start, tuple(stats),
                                 {d.id: n for d, n in zip(documents, counts)}, budget.as_dict())

    def _counted(self, docs: list[CompressedDocument]) -> list[CompressedDocument]:
        """`docs` with token counts; only pieces a stage left uncounted (a plug-in compressor, the fallback) are
        counted here."""
        missing = [i for i, d in enumerate(docs) if d.tokens is None]
        if not missing:
            return docs
        for i, n in zip(missing, self.counter.count_batch([docs[i].text for i in missing])):
            docs[i] = replace(docs[i], tokens=n)
        return docs

    def prefetched(self, requests: Sequence[CompressionRequest]) -> AbstractContextManager[None]:
        """The first stage sees the requests' own documents, so its model work is batched across them (later
        stages see what the stage before them kept, one request at a time); an EXIT stage followed by lingua2
        batches their one shared forward."""
        if len(self.stages) > 1 and handoff.stages_pair(self.stages[0], self.stages[1]):
            return self._prefetch_shared(requests)
        first = getattr(self.stages[0], "prefetched", None)
        return first(requests) if first is not None else nullcontext()

    @contextmanager
    def _prefetch_shared(self, requests: Sequence[CompressionRequest]) -> Any:
        from ragzip.compressors.exit import candidate_spans

        jobs = [(q, [d for d in docs if d.text.strip()]) for q, docs in parsed_requests(requests) if q.strip()]
        memo = {(q, d.title, d.text): r for (q, docs), rels in zip(jobs, handoff.score_many(jobs, candidate_spans)
                                                                    if jobs else []) for d, r in zip(docs, rels)}
        with _SHARED.holding(self, memo):
            yield

    def _shared_relevance(self, query: str, inputs: Sequence[Document]) -> list[Any]:
        """The shared forward's relevance of the EXIT stage's inputs: from a batch's prefetch, else run now."""
        from ragzip.compressors.exit import candidate_spans

        memo = _SHARED.get(self) or {}
        found = [memo.get((query, d.title, d.text)) for d in inputs]
        if all(r is not None for r in found):
            return found
        return handoff.score(query, inputs, candidate_spans)

    def compress_many(self, requests: Sequence[RequestLike], *, return_exceptions: bool = False) -> list[Any]:
        """`compress` on several independent requests with the first stage's forwards batched across them (see
        `BaseCompressor.compress_many`)."""
        batch = [as_request(r) for r in requests]
        with self.prefetched(batch):
            return compress_each(self.compress, batch, return_exceptions=return_exceptions)

    def compress_batch(self, queries: Sequence[str | None], documents: Sequence[Sequence[DocumentLike]],
                       budget: BudgetLike = None) -> list[CompressionResult]:
        return self.compress_many(batch_requests(queries, documents, budget))


# Per pipeline, the shared EXIT/lingua2 forward `prefetched` ran for a batch: (query, title, text) -> DocRelevance.
_SHARED = PrefetchMemo("pipeline_shared_relevance")


def _with_device(spec: StageSpec, device: str | None) -> dict[str, Any]:
    options = dict(spec.options)
    cls = COMPRESSORS.get(spec.method)
    takes_device = cls is not None and dataclasses.is_dataclass(cls.Options) and any(
        f.name == "device" for f in dataclasses.fields(cls.Options))
    if device is not None and takes_device:
        options.setdefault("device", device)
    return options


def method_specs(method: str, options: Mapping[str, Any] | None = None
                 ) -> tuple[list[StageSpec], Budget | None, float]:
    """The stages `method` names ('exit', 'crag+exit', or a JSON pipeline config's path), each with its options,
    and the config's own budget and slack: what `build_compressor` builds and `check_method` checks. Options apply
    to a single method; for '+'-joined methods use `{stage_name: {...}}` or a config file."""
    options = dict(options or {})
    if method.endswith(".json") or Path(method).is_file():
        if options:
            raise ConfigError("options for a pipeline config file go in the file's stages")
        return load_pipeline_config(method)
    names = canonical_method(method).split("+")
    if len(names) == 1:
        return [StageSpec(names[0], options)], None, DEFAULT_STAGE_SLACK
    flat = sorted(k for k, v in options.items() if not isinstance(v, Mapping))
    if flat:
        raise ConfigError(f"options {flat} are ambiguous for a multi-stage method; use a pipeline config file")
    return ([StageSpec(n, dict(options[n]) if isinstance(options.get(n), Mapping) else {}) for n in names], None,
            DEFAULT_STAGE_SLACK)


def check_method(method: str, options: Mapping[str, Any] | None = None, budget: Budget | None = None) -> None:
    """What `build_compressor(method, options=options)` and a compression under `budget` would refuse, found
    without loading a model: unknown names, unknown or malformed options, a budget kind the method does not take.
    For components that should fail when they are built, not on their first query.

    Raises:
        ConfigError / BudgetError: as `build_compressor` and `compress` would.
    """
    specs, _, _ = method_specs(method, options)
    for spec in specs:
        if spec.method not in COMPRESSORS:
            raise ConfigError(f"unknown compressor {spec.method!r}; valid: {sorted(COMPRESSORS)}")
        parse_options(COMPRESSORS[spec.method].Options, {k: v for k, v in spec.options.items() if k != "device"},
                      owner=f"compressor {spec.method!r}")
    if budget is not None and budget.is_auto:
        if not any("auto" in COMPRESSORS[s.method].budget_kinds for s in specs if s.budget is None):
            raise BudgetError(f"{method!r} does not take an auto budget (no calibrated stage); use rate or "
                              f"target_tokens")
    elif budget is not None:
        check_budget_kind(specs[-1].method, budget, COMPRESSORS[specs[-1].method].budget_kinds)


def build_compressor(method: str, *, counter: TokenCounter | None = None,
                     options: Mapping[str, Any] | None = None, device: str | None = None) -> Pipeline:
    """A pipeline for `method` (see `method_specs`). `device` ("auto", "cpu", "cuda", ...) goes to every
    model-backed stage whose options do not name one."""
    specs, budget, slack = method_specs(method, options)
    return Pipeline.from_specs(specs, counter=counter, budget=budget, stage_slack=slack, device=device)


__all__ = ["Pipeline", "StageSpec", "build_compressor", "check_method", "load_pipeline_config", "method_specs",
           "parse_budget"]
