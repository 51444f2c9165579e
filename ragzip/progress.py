"""Progress of long command-line runs: a live bar on a terminal, plain lines where output is a log (CI, a file,
a pipe), since a redrawn bar there is either invisible or garbage."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

PLAIN_EVERY_S = 10.0  # off a terminal: at most one progress line per this many seconds


class Progress:
    """`with Progress("compressing") as p: p.advance()`; `total` None for a stream of unknown length.

    On a terminal a transient rich bar (gone when done); elsewhere a line `label: N[/total] detail (Ts)` at most
    every `every_s` seconds, on the stream (default stderr).
    """

    def __init__(self, label: str, *, total: int | None = None, stream: TextIO | None = None,
                 every_s: float | None = None) -> None:
        self.label = label
        self.total = total
        self.stream = stream or sys.stderr
        self.every_s = PLAIN_EVERY_S if every_s is None else every_s
        self.done = 0
        self._bar: Any = None
        self._task: Any = None
        self._start = self._last = time.monotonic()

    def __enter__(self) -> Progress:
        if self.stream.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as Bar

            columns = [TextColumn(f"{self.label} {{task.description}}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn()]
            self._bar = Bar(*columns, console=Console(file=self.stream), transient=True)
            self._bar.start()
            self._task = self._bar.add_task("", total=self.total)
        self._start = self._last = time.monotonic()
        return self

    def advance(self, n: int = 1, detail: str = "") -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, advance=n, description=detail)
            return
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            of = f"/{self.total}" if self.total is not None else ""
            text = f"{self.label}: {self.done}{of}" + (f" {detail}" if detail else "") + f" ({now - self._start:.0f}s)"
            print(text, file=self.stream, flush=True)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
