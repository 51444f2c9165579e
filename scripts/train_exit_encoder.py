"""Train the EXIT-style one-pass encoder sentence scorer shipped in compressors/weights/exit_encoder/.

One command reproduces the shipped weights (two threads, fixed seed, fixed step count, bf16 autocast; ~16 min on
the 2-core machine):

    .venv/bin/python scripts/train_exit_encoder.py --config scripts/configs/exit_encoder.json

Data (../shared/data, common schema), every document with a sentence label (1, 0 or unknown) and a document label
(needed to answer or not) for the sentence head and the document head:
* SQuAD v1.1 dev in a distractor setting: the answer sentence positive; other paragraphs of the same article that
  hold no answer string are whole-document negatives;
* SQuAD v2.0 dev unanswerable questions: the paragraph and all its sentences negative;
* HotpotQA train sample: supporting-fact sentences positive, the rest negative, gold paragraphs needed; plus the
  second pass's inputs (the question expanded with one gold paragraph's evidence, over the other gold paragraph
  and distractors);
* MuSiQue train sample (paragraph labels, 2-4 hops): supporting paragraphs needed, the sentence holding the hop's
  answer positive, their other sentences unknown; plus second-hop inputs along the hop chain.
HotpotQA and MuSiQue are split by SHA-1 of the id: the lowest ids are trained on, the next ten tune (the logit
bias is calibrated on the HotpotQA ones so the default threshold 0.5 meets a target recall; the compressor's
defaults were chosen on both), the rest are held out; trained and tuning ids go to train_meta.json so evaluation
excludes them. `--calibrate-only FOLDER` redoes only the calibration (after a change of the compressor's defaults).
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

from ragzip.compressors.exit import expand_query
from ragzip.compressors.exit_encoder import (
    EncoderScorerConfig,
    SentenceSpanScorer,
    build_rows,
    collate,
    load_base_encoder,
    num_slots,
    save_scorer,
    slot_map,
)
from ragzip.eval.datasets import sentence_spans
from ragzip.text import split_sentences
from ragzip.types import Document

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class DocExample:
    """One (query, document) pair: a label per candidate sentence (1, 0, or -1 = unknown, not trained on) and a
    document label (1: needed to answer)."""

    query: str
    title: str
    text: str
    spans: tuple[tuple[int, int], ...]
    labels: tuple[int, ...]
    doc_label: int
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


def answer_labels(text: str, spans: list[tuple[int, int]], answers: list[str], *, missing: int = 0) -> list[int]:
    """1 for the sentences holding an answer string (case-insensitive), else `missing`."""
    lowered = text.lower()
    starts = [m for a in answers if a.strip() for m in _find_all(lowered, a.lower())]
    return [1 if any(a <= s < b for s in starts) else missing for a, b in spans]


def _find_all(text: str, needle: str) -> list[int]:
    out, pos = [], text.find(needle)
    while pos >= 0:
        out.append(pos)
        pos = text.find(needle, pos + 1)
    return out


def split_by_id(rows: list[dict[str, Any]], num_train: int, num_tune: int) -> tuple[list[Any], list[Any], list[Any]]:
    """(train, tune, held-out) questions, by SHA-1 of the id (so a split never depends on file order)."""
    rows = sorted(rows, key=lambda ex: hashlib.sha1(ex["id"].encode()).hexdigest())
    cut = num_train + num_tune
    return rows[:num_train], rows[num_train:cut], rows[cut:]


def squad_examples(path: Path, limit: int, num_negatives: int, rng: random.Random) -> list[DocExample]:
    """SQuAD in a distractor setting: the gold paragraph (answer sentence positive) and `num_negatives` other
    paragraphs of the same article that hold no answer string (hard negatives: same topic, not needed)."""
    rows = list(read_jsonl(path))
    by_title: dict[str, list[str]] = {}
    for ex in rows:
        ctx = ex["contexts"][0]
        texts = by_title.setdefault(ctx["title"], [])
        if ctx["text"] not in texts:
            texts.append(ctx["text"])
    rng.shuffle(rows)
    out: list[DocExample] = []
    for ex in rows[:limit]:
        ctx = ex["contexts"][0]
        title = ctx["title"].replace("_", " ")
        spans = split_sentences(ctx["text"])
        labels = answer_labels(ctx["text"], spans, ex["answers"])
        if sum(labels) == 0:
            continue
        out.append(DocExample(ex["question"], title, ctx["text"], tuple(spans), tuple(labels), 1, "squad"))
        others = [t for t in by_title[ctx["title"]] if t != ctx["text"]
                  and not any(a.lower() in t.lower() for a in ex["answers"] if a.strip())]
        for text in rng.sample(others, min(num_negatives, len(others))):
            neg = split_sentences(text)
            out.append(DocExample(ex["question"], title, text, tuple(neg), (0,) * len(neg), 0, "squad-neg"))
    return out


def squad_unanswerable(path: Path, limit: int, rng: random.Random) -> list[DocExample]:
    """SQuAD v2 questions written to have no answer in their paragraph: every sentence and the document negative."""
    rows = [ex for ex in read_jsonl(path) if not ex["answers"]]
    rng.shuffle(rows)
    out = []
    for ex in rows[:limit]:
        ctx = ex["contexts"][0]
        spans = split_sentences(ctx["text"])
        out.append(DocExample(ex["question"], ctx["title"].replace("_", " "), ctx["text"], tuple(spans),
                              (0,) * len(spans), 0, "squad2-none"))
    return out


def hotpot_examples(rows: list[dict[str, Any]], *, second_hop: bool = False, num_negatives: int = 3,
                    rng: random.Random | None = None) -> list[DocExample]:
    """HotpotQA: supporting-fact sentences positive, the rest negative; gold paragraphs are the needed documents.

    With `second_hop`, also the second pass's inputs: the question expanded with one gold paragraph's supporting
    evidence (as `ExitCompressor` builds it), over the other gold paragraph and `num_negatives` distractors.
    """
    out: list[DocExample] = []
    for ex in rows:
        docs = []
        for ctx in ex["contexts"]:
            gold = gold_sentence_spans(ctx)
            positives = [gold[i] for i in ctx.get("supporting_sentence_ids") or [] if i < len(gold)]
            spans = split_sentences(ctx["text"])
            if spans:
                labels = label_by_overlap(spans, positives)
                docs.append(DocExample(ex["question"], ctx["title"], ctx["text"], tuple(spans), tuple(labels),
                                       int(bool(positives)), "hotpot"))
        out.extend(docs)
        if not second_hop or rng is None:
            continue
        golds = [d for d in docs if d.doc_label]
        negatives = [d for d in docs if not d.doc_label]
        for first in golds:
            best = next(i for i, lab in enumerate(first.labels) if lab) if any(first.labels) else 0
            a, b = first.spans[best]
            query = expand_query(ex["question"], first.title, first.text[a:b])
            for d in [g for g in golds if g is not first] + rng.sample(negatives, min(num_negatives, len(negatives))):
                out.append(dataclasses.replace(d, query=query, source="hotpot-hop2"))
    return out


def musique_examples(rows: list[dict[str, Any]], *, second_hop: bool = False, num_negatives: int = 3,
                     rng: random.Random | None = None) -> list[DocExample]:
    """MuSiQue (paragraph labels, 2-4 hops): supporting paragraphs are needed documents; in them the sentence with
    the hop's answer is positive and the rest unknown (-1); all sentences of other paragraphs are negative.

    With `second_hop`, each hop k >= 2 paragraph is also paired with the question expanded by hop k-1's answer
    sentence (plus `num_negatives` distractors under the same query).
    """
    out: list[DocExample] = []
    for ex in rows:
        hops = ((ex.get("meta") or {}).get("question_decomposition")) or []
        hop_answer = {h.get("paragraph_support_idx"): h.get("answer", "") for h in hops}
        docs = []
        for i, ctx in enumerate(ex["contexts"]):
            spans = split_sentences(ctx["text"])
            if not spans:
                docs.append(None)
                continue
            if ctx.get("is_supporting"):
                answers = [hop_answer.get(i, "")] + (list(ex["answers"]) if i == (hops[-1].get("paragraph_support_idx")
                                                                                 if hops else None) else [])
                labels = answer_labels(ctx["text"], spans, [a for a in answers if a], missing=-1)
                docs.append(DocExample(ex["question"], ctx["title"], ctx["text"], tuple(spans), tuple(labels), 1,
                                       "musique"))
            else:
                docs.append(DocExample(ex["question"], ctx["title"], ctx["text"], tuple(spans), (0,) * len(spans), 0,
                                       "musique"))
        out.extend(d for d in docs if d is not None)
        if not second_hop or rng is None:
            continue
        negatives = [d for d in docs if d is not None and not d.doc_label]
        chain = [docs[h["paragraph_support_idx"]] for h in hops
                 if isinstance(h.get("paragraph_support_idx"), int) and h["paragraph_support_idx"] < len(docs)]
        for prev, nxt in zip(chain, chain[1:]):
            if prev is None or nxt is None:
                continue
            best = next((i for i, lab in enumerate(prev.labels) if lab == 1), 0)
            a, b = prev.spans[best]
            query = expand_query(ex["question"], prev.title, prev.text[a:b])
            for d in [nxt] + rng.sample(negatives, min(num_negatives, len(negatives))):
                out.append(dataclasses.replace(d, query=query, source="musique-hop2"))
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
                batch: list[DocExample]) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """Encoder inputs, sentence targets ``[B, K]`` (-1: not trained on) and document targets ``[B]``."""
    rows, targets, doc_targets = [], [], []
    for e in batch:
        r = build_rows(tokenizer, e.query, [(e.title, e.text, e.spans)], model.config)
        rows.extend(r)
        targets.extend([[e.labels[s] for _, s in slots] for slots in slot_map(r)])
        doc_targets.extend([float(e.doc_label)] * len(r))
    k = max(1, num_slots(rows))
    target = torch.full((len(rows), k), -1.0)
    for b, t in enumerate(targets):
        target[b, :len(t)] = torch.tensor(t, dtype=torch.float32)
    return {**collate(rows, int(tokenizer.pad_token_id or 0)), "num_slots": k}, target, torch.tensor(doc_targets)


def within_document_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Listwise loss inside each window that holds a positive: -log of the softmax mass on its positive sentences.

    The pointwise BCE alone lets the sentence head score every sentence of a relevant-looking document alike (the
    document head's signal leaks into it); this term makes it rank the needed sentence above its neighbours.
    """
    positive = (target > 0.5).float() * valid  # [B, K]
    rows = positive.sum(1) > 0
    if not bool(rows.any()):
        return logits.sum() * 0.0
    masked = logits.masked_fill(valid == 0, float("-inf"))[rows]
    on_positive = logits.masked_fill(positive == 0, float("-inf"))[rows]
    return (torch.logsumexp(masked, dim=1) - torch.logsumexp(on_positive, dim=1)).mean()


