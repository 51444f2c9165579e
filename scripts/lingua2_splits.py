"""Tuning and held-out single-passage QA splits for the token compressor, free of the EXIT scorer's training data.

The query-aware lingua2 default ranks sentences with the EXIT encoder, which was trained on 2,500 SQuAD v1.1 dev
questions (`scripts/train_exit_encoder.py`, seed 13). Those questions are rebuilt exactly as that script draws
them, and every question whose paragraph was a positive training paragraph is excluded; the rest are split by
SHA-1 of the id into a tuning file and a held-out file (common schema), written to `--out`.

    .venv/bin/python scripts/lingua2_splits.py --out /tmp/l2splits
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def read_squad(data_root: Path) -> list[dict]:
    cfg = json.loads((REPO / "scripts/configs/exit_encoder.json").read_text())
    with gzip.open(data_root / cfg["squad"], "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def exit_trained_paragraphs(rows: list[dict]) -> set[str]:
    """The SQuAD paragraphs that were positive training paragraphs of the shipped EXIT encoder."""
    cfg = json.loads((REPO / "scripts/configs/exit_encoder.json").read_text())
    drawn = list(rows)
    random.Random(cfg["seed"]).shuffle(drawn)  # the training script's first use of its generator
    return {ex["contexts"][0]["text"] for ex in drawn[: cfg["squad_questions"]]}


def fresh_passages(rows: list[dict]) -> list[dict]:
    """One question per paragraph the EXIT encoder never trained on, in SHA-1 order of the question id: the first
    200 are the tuning split, the next 300 the held-out one (so that n counts distinct passages)."""
    seen = exit_trained_paragraphs(rows)
    fresh = sorted((ex for ex in rows if ex["contexts"][0]["text"] not in seen),
                   key=lambda ex: hashlib.sha1(ex["id"].encode()).hexdigest())
    by_passage: dict[str, dict] = {}
    for ex in fresh:
        by_passage.setdefault(ex["contexts"][0]["text"], ex)
    return list(by_passage.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tune", type=int, default=200)
    parser.add_argument("--held-out", type=int, default=300)
    args = parser.parse_args()
    rows = read_squad(args.data_root)
    seen = exit_trained_paragraphs(rows)
    fresh = [ex for ex in rows if ex["contexts"][0]["text"] not in seen]
    picked = fresh_passages(rows)
    tune, held = picked[: args.tune], picked[args.tune: args.tune + args.held_out]
    args.out.mkdir(parents=True, exist_ok=True)
    for name, part in (("tune", tune), ("heldout", held)):
        with (args.out / f"squad_{name}.jsonl").open("w", encoding="utf-8") as fh:
            for ex in part:
                fh.write(json.dumps(ex, ensure_ascii=False) + "\n")
    print(json.dumps({"exit_trained_paragraphs": len(seen), "fresh_questions": len(fresh),
                      "fresh_paragraphs": len(picked), "tune": len(tune), "heldout": len(held)}))


if __name__ == "__main__":
    main()
