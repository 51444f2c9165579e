"""KV-reuse engine: answers from documents whose chunk caches come from a KV store.

The prompt is assembled from independently tokenised pieces (chat header, one piece per document,
question + assistant tail), so a document's token ids, and with them its store key, never depend on
its neighbours or its place in the prompt. Each document's K/V is fetched from the store (computed and
stored on a miss), fused by the blended prefill, and answers are generated greedily from the fused cache.

Example:
    >>> from ragzip.kvstore import MemoryStore
    >>> engine = KVReuseEngine(store=MemoryStore())
    >>> engine.answer("Who wrote Red Dragon?", docs)
    'Thomas Harris'
    >>> engine.stats.hits, engine.stats.misses, engine.stats.ttft_s
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from ragzip.errors import ConfigError
from ragzip.types import Document

SYSTEM_PROMPT = "Answer the question using only the documents. Reply with a short answer (a few words), no explanation."
_PLACEHOLDER = "\uE000RAGZIP_DOCS\uE000"


class ReuseMode(str, Enum):
    """How the prompt's document caches are used."""

    FULL = "full"  # no reuse: plain prefill of the whole prompt
    PREFIX = "prefix"  # prefix caching only: header + first document reused exactly, the rest prefilled
    REUSE = "reuse"  # every document cache concatenated (positions corrected), no recompute
    BLEND = "blend"  # selective recompute over the reused caches

    @classmethod
    def parse(cls, value: str | ReuseMode) -> ReuseMode:
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(f"unknown reuse mode {value!r}; valid: {[m.value for m in cls]}") from None


@dataclass(slots=True)
class EngineStats:
    """Counters of the last request (and totals of hits/misses since construction)."""

    hits: int = 0
    misses: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0
    recomputed_tokens: int = 0
    ttft_s: float = 0.0
    load_s: float = 0.0


@dataclass(frozen=True, slots=True)
class PromptPieces:
    """A prompt as stable pieces: ``header`` + one piece per document + ``tail``."""

    header: list[int]
    documents: list[list[int]]
    tail: list[int]

    @property
    def token_ids(self) -> list[int]:
        return self.header + [t for d in self.documents for t in d] + self.tail


@dataclass(slots=True)
class Prefill:
    """A prefilled prompt ready to decode from."""

    logits: Tensor  # [V] next-token logits
    cache: Any  # HF cache holding the prompt
    num_tokens: int


