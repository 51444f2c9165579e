"""Exact-budget word selection across windows and documents for the LLMLingua-2-style compressor.

The reference thresholds each 512-token window at its own percentile, so the total overshoots or undershoots the
request. Here every word of every window and document is ranked once, and the longest ranked prefix whose
*rendered* output fits the token limit (counted with the target LLM's counter, separators included) is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ragzip.budget import Budget
from ragzip.compressors.base import joined_tokens, separator_tokens
from ragzip.spans import piece_separator
from ragzip.tokens import TokenCounter

SEP = " "
_FORCED_BONUS = 2.0  # probabilities live in [0, 1]: forced words rank above every other word


@dataclass(frozen=True, slots=True)
class UnitScores:
    """Scored word units of one document, grouped into atoms that are kept or dropped whole."""

    units: np.ndarray  # [U, 2] source char ranges
    score: np.ndarray  # [U] keep score in [0, 1]
    forced: np.ndarray  # [U] bool: a force token or digit the user asked to keep (ranked first)
    group: np.ndarray | None = None  # [U] atom id (None: every unit is its own atom)
    requires: np.ndarray | None = None  # [G] atom needed with each atom (-1: none)

    def atoms(self) -> tuple[np.ndarray, np.ndarray]:
        """(group [U], requires [G]) with the every-unit-alone default filled in."""
        if self.group is None:
            n = len(self.units)
            return np.arange(n), np.full(n, -1, dtype=np.int64)
        assert self.requires is not None
        return self.group, self.requires


def kept_runs(spans: np.ndarray, keep: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of consecutive kept words as source char ranges (first word's start, last word's end)."""
    idx = np.flatnonzero(keep)
    if len(idx) == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) > 1)
    starts = spans[np.concatenate([[idx[0]], idx[breaks + 1]]), 0]
    ends = spans[np.concatenate([idx[breaks], [idx[-1]]]), 1]
    ok = ends > starts
    return list(zip(starts[ok].tolist(), ends[ok].tolist()))


def run_scores(spans: np.ndarray, keep: np.ndarray, score: np.ndarray) -> list[float]:
    """Mean unit score of each run `kept_runs` returns."""
    idx = np.flatnonzero(keep)
    if len(idx) == 0:
        return []
    group_starts = np.concatenate([[0], np.flatnonzero(np.diff(idx) > 1) + 1])
    sizes = np.diff(np.append(group_starts, len(idx)))
    means = np.add.reduceat(score[idx].astype(np.float64), group_starts) / sizes
    ok = spans[idx[group_starts + sizes - 1], 1] > spans[idx[group_starts], 0]
    return np.round(means[ok], 4).tolist()


def render(text: str, units: np.ndarray, keep: np.ndarray) -> str:
    """The compressed text `assemble(..., keep_line_breaks=True)` will produce for these kept units."""
    parts: list[str] = []
    prev = 0
    for a, b in kept_runs(units, keep):
        if parts:
            parts.append(piece_separator(text, prev, a, SEP))
        parts.append(text[a:b])
        prev = b
    return "".join(parts)


def select_units(texts: Sequence[str], scores: Sequence[UnitScores], budget: Budget, counter: TokenCounter, *,
                 default_rate: float, drop_repeats: Sequence[str] = ()) -> list[np.ndarray]:
    """Per document, a [U] bool mask of the kept units.

    Atoms (see `UnitScores.group`) are ranked by their mean unit score, force-kept atoms first, and an atom comes
    right after the atom it requires. Rate and `target_tokens` budgets are met exactly: the output never exceeds
    the limit; it is the longest prefix of the ranking that fits, then later atoms that still fit (an atom too big
    for the budget is skipped, never cut). A threshold budget keeps atoms scoring at least the threshold.
    """
    sizes = [len(s.units) for s in scores]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n = int(offsets[-1])
    groups, reqs, base = [], [], 0
    for s in scores:
        g, r = s.atoms()
        groups.append(g + base)
        reqs.append(np.where(r >= 0, r + base, -1))
        base += len(r)
    group = np.concatenate(groups) if groups else np.zeros(0, dtype=np.int64)
    requires = np.concatenate(reqs) if reqs else np.zeros(0, dtype=np.int64)
    flat_score = np.concatenate([s.score for s in scores]) if scores else np.zeros(0)
    flat_forced = np.concatenate([s.forced for s in scores]) if scores else np.zeros(0, dtype=bool)
    n_groups = len(requires)
    g_size = np.bincount(group, minlength=n_groups)
    g_score = np.bincount(group, weights=flat_score, minlength=n_groups) / np.maximum(g_size, 1)
    g_forced = np.bincount(group, weights=flat_forced, minlength=n_groups) > 0

    def masks(flat_keep: np.ndarray) -> list[np.ndarray]:
        return [flat_keep[offsets[d]:offsets[d + 1]] for d in range(len(scores))]

    def finish(keep_groups: np.ndarray) -> list[np.ndarray]:
        return [_drop_repeats(t, s.units, k, drop_repeats)
                for t, s, k in zip(texts, scores, masks(keep_groups[group]))]

    if budget.threshold is not None:
        keep = g_forced | (g_score >= budget.threshold)
        keep[requires[keep & (requires >= 0)]] = True
        return finish(keep)
    before = joined_tokens(counter, list(texts))
    limit = (budget if not budget.is_unbounded else Budget.ratio(default_rate)).token_limit(before) or 0
    if limit >= before:
        return masks(np.ones(n, dtype=bool))
    # a first estimate of each atom's token cost: proportional to its characters
    lengths = np.concatenate([s.units[:, 1] - s.units[:, 0] for s in scores]) + len(SEP)
    g_cost = np.bincount(group, weights=lengths, minlength=n_groups) * before / max(1, int(lengths.sum()))
    priority = g_score + _FORCED_BONUS * _forced_within_share(g_forced, g_score, g_cost, limit)
    order = _with_requirements(np.lexsort((np.arange(n_groups), -priority)), requires)
    rank = np.empty(n_groups, dtype=np.int64)
    rank[order] = np.arange(n_groups)
    unit_rank = rank[group]

    def outputs(flat_keep: np.ndarray) -> list[str]:
        return [render(t, s.units, m) for t, s, m in zip(texts, scores, masks(flat_keep))]

    def fits(k: int) -> bool:  # the exact count of the rendered context, separators included
        return joined_tokens(counter, outputs(unit_rank < k)) <= limit

    doc_of_group = np.zeros(n_groups, dtype=np.int64)
    doc_of_group[group] = np.repeat(np.arange(len(scores)), sizes)
    estimate = int(np.searchsorted(np.cumsum(g_cost[order]), limit, side="right"))  # costs ~ characters
    lo, hi = _bracket(fits, n_groups, estimate)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    keep_groups = np.zeros(n_groups, dtype=bool)
    keep_groups[order[:lo]] = True
    _fill_gaps(keep_groups, order[lo:], requires, doc_of_group, group, offsets, texts, scores, counter, limit)
    return finish(keep_groups)


