"""Train ragzip's default LLMLingua-2-style token classifier on the packaged MiniLM encoder.

Labels come from aligning human summaries back to their sources, the way LLMLingua-2 aligned GPT-4
compressions to MeetingBank: every summary word is matched, in order, to the nearest unlabelled source word with
the same normalised form (forward window first), and matched source words are labelled "keep" (class 1).
Sources: QMSum query-specific answers vs their relevant transcript spans, multi_news summaries vs articles, and
FewSum summaries vs the 8 reviews, and HotpotQA (train) supporting paragraphs vs "question + answer" with answer
spans kept whole (all from ``data_root``).

Only the top ``trained_layers`` of MiniLM plus the classification head are trained; the frozen lower layers' states
are computed once. The saved file holds just those tensors (fp16, a few MB) and is loaded on top of the packaged
MiniLM weights by ``ragzip.compressors.lingua2.load_token_classifier``.

Usage (one command reproduces the shipped weights):
    OMP_NUM_THREADS=1 .venv/bin/python scripts/train_lingua2.py scripts/configs/lingua2.json
"""

from __future__ import annotations

import bisect
import csv
import json
import random
import re
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

STOPWORDS = frozenset(
    "a an the of to in on at for and or but is are was were be been being it its this that these those with as by "
    "from he she they we you i his her their our your them us me my not no so do does did has have had will would "
    "can could should there here than then also which who whom what when where how".split()
)
_WORD = re.compile(r"\S+")


def _norm(word: str) -> str:
    return re.sub(r"[^\w]", "", word.lower())


def align(source: str, summaries: list[str], window: int, phrases: Sequence[str] = ()) -> list[tuple[int, int, int]]:
    """Source words as (start, end, label): label 1 where a summary word was aligned to it, or where the word
    lies inside an occurrence of one of `phrases` (QA answers: kept whole)."""
    words = [(m.start(), m.end()) for m in _WORD.finditer(source)]
    norms = [_norm(source[s:e]) for s, e in words]
    where: dict[str, list[int]] = defaultdict(list)
    for i, n in enumerate(norms):
        if n:
            where[n].append(i)
    labels = [0] * len(words)
    for summary in summaries:
        pointer = 0
        for m in _WORD.finditer(summary):
            key = _norm(m.group())
            if not key or key in STOPWORDS or key not in where:
                continue
            cands = [i for i in where[key] if not labels[i]]
            if not cands:
                continue
            k = bisect.bisect_left(cands, pointer)
            forward = [i for i in cands[k:k + 3] if i - pointer <= window]
            if forward:
                pick = forward[0]
            else:
                near = min(cands, key=lambda i: abs(i - pointer))
                if abs(near - pointer) > 4 * window and len(where[key]) > 3:
                    continue  # a common word far away: aligning it would be noise
                pick = near
            labels[pick] = 1
            pointer = pick + 1
    starts = [s for s, _ in words]
    for phrase in phrases:
        if len(phrase.strip()) < 2 or phrase.lower() in ("yes", "no"):
            continue
        for m in re.finditer(re.escape(phrase), source, re.I):
            lo = bisect.bisect_right(starts, m.start()) - 1
            hi = bisect.bisect_left(starts, m.end())
            for i in range(max(0, lo), hi):
                labels[i] = 1
    return [(s, e, lab) for (s, e), lab in zip(words, labels)]