def tune_scores(model: SentenceSpanScorer, tokenizer: Any, rows: list[dict[str, Any]]) -> list[float]:
    """Sentence probabilities of the supporting sentences of HotpotQA tuning questions, through the compressor's
    own scoring with its defaults, so calibration sees what inference does."""
    from ragzip.compressors.exit import ExitCompressor
    from ragzip.compressors.exit_scorers import EncoderScorer

    compressor = ExitCompressor(scorer=EncoderScorer.from_model(model, tokenizer))
    model.eval()
    positives = []
    for ex in rows:
        docs = [Document(str(i), c["text"], c["title"]) for i, c in enumerate(ex["contexts"])]
        per_doc = compressor.score(ex["question"], docs)
        for ctx, cands in zip(ex["contexts"], per_doc):
            gold = gold_sentence_spans(ctx)
            positives_spans = [gold[i] for i in ctx.get("supporting_sentence_ids") or [] if i < len(gold)]
            labels = label_by_overlap([(c.start, c.end) for c in cands], positives_spans)
            positives += [c.score for c, lab in zip(cands, labels) if lab]
    model.train()
    return positives


def calibrate(model: SentenceSpanScorer, tokenizer: Any, rows: list[dict[str, Any]], target_recall: float) -> float:
    """The logit bias at which threshold 0.5 keeps `target_recall` of the tuning questions' supporting sentences,
    found by bisection through the compressor's own scoring with its defaults."""
    lo, hi = -6.0, 6.0
    for _ in range(10):
        mid = (lo + hi) / 2
        model.config = dataclasses.replace(model.config, logit_bias=mid)
        positives = tune_scores(model, tokenizer, rows)
        recall = sum(p >= 0.5 for p in positives) / max(1, len(positives))
        lo, hi = (lo, mid) if recall >= target_recall else (mid, hi)
    return hi


