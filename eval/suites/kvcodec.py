"""`ragzip eval kvcodec`: size, quality and speed of the KV codecs (raw, int8, int4, CacheGen levels).

Per chunk: the first `prefix` tokens are prefilled alone (the stored KV); the next `cont` tokens of the chunk
plus the question are the continuation. Quality is top-1 agreement and KL of the continuation's next-token
distributions with decoded KV vs the original KV. The CacheGen profile (per-layer, K/V sensitivity) is measured
on `calib` chunks that are not evaluated (each example's second context).
"""

from __future__ import annotations

import gzip
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_LEVEL = 3
log = logging.getLogger(__name__)


def _examples(data: Path, limit: int | None) -> list[dict[str, Any]]:
    path = data
    if path.is_dir():
        path = next(p for p in (data / "normalized.jsonl", data / "normalized.jsonl.gz") if p.exists())
    opener = gzip.open if path.suffix == ".gz" else open
    out = []
    with opener(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                out.append(json.loads(line))
            if limit is not None and len(out) >= limit:
                break
    return out


def _codecs(profile: Any) -> list[tuple[str, Any]]:
    from ragzip.kvstore.codecs import get_codec
    from ragzip.kvstore.codecs.cachegen import LEVEL_STEPS, CacheGenCodec

    out: list[tuple[str, Any]] = [("raw", get_codec("raw")), ("raw-bf16", get_codec("raw", dtype="bfloat16")),
                                  ("int8", get_codec("int8")), ("int4", get_codec("int4"))]
    out += [(f"cachegen:{lv}", CacheGenCodec(lv, profile)) for lv in range(len(LEVEL_STEPS))]
    out += [(f"cachegen-banded:{lv}", CacheGenCodec(lv, None)) for lv in (1, 3)]
    out += [(f"cachegen-delta:{DEFAULT_LEVEL}", CacheGenCodec(DEFAULT_LEVEL, profile, delta="on"))]
    return out


def run(data: Path, *, limit: int | None, seed: int, options: dict[str, str]) -> dict[str, Any]:
    """Run the suite.

    Options: model (alias; default the local LLM), dtype (bfloat16), prefix (tokens, 320), cont (64),
    calib (chunks, 3), profile (a saved CacheGen profile: skip calibration), save_profile (path), threads (1).
    """
    import torch

    from ragzip.kvstore.calibrate import agreement, continuation_logits, measure_sensitivity
    from ragzip.kvstore.codecs.cachegen import CacheGenProfile
    from ragzip.kvstore.prefill import prefill_chunk
    from ragzip.kvstore.record import ChunkRecord
    from ragzip.kvstore.stores.disk import DiskStore
    from ragzip.registry import load_causal_lm

    torch.manual_seed(seed)
    torch.set_num_threads(int(options.get("threads", "1")))
    prefix, cont_len = int(options.get("prefix", 320)), int(options.get("cont", 64))
    n_calib = int(options.get("calib", 3))
    dtype = getattr(torch, options.get("dtype", "bfloat16"))
    model, tok = load_causal_lm(options.get("model"), dtype=dtype)
    examples = _examples(Path(data), (limit or 20) + n_calib)

    def sample(ex: dict[str, Any], ctx: int) -> tuple[ChunkRecord, list[int]] | None:
        ids = tok(ex["contexts"][ctx]["text"], add_special_tokens=False)["input_ids"]
        if len(ids) < prefix + 8:
            return None
        q = tok("\nQuestion: " + ex["question"] + "\nAnswer:", add_special_tokens=False)["input_ids"]
        return prefill_chunk(model, ids[:prefix]), ids[prefix:prefix + cont_len] + q

    t0 = time.perf_counter()
    if "profile" in options:
        profile = CacheGenProfile.load(options["profile"])
        calib_s = 0.0
    else:
        calib = [s for ex in examples[:n_calib] if (s := sample(ex, min(1, len(ex["contexts"]) - 1)))]
        profile = measure_sensitivity(model, calib, seed=seed)
        calib_s = time.perf_counter() - t0
        log.info("kvcodec: profile measured on %d chunks in %.0f s", len(calib), calib_s)
    if "save_profile" in options:
        profile.save(options["save_profile"])
    codecs = _codecs(profile)
    rows: dict[str, dict[str, list[float]]] = {name: {} for name, _ in codecs}
    load_ratio: dict[str, list[float]] = {"raw": [], "int8": [], f"cachegen:{DEFAULT_LEVEL}": []}
    delta_used: list[float] = []
    n_chunks = 0
    with tempfile.TemporaryDirectory(prefix="ragzip-kvcodec-") as tmp:
        for ex in examples[n_calib:]:
            s = sample(ex, 0)
            if s is None:
                continue
            record, cont = s
            n_chunks += 1
            log.info("kvcodec: chunk %d (%s)", n_chunks, ex.get("id"))
            ref = continuation_logits(model, record.layers, cont)
            n_el = sum(k.numel() + v.numel() for k, v in record.layers)
            mb = record.nbytes / 1e6
            shapes = [(tuple(k.shape), tuple(v.shape)) for k, v in record.layers]
            for name, codec in codecs:
                t = time.perf_counter()
                meta, payload = codec.encode(record.layers)
                enc_s = time.perf_counter() - t
                t = time.perf_counter()
                layers = codec.decode(meta, payload, shapes, record.dtype)
                dec_s = time.perf_counter() - t
                top1, kl = agreement(ref, continuation_logits(model, layers, cont))
                side = len(json.dumps(meta, separators=(",", ":")))
                r = rows[name]
                for k, v in (("bits", (len(payload) + side) * 8 / n_el), ("top1", top1), ("kl", kl),
                             ("enc_mb_s", mb / enc_s), ("dec_mb_s", mb / dec_s)):
                    r.setdefault(k, []).append(v)
                if name == f"cachegen:{DEFAULT_LEVEL}":
                    used = codec.last_delta_used
                    delta_used.append(sum(a + b for a, b in used) / (2 * len(used)))
            for name in load_ratio:
                store = DiskStore(Path(tmp) / name.replace(":", "-"), max_bytes=1 << 32,
                                  codec=dict(codecs)[name])
                store.put(record.key, record)
                t = time.perf_counter()
                got = store.get(record.key)
                load_s = time.perf_counter() - t
                t = time.perf_counter()
                prefill_chunk(model, record.token_ids)
                compute_s = time.perf_counter() - t
                assert got is not None
                load_ratio[name].append(load_s / compute_s)
    table = [{"codec": name, **{k: round(statistics.fmean(v), 4) for k, v in r.items()}} for name, r in rows.items()]
    by = {row["codec"]: row for row in table}
    default = by[f"cachegen:{DEFAULT_LEVEL}"]
    return {
        "model": options.get("model", "smollm2-135m-instruct"),
        "chunks": n_chunks,
        "prefix_tokens": prefix,
        "continuation_tokens": cont_len,
        "default_level": DEFAULT_LEVEL,
        "bits_per_element": default["bits"],
        "ratio_vs_int8": round(by["int8"]["bits"] / default["bits"], 3),
        "top1_agreement": default["top1"],
        "kl": default["kl"],
        "encode_mb_s": default["enc_mb_s"],
        "decode_mb_s": default["dec_mb_s"],
        "load_vs_recompute": round(statistics.median(load_ratio[f"cachegen:{DEFAULT_LEVEL}"]), 3),
        "load_vs_recompute_raw": round(statistics.median(load_ratio["raw"]), 3),
        "load_vs_recompute_int8": round(statistics.median(load_ratio["int8"]), 3),
        "delta_used_fraction": round(statistics.fmean(delta_used), 4) if delta_used else 0.0,
        "calibration_seconds": round(calib_s, 1),
        "sensitivity": [list(map(lambda x: round(x, 5), p)) for p in profile.sensitivity],
        "table": table,
    }
