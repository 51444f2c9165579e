"""Train lingua2's keep head: the token classifier's P(keep), read from the EXIT encoder's forward instead of a pass of
its own, so query-aware lingua2 runs one encoder pass where it ran two.

Distillation: the teacher is the shipped lingua2 classifier (its default path); the student is a two-layer head over
the frozen EXIT encoder's final states for ``[CLS] question [SEP] title \\n text [SEP]`` ([token state, token state *
query mean, CLS], the answer head's architecture), trained on the teacher's probabilities (soft binary cross-entropy).
Texts: SQuAD v1.1 dev paragraphs the EXIT encoder was already trained on (`lingua2_splits.exit_trained_paragraphs`)
with their questions, and the HotpotQA/MuSiQue questions it trained on (`train_meta.json`), so the tuning and
held-out files of `scripts/lingua2_splits.py` and the held-out multi-hop questions stay unseen. 10% of the texts
(by SHA-1) are held out for the agreement figures printed at the end.

    .venv/bin/python scripts/train_lingua2_keep.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lingua2_splits import REPO, exit_trained_paragraphs, read_squad  # noqa: E402

from ragzip.compressors.exit_encoder import WEIGHTS_DIR as EXIT_WEIGHTS  # noqa: E402
from ragzip.compressors.exit_encoder import build_rows, collate, load_scorer  # noqa: E402
from ragzip.compressors.lingua2 import Lingua2Compressor  # noqa: E402
from ragzip.compressors.lingua2_query import (  # noqa: E402
    KEEP_WEIGHTS_DIR,
    AnswerHead,
    AnswerHeadConfig,
    query_mean,
    save_answer_head,  # noqa: E402
)
from ragzip.eval.datasets import load_examples  # noqa: E402
from ragzip.text import split_sentences  # noqa: E402
from ragzip.tokens import get_token_counter  # noqa: E402

Text = tuple[str, str, str]  # (question, title, text)


def texts_of(data_root: Path, squad_questions: int, seed: int) -> list[Text]:
    rows = read_squad(data_root)
    seen = exit_trained_paragraphs(rows)
    pool = [ex for ex in rows if ex["contexts"][0]["text"] in seen]
    random.Random(seed).shuffle(pool)
    out: list[Text] = []
    paragraphs: set[str] = set()
    for ex in pool:
        ctx = ex["contexts"][0]
        if ctx["text"] not in paragraphs and len(paragraphs) < squad_questions:
            paragraphs.add(ctx["text"])
            out.append((ex["question"], ctx["title"].replace("_", " "), ctx["text"]))
    trained = json.loads((EXIT_WEIGHTS / "train_meta.json").read_text())
    ids = set(trained.get("train_ids", [])) | set(trained.get("hotpot_train_ids", []))
    for name in ("hotpotqa_train_hipporag100", "musique_train_hipporag100"):
        for ex in load_examples(data_root / name / "normalized.jsonl"):
            if ex.id in ids:
                out += [(ex.question, d.title, d.text) for d in ex.documents() if d.text.strip()]
    return out


def features(model, tokenizer, teacher: Lingua2Compressor, texts: list[Text], batch_size: int):
    """Per text window: (token states [T, H] fp16, query mean [H], cls [H], teacher P(keep) [T])."""
    out = []
    _, probs, _ = teacher.token_keep_probs([t for _, _, t in texts])
    encs = teacher.classifier.encode([t for _, _, t in texts])
    with torch.no_grad():
        rows, targets = [], []
        for (question, title, text), (_, offs), p in zip(texts, encs, probs):
            by_start = {int(a): float(x) for (a, _), x in zip(offs, p)}
            for r in build_rows(tokenizer, question, [(title, text, split_sentences(text))], model.config):
                rows.append(r)
                targets.append([by_start.get(c) if c >= 0 else None for c in r.char_starts])
        for lo in range(0, len(rows), batch_size):
            chunk, labs = rows[lo: lo + batch_size], targets[lo: lo + batch_size]
            batch = collate(chunk, int(tokenizer.pad_token_id or 0))
            states = model.states(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).float()
            qm = query_mean(states, batch["attention_mask"], batch["token_type_ids"])
            for b, lab in enumerate(labs):
                idx = [i for i, v in enumerate(lab) if v is not None]
                if idx:
                    out.append((states[b, idx].to(torch.float16), qm[b], states[b, 0],
                                torch.tensor([lab[i] for i in idx], dtype=torch.float32)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--squad-paragraphs", type=int, default=2500)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--output", type=Path, default=KEEP_WEIGHTS_DIR)
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    texts = texts_of(args.data_root, args.squad_paragraphs, args.seed)

    def is_dev(t: Text) -> bool:  # held out by text, so no text is on both sides
        return int(hashlib.sha1(t[2].encode()).hexdigest(), 16) % 10 == 0

    model, tokenizer = load_scorer(None, dtype="auto")
    teacher = Lingua2Compressor(get_token_counter("whitespace"), query_aware="off")
    t0 = time.perf_counter()
    train = features(model, tokenizer, teacher, [t for t in texts if not is_dev(t)], 32)
    dev = features(model, tokenizer, teacher, [t for t in texts if is_dev(t)], 32)
    tokens = sum(len(x[3]) for x in train)
    print(f"features: {len(train)} train windows ({tokens} tokens) / {len(dev)} dev in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    head = AnswerHead(AnswerHeadConfig(hidden_size=int(model.encoder.config.hidden_size)))
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * (len(train) // 32 + 1))

    def evaluate() -> dict[str, float]:
        head.eval()
        with torch.inference_mode():
            pred = np.concatenate([torch.sigmoid(head(s.float().unsqueeze(0), q.unsqueeze(0), c.unsqueeze(0))[0])
                                   .numpy() for s, q, c, _ in dev])
        target = np.concatenate([lab.numpy() for *_, lab in dev])
        # agreement on what the teacher keeps at rate 0.5 (its top half of tokens), and the probabilities' error
        top = target >= np.median(target)
        return {"mae": float(np.abs(pred - target).mean()), "corr": float(np.corrcoef(pred, target)[0, 1]),
                "top_half_agreement": float(((pred >= np.median(pred)) == top).mean())}

    for epoch in range(args.epochs):
        head.train()
        order = torch.randperm(len(train)).tolist()
        total = 0.0
        for lo in range(0, len(order), 32):
            batch = [train[i] for i in order[lo: lo + 32]]
            loss = torch.zeros(())
            for states, qm, cls, target in batch:
                logits = head(states.float().unsqueeze(0), qm.unsqueeze(0), cls.unsqueeze(0))[0]
                loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
            loss = loss / len(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(batch)
        print(f"epoch {epoch + 1}: train loss {total / len(train):.4f}, dev {evaluate()}", flush=True)
    meta = {"texts": len(texts), "train_windows": len(train), "train_tokens": tokens, "dev_windows": len(dev),
            "epochs": args.epochs, "seed": args.seed, "dev": {k: round(v, 4) for k, v in evaluate().items()},
            "teacher": "lingua2 classifier (shipped, default dtype)", "seconds": round(time.perf_counter() - t0, 1),
            "torch": torch.__version__}
    save_answer_head(head, args.output, meta)
    print(meta)


if __name__ == "__main__":
    main()
