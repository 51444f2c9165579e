"""Pipelines: compressor stages run in order under one budget, e.g. `crag+exit+lingua2`."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ragzip.budget import Budget
from ragzip.compressors.registry import get_compressor
from ragzip.errors import ConfigError
from ragzip.spans import assemble, compose
from ragzip.text import split_sentences
from ragzip.tokens import TokenCounter, get_token_counter
from ragzip.types import CompressedDocument, CompressionResult, Document, StageStats


@dataclass(frozen=True, slots=True)
class StageSpec:
    """One stage: a registered compressor name, its options, and an optional budget of its own."""

    method: str
    options: Mapping[str, Any] = field(default_factory=dict)
    budget: Budget | None = None


def parse_budget(obj: Mapping[str, Any] | None) -> Budget | None:
    if not obj:
        return None
    unknown = set(obj) - {"rate", "target_tokens", "threshold"}
    if unknown:
        raise ConfigError(f"unknown budget keys {sorted(unknown)}; valid: ['rate', 'target_tokens', 'threshold']")
    return Budget(**dict(obj))


def load_pipeline_config(path: str | Path) -> tuple[list[StageSpec], Budget | None]:
    """Read a pipeline file: `{"stages": [{"method", "options"?, "budget"?}, ...], "budget"?: {...}}` (JSON)."""
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
        specs.append(StageSpec(st["method"], dict(st.get("options") or {}), parse_budget(st.get("budget"))))
    return specs, parse_budget(data.get("budget"))


def _min_keep(documents: Sequence[Document]) -> list[CompressedDocument]:
    """The smallest non-empty context: the first sentence of the first non-empty document."""
    for doc in documents:
        spans = split_sentences(doc.text)
        if spans:
            return [assemble(doc, [spans[0]])]
    return []


class Pipeline:
    """Runs compressors in order. Earlier stages use their own defaults (or their own budget); the last stage gets
    the overall token limit, computed from the ORIGINAL token count, so the cap holds for the whole pipeline.

    Example:
        >>> pipe = build_compressor("exit+lingua2")
        >>> result = pipe.compress("who wrote Hamlet?", docs, Budget.ratio(0.3))
    """

    def __init__(self, stages: Sequence[Any], *, counter: TokenCounter, stage_budgets: Sequence[Budget | None] = ()):
        if not stages:
            raise ConfigError("a pipeline needs at least one stage")
        self.stages = list(stages)
        self.stage_budgets = list(stage_budgets) or [None] * len(self.stages)
        if len(self.stage_budgets) != len(self.stages):
            raise ConfigError("one budget (or None) per stage")
        self.counter = counter
        self.name = "+".join(s.name for s in self.stages)

    @classmethod
    def from_specs(cls, specs: Sequence[StageSpec], *, counter: TokenCounter | None = None) -> Pipeline:
        counter = counter or get_token_counter(None)
        stages = [get_compressor(s.method, counter=counter, **dict(s.options)) for s in specs]
        return cls(stages, counter=counter, stage_budgets=[s.budget for s in specs])

    def compress(self, query: str, documents: Sequence[Document], budget: Budget | None = None, *,
                 input_tokens: Sequence[int] | None = None) -> CompressionResult:
        budget = budget or Budget()
        start = time.perf_counter()
        documents = list(documents)
        # Counted once here; every stage then counts only its output, which is the next stage's input.
        counts = list(input_tokens) if input_tokens is not None else self.counter.count_batch(
            [d.text for d in documents])
        tokens_before = sum(counts)
        limit = budget.token_limit(tokens_before)
        current = [replace(assemble(d, [(0, len(d.text))]), tokens=n) for d, n in zip(documents, counts)]
        stats: list[StageStats] = []
        for i, (stage, own) in enumerate(zip(self.stages, self.stage_budgets)):
            is_last = i == len(self.stages) - 1
            stage_budget = own or (Budget.tokens(limit) if (is_last and limit) else (budget if is_last else Budget()))
            if limit == 0:
                stage_budget = Budget()
            live = [c for c in current if c.text]
            inputs = [c.as_document() for c in live]
            result = stage.compress(query, inputs, stage_budget, input_tokens=[c.tokens or 0 for c in live])
            kept = list(result.documents)
            info = dict(result.stages[0].info) if len(result.stages) == 1 else {}
            if not kept and inputs:
                kept = _min_keep(inputs)
                info["fallback"] = "min_keep"
            kept = self._counted(kept)
            by_id = {c.id: c for c in current}
            current = [replace(compose(by_id[k.id], k), tokens=k.tokens) if k.id in by_id else k for k in kept]
            stats.append(StageStats(stage.name, result.tokens_before, sum(c.tokens or 0 for c in current),
                                    result.seconds, info))
        tokens_after = sum(c.tokens or 0 for c in current)
        return CompressionResult(self.name, tuple(current), tokens_before, tokens_after,
                                 time.perf_counter() - start, tuple(stats),
                                 {d.id: n for d, n in zip(documents, counts)})

    def _counted(self, docs: list[CompressedDocument]) -> list[CompressedDocument]:
        """`docs` with token counts; only pieces a stage left uncounted (a plug-in compressor, the fallback) are
        counted here."""
        missing = [i for i, d in enumerate(docs) if d.tokens is None]
        for i, n in zip(missing, self.counter.count_batch([docs[i].text for i in missing])):
            docs[i] = replace(docs[i], tokens=n)
        return docs

    def compress_batch(self, queries: Sequence[str], documents: Sequence[Sequence[Document]],
                       budget: Budget | None = None) -> list[CompressionResult]:
        if len(queries) != len(documents):
            raise ConfigError(f"{len(queries)} queries but {len(documents)} document lists")
        return [self.compress(q, d, budget) for q, d in zip(queries, documents)]


def build_compressor(method: str, *, counter: TokenCounter | None = None,
                     options: Mapping[str, Any] | None = None) -> Pipeline:
    """A pipeline for `method` ('exit', 'crag+exit', or a path to a JSON pipeline config). Options apply to every
    stage that is a single method; for '+'-joined methods use `{stage_name: {...}}` or a config file."""
    options = dict(options or {})
    if method.endswith(".json") or Path(method).is_file():
        specs, _ = load_pipeline_config(method)
        return Pipeline.from_specs(specs, counter=counter)
    names = method.split("+")
    if len(names) == 1:
        return Pipeline.from_specs([StageSpec(method, options)], counter=counter)
    per_stage = {n: dict(options.get(n, {})) if isinstance(options.get(n), Mapping) else {} for n in names}
    flat = {k: v for k, v in options.items() if not isinstance(v, Mapping)}
    if flat:
        raise ConfigError(f"options {sorted(flat)} are ambiguous for a multi-stage method; use a pipeline config file")
    return Pipeline.from_specs([StageSpec(n, per_stage[n]) for n in names], counter=counter)


__all__ = ["Pipeline", "StageSpec", "build_compressor", "load_pipeline_config", "parse_budget"]
