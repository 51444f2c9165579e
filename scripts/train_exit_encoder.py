"""Train the EXIT-style one-pass encoder sentence scorer shipped in compressors/weights/exit_encoder/.

One command reproduces the shipped weights (single thread, fixed seed, fixed step count):

    OMP_NUM_THREADS=1 .venv/bin/python scripts/train_exit_encoder.py --config scripts/configs/exit_encoder.json

Data (../shared/data, common schema): SQuAD v1.1 dev -- the sentence holding the answer is positive, the other
sentences of the paragraph negative; HotpotQA train -- supporting-fact sentences positive, the other sentences of
the gold paragraphs hard negatives, distractor-paragraph sentences negatives. HotpotQA is split by SHA-1 of the id:
the lowest ids are trained on, the next few calibrate the logit bias (so the default threshold 0.5 meets a target
recall), the rest are held out; trained and calibration ids go to train_meta.json so evaluation can exclude them.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ragzip.compressors.exit_encoder import (
    EncoderScorerConfig,
    SentenceSpanScorer,
    build_rows,
    collate,
    load_base_encoder,
    num_slots,
    save_scorer,
    score_documents,
    slot_map,
)
from ragzip.eval.datasets import sentence_spans
from ragzip.retrieval.sentences import split_sentences

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class DocExample:
    """One (query, document) pair with a 0/1 label per candidate sentence."""

    query: str
    title: str
    text: str
    spans: tuple[tuple[int, int], ...]
    labels: tuple[int, ...]
    source: str


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def gold_sentence_spans(context: dict[str, Any]) -> list[tuple[int, int]]:
    """Char spans of the dataset's own sentences inside `text` (whitespace trimmed)."""
    return sentence_spans(context["text"], context.get("sentences") or [])


def label_by_overlap(spans: list[tuple[int, int]], positives: list[tuple[int, int]]) -> list[int]:
    """1 for a candidate sentence that covers at least half of a positive span or half of itself is positive."""
    out = []
    for a, b in spans:
        hit = 0
        for p, q in positives:
            ov = min(b, q) - max(a, p)
            if ov > 0 and ov >= 0.5 * min(b - a, q - p):
                hit = 1
        out.append(hit)
    return out


def squad_examples(path: Path, limit: int, rng: random.Random) -> list[DocExample]:
    rows = list(read_jsonl(path))
    rng.shuffle(rows)
    out: list[DocExample] = []
    for ex in rows:
        ctx = ex["contexts"][0]
        text = ctx["text"]
        starts = [text.find(a) for a in ex["answers"] if a and text.find(a) >= 0]
        if not starts:
            continue
        spans = split_sentences(text)
        answer_spans = [(s, s + 1) for s in starts]
        labels = [int(any(a <= s < b for s, _ in answer_spans)) for a, b in spans]
        if sum(labels) == 0 or len(spans) < 2:
            continue
        title = ctx["title"].replace("_", " ")
        out.append(DocExample(ex["question"], title, text, tuple(spans), tuple(labels), "squad"))
        if len(out) >= limit:
            break
    return out


def hotpot_split(path: Path, num_train: int, num_calibration: int) -> tuple[list[Any], list[Any], list[Any]]:
    """(train, calibration, held-out) questions, by SHA-1 of the id."""
    rows = sorted(read_jsonl(path), key=lambda ex: hashlib.sha1(ex["id"].encode()).hexdigest())
    cut = num_train + num_calibration
    return rows[:num_train], rows[num_train:cut], rows[cut:]


def hotpot_examples(rows: list[dict[str, Any]]) -> list[DocExample]:
    out: list[DocExample] = []
    for ex in rows:
        for ctx in ex["contexts"]:
            gold = gold_sentence_spans(ctx)
            positives = [gold[i] for i in ctx.get("supporting_sentence_ids") or [] if i < len(gold)]
            spans = split_sentences(ctx["text"])
            if not spans:
                continue
            labels = label_by_overlap(spans, positives)
            out.append(DocExample(ex["question"], ctx["title"], ctx["text"], tuple(spans), tuple(labels), "hotpot"))
    return out


def batches(examples: list[DocExample], batch_size: int, rng: random.Random) -> list[list[DocExample]]:
    """Shuffle, then sort inside pools of 8 batches by length so a batch pads little."""
    items = examples[:]
    rng.shuffle(items)
    pool = batch_size * 8
    out = []
    for i in range(0, len(items), pool):
        chunk = sorted(items[i:i + pool], key=lambda e: len(e.text))
        out.extend(chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size))
    rng.shuffle(out)
    return out


def step_inputs(model: SentenceSpanScorer, tokenizer: Any,
                batch: list[DocExample]) -> tuple[dict[str, Any], torch.Tensor]:
    rows, targets = [], []
    for e in batch:
        r = build_rows(tokenizer, e.query, [(e.title, e.text, e.spans)], model.config)
        rows.extend(r)
        targets.extend([[e.labels[s] for _, s in slots] for slots in slot_map(r)])
    k = max(1, num_slots(rows))
    target = torch.zeros(len(rows), k)
    for b, t in enumerate(targets):
        target[b, :len(t)] = torch.tensor(t, dtype=torch.float32)
    return {**collate(rows, int(tokenizer.pad_token_id or 0)), "num_slots": k}, target


