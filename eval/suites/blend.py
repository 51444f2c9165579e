"""`ragzip eval blend`: TTFT, answer F1 and closeness of chunk-KV reuse methods vs full prefill.

Per question (10 chunks each on musique_chunks_dev50), side by side in one process: full prefill, prefix
caching only, full reuse (no recompute) and blend at each ratio (default 5/15/30%), plus the previous version's
caches (each chunk computed alone from position 0, `*_alone`). Chunk caches are warmed in the store first (not
timed); each method's TTFT includes loading its caches from the store. Closeness uses one token sequence for
every method: full prefill's greedy answer (first 32 tokens) is teacher-forced and each method's next-token
distributions are compared with full prefill's (mean KL, argmax agreement). Answer F1 is each method's own
greedy answer against the gold answers. Selection strategies (value deviation, the question's attention,
their mix, random control, chunk-head recompute, gradual filtering) are compared at each strategy ratio on
closeness.

Answers are what users see, so each method's greedy answer is also compared with full prefill's: identical
(`agree_exact_<mode>`, with a CI), token F1 against it (`agree_f1_<mode>`), and the first answer token's KL and
agreement. `auto` is the engine's default mode: the model's qualification (`ragzip.kv_qualify`, calibrated on the
bundled SQuAD prompts, never on these questions) decides whether it blends. The premise check measures
CacheBlend's two premises on these prompts: per deeper layer, the share of the reused caches' value deviation from
full prefill held by the tokens the check layer selects (`premise_selected_share`) and by that layer's own top
tokens (`premise_oracle_share`), and the Spearman correlation between the check layer's ranking and the deeper
layer's (`premise_spearman`).
"""

from __future__ import annotations

import copy
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from ragzip.options import parse_bool, refuse_unknown

DEFAULT_RATIOS = (0.05, 0.15, 0.30)
MAIN_RATIO = 0.15
log = logging.getLogger(__name__)
STRATEGIES: dict[str, dict[str, Any]] = {
    "value": {"deviation": "value", "query_weight": 0.0},
    "key": {"deviation": "key", "query_weight": 0.0},
    "random": {"deviation": "random"},
    "query": {"deviation": "query"},
    "value_query": {"deviation": "value", "query_weight": 0.5},
    "chunk_head4": {"deviation": "value", "query_weight": 0.0, "chunk_head_tokens": 4},
    "value_gradual": {"deviation": "value", "query_weight": 0.0, "gradual_layers": 3},
}
DEFAULT_STRATEGIES = ("value", "random", "query", "value_query", "chunk_head4", "value_gradual")


# Stable key names of the modes the answer-agreement keys are reported for (method name -> key suffix).
MODE_KEYS = {"auto": "auto", "full_reuse": "full_reuse", "prefix": "prefix", "blend_5": "blend5",
             "blend_15": "blend15", "blend_30": "blend30"}


def _closeness(ref: Any, other: Any) -> tuple[float, float, float, float]:
    """Mean KL(ref || other) and argmax agreement over rows of ``[T, V]`` logits, and both at the first row."""
    log_p, log_q = ref.log_softmax(-1), other.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # [T]
    agree = (ref.argmax(-1) == other.argmax(-1)).float()  # [T]
    return float(kl.mean()), float(agree.mean()), float(kl[0]), float(agree[0])


def premise_check(full_layers: Any, reused_layers: Any, eligible: Any, *, check_layer: int,
                  ratio: float) -> dict[str, list[float]]:
    """CacheBlend's premises on one prompt, per layer deeper than ``check_layer``.

    ``d_l(t)`` is the squared value deviation of reused token ``t`` from full prefill at layer ``l`` (the
    error selective recompute exists to fix). The check layer selects the top ``ratio`` of eligible tokens by
    ``d_check``; for each deeper layer: the share of ``d_l`` those tokens hold, the share the layer's own top
    tokens hold (oracle), and the Spearman correlation of ``d_check`` with ``d_l``.

    Args:
        full_layers / reused_layers: per layer ``(K, V)`` ``[1, H_kv, N, D]`` of full prefill and of plain reuse.
        eligible: ``[N]`` bool, the reused (inexact) tokens.
    """
    import torch

    from ragzip.kernels.select import kv_deviation, num_to_select

    idx = eligible.nonzero().squeeze(-1)
    dev = [kv_deviation(f[1].index_select(2, idx), r[1].index_select(2, idx)) for f, r in zip(full_layers,
                                                                                          reused_layers)]
    k = max(1, num_to_select(int(idx.numel()), ratio))
    chosen = torch.topk(dev[check_layer], k).indices
    ranks = [_ranks(d) for d in dev]
    out: dict[str, list[float]] = {"selected": [], "oracle": [], "spearman": []}
    for layer in range(check_layer + 1, len(dev)):
        total = float(dev[layer].sum()) or 1e-30
        out["selected"].append(float(dev[layer][chosen].sum()) / total)
        out["oracle"].append(float(torch.topk(dev[layer], k).values.sum()) / total)
        out["spearman"].append(float(torch.corrcoef(torch.stack([ranks[check_layer], ranks[layer]]))[0, 1]))
    return out


