"""What the vLLM connector loads and saves: segments of a prompt, their store keys, and the claim it makes.

No vLLM and no torch here, so the decisions the connector takes (what it may claim, where, and what it saves) are
unit-tested in the default suite.

A prompt is cut into **segments**: the spans the proxy names in `kv_transfer_params` (the header, then one span per
document), or, for a prompt without them, fixed chunks. A segment's KV depends on every token before it, so its
**exact** key hashes the segment's tokens and everything before them (`chunk_key(..., context=prefix)`): a hit is
the very KV a full prefill computes, on any replica that shares the store. A document segment can also be found
**moved** (an option, off by default): its KV as computed at another place, re-rotated to the new position; this is
an approximation, so nothing computed after a moved segment is ever saved under an exact key.

The claim is a contiguous run of available segments starting from what vLLM already holds (its own prefix cache),
cut to a block boundary and to one token short of the prompt (vLLM must compute the last prompt token itself).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ragzip.errors import ConfigError
from ragzip.kvstore.key import chunk_key

PARAMS_KEY = "ragzip"
MAX_SPANS = 512
# A "moved" (position-free) document entry is stored under its own fingerprint, so its key can never be an exact
# key, whatever tokens come before or after it.
_MOVED_SUFFIX = "+moved"


@dataclass(frozen=True, slots=True)
class Span:
    """A token range `[start, end)` of the prompt the proxy laid out; `doc` names the document (for stats)."""

    start: int
    end: int
    doc: str | None = None


@dataclass(frozen=True, slots=True)
class Segment:
    """One stored unit: tokens `[start, end)`; `key` is the exact key, `moved_key` the position-free one (documents
    only)."""

    start: int
    end: int
    key: str
    moved_key: str | None = None


@dataclass(frozen=True, slots=True)
class Load:
    """Load tokens `[lo, hi)` of `segment` (its entry covers `[segment.start, segment.end)`); `moved` when the
    entry is the position-free one, re-rotated by `segment.start - entry.start` when applied."""

    segment: Segment
    lo: int
    hi: int
    moved: bool = False


@dataclass(slots=True)
class Claim:
    """The connector's answer to vLLM for one request: load `loads`, which cover `[computed, end)`."""

    computed: int
    end: int
    loads: list[Load] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        """What `get_num_new_matched_tokens` returns: tokens beyond what vLLM holds."""
        return max(0, self.end - self.computed)

    @property
    def first_moved(self) -> int | None:
        """Start of the first moved segment loaded (nothing from there on may be saved under an exact key)."""
        return next((ld.segment.start for ld in self.loads if ld.moved), None)


def align_down(n: int, block_size: int) -> int:
    return (n // block_size) * block_size


def parse_spans(params: Mapping[str, Any] | None, num_tokens: int) -> list[Span] | None:
    """The spans of `kv_transfer_params["ragzip"]`, checked: None when the request names none.

    Accepted: `{"spans": [{"start": int, "end": int, "doc": str?}, ...]}` (or `[start, end]` pairs), sorted,
    non-overlapping, inside the prompt, at most `MAX_SPANS`. They come from an HTTP body: anything else raises.

    Raises:
        ConfigError: malformed spans (the connector then treats the prompt as having none).
    """
    if not params or PARAMS_KEY not in params:
        return None
    body = params[PARAMS_KEY]
    if not isinstance(body, Mapping) or not isinstance(body.get("spans"), list):
        raise ConfigError("kv_transfer_params.ragzip must be an object with a 'spans' list")
    raw = body["spans"]
    if len(raw) > MAX_SPANS:
        raise ConfigError(f"{len(raw)} spans; at most {MAX_SPANS}")
    spans: list[Span] = []
    for item in raw:
        if isinstance(item, Mapping):
            start, end, doc = item.get("start"), item.get("end"), item.get("doc")
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            (start, end), doc = item, None
        else:
            raise ConfigError(f"a span must be {{start, end, doc?}} or [start, end], got {item!r:.80}")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end)):
            raise ConfigError(f"span bounds must be integers, got {start!r}, {end!r}")
        if doc is not None and (not isinstance(doc, str) or len(doc) > 128):
            raise ConfigError("a span's doc must be a string of at most 128 characters")
        prev = spans[-1].end if spans else 0
        if not prev <= start < end <= num_tokens:
            raise ConfigError(f"span [{start}, {end}) is not sorted, disjoint and inside the {num_tokens}-token prompt")
        spans.append(Span(start, end, doc))
    return spans


