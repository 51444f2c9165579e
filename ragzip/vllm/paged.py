"""Reading and writing one token range of vLLM's paged KV cache, whatever order the attention kernel packs it in.

vLLM's CPU attention keeps a layer's cache as `[num_blocks, H_kv, block_size, 2 * D]`: per block and head, the
keys' `block_size * D` elements, then the values'. Inside that tile the kernel may pack keys in its own order
(the AVX-512 "vec" kernel does; values are plain there, and AMX packs both). Rather than hard-code each kernel's
packing, `PagedLayout.probe` writes index-coded keys and values through the kernel's own write function once,
and reads back where every `(token, dim)` landed. Gather and scatter then use that map, so the connector stores
K/V as plain `[H_kv, S, D]` tensors (the layout ragzip's codecs and RoPE code expect) and loads them back exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ragzip.errors import ConfigError

# write(key [S, H, D], value [S, H, D], key_cache, value_cache, slot_mapping [S]) with the caches as the kernel
# sees them: each `[num_blocks, H, block_size, D]` views of one `[num_blocks, H, block_size, 2 * D]` tensor.
CacheWriter = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], None]

# bf16 and fp16 hold every integer up to 256 exactly: a position is written as base-256 digits, one pass each.
_DIGIT = 256


def split_cache(cache: Tensor) -> tuple[Tensor, Tensor]:
    """The key and value views of a `[num_blocks, H, block_size, 2 * D]` CPU cache, as vLLM's kernels take them."""
    blocks, heads, block_size, two_d = cache.shape
    view = cache.view(blocks, heads, 2 * block_size, two_d // 2)
    key_cache, value_cache = view.chunk(2, dim=2)
    return key_cache, value_cache


@dataclass(frozen=True)
class PagedLayout:
    """Where each `(offset in block, dim)` of a key or value lives inside its block-and-head tile.

    Attributes:
        block_size: tokens per block.
        heads: KV heads.
        head_dim: D.
        key_pos: `[block_size, D]` flat index, in the tile's first `block_size * D` elements, of each key element.
        value_pos: the same for values, in the tile's second half (indices counted from its start).
    """

    block_size: int
    heads: int
    head_dim: int
    key_pos: Tensor
    value_pos: Tensor

    @classmethod
    def probe(cls, write: CacheWriter, *, block_size: int, heads: int, head_dim: int,
              dtype: torch.dtype) -> PagedLayout:
        """Learn the packing by writing index-coded K/V through `write` into a scratch one-block cache.

        Raises:
            ConfigError: the kernel does not place each element exactly once (a packing that is not a permutation,
                e.g. a quantized cache), so the connector cannot read it.
        """
        n = block_size * head_dim
        index = torch.arange(n, dtype=torch.long).view(block_size, head_dim)
        found = {"key": torch.zeros(heads, n, dtype=torch.long), "value": torch.zeros(heads, n, dtype=torch.long)}
        digits = 1
        while _DIGIT ** digits < n:
            digits += 1
        slots = torch.arange(block_size, dtype=torch.long)
        for d in range(digits):
            code = ((index // _DIGIT ** d) % _DIGIT).to(dtype)  # [N, D], exact in bf16/fp16/fp32
            coded = code[:, None, :].expand(block_size, heads, head_dim).contiguous()
            cache = torch.zeros(1, heads, block_size, 2 * head_dim, dtype=dtype)
            key_cache, value_cache = split_cache(cache)
            write(coded, coded.clone(), key_cache, value_cache, slots)
            tile = cache.view(1, heads, 2, n)[0].to(torch.long)  # [H, 2, N]: read back the digit at each place
            found["key"] += tile[:, 0] * _DIGIT ** d
            found["value"] += tile[:, 1] * _DIGIT ** d
        positions = {}
        for part, where in found.items():
            # where[h, place] = the (offset, dim) index stored at place: invert it into place per index.
            if not all(torch.equal(where[h].sort().values, torch.arange(n)) for h in range(heads)):
                raise ConfigError(f"the attention kernel's {part} cache is not a permutation of its input "
                                  "(a quantized or unknown layout); the ragzip connector cannot read it")
            if not all(torch.equal(where[h], where[0]) for h in range(heads)):
                raise ConfigError(f"the attention kernel packs {part}s differently per head; not supported")
            pos = torch.empty(n, dtype=torch.long)
            pos[where[0]] = torch.arange(n)
            positions[part] = pos.view(block_size, head_dim)
        return cls(block_size, heads, head_dim, positions["key"], positions["value"])

    def _index(self, slots: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        blocks = (slots // self.block_size)[:, None]  # [S, 1]
        offsets = slots % self.block_size
        return blocks, self.key_pos[offsets], self.value_pos[offsets]  # [S, 1], [S, D], [S, D]

    def _tiles(self, cache: Tensor) -> Tensor:
        blocks, heads, block_size, two_d = cache.shape
        if (heads, block_size, two_d) != (self.heads, self.block_size, 2 * self.head_dim):
            raise ConfigError(f"cache {tuple(cache.shape)} does not match the probed layout "
                              f"[*, {self.heads}, {self.block_size}, {2 * self.head_dim}]")
        return cache.view(blocks, heads, 2, block_size * self.head_dim)

    def gather(self, cache: Tensor, slots: Sequence[int] | Tensor) -> tuple[Tensor, Tensor]:
        """K and V of the tokens at `slots`, each `[H, S, D]` (copies)."""
        slot_t = torch.as_tensor(slots, dtype=torch.long)
        tiles = self._tiles(cache)
        blocks, kpos, vpos = self._index(slot_t)
        # Advanced indices split by the head slice: the result is [S, D, H].
        key = tiles[blocks, :, 0, kpos].permute(2, 0, 1).contiguous()
        value = tiles[blocks, :, 1, vpos].permute(2, 0, 1).contiguous()
        return key, value

    def scatter(self, cache: Tensor, slots: Sequence[int] | Tensor, key: Tensor, value: Tensor) -> None:
        """Write K and V (`[H, S, D]`) at `slots`, in place."""
        slot_t = torch.as_tensor(slots, dtype=torch.long)
        if key.shape != (self.heads, len(slot_t), self.head_dim) or value.shape != key.shape:
            raise ConfigError(f"K {tuple(key.shape)} / V {tuple(value.shape)} do not fit {len(slot_t)} slots of "
                              f"[{self.heads}, S, {self.head_dim}]")
        tiles = self._tiles(cache)
        blocks, kpos, vpos = self._index(slot_t)
        tiles[blocks, :, 0, kpos] = key.permute(1, 2, 0).to(cache.dtype)
        tiles[blocks, :, 1, vpos] = value.permute(1, 2, 0).to(cache.dtype)


__all__ = ["CacheWriter", "PagedLayout", "split_cache"]
