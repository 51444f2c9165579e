"""The eval's reader: a local causal LM that answers from a (compressed) context, and scores the gold answer.

For each prompt the reader runs the prompt once and from that one prefill gives
* its greedy answer (the local engine's prompt and decoding, so eval and product answer alike), and
* the teacher-forced mean negative log-likelihood per token of each gold answer as the assistant's reply (the
  smallest over the gold answers is reported): cheaper and less noisy than generation with small readers.

Outputs are cached in SQLite keyed by (reader, dtype, max new tokens, prompt token ids, gold answers), so a rerun
of a suite only reads the contexts that changed. Values are plain text and floats: nothing is unpickled.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragzip.registry import DEFAULT_READER
from ragzip.types import Document

__all__ = ["DEFAULT_READER", "Reader", "ReaderCache", "ReaderOutput"]
MAX_GOLD_ANSWERS = 3  # scoring more gold variants costs a forward each and rarely changes the minimum


@dataclass(frozen=True, slots=True)
class ReaderOutput:
    answer: str
    nll: float | None  # mean NLL per token of the likeliest gold answer; None without gold answers
    prompt_tokens: int


class ReaderCache:
    """A SQLite table of reader outputs (safe to share between processes; one writer at a time)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), timeout=30, check_same_thread=False)
        self._db.execute("CREATE TABLE IF NOT EXISTS reads (key TEXT PRIMARY KEY, answer TEXT NOT NULL, nll REAL, "
                         "prompt_tokens INTEGER NOT NULL)")
        self._db.commit()

    def get(self, key: str) -> ReaderOutput | None:
        with self._lock:
            row = self._db.execute("SELECT answer, nll, prompt_tokens FROM reads WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        return ReaderOutput(str(row[0]), None if row[1] is None else float(row[1]), int(row[2]))

    def put(self, key: str, value: ReaderOutput) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO reads VALUES (?, ?, ?, ?)",
                             (key, value.answer, value.nll, value.prompt_tokens))
            self._db.commit()

    def close(self) -> None:
        self._db.close()


def _unique_answers(answers: Sequence[str]) -> list[str]:
    seen: dict[str, str] = {}
    for a in answers:
        a = a.strip()
        if a and a.lower() not in seen:
            seen[a.lower()] = a
    return list(seen.values())[:MAX_GOLD_ANSWERS]


class Reader:
    """Answers questions from documents with a local LLM and scores gold answers.

    Args:
        model: registry alias, local path or Hugging Face name (default: Qwen2.5-Coder-0.5B-Instruct).
        dtype: "auto" (bf16 where the CPU has it), "bfloat16" or "float32".
        max_new_tokens: the longest generated answer.
        cache: a ReaderCache, or None for no caching.

    Example:
        >>> reader = Reader()
        >>> reader.read("Who wrote Hamlet?", [Document("1", "Hamlet is a play by Shakespeare.")], ["Shakespeare"])
        ReaderOutput(answer='Shakespeare', nll=0.02, prompt_tokens=41)
    """

    def __init__(self, model: str | None = None, *, dtype: str = "auto", max_new_tokens: int = 32,
                 cache: ReaderCache | None = None) -> None:
        from ragzip.engine import LocalEngine

        self.name = model or DEFAULT_READER
        self.engine = LocalEngine(self.name, dtype=dtype)
        self.max_new_tokens = max_new_tokens
        self.cache = cache
        self._identity = f"{self.name}|{self.engine.dtype}|{max_new_tokens}"

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def read(self, question: str, documents: Sequence[Document], answers: Sequence[str] = ()) -> ReaderOutput:
        """The greedy answer to `question` from `documents`, and the NLL of the likeliest of `answers`."""
        prompt = self.engine.prompt_ids(question, documents)
        golds = _unique_answers(answers)
        key = hashlib.sha256(json.dumps([self._identity, prompt, golds]).encode()).hexdigest()
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            return hit
        cache, logits = self.engine.prefill(prompt)
        nlls = [self._answer_nll(cache, logits, g) for g in golds]
        generated = list(self.engine.generate_ids(prompt, max_new_tokens=self.max_new_tokens,
                                                  prefilled=(cache, logits)))
        out = ReaderOutput(self.engine.decode_answer(generated), min(nlls) if nlls else None, len(prompt))
        if self.cache is not None:
            self.cache.put(key, out)
        return out

    def _answer_nll(self, cache: Any, last_logits: Any, answer: str) -> float:
        """Mean NLL per token of `answer` (then end of turn) as the reply, teacher-forced after the prompt."""
        import torch

        ids = list(self.tokenizer(answer, add_special_tokens=False)["input_ids"])
        eos = self.tokenizer.eos_token_id
        if isinstance(eos, int):
            ids.append(eos)  # a complete answer ends the turn: "Paris" should not score as "Paris is ..."
        logits = last_logits[None]  # [1, V]
        if len(ids) > 1:
            with torch.inference_mode():
                out = self.engine.model(input_ids=torch.tensor([ids[:-1]], dtype=torch.long),
                                        cache=copy.deepcopy(cache), use_cache=True)
            logits = torch.cat([logits, out.logits[0]], dim=0)  # [len(ids), V]
        logp = torch.log_softmax(logits.float(), dim=-1)
        target = torch.tensor(ids, dtype=torch.long)
        return float(-logp[torch.arange(len(ids)), target].mean())
