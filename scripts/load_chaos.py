"""The README's proxy load and chaos figures, in one bounded loopback run (about 4 minutes on 2 cores).

1. 200 clients x 60 s, mixed chat / streamed chat / `/v1/compress` with EXIT, proxy in front of a fast stub
   upstream that is killed (SIGKILL) at 20 s and restarted 5 s later;
2. the same mix against the local engine (SmolLM2-135M) with 16 clients for 60 s.

The fault paths that need a model or a service of their own (client disconnects, Redis killed, a full disk store,
SIGTERM drain) are tests: `tests/server/test_faults.py`. Usage:

    .venv/bin/python scripts/load_chaos.py --json docs/results/load_chaos.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ragzip.eval.loadtest import load_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    runs = {
        "stub_200_chaos": load_run(backend="stub", seconds=args.seconds, concurrency=200, method="exit", chaos=True,
                                   down_s=5.0, seed=args.seed),
        "local_16": load_run(backend="local", seconds=args.seconds, concurrency=16, method="exit", max_concurrency=4,
                             queue_depth=32, queue_timeout_s=20.0, seed=args.seed),
    }
    for name, out in runs.items():
        print(name, json.dumps({k: v for k, v in out.items() if k not in ("rss_samples", "chaos")}))
        if "chaos" in out:
            print("  chaos", json.dumps({k: v for k, v in out["chaos"].items() if k not in ("during", "outside")}))
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
