from __future__ import annotations

import pytest
import torch

from ragzip.kernels.errors import UnsupportedModelError
from ragzip.kernels.hf_adapter import HFAdapter
from ragzip.kernels.rope import apply_rotation, rerotate_keys, rope_cos_sin

INV_FREQ = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float) / 16))  # D = 16


def _rotate_at(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    cos, sin = rope_cos_sin(inv_freq, positions)
    return apply_rotation(x, cos, sin)


@pytest.mark.parametrize("delta", [0, 1, 37, 4000])
def test_rerotation_equals_direct_rotation_at_global_position(delta: int) -> None:
    torch.manual_seed(0)
    raw = torch.randn(1, 2, 10, 16)  # [B, H_kv, S, D]
    local = torch.arange(10)
    cached = _rotate_at(raw, local, INV_FREQ)
    moved = rerotate_keys(cached, delta, INV_FREQ)
    direct = _rotate_at(raw, local + delta, INV_FREQ)
    torch.testing.assert_close(moved, direct, atol=1e-4, rtol=1e-4)


def test_per_token_deltas_and_round_trip() -> None:
    torch.manual_seed(1)
    k = torch.randn(2, 6, 16)  # [H_kv, S, D]
    delta = torch.tensor([0, 3, 3, 100, 100, 7])
    back = rerotate_keys(rerotate_keys(k, delta, INV_FREQ), -delta, INV_FREQ)
    torch.testing.assert_close(back, k, atol=1e-5, rtol=1e-5)
    bf16 = k.bfloat16()
    back16 = rerotate_keys(rerotate_keys(bf16, delta, INV_FREQ), -delta, INV_FREQ)
    torch.testing.assert_close(back16.float(), bf16.float(), atol=5e-2, rtol=2e-2)


def test_partial_rotary_leaves_pass_through_dims() -> None:
    torch.manual_seed(2)
    raw = torch.randn(2, 5, 16)
    inv_freq = INV_FREQ[:4]  # rotary dim 8 of 16
    cached = _rotate_at(raw, torch.arange(5), inv_freq)
    moved = rerotate_keys(cached, 9, inv_freq)
    torch.testing.assert_close(moved, _rotate_at(raw, torch.arange(5) + 9, inv_freq), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moved[..., 8:], raw[..., 8:])


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128},
    ],
)
def test_model_keys_rerotate_to_global_positions(tiny_model, rope: dict) -> None:  # type: ignore[no-untyped-def]
    """The model's own rotated keys (yarn: with attention scaling) move exactly by re-rotation."""
    adapter = HFAdapter(tiny_model("llama", rope_parameters=rope))
    torch.manual_seed(3)
    hidden = torch.randn(1, 7, 32)
    local, glob = torch.arange(7)[None], torch.arange(7)[None] + 50
    k_local, _ = adapter.project_kv(0, hidden, *adapter.position_embeddings(0, hidden, local))
    k_glob, _ = adapter.project_kv(0, hidden, *adapter.position_embeddings(0, hidden, glob))
    torch.testing.assert_close(rerotate_keys(k_local, 50, adapter.inv_freq(0)), k_glob, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
        {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    ],
)
def test_unsupported_rope_is_refused(tiny_model, rope: dict) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UnsupportedModelError, match="RoPE|rotary"):
        HFAdapter(tiny_model("llama", rope_parameters=rope))
