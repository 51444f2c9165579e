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
