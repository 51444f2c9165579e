"""RoPE re-rotation of cached keys (Hugging Face half-split layout).

A key cached at chunk-local position ``p`` carries the rotation ``R(p)``; placed at global position
``p + delta`` it needs ``R(p + delta) = R(delta) R(p)``, so we rotate it once more by ``delta``.
The layout is HF's ``rotate_half`` one (pairs ``(i, i + D/2)``), not gpt-fast's interleaved pairs.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rotate_half(x: Tensor) -> Tensor:
    """Rotate half the last dimension: ``[x1, x2] -> [-x2, x1]`` (HF layout)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_cos_sin(inv_freq: Tensor, positions: Tensor, *, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """cos/sin tables for ``positions``, without any attention scaling.

    Args:
        inv_freq: ``[D_rot / 2]`` inverse frequencies of the layer.
        positions: ``[S]`` integer positions (or position offsets).
        dtype: dtype of the returned tables.

    Returns:
        ``(cos, sin)``, each ``[S, D_rot]``.
    """
    # float64 keeps the angle exact enough for offsets in the tens of thousands
    freqs = positions.to(torch.float64)[:, None] * inv_freq.to(torch.float64)[None, :]  # [S, D_rot/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [S, D_rot]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotation(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first ``D_rot`` dims of ``x [..., S, D]`` by ``cos/sin [S, D_rot]``; the rest pass through."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


def default_inv_freq(theta: float, rotary_dim: int) -> Tensor:
    """Inverse frequencies of plain RoPE (``rope_type: default``): ``theta ** (-2i / D_rot)``, ``[D_rot / 2]``.

    For engines whose model objects ragzip does not hold (vLLM): the same values HF's default rotary embedding
    computes, in float32.
    """
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary dim must be even and positive, got {rotary_dim}")
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))


def rerotate_keys(key_states: Tensor, delta: Tensor | int, inv_freq: Tensor) -> Tensor:
    """Move cached keys by ``delta`` positions.

    Args:
        key_states: ``[..., S, D]`` keys already rotated at their old positions.
        delta: a position offset, or ``[S]`` per-token offsets (new position minus old).
        inv_freq: ``[D_rot / 2]`` inverse frequencies of the layer (without attention scaling: the cached
            keys already carry it, so applying it again would scale K twice). ``D_rot < D`` is partial rotary.

    Returns:
        Keys as if rotated directly at the new positions, same shape and dtype.
    """
    seq_len = key_states.shape[-2]
    if isinstance(delta, int):
        if delta == 0:
            return key_states
        delta = torch.full((seq_len,), delta, dtype=torch.long)
    cos, sin = rope_cos_sin(inv_freq, delta.to(key_states.device), dtype=torch.float32)  # [S, D_rot]
    out = apply_rotation(key_states.float(), cos.to(key_states.device), sin.to(key_states.device))
    return out.to(key_states.dtype)
