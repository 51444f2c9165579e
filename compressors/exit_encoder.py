"""The one-pass encoder sentence scorer: a small trained head (and top layers) over the packaged MiniLM encoder.

One encoder forward over ``[CLS] query [SEP] title \\n document [SEP]`` yields token states with full bidirectional
context; every sentence of the document is scored from its pooled token span. The module is shared by the
compressor (inference) and ``scripts/train_exit_encoder.py`` (training), so both build inputs the same way.
"""

from __future__ import annotations

import bisect
import json
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ragzip.errors import ConfigError, ModelNotFoundError

WEIGHTS_DIR = Path(__file__).parent / "weights" / "exit_encoder"
_CONFIG_FILE = "config.json"
_WEIGHTS_FILE = "model.safetensors"
_MAX_WEIGHTS_BYTES = 64 << 20


@dataclass(frozen=True, slots=True)
class EncoderScorerConfig:
    """Architecture of the head; saved next to the weights as ``config.json``.

    Attributes:
        base: embedder alias or path of the frozen encoder (resolved by `ragzip.registry.resolve_embedder`).
        num_trainable_layers: how many top transformer layers were fine-tuned (and ship with the head).
        head_hidden: width of the scoring MLP.
        max_length: encoder window in tokens (BERT positions).
        max_query_tokens: the query is cut to this many tokens so the document keeps most of the window.
        base_num_layers: layer count of the base encoder the weights were trained on (checked at load).
        base_hidden_size: hidden size of that encoder (checked at load).
        logit_bias: added to every logit; set after training on calibration questions so that the default
            threshold 0.5 meets a target recall.
        doc_head: the model also scores the whole document (is it needed to answer?) from the same forward.
    """

    base: str = "all-MiniLM-L6-v2"
    num_trainable_layers: int = 2
    head_hidden: int = 256
    max_length: int = 512
    max_query_tokens: int = 64
    base_num_layers: int = 6
    base_hidden_size: int = 384
    logit_bias: float = 0.0
    doc_head: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.num_trainable_layers <= self.base_num_layers:
            raise ConfigError(f"num_trainable_layers must be in [0, {self.base_num_layers}]")
        if self.max_query_tokens < 1 or self.max_length < self.max_query_tokens + 16:
            raise ConfigError("max_length must leave room for the document after max_query_tokens")


@dataclass(frozen=True, slots=True)
class Row:
    """One encoder window: token ids, segment ids, and the sentence index (or -1) of every token."""

    doc: int
    input_ids: list[int]
    token_type_ids: list[int]
    sentence_ids: list[int]
    char_starts: tuple[int, ...] = ()  # per position, the token's start in the document text (-1: not text)


@dataclass(frozen=True, slots=True)
class DocumentScores:
    """Scores of one query's documents: P(sentence needed) per sentence, and P(document needed) per document
    (None when the model has no document head)."""

    sentences: list[list[float]]
    documents: list[float] | None


