"""Answer survival of the auto default on held-out questions, next to the previous default and the baselines at the
tokens auto kept (docs/auto.md's survival tables). HotpotQA's sentence recall comes from `ragzip eval extractive`.

    .venv/bin/python scripts/lingua2_splits.py --out /tmp/l2splits      # the SQuAD held-out passages
    .venv/bin/python scripts/eval_auto.py --squad /tmp/l2splits/squad_heldout.jsonl \
        --out docs/results/auto_survival.json

Sets: MuSiQue past the first 60 ids by SHA-1 (20 paragraphs a question; the first 60 trained or tuned the encoder)
and the SQuAD held-out passages of `scripts/lingua2_splits.py` (single passages with their question). Rows: each
method's default (auto) budget, the previous default (EXIT's 0.5 threshold, lingua2's rate 0.5), and `embed-topk`
and `random` at the tokens EXIT's auto kept on each question; paired bootstrap CIs of EXIT auto minus each row.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
from pathlib import Path
from typing import Any

from ragzip.budget import Budget
from ragzip.eval.datasets import load_examples
from ragzip.eval.metrics import answer_survival, paired_bootstrap_ci
from ragzip.pipeline import build_compressor
from ragzip.tokens import get_token_counter

REPO = Path(__file__).resolve().parents[1]


def held_out_musique(data_root: Path) -> list[Any]:
    examples = {e.id: e for e in load_examples(data_root / "musique_train_hipporag100")}
    return [examples[i] for i in sorted(examples, key=lambda i: hashlib.sha1(i.encode()).hexdigest())[60:]]


def survival_table(examples: list[Any], counter: Any) -> dict[str, Any]:
    docs = [e.documents() for e in examples]
    exit_ = build_compressor("exit", counter=counter)
    auto = [exit_.compress(e.question, d) for e, d in zip(examples, docs)]
    runs = {"exit (auto)": auto,
            "exit threshold 0.5 (previous default)": [exit_.compress(e.question, d, Budget.score(0.5))
                                                      for e, d in zip(examples, docs)]}
    lingua = build_compressor("lingua2", counter=counter)
    runs["lingua2 (auto)"] = [lingua.compress(e.question, d) for e, d in zip(examples, docs)]
    runs["lingua2 rate 0.5 (previous default)"] = [lingua.compress(e.question, d, Budget.ratio(0.5))
                                                   for e, d in zip(examples, docs)]
    for name in ("embed-topk", "random"):
        comp = build_compressor(name, counter=counter)
        runs[f"{name} at exit-auto's tokens"] = [comp.compress(e.question, d, Budget.tokens(max(1, a.tokens_after)))
                                                 for e, d, a in zip(examples, docs, auto)]
    full = [answer_survival("\n\n".join(x.text for x in d), e.answers) for e, d in zip(examples, docs)]
    mine = [answer_survival(r.text, e.answers) for e, r in zip(examples, auto)]
    rows = {}
    for name, results in runs.items():
        kept = [answer_survival(r.text, e.answers) for e, r in zip(examples, results)]
        rows[name] = {"answer_survival": statistics.fmean(kept), "rate": statistics.fmean(r.rate or 0 for r in results),
                      "guarded": sum(1 for r in results if r.auto and r.auto.get("guard")),
                      "exit_auto_minus_ci": list(paired_bootstrap_ci([a - b for a, b in zip(mine, kept)]))}
    return {"n": len(examples), "uncompressed_answer_survival": statistics.fmean(full), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--squad", type=Path, required=True, help="scripts/lingua2_splits.py's squad_heldout.jsonl")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    counter = get_token_counter(None)
    out = {"musique_heldout": survival_table(held_out_musique(args.data_root), counter),
           "squad_heldout": survival_table(load_examples(args.squad), counter)}
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    for name, table in out.items():
        print(f"{name} (n={table['n']}, uncompressed survival {table['uncompressed_answer_survival']:.3f})")
        for row, figs in table["rows"].items():
            print(f"  {row:42s} survival {figs['answer_survival']:.3f} rate {figs['rate']:.3f} "
                  f"guarded {figs['guarded']} auto-minus CI {figs['exit_auto_minus_ci']}")


if __name__ == "__main__":
    main()
