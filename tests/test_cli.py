from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ragzip.cli import app

RECORDS = [
    {"id": "q1", "question": "Where does the Rhine end?", "contexts": [
        {"id": "a", "title": "Rhine",
         "text": "The Rhine rises in the Swiss Alps. It ends in the North Sea. It is long."},
        {"title": "Paris", "text": "Paris is the capital of France. It has many museums."}]},
    {"id": "q2", "question": "What is oxygen?", "contexts": [
        {"text": "Oxygen is a chemical element. Its symbol is O. It has atomic number 8."}]},
]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.parametrize("method", ["truncate", "random", "embed-topk", "embed-topk+truncate"])
def test_compress_contract_end_to_end(method: str, tmp_path: Path) -> None:
    src = _write(tmp_path / "in.jsonl", [json.dumps(r) for r in RECORDS])
    out = tmp_path / "out.jsonl"
    res = CliRunner().invoke(app, ["compress", str(src), "-o", str(out), "--method", method, "--rate", "0.5"])
    assert res.exit_code == 0, res.output
    rows = _read(out)
    assert [r["id"] for r in rows] == ["q1", "q2"]
    for row, record in zip(rows, RECORDS):
        c = row["compressed"]
        assert {"method", "contexts", "text", "tokens_before", "tokens_after", "rate", "seconds"} <= set(c)
        assert 0 < c["tokens_after"] <= max(1, int(0.5 * c["tokens_before"]))
        assert c["contexts"], "never an empty context"
        originals = {ctx.get("id", str(i)): ctx["text"] for i, ctx in enumerate(record["contexts"])}
        for ctx in c["contexts"]:
            for start, end in ctx["spans"]:
                assert originals[ctx["id"]][start:end] in ctx["text"]


def test_lingua2_cli_is_query_aware_drops_empty_contexts_and_keeps_table_rows(tmp_path: Path) -> None:
    table = "| river | sea |\n|---|---|\n| Rhine | North Sea |\n| Danube | Black Sea |"
    record = {"id": "t", "question": "Into which sea does the Danube flow?", "contexts": [
        {"id": "tab", "text": f"Rivers and where they end, as a table:\n{table}\nMore filler words follow here."},
        {"id": "far", "text": "Unrelated filler about cooking pasta with salt and a lot of boiling water."}]}
    src = _write(tmp_path / "in.jsonl", [json.dumps(record)])
    out = tmp_path / "out.jsonl"
    res = CliRunner().invoke(app, ["compress", str(src), "-o", str(out), "--method", "lingua2",
                                   "--target-tokens", "30"])
    assert res.exit_code == 0, res.output
    c = _read(out)[0]["compressed"]
    assert c["tokens_after"] <= 30 and c["stages"][0]["query_aware"] is True
    assert all(ctx["text"] and ctx["spans"] for ctx in c["contexts"])  # nothing-kept contexts are dropped
    kept = c["contexts"][0]["text"]
    assert "| Danube | Black Sea |" in kept and "| river | sea |\n|---|---|" in kept  # whole row, with its header


def test_bad_lines_are_reported_with_line_numbers(tmp_path: Path) -> None:
    src = _write(tmp_path / "in.jsonl", [json.dumps(RECORDS[0]), "{not json", json.dumps({"id": "x"}),
                                         json.dumps(RECORDS[1])])
    out = tmp_path / "out.jsonl"
    res = CliRunner().invoke(app, ["compress", str(src), "-o", str(out), "-m", "truncate", "--rate", "0.5"])
    assert res.exit_code == 0
    assert ":2:" in res.output and ":3:" in res.output and "contexts" in res.output
    assert [r["id"] for r in _read(out)] == ["q1", "q2"]
    res = CliRunner().invoke(app, ["compress", str(src), "-o", str(out), "-m", "truncate", "--on-error", "fail"])
    assert res.exit_code == 1


