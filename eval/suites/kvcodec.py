"""`ragzip eval kvcodec`: size, quality and speed of the KV codecs (raw, int8, int4, CacheGen and KVTC levels).

Per chunk: the first `prefix` tokens are prefilled alone (the stored KV); the next `cont` tokens of the chunk
plus the question are the continuation. Quality is top-1 agreement and KL of the continuation's next-token
distributions with decoded KV vs the original KV. The CacheGen profile (per-layer, K/V sensitivity) is measured
on `calib` chunks that are not evaluated (each example's second context); the KVTC profile is the model's
shipped one (calibrated on other data) unless `kvtc_profile=PATH` or `kvtc_profile=calibrate` is given.

Inside blending (`blend=N` examples, 2 by default): every document's chunk cache, computed after the prompt
header as the KV engine stores it, goes through each codec, and a 15% blended prefill on the decoded caches is
compared with a full prefill along the full prefill's greedy answer (KL, top-1), so the codec's error is
measured stacked on re-rotation and partial recompute.
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

from ragzip.errors import ConfigError
from ragzip.options import refuse_unknown

DEFAULT_LEVEL = 3  # cachegen's
DEFAULT_CODEC = "kvtc:2"
BLEND_CODECS = ("raw", "int8", "cachegen:3", DEFAULT_CODEC)
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


def _codecs(profile: Any, kvtc_profile: Any) -> list[tuple[str, Any]]:
    from ragzip.kvstore.codecs import get_codec
    from ragzip.kvstore.codecs.cachegen import LEVEL_STEPS, CacheGenCodec
    from ragzip.kvstore.codecs.kvtc import LEVEL_KL, KVTCCodec

    out: list[tuple[str, Any]] = [("raw", get_codec("raw")), ("raw-bf16", get_codec("raw", dtype="bfloat16")),
                                  ("int8", get_codec("int8")), ("int4", get_codec("int4"))]
    out += [(f"cachegen:{lv}", CacheGenCodec(lv, profile)) for lv in range(len(LEVEL_STEPS))]
    out += [(f"cachegen-banded:{lv}", CacheGenCodec(lv, None)) for lv in (1, 3)]
    out += [(f"cachegen-delta:{DEFAULT_LEVEL}", CacheGenCodec(DEFAULT_LEVEL, profile, delta="on"))]
    out += [(f"kvtc:{lv}", KVTCCodec(lv, kvtc_profile)) for lv in range(len(LEVEL_KL))]
    return out


def run(data: Path, *, limit: int | None, seed: int, options: dict[str, str]) -> dict[str, Any]:
    """Run the suite.

    Options: model (alias; default the local LLM), dtype (bfloat16), prefix (tokens, 320), cont (64),
    calib (chunks, 3), profile (a saved CacheGen profile: skip calibration), save_profile (path), threads (1),
    kvtc_profile (path, shipped alias or "calibrate"; default the model's shipped profile), blend (examples, 2;
    0 skips the blended measurement), skip (leave out the first n examples: a held-out slice).
    """
    import torch

    from ragzip.eval.metrics import ratio_bootstrap_ci
    from ragzip.kvstore.calibrate import agreement, continuation_logits, measure_sensitivity
    from ragzip.kvstore.codecs.cachegen import CacheGenProfile
    from ragzip.kvstore.codecs.kvtc import KVTCProfile, shipped_kvtc_profiles
    from ragzip.kvstore.prefill import prefill_chunk
    from ragzip.kvstore.record import ChunkRecord
    from ragzip.kvstore.stores.disk import DiskStore
    from ragzip.registry import load_causal_lm

    torch.manual_seed(seed)
    torch.set_num_threads(int(options.get("threads", "1")))
    prefix, cont_len = int(options.get("prefix", 320)), int(options.get("cont", 64))
    n_calib = int(options.get("calib", 3))
    dtype = getattr(torch, options.get("dtype", "bfloat16"))
    known = {"model", "dtype", "prefix", "cont", "calib", "profile", "save_profile", "threads", "kvtc_profile", "blend",
             "skip"}
    refuse_unknown(options, known, "eval suite 'kvcodec'")
    model_name = options.get("model", "smollm2-135m-instruct")
    model, tok = load_causal_lm(options.get("model"), dtype=dtype)
    skip = int(options.get("skip", "0"))
    examples = _examples(Path(data), skip + (limit or 20) + n_calib)[skip:]

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
    kvtc_name = options.get("kvtc_profile", model_name if model_name in shipped_kvtc_profiles() else "calibrate")
    if kvtc_name == "calibrate":
        t = time.perf_counter()
        kvtc_profile = _calibrate_kvtc(model, tok, examples[:max(1, n_calib)], prefix, cont_len, model_name)
        calib_s += time.perf_counter() - t
    else:
        kvtc_profile = KVTCProfile.load(kvtc_name)
    codecs = _codecs(profile, kvtc_profile)
    rows: dict[str, dict[str, list[float]]] = {name: {} for name, _ in codecs}
    load_ratio: dict[str, list[float]] = {"raw": [], "int8": [], f"cachegen:{DEFAULT_LEVEL}": [], DEFAULT_CODEC: []}
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
                meta, payload = codec.encode(record.layers, start=record.start)
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
    table = [{"codec": name, **{k: round(statistics.fmean(v), 5) for k, v in r.items()}} for name, r in rows.items()]
    by = {row["codec"]: row for row in table}
    default, int8 = by[DEFAULT_CODEC], by["int8"]
    previous = by[f"cachegen:{DEFAULT_LEVEL}"]
    blend = _blend(model, tok, Path(data), int(options.get("blend", "2")), skip, dict(codecs)) if n_chunks else {}
    return {
        "model": model_name,
        "chunks": n_chunks,
        "prefix_tokens": prefix,
        "continuation_tokens": cont_len,
        "default_codec": DEFAULT_CODEC,
        "bits_per_element": default["bits"],
        "ratio_vs_int8": round(int8["bits"] / default["bits"], 3),
        "top1_agreement": default["top1"],
        "kl": default["kl"],
        "top1_agreement_int8": int8["top1"],
        "kl_int8": int8["kl"],
        "kl_ci": list(ratio_bootstrap_ci(rows[DEFAULT_CODEC]["kl"], [1.0] * n_chunks)) if n_chunks else [],
        "kl_int8_ci": list(ratio_bootstrap_ci(rows["int8"]["kl"], [1.0] * n_chunks)) if n_chunks else [],
        "kl_vs_int8_ci": list(ratio_bootstrap_ci(rows[DEFAULT_CODEC]["kl"], rows["int8"]["kl"])) if n_chunks else [],
        "encode_mb_s": default["enc_mb_s"],
        "decode_mb_s": default["dec_mb_s"],
        "load_vs_recompute": round(statistics.median(load_ratio[DEFAULT_CODEC]), 3),
        "load_vs_recompute_raw": round(statistics.median(load_ratio["raw"]), 3),
        "load_vs_recompute_int8": round(statistics.median(load_ratio["int8"]), 3),
        "load_vs_recompute_cachegen": round(statistics.median(load_ratio[f"cachegen:{DEFAULT_LEVEL}"]), 3),
        "previous_default": {"codec": f"cachegen:{DEFAULT_LEVEL}", "bits": previous["bits"],
                             "top1": previous["top1"], "kl": previous["kl"], "dec_mb_s": previous["dec_mb_s"]},
        "delta_used_fraction": round(statistics.fmean(delta_used), 4) if delta_used else 0.0,
        "calibration_seconds": round(calib_s, 1),
        "kvtc_profile": {"name": kvtc_profile.name, "digest": kvtc_profile.digest},
        "sensitivity": [list(map(lambda x: round(x, 5), p)) for p in profile.sensitivity],
        **blend,
        "table": table,
    }


def _calibrate_kvtc(model: Any, tok: Any, examples: list[dict[str, Any]], prefix: int, cont: int, name: str) -> Any:
    """A KVTC profile from the calibration examples' second contexts (never evaluated)."""

    from ragzip.kvstore.calibrate import calibrate_kvtc

    samples = []
    for ex in examples:
        text = ex["contexts"][min(1, len(ex["contexts"]) - 1)]["text"]
        ids = tok(text, add_special_tokens=False)["input_ids"]
        q = tok("\nQuestion: " + ex["question"] + "\nAnswer:", add_special_tokens=False)["input_ids"]
        if len(ids) > prefix:
            samples.append((ids[:prefix], ids[prefix:prefix + cont] + q))
    if not samples:
        raise ConfigError(f"no calibration chunk of more than {prefix} tokens for the KVTC profile")
    dtype = next(model.parameters()).dtype
    model.float()
    try:
        return calibrate_kvtc(model, samples, name=name, sensitivity_samples=min(3, len(samples)))
    finally:
        model.to(dtype)