class SentenceSpanScorer(nn.Module):
    """Scores sentences from pooled encoder token spans, and optionally the whole document.

    Features per sentence: the sentence's mean token state, the [CLS] state, and the product of the sentence
    mean with the query's mean token state; a two-layer MLP maps them to one logit. The document head (when
    ``config.doc_head``) maps the [CLS] state, the document's mean state and its product with the query mean to a
    document logit.
    """

    def __init__(self, encoder: nn.Module, config: EncoderScorerConfig) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = config
        hidden = int(encoder.config.hidden_size)
        self.head = nn.Sequential(nn.Linear(3 * hidden, config.head_hidden), nn.GELU(),
                                  nn.Linear(config.head_hidden, 1))
        self.doc_head = (nn.Sequential(nn.Linear(3 * hidden, config.head_hidden), nn.GELU(),
                                       nn.Linear(config.head_hidden, 1)) if config.doc_head else None)

    def trainable_state_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of the parameters that are trained and shipped."""
        num_layers = int(self.encoder.config.num_hidden_layers)
        first = num_layers - self.config.num_trainable_layers
        heads = ("head.", "doc_head.") if self.doc_head is not None else ("head.",)
        return heads + tuple(f"encoder.encoder.layer.{i}." for i in range(first, num_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor,
                sentence_ids: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Logits of every sentence slot, and of every row's document.

        Args:
            input_ids, attention_mask, token_type_ids: ``[B, S]`` encoder inputs.
            sentence_ids: ``[B, S]`` slot of each token in ``[0, num_slots)``, or -1 for non-candidate tokens.
            num_slots: the number of sentence slots ``K`` per row.

        Returns:
            ``(logits [B, K], token_counts [B, K], doc_logits [B] or None)``; a slot with no tokens has count 0 and a
            meaningless logit.
        """
        states = self.states(input_ids, attention_mask, token_type_ids)  # [B, S, H]
        return self.heads(states, attention_mask, token_type_ids, sentence_ids, num_slots)

    def states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
               ) -> torch.Tensor:
        """``[B, S, H]`` final token states (shared with the query-aware token scorer of lingua2)."""
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                            token_type_ids=token_type_ids).last_hidden_state

    def heads(self, states: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor,
              sentence_ids: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The sentence and document logits of `forward` from already computed states."""
        onehot = nn.functional.one_hot(sentence_ids + 1, num_slots + 1)[..., 1:].to(states.dtype)  # [B, S, K]
        counts = onehot.sum(dim=1)  # [B, K]
        pooled = torch.einsum("bsk,bsh->bkh", onehot, states) / counts.clamp(min=1.0).unsqueeze(-1)  # [B, K, H]
        is_query = ((token_type_ids == 0) & (attention_mask > 0)).to(states.dtype)  # [B, S] (incl. CLS/SEP)
        query = (states * is_query.unsqueeze(-1)).sum(1) / is_query.sum(1, keepdim=True).clamp(min=1.0)  # [B, H]
        cls = states[:, 0]  # [B, H]
        k = pooled.shape[1]
        features = torch.cat([pooled, cls.unsqueeze(1).expand(-1, k, -1), pooled * query.unsqueeze(1)], dim=-1)
        logits = self.head(features).squeeze(-1) + self.config.logit_bias  # [B, K]
        if self.doc_head is None:
            return logits, counts, None
        is_doc = (token_type_ids == 1).to(states.dtype)  # [B, S] (title and text, final SEP)
        doc = (states * is_doc.unsqueeze(-1)).sum(1) / is_doc.sum(1, keepdim=True).clamp(min=1.0)  # [B, H]
        doc_logits = self.doc_head(torch.cat([cls, doc, doc * query], dim=-1)).squeeze(-1)  # [B]
        return logits, counts, doc_logits


def build_rows(tokenizer: Any, query: str, documents: Sequence[tuple[str, str, Sequence[tuple[int, int]]]],
               config: EncoderScorerConfig) -> list[Row]:
    """Tokenize one query with its documents into encoder windows.

    Args:
        tokenizer: the encoder's fast tokenizer.
        query: the question (cut to ``config.max_query_tokens`` tokens).
        documents: ``(title, text, sentence char spans into text)`` per document.
        config: window sizes.

    Returns:
        One row per window; a document longer than the window is split at sentence boundaries into several
        rows that each repeat the query and the title. ``sentence_ids`` are indices into the document's spans.
    """
    cls_id, sep_id = int(tokenizer.cls_token_id), int(tokenizer.sep_token_id)
    query_ids = tokenizer(query, add_special_tokens=False)["input_ids"][: config.max_query_tokens]
    texts = [f"{title}\n{text}" if title else text for title, text, _ in documents]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True) if texts else {"input_ids": []}
    room = config.max_length - len(query_ids) - 3
    rows: list[Row] = []
    for d, (title, _text, spans) in enumerate(documents):
        shift = len(title) + 1 if title else 0
        ids = encoded["input_ids"][d]
        offsets = encoded["offset_mapping"][d]
        starts = [s for s, _ in spans]
        labels = []
        for a, _b in offsets:
            pos = a - shift
            j = bisect.bisect_right(starts, pos) - 1
            labels.append(j if pos >= 0 and j >= 0 and pos < spans[j][1] else -1)
        num_title = next((i for i, lab in enumerate(labels) if lab >= 0), len(labels)) if title else 0
        for chunk in _windows(labels, num_title, room):
            tok = [cls_id, *query_ids, sep_id] + [ids[i] for i in chunk] + [sep_id]
            sent = [-1] * (len(query_ids) + 2) + [labels[i] if i >= num_title else -1 for i in chunk] + [-1]
            types = [0] * (len(query_ids) + 2) + [1] * (len(chunk) + 1)
            chars = [-1] * (len(query_ids) + 2) + [offsets[i][0] - shift if i >= num_title else -1
                                                   for i in chunk] + [-1]
            rows.append(Row(d, tok, types, sent, tuple(chars)))
    return rows


def _windows(labels: list[int], num_title: int, room: int) -> list[list[int]]:
    """Token index lists (title first) that fit `room`; splits only between sentences unless one is too long."""
    if len(labels) <= room:
        return [list(range(len(labels)))]
    title = list(range(min(num_title, room // 4)))
    body_room = room - len(title)
    windows: list[list[int]] = []
    current: list[int] = []
    i = num_title
    while i < len(labels):
        j = i
        while j < len(labels) and labels[j] == labels[i]:
            j += 1
        piece = list(range(i, j))[:body_room]  # one over-long sentence keeps its head only
        if current and len(current) + len(piece) > body_room:
            windows.append(title + current)
            current = []
        current.extend(piece)
        i = j
    if current or not windows:
        windows.append(title + current)
    return windows


def collate(rows: Sequence[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad rows into tensors; sentence ids become per-row slots ``0..K-1`` (see `slot_map`)."""
    width = max(len(r.input_ids) for r in rows)
    batch = len(rows)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    types = torch.zeros((batch, width), dtype=torch.long)
    sents = torch.full((batch, width), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r.input_ids)
        input_ids[b, :n] = torch.tensor(r.input_ids)
        mask[b, :n] = 1
        types[b, :n] = torch.tensor(r.token_type_ids)
        slots = _slots(r.sentence_ids)
        sents[b, :n] = torch.tensor([slots[s] if s >= 0 else -1 for s in r.sentence_ids])
    return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": types, "sentence_ids": sents}


def _slots(sentence_ids: Sequence[int]) -> dict[int, int]:
    return {s: k for k, s in enumerate(sorted({s for s in sentence_ids if s >= 0}))}


def slot_map(rows: Sequence[Row]) -> list[list[tuple[int, int]]]:
    """Per row, the ``(document, sentence)`` each slot stands for."""
    return [[(r.doc, s) for s in sorted(_slots(r.sentence_ids))] for r in rows]


def num_slots(rows: Sequence[Row]) -> int:
    return max((len(_slots(r.sentence_ids)) for r in rows), default=0)


def load_base_encoder(config: EncoderScorerConfig) -> tuple[nn.Module, Any]:
    """The packaged (or local) MiniLM transformer and its tokenizer, from the embedder folder."""
    from transformers import AutoModel, AutoTokenizer

    from ragzip.registry import quiet_loading, resolve_embedder

    folder = resolve_embedder(config.base)
    try:
        with quiet_loading():
            tokenizer = AutoTokenizer.from_pretrained(folder)
            encoder = AutoModel.from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"could not load encoder {folder!r} offline ({exc})") from exc
    tokenizer.model_max_length = 1 << 30  # windows are cut by build_rows; silence the length warning
    if (int(encoder.config.num_hidden_layers), int(encoder.config.hidden_size)) != (
            config.base_num_layers, config.base_hidden_size):
        raise ModelNotFoundError(f"encoder {folder!r} does not match the head (expected {config.base_num_layers} "
                                 f"layers of width {config.base_hidden_size})")
    return encoder, tokenizer


