"""Time to first token with chunk KV reuse against full prefill, as `ragzip ask --kv-store` runs it, idle and busy.

Each run is a fresh process (so the first request pays what a user's first request pays: the KVTC profile,
the store), with the model loaded before timing. Per question (5 chunks of a MuSiQue-style context, as
`ragzip ask -k 5` sends), side by side in that process: full prefill (no store) and the KV engine's default
mode reading a disk store warmed with the default codec (`ragzip kv warm`'s: kvtc). "Busy" runs N pure-Python
spinning processes beside it (another tenant on the same cores). Each run applies the thread policy of
`ragzip.threads` as the CLI does; `--blas-threads 0` (numpy's and faiss's BLAS pools at their defaults) and
`--wait-policy active` (spinning OpenMP threads) give the behaviour before it, to show what the policy changes.

    python scripts/bench_kv_ttft.py --data ../shared/data/musique_chunks_dev50 --questions 8 \
        --out docs/results/kv_ttft.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _spin() -> None:
    while True:
        pass


def measure(data: str, questions: int, chunks: int, busy: int, model: str, threads: int,
            dtype: str = "auto") -> dict[str, Any]:
    """One configuration, in this process, with the model loaded as `ragzip ask` loads it (`LocalEngine`)."""
    import torch

    if threads:
        torch.set_num_threads(threads)

    from ragzip.engine import LocalEngine
    from ragzip.eval.datasets import load_examples
    from ragzip.kv_engine import KVReuseEngine, ReuseMode
    from ragzip.kvstore.codecs import get_codec
    from ragzip.kvstore.stores.base import open_store
    from ragzip.threads import blas_threads
    from ragzip.types import Document

    examples = load_examples(data, limit=questions)
    engine_llm = LocalEngine(model, dtype=dtype, device="cpu")  # what `ragzip ask` builds (auto: bf16 where native)
    lm, tokenizer = engine_llm.model, engine_llm.tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(tmp)
        store.codec = get_codec("kvtc", profile=model)  # what `ragzip kv warm --codec auto` picks
        warm_engine = KVReuseEngine(lm, tokenizer, store=store)
        docs = [[Document(f"{ex.id}/{j}", c.text, c.title) for j, c in enumerate(ex.contexts[:chunks])]
                for ex in examples]
        started = time.perf_counter()
        for d in docs:
            warm_engine.warm(d, prefix=False)
        warm_s = (time.perf_counter() - started) / sum(len(d) for d in docs)
        del warm_engine
        # A new engine over the same folder: what `ragzip ask --kv-store` opens (nothing decoded yet).
        engine = KVReuseEngine(lm, tokenizer, store=open_store(tmp))
        spinners = [mp.Process(target=_spin, daemon=True) for _ in range(busy)]
        for p in spinners:
            p.start()
        rows = []
        try:
            for ex, d in zip(examples, docs):
                full = engine.prefill(ex.question, d, mode=ReuseMode.FULL)
                full_ttft = engine.stats.ttft_s
                reuse = engine.prefill(ex.question, d)
                stats = engine.stats
                rows.append({"prompt_tokens": full.num_tokens, "full_ttft_s": full_ttft, "kv_ttft_s": stats.ttft_s,
                             "kv_load_s": stats.load_s, "hits": stats.hits, "misses": stats.misses,
                             "same_first_token": int(full.logits.argmax()) == int(reuse.logits.argmax())})
        finally:
            for p in spinners:
                p.kill()
    steady = rows[1:] or rows
    med = statistics.median
    return {
        "busy_processes": busy, "blas_threads": blas_threads(), "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset (active)"), "dtype": str(lm.dtype),
        "questions": len(rows), "chunks_per_question": chunks,
        "prompt_tokens_median": med(r["prompt_tokens"] for r in rows),
        "warm_s_per_chunk": round(warm_s, 3),
        "first_full_ttft_s": round(rows[0]["full_ttft_s"], 3), "first_kv_ttft_s": round(rows[0]["kv_ttft_s"], 3),
        "full_ttft_s_median": round(med(r["full_ttft_s"] for r in steady), 3),
        "kv_ttft_s_median": round(med(r["kv_ttft_s"] for r in steady), 3),
        "kv_load_s_median": round(med(r["kv_load_s"] for r in steady), 3),
        "ttft_speedup": round(sum(r["full_ttft_s"] for r in steady) / sum(r["kv_ttft_s"] for r in steady), 2),
        "misses": sum(r["misses"] for r in rows),
        "same_first_token_share": round(sum(r["same_first_token"] for r in rows) / len(rows), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data/musique_chunks_dev50")
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--chunks", type=int, default=5)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="auto", help="as `ragzip ask` (auto: bf16 on a CPU with native bf16)")
    ap.add_argument("--busy", default="0,2", help="comma list of spinning processes beside the run")
    ap.add_argument("--blas-threads", default="1,0", help="comma list of RAGZIP_BLAS_THREADS values")
    ap.add_argument("--torch-threads", default="0", help="comma list of torch thread counts (0: torch's default)")
    ap.add_argument("--wait-policy", default="passive", help="comma list of OMP_WAIT_POLICY values (passive is "
                                                               "what the CLI sets)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child run: print one JSON line
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.data, args.questions, args.chunks, int(args.busy), args.model,
                                 int(args.torch_threads), args.dtype)))
        return
    runs = []
    for policy in args.wait_policy.split(","):
        for blas in args.blas_threads.split(","):
            for threads in args.torch_threads.split(","):
                for busy in args.busy.split(","):
                    env = {**os.environ, "RAGZIP_BLAS_THREADS": blas, "HF_HUB_OFFLINE": "1",
                           "OMP_WAIT_POLICY": policy.upper()}
                    cmd = [sys.executable, __file__, "--one", "--data", args.data, "--questions",
                           str(args.questions), "--chunks", str(args.chunks), "--model", args.model, "--busy", busy,
                           "--torch-threads", threads, "--dtype", args.dtype]
                    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                    runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
                    print(json.dumps(runs[-1]), flush=True)
    result = {"machine": f"{os.cpu_count()} cores", "model": args.model, "runs": runs}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
