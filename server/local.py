"""The local engine behind the proxy: loaded once, generating in a worker thread, one request at a time."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from ragzip.engine import SYSTEM_PROMPT, answer_messages
from ragzip.server.context import content_text, last_user_index
from ragzip.server.metrics import Metrics
from ragzip.types import Document

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass(slots=True)
class GenerationDone:
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    kv: dict[str, Any] | None = None  # what the KV backend reused (`EngineStats.as_dict()`), when it answered


def conversation(messages: Sequence[dict[str, str]]) -> tuple[str | None, list[dict[str, str]]]:
    """The client's system prompt (None when `engine_messages` filled in the default) and the earlier turns
    of an `engine_messages` list, for the KV engine's header."""
    if not messages:
        return None, []
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    history = [m for m in messages[1:-1] if m["role"] in ("user", "assistant")]
    return (None if system == SYSTEM_PROMPT else system), history


def engine_messages(messages: Sequence[dict[str, Any]], query: str,
                    documents: Sequence[Document]) -> list[dict[str, str]]:
    """Plain-text chat for the local model. With context, the last user turn becomes the engine's
    answer-from-documents prompt (documents between two copies of the question, tuned for small models)."""
    plain = []
    for m in messages:
        role = _ROLES.get(str(m.get("role")), "user")
        text = content_text(m.get("content")).replace("\x00RAGZIP\x00", " ").strip()
        plain.append({"role": role, "content": text})
    if not documents:
        return [m for m in plain if m["content"] or m["role"] == "user"]
    user = last_user_index(plain)
    history = [m for i, m in enumerate(plain) if m["role"] != "system" and (user is None or i < user)]
    systems = [m for m in plain if m["role"] == "system" and m["content"]]
    system = systems[0] if systems else {"role": "system", "content": SYSTEM_PROMPT}
    return [system, *history, answer_messages(query, documents)[-1]]


class LocalBackend:
    """Serialises generation on one local model; `stream` yields text deltas, then a `GenerationDone`.

    Args:
        engine: a `ragzip.engine.LocalEngine` (already loaded).
        kv_engine: optional `ragzip.kv_engine.KVReuseEngine` sharing the model; when given, requests with context
            are answered from reused chunk KV (question + documents prompt).
    """

    def __init__(self, engine: Any, *, kv_engine: Any = None, model_name: str = "ragzip-local",
                 metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.kv_engine = kv_engine
        self.model_name = model_name
        self.metrics = metrics
        self.lock = threading.Lock()

    def _work(self, messages: list[dict[str, str]], query: str, documents: Sequence[Document], max_new_tokens: int,
              emit: Any, cancel: threading.Event) -> None:
        with self.lock:
            if cancel.is_set():
                return
            use_kv = self.kv_engine is not None and bool(documents)
            if use_kv:
                system, history = conversation(messages)
                deltas = self.kv_engine.stream(query, list(documents), max_new_tokens=max_new_tokens, system=system,
                                               history=history)
            else:
                deltas = self.engine.stream_chat(messages, max_new_tokens=max_new_tokens)
            texts = []
            for delta in deltas:
                texts.append(delta)
                emit(delta)
                if cancel.is_set():
                    return
            kv = None
            if use_kv:
                stats = self.kv_engine.stats
                kv = stats.as_dict()
                if self.metrics is not None:
                    self.metrics.cache_hits.labels("kv").inc(stats.hits)
                    self.metrics.cache_misses.labels("kv").inc(stats.misses)
                prompt_tokens = stats.prompt_tokens
                count = len(self.engine.tokenizer.encode("".join(texts), add_special_tokens=False))
            else:
                prompt_tokens = self.engine.last_stats.prompt_tokens
                count = self.engine.last_stats.new_tokens
            reason = "length" if count >= max_new_tokens else "stop"
            emit(GenerationDone(prompt_tokens, count, reason, kv))

    async def stream(self, messages: list[dict[str, str]], *, query: str = "", documents: Sequence[Document] = (),
                     max_new_tokens: int = 64) -> AsyncIterator[str | GenerationDone]:
        """Text deltas, then one GenerationDone. Abandoning the iterator stops generation at the next token."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()

        def emit(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (server shutting down): stop generating
                cancel.set()

        def run() -> None:
            try:
                self._work(messages, query, documents, max_new_tokens, emit, cancel)
            except BaseException as exc:  # hand every failure to the request that caused it
                emit(exc)
            finally:
                emit(None)

        threading.Thread(target=run, name="ragzip-generate", daemon=True).start()
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancel.set()

    async def complete(self, messages: list[dict[str, str]], *, query: str = "", documents: Sequence[Document] = (),
                       max_new_tokens: int = 64) -> tuple[str, GenerationDone]:
        parts: list[str] = []
        done = GenerationDone(0, 0, "stop")
        async for item in self.stream(messages, query=query, documents=documents, max_new_tokens=max_new_tokens):
            if isinstance(item, GenerationDone):
                done = item
            else:
                parts.append(item)
        return "".join(parts).strip(), done