def test_resume_skips_done_lines_and_repairs_a_partial_line(tmp_path: Path) -> None:
    src = _write(tmp_path / "in.jsonl", [json.dumps(r) for r in RECORDS])
    out = tmp_path / "out.jsonl"
    runner = CliRunner()
    assert runner.invoke(app, ["compress", str(src), "-o", str(out), "-m", "truncate", "--rate", "0.5"]).exit_code == 0
    lines = out.read_text().splitlines()
    out.write_text(lines[0] + "\n" + lines[1][:20])  # interrupted while writing the second record
    res = runner.invoke(app, ["compress", str(src), "-o", str(out), "-m", "truncate", "--rate", "0.5", "--resume"])
    assert res.exit_code == 0, res.output
    assert [r["id"] for r in _read(out)] == ["q1", "q2"]


def test_unknown_method_and_bad_budget_are_clear_errors(tmp_path: Path) -> None:
    src = _write(tmp_path / "in.jsonl", [json.dumps(RECORDS[0])])
    res = CliRunner().invoke(app, ["compress", str(src), "-o", str(tmp_path / "o.jsonl"), "-m", "nope"])
    assert res.exit_code == 2 and "unknown compressor" in res.output
    res = CliRunner().invoke(app, ["compress", str(src), "-o", str(tmp_path / "o.jsonl"), "-m", "truncate",
                                   "--rate", "0.5", "--target-tokens", "3"])
    assert res.exit_code == 2 and "exactly one" in res.output