def _ranks(x: Any) -> Any:
    import torch

    ranks = torch.empty_like(x, dtype=torch.float32)
    ranks[x.argsort()] = torch.arange(x.numel(), dtype=torch.float32)
    return ranks


def _bool(value: str) -> bool:
    return parse_bool(value, "blend suite option")


def run(data: Path, *, limit: int | None, seed: int, options: dict[str, str]) -> dict[str, Any]:
    """Run the suite.

    Options: model (alias, default smollm2), dtype (float32), ratios ("0.05,0.15,0.3"), deviation / query_weight /
    check_layer / gradual_layers / chunk_head_tokens (the blend configuration, default `BlendConfig()`), store
    (disk|memory), strategies (comma list of STRATEGIES names, "false" for none), strategy_ratios (default the
    ratios), previous (true: also the caches computed alone), skip (skip the first n examples: a held-out
    slice), max_new_tokens (32), threads (torch threads), warmup (true: one untimed run of each kind first),
    auto (true: the engine's default mode, its qualification computed or read from the cache first, untimed),
    premise (true: the premise check at the main ratio), prefix (true: the prefix-caching method), strategy_answers
    (false: true also generates each strategy's answer for the agreement keys `agree_exact_strategy_<name>_<pct>`).
    """
    import torch

    from ragzip.decoding import clean_answer
    from ragzip.errors import ConfigError
    from ragzip.eval.datasets import load_examples
    from ragzip.eval.metrics import f1_score
    from ragzip.kernels.blend import BlendConfig
    from ragzip.kv_engine import KVReuseEngine, ReuseMode
    from ragzip.kvstore.stores.disk import DiskStore
    from ragzip.kvstore.stores.memory import MemoryStore
    from ragzip.registry import load_causal_lm, resolve_dtype

    known = {"model", "dtype", "ratios", "deviation", "query_weight", "check_layer", "gradual_layers",
             "chunk_head_tokens", "store", "strategies", "strategy_ratios", "previous", "skip", "max_new_tokens",
             "threads", "warmup", "auto", "premise", "prefix", "strategy_answers"}
    refuse_unknown(options, known, "eval suite 'blend'")
    if "threads" in options:
        torch.set_num_threads(int(options["threads"]))
    ratios = _floats(options.get("ratios"), DEFAULT_RATIOS)
    strategy_ratios = _floats(options.get("strategy_ratios"), ratios)
    max_new = int(options.get("max_new_tokens", "32"))
    defaults = BlendConfig()
    base: dict[str, Any] = {
        "deviation": options.get("deviation", defaults.deviation.value),
        "query_weight": float(options.get("query_weight", defaults.query_weight)),
        "check_layer": int(options.get("check_layer", defaults.check_layer)),
        "gradual_layers": int(options.get("gradual_layers", defaults.gradual_layers)),
        "chunk_head_tokens": int(options.get("chunk_head_tokens", defaults.chunk_head_tokens)), "seed": seed}
    names = options.get("strategies", ",".join(DEFAULT_STRATEGIES))
    chosen = [] if names.strip().lower() in ("false", "none", "") else [n.strip() for n in names.split(",")]
    bad = sorted(set(chosen) - set(STRATEGIES))
    if bad:
        raise ConfigError(f"unknown blend strategies {bad}; valid: {sorted(STRATEGIES)}")
    model, tokenizer = load_causal_lm(options.get("model"), dtype=resolve_dtype(options.get("dtype", "float32")))
    tmp = tempfile.TemporaryDirectory(prefix="ragzip-blend-")
    store = DiskStore(tmp.name, max_bytes=32 << 30) if options.get("store", "disk") == "disk" else MemoryStore(32 << 30)
    engine = KVReuseEngine(model, tokenizer, store=store)
    use_auto = _bool(options.get("auto", "true"))
    verdict = engine.qualification if use_auto else None  # calibrated (or read from the cache) before timing
    engines = {"": engine}
    if _bool(options.get("previous", "true")):
        engines["_alone"] = KVReuseEngine(model, tokenizer, store=store, sink_context=False, run_self_check=False)
    methods: dict[str, tuple[Any, ReuseMode, Any]] = {"full": (engine, ReuseMode.FULL, None)}
    if _bool(options.get("prefix", "true")):
        methods["prefix"] = (engine, ReuseMode.PREFIX, None)
    if use_auto:
        methods["auto"] = (engine, ReuseMode.AUTO, None)
    for suffix, eng in engines.items():
        methods[f"full_reuse{suffix}"] = (eng, ReuseMode.REUSE, None)
        for r in ratios if not suffix else (MAIN_RATIO,):
            methods[f"blend_{round(r * 100)}{suffix}"] = (eng, ReuseMode.BLEND, BlendConfig(recompute_ratio=r, **base))
    for sname in chosen:
        for r in strategy_ratios:
            cfg = BlendConfig(recompute_ratio=r, **{**base, **STRATEGIES[sname]})
            methods[f"strategy_{sname}_{round(r * 100)}"] = (engine, ReuseMode.BLEND, cfg)
    per: dict[str, dict[str, list[float]]] = {m: {"ttft": [], "f1": [], "kl": [], "top1": [], "recomputed": [],
                                                  "load": [], "agree_exact": [], "agree_f1": [], "first_kl": [],
                                                  "first_agree": []} for m in methods}
    premise: dict[str, list[float]] = {"selected": [], "oracle": [], "spearman": []}
    per_layer: list[dict[str, list[float]]] = []
    use_premise = _bool(options.get("premise", "true"))
    strategy_answers = _bool(options.get("strategy_answers", "false"))
    answers: dict[str, list[str]] = {}  # each method's greedy answers, per question (full's included)
    skip = int(options.get("skip", "0"))
    examples = load_examples(data, limit=None if limit is None else skip + limit)[skip:]
    if not examples:
        raise ConfigError(f"no examples to run in {data} after skipping {skip}")
    prompt_tokens: list[int] = []
    if examples and _bool(options.get("warmup", "true")):
        # Untimed: the first touch of fresh memory is slow here, and it would land on whichever method runs first.
        docs = examples[0].documents()
        for eng in engines.values():
            eng.warm(docs)
        for mode in (ReuseMode.FULL, ReuseMode.PREFIX, ReuseMode.BLEND):
            engine.prefill(examples[0].question, docs, mode=mode)
    for ex in examples:
        docs = ex.documents()
        for eng in engines.values():
            eng.warm(docs)
        full_pre = engine.prefill(ex.question, docs, mode=ReuseMode.FULL)
        full_stats = copy.copy(engine.stats)
        prompt_tokens.append(full_pre.num_tokens)
        target: list[int] = []
        ref_rows = []
        for tok, logits in _greedy_with_logits(engine, copy.deepcopy(full_pre), max_new):
            target.append(tok)
            ref_rows.append(logits)
        ref = torch.stack(ref_rows)  # [T, V]
        full_answer = clean_answer(tokenizer.decode(target, skip_special_tokens=True))
        if use_premise:
            reuse_pre = engine.prefill(ex.question, docs, mode=ReuseMode.REUSE)
            pieces = engine.pieces(ex.question, docs)
            eligible = torch.zeros(full_pre.num_tokens, dtype=torch.bool)
            eligible[len(pieces.header) : full_pre.num_tokens - len(pieces.tail)] = True
            full_layers = engine.adapter.cache_layers(full_pre.cache)
            reused_layers = engine.adapter.cache_layers(reuse_pre.cache)
            for r in sorted({MAIN_RATIO, *ratios}):
                check = premise_check(full_layers, reused_layers, eligible, check_layer=base["check_layer"], ratio=r)
                suffix = "" if abs(r - MAIN_RATIO) < 1e-9 else f"_{round(r * 100)}"
                if not suffix:
                    per_layer.append(check)
                for key, values in check.items():
                    premise.setdefault(key + suffix, []).append(_mean(values))
            del reuse_pre
        for name, (eng, mode, cfg) in methods.items():
            if name == "full":
                pre, stats = full_pre, full_stats
            else:
                pre = eng.prefill(ex.question, docs, mode=mode, blend=cfg)
                stats = copy.copy(eng.stats)
            kl, top1, first_kl, first_agree = (0.0, 1.0, 0.0, 1.0) if name == "full" else _closeness(
                ref, eng.teacher_forced_logits(copy.deepcopy(pre), target))
            row = per[name]
            row["ttft"].append(stats.ttft_s)
            row["load"].append(stats.load_s)
            row["kl"].append(kl)
            row["top1"].append(top1)
            row["first_kl"].append(first_kl)
            row["first_agree"].append(first_agree)
            row["recomputed"].append(stats.recomputed_tokens / max(1, stats.prompt_tokens))
            if not name.startswith("strategy_") or strategy_answers:
                text = tokenizer.decode(list(eng.generate_ids(pre, max_new_tokens=max_new)), skip_special_tokens=True)
                row["f1"].append(f1_score(text.strip(), ex.answers))
                answers.setdefault(name, []).append(clean_answer(text))
                row["agree_exact"].append(float(clean_answer(text) == full_answer))
                row["agree_f1"].append(f1_score(clean_answer(text), [full_answer]))
                log.info("%s %s: ttft %.2fs kl %.4f top1 %.3f answer %r", ex.id, name, stats.ttft_s, kl, top1, text)
            del pre
    tmp.cleanup()
    out = _report(per, ratios, strategy_ratios, chosen, prompt_tokens, engine, examples)
    out.update(_answer_keys(per))
    out["answers"] = answers
    if premise["selected"]:
        out["premise_selected_share"] = _mean(premise["selected"])
        out["premise_oracle_share"] = _mean(premise["oracle"])
        out["premise_spearman"] = _mean(premise["spearman"])
        for key, values in premise.items():
            if key.count("_"):  # another ratio: premise_selected_share_30, premise_oracle_share_30
                name, pct = key.rsplit("_", 1)
                if name != "spearman":  # the ranking does not depend on the ratio
                    out[f"premise_{name}_share_{pct}"] = _mean(values)
        out["premise_ratio"] = MAIN_RATIO
        out["premise_check_layer"] = base["check_layer"]
        out["premise_per_layer"] = {k: [_mean([ex[k][i] for ex in per_layer]) for i in range(len(per_layer[0][k]))]
                                    for k in per_layer[0]}
    if verdict is not None:
        out["auto_qualification"] = {"qualified": verdict.qualified, "ratio": verdict.ratio, "reason": verdict.reason,
                                     "agreement": verdict.agreement, "seconds": verdict.seconds}
    return out


