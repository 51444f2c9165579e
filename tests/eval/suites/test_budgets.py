"""`ragzip eval budgets` on the shipped sample: caps hold exactly and are filled; bad options are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragzip.errors import ConfigError
from ragzip.eval.suites.budgets import run

DATA = Path(__file__).parent.parent.parent / "fixtures" / "report_data" / "hotpotqa_train_hipporag100"


def test_budgets_suite_reports_no_overshoot_and_a_full_budget() -> None:
    result = run(DATA, limit=2, seed=0, options={"methods": "truncate,embed-topk,embed-topk+truncate",
                                                 "budgets": "0.3,50"})
    assert result["over_limit_total"] == 0 and result["misreported_total"] == 0
    assert len(result["rows"]) == 6
    for row in result["rows"]:
        assert row["n"] == 2 and row["max_overshoot"] <= 0 and row["fill_mean"] >= 0.85, row


def test_budgets_suite_refuses_unknown_options_and_bad_budgets() -> None:
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['rate'\]"):
        run(DATA, limit=1, seed=0, options={"rate": "0.3"})
    with pytest.raises(ConfigError, match="neither a rate"):
        run(DATA, limit=1, seed=0, options={"budgets": "half"})
