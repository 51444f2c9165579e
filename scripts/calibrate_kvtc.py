"""Measure and save a KVTC profile (transforms + sensitivities) for one model.

    .venv/bin/python scripts/calibrate_kvtc.py --model smollm2-135m-instruct \
        --data ../shared/data/musique_train_hipporag100 \
        --out kvstore/codecs/kvtc_profile.smollm2-135m-instruct.safetensors

Calibration chunks are built from the data's contexts (joined until `--prefix` tokens), continuations from
the following tokens plus the question, so no evaluation chunk (musique_chunks_dev50) is seen. The model runs
in float32: bf16 rounding would drown the small-noise sensitivity probe.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model alias, local path or hub name")
    ap.add_argument("--data", type=Path, required=True, help="a common-schema dataset (normalized.jsonl)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--name", help="profile name (default: the model alias)")
    ap.add_argument("--chunks", type=int, default=8, help="chunks for the transforms")
    ap.add_argument("--sensitivity-chunks", type=int, default=4, help="of those, chunks for the sensitivity probe")
    ap.add_argument("--prefix", type=int, default=320)
    ap.add_argument("--cont", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from ragzip.eval.datasets import load_examples
    from ragzip.kvstore.calibrate import calibrate_kvtc
    from ragzip.registry import load_causal_lm

    torch.set_num_threads(args.threads)
    model, tok = load_causal_lm(args.model, dtype=torch.float32)
    samples = []
    for ex in load_examples(args.data, limit=None):
        text = "\n\n".join(d.text for d in ex.documents())
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) < args.prefix + args.cont:
            continue
        q = tok("\nQuestion: " + ex.question + "\nAnswer:", add_special_tokens=False)["input_ids"]
        samples.append((ids[:args.prefix], ids[args.prefix:args.prefix + args.cont] + q))
        if len(samples) >= args.chunks:
            break
    t0 = time.perf_counter()
    profile = calibrate_kvtc(model, samples, name=args.name or args.model,
                             sensitivity_samples=args.sensitivity_chunks)
    profile.save(args.out)
    print(f"{args.out}: {len(samples)} chunks, {time.perf_counter() - t0:.0f} s, digest {profile.digest}, "
          f"{args.out.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
