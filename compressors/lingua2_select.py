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
from ragzip.tokens import TokenCounter

SEP = " "
_FORCED_BONUS = 2.0  # probabilities live in [0, 1]: forced words rank above every other word


@dataclass(frozen=True, slots=True)
class UnitScores:
    """Scored word units of one document."""

    units: np.ndarray  # [U, 2] source char ranges
    score: np.ndarray  # [U] keep score in [0, 1]
    forced: np.ndarray  # [U] bool: protected / force token / digit


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
    """The compressed text `assemble` will produce for these kept units."""
    return SEP.join(text[a:b] for a, b in kept_runs(units, keep))


def select_units(texts: Sequence[str], scores: Sequence[UnitScores], budget: Budget, counter: TokenCounter, *,
                 default_rate: float, drop_repeats: Sequence[str] = ()) -> list[np.ndarray]:
    """Per document, a [U] bool mask of the kept units.

    Rate and `target_tokens` budgets are met exactly: the output never exceeds the limit, and it is the longest
    prefix of the global ranking that fits. A threshold budget keeps units scoring at least the threshold.
    """
    sizes = [len(s.units) for s in scores]
    doc_of = np.repeat(np.arange(len(scores)), sizes)
    flat_score = np.concatenate([s.score for s in scores]) if scores else np.zeros(0)
    flat_forced = np.concatenate([s.forced for s in scores]) if scores else np.zeros(0, dtype=bool)
    offsets = np.concatenate([[0], np.cumsum(sizes)])

    def masks(flat_keep: np.ndarray) -> list[np.ndarray]:
        return [flat_keep[offsets[d]:offsets[d + 1]] for d in range(len(scores))]

    if budget.threshold is not None:
        keep = masks(flat_forced | (flat_score >= budget.threshold))
        return [_drop_repeats(t, s.units, k, drop_repeats) for t, s, k in zip(texts, scores, keep)]
    before = sum(counter.count_batch(list(texts)))
    limit = (budget if not budget.is_unbounded else Budget.ratio(default_rate)).token_limit(before) or 0
    n = len(flat_score)
    if limit >= before:
        return masks(np.ones(n, dtype=bool))
    priority = flat_score + _FORCED_BONUS * flat_forced
    order = np.lexsort((np.arange(n), -priority))  # best first, earlier position breaks ties

    def fits(k: int) -> bool:
        flat_keep = np.zeros(n, dtype=bool)
        flat_keep[order[:k]] = True
        outs = [render(t, s.units, m) for t, s, m in zip(texts, scores, masks(flat_keep))]
        return sum(counter.count_batch(outs)) <= limit

    lo, hi = _bracket(fits, n, _estimate(texts, scores, order, offsets, doc_of, before, limit))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    flat_keep = np.zeros(n, dtype=bool)
    flat_keep[order[:lo]] = True
    return [_drop_repeats(t, s.units, k, drop_repeats) for t, s, k in zip(texts, scores, masks(flat_keep))]


def _estimate(texts: Sequence[str], scores: Sequence[UnitScores], order: np.ndarray, offsets: np.ndarray,
              doc_of: np.ndarray, before: int, limit: int) -> int:
    """A first guess of how many ranked units fit: unit costs proportional to their characters."""
    if len(order) == 0:
        return 0
    lengths = np.concatenate([s.units[:, 1] - s.units[:, 0] for s in scores]) + len(SEP)
    per_char = before / max(1, int(lengths.sum()))
    cum = np.cumsum(lengths[order] * per_char)
    return int(np.searchsorted(cum, limit, side="right"))


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