def segments(fingerprint: str, token_ids: Sequence[int], spans: Sequence[Span] | None, *, chunk_tokens: int,
             moved: bool = False) -> list[Segment]:
    """The prompt's segments with their keys.

    With spans: `[0, first span)` (the header) when not empty, then each span, contiguous ones only (a gap ends the
    list: what follows a gap is never stored). Without: chunks of `chunk_tokens` up to the last full chunk. A
    document span gets a `moved_key` when `moved`.
    """
    tokens = list(token_ids)
    bounds: list[tuple[int, int, bool]] = []
    if spans:
        if spans[0].start > 0:
            bounds.append((0, spans[0].start, False))
        pos = spans[0].start
        for span in spans:
            if span.start != pos:
                break
            bounds.append((span.start, span.end, True))
            pos = span.end
    else:
        bounds = [(s, s + chunk_tokens, False) for s in range(0, len(tokens) - chunk_tokens + 1, chunk_tokens)]
    out = []
    for start, end, is_doc in bounds:
        ids = tokens[start:end]
        out.append(Segment(start, end, chunk_key(fingerprint, ids, tokens[:start]),
                           chunk_key(moved_fingerprint(fingerprint), ids) if moved and is_doc else None))
    return out


def moved_fingerprint(fingerprint: str) -> str:
    """The fingerprint position-free document entries are stored under (their records have no context)."""
    return fingerprint + _MOVED_SUFFIX


def plan_claim(segs: Sequence[Segment], num_tokens: int, num_computed: int, block_size: int,
               available: Callable[[str], bool]) -> Claim:
    """The longest run of available segments from `num_computed`, cut to a block boundary and `num_tokens - 1`.

    Segments vLLM already holds (ending at or before `num_computed`) are not looked up; the run stops at the first
    segment found neither exact nor (when it has a `moved_key`) moved. A claim never reaches back before
    `num_computed`, and is 0 tokens when the run does not pass the next block boundary.
    """
    limit = align_down(max(num_tokens - 1, 0), block_size)
    run_end = num_computed
    found: list[tuple[Segment, bool]] = []
    for seg in segs:
        if seg.end <= num_computed:
            continue
        if seg.start > run_end:  # a hole (should not happen with contiguous segments)
            break
        if available(seg.key):
            found.append((seg, False))
        elif seg.moved_key is not None and available(seg.moved_key):
            found.append((seg, True))
        else:
            break
        run_end = seg.end
        if run_end >= limit:
            break
    end = align_down(min(run_end, limit), block_size)
    claim = Claim(num_computed, max(end, num_computed))
    if end <= num_computed:
        return claim
    for seg, moved in found:
        lo, hi = max(seg.start, num_computed), min(seg.end, end)
        if lo < hi:
            claim.loads.append(Load(seg, lo, hi, moved))
    return claim


def to_save(segs: Sequence[Segment], done_before: int, done_after: int, *, stop_at: int | None,
            present: Callable[[str], bool]) -> list[Segment]:
    """Segments whose last token was computed in this step (`done_before < end <= done_after`), not in the store
    yet, and starting before `stop_at` (the first moved segment: what comes after it is approximate)."""
    out = []
    for seg in segs:
        if not done_before < seg.end <= done_after:
            continue
        if stop_at is not None and seg.end > stop_at:
            continue
        if not present(seg.key):
            out.append(seg)
    return out


def slots_for(block_ids: Sequence[int], block_size: int, lo: int, hi: int) -> list[int]:
    """The paged-cache slots of token positions `[lo, hi)` of a request holding `block_ids`.

    Raises:
        ConfigError: the request does not hold blocks for those positions.
    """
    if hi > len(block_ids) * block_size or lo < 0:
        raise ConfigError(f"tokens [{lo}, {hi}) are outside the request's {len(block_ids)} blocks of {block_size}")
    return [block_ids[p // block_size] * block_size + p % block_size for p in range(lo, hi)]


__all__ = ["Claim", "Load", "Segment", "Span", "align_down", "moved_fingerprint", "parse_spans", "plan_claim",
           "segments", "slots_for", "to_save"]
