"""`ragzip eval blend`: TTFT, answer F1 and closeness of chunk-KV reuse methods vs full prefill.

Per question (10 chunks each on musique_chunks_dev50), side by side in one process: full prefill, prefix
caching only, full reuse (no recompute), and blend at each ratio (default 5/15/30%). Chunk caches are
warmed in the store first (not timed); each method's TTFT includes loading its caches from the store.
Closeness uses one token sequence for every method: full prefill's greedy answer (first 32 tokens) is
teacher-forced and each method's next-token distributions are compared with full prefill's (mean KL,
argmax agreement). Selection strategies (value / key / kv deviation, random control, check layer,
gradual filtering) are compared at the main ratio on closeness alone.
"""

from __future__ import annotations

import copy
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from ragzip.options import parse_bool

DEFAULT_RATIOS = (0.05, 0.15, 0.30)
MAIN_RATIO = 0.15
log = logging.getLogger(__name__)
STRATEGIES: dict[str, dict[str, Any]] = {
    "key": {"deviation": "key"},
    "kv": {"deviation": "kv"},
    "random": {"deviation": "random"},
    "value_check2": {"deviation": "value", "check_layer": 2},
    "value_gradual": {"deviation": "value", "gradual_layers": 3, "gradual_start_ratio": 0.45},
}


def _closeness(ref: Any, other: Any) -> tuple[float, float]:
    """Mean KL(ref || other) and argmax agreement over rows of ``[T, V]`` logits."""
    log_p, log_q = ref.log_softmax(-1), other.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # [T]
    agree = (ref.argmax(-1) == other.argmax(-1)).float()  # [T]
    return float(kl.mean()), float(agree.mean())


def _bool(value: str) -> bool:
    return parse_bool(value, "blend suite option")


def run(data: Path, *, limit: int | None, seed: int, options: dict[str, str]) -> dict[str, Any]:
    """Run the suite.

    Options: model (alias, default smollm2), dtype (float32), ratios ("0.05,0.15,0.3"), deviation (value),
    check_layer (1), gradual_layers (0), store (disk|memory), strategies (true), max_new_tokens (32),
    threads (torch threads, default unchanged), warmup (true: one untimed full and blended prefill first).
    """
    import torch

    from ragzip.engine import resolve_dtype
    from ragzip.eval.datasets import load_examples
    from ragzip.eval.metrics import f1_score
    from ragzip.kernels.blend import BlendConfig
    from ragzip.kv_engine import KVReuseEngine, ReuseMode
    from ragzip.kvstore.stores.disk import DiskStore
    from ragzip.kvstore.stores.memory import MemoryStore
    from ragzip.registry import load_causal_lm

    known = {"model", "dtype", "ratios", "deviation", "check_layer", "gradual_layers", "store", "strategies",
             "max_new_tokens", "threads", "warmup"}
    unknown = sorted(set(options) - known)
    if unknown:
        from ragzip.errors import ConfigError

        raise ConfigError(f"unknown blend suite options {unknown}; valid: {sorted(known)}")
    if "threads" in options:
        torch.set_num_threads(int(options["threads"]))
    ratios = tuple(float(r) for r in options.get("ratios", ",".join(map(str, DEFAULT_RATIOS))).split(","))
    max_new = int(options.get("max_new_tokens", "32"))
    base = {"deviation": options.get("deviation", "value"), "check_layer": int(options.get("check_layer", "1")),
            "gradual_layers": int(options.get("gradual_layers", "0")), "seed": seed}
    strategies = STRATEGIES if _bool(options.get("strategies", "true")) else {}
    model, tokenizer = load_causal_lm(options.get("model"), dtype=resolve_dtype(options.get("dtype", "float32")))
    tmp = tempfile.TemporaryDirectory(prefix="ragzip-blend-")
    store = DiskStore(tmp.name, max_bytes=32 << 30) if options.get("store", "disk") == "disk" else MemoryStore(32 << 30)
    engine = KVReuseEngine(model, tokenizer, store=store)
    methods: dict[str, tuple[ReuseMode, Any]] = {
        "full": (ReuseMode.FULL, None), "prefix": (ReuseMode.PREFIX, None), "full_reuse": (ReuseMode.REUSE, None),
    }
    for r in ratios:
        methods[f"blend_{round(r * 100)}"] = (ReuseMode.BLEND, BlendConfig(recompute_ratio=r, **base))
    per: dict[str, dict[str, list[float]]] = {m: {"ttft": [], "f1": [], "kl": [], "top1": [], "recomputed": []}
                                              for m in methods}
    strat: dict[str, dict[str, list[float]]] = {s: {"kl": [], "top1": [], "ttft": []} for s in strategies}
    examples = load_examples(data, limit=limit)
    prompt_tokens: list[int] = []
    if examples and _bool(options.get("warmup", "true")):
        # Untimed: the first touch of fresh memory is slow here, and it would land on whichever method runs first.
        docs = examples[0].documents()
        engine.warm(docs)
        for mode in (ReuseMode.FULL, ReuseMode.BLEND):
            engine.prefill(examples[0].question, docs, mode=mode)
    for ex in examples:
        docs = ex.documents()
        engine.warm(docs)
        full_pre = engine.prefill(ex.question, docs, mode=ReuseMode.FULL)
        full_stats = copy.copy(engine.stats)
        prompt_tokens.append(full_pre.num_tokens)
        target: list[int] = []
        ref_rows = []
        for tok, logits in _greedy_with_logits(engine, copy.deepcopy(full_pre), max_new):
            target.append(tok)
            ref_rows.append(logits)
        ref = torch.stack(ref_rows)  # [T, V]
        for name, (mode, cfg) in methods.items():
            if name == "full":
                pre, stats = full_pre, full_stats
            else:
                pre = engine.prefill(ex.question, docs, mode=mode, blend=cfg)
                stats = copy.copy(engine.stats)
            kl, top1 = (0.0, 1.0) if name == "full" else _closeness(ref, engine.teacher_forced_logits(
                copy.deepcopy(pre), target))
            text = tokenizer.decode(list(engine.generate_ids(pre, max_new_tokens=max_new)), skip_special_tokens=True)
            row = per[name]
            row["ttft"].append(stats.ttft_s)
            row["f1"].append(f1_score(text.strip(), ex.answers))
            row["kl"].append(kl)
            row["top1"].append(top1)
            row["recomputed"].append(stats.recomputed_tokens / max(1, stats.prompt_tokens))
            log.info("%s %s: ttft %.2fs kl %.4f top1 %.3f answer %r", ex.id, name, stats.ttft_s, kl, top1, text)
            del pre
        for sname, kw in strategies.items():
            cfg = BlendConfig(recompute_ratio=MAIN_RATIO, **{**base, **kw})
            pre = engine.prefill(ex.question, docs, mode=ReuseMode.BLEND, blend=cfg)
            strat[sname]["ttft"].append(engine.stats.ttft_s)
            kl, top1 = _closeness(ref, engine.teacher_forced_logits(pre, target))
            strat[sname]["kl"].append(kl)
            strat[sname]["top1"].append(top1)
            log.info("%s strategy %s: ttft %.2fs kl %.4f top1 %.3f", ex.id, sname, engine.stats.ttft_s, kl, top1)
    tmp.cleanup()
    return _report(per, strat, ratios, prompt_tokens, engine)


