"""Fit the `auto` budget's calibrations (isotonic, score -> P(needed)) on the tuning split; ships them as JSON.

One command reproduces both files (deterministic; ~3 min on the 2-core machine):

    .venv/bin/python scripts/calibrate_auto.py

* EXIT (`compressors/weights/exit_encoder/calibration.json`): a sentence's score -> P(it is needed evidence).
  Labels: HotpotQA supporting-fact sentences (the ten tuning questions of `train_exit_encoder.py`, 10 paragraphs
  each), and SQuAD's answer sentence on the tuning passages of `scripts/lingua2_splits.py` (free of both models'
  training data), read alone and in a distractor setting (with nine other tuning passages).
* lingua2 (`compressors/weights/lingua2/calibration.json`): a word's query-aware score -> P(it is part of a gold
  answer), on the same SQuAD tuning passages read alone.

The held-out questions (HotpotQA / MuSiQue past the first 60 by SHA-1, the SQuAD held-out file) are never read.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from lingua2_splits import fresh_passages, read_squad  # noqa: E402

from ragzip.compressors.calibration import CALIBRATION_FILE, fit_isotonic  # noqa: E402
from ragzip.compressors.exit import ExitCompressor  # noqa: E402
from ragzip.compressors.exit_encoder import WEIGHTS_DIR as EXIT_DIR  # noqa: E402
from ragzip.compressors.lingua2 import Lingua2Compressor  # noqa: E402
from ragzip.compressors.lingua2_model import WEIGHTS_DIR as LINGUA2_DIR  # noqa: E402
from ragzip.eval.datasets import load_examples, sentence_spans  # noqa: E402
from ragzip.tokens import get_token_counter  # noqa: E402
from ragzip.types import Document  # noqa: E402

HOTPOT_TUNE = slice(50, 60)  # train_exit_encoder.py: the lowest 50 ids by SHA-1 train, the next ten tune


def sha_order(ids: list[str]) -> list[str]:
    return sorted(ids, key=lambda i: hashlib.sha1(i.encode()).hexdigest())


def squad_tune(data_root: Path, n: int) -> list[dict]:
    """The tuning passages of scripts/lingua2_splits.py (one question per passage), rebuilt the same way."""
    return fresh_passages(read_squad(data_root))[:n]


def answer_span(text: str, answers: list[str]) -> tuple[int, int] | None:
    for a in answers:
        at = text.find(a)
        if a and at >= 0:
            return at, at + len(a)
    return None


def exit_points(exit_: ExitCompressor, query: str, docs: list[Document], gold: list[list[tuple[int, int]]]
                ) -> tuple[list[float], list[int]]:
    """(scores, labels) of every candidate sentence; a sentence is needed when it covers a gold span's middle."""
    scores, labels = [], []
    for d, cands in enumerate(exit_.score(query, docs)):
        for c in cands:
            scores.append(c.score)
            labels.append(int(any(c.start <= (a + b) // 2 < c.end for a, b in gold[d])))
    return scores, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--squad", type=int, default=200, help="SQuAD tuning passages")
    parser.add_argument("--out-exit", type=Path, default=EXIT_DIR / CALIBRATION_FILE)
    parser.add_argument("--out-lingua2", type=Path, default=LINGUA2_DIR / CALIBRATION_FILE)
    args = parser.parse_args()
    cfg = json.loads((REPO / "scripts/configs/exit_encoder.json").read_text())
    counter = get_token_counter(None)
    exit_ = ExitCompressor(counter)
    xs: list[float] = []
    ys: list[int] = []

    hotpot = {ex.id: ex for ex in load_examples(args.data_root / cfg["hotpot"])}
    for qid in sha_order(list(hotpot))[HOTPOT_TUNE]:
        ex = hotpot[qid]
        docs = ex.documents()
        gold = []
        for ctx in ex.contexts:
            spans = sentence_spans(ctx.text, ctx.sentences or ())
            gold.append([spans[i] for i in ctx.supporting_sentence_ids if i < len(spans)])
        s, y = exit_points(exit_, ex.question, docs, gold)
        xs += s
        ys += y
    n_hotpot = len(xs)

    passages = squad_tune(args.data_root, args.squad)
    rng = random.Random(13)
    single = [(ex, answer_span(ex["contexts"][0]["text"], ex["answers"])) for ex in passages]
    single = [(ex, span) for ex, span in single if span is not None]
    for k, (ex, span) in enumerate(single):
        ctx = ex["contexts"][0]
        own = Document("q", ctx["text"], ctx.get("title", ""))
        s, y = exit_points(exit_, ex["question"], [own], [[span]])
        xs += s
        ys += y
        if k % 2 == 0:  # the distractor setting: the passage among nine others, in a random position
            others = [o for j, (o, _) in enumerate(single) if j != k]
            picked = [Document(f"o{j}", o["contexts"][0]["text"], o["contexts"][0].get("title", ""))
                      for j, o in enumerate(rng.sample(others, 9))]
            at = rng.randrange(10)
            docs = picked[:at] + [own] + picked[at:]
            gold = [[span] if d is own else [] for d in docs]
            s, y = exit_points(exit_, ex["question"], docs, gold)
            xs += s
            ys += y
    cal = fit_isotonic(xs, ys, fitted_on=(f"EXIT encoder sentence scores (default options): {n_hotpot} HotpotQA "
                                          f"tuning sentences, {len(xs) - n_hotpot} SQuAD tuning sentences "
                                          f"({sum(ys)} needed of {len(xs)}); scripts/calibrate_auto.py"))
    args.out_exit.write_text(json.dumps(cal.to_json(), indent=1) + "\n")
    print(json.dumps({"exit": {"points": len(xs), "positives": sum(ys), "knots": len(cal.xs)}}))

    lingua = Lingua2Compressor(counter)
    wx: list[float] = []
    wy: list[int] = []
    for ex, span in single:
        ctx = ex["contexts"][0]
        doc = Document("q", ctx["text"], ctx.get("title", ""))
        scores, _ = lingua.unit_scores(ex["question"], [doc])
        units, score = scores[0].units, scores[0].score
        spans = [s for s in (answer_span(ctx["text"], [a]) for a in ex["answers"]) if s is not None]
        label = np.array([any(u0 < s1 and s0 < u1 for s0, s1 in spans) for u0, u1 in units], dtype=int)
        wx += score.tolist()
        wy += label.tolist()
    cal2 = fit_isotonic(wx, wy, fitted_on=(f"lingua2 word scores with the question (default options): {len(single)} "
                                           f"SQuAD tuning passages ({sum(wy)} answer words of {len(wx)}); "
                                           f"scripts/calibrate_auto.py"))
    args.out_lingua2.write_text(json.dumps(cal2.to_json(), indent=1) + "\n")
    print(json.dumps({"lingua2": {"points": len(wx), "positives": sum(wy), "knots": len(cal2.xs)}}))


if __name__ == "__main__":
    main()
