"""The input and budget contract, case by case, through the CLI, Python and /v1/compress (README: CLI contract)."""

from __future__ import annotations

import gzip
import json
import os
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from ragzip import Budget, RagZip
from ragzip.batch import iter_jsonl
from ragzip.cli import app
from ragzip.compressors.registry import get_compressor
from ragzip.errors import BudgetError, InputError
from ragzip.server.app import create_app
from ragzip.server.config import ServerConfig
from ragzip.tokens import get_token_counter

GOOD = {"id": "q1", "question": "Where does the Rhine end?", "contexts": [
    {"id": "a", "title": "Rhine", "text": "The Rhine rises in the Swiss Alps. It ends in the North Sea. It is long."},
    {"id": "b", "text": "Paris is the capital of France. It has many museums and a tower."}]}
OTHER = {"id": "q2", "question": "What is oxygen?", "contexts": [
    {"text": "Oxygen is a chemical element. Its symbol is O. It has atomic number 8."}]}


def line(obj: object) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def run(*args: str, stdin: bytes | None = None) -> tuple[int, str]:
    res = CliRunner().invoke(app, ["compress", *args], input=stdin)
    return res.exit_code, res.output


def rows(path: Path) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return [json.loads(x) for x in fh if x.strip()]


# ---------------------------------------------------------------- bad lines: reported with file:line, skipped
def test_every_kind_of_bad_line_is_reported_with_file_and_line_and_skipped(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + line(GOOD)  # a UTF-8 BOM before line 1
                    + b'{"id": "bad-utf8", "contexts": [{"text": "caf\xe9"}]}\n'  # latin-1, not UTF-8
                    + b'{"id": "x", "contexts": [}\n'  # invalid JSON
                    + b'{"id": "cut", "question": "wh\n'  # cut off
                    + line({"id": "t", "question": 5, "contexts": []})  # wrong type
                    + line([1, 2])  # not an object
                    + b"\n"
                    + line(OTHER))
    out = tmp_path / "out.jsonl"
    code, output = run(str(src), "-o", str(out), "-m", "truncate", "--rate", "0.5")
    assert code == 0, output
    assert [r["id"] for r in rows(out)] == ["q1", "q2"]
    column = src.read_bytes().splitlines()[1].index(b"\xe9") + 1
    assert f"{src}:2: invalid UTF-8 at byte column {column}" in output
    assert f"{src}:3: invalid JSON at column 26" in output
    assert f"{src}:4: invalid JSON" in output and "cut off" in output
    assert f"{src}:5: 'question' must be a string" in output
    assert f"{src}:6: expected a JSON object" in output
    assert "2 compressed, 5 bad lines skipped" in output
    code, output = run(str(src), "-o", str(tmp_path / "o2.jsonl"), "-m", "truncate", "--on-error", "fail")
    assert code == 1 and f"{src}:2:" in output and f"{src}:3:" not in output


def test_gzip_input_stdin_and_stdout_and_gzip_output(tmp_path: Path) -> None:
    gz = tmp_path / "in.jsonl.gz"
    gz.write_bytes(gzip.compress(line(GOOD) + line(OTHER)))
    out = tmp_path / "out.jsonl.gz"
    code, output = run(str(gz), "-o", str(out), "-m", "truncate", "--rate", "0.5")
    assert code == 0, output
    expected = rows(out)
    assert [r["id"] for r in expected] == ["q1", "q2"]
    code, output = run("-", "-o", "-", "-m", "truncate", "--rate", "0.5", stdin=line(GOOD) + line(OTHER))
    assert code == 0
    streamed = [json.loads(x) for x in output.splitlines() if x.startswith("{")]
    assert [r["compressed"]["text"] for r in streamed] == [r["compressed"]["text"] for r in expected]


def test_records_stream_one_at_a_time() -> None:
    """The reader hands out line 1 while the rest of the input has not even been written (a pipe)."""
    read_fd, write_fd = os.pipe()
    os.write(write_fd, line(GOOD))
    saved = sys.stdin
    sys.stdin = os.fdopen(read_fd, "r")
    try:
        records = iter_jsonl("-")
        assert next(records)[1]["id"] == "q1"  # would block forever if the reader read to the end first
        os.write(write_fd, line(OTHER))
        os.close(write_fd)
        assert [obj["id"] for _, obj, _ in records] == ["q2"]
    finally:
        sys.stdin.close()
        sys.stdin = saved


