from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ragzip.kernels.attention import causal_mask, partial_attention, scatter_kv


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.data())
def test_mask_never_lets_a_token_see_a_later_one(n: int, data: st.DataObject) -> None:
    rows = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
    window = data.draw(st.one_of(st.none(), st.integers(1, n + 2)))
    q_pos = torch.tensor(sorted(rows))
    mask = causal_mask(q_pos, torch.arange(n), sliding_window=window)[0, 0]  # [r, N]
    for i, q in enumerate(q_pos.tolist()):
        for j in range(n):
            visible = j <= q and (window is None or q - j < window)
            assert (mask[i, j] == 0) == visible


def _full_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(1, 2)  # [B, S, H, D]


@pytest.mark.parametrize("groups", [1, 3])
def test_partial_attention_matches_full_causal_rows(groups: int) -> None:
    torch.manual_seed(0)
    n, h_kv, d = 12, 2, 8
    q = torch.randn(1, h_kv * groups, n, d)
    k, v = torch.randn(1, h_kv, n, d), torch.randn(1, h_kv, n, d)
    rows = torch.tensor([0, 3, 4, 11])
    full = _full_causal(q, k, v, 0.3)
    part = partial_attention(q[:, :, rows], k, v, rows, scaling=0.3)
    torch.testing.assert_close(part, full[:, rows], atol=1e-5, rtol=1e-5)


def test_later_keys_do_not_change_earlier_queries() -> None:
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    rows = torch.tensor([2, 5, 6])
    out = partial_attention(q, k, v, rows, scaling=0.35)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 7:] += 100.0
    v2[:, :, 7:] -= 100.0
    torch.testing.assert_close(partial_attention(q, k2, v2, rows, scaling=0.35), out)


def test_scatter_kv_writes_rows_in_place() -> None:
    cache = torch.zeros(1, 2, 5, 3)
    fresh = torch.ones(1, 2, 2, 3)
    out = scatter_kv(cache, torch.tensor([1, 4]), fresh)
    assert out is cache
    assert cache[0, :, [1, 4]].eq(1).all() and cache[0, :, [0, 2, 3]].eq(0).all()
