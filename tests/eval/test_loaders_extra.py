from __future__ import annotations

from pathlib import Path

import pytest

from ragzip.errors import InputError
from ragzip.eval.loaders_extra import (
    clean_longbench,
    detect_format,
    load_summary_examples,
    split_passages,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "crag"


def test_detect_format(tmp_path: Path) -> None:
    assert detect_format(FIXTURES / "fewsum_mini.csv") == "fewsum"
    assert detect_format(FIXTURES / "multi_news_mini.jsonl") == "multi_news"
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(InputError):
        detect_format(tmp_path)
    with pytest.raises(InputError):
        detect_format(tmp_path / "missing")


def test_fewsum_reviews_are_items_and_summaries_references() -> None:
    examples = load_summary_examples(FIXTURES / "fewsum_mini.csv")
    assert [ex.id for ex in examples] == ["P001", "P002"]
    first = examples[0]
    assert [d.id for d in first.items] == ["P001-rev1", "P001-rev2", "P001-rev3", "P001-rev4"]
    assert first.items[2].text == "The lid broke after a week."
    assert len(first.references) == 2 and first.meta["category"] == "kitchen"
    assert [d.id for d in examples[1].items] == ["P002-rev1", "P002-rev2", "P002-rev4"]  # an empty review is skipped
    assert len(load_summary_examples(FIXTURES / "fewsum_mini.csv", limit=1)) == 1


def test_multi_news_paragraph_and_passage_units() -> None:
    paras = load_summary_examples(FIXTURES / "multi_news_mini.jsonl")
    assert len(paras) == 2
    ex = paras[0]
    assert [d.id for d in ex.items] == ["mn0001aaaaaa-p1-0", "mn0001aaaaaa-p1-1", "mn0001aaaaaa-p1-2",
                                        "mn0001aaaaaa-p2-0", "mn0001aaaaaa-p2-1"]
    assert ex.items[1].text == "The park will open next spring and cost two million dollars."
    assert ex.items[3].title == "Passage 2"
    assert ex.references == ("The council approved a two-million-dollar park that opens next spring.\n"
                             "Building starts in autumn.",)
    passages = load_summary_examples(FIXTURES / "multi_news_mini.jsonl", unit="passage")
    assert [len(e.items) for e in passages] == [2, 1]
    assert "NEWLINE_CHAR" not in passages[0].items[0].text
    with pytest.raises(InputError):
        load_summary_examples(FIXTURES / "multi_news_mini.jsonl", unit="sentence")


def test_longbench_helpers() -> None:
    assert clean_longbench("a NEWLINE_CHAR NEWLINE_CHAR b NEWLINE_CHAR ") == "a\n\nb"
    assert split_passages("Passage 1:\nx\nPassage 2:\ny") == [(1, "x\n"), (2, "y")]
    assert split_passages("no markers") == [(1, "no markers")]
    assert split_passages("  ") == []


def test_bad_jsonl_line_is_reported(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "Passage 1:\\nx"}\n')
    with pytest.raises(InputError, match="bad.jsonl:1"):
        load_summary_examples(bad)
