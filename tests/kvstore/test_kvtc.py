from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ragzip.errors import CodecError, ConfigError
from ragzip.kvstore.blob import decode_record, encode_record
from ragzip.kvstore.calibrate import agreement, calibrate_kvtc, continuation_logits
from ragzip.kvstore.codecs import get_codec
from ragzip.kvstore.codecs import kvtc as kvtc_module
from ragzip.kvstore.codecs.kvtc import (
    LEVEL_KL,
    KVTCCodec,
    KVTCProfile,
    _rotate,
    _tokens_by_heads,
    shipped_kvtc_profiles,
)
from ragzip.kvstore.prefill import prefill_chunk
from ragzip.kvstore.record import ChunkRecord
from ragzip.kvstore.stores.memory import MemoryStore

IDS = [(7 * i + 3) % 97 + 1 for i in range(40)]


@pytest.fixture(scope="module")
def profile(tiny_llama: torch.nn.Module) -> KVTCProfile:
    samples = [(IDS[i:i + 30], IDS[i + 30:i + 36]) for i in (0, 2, 4)]
    return calibrate_kvtc(tiny_llama, samples, name="tiny", sensitivity_samples=2)


def _shapes(record: ChunkRecord) -> list:
    return [(tuple(k.shape), tuple(v.shape)) for k, v in record.layers]


def test_calibrated_profile_is_invertible_and_saves_without_pickle(profile: KVTCProfile, tmp_path: Path) -> None:
    assert profile.forward.shape == (2, 2, 16, 16) and profile.sensitivity.shape == (2, 2)
    assert (profile.heads, profile.head_dim) == (2, 8)
    eye = np.matmul(profile.forward, profile.inverse)
    assert np.allclose(eye, np.broadcast_to(np.eye(16), eye.shape), atol=1e-4)
    assert (profile.sensitivity >= 0).all() and profile.sensitivity.max() > 0  # tiny random model: some ~0
    path = tmp_path / "p.safetensors"
    profile.save(path)
    again = KVTCProfile.load(path)
    assert again.digest == profile.digest and again.name == "tiny"
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ConfigError):
        KVTCProfile.load(tmp_path / "bad.safetensors")
    with pytest.raises(ConfigError, match="shipped"):
        KVTCProfile.load("no-such-model")


@pytest.mark.parametrize("context", [(), (5, 6, 7)])
def test_error_in_the_transformed_domain_is_within_half_a_step(tiny_llama: torch.nn.Module, profile: KVTCProfile,
                                                               context: tuple[int, ...]) -> None:
    # start > 0 checks that keys are un-rotated and re-rotated at the chunk's real positions.
    record = prefill_chunk(tiny_llama, IDS[5:35], context)
    codec = KVTCCodec(2, profile)
    meta, payload = codec.encode(record.layers, start=record.start)
    layers = codec.decode(meta, payload, _shapes(record), record.dtype)
    steps = profile.steps(codec.kl)
    for li, ((k, v), (k2, v2)) in enumerate(zip(record.layers, layers)):
        for kind, a, b in ((0, k, k2), (1, v, v2)):
            if kind == 0:
                a, b = (_rotate(t, profile.inv_freq[li], record.start, inverse=True) for t in (a, b))
            ya, yb = (_tokens_by_heads(t.numpy()) @ profile.forward[li, kind] for t in (a, b))
            err = np.abs(ya - yb)
            # half a step, plus the fp16 rounding of the stored per-component centre
            assert (err <= steps[li, kind] * 0.5 * 1.001 + 2e-3 * np.abs(ya).max()).all()
            if not context:
                assert torch.allclose(a[:, 0], b[:, 0], atol=1e-2)  # position 0 (the sink) is stored as fp16


