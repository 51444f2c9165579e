"""`ragzip compress --engine ray`: the JSONL contract on a Ray cluster (a local one by default).

Records go to a pool of actors (each builds the compressor once) in batches, as JSON text; results come back in
input order and are appended and flushed as they arrive, so the output is the single-process output (same lines,
same order; only the `seconds` timings differ) and an interrupted run resumes with `resume=True`.
"""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

from ragzip.batch import counter_name, iter_jsonl, output_row, plan_resume
from ragzip.budget import Budget, to_budget
from ragzip.errors import ConfigError, InputError, RagzipError, extra_hint

# One batch: [(line number, JSON text, read error)]; one result: (line number, output JSON text, error).
# Lines that failed to parse travel too, so that errors are reported (and --on-error fail stops) in input order.
Batch = list[tuple[int, str | None, str | None]]
Result = tuple[int, str | None, str | None]


class _Worker:
    """Builds the compressor once, then compresses batches of records (plain class; made a Ray actor at run)."""

    def __init__(self, method: str, budget: dict[str, Any], options: dict[str, Any], tokenizer: str | None,
                 device: str | None = None) -> None:
        from ragzip.pipeline import build_compressor
        from ragzip.tokens import get_token_counter

        self.budget = to_budget(budget) or Budget()  # as `Budget.as_dict()` wrote it (auto nests its settings)
        self.options = options
        self.compressor = build_compressor(method, counter=get_token_counter(tokenizer), options=options,
                                           device=device)

    def compress(self, batch: Batch) -> list[Result]:
        out: list[Result] = []
        for lineno, text, problem in batch:
            if text is None:
                out.append((lineno, None, problem or "unreadable line"))
                continue
            try:
                row = output_row(self.compressor, json.loads(text), self.budget, source_line=lineno,
                                 options=self.options)
            except RagzipError as exc:
                out.append((lineno, None, str(exc)))
                continue
            out.append((lineno, json.dumps(row, ensure_ascii=False), None))
        return out


def _batches(records: Iterable[tuple[int, Any, str | None]], size: int) -> Iterator[Batch]:
    batch: Batch = []
    for n, obj, problem in records:
        batch.append((n, None if problem else json.dumps(obj, ensure_ascii=False), problem))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def run_ray(input_path: str | Path, output: str | Path, *, method: str, budget: Budget,
            options: Mapping[str, Any] | None = None, tokenizer: str | None = None, on_error: str = "skip",
            resume: bool = False, address: str | None = None, num_workers: int | None = None,
            batch_size: int = 16, log: TextIO | None = None, device: str | None = None) -> dict[str, int]:
    """Compress every record of `input_path` into `output` on Ray.

    Args:
        method, budget, options, tokenizer: as for `build_compressor` and the single-process CLI.
        on_error: "skip" (report bad lines and go on) or "fail" (stop at the first bad line, raise InputError).
        resume: append to `output`, skipping input lines it already holds.
        address: a Ray cluster address (default: the one this process is connected to, else a new local one).
        num_workers: actors to start (default: the cluster's CPUs).
        batch_size: records per task.
        device: where each worker's models run ("auto", "cpu", "cuda", ...), resolved on the worker.

    Returns:
        Counts: `ok`, `bad`, `skipped` (already done), `tokens_before`, `tokens_after`.

    Raises:
        ConfigError: bad arguments or Ray not installed; InputError: a bad line with on_error="fail".
    """
    if on_error not in ("skip", "fail"):
        raise ConfigError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    try:
        import ray
        from ray.util import ActorPool
    except ImportError as exc:
        raise ConfigError(f"--engine ray needs Ray: {extra_hint('ray')} ({exc})") from None
    log = log or sys.stderr
    # Build once here so that a bad method or option fails fast, before any cluster work.
    probe = _Worker(method, budget.as_dict(), dict(options or {}), tokenizer, device)
    if not budget.kind and probe.compressor.budget is not None:  # a pipeline file's own budget
        budget = probe.compressor.budget
    budget_args = budget.as_dict()
    skip = plan_resume(input_path, output, method=probe.compressor.name, budget=budget,
                       tokenizer=counter_name(probe.compressor), options=options) if resume else set()
    counts = {"ok": 0, "bad": 0, "skipped": len(skip), "tokens_before": 0, "tokens_after": 0}
    todo = ((lineno, obj, problem) for lineno, obj, problem in iter_jsonl(input_path) if lineno not in skip)

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        workers = num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        actor = ray.remote(num_cpus=1)(_Worker)
        # The input is streamed: read only the first batches to know how many actors are worth starting.
        batches = _batches(todo, batch_size)
        first = list(itertools.islice(batches, workers))
        pool = ActorPool([actor.remote(method, budget_args, dict(options or {}), tokenizer, device)
                          for _ in range(max(1, len(first)))])
        with open(output, "a" if resume else "w", encoding="utf-8") as fh:
            results = pool.map(lambda a, b: a.compress.remote(b), itertools.chain(first, batches))
            for batch in results:
                for lineno, row, problem in batch:
                    if problem is not None:
                        _bad(counts, input_path, lineno, problem, on_error, log)
                        continue
                    assert row is not None
                    fh.write(row + "\n")
                    compressed = json.loads(row)["compressed"]
                    counts["ok"] += 1
                    counts["tokens_before"] += compressed["tokens_before"]
                    counts["tokens_after"] += compressed["tokens_after"]
                fh.flush()
    finally:
        if started_here:
            ray.shutdown()
    rate = f"{counts['tokens_after'] / counts['tokens_before']:.3f}" if counts["tokens_before"] else "n/a"
    print(f"{counts['ok']} compressed on Ray, {counts['bad']} bad lines skipped, {counts['skipped']} already done; "
          f"tokens {counts['tokens_before']} -> {counts['tokens_after']} (rate {rate})", file=log)
    return counts


def _bad(counts: dict[str, int], path: str | Path, lineno: int, problem: str, on_error: str, log: TextIO) -> None:
    counts["bad"] += 1
    print(f"{path}:{lineno}: {problem}", file=log)
    if on_error == "fail":
        raise InputError(f"{path}:{lineno}: {problem}")