def save_scorer(model: SentenceSpanScorer, folder: Path, *, meta: dict[str, Any] | None = None) -> Path:
    """Write the trained parameters (fp16 safetensors), the config, and training metadata to `folder`."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    prefixes = model.trainable_state_prefixes()
    state = {k: v.detach().to(torch.float16).contiguous()
             for k, v in model.state_dict().items() if k.startswith(prefixes)}
    save_file(state, str(folder / _WEIGHTS_FILE))
    (folder / _CONFIG_FILE).write_text(json.dumps(asdict(model.config), indent=2) + "\n")
    if meta is not None:
        (folder / "train_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder / _WEIGHTS_FILE


def load_scorer(folder: str | Path | None = None, *, dtype: str = "float32",
                device: str | None = None) -> tuple[SentenceSpanScorer, Any]:
    """Load the shipped (or a given) head over the packaged encoder, in eval mode.

    Args:
        folder: weights folder (default: the weights shipped in the package).
        dtype: "float32", "bfloat16", or "auto" (bf16 where the CPU has native bf16, else fp32). The whole model
            is converted once here, never per call.
        device: where the model runs (None: cpu; "auto": cuda when available).

    Raises:
        ModelNotFoundError: missing or malformed weights, or a base encoder that does not match.
    """
    from safetensors.torch import load_file

    folder = Path(folder) if folder is not None else WEIGHTS_DIR
    cfg_path, weights_path = folder / _CONFIG_FILE, folder / _WEIGHTS_FILE
    if not cfg_path.is_file() or not weights_path.is_file():
        raise ModelNotFoundError(f"no encoder scorer weights in {folder} (need {_CONFIG_FILE} and {_WEIGHTS_FILE})")
    if weights_path.stat().st_size > _MAX_WEIGHTS_BYTES:
        raise ModelNotFoundError(f"{weights_path} is larger than {_MAX_WEIGHTS_BYTES >> 20} MiB")
    try:
        config = EncoderScorerConfig(**json.loads(cfg_path.read_text()))
    except (TypeError, json.JSONDecodeError) as exc:
        raise ModelNotFoundError(f"malformed {cfg_path}: {exc}") from exc
    encoder, tokenizer = load_base_encoder(config)
    model = SentenceSpanScorer(encoder, config)
    state = {k: v.float() for k, v in load_file(str(weights_path)).items()}
    expected = {k for k in model.state_dict() if k.startswith(model.trainable_state_prefixes())}
    if set(state) != expected:
        raise ModelNotFoundError(f"{weights_path} holds unexpected tensors: missing "
                                 f"{sorted(expected - set(state))[:3]}, extra {sorted(set(state) - expected)[:3]}")
    model.load_state_dict(state, strict=False)
    model.eval()
    from ragzip.registry import resolve_device, resolve_dtype

    target = resolve_device(device) if device is not None else "cpu"
    torch_dtype = resolve_dtype(dtype, target)
    if torch_dtype != torch.float32:
        model.to(torch_dtype)
    if target != "cpu":
        model.to(target)
    return model, tokenizer


_shared: dict[tuple[str, int, int, str, str], tuple[SentenceSpanScorer, Any]] = {}
_shared_lock = threading.Lock()


def shared_scorer(folder: str | Path | None = None, *, dtype: str = "float32",
                  device: str | None = None) -> tuple[SentenceSpanScorer, Any]:
    """`load_scorer`, loaded once per process for the same weights file, dtype and device: EXIT, lingua2's query
    scorer and every pipeline stage read one copy (inference never writes to it). The key holds the weights file's
    path, size and modification time, so weights replaced on disk load afresh. Callers must not train or modify the
    returned model (training loads its own with `load_scorer`)."""
    from ragzip.registry import resolve_device, resolve_dtype

    folder = Path(folder) if folder is not None else WEIGHTS_DIR
    weights = folder / _WEIGHTS_FILE
    stat = weights.stat() if weights.is_file() else None
    target = resolve_device(device) if device is not None else "cpu"
    key = (str(weights.resolve()), stat.st_size if stat else -1, stat.st_mtime_ns if stat else -1,
           str(resolve_dtype(dtype, target)), target)
    with _shared_lock:  # one load even when several threads build compressors at once
        if key not in _shared:
            _shared[key] = load_scorer(folder, dtype=dtype, device=device)
        return _shared[key]


def score_documents(model: SentenceSpanScorer, tokenizer: Any, query: str,
                    documents: Sequence[tuple[str, str, Sequence[tuple[int, int]]]], *,
                    batch_size: int = 16, max_padding: float = 0.1, max_tokens: int | None = None) -> DocumentScores:
    """Probability that each sentence (and, with a document head, each document) is needed to answer `query`.

    A document split into several windows takes the best window's document score.

    Windows are sorted by length and cut into batches of at most `batch_size` rows whose padding stays under
    `max_padding` of their real tokens (padding is pure waste on CPU), so a 10-document question runs in a few
    nearly unpadded forwards.
    """
    return score_many(model, tokenizer, [(query, documents)], batch_size=batch_size, max_padding=max_padding,
                      max_tokens=max_tokens)[0]


Job = tuple[str, Sequence[tuple[str, str, Sequence[tuple[int, int]]]]]  # (query, documents) of one request


def forward_shape(model: nn.Module) -> tuple[int, float]:
    """(windows, padding share) per forward that serve one question fastest for the model's dtype. Measured on 2
    cores with native bf16, 10-paragraph questions interleaved (median): bf16 145 ms at (16, 0.1), 107 ms at
    (64, 0.6) -- its matmuls gain more from fewer, larger forwards than padding costs; fp32 195 ms at (16, 0.1),
    213 ms at (64, 0.6) -- every padded token costs."""
    low_precision = next(model.parameters()).dtype in (torch.bfloat16, torch.float16)
    return (64, 0.6) if low_precision else (16, 0.1)


def score_many(model: SentenceSpanScorer, tokenizer: Any, jobs: Sequence[Job], *, batch_size: int = 16,
               max_padding: float = 0.1, max_tokens: int | None = None) -> list[DocumentScores]:
    """`score_documents` for several independent queries at once: the windows of all of them are sorted by length
    together and batched, so many short requests fill a few large forwards (what a busy server and a streamed file
    gain from) instead of many small ones. Each window's scores go back to its own request."""
    rows = [(j, row) for j, (query, documents) in enumerate(jobs)
            for row in build_rows(tokenizer, query, documents, model.config)]
    device = next(model.parameters()).device
    scores = [[[0.0] * len(spans) for _, _, spans in documents] for _, documents in jobs]
    doc_scores: list[list[float] | None] = [[0.0] * len(documents) if model.doc_head is not None else None
                                            for _, documents in jobs]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][1].input_ids))
    with torch.inference_mode():
        for batch_ids in length_batches([len(rows[i][1].input_ids) for i in order], batch_size, max_padding,
                                        max_tokens):
            owners = [rows[order[i]][0] for i in batch_ids]
            chunk = [rows[order[i]][1] for i in batch_ids]
            batch = {k: v.to(device) for k, v in collate(chunk, int(tokenizer.pad_token_id or 0)).items()}
            logits, counts, doc_logits = model(**batch, num_slots=max(1, num_slots(chunk)))
            probs = torch.sigmoid(logits.float()).tolist()
            for b, (job, slots) in enumerate(zip(owners, slot_map(chunk))):
                for k, (d, s) in enumerate(slots):
                    if counts[b, k] > 0:
                        scores[job][d][s] = max(scores[job][d][s], probs[b][k])
            if doc_logits is not None:
                for job, row, p in zip(owners, chunk, torch.sigmoid(doc_logits.float()).tolist()):
                    mine = doc_scores[job]
                    if mine is not None:
                        mine[row.doc] = max(mine[row.doc], p)
    return [DocumentScores(s, d) for s, d in zip(scores, doc_scores)]


def length_batches(lengths: Sequence[int], batch_size: int, max_padding: float,
                   max_tokens: int | None = None) -> list[list[int]]:
    """Consecutive index groups of ascending `lengths`: at most `batch_size` each, padding <= `max_padding` x real,
    and (with `max_tokens`) at most that many padded tokens per group."""
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i, n in enumerate(lengths):
        full = len(current) >= batch_size or (max_tokens is not None and n * (len(current) + 1) > max_tokens)
        if current and (full or n * (len(current) + 1) > (1 + max_padding) * (real + n)):
            batches.append(current)
            current, real = [], 0
        current.append(i)
        real += n
    if current:
        batches.append(current)
    return batches
