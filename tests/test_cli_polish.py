"""What a user sees of the command line: version, plain help, quiet third-party output, progress and summary
lines fit for logs, and `ragzip serve` flags."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from ragzip.cli import app
from ragzip.eval.harness import free_port

RAGZIP = [sys.executable, "-m", "ragzip.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "40"}
RECORD = {"id": "q", "question": "Where does the Rhine end?",
          "contexts": ["The Rhine rises in the Swiss Alps. It ends in the North Sea.", "Paris is in France."]}


def test_version_is_the_installed_one() -> None:
    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.strip() == f"ragzip {importlib.metadata.version('ragzip')}"


@pytest.mark.parametrize("command", [["compress"], ["serve"], ["kv", "warm"], ["eval"]])
def test_help_shows_flags_without_a_type(command: list[str]) -> None:
    res = CliRunner().invoke(app, [*command, "--help"])
    assert res.exit_code == 0
    assert "<bool>" not in res.stdout and "╭" not in res.stdout


def test_plain_progress_lines_off_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ragzip.progress.PLAIN_EVERY_S", 0.0)
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({**RECORD, "id": str(i)}) for i in range(3)) + "\n", encoding="utf-8")
    res = CliRunner().invoke(app, ["compress", str(src), "-o", str(tmp_path / "out.jsonl"), "-m", "truncate",
                                   "--rate", "0.5", "--tokenizer", "whitespace"])
    assert res.exit_code == 0, res.output
    lines = res.stderr.splitlines()
    assert [ln.split(" (")[0] for ln in lines if ln.startswith("compressing:")] == [
        f"compressing: {i} line {i}, 0 bad" for i in (1, 2, 3)]
    assert "\x1b[" not in res.stderr  # no terminal control codes in a log


def test_the_summary_is_one_line_however_narrow_the_terminal(tmp_path: Path) -> None:
    src = tmp_path / ("a-rather-long-input-file-name-" * 3 + ".jsonl")
    src.write_text(json.dumps(RECORD) + "\n", encoding="utf-8")
    proc = subprocess.run([*RAGZIP, "compress", str(src), "-o", str(tmp_path / "out.jsonl"), "-m", "lingua2",
                           "--rate", "0.5", "--tokenizer", "whitespace"], env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    # one line, and no transformers "Loading weights" bar or info logs unless --verbose
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("1 compressed, 0 bad lines skipped, 0 already done; tokens ")
    assert len(lines[0]) > 40


def test_serve_flags_set_method_budget_tokenizer_and_keys(tmp_path: Path) -> None:
    port = free_port()
    env = {**ENV, "PROXY_KEYS": "sk-a, sk-b"}
    proc = subprocess.Popen([*RAGZIP, "serve", "--port", str(port), "--upstream", "http://127.0.0.1:9/v1",
                             "--method", "truncate", "--target-tokens", "6", "--tokenizer", "cl100k_base",
                             "--api-key-env", "PROXY_KEYS"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"{url}/healthz", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
                time.sleep(0.2)
        body = {"question": "Where?", "contexts": ["The Rhine rises in the Swiss Alps and ends in the North Sea."]}
        assert httpx.post(f"{url}/v1/compress", json=body).status_code == 401
        r = httpx.post(f"{url}/v1/compress", json=body, headers={"authorization": "Bearer sk-b"})
        assert r.status_code == 200, r.text
        c = r.json()["compressed"]
        assert c["method"] == "truncate" and 0 < c["tokens_after"] <= 6
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("args, message", [
    (["--method", "bogus"], "unknown method 'bogus'"),
    (["--rate", "0.5", "--target-tokens", "10"], "at most one of rate and target_tokens"),
    (["--api-key-env", "RAGZIP_TEST_UNSET_VARIABLE"], "RAGZIP_TEST_UNSET_VARIABLE is not set"),
])
def test_serve_refuses_a_bad_setting_before_starting(args: list[str], message: str) -> None:
    res = CliRunner().invoke(app, ["serve", "--upstream", "http://127.0.0.1:9/v1", *args])
    assert res.exit_code == 2 and message in res.stderr


@pytest.mark.parametrize("how", ["flag", "env"])
def test_a_device_the_machine_lacks_is_refused_before_reading_input(how: str, tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(RECORD) + "\n", encoding="utf-8")
    args = ["compress", str(src), "-o", str(tmp_path / "out.jsonl"), "-m", "exit", "--tokenizer", "whitespace"]
    res = CliRunner().invoke(app, [*args, "--device", "bogus"] if how == "flag" else args,
                             env={"RAGZIP_DEVICE": "bogus"} if how == "env" else None)
    assert res.exit_code == 2 and "unknown device 'bogus'" in res.stderr
    assert not (tmp_path / "out.jsonl").exists()
