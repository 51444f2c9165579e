"""JSONL files of the compression contract (`ragzip.contract`): streamed reading and writing, resuming.

Input line: `{"id", "question"?, "contexts": [{"id"?, "title"?, "text"}]}` (the common data schema is valid).
Output: the input object plus `"compressed": {"method", "budget", "contexts": [...], "text", "tokens_before",
"tokens_after", "rate", "seconds", "stages", "source_line"}` with spans as char offsets into the original text.

Files are read and written one line at a time (memory does not grow with the file); `-` is stdin / stdout and a
gzip file (by its magic bytes when reading, a `.gz` name when writing) is (de)compressed on the fly. A line that is
not valid UTF-8, not valid JSON or not a valid record is reported with its line number and never stops the reader.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ragzip.budget import Budget
from ragzip.compressors.base import CompressionRequest, compress_many
from ragzip.contract import (
    SupportsCompress,
    check_strings,
    compress_record,
    documents_of_line,
    parse_record,
    record_row,
)
from ragzip.errors import ConfigError, InputError, RagzipError
from ragzip.types import Document

MAX_LINE_BYTES = 64 * 1024 * 1024
STDIO = "-"
_BOM = b"\xef\xbb\xbf"
_GZIP_MAGIC = b"\x1f\x8b"


@contextlib.contextmanager
def open_input(path: str | Path) -> Iterator[IO[bytes]]:
    """The bytes of `path` (`-`: stdin), decompressed when the file is gzip."""
    if str(path) == STDIO:
        raw: Any = getattr(sys.stdin, "buffer", None)
        if raw is None:  # a text-only stdin (an embedding app's): its text, as UTF-8
            raw = io.BytesIO(sys.stdin.read().encode())
        elif not hasattr(raw, "peek"):  # wrapped once for peek; never a BufferedReader over a BufferedReader,
            raw = io.BufferedReader(raw)  # which would block on a pipe until its buffer fills
        close = False
    else:
        try:
            raw = open(path, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
        close = True
    try:
        peek = raw.peek(2)[:2] if hasattr(raw, "peek") else b""
        yield gzip.GzipFile(fileobj=raw) if peek == _GZIP_MAGIC else raw  # type: ignore[misc]
    finally:
        if close:
            raw.close()


def _lines(fh: IO[bytes]) -> Iterator[tuple[bytes | None, bool]]:
    """(line, too long) pairs; a line over MAX_LINE_BYTES is skipped without holding it in memory."""
    while True:
        line = fh.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):  # drain the rest of this line in bounded reads
                line = fh.readline(MAX_LINE_BYTES)
            yield None, True
            continue
        yield line, False


def json_error(exc: json.JSONDecodeError, text: str) -> str:
    """`invalid JSON at column C: <why>`, saying so when the line stops where the parser needed more."""
    where = f"invalid JSON at column {exc.colno}: {exc.msg}"
    if exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated"):
        where += f" (the line ends at column {len(text.rstrip())}: is it cut off?)"
    return where


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, parsed object or None, problem or None) for each non-blank line, streamed.

    Problems are reported, never raised: invalid UTF-8 (with its byte column), invalid JSON (with its column),
    a line over MAX_LINE_BYTES. A UTF-8 byte order mark at the start of the file is skipped. A gzip file that is
    corrupt or cut off raises InputError (nothing after that point can be read).
    """
    with open_input(path) as fh:
        try:
            for lineno, (raw, too_long) in enumerate(_lines(fh), 1):
                if too_long or raw is None:
                    yield lineno, None, f"line is larger than {MAX_LINE_BYTES} bytes"
                    continue
                if lineno == 1 and raw.startswith(_BOM):
                    raw = raw[len(_BOM):]
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    yield lineno, None, f"invalid UTF-8 at byte column {exc.start + 1}"
                    continue
                if not text.strip():
                    continue
                text = text.rstrip("\r\n")  # the line break is no part of the record (a cut-off line's error
                try:                          # would otherwise point past it, at column 1 of a next line)
                    yield lineno, json.loads(text), None
                except json.JSONDecodeError as exc:
                    yield lineno, None, json_error(exc, text)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise InputError(f"{path}: cannot read past this point: {exc}") from None


