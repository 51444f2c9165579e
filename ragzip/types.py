"""Core data types: plain dataclasses shared by every subsystem."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ragzip.errors import InputError

TokenIds = Sequence[int]
CONTEXT_SEPARATOR = "\n\n"  # between documents in `CompressionResult.text`, counted in every budget


def titled(title: str, text: str) -> str:
    """A piece as a reader is shown it: its title on a line of its own (when it has one), then its text."""
    return f"{title}\n{text}" if title else text


@dataclass(frozen=True, slots=True)
class Document:
    """One retrieved item. `title` is context (never compressed away); `text` is what compressors narrow."""

    id: str
    text: str
    title: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise InputError(f"document {self.id!r}: text must be a string, got {type(self.text).__name__}")


@dataclass(frozen=True, slots=True)
class Span:
    """Characters [start, end) of the original text of document `doc_id`."""

    doc_id: str
    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.end:
            raise InputError(f"invalid span [{self.start}, {self.end}) of {self.doc_id!r}")


@dataclass(frozen=True, slots=True)
class CompressedDocument:
    """What is left of one input document.

    `spans[i]` (source offsets) was written to `text[offsets[i][0]:offsets[i][1]]`, so every piece of
    compressed text traces back to its source. An abstractive summary has no spans; `members` names the
    ids of the documents it stands for.
    """

    id: str
    text: str
    title: str = ""
    spans: tuple[Span, ...] = ()
    offsets: tuple[tuple[int, int], ...] = ()
    members: tuple[str, ...] = ()
    scores: tuple[float, ...] = ()
    tokens: int | None = None  # the text's token count, set once by the stage that produced it

    def __post_init__(self) -> None:
        if len(self.spans) != len(self.offsets):
            raise ValueError("spans and offsets must have the same length")

    @property
    def span_pairs(self) -> list[tuple[int, int]]:
        """The source spans as plain `(start, end)` character offsets into the original document's text."""
        return [(s.start, s.end) for s in self.spans]

    def as_document(self) -> Document:
        """This piece as the input of the next stage or of a reader."""
        return Document(self.id, self.text, self.title)


@dataclass(frozen=True, slots=True)
class StageStats:
    """What one stage of a pipeline did."""

    name: str
    tokens_before: int
    tokens_after: int
    seconds: float
    info: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CompressionResult:
    """The output of a compressor or pipeline for one query."""

    method: str
    documents: tuple[CompressedDocument, ...]
    tokens_before: int
    tokens_after: int
    seconds: float
    stages: tuple[StageStats, ...] = ()
    input_tokens: Mapping[str, int] = field(default_factory=dict)  # per input document id
    budget: Mapping[str, Any] = field(default_factory=dict)  # the budget applied, as `Budget.as_dict()`

    @property
    def auto(self) -> dict[str, Any] | None:
        """For an auto budget: the target `coverage`, the calibrated `expected_coverage` reached (the product over
        the stages that took a share), and `guard` (why a stage kept more than the target asked, else None)."""
        target = self.budget.get("auto") if self.budget else None
        if not isinstance(target, Mapping):
            return None
        reached: float | None = 1.0
        guard = None
        for stage in self.stages:
            info = stage.info.get("auto")
            if isinstance(info, Mapping):
                value = info.get("expected_coverage", 1.0)
                reached = None if value is None or reached is None else reached * float(value)
                guard = guard or info.get("guard") or info.get("fallback")
        return {"coverage": target.get("coverage"), "expected_coverage": None if reached is None else round(reached, 4),
                "guard": guard}

    @property
    def rate(self) -> float | None:
        """Achieved rate: tokens of `text` / tokens of the input joined the same way; None when the input had no
        tokens (an empty list, blank documents): there was nothing to keep."""
        return self.tokens_after / self.tokens_before if self.tokens_before else None

    @property
    def text(self) -> str:
        """The compressed context: non-blank pieces joined by a blank line; what every budget counts."""
        return CONTEXT_SEPARATOR.join(d.text for d in self.documents if d.text.strip())

    def render(self, *, titles: bool = True) -> str:
        """The compressed context as a reader should get it: each kept piece under its title (as ragzip's own
        prompt shows documents), pieces separated by a blank line. `titles=False` is `text`. Titles are context,
        not budget: the budget counts `text`."""
        return CONTEXT_SEPARATOR.join(titled(d.title, d.text) if titles else d.text
                                      for d in self.documents if d.text.strip())

    @property
    def spans(self) -> list[Span]:
        return [s for d in self.documents for s in d.spans]

    def as_documents(self) -> list[Document]:
        """The kept context as Documents (empty pieces dropped): what a reader is given."""
        return [d.as_document() for d in self.documents if d.text.strip()]

    def to_contract(self) -> dict[str, Any]:
        """The `compressed` object of the CLI/HTTP contract (`ragzip.contract` documents every key)."""
        contexts = []
        for d in self.documents:
            spans = [[s.start, s.end] for s in d.spans]
            ctx: dict[str, Any] = {"id": d.id, "title": d.title, "text": d.text, "spans": spans,
                                   "scores": [round(float(x), 6) for x in d.scores]}
            if d.members:
                ctx["members"] = list(d.members)
            sources = d.members or (d.id,)
            if all(m in self.input_tokens for m in sources):
                ctx["tokens_before"] = sum(self.input_tokens[m] for m in sources)
            if d.tokens is not None:
                ctx["tokens_after"] = d.tokens
            contexts.append(ctx)
        return {
            "method": self.method,
            "contexts": contexts,
            "text": self.text,
            "tokens_before": self.tokens_before,
            "tokens_after": self.tokens_after,
            "rate": None if self.rate is None else round(self.rate, 6),
            "seconds": round(self.seconds, 6),
            **({"budget": dict(self.budget)} if self.budget else {}),
            **({"auto": self.auto} if self.auto is not None else {}),
            "stages": [
                {"name": s.name, "tokens_before": s.tokens_before, "tokens_after": s.tokens_after,
                 "seconds": round(s.seconds, 6), **dict(s.info)}
                for s in self.stages
            ],
        }
