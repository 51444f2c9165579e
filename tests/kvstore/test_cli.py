from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from typer.testing import CliRunner

from ragzip.kvstore.blob import encode_record
from ragzip.kvstore.cli import app
from ragzip.kvstore.codecs import get_codec
from ragzip.kvstore.record import ChunkRecord
from ragzip.kvstore.stores.disk import DiskStore


def test_stats_verify_evict(tmp_path: Path, record_factory: Callable[..., ChunkRecord]) -> None:
    root = tmp_path / "kv"
    store = DiskStore(root)
    good = [record_factory(seed=i) for i in range(3)]
    for r in good:
        store.put(r.key, r)
    bad = record_factory(seed=9)
    store.put_blob(bad.key, encode_record(bad, get_codec("raw"))[:-5])
    runner = CliRunner()
    res = runner.invoke(app, ["stats", "--store", str(root)])
    assert res.exit_code == 0 and json.loads(res.stdout)["entries"] == 4
    res = runner.invoke(app, ["verify", "--store", str(root)])
    assert res.exit_code == 1 and json.loads(res.stdout) == {"ok": 3, "corrupt": 1, "foreign": 0,
                                                                     "missing_profile": 0}
    res = runner.invoke(app, ["evict", "--store", str(root), "--key", good[0].key])
    assert json.loads(res.stdout) == {"removed": 1}
    res = runner.invoke(app, ["evict", "--store", str(root), "--tag", good[1].key[:12]])
    assert json.loads(res.stdout) == {"removed": 2}
    assert runner.invoke(app, ["evict", "--store", str(root)]).exit_code != 0
    res = runner.invoke(app, ["verify", "--store", str(root)])
    assert res.exit_code == 0 and json.loads(res.stdout)["ok"] == 0


def test_warm_with_kvtc_for_a_model_without_a_profile_is_a_clear_error(tmp_path: Path) -> None:
    chunks = tmp_path / "c.jsonl"
    chunks.write_text(json.dumps({"text": "A chunk."}) + "\n")
    res = CliRunner().invoke(app, ["warm", str(chunks), "--store", str(tmp_path / "kv"), "--codec", "kvtc",
                                   "--model", "some/other-model"])
    assert res.exit_code == 2 and "no shipped KVTC profile" in res.output
    assert not (tmp_path / "kv").exists() or not any((tmp_path / "kv").iterdir())


def test_stats_and_list_read_the_entries_codecs(tmp_path: Path, record_factory: Callable[..., ChunkRecord]) -> None:
    root = tmp_path / "kv"
    store = DiskStore(root, codec="int8")
    records = [record_factory(seed=i) for i in range(3)]
    for r in records:
        store.put(r.key, r)
    raw = record_factory(seed=7)
    DiskStore(root).put(raw.key, raw)  # written by a process configured with another codec
    runner = CliRunner()
    res = runner.invoke(app, ["stats", "--store", str(root)])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["entries"] == 4 and info["codec"] == "mixed"
    assert sum(info["codecs"].values()) == 4 and info["codecs"]["raw:v1"] == 1 and len(info["codecs"]) == 2
    res = runner.invoke(app, ["list", "--store", str(root)])
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert sorted(r["key"] for r in rows) == sorted(r.key for r in [*records, raw])
    by_key = {r["key"]: r for r in rows}
    assert by_key[raw.key]["codec"] == "raw" and by_key[records[0].key]["codec"] == "int8"
    assert by_key[raw.key]["tokens"] == raw.num_tokens and by_key[raw.key]["bytes"] > 0
    assert len(runner.invoke(app, ["list", "--store", str(root), "--limit", "2"]).stdout.splitlines()) == 2


def test_a_missing_or_unreachable_store_is_an_error_and_nothing_is_created(tmp_path: Path) -> None:
    runner = CliRunner()
    typo = tmp_path / "kv-typo"
    for command in ("stats", "list", "verify"):
        res = runner.invoke(app, [command, "--store", str(typo)])
        assert res.exit_code == 1 and "no KV store at" in res.stderr
    assert not typo.exists()
    res = runner.invoke(app, ["stats", "--store", "redis://127.0.0.1:1/0"])  # nothing listens on port 1
    assert res.exit_code == 1 and "unreachable" in res.stderr
    assert runner.invoke(app, ["stats", "--store", "memory"]).exit_code == 1