def load_pairs(root: Path) -> list[tuple[str, str, list[str], list[str]]]:
    """(group, source, summaries, answer phrases) from QMSum, multi_news, FewSum and HotpotQA.

    For HotpotQA the supporting paragraphs are the source and "question + answer" is the compression target
    (what a reader needs from the paragraph); answer occurrences are kept whole.
    """
    pairs: list[tuple[str, str, list[str], list[str]]] = []
    with open(root / "qmsum_val" / "val.jsonl", encoding="utf-8") as fh:
        for mi, line in enumerate(fh):
            rec = json.loads(line)
            turns = rec["meeting_transcripts"]
            for q in rec["specific_query_list"]:
                text = []
                for a, b in q["relevant_text_span"]:
                    text += [f"{t['speaker']}: {t['content']}" for t in turns[int(a): int(b) + 1]]
                pairs.append((f"qmsum{mi}", "\n".join(text), [q["answer"]], []))
    with open(root / "multi_news_dev100" / "multi_news.jsonl", encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            rec = json.loads(line)
            text = rec["context"].replace("NEWLINE_CHAR", "\n")
            pairs.append((f"mn{i}", text, list(rec["answers"]), []))
    for split in ("train", "val"):
        with open(root / "fewsum_amazon_dev" / f"{split}.csv", encoding="utf-8", newline="") as fh:
            for row in csv.DictReader(fh, delimiter="\t"):
                text = "\n".join(row[f"rev{k}"] for k in range(1, 9))
                pairs.append((f"fewsum{row['group_id']}", text, [row[f"summ{k}"] for k in range(1, 4)], []))
    with open(root / "hotpotqa_train_hipporag100" / "normalized.jsonl", encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            rec = json.loads(line)
            target = [rec["question"] + " " + " ".join(rec["answers"])]
            for c in rec["contexts"]:
                if c.get("is_supporting"):
                    pairs.append((f"hotpot{i}", f"{c['title']}\n{c['text']}", target, list(rec["answers"])))
    return pairs


def build_windows(pairs: list[tuple[str, str, list[str], list[str]]], tokenizer: Any, cfg: dict[str, Any]
                  ) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Token windows (group, ids [S], labels [S]) with [CLS]/[SEP] labelled -100."""
    body = cfg["max_seq_len"] - 2
    out = []
    for group, source, summaries, phrases in pairs:
        words = align(source, summaries, cfg["align_window"], phrases)
        if not words or sum(w[2] for w in words) == 0:
            continue
        starts = np.array([w[0] for w in words])
        word_labels = np.array([w[2] for w in words])
        enc = tokenizer(source, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.array(enc["input_ids"][: cfg["max_source_tokens"]])
        offs = np.array(enc["offset_mapping"][: cfg["max_source_tokens"]]).reshape(-1, 2)
        word_of = np.clip(np.searchsorted(starts, offs[:, 0], side="right") - 1, 0, len(words) - 1)
        labels = word_labels[word_of]
        for lo in range(0, len(ids), body):
            w_ids = [tokenizer.cls_token_id, *ids[lo: lo + body].tolist(), tokenizer.sep_token_id]
            w_lab = [-100, *labels[lo: lo + body].tolist(), -100]
            out.append((group, torch.tensor(w_ids), torch.tensor(w_lab)))
    return out


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    order = np.argsort(scores)
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    pos = labels == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / max(1, n_pos * n_neg))


def main(config_path: str) -> None:
    cfg = json.loads(Path(config_path).read_text())
    torch.set_num_threads(int(cfg["threads"]))
    random.seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, BertForTokenClassification

    from ragzip.registry import resolve_embedder

    t0 = time.time()
    base = resolve_embedder(cfg["base"])
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = BertForTokenClassification.from_pretrained(base, num_labels=2)
    model.eval()
    pairs = load_pairs(Path(cfg["data_root"]))
    random.shuffle(pairs)
    windows = build_windows(pairs, tokenizer, cfg)
    groups = sorted({g for g, _, _ in windows})
    random.shuffle(groups)
    val_groups = set(groups[: max(1, int(len(groups) * cfg["val_fraction"]))])
    train = [w for w in windows if w[0] not in val_groups]
    val = [w for w in windows if w[0] in val_groups]
    budget, kept = cfg["max_train_tokens"], []
    for w in train:
        if budget <= 0:
            break
        kept.append(w)
        budget -= len(w[1])
    train = kept
    n_tok = sum(len(w[1]) for w in train)
    pos_rate = float(np.mean(np.concatenate([w[2][w[2] >= 0].numpy() for w in train])))
    print(f"{len(pairs)} pairs -> {len(train)} train / {len(val)} val windows, {n_tok} train tokens, "
          f"keep-label rate {pos_rate:.3f} ({time.time() - t0:.0f}s)", flush=True)

    first = min(cfg["trained_layers"])
    layers = model.bert.encoder.layer

    @torch.no_grad()
    def frozen_states(ids: torch.Tensor) -> torch.Tensor:
        h = model.bert.embeddings(input_ids=ids[None])  # [1, S, D]
        for layer in layers[:first]:
            h = layer(h)
        return h.to(torch.float16)

    def head(h: torch.Tensor) -> torch.Tensor:
        for layer in layers[first:]:
            h = layer(h)
        return model.classifier(model.dropout(h))[0]  # [S, 2]

    cache = [(frozen_states(ids), lab) for _, ids, lab in train]
    val_cache = [(frozen_states(ids), lab) for _, ids, lab in val]
    print(f"frozen states ready ({time.time() - t0:.0f}s)", flush=True)

    params_layers = [p for layer in layers[first:] for p in layer.parameters()]
    opt = torch.optim.AdamW([{"params": params_layers, "lr": cfg["lr_layers"]},
                             {"params": model.classifier.parameters(), "lr": cfg["lr_head"]}], weight_decay=0.01)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=-100)
    deadline = t0 + 60 * cfg["max_minutes"]

    def evaluate() -> dict[str, float]:
        model.eval()
        scores, labels = [], []
        with torch.no_grad():
            for h, lab in val_cache:
                p = torch.softmax(head(h.float()), -1)[:, 1]
                m = lab >= 0
                scores.append(p[m].numpy())
                labels.append(lab[m].numpy())
        s, y = np.concatenate(scores), np.concatenate(labels)
        return {"val_token_auc": round(auc(s, y), 4), "val_keep_rate": round(float(y.mean()), 4)}

    metrics = {"epoch0": evaluate()}
    print("before training", metrics["epoch0"], flush=True)
    for epoch in range(1, cfg["epochs"] + 1):
        model.train()
        random.shuffle(cache)
        total = 0.0
        for step, (h, lab) in enumerate(cache):
            logits = head(h.float())
            loss = loss_fn(logits, lab)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach())
            if time.time() > deadline:
                break
        metrics[f"epoch{epoch}"] = {"train_loss": round(total / (step + 1), 4), **evaluate()}
        print(f"epoch {epoch}", metrics[f"epoch{epoch}"], f"({time.time() - t0:.0f}s)", flush=True)
        if time.time() > deadline:
            break

    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()
             if k.startswith("classifier.") or any(k.startswith(f"bert.encoder.layer.{i}.")
                                                    for i in cfg["trained_layers"])}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "ragzip-lingua2-delta"})
    card = {"format": "ragzip-lingua2-delta", "base": cfg["base"], "num_labels": 2,
            "trained_layers": cfg["trained_layers"], "max_seq_len": cfg["max_seq_len"],
            "train_windows": len(train), "train_tokens": n_tok, "val_windows": len(val),
            "keep_label_rate": round(pos_rate, 4), "metrics": metrics,
            "minutes": round((time.time() - t0) / 60, 1), "config": cfg}
    (out / "config.json").write_text(json.dumps(card, indent=2) + "\n")
    print("saved", out, f"({time.time() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "scripts/configs/lingua2.json")
