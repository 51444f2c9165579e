"""KV-reuse engine: answers from documents whose chunk caches come from a KV store.

The prompt is assembled from independently tokenised pieces (chat header, one piece per document,
question + assistant tail), so a document's token ids, and with them its store key, never depend on
its neighbours or its place in the prompt. Each document's K/V is fetched from the store (computed and
stored on a miss), fused by the blended prefill, and answers are generated greedily from the fused cache.

The default mode is `ReuseMode.AUTO`: blend only at the ratio the model's qualification (`ragzip.kv_qualify`,
calibrated once and cached) showed to keep full prefill's answers, and otherwise exact prefix reuse with the rest
computed, which answers as full prefill does. `stats.mode` and `stats.reason` say which path ran and why.

Example:
    >>> from ragzip.kvstore import MemoryStore
    >>> engine = KVReuseEngine(store=MemoryStore())
    >>> engine.answer("Who wrote Red Dragon?", docs)
    'Thomas Harris'
    >>> engine.stats.hits, engine.stats.misses, engine.stats.ttft_s
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ragzip.decoding import clean_answer, eos_ids, greedy_ids, text_deltas
from ragzip.errors import ConfigError, UnsupportedModelError
from ragzip.kernels.errors import UnsupportedModelError as KernelUnsupported
from ragzip.kv_qualify import LENGTH_SLACK, Qualification, cached_qualification, load_or_qualify
from ragzip.options import parse_enum
from ragzip.prompt import SYSTEM_PROMPT, PromptBuilder, PromptPieces
from ragzip.types import Document

__all__ = ["SYSTEM_PROMPT", "EngineStats", "KVReuseEngine", "Prefill", "PromptPieces", "Qualification", "ReuseMode"]

log = logging.getLogger(__name__)

# Prefix caching reuses header + first document only when they are at least this share of the prompt.
PREFIX_MIN_SHARE = 1 / 3


class ReuseMode(str, Enum):
    """How the prompt's document caches are used."""

    FULL = "full"  # no reuse: plain prefill of the whole prompt
    PREFIX = "prefix"  # prefix caching: header + first document reused exactly, the rest prefilled (if it pays)
    REUSE = "reuse"  # every document cache concatenated (positions corrected), no recompute
    BLEND = "blend"  # selective recompute over the reused caches
    AUTO = "auto"  # blend at the model's qualified ratio; exact prefix reuse + compute when it is unqualified


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
    recomputed_chunks: int = 0  # stored chunks the controller chose to recompute rather than load
    decisions: list[str] = field(default_factory=list)  # the controller's reasons, one per stored chunk
    requested: str = ""  # the mode asked for (e.g. "auto")
    mode: str = ""  # the path that ran: full | prefix | reuse | blend
    ratio: float | None = None  # the recompute ratio, when it blended
    reason: str = ""  # why that path (auto: the qualification's verdict)
    warning: str | None = None  # e.g. a blend asked for on a model the gate did not qualify

    def as_dict(self) -> dict[str, Any]:
        """The response's ``kv`` object: which path ran and why, what was reused and recomputed, loading time."""
        out: dict[str, Any] = {"mode": self.mode, "requested": self.requested, "reason": self.reason,
                               "hits": self.hits, "misses": self.misses, "reused_tokens": self.reused_tokens,
                               "recomputed_tokens": self.recomputed_tokens, "load_s": round(self.load_s, 4)}
        if self.ratio is not None:
            out["ratio"] = self.ratio
        if self.warning:
            out["warning"] = self.warning
        if self.decisions:
            out["recomputed_chunks"] = self.recomputed_chunks
            out["decisions"] = list(self.decisions)
        return out


@dataclass(slots=True)
class Prefill:
    """A prefilled prompt ready to decode from."""

    logits: Tensor  # [V] next-token logits
    cache: Any  # HF cache holding the prompt
    num_tokens: int


