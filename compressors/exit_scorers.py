"""Sentence scorers of the EXIT-style compressor: the one-pass encoder and the causal-LM Yes/No judge.

Both map ``(query, [(title, text, sentence spans)])`` to one probability per sentence, per document.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ragzip.compressors.calibration import load_calibration
from ragzip.errors import ConfigError, InputError, ModelNotFoundError, UnsupportedModelError, extra_hint
from ragzip.registry import quiet_loading

if TYPE_CHECKING:
    from ragzip.compressors.exit_encoder import DocumentScores

DocSentences = tuple[str, str, Sequence[tuple[int, int]]]

# The published EXIT release: gemma-2b-it with a LoRA adapter (loaded by name where a user has them).
EXIT_BASE_MODEL = "google/gemma-2b-it"
EXIT_ADAPTER = "doubleyyh/exit-gemma-2b"
EXIT_ALIASES = frozenset({"exit", "exit-gemma-2b", EXIT_ADAPTER})

QUESTION = 'Is this sentence useful in answering the query? Answer only "Yes" or "No".'
_TRUNCATION_MARK = " ... "
_SAFETY_TOKENS = 8  # a re-tokenised truncated context can differ from its token estimate by a few tokens


class SentenceScorer(Protocol):
    """Scores every candidate sentence of every document for one query.

    A scorer may also offer ``score_documents(query, documents) -> DocumentScores`` (sentence and whole-document
    probabilities from the same forward); `ExitCompressor` then uses the document scores as its document prior.
    """

    name: str

    def score(self, query: str, documents: Sequence[DocSentences]) -> list[list[float]]: ...


# Cross-request batches (measured on 2 cores, bf16: 64 windows per forward served 16 questions 2.2x faster than one
# question at a time, 16 windows 1.7x); with many windows to group, little padding is needed (16 questions: 81-99 ms
# each at 10% padding, 99-115 ms at 60%); the token bound keeps a forward's activations small (~100 MB).
MANY_BATCH_ROWS = 64
MANY_MAX_PADDING = 0.1
MANY_BATCH_TOKENS = 16384


class EncoderScorer:
    """One encoder forward per (query, document window) scores all its sentences (the fast default).

    Args:
        weights: folder with ``config.json`` and ``model.safetensors`` (default: the weights shipped in the package).
        batch_size: windows per forward (at most; batches are also cut to keep padding low). Default: by dtype
            (`exit_encoder.forward_shape`).
        dtype: "auto" (bf16 where the CPU has native bf16, about 2x faster; else fp32), "bfloat16" or "float32".
        device: "auto" (cuda when available, else cpu), "cpu", "cuda", "cuda:N".
    """

    name = "encoder"

    def __init__(self, weights: str | None = None, *, batch_size: int | None = None, dtype: str = "auto",
                 device: str | None = "auto") -> None:
        from ragzip.compressors.exit_encoder import WEIGHTS_DIR, forward_shape, shared_scorer

        self.model, self.tokenizer = shared_scorer(weights, dtype=dtype, device=device)
        rows, self.max_padding = forward_shape(self.model)
        self.batch_size = batch_size or rows
        # Sentence score -> P(the sentence is needed evidence), fitted for these weights (None: not calibrated).
        self.calibration = load_calibration(weights if weights is not None else WEIGHTS_DIR)

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, *, batch_size: int = 16) -> EncoderScorer:
        """A scorer over an already loaded `SentenceSpanScorer` (the training script calibrates through this)."""
        scorer = cls.__new__(cls)
        scorer.model, scorer.tokenizer, scorer.batch_size = model, tokenizer, batch_size
        scorer.max_padding = 0.1
        scorer.calibration = None
        return scorer

    def score(self, query: str, documents: Sequence[DocSentences]) -> list[list[float]]:
        return self.score_documents(query, documents).sentences

    def score_documents(self, query: str, documents: Sequence[DocSentences]) -> DocumentScores:
        """Sentence probabilities and, when the weights have a document head, document probabilities."""
        from ragzip.compressors.exit_encoder import score_documents

        return score_documents(self.model, self.tokenizer, query, documents, batch_size=self.batch_size,
                               max_padding=self.max_padding, max_tokens=MANY_BATCH_TOKENS)

    def score_many(self, jobs: Sequence[tuple[str, Sequence[DocSentences]]]) -> list[DocumentScores]:
        """`score_documents` of several independent (query, documents) jobs, their windows batched together (up to
        `MANY_BATCH_ROWS` windows and `MANY_BATCH_TOKENS` tokens per forward: larger forwards than one question
        fills, which is where the batched throughput comes from)."""
        from ragzip.compressors.exit_encoder import score_many

        if len(jobs) <= 1:  # one request: the single-call shape, so its scores are exactly compress's
            return [self.score_documents(q, docs) for q, docs in jobs]
        return score_many(self.model, self.tokenizer, jobs, batch_size=max(self.batch_size, MANY_BATCH_ROWS),
                          max_padding=MANY_MAX_PADDING, max_tokens=MANY_BATCH_TOKENS)


def fuse_scores(scores: Sequence[Sequence[float]], *, doc_weight: float = 0.0, neighbor_weight: float = 0.0,
                doc_scores: Sequence[float] | None = None) -> list[list[float]]:
    """Blend each sentence score with cheap document-level and neighbour signals (results stay in [0, 1]).

    ``s' = (1 - doc_weight) * s + doc_weight * p(document)`` lifts the sentences of documents that are needed as a
    whole (multi-hop bridge sentences score low alone), where p(document) is `doc_scores` (a document head) or, when
    not given, the best sentence score of the document; then
    ``s'' = max(s', neighbor_weight * max(s' of the previous and the next sentence))`` lets a sentence inherit part
    of an adjacent strong sentence's score (pronoun continuations).

    Args:
        scores: per document, one probability per sentence.
        doc_weight: weight of the document score, in [0, 1].
        neighbor_weight: share of the best adjacent score a sentence inherits, in [0, 1].
        doc_scores: one probability per document (default: each document's best sentence score).
    """
    if not (0.0 <= doc_weight <= 1.0 and 0.0 <= neighbor_weight <= 1.0):
        raise ConfigError("doc_weight and neighbor_weight must be in [0, 1]")
    fused = []
    if doc_scores is not None and len(doc_scores) != len(scores):
        raise ConfigError(f"{len(doc_scores)} document scores for {len(scores)} documents")
    for d, doc in enumerate(scores):
        top = max(doc, default=0.0) if doc_scores is None else float(doc_scores[d])
        blended = [(1.0 - doc_weight) * s + doc_weight * top for s in doc]
        fused.append([max(v, neighbor_weight * max(blended[i - 1] if i else 0.0,
                                                    blended[i + 1] if i + 1 < len(blended) else 0.0))
                      for i, v in enumerate(blended)])
    return fused


def user_message(query: str, context: str, sentence: str) -> str:
    """The EXIT judge's question: the query, the containing document as "Full context", the sentence."""
    return f"Query:\n{query}\nFull context:\n{context}\nSentence:\n{sentence}\n{QUESTION}"


def render_prompt(tokenizer: Any, message: str) -> str:
    """The user turn followed by the assistant turn opener: the model's chat template, else Gemma's turn format
    (which is what the EXIT release was trained on)."""
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                                 add_generation_prompt=True))
    bos = tokenizer.bos_token or ""
    return f"{bos}<start_of_turn>user\n{message}<end_of_turn>\n<start_of_turn>model\n"


