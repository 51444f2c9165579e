"""Plots of the eval report (matplotlib, Agg backend, PNG). Each function returns the file it wrote or None."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig: Any, ax: Any, path: Path, caption: str) -> Path:
    ax.grid(True, alpha=0.3)
    import textwrap

    fig.text(0.01, 0.005, "\n".join(textwrap.wrap(caption, 120)), fontsize=7, color="0.35")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def quality_vs_compression(fidelity: dict[str, Any], out: Path, caption: str, metric: str) -> Path | None:
    """One curve per method: `metric` (f1, nll, answer_survival or support_recall) against tokens kept, with the
    paired 95% CI of the F1 difference to `none` as error bars on F1."""
    curves: dict[str, list[tuple[float, float, tuple[float, float] | None]]] = defaultdict(list)
    for r in fidelity.get("rows", []):
        if _num(r.get(metric)) and _num(r.get("rate")):
            err = None
            ci = r.get("f1_delta_ci")
            if metric == "f1" and isinstance(ci, list) and len(ci) == 2 and all(map(_num, ci)):
                err = (max(0.0, r["f1_delta"] - ci[0]), max(0.0, ci[1] - r["f1_delta"]))
            curves[r["method"]].append((r["rate"], r[metric], err))
    if not curves:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, pts in sorted(curves.items()):
        pts.sort(key=lambda p: p[0])
        style: dict[str, Any] = {"marker": "o", "capsize": 3}
        if method == "random":
            style.update(linestyle="--", color="0.5")
        elif method == "none":
            style.update(marker="*", markersize=12, color="black", linestyle="none")
        errs = [p[2] or (0.0, 0.0) for p in pts]
        yerr = [[e[0] for e in errs], [e[1] for e in errs]] if any(p[2] for p in pts) else None
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=yerr, label=method, **style)
    ax.set_xlabel("tokens kept / tokens in")
    ax.set_ylabel({"f1": "reader F1 (bars: paired 95% CI vs none)", "nll": "gold-answer NLL per token",
                   "answer_survival": "gold answer survives", "support_recall": "supporting-sentence recall"}[metric])
    ax.set_xlim(0, 1.05)
    ax.legend(fontsize=8)
    return _finish(fig, ax, out, caption)


def latency_by_method(fidelity: dict[str, Any], out: Path, caption: str) -> Path | None:
    """Compressor latency per query against input length, one series per method setting."""
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for row in fidelity.get("latency", []):
        if row["method"] != "none":
            series[row["label"]].append((row["tokens_before"], row["ms"]))
    if not series:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, pts in sorted(series.items()):
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=12, label=label)
    ax.set_xlabel("input tokens per query")
    ax.set_ylabel("compressor ms per query")
    ax.set_yscale("log")
    ax.legend(fontsize=7, ncol=2)
    return _finish(fig, ax, out, caption)


def blend_ttft(blend: dict[str, Any], out: Path, caption: str) -> Path | None:
    names = [k.removeprefix("ttft_s_") for k in blend
             if k.startswith("ttft_s_") and not k.startswith("ttft_s_strategy_") and _num(blend[k])]
    if not names:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    values = [blend[f"ttft_s_{n}"] for n in names]
    ax.bar(names, values, color=["0.5" if n == "full" else "C0" for n in names])
    for i, n in enumerate(names):
        ax.text(i, values[i], f"{blend.get(f'speedup_{n}', 1):.1f}x", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("time to first token (s)")
    ax.tick_params(axis="x", labelrotation=30)
    return _finish(fig, ax, out, caption)


def blend_quality(blend: dict[str, Any], out: Path, caption: str) -> Path | None:
    pts = []
    for key, value in blend.items():
        if key.startswith("kl_blend_") and _num(value):
            pct = key.removeprefix("kl_blend_")
            if pct.isdigit():
                pts.append((int(pct) / 100, value, blend.get(f"top1_blend_{pct}")))
    if _num(blend.get("kl_full_reuse")):
        pts.append((0.0, blend["kl_full_reuse"], blend.get("top1_agreement_full_reuse")))
    if not pts:
        return None
    pts.sort()
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label="KL vs full prefill")
    ax.set_xlabel("recompute ratio")
    ax.set_ylabel("mean KL (nats)")
    if all(_num(p[2]) for p in pts):
        ax2 = ax.twinx()
        ax2.plot([p[0] for p in pts], [p[2] for p in pts], marker="s", color="C1", label="top-1 agreement")
        ax2.set_ylabel("top-1 agreement")
        ax2.legend(loc="lower right", fontsize=8)
    ax.legend(loc="upper right", fontsize=8)
    return _finish(fig, ax, out, caption)


def codec_tradeoff(kvcodec: dict[str, Any], out: Path, caption: str) -> Path | None:
    rows = [r for r in kvcodec.get("table", []) if _num(r.get("bits")) and _num(r.get("top1"))]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[str(r["codec"]).split(":")[0]].append(r)
    for name, rs in sorted(groups.items()):
        rs.sort(key=lambda r: r["bits"])
        ax.plot([r["bits"] for r in rs], [r["top1"] for r in rs], marker="o", label=name)
        for r in rs:
            ax.annotate(str(r["codec"]), (r["bits"], r["top1"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("bits per element (side information included)")
    ax.set_ylabel("top-1 agreement with the original KV")
    ax.legend(fontsize=8)
    return _finish(fig, ax, out, caption)


def proxy_latency(proxy: dict[str, Any], out: Path, caption: str) -> Path | None:
    rows = [(k, v) for k, v in proxy.items() if k.endswith("_ms") and _num(v)]  # p50/p95/p99 through the proxy
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.barh([k for k, _ in rows], [v for _, v in rows])
    ax.set_xlabel("milliseconds")
    return _finish(fig, ax, out, caption)
