"""Every eval suite refuses an option it does not know, before any model loads (never silently ignored)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from ragzip.cli import EVAL_SUITES
from ragzip.errors import ConfigError

DATA = Path(__file__).parent.parent.parent / "fixtures" / "report_data" / "hotpotqa_train_hipporag100"


@pytest.mark.parametrize("suite", sorted(EVAL_SUITES))
def test_unknown_option_is_refused(suite: str) -> None:
    module, attr = EVAL_SUITES[suite].split(":")
    run = getattr(importlib.import_module(module), attr)
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['no_such_option'\].*valid"):
        run(DATA, limit=1, seed=0, options={"no_such_option": "1"})
