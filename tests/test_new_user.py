"""What a new user hit on a fresh clone (issue 38), each through the surface they used: the CLI as a subprocess,
Python, and (in tests/server) HTTP with the openai SDK."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jieba  # the cjk extra, installed by setup
import pytest
import tomllib
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from ragzip import RagZip
from ragzip.cli import app
from ragzip.errors import InputError
from ragzip.eval.harness import free_port
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


def test_every_install_line_in_the_readme_can_run() -> None:
    root = Path(__file__).resolve().parents[1]
    extras = set(tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    commands = [c for p in pages for c in re.findall(r"pip install ([^`\n]+)", p.read_text(encoding="utf-8"))]
    assert len(commands) >= 8
    for command in commands:
        for arg in shlex.split(command.split("#")[0]):
            if arg.startswith("-"):
                continue
            checkout = re.fullmatch(r"(\.|/path/to/ragzip)\[([\w,.-]+)\]", arg)
            if checkout:  # ragzip itself: from the clone, with extras that exist
                assert set(checkout.group(2).split(",")) <= extras, command
            else:  # anything else: a package pinned by name on the registry
                assert re.fullmatch(r"[A-Za-z][\w.-]*==[\w.]+", arg) and not arg.startswith("ragzip"), command
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]["langchain"]
    assert any(d.startswith("langchain-classic") for d in deps)  # where LangChain 1.x keeps the retriever


def test_install_hints_name_this_checkout() -> None:
    from ragzip.errors import extra_hint

    hint = extra_hint("server")
    path = hint.split("'")[1].removesuffix("[server]")
    assert (Path(path) / "pyproject.toml").exists() and hint == f"pip install '{path}[server]'"


def test_serve_says_what_it_loads_shows_no_bars_and_is_ready_only_with_its_compressor() -> None:
    port = free_port()
    proc = subprocess.Popen([*RAGZIP, "serve", "--port", str(port), "--method", "exit"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url, seen = f"http://127.0.0.1:{port}", []
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                r = httpx.get(f"{url}/readyz", timeout=5)
                seen.append(r.json()["checks"].get("compressor"))
                if r.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        assert r.json()["checks"] == {"compressor": "ok", "engine": "ok"}
        assert set(seen) <= {"loading", "ok"}
        # Ready means loaded: the first request finds the default pipeline built (a cache hit, no new build).
        body = {"question": "Where does the Rhine end?", "contexts": ["The Rhine ends in the North Sea. It is long."]}
        assert httpx.post(f"{url}/v1/compress", json=body, timeout=60).status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
        assert 'ragzip_cache_misses_total{cache="pipeline"} 1.0' in metrics  # the warm-up's build, before ready
        assert 'ragzip_cache_hits_total{cache="pipeline"} 1.0' in metrics  # the request's
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    assert "loading the local engine smollm2-135m-instruct" in stderr
    assert "Loading weights" not in stderr and "Converting" not in stderr and "it/s]" not in stderr


def test_readiness_reports_a_default_compressor_that_cannot_load() -> None:
    from ragzip.server.app import create_app
    from ragzip.server.config import ServerConfig

    app = create_app(ServerConfig(upstream="http://127.0.0.1:9/v1", method="exit",
                                  options={"weights": "/nonexistent/exit-weights"}))
    with TestClient(app) as client:
        deadline = time.monotonic() + 60
        while (checks := client.get("/readyz").json()["checks"])["compressor"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = client.get("/readyz")
        assert r.status_code == 503 and checks["compressor"].startswith("failed: ")


def test_model_loads_from_python_draw_no_bars_unless_verbose(capfd: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    code = ("from ragzip import RagZip; "
            "print(RagZip('exit').compress('Where?', ['The Rhine ends in the North Sea. It is long.']).text)")
    quiet = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0 and "North Sea" in quiet.stdout, quiet.stderr
    assert "Loading weights" not in quiet.stderr and "it/s]" not in quiet.stderr
    # the same load path with RAGZIP_VERBOSE draws transformers' bar (so the check above can see one)
    from transformers import AutoModel

    from ragzip.registry import quiet_loading, resolve_embedder

    monkeypatch.setenv("RAGZIP_VERBOSE", "1")
    with quiet_loading():
        AutoModel.from_pretrained(resolve_embedder())
    assert "Loading weights" in capfd.readouterr().err


def test_quiet_loading_reaches_the_gguf_conversion_bar() -> None:
    import transformers.modeling_gguf_pytorch_utils as gguf

    from ragzip.registry import quiet_loading

    with quiet_loading():
        assert gguf.tqdm(range(2)).disable
    assert not gguf.tqdm(range(2), file=io.StringIO()).disable  # restored afterwards


def test_method_names_are_case_and_space_insensitive_and_async_compress_matches() -> None:
    rz = RagZip(" Embed-TopK + TRUNCATE ", tokenizer="whitespace")
    docs = ["The Rhine ends in the North Sea. It is long.", "Paris is in France. It has museums."]
    sync = rz.compress("Where does the Rhine end?", docs, rate=0.5)
    assert sync.method == "embed-topk+truncate"

    async def many() -> list[object]:
        return list(await asyncio.gather(*(rz.acompress("Where does the Rhine end?", docs, rate=0.5)
                                           for _ in range(3))))

    assert [r.to_contract()["text"] for r in asyncio.run(many())] == [sync.to_contract()["text"]] * 3  # type: ignore[attr-defined]


def test_allowed_methods_name_pipelines_whole() -> None:
    from ragzip.server.app import create_app
    from ragzip.server.config import ServerConfig

    body = {"question": "Where?", "contexts": ["The Rhine ends in the North Sea. It is long."]}
    for allowed, method, status in ((["truncate", "embed-topk"], "TRUNCATE", 200),
                                    (["truncate", "embed-topk"], "embed-topk+truncate", 400),
                                    (["truncate", "embed-topk"], "exit", 400),
                                    (["truncate", "Embed-TopK + truncate"], "embed-topk+truncate", 200),
                                    (None, "embed-topk+truncate", 200)):
        app = create_app(ServerConfig(upstream="http://127.0.0.1:9/v1", tokenizer="whitespace", method="truncate",
                                      allowed_methods=allowed, warm_compressor=False))
        with TestClient(app) as client:
            r = client.post("/v1/compress", json={**body, "ragzip": {"method": method, "rate": 0.5}})
        assert r.status_code == status, (allowed, method, r.text)
        if status == 400:
            assert r.json()["error"]["code"] == "invalid_method"


def test_the_proxy_index_can_be_listed_and_emptied() -> None:
    from ragzip.server.app import create_app
    from ragzip.server.config import ServerConfig

    app = create_app(ServerConfig(upstream="http://127.0.0.1:9/v1", tokenizer="whitespace", method="truncate",
                                  warm_compressor=False, chunk_tokens=6))
    with TestClient(app) as client:
        assert client.get("/v1/documents").json() == {"object": "list", "data": [], "total": 0}
        docs = [{"id": "tower", "title": "Tower", "text": "The Eiffel Tower is in Paris. It was completed in 1889."},
                "Bread is baked.", {"text": "Oxygen has atomic number 8."}]
        ids = client.post("/v1/documents", json={"documents": docs}).json()["ids"]
        listed = client.get("/v1/documents").json()
        assert listed["total"] == 3 and [d["id"] for d in listed["data"]] == ids
        assert listed["data"][0] == {"id": "tower", "title": "Tower", "chunks": 2}
        page = client.get("/v1/documents", params={"offset": 1, "limit": 1}).json()
        assert [d["id"] for d in page["data"]] == ids[1:2] and page["total"] == 3
        assert client.get("/v1/documents", params={"limit": 0}).status_code == 400
        assert client.delete("/v1/documents").json() == {"deleted_documents": 3, "deleted_chunks": 4}
        assert client.get("/v1/documents").json()["total"] == 0
        assert client.get("/healthz").json()["index_chunks"] == 0
        again = client.post("/v1/documents", json={"documents": ["Rome is in Italy."]}).json()["ids"]
        assert again[0] not in ids  # ids are never reused


@pytest.mark.parametrize("kwargs", [{"method": "exitt"}, {"method": "exit", "options": {"hops": 5}},
                                    {"method": "exit", "rate": 0.5, "target_tokens": 10},
                                    {"method": "exit+lingua2", "options": {"hops": 2}}])
def test_integrations_refuse_bad_settings_when_built(kwargs: dict[str, object]) -> None:
    from pydantic import ValidationError

    from ragzip.langchain import RagzipCompressor
    from ragzip.llama_index import RagzipNodePostprocessor

    for component in (RagzipCompressor, RagzipNodePostprocessor):
        with pytest.raises(ValidationError):
            component(**kwargs)
    assert RagzipCompressor(method=" EXIT ", rate=0.5).method == " EXIT "  # a good one still builds (lazily)


def test_exit_joins_cjk_sentences_without_adding_spaces() -> None:
    text = "长江是中国最长的河流。它流入东海。黄河是中国第二长的河流。北京是中国的首都。"
    res = RagZip("exit").compress("长江流入哪里？", [text], rate=0.6)
    assert " " not in res.text and len(res.documents[0].spans) >= 2  # two sentences or more, joined as written
    assert all(text[s.start:s.end] in res.text for s in res.documents[0].spans)


def test_the_thread_policy_limits_blas_pools_and_sets_passive_omp_waits() -> None:
    code = ("import os; from ragzip.threads import process_defaults; print(sorted(process_defaults())); "
            "import numpy, threadpoolctl; from ragzip.threads import limit_blas_threads; "
            "blas = lambda: sorted({i['num_threads'] for i in threadpoolctl.threadpool_info() "
            "if i['user_api'] == 'blas'}); before = blas(); limit_blas_threads(); "
            "print(blas()); print(os.environ['OMP_WAIT_POLICY']); print(blas() == before)")
    env = {k: v for k, v in ENV.items() if k not in ("OMP_WAIT_POLICY", "RAGZIP_BLAS_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split("\n")[:3] == ["['OMP_WAIT_POLICY']", "[1]", "PASSIVE"], out.stdout + out.stderr
    mine = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE",
                                                             "RAGZIP_BLAS_THREADS": "0"},
                          capture_output=True, text=True, timeout=120)
    lines = mine.stdout.split("\n")
    assert lines[0] == "[]" and lines[2] == "ACTIVE" and lines[3] == "True"  # a user's own settings win


@pytest.mark.parametrize("command", [["index"], ["kv", "warm"]])
def test_a_lone_surrogate_in_a_corpus_is_a_clear_error(tmp_path: Path, command: list[str]) -> None:
    src = tmp_path / "corpus.jsonl"
    src.write_text(json.dumps({"text": "The Rhine ends in the North Sea."}) + "\n"
                   + json.dumps({"text": "Paris\ud800 is in France."}) + "\n", encoding="utf-8")
    where = ["-o", str(tmp_path / "idx")] if command == ["index"] else ["--store", str(tmp_path / "kv")]
    res = CliRunner().invoke(app, [*command, str(src), *where])
    assert res.exit_code == 2 and f"{src}:2:" in res.output and "surrogate" in res.output, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)  # no traceback


def test_lingua2_keeps_chinese_words_whole() -> None:
    text = "长江是中国最长的河流，它流入东海。黄河是中国第二长的河流。北京是中国的首都，也是政治中心。"
    words = [(s, e) for _, s, e in jieba.tokenize(text) if e - s > 1]  # the multi-character words
    res = RagZip("lingua2").compress("长江流入哪里？", [text], rate=0.5)
    kept = {i for sp in res.documents[0].spans for i in range(sp.start, sp.end)}
    assert " " not in res.text and 0 < len(kept) < len(text)
    for s, e in words:  # each word is kept whole or not at all
        assert {i for i in range(s, e)} & kept in (set(), set(range(s, e))), text[s:e]