def test_index_and_ask(tmp_path: Path) -> None:
    docs = _write(tmp_path / "docs.jsonl", [json.dumps({"id": "t", "title": "Tower",
                                                        "text": "The Eiffel Tower is in Paris, France."}),
                                            json.dumps({"id": "o", "text": "Oxygen has atomic number 8."})])
    res = CliRunner().invoke(app, ["index", str(docs), "-o", str(tmp_path / "idx")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["index", str(docs), "-o", str(tmp_path / "idx"), "--append"])
    assert res.exit_code == 0 and "2 already indexed" in res.output and "(2 chunks in" in res.output
    changed = _write(tmp_path / "changed.jsonl", [json.dumps({"id": "t", "text": "The tower moved to Lyon."})])
    res = CliRunner().invoke(app, ["index", str(changed), "-o", str(tmp_path / "idx"), "--append"])
    assert res.exit_code == 2 and "already in the index" in res.output
    res = CliRunner().invoke(app, ["ask", "In which city is the Eiffel Tower?", "--index", str(tmp_path / "idx"),
                                   "-k", "1", "-m", "none", "--max-new-tokens", "12"])
    assert res.exit_code == 0, res.output
    assert "Paris" in res.output


def test_kv_warm_then_ask_hits_every_retrieved_chunk(tmp_path: Path) -> None:
    from ragzip.kvstore.cli import app as kv_app

    docs = _write(tmp_path / "docs.jsonl", [json.dumps({"id": "t", "title": "Tower",
                                                        "text": "The Eiffel Tower is in Paris, France."}),
                                            json.dumps({"id": "o", "text": "Oxygen has atomic number 8."})])
    assert CliRunner().invoke(app, ["index", str(docs), "-o", str(tmp_path / "idx")]).exit_code == 0
    store = f"disk:{tmp_path / 'kv'}"
    # default codec: kvtc with the default LLM's shipped profile; `ask` decodes it from the blob alone
    res = CliRunner().invoke(kv_app, ["warm", str(tmp_path / "idx" / "documents.jsonl"), "--store", store])
    assert res.exit_code == 0, res.output
    warmed = json.loads(res.stdout.strip().splitlines()[-1])
    assert warmed["stored"] == 2 and warmed["codec"] == "kvtc"
    ask = ["ask", "In which city is the Eiffel Tower?", "--index", str(tmp_path / "idx"), "-k", "2", "-m", "none",
           "--max-new-tokens", "12", "--kv-store", store]
    res = CliRunner().invoke(app, [*ask, "--kv-mode", "blend"])
    assert res.exit_code == 0, res.output
    kv = json.loads(res.output.split("kv ", 1)[1].splitlines()[0])
    assert (kv["hits"], kv["misses"]) == (2, 0) and kv["reused_tokens"] > 0 and kv["mode"] == "blend"
    assert "Paris" in res.output
    # the default, auto: blends only if the gate qualified the model, else answers exactly as full prefill
    auto = CliRunner().invoke(app, ask)
    assert auto.exit_code == 0, auto.output
    kv = json.loads(auto.output.split("kv ", 1)[1].splitlines()[0])
    assert kv["requested"] == "auto" and "qualified" in kv["reason"]
    if kv["mode"] != "blend":
        full = CliRunner().invoke(app, [*ask, "--kv-mode", "full"])
        assert auto.stdout == full.stdout and "not qualified" in kv["reason"]


def test_demo_reports_rate_and_f1_in_its_last_line_with_no_progress_bar_noise(tiny_reader: str) -> None:
    import subprocess
    import sys

    ragzip = Path(sys.executable).parent / "ragzip"  # the installed console script, as a user runs it
    proc = subprocess.run([str(ragzip), "demo", "--llm", tiny_reader], capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"mean rate (\d\.\d\d); answer F1 full (\d\.\d\d) vs compressed (\d\.\d\d) \((\d+) questions\); "
                     r"paired difference ([+-]\d\.\d\d) \(95% CI \[([+-]\d\.\d\d), ([+-]\d\.\d\d)\]\)", last)
    assert m, last
    # The auto default keeps under 0.6 of the tokens on the bundled questions, all of which are scored.
    assert float(m.group(1)) <= 0.6 and int(m.group(4)) == 38
    assert float(m.group(6)) <= float(m.group(5)) <= float(m.group(7))
    assert "Loading weights" not in proc.stderr and "it/s]" not in proc.stderr
    assert "auto(coverage=0.95)" in proc.stderr


def test_eval_fidelity_cli_prints_rows_and_writes_the_json(tiny_reader: str, tmp_path: Path) -> None:
    out = tmp_path / "f.json"
    data = Path(__file__).parent / "fixtures" / "report_data" / "squad_v1.1_dev"
    res = CliRunner().invoke(app, ["eval", "fidelity", "--data", str(data), "--methods", "none,exit@0.5",
                                   "--reader", tiny_reader, "--limit", "2", "--json", str(out),
                                   "-O", "cache=0", "-O", "max_new_tokens=2"])
    assert res.exit_code == 0, res.output
    saved = json.loads(out.read_text())
    assert {"reader", "n", "rows"} <= set(saved) and saved["n"] == 2
    assert [r["label"] for r in saved["rows"]] == ["none", "exit@0.5", "random@0.5", "embed-topk@0.5"]
    assert "embed-topk@0.5" in res.output
    bad = CliRunner().invoke(app, ["eval", "fidelity", "--data", str(data), "--methods", "exit@1.5",
                                   "--reader", tiny_reader])
    assert bad.exit_code == 2 and "rate must be in (0, 1]" in bad.output
    wrong = CliRunner().invoke(app, ["eval", "baselines", "--data", str(data), "--methods", "exit@0.5"])
    assert wrong.exit_code == 2 and "fidelity" in wrong.output


def test_compress_batches_records_and_writes_what_one_at_a_time_writes(tmp_path: Path) -> None:
    """--batch-size 3 (EXIT forwards of 3 records together) writes the rows --batch-size 1 writes, in input order,
    with a bad line between batches reported at its own line."""
    lines = [json.dumps({**RECORDS[i % 2], "id": f"q{i}"}) for i in range(5)]
    lines.insert(3, json.dumps({"id": "bad", "contexts": [{"title": "no text"}]}))
    src = _write(tmp_path / "in.jsonl", lines)
    outs = {}
    for size in ("1", "3"):
        outs[size] = tmp_path / f"out{size}.jsonl"
        res = CliRunner().invoke(app, ["compress", str(src), "-o", str(outs[size]), "-m", "exit", "--rate", "0.5",
                                       "-O", "dtype=float32", "--batch-size", size])
        assert res.exit_code == 0, res.output
        assert ":4:" in res.output and "5 compressed, 1 bad" in res.output
    one, three = _read(outs["1"]), _read(outs["3"])
    assert [r["id"] for r in three] == ["q0", "q1", "q2", "q3", "q4"]
    for a, b in zip(one, three):
        a["compressed"].pop("seconds"), b["compressed"].pop("seconds")
        for s in a["compressed"]["stages"] + b["compressed"]["stages"]:
            s.pop("seconds", None)
        assert a == b
    res = CliRunner().invoke(app, ["compress", str(src), "-o", str(tmp_path / "x.jsonl"), "--batch-size", "0"])
    assert res.exit_code == 2 and "--batch-size" in res.output