def _greedy_with_logits(engine: Any, pre: Any, max_new: int) -> Any:
    """Full prefill's greedy path with the logits that chose each token (the teacher-forcing reference)."""
    import torch

    eos = {engine.tokenizer.eos_token_id}
    logits, pos = pre.logits, pre.num_tokens
    with torch.inference_mode():
        for _ in range(max_new):
            tok = int(logits.argmax())
            yield tok, logits
            if tok in eos:
                return
            step = torch.tensor([[tok]], device=engine.adapter.device)
            logits = engine.adapter.forward_with_cache(step, pre.cache, pos, logits_to_keep=1)[-1]
            pos += 1


def _mean(xs: list[float]) -> float:
    return float(statistics.fmean(xs)) if xs else float("nan")


def _report(per: dict[str, dict[str, list[float]]], strat: dict[str, dict[str, list[float]]],
            ratios: tuple[float, ...], prompt_tokens: list[int], engine: Any) -> dict[str, Any]:
    main = f"blend_{round(MAIN_RATIO * 100)}"
    if main not in per:
        main = f"blend_{round(ratios[len(ratios) // 2] * 100)}"
    full_ttft = sum(per["full"]["ttft"])
    out: dict[str, Any] = {
        "num_examples": len(prompt_tokens),
        "mean_prompt_tokens": _mean([float(n) for n in prompt_tokens]),
        "ttft_speedup_vs_full": full_ttft / max(1e-9, sum(per[main]["ttft"])),
        "f1_full": 100 * _mean(per["full"]["f1"]),
        "f1_blend": 100 * _mean(per[main]["f1"]),
        "kl_blend": _mean(per[main]["kl"]),
        "kl_full_reuse": _mean(per["full_reuse"]["kl"]),
        "top1_agreement_blend": _mean(per[main]["top1"]),
        "top1_agreement_full_reuse": _mean(per["full_reuse"]["top1"]),
    }
    for name, row in per.items():
        out[f"ttft_s_{name}"] = _mean(row["ttft"])
        out[f"speedup_{name}"] = full_ttft / max(1e-9, sum(row["ttft"]))
        out[f"f1_{name}"] = 100 * _mean(row["f1"])
        if name != "full":
            out[f"kl_{name}"] = _mean(row["kl"])
            out[f"top1_{name}"] = _mean(row["top1"])
    for name, row in strat.items():
        out[f"strategy_kl_{name}"] = _mean(row["kl"])
        out[f"strategy_top1_{name}"] = _mean(row["top1"])
        out[f"strategy_speedup_{name}"] = full_ttft / max(1e-9, sum(row["ttft"]))
    if strat and "value" not in strat:
        strat = {"value": {"kl": per[main]["kl"], "top1": per[main]["top1"], "ttft": per[main]["ttft"]}, **strat}
        out["strategy_kl_value"] = _mean(per[main]["kl"])
        out["strategy_top1_value"] = _mean(per[main]["top1"])
        out["strategy_speedup_value"] = out["ttft_speedup_vs_full"]
    if strat:
        out["best_strategy"] = min(strat, key=lambda s: _mean(strat[s]["kl"]))
    out["per_method"] = {name: {k: v for k, v in row.items()} for name, row in per.items()}
    out["main_blend"] = main
    out["self_check"] = None if engine.self_check is None else {
        "full_vs_reference": engine.self_check.full_vs_reference, "rerotation": engine.self_check.rerotation}
    out["time"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return out