def _blend(model: Any, tok: Any, data: Path, n: int, skip: int, codecs: dict[str, Any]) -> dict[str, Any]:
    """KL / top-1 of a 15% blend on each codec's decoded chunk caches vs a full prefill (see the module doc)."""
    import copy

    import torch

    from ragzip.eval.datasets import load_examples
    from ragzip.eval.suites.blend import _closeness, _greedy_with_logits
    from ragzip.kernels.blend import BlendConfig
    from ragzip.kv_engine import KVReuseEngine, ReuseMode
    from ragzip.kvstore.stores.memory import MemoryStore

    if n <= 0:
        return {}
    source = MemoryStore(1 << 34)
    engine = KVReuseEngine(model, tok, store=source, run_self_check=False)
    cfg = BlendConfig(recompute_ratio=0.15)
    per: dict[str, dict[str, list[float]]] = {c: {"kl": [], "top1": []} for c in BLEND_CODECS}
    examples = [ex for ex in load_examples(data, limit=skip + n)[skip:] if len(ex.documents()) > 1]
    for ex in examples:
        docs = ex.documents()
        engine.store = source
        engine.warm(docs, prefix=False)
        full = engine.prefill(ex.question, docs, mode=ReuseMode.FULL)
        target, ref_rows = [], []
        for t, logits in _greedy_with_logits(engine, copy.deepcopy(full), 32):
            target.append(t)
            ref_rows.append(logits)
        ref = torch.stack(ref_rows)
        for name in BLEND_CODECS:
            store = MemoryStore(1 << 34, codec=codecs[name])
            for key in source.keys():
                record = source.get(key)
                if record is not None:
                    store.put(key, record)
            engine.store = store
            pre = engine.prefill(ex.question, docs, mode=ReuseMode.BLEND, blend=cfg)
            kl, top1, _, _ = _closeness(ref, engine.teacher_forced_logits(pre, target))
            per[name]["kl"].append(kl)
            per[name]["top1"].append(top1)
            log.info("kvcodec blend %s %s: kl %.4f top1 %.3f", ex.id, name, kl, top1)
    engine.store = source
    if not examples:
        return {}

    def key(name: str) -> str:
        return "" if name == DEFAULT_CODEC else "_" + name.split(":")[0]

    out: dict[str, Any] = {"blend_examples": len(examples), "blend_ratio": 0.15}
    for name, row in per.items():
        out[f"blend_kl{key(name)}"] = round(statistics.fmean(row["kl"]), 5)
        out[f"blend_top1{key(name)}"] = round(statistics.fmean(row["top1"]), 4)
    return out
