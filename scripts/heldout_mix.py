"""Write the held-out question mix `docs/auto.md` judges with a reader (n=120, common schema):

    .venv/bin/python scripts/lingua2_splits.py --out /tmp/l2splits
    .venv/bin/python scripts/heldout_mix.py --squad /tmp/l2splits/squad_heldout.jsonl --out /tmp/heldout_mix.jsonl
    .venv/bin/ragzip eval fidelity --data /tmp/heldout_mix.jsonl --methods none,exit --json OUT.json

HotpotQA and MuSiQue: the questions past the first 60 by SHA-1 of the id (the first 50 trained the EXIT encoder,
the next 10 tuned it and its calibration); SQuAD: the first 40 held-out passages of `scripts/lingua2_splits.py`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--squad", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    lines: list[str] = []
    for name in ("hotpotqa_train_hipporag100", "musique_train_hipporag100"):
        rows = {json.loads(line)["id"]: line.rstrip("\n")
                for line in (args.data_root / name / "normalized.jsonl").read_text(encoding="utf-8").splitlines()
                if line.strip()}
        lines += [rows[i] for i in sorted(rows, key=lambda i: hashlib.sha1(i.encode()).hexdigest())[60:]]
    lines += args.squad.read_text(encoding="utf-8").splitlines()[:40]
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(json.dumps({"questions": len(lines)}))


if __name__ == "__main__":
    main()
