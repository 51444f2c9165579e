"""Calibrated probabilities and the `auto` budget's selection rule, shared by every calibrated compressor.

A compressor's raw unit scores (EXIT sentence probabilities, lingua2 word scores) are ranked well but not
calibrated: 0.3 does not mean "needed 30% of the time". A `Calibration` is a monotone piecewise-linear map from
raw score to the probability that the unit is part of the evidence the question needs, fitted by isotonic
regression on a tuning split (`scripts/calibrate_auto.py`) and shipped as JSON next to the weights. The `auto`
budget keeps units in score order until the calibrated expected coverage, sum(p kept) / sum(p all), reaches the
target, and the guard keeps more when no unit is clearly needed (`auto_select`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ragzip.budget import Budget
from ragzip.errors import ConfigError

CALIBRATION_FILE = "calibration.json"
_MAX_KNOTS = 4096
_MAX_BYTES = 1_000_000
# The guard: when the best unit's calibrated probability is below LOW_CONFIDENCE, no unit is clearly needed (the
# scorer does not recognise the evidence); when the best units are within FLAT_MARGIN of the median, the scores do
# not separate anything. Either way a coverage estimate built on them is not to be trusted.
LOW_CONFIDENCE = 0.10
FLAT_MARGIN = 0.05


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


@dataclass(frozen=True, slots=True)
class Calibration:
    """A monotone map raw score -> probability: linear between `(xs[i], ys[i])` knots, flat outside them."""

    xs: tuple[float, ...]
    ys: tuple[float, ...]
    fitted_on: str = ""

    def __post_init__(self) -> None:
        xs, ys = self.xs, self.ys
        if not xs or len(xs) != len(ys) or len(xs) > _MAX_KNOTS:
            raise ConfigError(f"calibration needs 1..{_MAX_KNOTS} knots with one probability each")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and _finite(v) for v in (*xs, *ys)):
            raise ConfigError("calibration knots must be finite numbers")
        if any(b < a for a, b in zip(xs, xs[1:])):
            raise ConfigError("calibration scores must be sorted ascending")
        if any(b < a for a, b in zip(ys, ys[1:])):
            raise ConfigError("calibration probabilities must not decrease (the map is monotone)")
        if ys[0] < 0.0 or ys[-1] > 1.0:
            raise ConfigError("calibration probabilities must lie in [0, 1]")

    def __call__(self, scores: Sequence[float] | np.ndarray) -> np.ndarray:
        return np.interp(np.asarray(scores, dtype=np.float64), self.xs, self.ys)

    def to_json(self) -> dict[str, Any]:
        return {"format": "ragzip-calibration/1", "kind": "isotonic", "fitted_on": self.fitted_on,
                "xs": [round(x, 6) for x in self.xs], "ys": [round(y, 6) for y in self.ys]}

    @classmethod
    def from_json(cls, data: Any, where: str = "calibration") -> Calibration:
        if not isinstance(data, dict) or data.get("format") != "ragzip-calibration/1":
            raise ConfigError(f"{where}: not a ragzip calibration file (format 'ragzip-calibration/1')")
        xs, ys = data.get("xs"), data.get("ys")
        if not isinstance(xs, list) or not isinstance(ys, list):
            raise ConfigError(f"{where}: 'xs' and 'ys' must be lists of numbers")
        try:
            return cls(tuple(xs), tuple(ys), str(data.get("fitted_on", "")))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None


def load_calibration(folder: str | Path) -> Calibration | None:
    """The calibration shipped in a weights folder, or None when it has none (a user's own weights).

    Raises:
        ConfigError: the file exists but is too large, not JSON, or not a valid monotone map.
    """
    path = Path(folder) / CALIBRATION_FILE
    if not path.is_file():
        return None
    if path.stat().st_size > _MAX_BYTES:
        raise ConfigError(f"{path}: calibration file over {_MAX_BYTES} bytes")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read calibration: {exc}") from None
    return Calibration.from_json(data, str(path))


def fit_isotonic(scores: Sequence[float], labels: Sequence[int], *, fitted_on: str = "",
                 max_knots: int = 200) -> Calibration:
    """Isotonic regression of `labels` (0/1) on `scores` (scikit-learn), thinned to at most `max_knots` knots."""
    from sklearn.isotonic import IsotonicRegression

    x = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(x, y)
    kx, ky = np.asarray(iso.X_thresholds_), np.asarray(iso.y_thresholds_)
    if len(kx) > max_knots:
        keep = np.unique(np.linspace(0, len(kx) - 1, max_knots).round().astype(int))
        kx, ky = kx[keep], ky[keep]
    return Calibration(tuple(float(v) for v in kx), tuple(float(v) for v in ky), fitted_on)


@dataclass(frozen=True, slots=True)
class AutoChoice:
    """What `auto_select` decided: the units to keep (indices, in score order), the expected coverage they reach,
    and the guard's reason when it kept more than the coverage asked for."""

    keep: list[int]
    expected_coverage: float
    guard: str | None


def guard_reason(probs: np.ndarray) -> str | None:
    """"low_scores" when no unit is clearly needed, "flat_scores" when the scores separate nothing, else None."""
    if probs.size == 0:
        return None
    top = float(probs.max())
    if top < LOW_CONFIDENCE:
        return "low_scores"
    if probs.size >= 3 and top - float(np.median(probs)) < FLAT_MARGIN:
        return "flat_scores"
    return None


def auto_select(probs: Sequence[float] | np.ndarray, costs: Sequence[int], budget: Budget, *,
                order: Sequence[int] | None = None) -> AutoChoice:
    """Units (indices into `probs`) an auto budget keeps, in the order they were added.

    Units are added in `order` (default: descending probability) until sum(p kept) / sum(p) >= coverage, then
    until their cost reaches `min_rate` of the total. When the guard fires and `on_unsure` is "keep", every unit is
    kept. `max_tokens` is applied by the caller's exact fit (costs here are per unit, before joining).
    """
    p = np.clip(np.asarray(probs, dtype=np.float64), 0.0, 1.0)
    n = len(p)
    if n == 0:
        return AutoChoice([], 1.0, None)
    ranked = list(order) if order is not None else sorted(range(n), key=lambda i: (-p[i], i))
    guard = guard_reason(p)
    if guard is not None and budget.on_unsure == "keep":
        return AutoChoice(ranked, 1.0, guard)
    total = float(p.sum())
    target = float(budget.coverage or 1.0)
    keep: list[int] = []
    mass = 0.0
    for i in ranked:  # with no expected evidence at all (total 0), the best unit alone: never an empty context
        if keep and (total <= 0 or mass / total >= target - 1e-12):
            break
        keep.append(i)
        mass += float(p[i])
    if budget.min_rate is not None:
        all_cost, cost = sum(costs), sum(costs[i] for i in keep)
        for i in ranked[len(keep):]:
            if cost >= budget.min_rate * all_cost:
                break
            keep.append(i)
            mass += float(p[i])
            cost += costs[i]
    return AutoChoice(keep, mass / total if total > 0 else 1.0, guard)
