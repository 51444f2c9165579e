"""Budgets: how much context to keep, as a rate, a hard token cap, a score threshold, or `auto` (a calibrated
expected coverage of the evidence the question needs; the default)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Real
from typing import Any, Literal

from ragzip.errors import BudgetError

DEFAULT_COVERAGE = 0.95
OnUnsure = Literal["keep", "compress"]
ON_UNSURE = ("keep", "compress")
_KINDS = ("rate", "target_tokens", "threshold", "coverage")
_AUTO_BOUNDS = ("max_tokens", "min_rate", "on_unsure")


@dataclass(frozen=True, slots=True)
class Budget:
    """At most one of `rate` (fraction of tokens kept, 0 < rate <= 1), `target_tokens` (hard cap, > 0),
    `threshold` (a score cut-off whose meaning belongs to the compressor) or `coverage` (the `auto` budget: keep
    units in score order until the calibrated expected share of the needed evidence kept reaches `coverage`).

    An `auto` budget may be bounded by `max_tokens` (a hard cap: `count(result.text) <= max_tokens`) and
    `min_rate` (keep at least this share of the tokens), and says what to do when the scores are unsure
    (`on_unsure`: "keep" more, up to everything, or "compress" anyway). A budget with no field set means "the
    compressor's default", which is `auto` for the compressors that are calibrated (EXIT, lingua2, their pipelines).

    Example:
        >>> Budget.ratio(0.3).token_limit(1000)
        300
        >>> Budget.auto(0.9, max_tokens=500).as_dict()
        {'auto': {'coverage': 0.9, 'max_tokens': 500}}
    """

    rate: float | None = None
    target_tokens: int | None = None
    threshold: float | None = None
    coverage: float | None = None
    max_tokens: int | None = None
    min_rate: float | None = None
    on_unsure: OnUnsure = "keep"

    def __post_init__(self) -> None:
        given = [getattr(self, name) is not None for name in _KINDS]
        if sum(given) > 1:
            raise BudgetError("give exactly one of rate, target_tokens, threshold or coverage (auto)")
        for name in (*_KINDS, "max_tokens", "min_rate"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, Real)):
                raise BudgetError(f"{name} must be a number, got {type(value).__name__} {value!r}")
        if self.rate is not None and not (0.0 < self.rate <= 1.0):
            raise BudgetError(f"rate must be in (0, 1], got {self.rate}")
        for name in ("target_tokens", "max_tokens"):
            tokens = getattr(self, name)
            if tokens is not None:
                if not math.isfinite(tokens) or int(tokens) != tokens or tokens <= 0:
                    raise BudgetError(f"{name} must be a positive integer, got {tokens}")
                object.__setattr__(self, name, int(tokens))
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise BudgetError(f"threshold must be a finite number, got {self.threshold}")
        if self.coverage is not None and not (0.0 < self.coverage <= 1.0):
            raise BudgetError(f"coverage must be in (0, 1], got {self.coverage}")
        if self.min_rate is not None and not (0.0 < self.min_rate <= 1.0):
            raise BudgetError(f"min_rate must be in (0, 1], got {self.min_rate}")
        if self.on_unsure not in ON_UNSURE:
            raise BudgetError(f"on_unsure must be one of {list(ON_UNSURE)}, got {self.on_unsure!r}")
        if self.coverage is None and (self.max_tokens is not None or self.min_rate is not None
                                      or self.on_unsure != "keep"):
            raise BudgetError("max_tokens, min_rate and on_unsure bound an auto budget (give coverage too)")

    @classmethod
    def auto(cls, coverage: float = DEFAULT_COVERAGE, *, max_tokens: int | None = None, min_rate: float | None = None,
             on_unsure: OnUnsure = "keep") -> Budget:
        """The calibrated budget: keep until the expected coverage of the needed evidence reaches `coverage`."""
        return cls(coverage=coverage, max_tokens=max_tokens, min_rate=min_rate, on_unsure=on_unsure)

    @classmethod
    def ratio(cls, rate: float) -> Budget:
        return cls(rate=rate)

    @classmethod
    def tokens(cls, target_tokens: int) -> Budget:
        return cls(target_tokens=target_tokens)

    @classmethod
    def score(cls, threshold: float) -> Budget:
        return cls(threshold=threshold)

    @property
    def kind(self) -> str | None:
        """"rate", "target_tokens", "threshold", "auto", or None for the default budget."""
        if self.coverage is not None:
            return "auto"
        for name in ("rate", "target_tokens", "threshold"):
            if getattr(self, name) is not None:
                return name
        return None

    @property
    def is_auto(self) -> bool:
        return self.coverage is not None

    @property
    def is_unbounded(self) -> bool:
        """No token limit (no field set, only a threshold, or auto without max_tokens)."""
        return self.token_limit(1) is None

    def token_limit(self, tokens_before: int) -> int | None:
        """The most tokens the output may have, or None when the budget sets no token limit (auto: `max_tokens`)."""
        if self.target_tokens is not None:
            return int(self.target_tokens)
        if self.max_tokens is not None:
            return int(self.max_tokens)
        if self.rate is not None:
            return max(1, math.floor(self.rate * tokens_before + 1e-9)) if tokens_before else 0
        return None

    def with_cap(self, max_tokens: int | None) -> Budget:
        """This auto budget with its hard cap replaced (what a pipeline stage or a separator-aware fit selects
        under)."""
        return Budget(coverage=self.coverage, max_tokens=max_tokens, min_rate=self.min_rate, on_unsure=self.on_unsure)

    def auto_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"coverage": self.coverage}
        for name in _AUTO_BOUNDS:
            value = getattr(self, name)
            if value is not None and not (name == "on_unsure" and value == "keep"):
                out[name] = value
        return out

    def as_dict(self) -> dict[str, Any]:
        """The one field set, e.g. `{"rate": 0.3}` or `{"auto": {"coverage": 0.95}}` (`{}` for the default
        budget); `to_budget(d)` rebuilds it."""
        if self.is_auto:
            return {"auto": self.auto_dict()}
        return {self.kind: getattr(self, self.kind)} if self.kind else {}

    def describe(self) -> str:
        if self.rate is not None:
            return f"rate={self.rate:g}"
        if self.target_tokens is not None:
            return f"target_tokens={self.target_tokens}"
        if self.threshold is not None:
            return f"threshold={self.threshold:g}"
        if self.is_auto:
            return "auto(" + ", ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}"
                                       for k, v in self.auto_dict().items()) + ")"
        return "default"


BudgetLike = Budget | float | int | str | Mapping[str, Any] | None


def _auto_from(value: Any) -> Budget:
    """`{"auto": value}`: true, a coverage number, or an object of coverage / max_tokens / min_rate / on_unsure."""
    if value is True or value == {}:
        return Budget.auto()
    if isinstance(value, Real) and not isinstance(value, bool):
        return Budget.auto(float(value))
    if isinstance(value, Mapping):
        unknown = set(value) - {"coverage", *_AUTO_BOUNDS}
        if unknown:
            raise BudgetError(f"unknown auto budget keys {sorted(unknown)}; valid: "
                              f"{sorted(['coverage', *_AUTO_BOUNDS])}")
        return Budget(**{"coverage": DEFAULT_COVERAGE, **dict(value)})
    raise BudgetError(f"auto must be true, a coverage in (0, 1] or an object, got {type(value).__name__} {value!r}")


def to_budget(budget: BudgetLike = None, *, rate: float | None = None, target_tokens: int | None = None,
              threshold: float | None = None, coverage: float | None = None) -> Budget | None:
    """One budget from what a caller may pass: a `Budget`, a bare rate (a float in (0, 1]), a bare token cap (an
    int), "auto", a mapping (`{"rate": ...}`, `{"auto": {"coverage": 0.9, "max_tokens": 500}}`), or one of the
    `rate=` / `target_tokens=` / `threshold=` / `coverage=` keywords. None when nothing is given (the compressor's
    default applies: `auto` for the calibrated compressors).

    Raises:
        BudgetError: more than one given, or a value of the wrong type or range.
    """
    keywords = {k: v for k, v in (("rate", rate), ("target_tokens", target_tokens), ("threshold", threshold),
                                  ("coverage", coverage)) if v is not None}
    if budget is not None and keywords:
        raise BudgetError(f"give a budget or {' / '.join(keywords)}=, not both")
    if keywords:
        return Budget(**keywords)
    if budget is None or isinstance(budget, Budget):
        return budget
    if isinstance(budget, bool):
        raise BudgetError("budget must be a Budget, a rate (float) or a token cap (int), got a bool")
    if isinstance(budget, int):
        return Budget(target_tokens=budget)
    if isinstance(budget, float):
        return Budget(rate=budget)
    if isinstance(budget, str):
        if budget.strip().lower() == "auto":
            return Budget.auto()
        raise BudgetError(f"a budget string must be 'auto', got {budget!r}")
    if isinstance(budget, Mapping):
        valid = ["auto", "coverage", "max_tokens", "min_rate", "on_unsure", "rate", "target_tokens", "threshold"]
        unknown = set(budget) - set(valid)
        if unknown:
            raise BudgetError(f"unknown budget keys {sorted(unknown)}; valid: {valid}")
        if "auto" in budget:
            if len(budget) > 1:
                raise BudgetError("an auto budget's settings go inside it: {\"auto\": {\"coverage\": 0.9, ...}}")
            return _auto_from(budget["auto"])
        return Budget(**dict(budget))
    raise BudgetError(f"budget must be a Budget, a rate (float in (0, 1]), a token cap (int) or 'auto', "
                      f"got {type(budget).__name__} {budget!r}")