def _answer_keys(per: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """Answer agreement with full prefill, first-token closeness, gold F1 and TTFT speedup, per mode."""
    from ragzip.eval.metrics import paired_bootstrap_ci

    out: dict[str, Any] = {}
    full_ttft = sum(per["full"]["ttft"])
    # blend_30 -> blend30 (as MODE_KEYS spells the listed modes); strategies keep their method names
    names = {**{n: n.replace("_", "", 1) if n.startswith("blend_") else n for n in per
                if n.startswith(("blend_", "strategy_"))}, **MODE_KEYS}
    for name, suffix in names.items():
        row = per.get(name)
        if row is None or not row["agree_exact"]:
            continue
        out[f"agree_exact_{suffix}"] = _mean(row["agree_exact"])
        out[f"agree_exact_ci_{suffix}"] = list(paired_bootstrap_ci(row["agree_exact"]))
        out[f"agree_f1_{suffix}"] = _mean(row["agree_f1"])
        out[f"agree_f1_ci_{suffix}"] = list(paired_bootstrap_ci(row["agree_f1"]))
        out[f"first_token_kl_{suffix}"] = _mean(row["first_kl"])
        out[f"first_token_agree_{suffix}"] = _mean(row["first_agree"])
        out[f"f1_{suffix}"] = 100 * _mean(row["f1"])
        out[f"f1_minus_full_ci_{suffix}"] = list(paired_bootstrap_ci(
            [100 * (a - f) for a, f in zip(row["f1"], per["full"]["f1"])]))
        out[f"ttft_speedup_{suffix}"] = full_ttft / max(1e-9, sum(row["ttft"]))
    return out


def _floats(value: str | None, default: tuple[float, ...]) -> tuple[float, ...]:
    return default if value is None else tuple(float(r) for r in value.split(","))


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


def _report(per: dict[str, dict[str, list[float]]], ratios: tuple[float, ...], strategy_ratios: tuple[float, ...],
            strategies: list[str], prompt_tokens: list[int], engine: Any, examples: list[Any]) -> dict[str, Any]:
    from ragzip.eval.metrics import paired_bootstrap_ci, ratio_bootstrap_ci

    main = f"blend_{round(MAIN_RATIO * 100)}"
    if main not in per:
        main = f"blend_{round(ratios[len(ratios) // 2] * 100)}"
    full_ttft = sum(per["full"]["ttft"])
    kl_main, kl_reuse = per[main]["kl"], per["full_reuse"]["kl"]
    out: dict[str, Any] = {
        "num_examples": len(prompt_tokens),
        "example_ids": [ex.id for ex in examples],
        "mean_prompt_tokens": _mean([float(n) for n in prompt_tokens]),
        "ttft_speedup_vs_full": full_ttft / max(1e-9, sum(per[main]["ttft"])),
        "f1_full": 100 * _mean(per["full"]["f1"]),
        "f1_blend": 100 * _mean(per[main]["f1"]),
        "kl_blend": _mean(kl_main),
        "kl_full_reuse": _mean(kl_reuse),
        "top1_agreement_blend": _mean(per[main]["top1"]),
        "top1_agreement_full_reuse": _mean(per["full_reuse"]["top1"]),
        "kl_blend_vs_full_reuse": sum(kl_main) / max(1e-12, sum(kl_reuse)),
        "kl_blend_vs_full_reuse_ci": list(ratio_bootstrap_ci(kl_main, kl_reuse)),
        "f1_blend_minus_full_ci": list(paired_bootstrap_ci(
            [100 * (b - f) for b, f in zip(per[main]["f1"], per["full"]["f1"])])),
    }
    for name, row in per.items():
        out[f"ttft_s_{name}"] = _mean(row["ttft"])
        out[f"load_s_{name}"] = _mean(row["load"])
        out[f"speedup_{name}"] = full_ttft / max(1e-9, sum(row["ttft"]))
        if row["f1"]:
            out[f"f1_{name}"] = 100 * _mean(row["f1"])
        if name != "full":
            out[f"kl_{name}"] = _mean(row["kl"])
            out[f"top1_{name}"] = _mean(row["top1"])
            out[f"kl_ci_{name}"] = list(ratio_bootstrap_ci(row["kl"], [1.0] * len(row["kl"])))
    for sname in strategies:
        for r in strategy_ratios:
            row = per[f"strategy_{sname}_{round(r * 100)}"]
            suffix = "" if abs(r - MAIN_RATIO) < 1e-9 else f"_{round(r * 100)}"
            out[f"strategy_kl_{sname}{suffix}"] = _mean(row["kl"])
            out[f"strategy_top1_{sname}{suffix}"] = _mean(row["top1"])
            out[f"strategy_speedup_{sname}{suffix}"] = full_ttft / max(1e-9, sum(row["ttft"]))
    main_strategies = {s: _mean(per[f"strategy_{s}_{round(MAIN_RATIO * 100)}"]["kl"]) for s in strategies
                       if f"strategy_{s}_{round(MAIN_RATIO * 100)}" in per}
    if main_strategies:
        out["best_strategy"] = min(main_strategies, key=lambda s: main_strategies[s])
    out["per_method"] = {name: {k: v for k, v in row.items()} for name, row in per.items()}
    out["main_blend"] = main
    out["blend_config"] = _config_dict(engine.blend)
    out["self_check"] = None if engine.self_check is None else {
        "full_vs_reference": engine.self_check.full_vs_reference, "rerotation": engine.self_check.rerotation}
    out["time"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return out


def _config_dict(cfg: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return {k: (v.value if hasattr(v, "value") else v) for k, v in asdict(cfg).items()}
