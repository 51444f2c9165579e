"""The `ragzip` command line: compress, index, ask, demo, eval, serve, kv."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from ragzip.batch import (
    ResumePlan,
    check_paths,
    counter_name,
    iter_jsonl,
    open_output,
    output_rows,
    plan_resume,
    read_corpus,
)
from ragzip.budget import Budget
from ragzip.errors import ConfigError, InputError, RagzipError, extra_hint
from ragzip.kernels.errors import KernelError
from ragzip.kvstore.cli import app as kv_app
from ragzip.pipeline import build_compressor
from ragzip.progress import Progress
from ragzip.registry import VERBOSE_ENV
from ragzip.threads import process_defaults
from ragzip.tokens import get_token_counter

# Plain help (click's): flags without a type, no boxes to break in logs.
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="RAG context compression middleware.")
# Messages never hard-wrap (a summary line stays one line in logs); tables are wide when piped, else the terminal's.
err = Console(stderr=True, soft_wrap=True)
out = Console() if sys.stdout.isatty() else Console(width=160)
DeviceOpt = typer.Option("auto", "--device", envvar="RAGZIP_DEVICE",
                         help="Where models run: auto (cuda when available, else cpu), cpu, cuda, cuda:N.")


def _version(value: bool) -> None:
    if value:
        from ragzip import __version__

        typer.echo(f"ragzip {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_version, help="Print the version."),
    verbose: bool = typer.Option(False, "--verbose", help="Show third-party progress bars and info logs "
                                                          "(transformers, huggingface_hub)."),
) -> None:
    """RAG context compression middleware."""

EVAL_SUITES: dict[str, str] = {
    "extractive": "ragzip.eval.suites.extractive:run",
    "lingua2": "ragzip.eval.suites.lingua2:run",
    "crag": "ragzip.eval.suites.crag:run",
    "kvcodec": "ragzip.eval.suites.kvcodec:run",
    "blend": "ragzip.eval.suites.blend:run",
    "baselines": "ragzip.eval.suites.baselines:run",
    "budgets": "ragzip.eval.suites.budgets:run",
    "fidelity": "ragzip.eval.suites.fidelity:run",
    "speed": "ragzip.eval.suites.speed:run",
}


def _budget(rate: float | None, target_tokens: int | None, threshold: float | None, coverage: float | None = None,
            *, default: Budget | None = None) -> Budget:
    """The flags' budget; with none given, `default` (the method's default: a pipeline file's own budget, or auto)
    or the default budget."""
    given = Budget(rate=rate, target_tokens=target_tokens, threshold=threshold, coverage=coverage)
    return given if given.kind or default is None else default


def parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """`key=value` pairs; `stage.key=value` nests under the stage name (for pipelines)."""
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"option {pair!r} is not of the form key=value")
        if "." in key:
            stage, _, sub = key.partition(".")
            options.setdefault(stage, {})[sub] = value
        else:
            options[key] = value
    return options


def _fail(exc: Exception) -> None:
    err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def compress(
    input_path: str = typer.Argument(..., metavar="INPUT", help="Input JSONL (the CLI contract); .gz or - (stdin)."),
    output: str = typer.Option(..., "-o", "--output", help="Output JSONL; a .gz name is gzipped, - is stdout."),
    method: str = typer.Option("exit", "--method", "-m", help="Compressor, 'a+b' pipeline, or pipeline JSON file."),
    rate: float = typer.Option(None, help="Fraction of tokens to keep (0, 1]."),
    target_tokens: int = typer.Option(None, "--target-tokens", help="Hard cap on kept tokens per record."),
    threshold: float = typer.Option(None, help="Score threshold (compressor-specific)."),
    coverage: float = typer.Option(None, help="auto budget's target: the calibrated expected share of the needed "
                                              "evidence kept (0, 1]; the default budget is auto at 0.95."),
    option: list[str] = typer.Option(None, "--option", "-O", help="Compressor option key=value (repeatable)."),
    scorer: str = typer.Option(None, help="EXIT scorer: encoder | causal-lm."),
    query_aware: bool = typer.Option(None, "--query-aware/--no-query-aware",
                                     help="LLMLingua-2 query-aware mode (default: on when the record has a question)."),
    tokenizer: str = typer.Option(None, help="Tokenizer that counts budgets (default: the local LLM's)."),
    on_error: str = typer.Option("skip", help="Bad input lines: 'skip' (report and go on) or 'fail'."),
    resume: bool = typer.Option(False, help="Append to OUTPUT, skipping the input lines it already holds (checked: "
                                            "same input records, method and budget)."),
    engine: str = typer.Option("local", help="local | ray"),
    batch_size: int = typer.Option(16, "--batch-size", help="Records compressed together (their encoder forwards "
                                                            "batched; 1: one at a time)."),
    device: str = DeviceOpt,
) -> None:
    """Compress every record of a JSONL file, streamed, a batch of records at a time (see README: CLI contract)."""
    try:
        if on_error not in ("skip", "fail"):
            raise ConfigError(f"--on-error must be 'skip' or 'fail', got {on_error!r}")
        if not 1 <= batch_size <= 1024:
            raise ConfigError(f"--batch-size must be in [1, 1024], got {batch_size}")
        check_paths(input_path, output, resume=resume)
        options = parse_options(option)
        if scorer is not None:
            options["scorer"] = scorer
        if query_aware is not None:
            options["query_aware"] = query_aware
        if engine == "ray":
            from ragzip.batch_ray import run_ray  # type: ignore[import-not-found]

            run_ray(input_path, output, method=method, budget=_budget(rate, target_tokens, threshold, coverage),
                    options=options, tokenizer=tokenizer, on_error=on_error, resume=resume, device=device)
            return
        if engine != "local":
            raise ConfigError(f"--engine must be 'local' or 'ray', got {engine!r}")
        compressor = build_compressor(method, counter=get_token_counter(tokenizer), options=options, device=device)
        budget = _budget(rate, target_tokens, threshold, coverage, default=compressor.default_budget())
        skip = plan_resume(input_path, output, method=compressor.name, budget=budget,
                           tokenizer=counter_name(compressor), options=options) if resume else ResumePlan()
        num_ok = num_bad = tokens_in = tokens_out = 0
        pending: list[tuple[int, Any]] = []  # parsed records waiting for their batch (at most batch_size)

        def bad(lineno: int, exc: Exception) -> None:
            nonlocal num_bad
            num_bad += 1
            err.print(f"[yellow]{input_path}:{lineno}:[/yellow] {exc}", highlight=False, soft_wrap=True)
            if on_error == "fail":
                raise typer.Exit(1) from None

        def flush(fh: Any) -> None:
            nonlocal num_ok, tokens_in, tokens_out
            rows = output_rows(compressor, pending, budget, options=options)
            for (lineno, _), row in zip(pending, rows):
                if isinstance(row, RagzipError):
                    bad(lineno, row)
                    continue
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                num_ok += 1
                tokens_in += row["compressed"]["tokens_before"]
                tokens_out += row["compressed"]["tokens_after"]
            fh.flush()
            pending.clear()

        # Streamed (the number of records is not known); records are compressed `batch_size` at a time, their
        # encoder forwards batched together, and written in input order.
        with open_output(output, append=resume) as fh, Progress("compressing") as bar:
            for lineno, obj, problem in iter_jsonl(input_path):
                bar.advance(1, f"line {lineno}, {num_bad} bad")
                if lineno in skip:
                    continue
                if problem:
                    flush(fh)  # rows stay in input order
                    bad(lineno, InputError(problem))
                    continue
                pending.append((lineno, obj))
                if len(pending) >= batch_size:
                    flush(fh)
            flush(fh)
    except RagzipError as exc:
        _fail(exc)
    rate_txt = f"{tokens_out / tokens_in:.3f}" if tokens_in else "n/a"
    err.print(f"{num_ok} compressed, {num_bad} bad lines skipped, {len(skip)} already done; "
              f"tokens {tokens_in} -> {tokens_out} (rate {rate_txt})", highlight=False, soft_wrap=True)
    if num_bad and num_ok == 0 and not len(skip):
        raise typer.Exit(1)


@app.command()
def index(
    input_path: Path = typer.Argument(..., exists=True, dir_okay=False, help="JSONL of {id, title?, text} or records."),
    output: Path = typer.Option(..., "-o", "--output", help="Index folder."),
    kind: str = typer.Option("flat", help="flat (exact) | hnsw (approximate)."),
    chunk_tokens: int = typer.Option(256, help="Chunk size in tokens."),
    embedder: str = typer.Option(None, help="Sentence embedder (default: packaged all-MiniLM-L6-v2)."),
    append: bool = typer.Option(False, help="Add to an existing index."),
    device: str = DeviceOpt,
) -> None:
    """Chunk, embed and index documents."""
    from ragzip.retrieval.index import VectorIndex
    from ragzip.retrieval.retriever import Retriever

    try:
        docs = read_corpus(input_path)
        if append and (output / "meta.json").exists():
            retriever = Retriever(index=VectorIndex.load(output), chunk_tokens=chunk_tokens, device=device)
        else:
            retriever = Retriever(embedder=embedder, kind=kind, chunk_tokens=chunk_tokens, device=device)
        start = time.perf_counter()
        fresh = retriever.unindexed(docs)
        added = retriever.add(fresh)
        retriever.save(output)
    except RagzipError as exc:
        _fail(exc)
    skipped = f", {len(docs) - len(fresh)} already indexed as they are" if len(fresh) < len(docs) else ""
    err.print(f"indexed {len(fresh)} documents as {added} chunks in {time.perf_counter() - start:.1f}s{skipped} "
              f"({len(retriever.index)} chunks in {output})")


@app.command()
def ask(
    question: str = typer.Argument(...),
    index_path: Path = typer.Option(..., "--index", exists=True, file_okay=False, help="Index folder."),
    k: int = typer.Option(5, "-k", "--k", help="Chunks to retrieve."),
    method: str = typer.Option("exit", "--method", "-m"),
    rate: float = typer.Option(None),
    target_tokens: int = typer.Option(None, "--target-tokens"),
    threshold: float = typer.Option(None),
    coverage: float = typer.Option(None, help="auto budget's coverage target (the default budget is auto at 0.95)."),
    option: list[str] = typer.Option(None, "--option", "-O"),
    llm: str = typer.Option(None, help="Local LLM (default: embedded SmolLM2-135M-Instruct)."),
    max_new_tokens: int = typer.Option(48),
    kv_store: str = typer.Option(None, "--kv-store", help="Answer from chunk KV caches reused from this store "
                                 "(memory | disk:/path | path | redis://...; fill it with `ragzip kv warm`); "
                                 "caches hit when the chunks are sent as stored, e.g. with --method none."),
    kv_mode: str = typer.Option("auto", "--kv-mode", help="With --kv-store: auto (blend only where the model is "
                                "qualified, else exact prefix reuse: answers as full prefill) | blend | prefix | "
                                "reuse | full."),
    kv_ratio: float = typer.Option(None, "--kv-ratio", min=0.0, max=1.0, help="With --kv-mode blend: the recompute "
                                   "ratio (default 0.15)."),
    device: str = DeviceOpt,
) -> None:
    """Retrieve, compress and answer with the local LLM (streamed)."""
    from ragzip.answer import Answerer
    from ragzip.engine import LocalEngine
    from ragzip.retrieval.retriever import Retriever

    try:
        compressor = build_compressor(method, counter=get_token_counter(None), options=parse_options(option),
                                      device=device)
        engine: Any = LocalEngine(llm, device=device)
        if kv_store is not None:
            from ragzip.kernels.blend import BlendConfig
            from ragzip.kv_engine import KVReuseEngine
            from ragzip.kvstore.stores.base import open_store

            blend = None if kv_ratio is None else BlendConfig(recompute_ratio=kv_ratio)
            engine = KVReuseEngine(engine.model, engine.tokenizer, store=open_store(kv_store), mode=kv_mode,
                                   blend=blend)
        answerer = Answerer(engine, compressor, retriever=Retriever.load(index_path, device=device), k=k)
        result = answerer.context(question, budget=_budget(rate, target_tokens, threshold, coverage,
                                                            default=compressor.default_budget()))
    except (RagzipError, KernelError) as exc:
        _fail(exc)
    rate_txt = "n/a" if result.rate is None else f"{result.rate:.2f}"
    err.print(f"[dim]{len(result.input_tokens)} chunks, tokens {result.tokens_before} -> {result.tokens_after} "
              f"({rate_txt}) by {result.method} in {result.seconds:.2f}s[/dim]")
    for delta in answerer.stream(question, result, max_new_tokens=max_new_tokens):
        out.print(delta, end="")
    out.print()
    if kv_store is not None:
        err.print(f"kv {json.dumps(engine.stats.as_dict())}", markup=False, highlight=False, style="dim")


@app.command()
def demo(
    method: str = typer.Option(None, "--method", "-m", help="Compressor or pipeline to demo (default: exit)."),
    rate: float = typer.Option(None, help="Fraction of tokens to keep (default: the auto budget)."),
    target_tokens: int = typer.Option(None, "--target-tokens", help="Token cap per question (default: auto)."),
    coverage: float = typer.Option(None, help="auto budget's coverage target (default 0.95)."),
    llm: str = typer.Option(None, help="Local LLM that answers (default: Qwen2.5-Coder-0.5B-Instruct when "
                                       "installed, else the embedded SmolLM2-135M-Instruct)."),
    k: int = typer.Option(4, help="Chunks retrieved per question."),
    limit: int = typer.Option(None, help="Ask only the first N questions (default: all 38)."),
    show: int = typer.Option(12, help="Rows of the table to print (every question is scored)."),
    json_path: Path = typer.Option(None, "--json", help="Also write every row and the verdict as JSON."),
    device: str = DeviceOpt,
) -> None:
    """Index the bundled corpus, retrieve, compress, answer with the local LLM from the full and the compressed
    context, print a table and the paired verdict."""
    import textwrap

    from ragzip.demo import DEMO_METHOD, run_demo, summarize

    method = method or DEMO_METHOD
    try:
        budget = Budget(rate=rate, target_tokens=target_tokens, coverage=coverage)
        rows = run_demo(method=method, budget=budget, llm=llm, k=k, log=err.print, device=device, limit=limit)
    except RagzipError as exc:
        _fail(exc)
    table = Table(title=f"ragzip demo: {method} (local LLM answers from full vs compressed context)")
    for col in ("question", "tokens", "kept", "rate", "compress s", "answer (full)", "answer (compressed)", "gold"):
        table.add_column(col, overflow="fold")

    def short(text: str) -> str:  # whole words only
        return textwrap.shorten(text, 80, placeholder=" …") if text.strip() else ""

    for r in rows[:show]:
        table.add_row(r["question"], str(r["tokens_before"]), str(r["tokens_after"]), f"{r['rate']:.2f}",
                      f"{r['seconds']:.2f}", short(r["answer_full"]), short(r["answer_compressed"]), r["gold"])
    out.print(table)
    s = summarize(rows)
    if json_path is not None:
        json_path.write_text(json.dumps({"summary": s, "rows": rows}, indent=1) + "\n", encoding="utf-8")
    if not s["n"]:
        return
    lo, hi = s["f1_delta_ci"]
    verdict = ("the reader's F1 held" if s["f1_delta"] >= 0 else
               "the reader's F1 dropped" if hi < 0 else "the reader's F1 is lower, within noise (the CI spans 0)")
    guarded = f"; the guard kept more on {s['guarded']}" if s["guarded"] else ""
    out.print(f"answers kept in the compressed context: {s['answers_kept']} of the {s['answers_in_full']} in the "
              f"retrieved context; {verdict}; tokens {s['tokens_before']} -> {s['tokens_after']} "
              f"({s['fewer_tokens']:.1f}x fewer){guarded}; {min(show, s['n'])} of the {s['n']} questions shown")
    out.print(f"mean rate {s['mean_rate']:.2f}; answer F1 full {s['f1_full']:.2f} vs compressed "
              f"{s['f1_compressed']:.2f} ({s['n']} questions); paired difference {s['f1_delta']:+.2f} "
              f"(95% CI [{lo:+.2f}, {hi:+.2f}])")


@app.command(name="eval")
def eval_cmd(
    suite: str = typer.Argument(..., help=f"'report' or one of: {', '.join(sorted(EVAL_SUITES))}."),
    data: Path = typer.Option(None, "--data", exists=True, help="Data file or folder (report: the data folder)."),
    limit: int = typer.Option(None, help="At most N examples."),
    json_out: Path = typer.Option(None, "--json", help="Write the results as JSON."),
    seed: int = typer.Option(0),
    option: list[str] = typer.Option(None, "--option", "-O", help="Suite option key=value (repeatable)."),
    out_dir: Path = typer.Option(None, "--out", help="report: output folder (report.md, results.json, plots)."),
    quick: bool = typer.Option(False, help="report: the quick plan (under 10 minutes on 2 cores)."),
    readme: Path = typer.Option(None, help="report: regenerate this README's results section."),
    methods: str = typer.Option(None, help="fidelity: comma-separated method@budget items, e.g. "
                                           "none,exit@0.33,lingua2@0.5 (@200 = target tokens, @t0.5 = threshold)."),
    reader: str = typer.Option(None, help="fidelity: the reader LLM (default qwen2.5-coder-0.5b-instruct); "
                                          "report: overrides the plan's reader."),
) -> None:
    """Run a benchmark suite (or `report`: every suite), print its table and write its JSON."""
    import importlib

    try:
        if suite == "report":
            _report(data, out_dir, quick=quick, seed=seed, limit=limit, readme=readme, only=option, reader=reader)
            return
        target = EVAL_SUITES.get(suite)
        if target is None:
            raise ConfigError(f"unknown eval suite {suite!r}; valid: {['report', *sorted(EVAL_SUITES)]}")
        if data is None:
            raise ConfigError("--data is required")
        options = parse_options(option)
        if suite == "fidelity":
            options.setdefault("progress", "1")
        for name, value in (("methods", methods), ("reader", reader)):
            if value is not None:
                if suite != "fidelity":
                    raise ConfigError(f"--{name} is for the fidelity suite (and --reader for report)")
                options[name] = value
        module_name, attr = target.split(":")
        run = getattr(importlib.import_module(module_name), attr)
        results = run(data, limit=limit, seed=seed, options=options)
    except RagzipError as exc:
        _fail(exc)
    if isinstance(results.get("rows"), list):
        out.print(_rows_table(f"ragzip eval {suite}: reader {results.get('reader')}, n={results.get('n')}",
                              results["rows"], suite))
    table = Table(title=f"ragzip eval {suite}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in results.items():
        if isinstance(value, (int, float, str, bool)) or value is None:
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    out.print(table)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(results, indent=1, ensure_ascii=False))
        err.print(f"wrote {json_out}")


def _rows_table(title: str, rows: list[dict[str, Any]], suite: str = "fidelity") -> Table:
    from ragzip.eval.suites.fidelity import ROW_COLUMNS, row_cells

    columns = ROW_COLUMNS if suite == "fidelity" else list(rows[0]) if rows else []
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col in ("label", "method") else "right",
                         no_wrap=col in ("label", "method"))
    for r in rows:
        table.add_row(*(row_cells(r) if suite == "fidelity" else [str(r[c]) for c in columns]))
    return table


def _report(data: Path | None, out_dir: Path | None, *, quick: bool, seed: int, limit: int | None,
            readme: Path | None, only: list[str] | None, reader: str | None = None) -> None:
    from ragzip.eval.report import run_report, update_readme

    if data is None or not data.is_dir():
        raise ConfigError(f"report needs --data DIR (a folder of dataset folders); {data} is not a folder")
    if out_dir is None:
        raise ConfigError("report needs --out REPORT_DIR")
    suites = {o.partition("=")[2] or o for o in only or []} or None  # -O only=fidelity (repeatable)
    results = run_report(data, out_dir, quick=quick, seed=seed, limit=limit, only=suites, log=err.print,
                         reader=reader)
    if readme is not None:
        update_readme(readme, results, out_dir, readme.parent / "docs" / "results")
    err.print(f"wrote {out_dir / 'report.md'}, {out_dir / 'results.json'} and {len(results['plots'])} plots"
              + (f"; {len(results['errors'])} suites did not run" if results["errors"] else ""))
    if results["errors"]:
        raise typer.Exit(1)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8000),
    upstream: str = typer.Option(None, help="OpenAI-compatible upstream base URL (with /v1); default: the local "
                                            "engine."),
    config: Path = typer.Option(None, help="Server config file (JSON); the flags below override it."),
    method: str = typer.Option(None, "--method", "-m", help="Default compressor or pipeline (default: exit)."),
    rate: float = typer.Option(None, help="Default fraction of tokens kept (replaces the file's budget)."),
    target_tokens: int = typer.Option(None, "--target-tokens", help="Default token cap (replaces the file's "
                                                                    "budget)."),
    tokenizer: str = typer.Option(None, help="Tokenizer that counts budgets, e.g. cl100k_base for a GPT-class "
                                             "upstream (default: the local LLM's)."),
    api_key_env: str = typer.Option(None, "--api-key-env", help="Name of an environment variable holding the "
                                                                "accepted API keys, comma-separated."),
    upstream_api_key_env: str = typer.Option(None, "--upstream-api-key-env",
                                             help="Name of an environment variable holding the upstream's key."),
    max_concurrency: int = typer.Option(None, "--max-concurrency", help="Requests in flight; more wait in the "
                                                                        "queue."),
    queue_depth: int = typer.Option(None, "--queue-depth", help="Requests that may wait for a slot; more get 429."),
    queue_timeout_s: float = typer.Option(None, "--queue-timeout", help="Longest wait for a slot, in seconds."),
    llm: str = typer.Option(None, help="Local engine model (no --upstream)."),
    device: str = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N for every model the proxy "
                                                      "loads."),
    workers: str = typer.Option(None, "--workers", help="Worker processes sharing the port: N, or auto (one per "
                                                        "core); each loads the models once."),
    shared: str = typer.Option(None, "--shared", help="redis://host:port/db for state the workers and replicas "
                                                      "share (rate limits, result cache, index)."),
    on_overload: str = typer.Option(None, "--on-overload", help="queue | uncompressed | reject: what a chat "
                                                                "request gets when the compressor is overloaded."),
) -> None:
    """Start the OpenAI-compatible proxy."""
    try:
        from ragzip.server.app import serve as run_server  # type: ignore[attr-defined]
    except ImportError as exc:
        _fail(ConfigError(f"the server needs its extra: {extra_hint('server')} ({exc})"))
    try:
        overrides: dict[str, Any] = {"upstream": upstream, "method": method, "rate": rate,
                                     "target_tokens": target_tokens, "tokenizer": tokenizer,
                                     "max_concurrency": max_concurrency, "queue_depth": queue_depth,
                                     "queue_timeout_s": queue_timeout_s, "llm": llm, "device": device,
                                     "workers": workers if workers in (None, "auto") else _int(workers, "--workers"),
                                     "shared": shared, "on_overload": on_overload}
        if api_key_env is not None:
            overrides["api_keys"] = [k.strip() for k in _env(api_key_env).split(",") if k.strip()]
        if upstream_api_key_env is not None:
            overrides["upstream_api_key"] = _env(upstream_api_key_env)
        run_server(host=host, port=port, config=config, overrides=overrides)
    except RagzipError as exc:
        _fail(exc)


def _int(value: str, flag: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{flag} takes a number or 'auto', got {value!r}") from None


def _env(name: str) -> str:
    import os

    value = os.environ.get(name)
    if not value:
        raise ConfigError(f"environment variable {name} is not set (or empty)")
    return value


app.add_typer(kv_app, name="kv", help="Chunk KV store: warm, stats, list, evict, verify.")


def _quiet_transformers() -> None:
    """No conversion/loading progress bars or info logs from transformers on the CLI's output (a user's own
    setting of these variables wins). Set before transformers is imported, which reads them once."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main() -> None:
    process_defaults()  # OpenMP threads sleep while they wait (ragzip.threads): before anything imports torch
    if "--verbose" in sys.argv[1:2]:
        os.environ[VERBOSE_ENV] = "1"  # model loads show their bars (`registry.quiet_loading`)
    else:
        _quiet_transformers()
    try:
        app()
    except (RagzipError, KernelError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        sys.exit(2)


if __name__ == "__main__":
    main()
