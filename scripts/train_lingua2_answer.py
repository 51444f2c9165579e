"""Train lingua2's answer head: which document tokens answer the question, from the EXIT encoder's token states.

The EXIT encoder stays frozen (its sentence scores do not change); its final states for ``[CLS] question [SEP]
title \\n paragraph [SEP]`` are computed once per question, and a two-layer head learns P(token is part of a gold
answer) from [token state, token state * query mean, CLS]. Training questions: SQuAD v1.1 dev questions on the
paragraphs the EXIT encoder was already trained on (`lingua2_splits.exit_trained_paragraphs`), so the tuning and
held-out files of `scripts/lingua2_splits.py` stay unseen by both models. 10% of the training paragraphs are
held out for the token ROC AUC printed at the end.

    .venv/bin/python scripts/train_lingua2_answer.py
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lingua2_splits import REPO, exit_trained_paragraphs, read_squad  # noqa: E402

from ragzip.compressors.exit_encoder import build_rows, collate, load_scorer  # noqa: E402
from ragzip.compressors.lingua2_query import (  # noqa: E402
    WEIGHTS_DIR,
    AnswerHead,
    AnswerHeadConfig,
    query_mean,
    save_answer_head,
)
from ragzip.text import split_sentences  # noqa: E402


def answer_chars(text: str, answers: list[str]) -> list[tuple[int, int]]:
    out = []
    for a in {a.strip() for a in answers if a.strip()}:
        start = text.find(a)
        while start >= 0:
            out.append((start, start + len(a)))
            start = text.find(a, start + 1)
    return out


def features(model, tokenizer, examples, batch_size: int):
    """Per question: (doc token states [T, H] fp16, query mean [H], cls [H], labels [T])."""
    out = []
    with torch.no_grad():  # not inference_mode: the states feed the head's autograd graph
        for lo in range(0, len(examples), batch_size):
            chunk = examples[lo: lo + batch_size]
            rows, labels = [], []
            for ex in chunk:
                ctx = ex["contexts"][0]
                title = ctx["title"].replace("_", " ")
                r = build_rows(tokenizer, ex["question"], [(title, ctx["text"], split_sentences(ctx["text"]))],
                               model.config)[0]  # SQuAD paragraphs fit one window
                spans = answer_chars(ctx["text"], ex["answers"])
                rows.append(r)
                labels.append([any(a <= c < b for a, b in spans) if c >= 0 else None for c in r.char_starts])
            batch = collate(rows, int(tokenizer.pad_token_id or 0))
            states = model.states(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).float()
            qm = query_mean(states, batch["attention_mask"], batch["token_type_ids"])
            for b, lab in enumerate(labels):
                idx = [i for i, v in enumerate(lab) if v is not None]
                out.append((states[b, idx].to(torch.float16), qm[b], states[b, 0],
                            torch.tensor([lab[i] for i in idx], dtype=torch.float32)))
    return out


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    order = np.argsort(scores)
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    pos = labels > 0
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / max(1, n_pos * n_neg))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--questions", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--output", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    rows = read_squad(args.data_root)
    seen = exit_trained_paragraphs(rows)
    pool = [ex for ex in rows if ex["contexts"][0]["text"] in seen and answer_chars(ex["contexts"][0]["text"],
                                                                                     ex["answers"])]
    random.Random(args.seed).shuffle(pool)
    pool = pool[: args.questions]

    def is_dev(ex: dict) -> bool:  # held out by paragraph, so no paragraph is on both sides
        return int(hashlib.sha1(ex["contexts"][0]["text"].encode()).hexdigest(), 16) % 10 == 0

    model, tokenizer = load_scorer(None, dtype="auto")
    t0 = time.perf_counter()
    train = features(model, tokenizer, [e for e in pool if not is_dev(e)], 16)
    dev = features(model, tokenizer, [e for e in pool if is_dev(e)], 16)
    print(f"features: {len(train)} train / {len(dev)} dev questions in {time.perf_counter() - t0:.0f} s", flush=True)
    head = AnswerHead(AnswerHeadConfig(hidden_size=int(model.encoder.config.hidden_size)))
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.01)
    pos_weight = torch.tensor(4.0)
    for epoch in range(args.epochs):
        head.train()
        order = torch.randperm(len(train)).tolist()
        total = 0.0
        for lo in range(0, len(order), 32):
            batch = [train[i] for i in order[lo: lo + 32]]
            loss = torch.zeros(())
            for states, qm, cls, lab in batch:
                logits = head(states.float().unsqueeze(0), qm.unsqueeze(0), cls.unsqueeze(0))[0]
                loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(logits, lab,
                                                                                  pos_weight=pos_weight)
            loss = loss / len(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(batch)
        head.eval()
        with torch.inference_mode():
            scores = np.concatenate([head(s.float().unsqueeze(0), q.unsqueeze(0), c.unsqueeze(0))[0].numpy()
                                     for s, q, c, _ in dev])
        labels = np.concatenate([lab.numpy() for *_, lab in dev])
        print(f"epoch {epoch + 1}: train loss {total / len(train):.4f}, dev token AUC {auc(scores, labels):.4f}",
              flush=True)
    meta = {"questions": len(pool), "train": len(train), "dev": len(dev), "epochs": args.epochs, "seed": args.seed,
            "dev_token_auc": round(auc(scores, labels), 4), "seconds": round(time.perf_counter() - t0, 1),
            "torch": torch.__version__}
    save_answer_head(head, args.output, meta)
    print(meta)


if __name__ == "__main__":
    main()
