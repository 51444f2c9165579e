"""What a new user hit on a fresh clone (issue 38), each through the surface they used: the CLI as a subprocess,
Python, and (in tests/server) HTTP with the openai SDK."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ragzip import RagZip
from ragzip.cli import app
from ragzip.errors import InputError
from ragzip.types import Document

RAGZIP = [sys.executable, "-m", "ragzip.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
GOOD = {"question": "Where does the Rhine end?", "contexts": ["The Rhine ends in the North Sea. It is long."]}
# A lone UTF-16 surrogate: valid JSON, no valid Unicode (json.dumps writes it as the escape "\ud800").
SURROGATE = {"question": "Where?", "contexts": ["Paris\ud800 is in France."]}


def test_a_lone_surrogate_is_one_bad_line_and_the_run_goes_on(tmp_path: Path) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(json.dumps({**r, "id": str(i)}) for i, r in enumerate([GOOD, SURROGATE, GOOD]))
                   + "\n", encoding="utf-8")
    proc = subprocess.run([*RAGZIP, "compress", str(src), "-o", str(out), "-m", "truncate", "--rate", "0.5"],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and f"{src}:2:" in proc.stderr and "surrogate" in proc.stderr
    assert [json.loads(line)["id"] for line in out.read_text(encoding="utf-8").splitlines()] == ["0", "2"]


@pytest.mark.parametrize("where", ["text", "title", "question", "passthrough"])
def test_a_lone_surrogate_is_an_input_error_in_python(where: str) -> None:
    rz = RagZip("truncate")  # the default tokenizer: a Rust tokenizer that raised TypeError on it
    bad = "Paris\ud800"
    docs: list[object] = [{"text": bad if where == "text" else "Paris.", "title": bad if where == "title" else ""}]
    with pytest.raises(InputError, match="surrogate"):
        if where == "passthrough":
            from ragzip.contract import parse_record

            parse_record({"contexts": ["Paris."], "answer": bad})  # would not be writable to the output
        else:
            rz.compress(bad if where == "question" else "Where?", docs, rate=0.5)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="surrogate"):
        rz.compress("Where?", [Document("d", bad)], rate=0.5)


def test_a_cut_off_line_names_the_column_where_it_ends(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    cut = '{"question": "Where?", "contexts": ['
    src.write_text(json.dumps(GOOD) + "\n" + cut + "\n", encoding="utf-8")
    res = CliRunner().invoke(app, ["compress", str(src), "-o", str(tmp_path / "o.jsonl"), "-m", "truncate",
                                   "--rate", "0.5", "--tokenizer", "whitespace"])
    assert res.exit_code == 0, res.output
    assert f"invalid JSON at column {len(cut) + 1}:" in res.output and f"ends at column {len(cut)}" in res.output


def test_index_append_of_files_without_ids(tmp_path: Path) -> None:
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text(json.dumps({"text": "The Eiffel Tower is in Paris."}) + "\n"
                     + json.dumps({"text": "Oxygen has atomic number 8."}) + "\n", encoding="utf-8")
    second.write_text(json.dumps({"text": "The Rhine ends in the North Sea."}) + "\n"
                      + json.dumps({"text": "The Rhine ends in the North Sea."}) + "\n"  # a verbatim repeat
                      + json.dumps({"contexts": ["Bread is baked.", "Rome is in Italy."]}) + "\n", encoding="utf-8")
    idx = tmp_path / "idx"
    runner = CliRunner()
    assert runner.invoke(app, ["index", str(first), "-o", str(idx)]).exit_code == 0
    res = runner.invoke(app, ["index", str(second), "-o", str(idx), "--append"])
    assert res.exit_code == 0, res.output
    assert "indexed 3 documents" in res.output and "(5 chunks in" in res.output
    ids = [json.loads(line)["id"] for line in (idx / "documents.jsonl").read_text().splitlines()]
    assert len(set(ids)) == 5 and all(i.startswith("doc-") for i in ids)
    res = runner.invoke(app, ["index", str(first), "-o", str(idx), "--append"])  # the same file again
    assert res.exit_code == 0 and "2 already indexed" in res.output and "(5 chunks in" in res.output
