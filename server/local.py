"""The local engine behind the proxy: loaded once, generating in a worker thread, one request at a time."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True, slots=True)
class Conversation:
    """A chat request as the local engines take it: the client's system prompt (None: the default), the turns
    before the last user message, and every turn as plain text (for a chat without documents)."""

    system: str | None
    history: list[dict[str, str]]
    turns: list[dict[str, str]]


def conversation(messages: Sequence[dict[str, Any]]) -> Conversation:
    """Plain-text turns of the client's messages (the `<documents>` block's placeholder removed)."""
    turns = []
    for m in messages:
        role = _ROLES.get(str(m.get("role")), "user")
        turns.append({"role": role, "content": content_text(m.get("content")).replace("\x00RAGZIP\x00", " ").strip()})
    user = last_user_index(turns)
    systems = [m["content"] for m in turns if m["role"] == "system" and m["content"]]
    history = [m for i, m in enumerate(turns) if m["role"] in ("user", "assistant") and (user is None or i < user)]
    return Conversation(systems[0] if systems else None, history,
                        [m for m in turns if m["content"] or m["role"] == "user"])


class LocalBackend:
    """Serialises generation on one local model; `stream` yields text deltas, then a `GenerationDone`.

    Args:
        engine: a `ragzip.engine.LocalEngine` (already loaded).
        kv_engine: optional `ragzip.kv_engine.KVReuseEngine` sharing the model; when given, requests with context
            are answered from reused chunk KV (question + documents prompt).
    """

    def __init__(self, engine: Any, *, kv_engine: Any = None, model_name: str = "ragzip-local",
                 aliases: Sequence[str] = (), metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.kv_engine = kv_engine
        self.model_name = model_name
        self.model_names = frozenset({model_name, *aliases})  # what a request's `model` may say
        self.metrics = metrics
        self.lock = threading.Lock()

    def _work(self, chat: Conversation, query: str, documents: Sequence[Document], max_new_tokens: int,
              emit: Any, cancel: threading.Event) -> None:
        with self.lock:
            if cancel.is_set():
                return
            use_kv = self.kv_engine is not None and bool(documents)
            if documents:  # the one answer prompt, on either engine, with the client's system prompt and turns
                engine = self.kv_engine if use_kv else self.engine
                deltas = engine.stream(query, list(documents), max_new_tokens=max_new_tokens, system=chat.system,
                                       history=chat.history)
            else:
                deltas = self.engine.stream_chat(chat.turns, max_new_tokens=max_new_tokens)
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

    async def stream(self, messages: Sequence[dict[str, Any]], *, query: str = "",
                     documents: Sequence[Document] = (), max_new_tokens: int = 64
                     ) -> AsyncIterator[str | GenerationDone]:
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
                self._work(conversation(messages), query, documents, max_new_tokens, emit, cancel)
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

    async def complete(self, messages: Sequence[dict[str, Any]], *, query: str = "",
                       documents: Sequence[Document] = (), max_new_tokens: int = 64) -> tuple[str, GenerationDone]:
        parts: list[str] = []
        done = GenerationDone(0, 0, "stop")
        async for item in self.stream(messages, query=query, documents=documents, max_new_tokens=max_new_tokens):
            if isinstance(item, GenerationDone):
                done = item
            else:
                parts.append(item)
        return "".join(parts).strip(), done