def recalibrate(folder: Path, data_root: Path, cfg: dict[str, Any]) -> None:
    """Re-run the final calibration step on saved weights and rewrite their config (the weights are unchanged)."""
    from ragzip.compressors.exit_encoder import load_scorer

    model, tokenizer = load_scorer(folder, dtype="float32")
    model.config = dataclasses.replace(model.config, logit_bias=0.0)
    _, hp_tune, _ = split_by_id(list(read_jsonl(data_root / cfg["hotpot"])), cfg["hotpot_train_questions"],
                                cfg["hotpot_tune_questions"])
    bias = calibrate(model, tokenizer, hp_tune, cfg["target_recall"])
    config = json.loads((folder / "config.json").read_text())
    config["logit_bias"] = round(bias, 4)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"calibrated logit bias {bias:.3f} -> {folder / 'config.json'}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "scripts/configs/exit_encoder.json")
    parser.add_argument("--data-root", type=Path, default=None, help="overrides the config's data_root")
    parser.add_argument("--output", type=Path, default=None, help="overrides the config's output folder")
    parser.add_argument("--max-steps", type=int, default=None, help="stop early (smoke runs)")
    parser.add_argument("--calibrate-only", type=Path, default=None, metavar="FOLDER",
                        help="only recalibrate the logit bias of the weights in FOLDER (after a change of the "
                             "compressor's defaults), in place")
    args = parser.parse_args()
    cfg = json.loads(args.config.read_text())
    torch.set_num_threads(int(cfg["threads"]))
    torch.manual_seed(cfg["seed"])
    rng = random.Random(cfg["seed"])
    data_root = args.data_root or (REPO / cfg["data_root"]).resolve()
    output = args.output or REPO / cfg["output"]
    if args.calibrate_only is not None:
        recalibrate(args.calibrate_only, data_root, cfg)
        return

    scorer_cfg = EncoderScorerConfig(num_trainable_layers=cfg["num_trainable_layers"], head_hidden=cfg["head_hidden"],
                                     max_length=cfg["max_length"], max_query_tokens=cfg["max_query_tokens"],
                                     doc_head=True)
    encoder, tokenizer = load_base_encoder(scorer_cfg)
    model = SentenceSpanScorer(encoder, scorer_cfg)
    prefixes = model.trainable_state_prefixes()
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(prefixes)

    hp_train, hp_tune, _ = split_by_id(list(read_jsonl(data_root / cfg["hotpot"])), cfg["hotpot_train_questions"],
                                       cfg["hotpot_tune_questions"])
    mq_train, mq_tune, _ = split_by_id(list(read_jsonl(data_root / cfg["musique"])), cfg["musique_train_questions"],
                                       cfg["musique_tune_questions"])
    negs = cfg["second_hop_negatives"]
    parts = {
        "squad": squad_examples(data_root / cfg["squad"], cfg["squad_questions"], cfg["squad_negatives"], rng),
        "squad2": squad_unanswerable(data_root / cfg["squad2"], cfg["squad2_unanswerable"], rng),
        "hotpot": hotpot_examples(hp_train, second_hop=True, num_negatives=negs, rng=rng) * cfg["hotpot_repeats"],
        "musique": musique_examples(mq_train, second_hop=True, num_negatives=negs, rng=rng) * cfg["musique_repeats"],
    }
    examples = [e for part in parts.values() for e in part]
    plan = batches(examples, cfg["batch_size"], rng)[: args.max_steps]
    sizes = {k: len(v) for k, v in parts.items()}
    print(f"documents {sizes}, steps {len(plan)}", flush=True)

    head_params = [p for n, p in model.named_parameters() if p.requires_grad and "head." in n]
    layer_params = [p for n, p in model.named_parameters() if p.requires_grad and "head." not in n]
    opt = torch.optim.AdamW([{"params": head_params, "lr": cfg["lr_head"]},
                             {"params": layer_params, "lr": cfg["lr_layers"]}], weight_decay=0.01)
    warmup = max(1, int(cfg["warmup_ratio"] * len(plan)))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (len(plan) - s) / max(1, len(plan) - warmup))))
    sentence_loss = torch.nn.BCEWithLogitsLoss(reduction="none", pos_weight=torch.tensor(cfg["pos_weight"]))
    doc_loss = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(cfg["doc_pos_weight"]))
    model.train()
    model.encoder.eval()  # no dropout in the frozen part; the trained layers follow the same setting
    start, running = time.perf_counter(), 0.0
    for step, batch in enumerate(plan, 1):
        inputs, target, doc_target = step_inputs(model, tokenizer, batch)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(cfg.get("bf16_autocast", False))):
            logits, counts, doc_logits = model(**inputs)
        logits, doc_logits = logits.float(), doc_logits.float()
        valid = ((counts > 0) & (target >= 0)).float()
        loss = (sentence_loss(logits, target.clamp(min=0)) * valid).sum() / valid.sum().clamp(min=1.0)
        loss = loss + cfg["doc_loss_weight"] * doc_loss(doc_logits, doc_target)
        loss = loss + cfg["within_doc_loss_weight"] * within_document_loss(logits, target, valid)
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
    meta = {"config": cfg, "train_seconds": round(train_seconds, 1), "steps": len(plan), "documents": sizes,
            "hotpot_train_ids": sorted(ex["id"] for ex in hp_train + hp_tune),
            "train_ids": sorted(ex["id"] for ex in hp_train + hp_tune + mq_train + mq_tune),
            "torch": torch.__version__}
    path = save_scorer(model, output, meta=meta)
    print(f"saved {path} ({path.stat().st_size / 1e6:.1f} MB) in {train_seconds:.0f}s", flush=True)
    recalibrate(output, data_root, cfg)  # on the saved (fp16) weights, exactly as --calibrate-only does


if __name__ == "__main__":
    main()
