"""Typed compressor options parsed one way, and budget kinds a compressor cannot honour refused."""

from __future__ import annotations

import pytest

from ragzip import Budget, RagZip
from ragzip.compressors.baselines import RandomCompressor, RandomOptions, Unit
from ragzip.compressors.registry import get_compressor
from ragzip.errors import BudgetError, ConfigError
from ragzip.tokens import WhitespaceCounter

WS = WhitespaceCounter()
DOCS = ["The Rhine rises in the Alps. It ends in the North Sea.", "Paris is in France. It has museums."]


def test_options_are_frozen_dataclasses_parsed_from_strings() -> None:
    comp = get_compressor("random", counter=WS, unit="WORD", seed="7")
    assert comp.options == RandomOptions(unit=Unit.WORD, seed=7)
    with pytest.raises(AttributeError):
        comp.options.seed = 1  # type: ignore[misc]
    assert RandomCompressor(WS, RandomOptions(seed=3), unit="word").options == RandomOptions(Unit.WORD, 3)


@pytest.mark.parametrize(("method", "options", "match"), [
    ("random", {"unit": "paragraph"}, r"unknown compressor 'random' option unit 'paragraph'; valid: \['sentence'"),
    ("random", {"seed": "1.5"}, "seed='1.5' is not an integer"),
    ("embed-topk", {"min_keep": "-1"}, "out of range"),
    ("truncate", {"rate": "0.5"}, r"unknown option\(s\) \['rate'\] for compressor 'truncate'"),
    ("crag", {"alpha": "2"}, "alpha=2.0 is out of range"),
    ("crag", {"k": "many"}, "k must be a positive integer or one of"),
])
def test_bad_options_are_config_errors_that_name_the_option(method: str, options: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        get_compressor(method, counter=WS, **options)


@pytest.mark.parametrize("method", ["truncate", "random", "crag"])
def test_a_threshold_budget_is_refused_where_it_means_nothing(method: str) -> None:
    with pytest.raises(BudgetError, match="does not take a threshold budget"):
        RagZip(method, tokenizer="whitespace").compress("Where does the Rhine end?", DOCS, Budget.score(0.5))


def test_each_stage_counts_only_its_output() -> None:
    calls: list[int] = []

    class Counting(WhitespaceCounter):
        def count_batch(self, texts):  # type: ignore[no-untyped-def]
            calls.append(len(texts))
            return super().count_batch(texts)

    result = RagZip("none+truncate", counter=Counting()).compress("q", DOCS, Budget.ratio(0.5))
    # the input's documents once; 'none' keeps them whole (no recount); truncate counts only its new piece (its
    # search for the cut and the joined totals go through `count`)
    assert calls == [2, 1] and result.stages[1].tokens_before == result.stages[0].tokens_after
    per_context = {c["id"]: (c["tokens_before"], c["tokens_after"]) for c in result.to_contract()["contexts"]}
    assert per_context["0"][0] == 12 and sum(a for _, a in per_context.values()) == result.tokens_after
