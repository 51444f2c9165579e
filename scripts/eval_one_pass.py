"""lingua2 with the question: one encoder pass (keep head) vs two (the classifier's own pass), on held-out data.

Answer survival (a gold answer still in the compressed text) at rate 0.5, 0.33 and the auto budget, kept-token
rate, identical kept words, and seconds, side by side on the same inputs in one process (paired 95% CIs). With
`--reader-limit N`, the packaged Qwen2.5-Coder-0.5B reader also answers the first N SQuAD questions from both
compressions at rate 0.33 (the tightest budget) and at the auto default: F1 and the gold answer's NLL per token,
paired.

    .venv/bin/python scripts/lingua2_splits.py --out /tmp/l2splits
    .venv/bin/python scripts/eval_one_pass.py --squad /tmp/l2splits/squad_heldout.jsonl \\
        --hotpot ../shared/data/hotpotqa_train_hipporag100/normalized.jsonl --json docs/results/one_pass.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from ragzip.budget import Budget
from ragzip.compressors.lingua2 import Lingua2Compressor
from ragzip.eval.datasets import load_examples
from ragzip.eval.metrics import answer_survival, f1_score, paired_bootstrap_ci
from ragzip.eval.suites.extractive import trained_ids
from ragzip.pipeline import build_compressor
from ragzip.tokens import get_token_counter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--squad", type=Path, required=True)
    parser.add_argument("--hotpot", type=Path, required=True)
    parser.add_argument("--hotpot-limit", type=int, default=40)
    parser.add_argument("--reader-limit", type=int, default=0)
    parser.add_argument("--method", default="lingua2", help="lingua2, or a pipeline ending in lingua2 such as "
                        "exit+lingua2 (one pass: the EXIT stage and lingua2 share one forward)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    skip = trained_ids()
    sets = {"squad": load_examples(args.squad),
            "hotpot": [ex for ex in load_examples(args.hotpot) if ex.id not in skip][: args.hotpot_limit]}
    counter = get_token_counter(None)
    out: dict = {"counter": counter.name}
    if args.method == "lingua2":
        variants = {"one_pass": Lingua2Compressor(counter, one_pass=True),
                    "two_pass": Lingua2Compressor(counter, one_pass=False)}
    else:
        variants = {name: build_compressor(args.method, counter=counter, options={"lingua2": {"one_pass": flag}})
                    for name, flag in (("one_pass", True), ("two_pass", False))}
    out["method"] = args.method
    budgets = {"rate0.5": Budget.ratio(0.5), "rate0.33": Budget.ratio(0.33), "auto": Budget.auto()}
    for comp in variants.values():
        comp.compress("warm up?", ["A warm-up sentence. Another one."])
    for set_name, examples in sets.items():
        out[f"{set_name}.n"] = len(examples)
        for b_name, budget in budgets.items():
            surv = {v: [] for v in variants}
            rate = {v: [] for v in variants}
            secs = {v: [] for v in variants}
            same = []
            for ex in examples:
                texts = {}
                for v, comp in variants.items():
                    start = time.perf_counter()
                    res = comp.compress(ex.question, ex.documents(), budget)
                    secs[v].append(time.perf_counter() - start)
                    surv[v].append(answer_survival(res.text, ex.answers))
                    rate[v].append(res.tokens_after / max(1, res.tokens_before))
                    texts[v] = res.text
                same.append(float(texts["one_pass"] == texts["two_pass"]))
            key = f"{set_name}.{b_name}"
            for v in variants:
                out[f"{key}.{v}.answer_survival"] = round(statistics.fmean(surv[v]), 4)
                out[f"{key}.{v}.rate"] = round(statistics.fmean(rate[v]), 4)
                out[f"{key}.{v}.ms_median"] = round(1000 * statistics.median(secs[v]), 1)
            diff = [a - b for a, b in zip(surv["one_pass"], surv["two_pass"])]
            out[f"{key}.survival_delta"] = round(statistics.fmean(diff), 4)
            out[f"{key}.survival_delta_ci"] = [round(x, 4) for x in paired_bootstrap_ci(diff)]
            out[f"{key}.identical_text"] = round(statistics.fmean(same), 4)
            print(key, {k.split(".", 2)[2]: v for k, v in out.items() if k.startswith(key + ".")}, flush=True)
    if args.reader_limit:
        out.update(_reader(sets["squad"][: args.reader_limit], variants))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


def _reader(examples: list, variants: dict) -> dict:
    from ragzip.eval.reader import Reader

    reader = Reader()
    out: dict = {"reader": reader.name, "reader.n": len(examples)}
    for label, budget in (("rate0.33", Budget.ratio(0.33)), ("auto", Budget.auto())):
        f1: dict[str, list[float]] = {v: [] for v in variants}
        nll: dict[str, list[float]] = {v: [] for v in variants}
        for ex in examples:
            for v, comp in variants.items():
                res = comp.compress(ex.question, ex.documents(), budget)
                read = reader.read(ex.question, res.as_documents(), ex.answers)
                f1[v].append(f1_score(read.answer, ex.answers))
                nll[v].append(float(read.nll))
        for v in variants:
            out[f"reader.{label}.{v}.f1"] = round(statistics.fmean(f1[v]), 4)
            out[f"reader.{label}.{v}.nll"] = round(statistics.fmean(nll[v]), 4)
        for name, values in (("f1", f1), ("nll", nll)):
            diff = [a - b for a, b in zip(values["one_pass"], values["two_pass"])]
            out[f"reader.{label}.{name}_delta"] = round(statistics.fmean(diff), 4)
            out[f"reader.{label}.{name}_delta_ci"] = [round(x, 4) for x in paired_bootstrap_ci(diff)]
        print({k: v for k, v in out.items() if k.startswith(f"reader.{label}")}, flush=True)
    return out


if __name__ == "__main__":
    main()
