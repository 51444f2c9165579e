"""Loaders for the multi-item summarisation sets that do not follow the common QA schema.

* FewSum Amazon (`*.csv`, TAB-separated): per product 8 reviews (`rev1..rev8`) and 3 human summaries
  (`summ1..summ3`). One review is one item.
* LongBench multi_news (`*.jsonl`): `context` holds 2-10 news articles, each introduced by a `Passage N:` line, with
  `NEWLINE_CHAR` tokens for the original line breaks; `answers` holds the reference summary. An item is one paragraph
  (`unit="paragraph"`, the default: an example has only ~3 articles, too few to cluster) or one article
  (`unit="passage"`).

The format is detected from the path: a `.csv`/`.tsv` file or a folder of them is FewSum, a `.jsonl` file or a
folder holding one is multi_news. In a FewSum folder `val.csv` comes first, then the other files by name.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragzip.errors import InputError
from ragzip.types import Document

_PASSAGE = re.compile(r"(?m)^Passage (\d+):\s*\n")
_NEWLINE_TOKEN = re.compile(r"\s*NEWLINE_CHAR\s*")
_PARAGRAPH_BREAK = re.compile(r"(?:\s*NEWLINE_CHAR\s*){2,}|\n\s*\n")
UNITS = ("paragraph", "passage")


@dataclass(frozen=True, slots=True)
class SummaryExample:
    """One multi-item summarisation example: the items to compress and the human reference summaries."""

    id: str
    dataset: str
    items: tuple[Document, ...]
    references: tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict)


def detect_format(path: Path) -> str:
    """"fewsum" or "multi_news" from the path (file suffix, or the files in a folder)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*")) if path.is_dir() else []
    if not files:
        raise InputError(f"no such file or folder: {path}")
    suffixes = {f.suffix.lower() for f in files}
    if suffixes & {".csv", ".tsv"}:
        return "fewsum"
    if ".jsonl" in suffixes:
        return "multi_news"
    raise InputError(f"{path}: expected FewSum .csv files or a LongBench multi_news .jsonl file")


def load_summary_examples(path: Path, limit: int | None = None, *, unit: str = "paragraph") -> list[SummaryExample]:
    """Examples from a FewSum or multi_news file or folder (format detected from the path), at most `limit`."""
    path = Path(path)
    if unit not in UNITS:
        raise InputError(f"unit must be one of {list(UNITS)}, got {unit!r}")
    fmt = detect_format(path)
    if fmt == "fewsum":
        tables = (p for p in path.glob("*") if p.suffix.lower() in (".csv", ".tsv")) if path.is_dir() else iter([path])
        files = sorted(tables, key=lambda p: (p.stem != "val", p.name))
        out = [ex for f in files for ex in load_fewsum(f)]
    else:
        files = [path] if path.is_file() else sorted(path.glob("*.jsonl"))
        out = [ex for f in files for ex in load_multi_news(f, unit=unit)]
    return out[:limit] if limit is not None else out


def load_fewsum(path: Path) -> list[SummaryExample]:
    """FewSum gold-summary CSV (TAB-separated, header `cat, group_id, rev1..rev8, summ1..summ3, rating1..8`)."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    if rows and not {"group_id", "rev1", "summ1"} <= set(rows[0]):
        raise InputError(f"{path}: not a FewSum gold-summary file (needs group_id, rev1.., summ1.. columns)")
    out = []
    for row in rows:
        reviews = [(key, row[key].strip()) for key in sorted((k for k in row if re.fullmatch(r"rev\d+", k)),
                                                             key=lambda k: int(k[3:])) if (row[key] or "").strip()]
        refs = [row[k].strip() for k in sorted(row) if re.fullmatch(r"summ\d+", k) and (row[k] or "").strip()]
        gid = row["group_id"]
        items = tuple(Document(f"{gid}-{key}", text) for key, text in reviews)
        meta = {"category": row.get("cat", ""), "file": path.name}
        out.append(SummaryExample(gid, "fewsum", items, tuple(refs), meta))
    return out


def clean_longbench(text: str) -> str:
    """Replace LongBench's `NEWLINE_CHAR` tokens with real line breaks."""
    return _NEWLINE_TOKEN.sub("\n", text).strip()


def split_passages(context: str) -> list[tuple[int, str]]:
    """(passage number, raw text) for each `Passage N:` block of a LongBench context."""
    marks = list(_PASSAGE.finditer(context))
    if not marks:
        return [(1, context)] if context.strip() else []
    bounds = [m.end() for m in marks] + [len(context)]
    starts = [m.start() for m in marks[1:]] + [len(context)]
    return [(int(m.group(1)), context[bounds[i]:starts[i]]) for i, m in enumerate(marks)]


def load_multi_news(path: Path, *, unit: str = "paragraph") -> list[SummaryExample]:
    """LongBench multi_news JSONL; items are paragraphs or whole passages (see the module docstring)."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                context, answers = row["context"], row["answers"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise InputError(f"{path}:{line_no}: not a LongBench record ({exc})") from None
            ex_id = str(row.get("_id", f"line{line_no}"))
            items = []
            for num, raw in split_passages(context):
                parts = [raw] if unit == "passage" else _PARAGRAPH_BREAK.split(raw)
                for j, part in enumerate(p for p in parts if clean_longbench(p)):
                    suffix = f"p{num}" if unit == "passage" else f"p{num}-{j}"
                    items.append(Document(f"{ex_id[:12]}-{suffix}", clean_longbench(part), title=f"Passage {num}"))
            refs = tuple(clean_longbench(a) for a in (answers if isinstance(answers, list) else [answers]))
            out.append(SummaryExample(ex_id, "multi_news", tuple(items), refs, {"unit": unit, "file": path.name}))
    return out
