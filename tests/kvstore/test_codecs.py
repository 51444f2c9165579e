from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from ragzip.errors import CodecError, ConfigError
from ragzip.kvstore.codecs import get_codec
from ragzip.kvstore.codecs.cachegen import CacheGenCodec, CacheGenProfile
from ragzip.kvstore.record import ChunkRecord, same_layers


def _roundtrip(codec_name: str, record: ChunkRecord, **kw: object) -> tuple[list, int]:
    codec = get_codec(codec_name, **kw)
    meta, payload = codec.encode(record.layers)
    shapes = [(tuple(k.shape), tuple(v.shape)) for k, v in record.layers]
    return codec.decode(meta, payload, shapes, record.dtype), len(payload)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_raw_is_exact(record_factory: Callable[..., ChunkRecord], dtype: torch.dtype) -> None:
    record = record_factory(dtype=dtype)
    layers, _ = _roundtrip("raw", record)
    assert same_layers(layers, record.layers)


@pytest.mark.parametrize(("name", "divisor"), [("int8", 254), ("int4", 14)])
def test_per_token_quant_error_bound(record_factory: Callable[..., ChunkRecord], name: str, divisor: int) -> None:
    record = record_factory(num_tokens=33)
    layers, size = _roundtrip(name, record)
    for (k, v), (k2, v2) in zip(record.layers, layers):
        for a, b in ((k, k2), (v, v2)):
            bound = a.abs().amax(-1, keepdim=True) / divisor * 1.01 + 1e-3  # half a step (+ fp16 scale rounding)
            assert ((a - b).abs() <= bound).all()
    n = sum(k.numel() + v.numel() for k, v in record.layers)
    assert size * 8 / n == pytest.approx({"int8": 8 + 16 / 8, "int4": 4 + 16 / 8}[name], abs=0.1)


@pytest.mark.parametrize("delta", ["off", "on", "auto"])
def test_cachegen_error_within_half_step(record_factory: Callable[..., ChunkRecord], delta: str) -> None:
    record = record_factory(num_tokens=37)
    codec = CacheGenCodec(2, group=5, delta=delta)
    meta, payload = codec.encode(record.layers)
    layers = codec.decode(meta, payload, [(tuple(k.shape), tuple(v.shape)) for k, v in record.layers], record.dtype)
    for (k, v), (k2, v2), (sk, sv) in zip(record.layers, layers, codec.steps_for(record.num_layers)):
        for a, b, step in ((k, k2, sk), (v, v2, sv)):
            rms = a.pow(2).mean(dim=(0, 2), keepdim=True).sqrt()  # [1, S, 1]
            # the stored scale is rms rounded to 1/8 octave (<= 4.5% off)
            assert ((a - b).abs() <= rms * step * 0.5 * 1.05 + 1e-6).all()


def test_cachegen_levels_trade_size_for_error(record_factory: Callable[..., ChunkRecord]) -> None:
    record = record_factory(num_tokens=64)
    sizes, errors = [], []
    for level in range(0, 6):
        layers, size = _roundtrip("cachegen", record, level=level)
        sizes.append(size)
        errors.append(sum((a - b).pow(2).sum().item() for (a, _), (b, _) in zip(record.layers, layers)))
    assert sizes == sorted(sizes, reverse=True) and errors == sorted(errors)
    assert get_codec("cachegen:3").base_step == CacheGenCodec(3).base_step  # type: ignore[attr-defined]


def test_cachegen_profile_allocates_finer_steps_to_sensitive_layers(tmp_path: object) -> None:
    profile = CacheGenProfile("fp", ((4.0, 1.0), (1.0, 1.0), (1.0, 0.25)))
    steps = profile.steps(0.2)
    assert steps[0][0] < steps[1][0] < steps[2][1]
    assert steps[0][0] == pytest.approx(steps[1][0] / 2)
    with pytest.raises(ConfigError):
        CacheGenCodec(2, profile).steps_for(5)


def test_cachegen_garbage_is_a_codec_error(record_factory: Callable[..., ChunkRecord]) -> None:
    record = record_factory()
    codec = CacheGenCodec(2)
    meta, payload = codec.encode(record.layers)
    shapes = [(tuple(k.shape), tuple(v.shape)) for k, v in record.layers]
    with pytest.raises(CodecError):
        codec.decode(meta, payload[:-7], shapes, record.dtype)
    with pytest.raises(CodecError):
        codec.decode({"group": 10, "tensors": []}, payload, shapes, record.dtype)


def test_unknown_codec_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match="cachegen"):
        get_codec("zip")
    with pytest.raises(ConfigError):
        get_codec("cachegen", level=17)


def test_shipped_profiles_load_by_alias() -> None:
    from ragzip.kvstore.codecs.cachegen import shipped_profiles

    assert "smollm2-135m-instruct" in shipped_profiles()
    codec = get_codec("cachegen:3", profile="smollm2-135m-instruct")
    steps = codec.steps_for(30)  # type: ignore[attr-defined]
    assert len(steps) == 30 and len({round(k, 6) for k, _ in steps}) > 3  # measured, not three bands
    with pytest.raises(ConfigError, match="shipped"):
        get_codec("cachegen", profile="no-such-model")
