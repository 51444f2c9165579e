"""`ragzip eval report`: run every suite, write results.json, report.md and PNG plots.

The README's results section is generated from results.json (`--readme README.md`), so the README never drifts
from what the code measures.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragzip.eval import plots

README_START = "<!-- ragzip:results:start -->"
README_END = "<!-- ragzip:results:end -->"


@dataclass(frozen=True, slots=True)
class SuiteRun:
    key: str  # name in results.json
    suite: str  # module in ragzip.eval.suites
    dataset: str  # folder under the data dir
    quick_limit: int
    full_limit: int
    quick_options: dict[str, str] = field(default_factory=dict)
    full_options: dict[str, str] = field(default_factory=dict)


PLAN: tuple[SuiteRun, ...] = (
    # Quality vs compression, judged by readers that can answer (random/embed-topk references added by the suite).
    SuiteRun("fidelity", "fidelity", "hotpotqa_train_hipporag100", 5, 40,
             {"reader": "qwen2.5-coder-0.5b-instruct", "methods": "none,exit@0.33,lingua2@0.5"},
             {"reader": "qwen2.5-coder-1.5b-instruct",
              "methods": "none,exit,exit@0.33,exit@0.2,lingua2@0.5,lingua2@0.33,exit+lingua2@0.2,crag+exit@0.33"}),
    SuiteRun("extractive", "extractive", "hotpotqa_train_hipporag100", 10, 100,
             {"causal_limit": "2", "rates": "0.3333,0.2"}, {"causal_limit": "5", "reader": "1", "reader_limit": "30"}),
    SuiteRun("lingua2", "lingua2", "squad_v1.1_dev", 8, 100, {"repeats": "1"}, {"reader": "1"}),
    SuiteRun("crag_fewsum", "crag", "fewsum_amazon_dev", 3, 12, {"max_new_tokens": "48"}, {}),
    SuiteRun("crag_multi_news", "crag", "multi_news_dev100", 2, 20, {"max_new_tokens": "48", "summaries": "false"},
             {}),
    # Quick runs reuse the shipped sensitivity profile; the full run measures it again.
    SuiteRun("kvcodec", "kvcodec", "musique_chunks_dev50", 2, 12,
             {"profile": "smollm2-135m-instruct", "calib": "0", "blend": "1"}, {}),
    # Quick: no untimed warm-up pass and no previous-version caches (smoke figures; the full run measures both).
    SuiteRun("blend", "blend", "musique_chunks_dev50", 1, 5,
             {"strategies": "false", "max_new_tokens": "16", "warmup": "false", "previous": "false"}, {}),
)


def machine_info() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d")}


def run_report(data_dir: Path, out_dir: Path, *, quick: bool, seed: int = 0, limit: int | None = None,
               only: set[str] | None = None, log: Callable[[str], Any] = print,
               reader: str | None = None) -> dict[str, Any]:
    """Run the plan, write `results.json`, `report.md` and plots into `out_dir`; returns the results.

    `reader` replaces the plan's reader in the suites that have one (fidelity)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine_info(), "quick": quick, "seed": seed, "data": str(data_dir),
                               "suites": {}, "errors": {}}
    for run in PLAN:
        if only and run.key not in only:
            continue
        data = data_dir / run.dataset
        if not data.exists():
            results["errors"][run.key] = f"data folder {data} not found"
            log(f"skip {run.key}: {results['errors'][run.key]}")
            continue
        n = limit if limit is not None else (run.quick_limit if quick else run.full_limit)
        options = dict(run.quick_options if quick else run.full_options)
        if reader and "reader" in options:
            options["reader"] = reader
        if quick and run.suite == "kvcodec" and "dtype" not in options:
            from ragzip.registry import cpu_supports_bf16

            # bf16 is the codec suite's measured setting, but emulated bf16 on a CPU without it is ~3x slower.
            options["dtype"] = "bfloat16" if cpu_supports_bf16() else "float32"
        log(f"running {run.key} ({run.suite} on {run.dataset}, limit {n})")
        start = time.perf_counter()
        module = importlib.import_module(f"ragzip.eval.suites.{run.suite}")
        try:
            suite_out = module.run(data, limit=n, seed=seed, options=options)
        except Exception as exc:  # one failing suite must not hide the others; it is reported, not swallowed
            results["errors"][run.key] = f"{type(exc).__name__}: {exc}"
            log(f"{run.key} failed: {results['errors'][run.key]}\n{traceback.format_exc()}")
            continue
        results["suites"][run.key] = {"dataset": run.dataset, "limit": n, "options": options,
                                      "seconds": round(time.perf_counter() - start, 1), "results": suite_out}
    if not only or "proxy" in only:
        _run_proxy_load(results, quick=quick, seed=seed, log=log)
    results["plots"] = make_plots(results, out_dir)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str, ensure_ascii=False))
    (out_dir / "report.md").write_text(render_report(results))
    return results