def calibrate(model: SentenceSpanScorer, tokenizer: Any, rows: list[dict[str, Any]], target_recall: float) -> float:
    """The logit bias that puts probability 0.5 where `target_recall` of the calibration positives pass."""
    model.eval()
    positives = []
    for ex in rows:
        docs = hotpot_examples([ex])
        scores = score_documents(model, tokenizer, ex["question"], [(d.title, d.text, d.spans) for d in docs])
        positives += [s for d, sc in zip(docs, scores) for s, lab in zip(sc, d.labels) if lab]
    model.train()
    logits = sorted(float(torch.logit(torch.tensor(p).clamp(1e-6, 1 - 1e-6))) for p in positives)
    cut = logits[min(len(logits) - 1, int((1.0 - target_recall) * len(logits)))]
    return -cut


def evaluate_heldout(model: SentenceSpanScorer, tokenizer: Any, rows: list[dict[str, Any]]) -> dict[str, float]:
    """Sentence-level recall / kept fraction at 0.5 and recall of the top third of sentences, on held-out HotpotQA."""
    model.eval()
    hits = total = kept = cands = top_hits = 0
    for ex in rows:
        docs = hotpot_examples([ex])
        scores = score_documents(model, tokenizer, ex["question"], [(d.title, d.text, d.spans) for d in docs])
        flat = [(s, lab) for d, sc in zip(docs, scores) for s, lab in zip(sc, d.labels)]
        total += sum(lab for _, lab in flat)
        hits += sum(lab for s, lab in flat if s >= 0.5)
        kept += sum(1 for s, _ in flat if s >= 0.5)
        cands += len(flat)
        top = sorted(flat, key=lambda x: -x[0])[: max(1, len(flat) // 3)]
        top_hits += sum(lab for _, lab in top)
    model.train()
    return {"recall_at_0.5": hits / max(1, total), "kept_fraction_at_0.5": kept / max(1, cands),
            "recall_top_third_sentences": top_hits / max(1, total)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "scripts/configs/exit_encoder.json")
    parser.add_argument("--data-root", type=Path, default=None, help="overrides the config's data_root")
    parser.add_argument("--output", type=Path, default=None, help="overrides the config's output folder")
    args = parser.parse_args()
    cfg = json.loads(args.config.read_text())
    torch.set_num_threads(int(cfg["threads"]))
    torch.manual_seed(cfg["seed"])
    rng = random.Random(cfg["seed"])
    data_root = args.data_root or (REPO / cfg["data_root"]).resolve()
    output = args.output or REPO / cfg["output"]

    scorer_cfg = EncoderScorerConfig(num_trainable_layers=cfg["num_trainable_layers"], head_hidden=cfg["head_hidden"],
                                     max_length=cfg["max_length"], max_query_tokens=cfg["max_query_tokens"])
    encoder, tokenizer = load_base_encoder(scorer_cfg)
    model = SentenceSpanScorer(encoder, scorer_cfg)
    prefixes = model.trainable_state_prefixes()
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(prefixes)

    hp_train, hp_calibration, hp_heldout = hotpot_split(data_root / cfg["hotpot"], cfg["hotpot_train_questions"],
                                                        cfg["hotpot_calibration_questions"])
    squad = squad_examples(data_root / cfg["squad"], cfg["squad_questions"], rng)
    hotpot = hotpot_examples(hp_train)
    examples = squad + hotpot * cfg["hotpot_repeats"]
    plan = batches(examples, cfg["batch_size"], rng)
    print(f"squad docs {len(squad)}, hotpot docs {len(hotpot)} x{cfg['hotpot_repeats']}, steps {len(plan)}", flush=True)

    head_params = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("head.")]
    layer_params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
    opt = torch.optim.AdamW([{"params": head_params, "lr": cfg["lr_head"]},
                             {"params": layer_params, "lr": cfg["lr_layers"]}], weight_decay=0.01)
    warmup = max(1, int(cfg["warmup_ratio"] * len(plan)))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (len(plan) - s) / max(1, len(plan) - warmup))))
    loss_fn = torch.nn.BCEWithLogitsLoss(reduction="none", pos_weight=torch.tensor(cfg["pos_weight"]))
    model.train()
    model.encoder.eval()  # no dropout in the frozen part; the trained layers follow the same setting
    start, running = time.perf_counter(), 0.0
    for step, batch in enumerate(plan, 1):
        inputs, target = step_inputs(model, tokenizer, batch)
        logits, counts = model(**inputs)
        valid = (counts > 0).float()
        loss = (loss_fn(logits, target) * valid).sum() / valid.sum().clamp(min=1.0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head_params + layer_params, 1.0)
        opt.step()
        sched.step()
        running += float(loss.detach())
        if step % cfg["log_every"] == 0:
            print(f"step {step}/{len(plan)} loss {running / cfg['log_every']:.4f} "
                  f"{time.perf_counter() - start:.0f}s", flush=True)
            running = 0.0
    train_seconds = time.perf_counter() - start
    bias = calibrate(model, tokenizer, hp_calibration, cfg["target_recall"])
    model.config = dataclasses.replace(model.config, logit_bias=round(bias, 4))
    print(f"calibrated logit bias {bias:.3f}", flush=True)
    heldout = evaluate_heldout(model, tokenizer, hp_heldout)
    print("held-out HotpotQA:", heldout, flush=True)
    meta = {"config": cfg, "train_seconds": round(train_seconds, 1), "steps": len(plan),
            "squad_docs": len(squad), "hotpot_docs": len(hotpot), "heldout_sentence_metrics": heldout,
            "hotpot_train_ids": sorted(ex["id"] for ex in hp_train + hp_calibration),
            "torch": torch.__version__}
    path = save_scorer(model, output, meta=meta)
    print(f"saved {path} ({path.stat().st_size / 1e6:.1f} MB) in {train_seconds:.0f}s", flush=True)


if __name__ == "__main__":
    main()
