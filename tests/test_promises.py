"""README promises that had no test: each test here names the promise and fails when it breaks."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from ragzip.cli import app
from ragzip.compressors.registry import COMPRESSORS
from ragzip.server.app import create_app
from ragzip.server.compression import SERVER_ONLY_OPTIONS
from ragzip.server.config import ServerConfig
from ragzip.server.guard import Slots

# Options a request may set when the server allows request options: they change what is kept, never which model,
# file, URL or device is used. A new option must be put here or in SERVER_ONLY_OPTIONS (the test below fails
# until it is).
PER_REQUEST_OPTIONS = frozenset({
    "unit", "seed", "min_keep", "threshold", "doc_weight", "neighbor_weight", "hops", "keep_antecedents",
    "batch_size", "max_length", "mode", "query_aware", "relevance", "force_tokens", "keep_digits", "drop_consecutive",
    "word_prob", "protect", "context_filter", "query_weight", "answer_share", "answer_gap_fill", "window_tokens", "k",
    "per_cluster", "alpha", "max_k", "max_new_tokens", "cache", "one_pass",
})


def test_every_compressor_option_is_classified_per_request_or_server_only() -> None:
    fields = {f.name for cls in COMPRESSORS.values() if dataclasses.is_dataclass(cls.Options)
              for f in dataclasses.fields(cls.Options)}
    unclassified = fields - PER_REQUEST_OPTIONS - SERVER_ONLY_OPTIONS
    assert not unclassified, f"options neither per-request nor server-only: {sorted(unclassified)}"
    # the ones that load models, name paths or URLs, or pick hardware are the server's
    assert {"model", "weights", "adapter", "embedder", "llm", "device", "dtype", "scorer"} <= SERVER_ONLY_OPTIONS


@pytest.fixture(scope="module")
def open_server() -> TestClient:
    cfg = ServerConfig(upstream="http://127.0.0.1:9/v1", tokenizer="whitespace", method="truncate",
                       allow_request_options=True, warm_compressor=False)
    with TestClient(create_app(cfg)) as client:
        yield client  # type: ignore[misc]


@pytest.mark.parametrize("option", sorted(SERVER_ONLY_OPTIONS))
@pytest.mark.parametrize("nested", [False, True])
def test_server_only_options_are_refused_per_request(open_server: TestClient, option: str, nested: bool) -> None:
    value = "http://attacker.example/v1" if option == "llm" else "/etc/passwd"  # CRAG's llm can be a URL
    options = {"crag": {option: value}} if nested else {option: value}
    body = {"question": "q", "contexts": ["The tower is in Paris. It is tall."],
            "ragzip": {"method": "crag+exit" if nested else "crag", "options": options}}
    r = open_server.post("/v1/compress", json=body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "options_not_allowed", r.text
    assert option in r.json()["error"]["message"]


def test_a_full_queue_refuses_at_once_when_the_wait_would_outlast_the_timeout() -> None:
    async def scenario() -> tuple[str | None, float, int]:
        slots = Slots(limit=1, queue_depth=10)
        assert await slots.acquire(5.0) is None
        for _ in range(20):  # requests have been taking ~3 s each
            slots._service_s = 0.9 * slots._service_s + 0.1 * 3.0
        started = time.monotonic()
        why = await slots.acquire(1.0)  # one ahead of it would take ~3 s > the 1 s it may wait
        return why, time.monotonic() - started, slots.retry_after_s()

    why, waited, retry = asyncio.run(scenario())
    assert why == "overloaded" and waited < 0.5 and retry >= 2  # refused at once, not after the 1 s wait


def test_a_client_that_leaves_the_queue_frees_its_place_and_takes_no_slot() -> None:
    async def scenario() -> tuple[int, int, str | None]:
        slots = Slots(limit=1, queue_depth=4)
        assert await slots.acquire(5.0) is None
        waiting = asyncio.create_task(slots.acquire(5.0))
        await asyncio.sleep(0.01)
        assert slots.queued == 1
        waiting.cancel()  # the client went away while queued
        with pytest.raises(asyncio.CancelledError):
            await waiting
        queued_after = slots.queued
        slots.release(0.1)
        in_flight = slots.in_flight  # the slot went back, not to the departed waiter
        return queued_after, in_flight, await slots.acquire(0.5)

    queued, in_flight, next_one = asyncio.run(scenario())
    assert queued == 0 and in_flight == 0 and next_one is None


def test_a_line_over_64_mib_is_one_bad_line(tmp_path: Path) -> None:
    from ragzip.batch import MAX_LINE_BYTES, iter_jsonl

    assert MAX_LINE_BYTES == 64 * 1024 * 1024
    src = tmp_path / "in.jsonl"
    with src.open("w", encoding="utf-8") as fh:
        fh.write(json.dumps({"id": "a", "contexts": ["ok"]}) + "\n")
        fh.write('{"id": "huge", "contexts": ["' + "x" * MAX_LINE_BYTES + '"]}\n')
        fh.write(json.dumps({"id": "b", "contexts": ["ok"]}) + "\n")
    rows = [(n, obj["id"] if obj else None, problem) for n, obj, problem in iter_jsonl(src)]
    assert rows[0] == (1, "a", None) and rows[2] == (3, "b", None)
    assert rows[1][:2] == (2, None) and "larger than" in str(rows[1][2])


def test_resume_onto_a_gzip_output_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "a", "question": "q", "contexts": ["Some text here."]}) + "\n")
    out = tmp_path / "out.jsonl.gz"
    first = CliRunner().invoke(app, ["compress", str(src), "-o", str(out), "-m", "truncate", "--rate", "0.5",
                                     "--tokenizer", "whitespace"])
    assert first.exit_code == 0 and out.exists()
    before = out.read_bytes()
    res = CliRunner().invoke(app, ["compress", str(src), "-o", str(out), "-m", "truncate", "--rate", "0.5",
                                   "--tokenizer", "whitespace", "--resume"])
    assert res.exit_code == 2 and "not .gz" in res.output
    assert out.read_bytes() == before  # nothing appended, nothing lost


def test_counting_never_loads_or_converts_the_llm(monkeypatch: pytest.MonkeyPatch) -> None:
    from ragzip import registry
    from ragzip.tokens import get_token_counter

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("counting reached the LLM's weights")

    monkeypatch.setattr(registry, "resolve_llm", refuse)
    monkeypatch.setattr(registry, "load_causal_lm", refuse)
    monkeypatch.setattr(registry, "_converted_packaged_llm", refuse)
    registry.load_tokenizer.cache_clear()
    get_token_counter.cache_clear()  # built afresh under the patches, not an instance made before them
    try:
        counter = get_token_counter(None)
        assert counter.count("The Rhine ends in the North Sea.") == 8  # SmolLM2's BPE
    finally:
        registry.load_tokenizer.cache_clear()
        get_token_counter.cache_clear()


def test_llama_index_provenance_stays_out_of_what_the_embedder_and_llm_read() -> None:
    from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle, TextNode

    from ragzip.llama_index import RagzipNodePostprocessor

    nodes = [NodeWithScore(node=TextNode(text="The Rhine ends in the North Sea. It is long.", id_="r",
                                         metadata={"source": "rhine.txt"}), score=0.9)]
    out = RagzipNodePostprocessor(method="truncate", rate=0.5, tokenizer="whitespace").postprocess_nodes(
        nodes, QueryBundle("Where does the Rhine end?"))
    node = out[0].node
    assert "ragzip" in node.metadata and node.metadata["ragzip"]["spans"]
    for mode in (MetadataMode.EMBED, MetadataMode.LLM):
        seen = node.get_content(metadata_mode=mode)
        assert "rhine.txt" in seen and "spans" not in seen and "ragzip" not in seen, mode
