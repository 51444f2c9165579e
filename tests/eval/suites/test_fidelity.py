from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import pytest

from ragzip.budget import Budget
from ragzip.errors import ConfigError
from ragzip.eval.metrics import paired_bootstrap_ci
from ragzip.eval.suites.fidelity import parse_methods, run
from ragzip.types import Document

DATA = Path(__file__).parent.parent.parent / "fixtures" / "report_data"
HOTPOT = DATA / "hotpotqa_train_hipporag100"
ROW_KEYS = {"method", "budget", "tokens_kept", "answer_survival", "support_recall", "em", "f1", "f1_delta",
            "f1_delta_ci", "nll", "nll_delta"}


def test_method_items_parse_rates_token_caps_thresholds_and_pipelines() -> None:
    specs = parse_methods("none, exit@0.33,embed-topk@200,exit@t0.5,lingua2,exit+lingua2@0.2,exit@0.33")
    assert [s.label for s in specs] == ["none", "exit@0.33", "embed-topk@200", "exit@t0.5", "lingua2",
                                        "exit+lingua2@0.2"]  # the repeated item is dropped
    assert specs[1].budget == Budget.ratio(0.33)
    assert specs[2].budget == Budget.tokens(200)
    assert specs[3].budget == Budget.score(0.5)
    assert specs[4].budget == Budget() and not specs[4].has_token_budget
    assert specs[5].method == "exit+lingua2"


@pytest.mark.parametrize("bad", ["exit@abc", "exit@1.5", "exit@0", "@0.3", "", "exit@t"])
def test_bad_method_items_are_config_errors(bad: str) -> None:
    with pytest.raises(ConfigError):
        parse_methods(bad)


def test_paired_bootstrap_ci_brackets_the_mean_and_separates_a_clear_gain() -> None:
    lo, hi = paired_bootstrap_ci([5.0] * 30)
    assert lo == hi == 5.0
    diffs = [1.0, 0.0, 2.0, 1.0, 0.5, 1.5] * 10
    lo, hi = paired_bootstrap_ci(diffs, seed=1)
    assert 0 < lo < sum(diffs) / len(diffs) < hi
    lo, hi = paired_bootstrap_ci([1.0, -1.0] * 20)
    assert lo < 0 < hi
    assert all(math.isnan(x) for x in paired_bootstrap_ci([]))


def test_reader_nll_equals_a_single_full_forward(tiny_reader: str) -> None:
    import torch

    from ragzip.eval.reader import Reader

    reader = Reader(tiny_reader, dtype="float32")
    docs = [Document("1", "Paris is the capital of France.", "France")]
    out = reader.read("What is the capital of France?", docs, ["Paris", "the city of Paris"])
    prompt = reader.engine.prompt_ids("What is the capital of France?", docs)
    best = math.inf
    for answer in ("Paris", "the city of Paris"):
        ids = reader.tokenizer(answer, add_special_tokens=False)["input_ids"] + [reader.tokenizer.eos_token_id]
        with torch.inference_mode():
            logits = reader.engine.model(input_ids=torch.tensor([prompt + ids])).logits[0]
        logp = torch.log_softmax(logits[len(prompt) - 1:-1].float(), dim=-1)
        best = min(best, float(-logp[torch.arange(len(ids)), torch.tensor(ids)].mean()))
    assert out.nll == pytest.approx(best, rel=1e-4)
    assert out.prompt_tokens == len(prompt)
    again = reader.read("What is the capital of France?", docs, ["Paris", "the city of Paris"])
    assert again == out  # greedy and deterministic, and the shared prefill did not leak state between answers


