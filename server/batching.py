"""Micro-batching for the proxy: compress calls that arrive within a few milliseconds of each other run as one
`compress_many`, so concurrent requests share batched encoder forwards instead of queueing one forward each.

Callers are worker threads (the event loop hands each request to one). No extra thread is started: the first caller
of an idle batcher becomes the leader, waits `window_s` for company (never longer), takes up to `max_batch` queued
calls and runs them; the others wait for their own result. Calls that queue while a batch runs form the next batch
at once (no window: they have already waited). One batch runs at a time per batcher, since tokenizers and encoders
are not safe to share between threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass(slots=True)
class _Slot(Generic[T]):
    request: T
    arrived: float = field(default_factory=time.perf_counter)
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


class MicroBatcher(Generic[T, R]):
    """Gathers concurrent `submit` calls into calls of `run_many(requests) -> results or exceptions`.

    Args:
        run_many: runs a list of requests and returns one result or exception per request, in order (one bad
            request must not fail the others: `compress_many(..., return_exceptions=True)`).
        window_s: how long an idle batcher's first call waits for others to join (0: never waits).
        max_batch: the most requests per `run_many` call.
    """

    def __init__(self, run_many: Callable[[list[T]], Sequence[Any]], *, window_s: float = 0.004,
                 max_batch: int = 16) -> None:
        if window_s < 0 or max_batch < 1:
            raise ValueError("window_s must be >= 0 and max_batch >= 1")
        self.run_many = run_many
        self.window_s = window_s
        self.max_batch = max_batch
        self._queue: list[_Slot[T]] = []
        self._queue_lock = threading.Lock()
        self._running = threading.Lock()  # held by the leader while its batch runs
        self.batches = 0  # how many run_many calls (for metrics and tests)
        self.largest = 0

    def submit(self, request: T) -> R:
        """Run `request` (in a batch with whatever arrives with it) and return its result, or raise its error."""
        slot: _Slot[T] = _Slot(request)
        with self._queue_lock:
            self._queue.append(slot)
        while not slot.done.is_set():
            if not self._running.acquire(blocking=False):
                slot.done.wait(0.002)  # a batch is running: ours may be in it (then we are done), or lead the next
                continue
            try:
                if slot.done.is_set():
                    break
                wait = slot.arrived + self.window_s - time.perf_counter()
                if wait > 0 and self._pending() < self.max_batch:
                    time.sleep(wait)  # a call that has just arrived waits (at most the window) for company
                with self._queue_lock:
                    batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch:]
                if batch:
                    self._run(batch)
            finally:
                self._running.release()
        if slot.error is not None:
            raise slot.error
        return slot.result  # type: ignore[no-any-return]

    def _pending(self) -> int:
        with self._queue_lock:
            return len(self._queue)

    def _run(self, batch: list[_Slot[T]]) -> None:
        self.batches += 1
        self.largest = max(self.largest, len(batch))
        try:
            results = list(self.run_many([s.request for s in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"run_many returned {len(results)} results for {len(batch)} requests")
        except BaseException as exc:  # noqa: BLE001 - the whole call failed: every caller of this batch hears it
            results = [exc] * len(batch)
        for slot, res in zip(batch, results):
            if isinstance(res, BaseException):
                slot.error = res
            else:
                slot.result = res
            slot.done.set()