def test_output_equal_to_input_or_unwritable_is_refused_and_nothing_is_lost(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(line(GOOD))
    code, output = run(str(src), "-o", str(src), "-m", "truncate")
    assert code == 2 and "is the input file" in output and src.read_bytes() == line(GOOD)
    code, output = run(str(src), "-o", str(tmp_path / "missing" / "out.jsonl"), "-m", "truncate")
    assert code == 2 and "cannot write" in output and "Traceback" not in output
    code, output = run(str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "o.jsonl"), "-m", "truncate")
    assert code == 2 and "does not exist" in output


# ---------------------------------------------------------------- --resume checks what the output holds
def test_resume_refuses_another_input_method_or_budget(tmp_path: Path) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(line(GOOD) + line(OTHER))
    assert run(str(src), "-o", str(out), "-m", "truncate", "--rate", "0.5")[0] == 0
    before = out.read_bytes()
    other = tmp_path / "other.jsonl"
    other.write_bytes(line({**GOOD, "id": "z"}) + line(OTHER))
    for args, why in [((str(other), "-m", "truncate", "--rate", "0.5"), "written from another input"),
                      ((str(src), "-m", "random", "--rate", "0.5"), "written with method 'truncate'"),
                      ((str(src), "-m", "truncate", "--rate", "0.3"), "written with budget {'rate': 0.5}"),
                      ((str(src), "-m", "truncate", "--rate", "0.5", "--tokenizer", "whitespace"),
                       "written with tokenizer 'default-llm'")]:
        code, output = run(args[0], "-o", str(out), *args[1:], "--resume")
        assert code == 2 and why in output, output
        assert out.read_bytes() == before  # untouched
    code, output = run(str(src), "-o", str(out), "-m", "truncate", "--rate", "0.5", "--resume")
    assert code == 0 and "2 already done" in output and out.read_bytes() == before
    seeded = tmp_path / "seeded.jsonl"
    assert run(str(src), "-o", str(seeded), "-m", "random", "--rate", "0.5", "-O", "seed=1")[0] == 0
    code, output = run(str(src), "-o", str(seeded), "-m", "random", "--rate", "0.5", "-O", "seed=2", "--resume")
    assert code == 2 and "written with options {'seed': '1'}" in output, output
    code, output = run(str(src), "-o", "-", "-m", "truncate", "--resume")
    assert code == 2 and "not stdout" in output
    code, output = run("-", "-o", str(out), "-m", "truncate", "--rate", "0.5", "--resume", stdin=line(GOOD))
    assert code == 2 and "not stdin" in output and out.read_bytes() == before


# ---------------------------------------------------------------- budgets: exact, filled, a pipeline file's own
def test_pipeline_file_budget_holds_from_the_cli_and_python(tmp_path: Path) -> None:
    config = tmp_path / "pipe.json"
    config.write_text(json.dumps({"stages": [{"method": "embed-topk"}, {"method": "truncate"}],
                                  "budget": {"target_tokens": 12}}))
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(line(GOOD) + line(OTHER))
    code, output = run(str(src), "-o", str(out), "-m", str(config))
    assert code == 0, output
    counter = get_token_counter(None)
    for row in rows(out):
        c = row["compressed"]
        assert c["budget"] == {"target_tokens": 12}
        assert c["tokens_after"] == counter.count(c["text"]) <= 12
        assert c["stages"][0]["budget_source"] == "derived" and c["stages"][1]["budget_source"] == "final"
    result = RagZip(str(config)).compress(GOOD["question"], GOOD["contexts"])
    assert counter.count(result.text) == result.tokens_after <= 12
    wider = RagZip(str(config)).compress(GOOD["question"], GOOD["contexts"], target_tokens=30)  # a call's budget wins
    assert 12 < wider.tokens_after <= 30


@pytest.mark.parametrize("method", ["truncate", "random", "embed-topk", "exit", "lingua2", "crag",
                                    "crag+exit+lingua2"])