class KVReuseEngine:
    """Generate from prompts whose document caches are reused from a KV store.

    Every chunk goes through `ragzip.kvstore.loader` (one path: key, fingerprint and token check, device and
    dtype move). Document caches are computed after the engine's fixed chat header (`PromptPieces.context`), so
    the header, not each chunk's first tokens, holds the attention sink, as it does at answer time.

    Args:
        model: a loaded HF causal LM (default: the embedded SmolLM2 via `load_causal_lm`).
        tokenizer: its tokenizer (required with ``model``).
        store: a `ragzip.kvstore` store (default: an in-memory one).
        blend: selective-recompute hyperparameters (default `BlendConfig()`).
        mode: default reuse mode (`ReuseMode.AUTO`: blend only where the model is qualified).
        qualification: the model's blending verdict (default: the cached one, else calibrated on the first
            AUTO request; see `ragzip.kv_qualify`).
        qualification_dir: where verdicts are cached (default: the settings' cache dir).
        run_self_check: run the blending self-check once at construction (refuses failing models).
        controller: an optional `LoadingController`: per stored chunk, load it or recompute it inside the
            blended pass, from measured store and prefill speeds (its reasons land in `stats.decisions`).
        sink_context: compute document caches after the fixed chat header (default); False computes each
            alone from position 0, as before (kept to measure against).

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
        mode: ReuseMode | str = ReuseMode.AUTO,
        run_self_check: bool = True,
        controller: Any = None,
        sink_context: bool = True,
        qualification: Qualification | None = None,
        qualification_dir: Path | None = None,
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
        self.prompt = PromptBuilder(tokenizer)
        try:
            self.adapter = HFAdapter(model)
            self.self_check = self_check(self.adapter) if run_self_check else None
        except KernelUnsupported as exc:
            raise UnsupportedModelError(str(exc)) from exc
        self.blend = blend or BlendConfig()
        self.mode = parse_enum(ReuseMode, mode, "reuse mode")
        self.controller = controller
        self.fingerprint = model_fingerprint(model)
        self.stats = EngineStats()
        self._total_hits = 0
        self._total_misses = 0
        self._context: list[int] | None = None if sink_context else []
        self.qualification_dir = qualification_dir
        self._qualification = qualification if qualification is not None else cached_qualification(
            self, qualification_dir)
        self._qualify_lock = threading.Lock()
        self._warned = False

    # -- qualification ------------------------------------------------------------------------------
    @property
    def qualification(self) -> Qualification:
        """The model's blending verdict: given, cached, or calibrated now (once; about 10 prompts' answers)."""
        if self._qualification is None:
            with self._qualify_lock:  # concurrent first requests calibrate once
                if self._qualification is None:
                    self._qualification = load_or_qualify(self, cache_dir=self.qualification_dir)
        return self._qualification

    def scratch(self) -> KVReuseEngine:
        """An engine on the same model and blend configuration with a private in-memory store of the same codec
        (what calibration runs on, so the user's store is not filled with calibration chunks)."""
        from ragzip.kvstore.stores.memory import MemoryStore

        codec = getattr(self.store, "codec", None) if getattr(self.store, "is_encoded", True) else None
        engine = KVReuseEngine(self.model, self.tokenizer, store=MemoryStore(codec=codec), blend=self.blend,
                               mode=ReuseMode.FULL, run_self_check=False, qualification=_CALIBRATING)
        engine._context = self._context
        return engine

    def _plan(self, mode: ReuseMode, blend: Any, prompt_tokens: int) -> tuple[ReuseMode, Any, str, str | None]:
        """(mode to run, blend config, reason, warning) for the mode asked for."""
        if mode is ReuseMode.AUTO:
            verdict = self.qualification
            if verdict.qualified and not verdict.covers(prompt_tokens):
                reason = (f"{verdict.reason}, but this prompt has {prompt_tokens} tokens (a verdict covers up to "
                          f"{LENGTH_SLACK:g}x its longest calibration prompt; `ragzip kv qualify --docs-per-prompt` "
                          f"qualifies longer prompts); exact prefix reuse, the rest computed")
                return ReuseMode.PREFIX, None, reason, None
            if verdict.qualified and verdict.ratio is not None:
                chosen = replace(blend or self.blend, recompute_ratio=verdict.ratio)
                return ReuseMode.BLEND, chosen, verdict.reason, None
            return ReuseMode.PREFIX, None, f"{verdict.reason}; exact prefix reuse, the rest computed", None
        verdict = self._qualification
        if mode in (ReuseMode.BLEND, ReuseMode.REUSE) and verdict is not None and not verdict.qualified \
                and verdict is not _CALIBRATING:
            warning = f"{mode.value} asked for explicitly on a model the gate did not qualify ({verdict.reason})"
            if not self._warned:
                log.warning("%s; answers may differ from full prefill's", warning)
                self._warned = True
            return mode, blend, "asked for explicitly", warning
        return mode, blend, "asked for explicitly", None

    # -- prompt ------------------------------------------------------------------------------------
    @property
    def context(self) -> list[int]:
        """The fixed header every document cache is computed after (the default chat header)."""
        if self._context is None:
            self._context = self.prompt.context
        return self._context

    def pieces(self, question: str, documents: Sequence[Document], *, system: str | None = None,
               history: Sequence[dict[str, str]] = ()) -> PromptPieces:
        """The answer prompt (`ragzip.prompt`) as stable token pieces; see `PromptBuilder.pieces`."""
        pieces = self.prompt.pieces(question, documents, system=system, history=history)
        return replace(pieces, context=self.context)

    # -- store -------------------------------------------------------------------------------------
    def chunk_kv(self, token_ids: Sequence[int], context: Sequence[int] = (), *, count: bool = True) -> Any:
        """The `ChunkRecord` of ``token_ids`` (computed after ``context``) from the store, or computed and stored.

        ``count=False`` keeps the lookup out of `stats` hits/misses (the chat header: they count documents).
        """
        from ragzip.kvstore.loader import get_or_compute

        record, hit = get_or_compute(self.store, self.model, token_ids, context)
        if count:
            self._count(hit)
        return record

    def _count(self, hit: bool) -> None:
        if hit:
            self.stats.hits += 1
            self._total_hits += 1
        else:
            self.stats.misses += 1
            self._total_misses += 1

    def _document_kv(self, token_ids: Sequence[int], context: Sequence[int]) -> Any:
        """A document's record, or None when the controller decides to recompute it inside the prompt."""
        if self.controller is None:
            return self.chunk_kv(token_ids, context)
        from ragzip.kvstore.key import chunk_key

        key = chunk_key(self.fingerprint, token_ids, context)
        if not self.store.contains(key):
            return self.chunk_kv(token_ids, context)  # a miss: compute once and store it for the next request
        codec = str(getattr(getattr(self.store, "codec", None), "name", "raw"))
        kv_bytes = len(token_ids) * self.adapter.kv_bytes_per_token
        decision = self.controller.decide(len(token_ids), kv_bytes, [self.controller.option(codec, kv_bytes)])
        self.stats.decisions.append(decision.reason)
        if decision.action == "recompute":
            self.stats.recomputed_chunks += 1
            return None
        return self.chunk_kv(token_ids, context)

    def warm(self, documents: Sequence[Document], *, prefix: bool = True) -> int:
        """Compute and store the caches of ``documents`` (and the header) ahead of time.

        Args:
            documents: the documents, as they will be sent (title and text).
            prefix: also store header + first document as one entry (what `ReuseMode.PREFIX` looks up).

        Returns:
            How many document caches were computed; the others were already stored.
        """
        pieces = self.pieces("", documents)
        self.chunk_kv(pieces.header, count=False)
        before = self._total_misses
        for ids in pieces.documents:
            self.chunk_kv(ids, pieces.context)
        computed = self._total_misses - before
        if prefix and pieces.documents:
            self.chunk_kv(pieces.header + pieces.documents[0])
        return computed

    # -- prefill -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(
        self, question: str, documents: Sequence[Document], *, mode: ReuseMode | str | None = None, blend: Any = None,
        system: str | None = None, history: Sequence[dict[str, str]] = (),
    ) -> Prefill:
        """Prefill the prompt in ``mode`` (default: the engine's); updates `stats` (TTFT includes KV loading)."""
        from ragzip.kernels.blend import BlendConfig, Segment, blended_prefill

        requested = parse_enum(ReuseMode, mode or self.mode, "reuse mode")
        pieces = self.pieces(question, documents, system=system, history=history)
        mode, blend, reason, warning = self._plan(requested, blend, len(pieces.token_ids))
        self.stats = EngineStats(prompt_tokens=len(pieces.token_ids), requested=requested.value, mode=mode.value,
                                 reason=reason, warning=warning)
        ids = pieces.token_ids
        device = self.adapter.device
        t0 = time.perf_counter()
        if mode is ReuseMode.FULL:
            logits, cache = self.adapter.full_prefill(torch.tensor([ids], device=device))
            self.stats.recomputed_tokens = len(ids)
        elif mode is ReuseMode.PREFIX and len(pieces.header) + len(pieces.documents[0] if pieces.documents else []) < (
                PREFIX_MIN_SHARE * len(ids)):
            # Too short a prefix to pay: computing the rest against a cache takes an explicit mask (no causal
            # kernel), which costs more than the prefix saves (0.81x on SmolLM2 at 10 % of 6k tokens, CPU).
            logits, cache = self.adapter.full_prefill(torch.tensor([ids], device=device))
            self.stats.recomputed_tokens = len(ids)
            self.stats.mode = ReuseMode.FULL.value
            self.stats.reason += "; the stored prefix is under a third of the prompt: full prefill"
        elif mode is ReuseMode.PREFIX:
            prefix = pieces.header + (pieces.documents[0] if pieces.documents else [])
            record = self.chunk_kv(prefix)
            self.stats.load_s = time.perf_counter() - t0
            # The exact prefix and a fresh rest: the blended pass runs only the rest's rows, in groups of about
            # 256 that each attend to the keys before them, into preallocated K/V (no growing HF cache).
            rest = ids[len(prefix) :]
            segs = [Segment(record.token_ids, record.layers, 0, exact=True), Segment(rest)]
            cfg = BlendConfig(recompute_ratio=0.0, row_groups=max(1, len(rest) // 256))
            out = blended_prefill(self.adapter, segs, cfg)
            logits, cache = out.logits, self.adapter.make_cache(out.kv)
            self.stats.reused_tokens = len(prefix)
            self.stats.recomputed_tokens = len(ids) - len(prefix)
        else:
            header = self.chunk_kv(pieces.header, count=False)
            segs = [Segment(header.token_ids, header.layers, header.start, exact=True)]
            for doc in pieces.documents:
                rec = self._document_kv(doc, pieces.context)
                segs.append(Segment(doc) if rec is None else Segment(rec.token_ids, rec.layers, rec.start))
            segs.append(Segment(pieces.tail))
            self.stats.load_s = time.perf_counter() - t0
            cfg = blend or self.blend
            self.stats.ratio = None if mode is ReuseMode.REUSE else cfg.recompute_ratio
            if mode is ReuseMode.REUSE:  # plain reuse: no recompute beyond chunks the controller gave back
                cfg = BlendConfig(recompute_ratio=0.0, fresh_check_kv=False, check_layer=0)
            out = blended_prefill(self.adapter, segs, cfg)
            logits, cache = out.logits, self.adapter.make_cache(out.kv)
            self.stats.recomputed_tokens = out.recomputed_tokens
            self.stats.reused_tokens = sum(len(s.token_ids) for s in segs if s.kv is not None)
        logits.argmax()  # the first token is known here: TTFT stops
        self.stats.ttft_s = time.perf_counter() - t0
        return Prefill(logits=logits, cache=cache, num_tokens=len(ids))

    # -- generation --------------------------------------------------------------------------------
    def generate_ids(self, prefill: Prefill, *, max_new_tokens: int = 32) -> Iterator[int]:
        """Greedy token ids from a prefilled prompt, stopping at EOS."""
        pos = prefill.num_tokens

        @torch.inference_mode()
        def step(token: int) -> Tensor:
            nonlocal pos
            ids = torch.tensor([[token]], device=self.adapter.device)
            logits = self.adapter.forward_with_cache(ids, prefill.cache, pos, logits_to_keep=1)[-1]
            pos += 1
            return logits

        return greedy_ids(prefill.logits, step, eos=eos_ids(self.model, self.tokenizer), max_new_tokens=max_new_tokens)

    def stream(self, question: str, documents: Sequence[Document], *, max_new_tokens: int = 32,
               mode: ReuseMode | str | None = None, system: str | None = None,
               history: Sequence[dict[str, str]] = (), blend: Any = None) -> Iterator[str]:
        """Yield the answer's text as it is generated (greedy, from the fused cache)."""
        pre = self.prefill(question, documents, mode=mode, blend=blend, system=system, history=history)
        return text_deltas(self.tokenizer, self.generate_ids(pre, max_new_tokens=max_new_tokens))

    def answer(self, question: str, documents: Sequence[Document], *, max_new_tokens: int = 32,
               mode: ReuseMode | str | None = None, system: str | None = None,
               history: Sequence[dict[str, str]] = (), blend: Any = None) -> str:
        """The greedy answer to ``question`` from ``documents``."""
        return clean_answer("".join(self.stream(question, documents, max_new_tokens=max_new_tokens, mode=mode,
                                                system=system, history=history, blend=blend)))

    @torch.inference_mode()
    def teacher_forced_logits(self, prefill: Prefill, target_ids: Sequence[int]) -> Tensor:
        """``[len(target_ids), V]`` next-token logits along ``target_ids`` (the first row is the prefill's)."""
        rows = [prefill.logits[None]]
        if len(target_ids) > 1:
            step = torch.tensor([list(target_ids[:-1])], device=self.adapter.device)
            rows.append(self.adapter.forward_with_cache(step, prefill.cache, prefill.num_tokens))
        return torch.cat(rows, dim=0)


# The scratch engine's verdict while it calibrates (explicit blends there are the calibration, not a user's choice).
_CALIBRATING = Qualification(False, None, "calibrating")
