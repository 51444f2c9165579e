"""Rebuild ragzip/data/demo_corpus.json: the demo's SQuAD paragraphs and questions, chosen by a fixed rule.

    .venv/bin/python scripts/build_demo_corpus.py

Rule (no hand picking): the articles in ARTICLES; in each, in SQuAD order, the first PER_ARTICLE paragraphs that
the shipped EXIT encoder never trained on and that are not among the calibration's tuning passages
(`scripts/lingua2_splits.py`); each paragraph's first question is asked. The demo retrieves among all paragraphs,
so an article's other paragraphs are the distractors.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from calibrate_auto import squad_tune  # noqa: E402
from lingua2_splits import exit_trained_paragraphs, read_squad  # noqa: E402

ARTICLES = ("Nikola_Tesla", "Oxygen", "Apollo_program", "Rhine", "Black_Death", "Geology",
            "Pharmacy", "Immune_system", "Chloroplast", "Prime_number", "Steam_engine", "Packet_switching",
            "Ctenophora")
PER_ARTICLE = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "ragzip" / "data" / "demo_corpus.json")
    args = parser.parse_args()
    rows = read_squad(args.data_root)
    excluded = exit_trained_paragraphs(rows) | {ex["contexts"][0]["text"] for ex in squad_tune(args.data_root, 200)}
    documents, questions = [], []
    for article in ARTICLES:
        seen: dict[str, dict] = {}
        for ex in rows:
            ctx = ex["contexts"][0]
            if ctx["title"] == article and ctx["text"] not in excluded:
                seen.setdefault(ctx["text"], ex)
        for k, (text, ex) in enumerate(list(seen.items())[:PER_ARTICLE]):
            doc_id = f"{article}-{k}"
            documents.append({"id": doc_id, "title": article.replace("_", " "), "text": text})
            questions.append({"question": ex["question"], "answers": list(dict.fromkeys(ex["answers"])),
                              "source": doc_id, "squad_id": ex["id"]})
    args.out.write_text(json.dumps({"documents": documents, "questions": questions}, ensure_ascii=False, indent=1)
                        + "\n", encoding="utf-8")
    print(json.dumps({"documents": len(documents), "questions": len(questions)}))


if __name__ == "__main__":
    main()
