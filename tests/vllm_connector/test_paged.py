"""PagedLayout learns a kernel's packing of the paged KV cache and reads/writes token ranges through it.

The writers here stand in for vLLM's `cpu_attn_reshape_and_cache` (whose real packings, plain values and packed
keys, are checked against the kernel by `make vllm-e2e`, where vLLM is installed): one packs keys transposed and
in reversed blocks of four dims, like a SIMD kernel would; one writes plain rows; one quantizes (not readable).
"""

from __future__ import annotations

import pytest
import torch

from ragzip.errors import ConfigError
from ragzip.vllm.paged import PagedLayout, split_cache

N, H, D = 16, 2, 8


def packed_writer(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                  slots: torch.Tensor) -> None:
    """Keys stored as [D, N] per tile with dims permuted; values plain [N, D]."""
    perm = torch.arange(D).view(-1, 4).flip(1).reshape(-1)
    for s, slot in enumerate(slots.tolist()):
        b, o = divmod(slot, N)
        for h in range(key.shape[1]):
            flat = key_cache[b, h].reshape(-1)  # a view: N * D contiguous elements of the tile's key half
            for d in range(D):
                flat[int(perm[d]) * N + o] = key[s, h, d]
            value_cache[b, h, o] = value[s, h]


def plain_writer(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 slots: torch.Tensor) -> None:
    b, o = slots // N, slots % N
    key_cache[b, :, o] = key
    value_cache[b, :, o] = value


def quantizing_writer(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                      slots: torch.Tensor) -> None:
    plain_writer((key / 4).round() * 4, value, key_cache, value_cache, slots)


@pytest.mark.parametrize("writer", [packed_writer, plain_writer])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gather_reads_back_what_the_kernel_wrote_and_scatter_writes_it_the_same_way(writer, dtype) -> None:
    layout = PagedLayout.probe(writer, block_size=N, heads=H, head_dim=D, dtype=dtype)
    cache = torch.zeros(6, H, N, 2 * D, dtype=dtype)
    slots = torch.tensor([3 * N + 5, 3 * N + 6, 1 * N + 15, 4 * N + 0, 4 * N + 1])
    key, value = torch.randn(5, H, D).to(dtype), torch.randn(5, H, D).to(dtype)
    writer(key, value, *split_cache(cache), slots)
    k, v = layout.gather(cache, slots)
    assert torch.equal(k, key.permute(1, 0, 2)) and torch.equal(v, value.permute(1, 0, 2))
    again = torch.zeros_like(cache)
    layout.scatter(again, slots, k, v)
    assert torch.equal(again, cache)  # byte for byte what the kernel's own write leaves


def test_a_packing_that_is_not_a_permutation_is_refused() -> None:
    with pytest.raises(ConfigError, match="not a permutation"):
        PagedLayout.probe(quantizing_writer, block_size=N, heads=H, head_dim=D, dtype=torch.bfloat16)


def test_shapes_are_checked() -> None:
    layout = PagedLayout.probe(plain_writer, block_size=N, heads=H, head_dim=D, dtype=torch.float32)
    with pytest.raises(ConfigError, match="does not match"):
        layout.gather(torch.zeros(2, H + 1, N, 2 * D), [0])
    with pytest.raises(ConfigError, match="do not fit"):
        layout.scatter(torch.zeros(2, H, N, 2 * D), [0, 1], torch.zeros(H, 1, D), torch.zeros(H, 1, D))
