"""`--engine ray` on a local Ray instance: same output as the single-process run, and resumable."""

from __future__ import annotations

import io
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray  # noqa: E402 - the ray extra, installed by setup: missing is a failure, not a skip

from ragzip.batch import output_row
from ragzip.budget import Budget
from ragzip.errors import ConfigError, InputError
from ragzip.pipeline import build_compressor
from ragzip.tokens import get_token_counter


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def write_input(path: Path) -> list[Any]:
    lines: list[Any] = []
    for i in range(23):
        words = " ".join(f"w{i}_{j}" for j in range(12))
        lines.append({"id": f"r{i}", "question": f"q{i}", "contexts": [{"text": f"{words}. Second part {i}."}]})
    lines[5] = {"id": "bad", "contexts": "not a list"}
    text = "\n".join(json.dumps(x) for x in lines) + "\n{broken json\n"
    path.write_text(text, encoding="utf-8")
    return lines


def single_process(lines: list[Any]) -> list[dict[str, Any]]:
    comp = build_compressor("truncate", counter=get_token_counter("whitespace"))
    out = []
    for n, obj in enumerate(lines, 1):
        if obj.get("id") == "bad":
            continue
        out.append(output_row(comp, obj, Budget.ratio(0.5), source_line=n))  # what the CLI writes
    return out


def without_timings(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for row in rows:
        row["compressed"].pop("seconds")
        for st in row["compressed"]["stages"]:
            st.pop("seconds")
    return rows


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
def test_ray_matches_single_process_and_resumes(tmp_path: Path, local_ray: None) -> None:
    from ragzip.batch_ray import run_ray

    lines = write_input(tmp_path / "in.jsonl")
    expected = without_timings(single_process(lines))
    log = io.StringIO()
    counts = run_ray(tmp_path / "in.jsonl", tmp_path / "out.jsonl", method="truncate", budget=Budget.ratio(0.5),
                     tokenizer="whitespace", batch_size=4, log=log)
    assert counts["ok"] == 22 and counts["bad"] == 2 and "in.jsonl:6:" in log.getvalue()
    assert without_timings(read(tmp_path / "out.jsonl")) == expected

    # An interrupted run: 7 lines done and a partial 8th; resume finishes it without duplicates.
    done = (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "part.jsonl").write_text("".join(done[:7]) + done[7][:20], encoding="utf-8")
    counts = run_ray(tmp_path / "in.jsonl", tmp_path / "part.jsonl", method="truncate", budget=Budget.ratio(0.5),
                     tokenizer="whitespace", resume=True, log=io.StringIO())
    assert counts["skipped"] == 7 and counts["ok"] == 15
    assert without_timings(read(tmp_path / "part.jsonl")) == expected

    with pytest.raises(InputError, match="in.jsonl:6"):
        run_ray(tmp_path / "in.jsonl", tmp_path / "fail.jsonl", method="truncate", budget=Budget.ratio(0.5),
                tokenizer="whitespace", on_error="fail", log=io.StringIO())


def test_bad_arguments_fail_before_starting_ray(tmp_path: Path) -> None:
    from ragzip.batch_ray import run_ray

    (tmp_path / "in.jsonl").write_text("{}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="on_error"):
        run_ray(tmp_path / "in.jsonl", tmp_path / "o.jsonl", method="none", budget=Budget(), on_error="maybe")
    with pytest.raises(ConfigError, match="unknown compressor"):
        run_ray(tmp_path / "in.jsonl", tmp_path / "o.jsonl", method="nope", budget=Budget(), tokenizer="whitespace")


@pytest.mark.slow
def test_cli_engine_ray(tmp_path: Path, local_ray: None) -> None:
    from typer.testing import CliRunner

    from ragzip.cli import app

    lines = write_input(tmp_path / "in.jsonl")
    result = CliRunner().invoke(app, ["compress", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"),
                                      "--method", "truncate", "--rate", "0.5", "--tokenizer", "whitespace",
                                      "--engine", "ray"])
    assert result.exit_code == 0, result.output
    assert without_timings(read(tmp_path / "out.jsonl")) == without_timings(single_process(lines))


def test_the_device_reaches_each_worker_and_a_missing_one_fails_before_ray_starts(tmp_path: Path) -> None:
    """Fast (no cluster): the worker Ray runs builds its stages on the device given, and a device this machine
    lacks stops `--engine ray` with a clear error before any cluster work."""
    from typer.testing import CliRunner

    from ragzip.batch_ray import _Worker
    from ragzip.cli import app

    started = ray.is_initialized()  # the slow tests' module-wide cluster may be up: this one must start none
    worker = _Worker("exit", {"rate": 0.5}, {}, "whitespace", "cpu")
    assert [s.options.device for s in worker.compressor.stages] == ["cpu"]
    src = tmp_path / "in.jsonl"
    write_input(src)
    res = CliRunner().invoke(app, ["compress", str(src), "-o", str(tmp_path / "out.jsonl"), "-m", "exit",
                                   "--engine", "ray", "--device", "bogus", "--tokenizer", "whitespace"])
    assert res.exit_code == 2 and "unknown device 'bogus'" in res.output and ray.is_initialized() == started


def test_streamed_input_is_batched_without_reading_it_all() -> None:
    from ragzip.batch_ray import _batches

    def records() -> Iterator[tuple[int, Any, str | None]]:
        for n in range(1, 9):
            yield n, {"id": str(n), "contexts": ["x"]}, None
        raise AssertionError("read past what the first batches need")

    first = list(itertools.islice(_batches(records(), 4), 2))  # what run_ray reads to size its pool
    assert [[n for n, _, _ in b] for b in first] == [[1, 2, 3, 4], [5, 6, 7, 8]]
