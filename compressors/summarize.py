"""Abstractive cluster summaries: a local LLM or any OpenAI-compatible endpoint, with a persistent cache.

A summary is cached by (member texts, prompt, model, max_new_tokens), so re-compressing the same cluster (the common
case when the same items are retrieved again) costs a lookup. The cache is a small SQLite file of plain text rows;
nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ragzip.errors import ConfigError, RagzipError

SUMMARY_PROMPT = (
    "Summarize what the following items say in a few sentences. Keep facts, opinions and numbers that several "
    "items share; do not add anything that is not in the items."
)
QUERY_PROMPT = "Focus on what matters for this request: {query}"


def summary_messages(texts: Sequence[str], query: str = "", prompt: str = SUMMARY_PROMPT) -> list[dict[str, str]]:
    """Chat messages asking for one summary of `texts` (optionally focused on `query`)."""
    system = prompt + (" " + QUERY_PROMPT.format(query=query.strip()) if query.strip() else "")
    items = "\n\n".join(f"Item {i}: {t.strip()}" for i, t in enumerate(texts, 1))
    return [{"role": "system", "content": system}, {"role": "user", "content": f"{items}\n\nSummary:"}]


@runtime_checkable
class Summarizer(Protocol):
    """Writes one summary of several texts. `name` identifies the model in cache keys."""

    name: str

    def summarize(self, texts: Sequence[str], query: str = "", *, max_new_tokens: int = 96) -> str: ...


class LocalSummarizer:
    """Summaries from the local engine (`ragzip.engine.LocalEngine`), greedy decoding.

    Args:
        model: registry alias, local path or Hugging Face name (None: the embedded default LLM).
        dtype: passed to the engine ("auto", "bfloat16", "float32").
        max_input_tokens: the prompt is cut to this many tokens (items are dropped from the end, then the last one
            is cut) so it fits the model's window.
    """

    def __init__(self, model: str | None = None, *, dtype: str = "auto", max_input_tokens: int = 3072) -> None:
        self.model = model
        self.name = f"local:{model or 'default'}"
        self.dtype = dtype
        self.max_input_tokens = max_input_tokens
        self._engine: Any = None
        self._lock = threading.Lock()

    @property
    def engine(self) -> Any:
        """The LocalEngine, loaded on first use."""
        if self._engine is None:
            from ragzip.engine import LocalEngine

            self._engine = LocalEngine(self.model, dtype=self.dtype)
        return self._engine

    def fit_texts(self, texts: Sequence[str], query: str = "") -> list[str]:
        """`texts` cut so that the summary prompt has at most `max_input_tokens` tokens."""
        engine = self.engine
        kept = list(texts)
        while kept and len(engine.chat_ids(summary_messages(kept, query))) > self.max_input_tokens:
            overflow = len(engine.chat_ids(summary_messages(kept, query))) - self.max_input_tokens
            last_ids = engine.tokenizer(kept[-1], add_special_tokens=False)["input_ids"]
            if overflow >= len(last_ids) and len(kept) > 1:
                kept.pop()
            else:
                kept[-1] = engine.tokenizer.decode(last_ids[: max(1, len(last_ids) - overflow - 1)])
        return kept

    def summarize(self, texts: Sequence[str], query: str = "", *, max_new_tokens: int = 96) -> str:
        with self._lock:  # one generation at a time on a shared model
            fitted = self.fit_texts(texts, query)
            return self.engine.chat(summary_messages(fitted, query), max_new_tokens=max_new_tokens)


class OpenAISummarizer:
    """Summaries from an OpenAI-compatible endpoint (`POST {base_url}/chat/completions`), temperature 0.

    Args:
        base_url: e.g. "http://localhost:8000/v1".
        model: the model name the endpoint serves.
        api_key: sent as a bearer token when given.
        timeout_s: HTTP timeout per request.
        client: an `httpx.Client` to send requests with (default: a new one per request).
    """

    def __init__(self, base_url: str, model: str = "default", *, api_key: str | None = None,
                 timeout_s: float = 120.0, client: Any = None) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"base_url must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.name = f"openai:{self.base_url}:{model}"
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.client = client

    def summarize(self, texts: Sequence[str], query: str = "", *, max_new_tokens: int = 96) -> str:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        body = {"model": self.model, "messages": summary_messages(texts, query), "temperature": 0,
                "max_tokens": max_new_tokens}
        try:
            post = self.client.post if self.client is not None else httpx.post
            resp = post(f"{self.base_url}/chat/completions", json=body, headers=headers, timeout=self.timeout_s)
            resp.raise_for_status()
            return str(resp.json()["choices"][0]["message"]["content"]).strip()
        except httpx.HTTPError as exc:
            raise RagzipError(f"summary request to {self.base_url} failed: {exc}") from exc
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise RagzipError(f"unexpected chat/completions response from {self.base_url}: {exc}") from exc


def make_summarizer(llm: str | None, *, api_key: str | None = None) -> Summarizer:
    """`http(s)://...` (optionally `URL#model`) -> OpenAISummarizer; anything else -> LocalSummarizer."""
    if llm and llm.startswith(("http://", "https://")):
        url, _, model = llm.partition("#")
        return OpenAISummarizer(url, model or "default", api_key=api_key)
    return LocalSummarizer(llm)


class SummaryCache:
    """Summaries keyed by sha256(member texts, prompt, model, max_new_tokens), in one SQLite file.

    Safe to share between threads and processes (SQLite locking); values are plain text.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS summaries (key TEXT PRIMARY KEY, summary TEXT NOT NULL)")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30)
        try:
            with db:  # commits on success, rolls back on error
                yield db
        finally:
            db.close()

    @staticmethod
    def key(texts: Sequence[str], prompt: str, model: str, max_new_tokens: int) -> str:
        payload = json.dumps({"texts": list(texts), "prompt": prompt, "model": model, "max_new_tokens": max_new_tokens},
                             ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def get(self, key: str) -> str | None:
        """The cached summary, or None on a miss."""
        with self._lock, self._connect() as db:
            row = db.execute("SELECT summary FROM summaries WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def put(self, key: str, summary: str) -> None:
        with self._lock, self._connect() as db:
            db.execute("INSERT OR REPLACE INTO summaries (key, summary) VALUES (?, ?)", (key, summary))

    def __len__(self) -> int:
        with self._lock, self._connect() as db:
            return int(db.execute("SELECT COUNT(*) FROM summaries").fetchone()[0])


def cached_summary(summarizer: Summarizer, texts: Sequence[str], query: str = "", *, max_new_tokens: int = 96,
                   cache: SummaryCache | None = None) -> tuple[str, bool]:
    """(summary, was_cached). The prompt in the key includes the query, so query-focused summaries do not mix."""
    if cache is None:
        return summarizer.summarize(texts, query, max_new_tokens=max_new_tokens), False
    prompt = json.dumps(summary_messages([], query))
    key = SummaryCache.key(texts, prompt, summarizer.name, max_new_tokens)
    hit = cache.get(key)
    if hit is not None:
        return hit, True
    summary = summarizer.summarize(texts, query, max_new_tokens=max_new_tokens)
    cache.put(key, summary)
    return summary, False