def test_levels_trade_size_for_error(tiny_llama: torch.nn.Module, profile: KVTCProfile) -> None:
    record = prefill_chunk(tiny_llama, IDS[:40])
    sizes, errors = [], []
    for level in range(len(LEVEL_KL)):
        codec = get_codec(f"kvtc:{level}", profile=profile)
        meta, payload = codec.encode(record.layers)
        layers = codec.decode(meta, payload, _shapes(record), record.dtype)
        sizes.append(len(payload))
        errors.append(sum((a - b).pow(2).sum().item() for (a, _), (b, _) in zip(record.layers, layers)))
    assert sizes == sorted(sizes, reverse=True) and errors == sorted(errors)


def test_blob_roundtrip_corruption_and_bad_payloads(tiny_llama: torch.nn.Module, profile: KVTCProfile) -> None:
    record = prefill_chunk(tiny_llama, IDS[:30], (1, 2))
    codec = KVTCCodec(3, profile)
    blob = encode_record(record, codec)
    got = decode_record(blob, expected_key=record.key)
    assert got.key == record.key and got.start == 2 and got.context == (1, 2)
    flipped = bytearray(blob)
    flipped[-100] ^= 0x40  # inside the codec payload
    with pytest.raises(CodecError, match="checksum"):
        decode_record(bytes(flipped))
    meta, payload = codec.encode(record.layers, start=2)
    for bad in (payload[:-4], payload[:10], payload + b"\x00\x00\x00\x00"):
        with pytest.raises(CodecError):
            codec.decode(meta, bad, _shapes(record), record.dtype)
    with pytest.raises(CodecError, match="malformed"):
        codec.decode({"profile": profile.digest}, payload, _shapes(record), record.dtype)


def test_a_store_reads_older_codecs_and_keeps_entries_whose_profile_is_missing(
        tiny_llama: torch.nn.Module, profile: KVTCProfile, monkeypatch: pytest.MonkeyPatch) -> None:
    record = prefill_chunk(tiny_llama, IDS[:30])
    store = MemoryStore(1 << 24, codec=KVTCCodec(3, profile))
    store.put_blob(record.key, encode_record(record, get_codec("cachegen:3")))  # written by the previous default
    assert store.get(record.key) is not None
    store.put(record.key, record)
    monkeypatch.setattr(kvtc_module, "_REGISTERED", {})
    elsewhere = MemoryStore(1 << 24, codec="int8")  # another process: the profile is not loaded
    elsewhere.put_blob(record.key, store.get_blob(record.key) or b"")
    assert elsewhere.get(record.key) is None
    assert elsewhere.contains(record.key), "a missing profile is not corruption: the entry must stay"
    assert elsewhere.stats()["corrupt"] == 0


def test_encoding_needs_a_matching_profile(tiny_llama: torch.nn.Module, profile: KVTCProfile) -> None:
    record = prefill_chunk(tiny_llama, IDS[:20])
    with pytest.raises(ConfigError, match="needs a profile"):
        KVTCCodec().encode(record.layers)
    with pytest.raises(ConfigError, match="layers"):
        KVTCCodec(profile=profile).encode(record.layers[:1])
    with pytest.raises(ConfigError):
        KVTCCodec(level=9)


def test_shipped_profile_keeps_next_token_predictions_at_about_a_third_of_int8(tmp_path: Path) -> None:
    from ragzip.registry import load_causal_lm

    assert {"smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"} <= set(shipped_kvtc_profiles())
    model, tok = load_causal_lm("smollm2-135m-instruct")  # setup installs it: a missing model is a failure
    text = (Path(__file__).parent / "fixtures" / "chunks.jsonl").read_text()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) >= 360
    record = prefill_chunk(model, ids[:320])  # the chunk size the README's figures use
    cont = ids[320:360]
    ref = continuation_logits(model, record.layers, cont)
    codec = get_codec("kvtc", profile="smollm2-135m-instruct")
    blob = encode_record(record, codec)
    n = sum(k.numel() + v.numel() for k, v in record.layers)
    bits = len(blob) * 8 / n
    top1, kl = agreement(ref, continuation_logits(model, decode_record(blob).layers, cont))
    assert bits < 3.0, bits  # int8 is 8.25; the README's held-out figure is the one to quote
    assert kl < 0.05 and top1 >= 0.85, (kl, top1)