def label_token_ids(tokenizer: Any) -> tuple[int, int]:
    """Ids of the single tokens "Yes" and "No".

    Raises:
        UnsupportedModelError: either label is not exactly one token in this vocabulary.
    """
    ids = []
    for label in ("Yes", "No"):
        encoded = tokenizer.encode(label, add_special_tokens=False)
        if len(encoded) != 1:
            raise UnsupportedModelError(f"the label {label!r} is {len(encoded)} tokens in this tokenizer "
                                        f"({encoded}); the Yes/No scorer needs single-token labels")
        ids.append(int(encoded[0]))
    if ids[0] == ids[1]:
        raise UnsupportedModelError("'Yes' and 'No' map to the same token")
    return ids[0], ids[1]


def prompt_ids(tokenizer: Any, query: str, context: str, sentence: str, max_length: int) -> list[int]:
    """Token ids of one judge prompt within `max_length`.

    An over-long context keeps its head and tail halves (joined by " ... "); the query and the sentence are never
    truncated.

    Raises:
        InputError: the prompt without any context already exceeds `max_length`.
    """
    def encode(ctx: str) -> list[int]:
        text = render_prompt(tokenizer, user_message(query, ctx, sentence))
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    full = encode(context)
    if len(full) <= max_length:
        return full
    fixed = len(encode(_TRUNCATION_MARK.strip()))
    room = max_length - fixed - _SAFETY_TOKENS
    if room <= 0:
        raise InputError(f"the query and sentence alone take {fixed} tokens, over the scorer's "
                         f"max_length={max_length}; they are never truncated")
    offsets = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    for _ in range(3):  # a tokenizer may merge across the cut; shrink by the overflow and retry
        head, tail = room - room // 2, room // 2
        cut = context[: offsets[head - 1][1]] if head else ""
        if tail:
            cut += _TRUNCATION_MARK + context[offsets[len(offsets) - tail][0]:]
        ids = encode(cut)
        if len(ids) <= max_length:
            return ids
        room -= len(ids) - max_length
    raise InputError(f"could not fit the judge prompt into max_length={max_length} tokens")