def _run_proxy_load(results: dict[str, Any], *, quick: bool, seed: int, log: Callable[[str], Any]) -> None:
    """The proxy's bounded loopback load and chaos test (`python -m ragzip.eval.loadtest`), in a fresh process:
    the full report runs 200 clients for 60 s with EXIT and the upstream killed and restarted mid-run; the quick
    one 8 clients for 8 s with truncation and a 2 s outage."""
    import subprocess
    import sys
    import tempfile

    seconds, clients, method, down = (8, 8, "truncate", 2) if quick else (60, 200, "exit", 5)
    log(f"running proxy load + chaos test ({clients} clients x {seconds} s, loopback)")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "load.json"
        cmd = [sys.executable, "-m", "ragzip.eval.loadtest", "--seconds", str(seconds), "--concurrency", str(clients),
               "--method", method, "--chaos", "--down-s", str(down), "--seed", str(seed), "--json", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds * 3 + 300, check=False)
        if proc.returncode != 0 or not out.exists():
            results["errors"]["proxy"] = f"load test exited {proc.returncode}: {proc.stderr[-500:]}"
            return
        raw = json.loads(out.read_text())
    chaos = raw["chaos"]
    flat = {"method": raw["method"], "concurrency": raw["concurrency"], "requests": raw["requests"],
            "served": raw["served"], "rps": raw["rps"], "served_rps": raw["served_rps"], "p50_ms": raw["p50_ms"],
            "p95_ms": raw["p95_ms"], "p99_ms": raw["p99_ms"], "rejected_429": raw["rejected_429"],
            # 5xx outside the outage must be 0; during it, chat answers 502/504 by design
            "server_errors": chaos["server_errors_outside"], "errors_during_outage": raw["server_errors"]
            - chaos["server_errors_outside"], "client_timeouts": raw["client_timeouts"],
            "first_served_after_restart_s": chaos["first_served_after_restart_s"],
            "rss_mb_start": raw.get("rss_mb_start"), "rss_mb_end": raw.get("rss_mb_end"),
            "rss_mb_change_last_30s": raw.get("rss_mb_change_last_30s"), "raw": raw}
    results["suites"]["proxy"] = {"dataset": "synthetic documents, stub upstream", "limit": raw["requests"],
                                  "options": {"seconds": seconds, "clients": clients, "chaos_down_s": down},
                                  "seconds": round(time.perf_counter() - start, 1), "results": flat}


def _caption(results: dict[str, Any], key: str, model: str) -> str:
    m = results["machine"]
    suite = results["suites"].get(key, {})
    return (f"{m['cpu']} ({m['cores']} cores{', ' + m['gpu'] if m['gpu'] else ''}), torch {m['torch']}; "
            f"model {model}; data {suite.get('dataset')} (n={suite.get('limit')}); seed {results['seed']}; "
            f"{m['date']}")


def make_plots(results: dict[str, Any], out_dir: Path) -> dict[str, str]:
    suites = results["suites"]
    made: dict[str, Path | None] = {}
    if "fidelity" in suites:
        r = suites["fidelity"]["results"]
        cap = _caption(results, "fidelity", f"reader {r.get('reader')} ({r.get('reader_dtype')})")
        made["quality_f1"] = plots.quality_vs_compression(r, out_dir / "quality_f1.png", cap, "f1")
        made["quality_nll"] = plots.quality_vs_compression(r, out_dir / "quality_nll.png", cap, "nll")
        made["quality_survival"] = plots.quality_vs_compression(r, out_dir / "quality_survival.png", cap,
                                                                "answer_survival")
        made["quality_support"] = plots.quality_vs_compression(r, out_dir / "quality_support.png", cap,
                                                               "support_recall")
        made["latency"] = plots.latency_by_method(r, out_dir / "latency.png", cap)
    if "blend" in suites:
        r = suites["blend"]["results"]
        cap = _caption(results, "blend", "smollm2-135m-instruct fp32")
        made["kv_ttft"] = plots.blend_ttft(r, out_dir / "kv_ttft.png", cap)
        made["kv_quality"] = plots.blend_quality(r, out_dir / "kv_quality.png", cap)
    if "kvcodec" in suites:
        r = suites["kvcodec"]["results"]
        made["codec"] = plots.codec_tradeoff(r, out_dir / "codec.png", _caption(results, "kvcodec", r.get("model", "")))
    if "proxy" in suites:
        r = suites["proxy"]["results"]
        made["proxy"] = plots.proxy_latency(r, out_dir / "proxy.png", _caption(results, "proxy", "none"))
    return {k: v.name for k, v in made.items() if v is not None}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _scalar_table(res: dict[str, Any]) -> list[str]:
    rows = [(k, v) for k, v in res.items() if isinstance(v, (int, float, str, bool)) and not isinstance(v, dict)]
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows if len(str(v)) < 120]
    return lines


def fidelity_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown table of the fidelity suite's rows."""
    from ragzip.eval.suites.fidelity import ROW_COLUMNS, row_cells

    cols = (*ROW_COLUMNS, "ms_per_query")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(row_cells(r, cols)) + " |" for r in rows]
    return lines