class KVReuseEngine:
    """Generate from prompts whose document caches are reused from a KV store.

    Args:
        model: a loaded HF causal LM (default: the embedded SmolLM2 via `load_causal_lm`).
        tokenizer: its tokenizer (required with ``model``).
        store: a `ragzip.kvstore` store (default: an in-memory one).
        blend: selective-recompute hyperparameters (default `BlendConfig()`: 15% value deviation).
        mode: default reuse mode.
        run_self_check: run the blending self-check once at construction (refuses failing models).

    Raises:
        UnsupportedModelError: the model cannot be blended correctly.
    """

    def __init__(
        self,
        model: Any = None,
        tokenizer: Any = None,
        *,
        store: Any = None,
        blend: Any = None,
        mode: ReuseMode | str = ReuseMode.BLEND,
        run_self_check: bool = True,
    ) -> None:
        from ragzip.kernels.blend import BlendConfig, self_check
        from ragzip.kernels.hf_adapter import HFAdapter
        from ragzip.kvstore.fingerprint import model_fingerprint

        if model is None:
            from ragzip.registry import load_causal_lm

            model, tokenizer = load_causal_lm()
        if tokenizer is None:
            raise ConfigError("a tokenizer is required when a model is given")
        if store is None:
            from ragzip.kvstore.stores.memory import MemoryStore

            store = MemoryStore()
        self.model, self.tokenizer, self.store = model, tokenizer, store
        self.adapter = HFAdapter(model)
        self.blend = blend or BlendConfig()
        self.mode = ReuseMode.parse(mode)
        self.fingerprint = model_fingerprint(model)
        self.self_check = self_check(self.adapter) if run_self_check else None
        self.stats = EngineStats()
        self._total_hits = 0
        self._total_misses = 0

    # -- prompt ------------------------------------------------------------------------------------
    def pieces(self, question: str, documents: Sequence[Document]) -> PromptPieces:
        """Tokenise the answer-from-documents prompt into stable pieces."""
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": _PLACEHOLDER}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        head, _, tail = text.partition(_PLACEHOLDER)
        enc = self.tokenizer.encode
        docs = [enc(_doc_text(d), add_special_tokens=False) for d in documents]
        return PromptPieces(
            header=enc(head, add_special_tokens=False),
            documents=[d for d in docs if d],
            tail=enc(f"Question: {question}{tail}", add_special_tokens=False),
        )

    # -- store -------------------------------------------------------------------------------------
    def chunk_kv(self, token_ids: Sequence[int]) -> Any:
        """The `ChunkRecord` of ``token_ids`` from the store, computed and stored on a miss."""
        from ragzip.kvstore.key import chunk_key
        from ragzip.kvstore.prefill import prefill_chunk

        key = chunk_key(self.fingerprint, token_ids)
        record = self.store.get(key)
        if record is not None:
            self.stats.hits += 1
            self._total_hits += 1
            return record
        self.stats.misses += 1
        self._total_misses += 1
        record = prefill_chunk(self.model, token_ids)
        self.store.put(key, record)
        return record

    def warm(self, documents: Sequence[Document]) -> int:
        """Compute and store the caches of ``documents`` (and the header) ahead of time; returns misses."""
        before = self._total_misses
        pieces = self.pieces("", documents)
        for ids in [pieces.header, *pieces.documents]:
            self.chunk_kv(ids)
        if pieces.documents:
            self.chunk_kv(pieces.header + pieces.documents[0])
        return self._total_misses - before

    # -- prefill -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(
        self, question: str, documents: Sequence[Document], *, mode: ReuseMode | str | None = None, blend: Any = None
    ) -> Prefill:
        """Prefill the prompt in ``mode`` (default: the engine's); updates `stats` (TTFT includes KV loading)."""
        from ragzip.kernels.blend import Segment, blended_prefill, fuse_caches

        mode = ReuseMode.parse(mode or self.mode)
        pieces = self.pieces(question, documents)
        self.stats = EngineStats(prompt_tokens=len(pieces.token_ids))
        ids = pieces.token_ids
        device = self.adapter.device
        t0 = time.perf_counter()
        if mode is ReuseMode.FULL:
            logits, cache = self.adapter.full_prefill(torch.tensor([ids], device=device))
            self.stats.recomputed_tokens = len(ids)
        elif mode is ReuseMode.PREFIX:
            prefix = pieces.header + (pieces.documents[0] if pieces.documents else [])
            record = self.chunk_kv(prefix)
            self.stats.load_s = time.perf_counter() - t0
            cache = self.adapter.make_cache(record.to_cache_data())
            rest = torch.tensor([ids[len(prefix) :]], device=device)
            logits = self.adapter.forward_with_cache(rest, cache, len(prefix), logits_to_keep=1)[-1]
            self.stats.reused_tokens = len(prefix)
            self.stats.recomputed_tokens = len(ids) - len(prefix)
        else:
            records = [self.chunk_kv(p) for p in [pieces.header, *pieces.documents]]
            self.stats.load_s = time.perf_counter() - t0
            segs = [Segment(r.token_ids, r.layers, r.start) for r in records] + [Segment(pieces.tail)]
            num_cached = len(ids) - len(pieces.tail)
            if mode is ReuseMode.REUSE:
                kv, _ = fuse_caches(self.adapter, segs[:-1], num_cached)
                cache = self.adapter.make_cache(kv)
                tail = torch.tensor([pieces.tail], device=device)
                logits = self.adapter.forward_with_cache(tail, cache, num_cached, logits_to_keep=1)[-1]
                self.stats.recomputed_tokens = len(pieces.tail)
            else:
                out = blended_prefill(self.adapter, segs, blend or self.blend)
                logits, cache = out.logits, self.adapter.make_cache(out.kv)
                self.stats.recomputed_tokens = out.recomputed_tokens
            self.stats.reused_tokens = num_cached
        logits.argmax()  # the first token is known here: TTFT stops
        self.stats.ttft_s = time.perf_counter() - t0
        return Prefill(logits=logits, cache=cache, num_tokens=len(ids))

    # -- generation --------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate_ids(self, prefill: Prefill, *, max_new_tokens: int = 32) -> Iterator[int]:
        """Greedy token ids from a prefilled prompt, stopping at EOS."""
        eos = _eos_ids(self.model, self.tokenizer)
        logits, pos = prefill.logits, prefill.num_tokens
        for _ in range(max_new_tokens):
            tok = int(logits.argmax())
            if tok in eos:
                return
            yield tok
            step = torch.tensor([[tok]], device=self.adapter.device)
            logits = self.adapter.forward_with_cache(step, prefill.cache, pos, logits_to_keep=1)[-1]
            pos += 1

    def stream(self, question: str, documents: Sequence[Document], *, max_new_tokens: int = 32,
               mode: ReuseMode | str | None = None) -> Iterator[str]:
        """Yield the answer's text as it is generated (greedy, from the fused cache)."""
        pre = self.prefill(question, documents, mode=mode)
        out: list[int] = []
        shown = ""
        for tok in self.generate_ids(pre, max_new_tokens=max_new_tokens):
            out.append(tok)
            text = self.tokenizer.decode(out, skip_special_tokens=True)
            if len(text) > len(shown) and not text.endswith("\ufffd"):
                yield text[len(shown) :]
                shown = text

    def answer(self, question: str, documents: Sequence[Document], *, max_new_tokens: int = 32,
               mode: ReuseMode | str | None = None) -> str:
        """The greedy answer to ``question`` from ``documents``."""
        return "".join(self.stream(question, documents, max_new_tokens=max_new_tokens, mode=mode)).strip()

    @torch.inference_mode()
    def teacher_forced_logits(self, prefill: Prefill, target_ids: Sequence[int]) -> Tensor:
        """``[len(target_ids), V]`` next-token logits along ``target_ids`` (the first row is the prefill's)."""
        rows = [prefill.logits[None]]
        if len(target_ids) > 1:
            step = torch.tensor([list(target_ids[:-1])], device=self.adapter.device)
            rows.append(self.adapter.forward_with_cache(step, prefill.cache, prefill.num_tokens))
        return torch.cat(rows, dim=0)


def _doc_text(doc: Document) -> str:
    return (f"{doc.title}\n{doc.text}" if doc.title else doc.text).strip() + "\n\n"


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    out = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        out.add(int(tokenizer.eos_token_id))
    return out