_FORCED_SHARE = 0.5  # force-kept words may take at most this share of the budget before they compete normally


def _forced_within_share(g_forced: np.ndarray, g_score: np.ndarray, g_cost: np.ndarray, limit: int) -> np.ndarray:
    """The forced atoms that rank first: the best-scoring ones, up to `_FORCED_SHARE` of the token limit
    (estimated costs), so that force tokens and digits never displace every relevant word."""
    idx = np.flatnonzero(g_forced)
    if len(idx) == 0:
        return g_forced
    idx = idx[np.lexsort((idx, -g_score[idx]))]
    within = np.cumsum(g_cost[idx]) <= _FORCED_SHARE * limit
    out = np.zeros_like(g_forced)
    out[idx[within]] = True
    return out


_MAX_GAP_TRIES = 64  # atoms tried after the prefix stops fitting (each try re-counts one document)


def _fill_gaps(keep_groups: np.ndarray, rest: np.ndarray, requires: np.ndarray, doc_of_group: np.ndarray,
               group: np.ndarray, offsets: np.ndarray, texts: Sequence[str], scores: Sequence[UnitScores],
               counter: TokenCounter, limit: int) -> None:
    """Add, in ranking order, atoms after the prefix that still fit (skipping ones too big), in place."""
    if len(rest) == 0:
        return

    def doc_text(d: int, keep: np.ndarray) -> str:
        return render(texts[d], scores[d].units, keep[group[offsets[d]:offsets[d + 1]]])

    per_doc = counter.count_batch([doc_text(d, keep_groups) for d in range(len(texts))])
    sep = separator_tokens(counter)

    def joined(counts: Sequence[int]) -> int:  # estimated; the compressor's final exact fit trims any excess
        return sum(counts) + sep * max(0, sum(1 for c in counts if c) - 1)

    total = joined(per_doc)
    for g in rest[:_MAX_GAP_TRIES]:
        if total >= limit:
            break
        if keep_groups[g]:
            continue
        add = [g] + ([requires[g]] if requires[g] >= 0 and not keep_groups[requires[g]] else [])
        d = int(doc_of_group[g])
        trial = keep_groups.copy()
        trial[add] = True
        cost = counter.count(doc_text(d, trial))
        counts = [*per_doc[:d], cost, *per_doc[d + 1:]]
        if joined(counts) <= limit:
            keep_groups[add] = True
            per_doc[d] = cost
            total = joined(per_doc)


def _with_requirements(order: np.ndarray, requires: np.ndarray) -> np.ndarray:
    """`order` with every required atom moved to just before the first atom that needs it."""
    if not (requires >= 0).any():
        return order
    placed = np.zeros(len(requires), dtype=bool)
    out: list[int] = []
    for g in order.tolist():
        r = int(requires[g])
        if r >= 0 and not placed[r]:
            placed[r] = True
            out.append(r)
        if not placed[g]:
            placed[g] = True
            out.append(g)
    return np.array(out, dtype=np.int64)


def _bracket(check: Callable[[int], bool], n: int, guess: int) -> tuple[int, int]:
    """(lo, hi) with fits(lo) true (0 always fits) and hi = n + 1 or a k that does not fit, by galloping."""
    lo, hi = 0, n + 1
    k = min(max(guess, 1), n)
    if k == 0:
        return 0, 1
    step = max(1, n // 64)
    if check(k):
        lo = k
        while lo + step <= n and check(lo + step):
            lo += step
            step *= 2
        hi = min(hi, lo + step)
    else:
        hi = k
        while hi - step > 0 and not check(hi - step):
            hi -= step
            step *= 2
        lo = max(0, hi - step)
    return lo, hi


def _drop_repeats(text: str, units: np.ndarray, keep: np.ndarray, tokens: Sequence[str]) -> np.ndarray:
    """Drop a kept force token identical to the previous kept unit (nothing kept between them)."""
    if not tokens or not keep.any():
        return keep
    keep = keep.copy()
    force = set(tokens)
    kept = np.flatnonzero(keep)
    words = [text[a:b] for a, b in units[kept]]
    for j in range(1, len(kept)):
        if words[j] in force and words[j] == words[j - 1]:
            keep[kept[j]] = False
    return keep