@contextlib.contextmanager
def open_output(path: str | Path, *, append: bool = False) -> Iterator[IO[str]]:
    """A text stream for the output (`-`: stdout; a `.gz` name: gzip). Errors are ConfigErrors naming the path."""
    if str(path) == STDIO:
        yield sys.stdout
        sys.stdout.flush()
        return
    try:
        if str(path).endswith(".gz"):
            fh: IO[str] = gzip.open(path, "at" if append else "wt", encoding="utf-8")
        else:
            fh = open(path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        yield fh
    finally:
        fh.close()


def check_paths(input_path: str | Path, output: str | Path, *, resume: bool) -> None:
    """Refuse what would lose data: writing over the input, resuming onto stdout or a gzip file."""
    if str(input_path) != STDIO:
        src = Path(input_path)
        if not src.exists():
            raise ConfigError(f"input {src} does not exist")
        if src.is_dir():
            raise ConfigError(f"input {src} is a directory, not a JSONL file")
    if resume and str(input_path) == STDIO:
        raise ConfigError("--resume needs an input file, not stdin (the records must be checked before appending)")
    if str(output) == STDIO:
        if resume:
            raise ConfigError("--resume needs an output file, not stdout")
        return
    out = Path(output)
    if out.is_dir():
        raise ConfigError(f"output {out} is a directory")
    if str(input_path) != STDIO and out.exists() and os.path.samefile(input_path, out):
        raise ConfigError(f"output {out} is the input file; write to another path")
    if resume and str(output).endswith(".gz"):
        raise ConfigError("--resume needs a plain (not .gz) output file")


def record_digest(obj: Any) -> str:
    """A digest of an input record as parsed (less any `compressed` key, which the output replaces), to check that
    a resumed output came from the same input."""
    if isinstance(obj, dict):
        obj = {k: v for k, v in obj.items() if k != "compressed"}
    return hashlib.blake2b(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode(), digest_size=12).hexdigest()


@dataclass
class ResumePlan:
    """What an existing output holds: input line number -> digest of the input record written for it."""

    done: dict[int, str] = field(default_factory=dict)

    def __contains__(self, lineno: int) -> bool:
        return lineno in self.done

    def __len__(self) -> int:
        return len(self.done)


def plan_resume(input_path: str | Path, output: str | Path, *, method: str, budget: Budget,
                tokenizer: str | None = None, options: Mapping[str, Any] | None = None) -> ResumePlan:
    """Read `output` and check that resuming onto it is safe: every row was written by `ragzip compress` with this
    method, budget, tokenizer and options, from these very input records. Raises ConfigError naming the first
    mismatch (a row without a recorded tokenizer or budget, from an older version, is not checked for it).

    Drops a partial last line left by an interrupted run, so appends start on a fresh line.
    """
    plan = ResumePlan()
    path = Path(output)
    if not path.exists():
        return plan
    truncate_partial_line(path)
    want_budget = budget.as_dict()
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise ConfigError(f"cannot resume: {path}:{n} is not a JSON line written by ragzip compress") from None
            comp = row.get("compressed") if isinstance(row, dict) else None
            line = comp.get("source_line") if isinstance(comp, dict) else None
            if not isinstance(line, int):
                raise ConfigError(f"cannot resume: {path}:{n} has no compressed.source_line "
                                  "(not written by ragzip compress)")
            if comp.get("method") != method:
                raise ConfigError(f"cannot resume: {path} was written with method {comp.get('method')!r}, this run "
                                  f"uses {method!r}; use the same method or another output file")
            if "budget" in comp and comp["budget"] != want_budget:
                raise ConfigError(f"cannot resume: {path} was written with budget {comp['budget']}, this run uses "
                                  f"{want_budget or 'the default'}; use the same budget or another output file")
            if tokenizer is not None and "tokenizer" in comp and comp["tokenizer"] != tokenizer:
                raise ConfigError(f"cannot resume: {path} was written with tokenizer {comp['tokenizer']!r}, this run "
                                  f"uses {tokenizer!r}; use the same --tokenizer or another output file")
            if "tokenizer" in comp and comp.get("options", {}) != dict(options or {}):
                raise ConfigError(f"cannot resume: {path} was written with options {comp.get('options', {})}, this "
                                  f"run uses {dict(options or {})}; use the same options or another output file")
            plan.done[line] = record_digest(row)
    if plan.done:
        _check_same_input(input_path, output, plan)
    return plan


def _check_same_input(input_path: str | Path, output: str | Path, plan: ResumePlan) -> None:
    seen: set[int] = set()
    for lineno, obj, _ in iter_jsonl(input_path):
        if lineno in plan.done:
            seen.add(lineno)
            if obj is None or record_digest(obj) != plan.done[lineno]:
                rid = obj.get("id") if isinstance(obj, dict) else None
                raise ConfigError(f"cannot resume: {input_path}:{lineno} (id {rid!r}) is not the record {output} "
                                  "holds for that line; the output was written from another input")
    missing = sorted(set(plan.done) - seen)
    if missing:
        raise ConfigError(f"cannot resume: {output} holds line {missing[0]}, which {input_path} does not have")


def truncate_partial_line(path: str | Path) -> None:
    """Drop a partial last line left by an interrupted run (reads only the file's tail)."""
    path = Path(path)
    size = path.stat().st_size if path.exists() else 0
    if size == 0:
        return
    with open(path, "rb+") as fh:
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return
        pos = size
        while pos > 0:  # back to the last newline, 64 KiB at a time
            start = max(0, pos - 65536)
            fh.seek(start)
            chunk = fh.read(pos - start)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                fh.truncate(start + cut + 1)
                return
            pos = start
        fh.truncate(0)


def output_row(compressor: SupportsCompress, obj: Mapping[str, Any], budget: Budget, source_line: int,
               options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One output row: the record, compressed, with what `--resume` checks recorded: the source line, the budget,
    the tokenizer that counted it and the options given (when any)."""
    return _annotated(compress_record(compressor, obj, budget, source_line=source_line), compressor, budget, options)


def output_rows(compressor: SupportsCompress, records: Sequence[tuple[int, Mapping[str, Any]]], budget: Budget,
                options: Mapping[str, Any] | None = None) -> list[dict[str, Any] | RagzipError]:
    """`output_row` for several records at once, their encoder forwards batched (`compress_many`); a record that
    cannot be parsed or compressed holds its error in its slot (the others are unaffected). Errors that are not
    the input's fault (a bug) are raised."""
    parsed: list[tuple[str | None, list[Document]] | RagzipError] = []
    for _, obj in records:
        try:
            parsed.append(parse_record(obj))
        except RagzipError as exc:
            parsed.append(exc)
    good = [p for p in parsed if not isinstance(p, RagzipError)]
    results = iter(compress_many(compressor, [CompressionRequest(q, d, budget) for q, d in good],
                                 return_exceptions=True))
    out: list[dict[str, Any] | RagzipError] = []
    for (lineno, obj), item in zip(records, parsed):
        result = item if isinstance(item, RagzipError) else next(results)
        if isinstance(result, RagzipError):
            out.append(result)
            continue
        if isinstance(result, BaseException):
            raise result
        row = record_row(obj, result, source_line=lineno)
        out.append(_annotated(row, compressor, budget, options))
    return out


def _annotated(row: dict[str, Any], compressor: Any, budget: Budget, options: Mapping[str, Any] | None
               ) -> dict[str, Any]:
    row["compressed"]["budget"] = budget.as_dict()
    row["compressed"]["tokenizer"] = counter_name(compressor)
    if options:
        row["compressed"]["options"] = dict(options)
    return row


def counter_name(compressor: Any) -> str | None:
    """The name of the tokenizer that counts a compressor's budgets (None for a plug-in without one)."""
    return getattr(getattr(compressor, "counter", None), "name", None)


def content_id(obj: Any) -> str:
    """A default id for a corpus line without one: a digest of its content, so that documents of different files
    (or of one file appended twice) never collide by position, and the same document always gets the same id."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    return "doc-" + hashlib.blake2b(blob, digest_size=8).hexdigest()


def read_corpus(path: str | Path) -> list[Document]:
    """Every document of a corpus JSONL (`{"id"?, "title"?, "text"}` lines, or records whose `contexts` are the
    documents), for `ragzip index` and `ragzip kv warm`. A line without an `id` gets `content_id` (a record's
    contexts `<that id>/<j>`); a line repeated verbatim is read once. A bad line is an InputError naming
    `path:line`."""
    docs: list[Document] = []
    seen: set[tuple[str, str, str]] = set()
    for lineno, obj, problem in iter_jsonl(path):
        try:
            if problem:
                raise InputError(problem)
            check_strings(obj, "line")  # before anything hashes or tokenizes it
            for doc in documents_of_line(obj, content_id(obj)):
                if (doc.id, doc.title, doc.text) not in seen:
                    seen.add((doc.id, doc.title, doc.text))
                    docs.append(doc)
        except InputError as exc:
            raise InputError(f"{path}:{lineno}: {exc}") from None
    return docs


__all__ = ["MAX_LINE_BYTES", "ResumePlan", "SupportsCompress", "check_paths", "compress_record", "content_id",
           "counter_name", "iter_jsonl", "open_input", "open_output", "output_row", "parse_record", "plan_resume",
           "read_corpus", "truncate_partial_line"]
