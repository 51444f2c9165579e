"""Local engine: the answer prompt (`ragzip.prompt`) on a local causal LM, greedy generation and streaming.

Example:
    >>> engine = LocalEngine()
    >>> engine.answer("Who wrote Hamlet?", [Document("d1", "Hamlet is a play by William Shakespeare.")])
    'William Shakespeare'
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ragzip.decoding import clean_answer, eos_ids, greedy_ids, text_deltas
from ragzip.errors import ConfigError
from ragzip.prompt import SYSTEM_PROMPT, Message, PromptBuilder
from ragzip.registry import cpu_supports_bf16, load_causal_lm, resolve_device, resolve_dtype
from ragzip.types import Document

# Re-exported: these names were imported from here before the prompt and the decoder had their own modules.
__all__ = ["SYSTEM_PROMPT", "GenerationStats", "LocalEngine", "clean_answer", "cpu_supports_bf16", "resolve_dtype"]


@dataclass(slots=True)
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    ttft_s: float = 0.0
    total_s: float = 0.0


class LocalEngine:
    """A local causal LM with greedy decoding.

    Args:
        model: registry alias, local path or Hugging Face name (default: the embedded SmolLM2-135M-Instruct).
        dtype: "auto" (bf16 where the device supports it, else fp32), "bfloat16" or "float32".
        device: "auto" (default: cuda when available, else cpu), "cpu", "cuda", "cuda:1" ...
    """

    def __init__(self, model: str | None = None, *, dtype: str = "auto", device: str | None = "auto") -> None:
        self.model_name = model
        target = resolve_device(device)
        self.dtype = resolve_dtype(dtype, target)
        self.model, self.tokenizer = load_causal_lm(model, dtype=self.dtype, device=target)
        self.prompt = PromptBuilder(self.tokenizer)
        self.last_stats = GenerationStats()

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    def chat_ids(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of a plain chat (no documents) rendered with the model's chat template."""
        return self.prompt.chat_ids(messages)

    def prompt_ids(self, question: str, documents: Sequence[Document], *, system: str | None = None,
                   history: Sequence[Message] = ()) -> list[int]:
        """The answer prompt's ids: the same pieces the KV engine reuses, run whole."""
        return self.prompt.pieces(question, documents, system=system, history=history).token_ids

    def prefill(self, prompt_ids: Sequence[int]) -> tuple[Any, Any]:
        """Run the prompt once: (cache, logits of the last position [V]). Shared by generation and scoring."""
        import torch

        if not prompt_ids:
            raise ConfigError("the prompt is empty")
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            out = self.model(input_ids=ids, use_cache=True)
        return out.cache, out.logits[0, -1]

    def generate_ids(self, prompt_ids: Sequence[int], *, max_new_tokens: int = 64,
                     prefilled: tuple[Any, Any] | None = None) -> Iterator[int]:
        """Greedy decoding: yields new token ids until EOS or `max_new_tokens`.

        `prefilled` is `prefill(prompt_ids)`'s result when the caller already ran the prompt (it is consumed).
        """
        import torch

        if max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        stats = self.last_stats = GenerationStats(prompt_tokens=len(prompt_ids))
        start = time.perf_counter()
        cache, logits = prefilled if prefilled is not None else self.prefill(prompt_ids)
        stats.ttft_s = time.perf_counter() - start
        state = {"cache": cache}

        def step(token: int) -> Any:
            with torch.inference_mode():
                out = self.model(input_ids=torch.tensor([[token]], dtype=torch.long, device=self.device),
                                 cache=state["cache"], use_cache=True)
            state["cache"] = out.cache
            return out.logits[0, -1]

        for token in greedy_ids(logits, step, eos=eos_ids(self.model, self.tokenizer), max_new_tokens=max_new_tokens):
            stats.new_tokens += 1
            yield token
        stats.total_s = time.perf_counter() - start

    def decode_answer(self, token_ids: Sequence[int]) -> str:
        """Generated ids as the short answer text (a leading "The answer is:" and the like removed)."""
        return clean_answer(self.tokenizer.decode(list(token_ids), skip_special_tokens=True))

    def stream_chat(self, messages: Sequence[Message], *, max_new_tokens: int = 64) -> Iterator[str]:
        """Text deltas of the reply to a plain chat (no documents)."""
        return text_deltas(self.tokenizer, self.generate_ids(self.chat_ids(messages), max_new_tokens=max_new_tokens))

    def chat(self, messages: Sequence[Message], *, max_new_tokens: int = 64) -> str:
        return "".join(self.stream_chat(messages, max_new_tokens=max_new_tokens)).strip()

    def stream(self, question: str, documents: Sequence[Document], *, max_new_tokens: int = 32,
               system: str | None = None, history: Sequence[Message] = ()) -> Iterator[str]:
        """Text deltas of the answer to `question` from `documents` (the client's system prompt and turns kept)."""
        ids = self.prompt_ids(question, documents, system=system, history=history)
        return text_deltas(self.tokenizer, self.generate_ids(ids, max_new_tokens=max_new_tokens))

    def answer(self, question: str, documents: Sequence[Document], *, max_new_tokens: int = 32,
               system: str | None = None, history: Sequence[Message] = ()) -> str:
        """The model's greedy answer to `question` from `documents`."""
        return clean_answer("".join(self.stream(question, documents, max_new_tokens=max_new_tokens, system=system,
                                                history=history)))
