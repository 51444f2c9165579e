"""Fuzz the ragzip proxy from its own OpenAPI schema with schemathesis (bounded), on loopback.

Starts a fast stub upstream and `ragzip serve` (subprocess), runs `schemathesis run` with the
`not_a_server_error` and response-schema checks over every phase, including the stateful one (sequences that
follow the schema's links: `POST /v1/documents` then `GET /v1/documents/{id}` of what it added), and reports the
server's RSS before and after. Usage:

    .venv/bin/python scripts/fuzz_server.py --max-examples 100 --max-time 300 --json /tmp/fuzz.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

from ragzip.eval.harness import ProxyProcess, StubUpstream


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-examples", type=int, default=100, help="examples per operation")
    ap.add_argument("--max-time", type=int, default=300, help="time budget in seconds (max 1200)")
    ap.add_argument("--method", default="truncate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    stub = StubUpstream()
    proxy = ProxyProcess({"upstream": stub.url, "method": args.method, "tokenizer": "whitespace",
                          "max_body_bytes": 1 << 20, "max_documents": 64})
    report_dir = Path(tempfile.mkdtemp(prefix="ragzip-fuzz-"))
    try:
        # Warm-up first, so that one-time loads (the compressor; torch and the embedder of the index) do not
        # count as growth.
        httpx.post(f"{proxy.url}/v1/compress", json={"question": "q", "contexts": [{"text": "a b. c d."}]}, timeout=120)
        httpx.post(f"{proxy.url}/v1/documents", json={"documents": [{"text": "warm up"}]}, timeout=300)
        rss_before = proxy.rss_mb()
        cmd = [str(Path(sys.executable).with_name("schemathesis")), "run", f"{proxy.url}/openapi.json",
               "--checks", "not_a_server_error,response_schema_conformance,content_type_conformance",
               "--max-examples", str(args.max_examples), "--max-time", str(min(args.max_time, 1200)),
               "--seed", str(args.seed), "--request-timeout", "30", "--continue-on-failure",
               "--phases", "examples,coverage,fuzzing,stateful",
               "--suppress-health-check", "all",
               "--report", "ndjson", "--report-ndjson-path", str(report_dir / "events.ndjson")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        rss_after = proxy.rss_mb()
        metrics = httpx.get(f"{proxy.url}/metrics").text
    finally:
        proxy.stop()
        stub.stop()
    statuses: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith("ragzip_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            status = labels.split('status="')[1].split('"')[0]
            statuses[status] = statuses.get(status, 0) + float(value)
    out: dict[str, Any] = {
        "schemathesis_exit_code": proc.returncode,
        "requests_by_status": {k: int(v) for k, v in sorted(statuses.items())},
        "server_errors": int(sum(v for k, v in statuses.items() if k.startswith("5"))),
        "rss_mb_before": round(rss_before, 1), "rss_mb_after": round(rss_after, 1),
        "summary": proc.stdout[-3000:],
    }
    print(proc.stdout[-6000:])
    print(json.dumps({k: v for k, v in out.items() if k != "summary"}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