def test_the_text_sent_to_the_llm_fits_the_cap_and_fills_it(method: str) -> None:
    """`count(result.text) <= cap` with the separators, and the cap is used up to within one unit."""
    counter = get_token_counter(None)
    docs = [c["text"] for c in GOOD["contexts"]] * 3  # six documents: five separators
    docs = [f"{t} Number {i} is here." for i, t in enumerate(docs)]
    rz = RagZip(method)
    for budget in (Budget.tokens(40), Budget.ratio(0.5)):
        result = rz.compress(GOOD["question"], docs, budget)
        limit = budget.token_limit(counter.count("\n\n".join(docs)))
        assert result.tokens_before == counter.count("\n\n".join(docs))
        assert result.tokens_after == counter.count(result.text) <= limit, (method, budget)
        unit = max(counter.count_batch([s for d in docs for s in d.split(". ")]))  # the longest sentence
        assert limit - result.tokens_after <= unit + 1, (method, budget, result.tokens_after, limit)
        assert result.rate == pytest.approx(result.tokens_after / result.tokens_before)


def test_blank_documents_count_nothing_and_an_empty_input_has_no_rate() -> None:
    result = RagZip("none").compress("q", ["   ", "\n\t", "Real text here."])
    counter = get_token_counter(None)
    assert result.tokens_before == result.tokens_after == counter.count("Real text here.")
    assert result.text == "Real text here." and result.input_tokens["0"] == 0
    empty = RagZip("truncate").compress("q", [], Budget.ratio(0.5))
    assert empty.rate is None and empty.to_contract()["rate"] is None and empty.text == ""


# ---------------------------------------------------------------- Python: the budget as users write it
def test_compress_takes_the_budget_in_every_plain_form() -> None:
    rz = RagZip("truncate", tokenizer="whitespace")
    docs = GOOD["contexts"]
    full = rz.compress("q", docs).tokens_before
    assert rz.compress("q", docs, rate=0.5).tokens_after == rz.compress("q", docs, Budget.ratio(0.5)).tokens_after
    assert rz.compress("q", docs, 0.5).tokens_after <= full // 2
    assert rz.compress("q", docs, 5).tokens_after == rz.compress("q", docs, target_tokens=5).tokens_after == 5
    assert rz.compress("q", docs, {"target_tokens": 4}).tokens_after == 4
    assert rz.compress(None, docs, 3).tokens_after == 3  # no question
    for bad in ("0.3", True, [0.3], 1.5, 0, -2):
        with pytest.raises(BudgetError):
            rz.compress("q", docs, bad)  # type: ignore[arg-type]
    with pytest.raises(BudgetError, match="not both"):
        rz.compress("q", docs, Budget.ratio(0.5), rate=0.5)
    with pytest.raises(BudgetError, match="must be a number"):
        Budget.ratio("0.3")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="'question' must be a string"):
        rz.compress(5, docs)  # type: ignore[arg-type]
    with pytest.raises(BudgetError, match="does not take a threshold"):
        rz.compress("q", docs, threshold=0.5)


def test_every_compressor_accepts_what_ragzip_accepts_and_spans_come_as_pairs() -> None:
    counter = get_token_counter("whitespace")
    for name in ("none", "truncate", "random", "embed-topk", "exit", "lingua2", "crag"):
        comp = get_compressor(name, counter=counter)
        result = comp.compress(None, ["The Rhine ends in the North Sea. It is long.", {"id": "p", "text": "Paris."}],
                               target_tokens=6)
        assert result.tokens_after == counter.count(result.text) <= (11 if name == "none" else 6), name
        for d in result.documents:
            source = {"0": "The Rhine ends in the North Sea. It is long.", "p": "Paris."}[d.id] \
                if not d.members or d.id in ("0", "p") else None
            for (start, end), (a, b) in zip(d.span_pairs, d.offsets):
                assert source is not None and source[start:end] == d.text[a:b]
        with pytest.raises(InputError):
            comp.compress("q", [{"title": "no text"}])


# ---------------------------------------------------------------- /v1/compress: the same budget contract
def test_http_compress_meets_the_cap_exactly_and_refuses_bad_budgets() -> None:
    config = ServerConfig(upstream="http://127.0.0.1:9/v1", method="truncate")  # type: ignore[call-arg]
    counter = get_token_counter(None)
    with TestClient(create_app(config)) as client:
        r = client.post("/v1/compress", json={**GOOD, "ragzip": {"target_tokens": 9}})
        assert r.status_code == 200, r.text
        c = r.json()["compressed"]
        assert c["tokens_after"] == counter.count(c["text"]) <= 9
        r = client.post("/v1/compress", json={**GOOD, "ragzip": {"rate": "half"}})
        assert r.status_code == 400 and "rate" in r.text
        r = client.post("/v1/compress", json={**GOOD, "ragzip": {"threshold": 0.5}})
        assert r.status_code == 400 and "threshold" in r.text