class CausalLMScorer:
    """EXIT's judge: P(Yes) / (P(Yes) + P(No)) from the next-token logits after the prompt, batched with left padding.

    Args:
        model: registry alias, local path or Hugging Face name of a causal LM (default: the embedded SmolLM2,
            used zero-shot); "exit" / "exit-gemma-2b" loads ``google/gemma-2b-it`` + ``doubleyyh/exit-gemma-2b``.
        adapter: a PEFT (LoRA) adapter folder or hub name applied on top of `model` (needs ``peft``).
        batch_size: prompts per forward.
        max_length: prompt window in tokens (default: min(model positions, 4096)).
        dtype: "auto", "bfloat16" or "float32".
        device: "auto" (cuda when available, else cpu), "cpu", "cuda", "cuda:N".
    """

    name = "causal-lm"

    def __init__(self, model: str | None = None, *, adapter: str | None = None, batch_size: int = 8,
                 max_length: int | None = None, dtype: str = "auto", device: str | None = "auto") -> None:
        from ragzip.registry import load_causal_lm, resolve_device, resolve_dtype

        if model is not None and model.lower() in EXIT_ALIASES:
            model, adapter = EXIT_BASE_MODEL, adapter or EXIT_ADAPTER
        device = resolve_device(device)
        self.model, self.tokenizer = load_causal_lm(model, dtype=resolve_dtype(dtype, device), device=device)
        if adapter:
            self.model = _apply_adapter(self.model, adapter)
        self.yes_id, self.no_id = label_token_ids(self.tokenizer)
        positions = int(getattr(self.model.config, "max_position_embeddings", 4096) or 4096)
        self.max_length = int(max_length or min(positions, 4096))
        self.batch_size = batch_size
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)

    def score(self, query: str, documents: Sequence[DocSentences]) -> list[list[float]]:
        prompts: list[tuple[int, int, list[int]]] = []
        for d, (title, text, spans) in enumerate(documents):
            context = f"{title}\n{text}" if title else text
            for s, (a, b) in enumerate(spans):
                prompts.append((d, s, prompt_ids(self.tokenizer, query, context, text[a:b], self.max_length)))
        scores = [[0.0] * len(spans) for _, _, spans in documents]
        prompts.sort(key=lambda p: len(p[2]))
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start:start + self.batch_size]
            for (d, s, _), p in zip(chunk, self.yes_probability([ids for _, _, ids in chunk])):
                scores[d][s] = p
        return scores

    def yes_probability(self, batch: Sequence[Sequence[int]]) -> list[float]:
        """P(Yes) / (P(Yes) + P(No)) at the last position of each prompt (left padded, exact positions)."""
        import torch

        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, ids in enumerate(batch):
            input_ids[i, width - len(ids):] = torch.tensor(list(ids), dtype=torch.long)
            mask[i, width - len(ids):] = 1
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # padding must not shift the real tokens' positions
        device = next(self.model.parameters()).device
        input_ids, mask, position_ids = input_ids.to(device), mask.to(device), position_ids.to(device)
        with torch.inference_mode():
            logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                                logits_to_keep=1).logits[:, -1]  # [B, V]
        pair = logits[:, [self.yes_id, self.no_id]].float()  # [B, 2]
        return [float(p) for p in torch.softmax(pair, dim=-1)[:, 0]]


def _apply_adapter(model: Any, adapter: str) -> Any:
    try:
        from peft import PeftModel
    except ImportError:
        raise ConfigError(f"loading an adapter needs peft: {extra_hint('exit')}") from None
    try:
        with quiet_loading():
            merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"could not load adapter {adapter!r} offline ({type(exc).__name__}: {exc})") from exc
    merged.eval()
    return merged