def test_suite_rows_keys_references_and_cache(tiny_reader: str, tmp_path: Path) -> None:
    cache = tmp_path / "reads.sqlite"
    options = {"methods": "none,exit@0.33,lingua2@0.5,exit", "reader": tiny_reader, "cache": str(cache),
               "dtype": "float32", "max_new_tokens": "4"}
    res = run(HOTPOT, limit=2, seed=0, options=options)
    assert res["reader"] == tiny_reader and res["n"] == 2
    rows = {r["label"]: r for r in res["rows"]}
    # none first; random and embed-topk at every token budget, and at the rate a budget-less method achieved
    assert res["rows"][0]["label"] == "none"
    matched = f"{round(rows['exit']['rate'], 2):g}"
    assert {"exit@0.33", "random@0.33", "embed-topk@0.33", "lingua2@0.5", "random@0.5", "embed-topk@0.5", "exit",
            f"random@{matched}", f"embed-topk@{matched}"} <= set(rows)
    none = rows["none"]
    for r in res["rows"]:
        assert ROW_KEYS <= set(r), r["label"]
        assert r["n"] == 2
        # each row's delta is paired against the uncompressed row, not against itself or another method
        assert r["f1_delta"] == pytest.approx(r["f1"] - none["f1"], abs=1e-6), r["label"]
        assert r["nll_delta"] == pytest.approx(r["nll"] - none["nll"], abs=1e-3), r["label"]
    assert len({round(r["nll"], 4) for r in res["rows"]}) > 2  # the reader's NLL tells the contexts apart
    assert none["rate"] == 1.0 and none["answer_survival"] == 1.0
    assert none["support_recall"] == 1.0 and math.isfinite(none["nll"])
    for label in ("exit@0.33", "random@0.33", "embed-topk@0.33"):
        assert rows[label]["tokens_kept"] <= 0.34 * none["tokens_kept"] + 1
        assert rows[label]["rate"] < 0.4
    assert rows["exit@0.33"]["support_recall"] > rows["random@0.33"]["support_recall"]
    vs = rows["exit@0.33"]["vs_embed_topk"]
    assert set(vs) == {"f1_delta", "f1_delta_ci", "nll_delta", "nll_delta_ci"}
    assert vs["f1_delta"] == pytest.approx(rows["exit@0.33"]["f1"] - rows["embed-topk@0.33"]["f1"])
    assert "vs_embed_topk" in rows["exit"] and "vs_embed_topk" not in rows["none"]
    assert "vs_embed_topk" not in rows["embed-topk@0.33"]
    # Answers came from the reader; a rerun reads them from the cache (marked rows prove it).
    with sqlite3.connect(cache) as db:
        assert db.execute("SELECT COUNT(*) FROM reads").fetchone()[0] >= 2
        db.execute("UPDATE reads SET answer = 'Martha Burns'")
    again = run(HOTPOT, limit=2, seed=0, options=options)
    assert {a["answer"] for qs in again["answers"].values() for a in qs} == {"Martha Burns"}
    assert next(r for r in again["rows"] if r["label"] == "none")["f1"] == 50.0  # right on one of two questions
    # ... but only for the same reads: another generation length is another read, never served from the cache
    other = run(HOTPOT, limit=2, seed=0, options={**options, "max_new_tokens": "3"})
    assert "Martha Burns" not in {a["answer"] for qs in other["answers"].values() for a in qs}


def test_exclude_trained_skips_the_scorers_training_questions(tiny_reader: str, tmp_path: Path) -> None:
    from ragzip.eval.suites.extractive import trained_ids

    records = [json.loads(line) for line in (HOTPOT / "normalized.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(records) == 2 and not {r["id"] for r in records} & trained_ids()
    records[1]["id"] = sorted(trained_ids())[0]  # a question the shipped EXIT scorer was trained on
    data = tmp_path / "normalized.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    options = {"methods": "none", "reader": tiny_reader, "cache": "0", "dtype": "float32", "max_new_tokens": "2"}
    assert run(data, limit=None, seed=0, options=options)["n"] == 1
    assert run(data, limit=None, seed=0, options={**options, "exclude_trained": "0"})["n"] == 2


def test_suite_rejects_unknown_options_and_bad_data(tiny_reader: str, tmp_path: Path) -> None:
    from ragzip.errors import InputError

    with pytest.raises(ConfigError, match=r"unknown option\(s\)"):
        run(HOTPOT, limit=1, seed=0, options={"reder": tiny_reader})
    empty = tmp_path / "normalized.jsonl"
    empty.write_text('{"id": "x", "question": "q?", "answers": ["a"], "contexts": []}\n')
    with pytest.raises(InputError):
        run(tmp_path, limit=1, seed=0, options={"reader": tiny_reader, "cache": "0"})


@pytest.mark.slow
def test_real_half_billion_reader_answers_and_scores_three_questions(tmp_path: Path) -> None:
    # setup installs the 0.5B reader (the `readers` extra is part of `all`): missing is a failure, not a skip
    data = tmp_path / "normalized.jsonl"
    squad = (DATA / "squad_v1.1_dev" / "normalized.jsonl").read_text()
    data.write_text(squad + (HOTPOT / "normalized.jsonl").read_text())
    res = run(data, limit=3, seed=0, options={"methods": "none,exit@0.5", "reader": "qwen2.5-coder-0.5b-instruct",
                                              "cache": str(tmp_path / "c.sqlite")})
    none = res["rows"][0]
    assert res["n"] == 3
    assert none["f1"] > 30 and none["nll"] < 3.0  # a reader that can answer (the 135M one scores ~10 here)
    assert {r["label"] for r in res["rows"]} >= {"exit@0.5", "random@0.5", "embed-topk@0.5"}
