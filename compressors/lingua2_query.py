"""Query relevance for the token compressor: sentence probabilities and answer-token probabilities, one forward.

The coarse-to-fine lingua2 needs to know, for a question, which sentences matter and which words inside them are
likely the answer (a query-agnostic token classifier drops those as readily as filler). Both come from one pass
of the EXIT encoder over ``[CLS] query [SEP] title \\n document [SEP]``: its sentence head gives each sentence's
probability of being needed, and a small *answer head* trained here (`scripts/train_lingua2_answer.py`, SQuAD
answer spans, frozen encoder) maps every document token's state, the query's mean state and the [CLS] state to the
probability that the token belongs to the answer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ragzip.compressors.exit_scorers import MANY_BATCH_TOKENS
from ragzip.errors import ModelNotFoundError, UnsupportedModelError

WEIGHTS_DIR = Path(__file__).parent / "weights" / "lingua2_answer"
# The keep head: lingua2's token classifier distilled onto the EXIT encoder's states (scripts/train_lingua2_keep.py),
# so the query-aware path reads P(keep) from the forward it already runs for relevance.
KEEP_WEIGHTS_DIR = Path(__file__).parent / "weights" / "lingua2_keep"
_MAX_WEIGHTS_BYTES = 16 << 20

DocInput = tuple[str, str, Sequence[tuple[int, int]]]  # (title, text, sentence char spans)
# Padded tokens per forward: EncoderScorer's bound, so a forward shared with an EXIT stage is shaped as EXIT's own.
MAX_BATCH_TOKENS = MANY_BATCH_TOKENS


@dataclass(frozen=True, slots=True)
class AnswerHeadConfig:
    """Architecture of the answer head (saved as ``config.json``); `hidden_size` must match the encoder."""

    hidden_size: int = 384
    head_hidden: int = 256


class AnswerHead(nn.Module):
    """Token logit of "part of the answer" from [token state, token state * query mean, CLS state]."""

    def __init__(self, config: AnswerHeadConfig) -> None:
        super().__init__()
        self.config = config
        self.mlp = nn.Sequential(nn.Linear(3 * config.hidden_size, config.head_hidden), nn.GELU(),
                                 nn.Linear(config.head_hidden, 1))

    def forward(self, states: torch.Tensor, query: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        """``states [B, S, H]``, ``query [B, H]``, ``cls [B, H]`` -> logits ``[B, S]``."""
        s = states.shape[1]
        features = torch.cat([states, states * query.unsqueeze(1), cls.unsqueeze(1).expand(-1, s, -1)], dim=-1)
        return self.mlp(features).squeeze(-1)


def query_mean(states: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
    """``[B, H]`` mean state of the query segment (CLS and SEP included), as the EXIT heads pool it."""
    is_query = ((token_type_ids == 0) & (attention_mask > 0)).to(states.dtype)
    return (states * is_query.unsqueeze(-1)).sum(1) / is_query.sum(1, keepdim=True).clamp(min=1.0)


def save_answer_head(head: AnswerHead, folder: Path, meta: dict[str, Any] | None = None) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in head.state_dict().items()},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(asdict(head.config), indent=2) + "\n")
    if meta is not None:
        (folder / "train_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def load_answer_head(folder: str | Path | None = None) -> AnswerHead:
    from safetensors.torch import load_file

    folder = Path(folder) if folder else WEIGHTS_DIR
    weights = folder / "model.safetensors"
    if not weights.exists():
        raise ModelNotFoundError(f"lingua2 answer-head weights are missing from {folder}")
    if weights.stat().st_size > _MAX_WEIGHTS_BYTES:
        raise ModelNotFoundError(f"{weights} is larger than expected; refusing to load it")
    config = AnswerHeadConfig(**json.loads((folder / "config.json").read_text()))
    head = AnswerHead(config)
    state = {k: v.to(torch.float32) for k, v in load_file(str(weights)).items()}
    try:
        head.load_state_dict(state)
    except RuntimeError as exc:
        raise UnsupportedModelError(f"answer-head weights in {folder} do not fit: {exc}") from None
    return head.eval()


@dataclass(frozen=True, slots=True)
class QueryRelevance:
    """Per document: sentence probabilities, and the char starts, answer probabilities and (with a keep head) keep
    probabilities of its text tokens."""

    sentences: list[list[float]]
    token_starts: list[np.ndarray]  # [T_d] int, sorted
    token_probs: list[np.ndarray]  # [T_d] float
    token_keep: list[np.ndarray] | None = None  # [T_d] float, aligned with token_starts


class QueryScorer:
    """EXIT sentence probabilities, answer-token probabilities and (with the shipped encoder) lingua2's keep
    probabilities for a query, all from one encoder pass."""

    def __init__(self, exit_weights: str | None = None, answer_weights: str | None = None, *,
                 dtype: str = "auto", batch_size: int | None = None) -> None:
        from ragzip.compressors.exit_encoder import forward_shape, shared_scorer

        self.model, self.tokenizer = shared_scorer(exit_weights, dtype=dtype)  # the EXIT stage's copy, if loaded
        width = int(self.model.encoder.config.hidden_size)
        head = load_answer_head(answer_weights)
        if head.config.hidden_size != width:
            raise UnsupportedModelError("the answer head was trained on an encoder of another width")
        self.head = head
        # The keep head was distilled on the shipped encoder's states: with other EXIT weights it does not apply.
        shipped = exit_weights is None and (KEEP_WEIGHTS_DIR / "model.safetensors").is_file()
        self.keep_head: AnswerHead | None = load_answer_head(KEEP_WEIGHTS_DIR) if shipped else None
        rows, self.max_padding = forward_shape(self.model)
        self.batch_size = batch_size or rows

    def score(self, query: str, documents: Sequence[DocInput]) -> QueryRelevance:
        return self.score_many([(query, documents)])[0]

    def score_many(self, jobs: Sequence[tuple[str, Sequence[DocInput]]]) -> list[QueryRelevance]:
        """`score` of several independent (query, documents) jobs: the windows of all of them sorted by length
        together and batched (one job keeps the single-call shape, so its result is exactly `score`'s)."""
        from ragzip.compressors.exit_encoder import build_rows, collate, length_batches, num_slots, slot_map
        from ragzip.compressors.exit_scorers import MANY_BATCH_ROWS, MANY_MAX_PADDING

        rows = [(j, row) for j, (query, documents) in enumerate(jobs)
                for row in build_rows(self.tokenizer, query, documents, self.model.config)]
        rows_per, padding = ((self.batch_size, self.max_padding) if len(jobs) <= 1 else
                             (max(self.batch_size, MANY_BATCH_ROWS), MANY_MAX_PADDING))
        sentences = [[[0.0] * len(spans) for _, _, spans in documents] for _, documents in jobs]
        tokens: list[list[dict[int, float]]] = [[{} for _ in documents] for _, documents in jobs]
        keeps: list[list[dict[int, float]]] = [[{} for _ in documents] for _, documents in jobs]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][1].input_ids))
        with torch.inference_mode():
            for batch_ids in length_batches([len(rows[i][1].input_ids) for i in order], rows_per, padding,
                                            MAX_BATCH_TOKENS):
                owners = [rows[order[i]][0] for i in batch_ids]
                chunk = [rows[order[i]][1] for i in batch_ids]
                batch = collate(chunk, int(self.tokenizer.pad_token_id or 0))
                states = self.model.states(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
                logits, counts, _ = self.model.heads(states, batch["attention_mask"], batch["token_type_ids"],
                                                     batch["sentence_ids"], max(1, num_slots(chunk)))
                states = states.float()
                qm = query_mean(states, batch["attention_mask"], batch["token_type_ids"])
                answer = torch.sigmoid(self.head(states, qm, states[:, 0]))
                keep = (torch.sigmoid(self.keep_head(states, qm, states[:, 0])).tolist()
                        if self.keep_head is not None else None)
                probs, answer_p = torch.sigmoid(logits.float()).tolist(), answer.tolist()
                for b, (job, slots) in enumerate(zip(owners, slot_map(chunk))):
                    for k, (d, s) in enumerate(slots):
                        if counts[b, k] > 0:
                            sentences[job][d][s] = max(sentences[job][d][s], probs[b][k])
                    row, mine, kept = chunk[b], tokens[job], keeps[job]
                    for pos, start in enumerate(row.char_starts):
                        if start >= 0:
                            mine[row.doc][start] = max(mine[row.doc].get(start, 0.0), answer_p[b][pos])
                            if keep is not None:
                                kept[row.doc][start] = max(kept[row.doc].get(start, 0.0), keep[b][pos])
        return [self._relevance(sentences[j], tokens[j], keeps[j]) for j in range(len(jobs))]

    def _relevance(self, sentences: list[list[float]], tokens: list[dict[int, float]],
                   keeps: list[dict[int, float]]) -> QueryRelevance:
        starts = [np.array(sorted(t), dtype=np.int64) for t in tokens]
        probs_out = [np.array([t[s] for s in st.tolist()], dtype=np.float64) for t, st in zip(tokens, starts)]
        keep_out = ([np.array([k.get(s, np.nan) for s in st.tolist()], dtype=np.float64)
                     for k, st in zip(keeps, starts)] if self.keep_head is not None else None)
        return QueryRelevance(sentences, starts, probs_out, keep_out)


def unit_max(units: np.ndarray, starts: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """[U] the highest probability of the tokens starting inside each unit (0 for a unit with none)."""
    out = np.zeros(len(units))
    if len(units) == 0 or len(starts) == 0:
        return out
    unit_of = np.searchsorted(units[:, 0], starts, side="right") - 1
    ok = (unit_of >= 0) & (starts < units[np.maximum(unit_of, 0), 1])
    np.maximum.at(out, unit_of[ok], probs[ok])
    return out
