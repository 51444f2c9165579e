"""Budgets: how much context to keep, as a rate, a hard token cap, or a score threshold."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Real
from typing import Any

from ragzip.errors import BudgetError


@dataclass(frozen=True, slots=True)
class Budget:
    """Exactly one of `rate` (fraction of tokens kept, 0 < rate <= 1), `target_tokens` (hard cap, > 0) or
    `threshold` (a score cut-off whose meaning belongs to the compressor).

    Example:
        >>> Budget.ratio(0.3).token_limit(1000)
        300
    """

    rate: float | None = None
    target_tokens: int | None = None
    threshold: float | None = None

    def __post_init__(self) -> None:
        given = [x is not None for x in (self.rate, self.target_tokens, self.threshold)]
        if sum(given) > 1:
            raise BudgetError("give exactly one of rate, target_tokens or threshold")
        for name in ("rate", "target_tokens", "threshold"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, Real)):
                raise BudgetError(f"{name} must be a number, got {type(value).__name__} {value!r}")
        if self.rate is not None and not (0.0 < self.rate <= 1.0):
            raise BudgetError(f"rate must be in (0, 1], got {self.rate}")
        tokens = self.target_tokens
        if tokens is not None:
            if not math.isfinite(tokens) or int(tokens) != tokens or tokens <= 0:
                raise BudgetError(f"target_tokens must be a positive integer, got {self.target_tokens}")
            object.__setattr__(self, "target_tokens", int(tokens))
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise BudgetError(f"threshold must be a finite number, got {self.threshold}")

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
        """"rate", "target_tokens", "threshold", or None for the default budget."""
        for name in ("rate", "target_tokens", "threshold"):
            if getattr(self, name) is not None:
                return name
        return None

    @property
    def is_unbounded(self) -> bool:
        """No token limit (no field set, or only a threshold)."""
        return self.rate is None and self.target_tokens is None

    def token_limit(self, tokens_before: int) -> int | None:
        """The most tokens the output may have, or None when the budget sets no token limit."""
        if self.target_tokens is not None:
            return int(self.target_tokens)
        if self.rate is not None:
            return max(1, math.floor(self.rate * tokens_before + 1e-9)) if tokens_before else 0
        return None

    def as_dict(self) -> dict[str, float | int]:
        """The one field set, e.g. `{"rate": 0.3}` (`{}` for the default budget); `Budget(**d)` rebuilds it."""
        return {self.kind: getattr(self, self.kind)} if self.kind else {}

    def describe(self) -> str:
        if self.rate is not None:
            return f"rate={self.rate:g}"
        if self.target_tokens is not None:
            return f"target_tokens={self.target_tokens}"
        if self.threshold is not None:
            return f"threshold={self.threshold:g}"
        return "default"


BudgetLike = Budget | float | int | Mapping[str, Any] | None


def to_budget(budget: BudgetLike = None, *, rate: float | None = None, target_tokens: int | None = None,
              threshold: float | None = None) -> Budget | None:
    """One budget from what a caller may pass: a `Budget`, a bare rate (a float in (0, 1]), a bare token cap (an
    int), a mapping `{"rate": ...}`, or one of the `rate=` / `target_tokens=` / `threshold=` keywords. None when
    nothing is given (the compressor's default applies).

    Raises:
        BudgetError: more than one given, or a value of the wrong type or range.
    """
    keywords = {k: v for k, v in (("rate", rate), ("target_tokens", target_tokens), ("threshold", threshold))
                if v is not None}
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
    if isinstance(budget, Mapping):
        unknown = set(budget) - {"rate", "target_tokens", "threshold"}
        if unknown:
            raise BudgetError(f"unknown budget keys {sorted(unknown)}; valid: ['rate', 'target_tokens', 'threshold']")
        return Budget(**dict(budget))
    raise BudgetError(f"budget must be a Budget, a rate (float in (0, 1]) or a token cap (int), "
                      f"got {type(budget).__name__} {budget!r}")