def render_report(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = ["# ragzip evaluation report", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}, Python {m['python']}, torch {m['torch']}"
             f"{', GPU ' + m['gpu'] if m['gpu'] else ', no GPU'}; {m['date']}; "
             f"{'quick' if results['quick'] else 'full'} run, seed {results['seed']}, data {results['data']}.", ""]
    plot_files = results.get("plots", {})
    for key, suite in results["suites"].items():
        res = suite["results"]
        lines += [f"## {key}", "", f"Data `{suite['dataset']}` (limit {suite['limit']}), options "
                  f"`{json.dumps(suite['options'])}`, {suite['seconds']} s.", ""]
        if key == "fidelity":
            lines += fidelity_table(res.get("rows", [])) + [""]
        lines += _scalar_table(res) + [""]
        if isinstance(res.get("table"), list) and res["table"] and isinstance(res["table"][0], dict):
            cols = list(res["table"][0])
            lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in res["table"]] + [""]
    if plot_files:
        lines += ["## Plots", ""] + [f"![{k}]({v})" for k, v in plot_files.items()] + [""]
    if results["errors"]:
        lines += ["## Suites that did not run", ""] + [f"- {k}: {v}" for k, v in results["errors"].items()] + [""]
    return "\n".join(lines)


def update_readme(readme: Path, results: dict[str, Any], report_dir: Path, assets: Path) -> None:
    """Replace the README's generated results section (between the markers) and copy the key plots to `assets`."""
    text = readme.read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        raise ValueError(f"{readme} has no {README_START} ... {README_END} section")
    assets.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(assets, readme.parent)
    body = [README_START, "", render_readme_section(results, rel)]
    for key, name in results.get("plots", {}).items():
        shutil.copy(report_dir / name, assets / name)
    body += ["", README_END]
    start, end = text.index(README_START), text.index(README_END) + len(README_END)
    readme.write_text(text[:start] + "\n".join(body) + text[end:], encoding="utf-8")


def render_readme_section(results: dict[str, Any], assets_rel: str) -> str:
    m = results["machine"]
    s = results["suites"]
    lines = [f"Generated by `ragzip eval report{' --quick' if results['quick'] else ''}` on {m['cpu']} "
             f"({m['cores']} cores, {'GPU ' + m['gpu'] if m['gpu'] else 'no GPU'}), torch {m['torch']}, {m['date']}, "
             f"seed {results['seed']}. Numbers are development figures on the sets named; rerun to reproduce.", ""]
    if "fidelity" in s:
        r = s["fidelity"]["results"]
        lines += [f"**Quality vs compression** (`{s['fidelity']['dataset']}`, n={r['n']} questions, reader "
                  f"{r.get('reader')} {r.get('reader_dtype')}; F1/EM in points, `f1_delta_ci` the paired bootstrap "
                  "95% CI of the F1 difference to `none`, `nll` the gold answer's mean NLL per token, "
                  "`nll_vs_embed_topk` the paired NLL difference to embed-topk at the same budget [95% CI]; lower NLL "
                  "is better):", ""]
        lines += fidelity_table(r.get("rows", [])) + [""]
    picks = [("extractive", ["support_recall", "token_ratio", "encoder_ms_per_query", "speedup_encoder_vs_causal"]),
             ("lingua2", ["speedup_vs_llmlingua", "parity_word_agreement", "answer_survival", "rate_error_max"]),
             ("crag_fewsum", ["token_reduction", "rougeL_compressed", "rougeL_full"]),
             ("crag_multi_news", ["token_reduction", "rougeL_compressed", "rougeL_full"]),
             ("kvcodec", ["bits_per_element", "ratio_vs_int8", "top1_agreement", "kl", "top1_agreement_int8", "kl_int8",
                          "decode_mb_s", "load_vs_recompute", "blend_kl", "blend_kl_int8"]),
             ("proxy", ["served_rps", "p50_ms", "p99_ms", "rejected_429", "server_errors", "errors_during_outage",
                        "rss_mb_change_last_30s"]),
             ("blend", ["agree_exact_auto", "ttft_speedup_auto", "agree_exact_blend15", "agree_f1_blend15",
                        "ttft_speedup_blend15", "agree_f1_full_reuse", "premise_selected_share",
                        "premise_oracle_share", "premise_spearman", "f1_full", "kl_blend", "kl_full_reuse"])]
    rows = []
    for key, metrics in picks:
        if key in s:
            r = s[key]["results"]
            got = ", ".join(f"{k} {_fmt(r[k])}" for k in metrics if k in r)
            rows.append(f"| {key} | `{s[key]['dataset']}` n={s[key]['limit']} | {got} |")
    if rows:
        lines += ["| suite | data | key figures |", "|---|---|---|"] + rows + [""]
    for key, name in results.get("plots", {}).items():
        if key in ("quality_f1", "quality_nll", "quality_support", "kv_ttft", "codec"):
            lines.append(f"![{key}]({assets_rel}/{name})")
    return "\n".join(lines)
