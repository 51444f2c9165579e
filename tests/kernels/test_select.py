from __future__ import annotations

import pytest
import torch

from ragzip.kernels.select import gradual_ratios, kv_deviation, num_to_select, random_scores, select_tokens


def test_kv_deviation_per_token_sums_heads_and_dims() -> None:
    cached = torch.zeros(1, 2, 4, 3)  # [B, H_kv, S, D]
    fresh = cached.clone()
    fresh[0, 0, 2] = 1.0
    fresh[0, 1, 2] = 2.0
    fresh[0, 1, 0, 0] = 0.5
    torch.testing.assert_close(kv_deviation(fresh, cached), torch.tensor([0.25, 0.0, 15.0, 0.0]))


def test_select_keeps_forced_and_top_scores_sorted() -> None:
    scores = torch.tensor([5.0, 1.0, 9.0, 3.0, 7.0, 0.0])
    forced = torch.tensor([False, True, False, False, False, True])
    idx = select_tokens(scores, forced, 2)
    assert idx.tolist() == [1, 2, 4, 5]
    assert select_tokens(scores, forced, 0).tolist() == [1, 5]
    assert select_tokens(scores, forced, 99).tolist() == list(range(6))


def test_num_to_select_and_bounds() -> None:
    assert num_to_select(100, 0.15) == 15
    assert num_to_select(7, 0.0) == 0
    assert num_to_select(7, 1.0) == 7
    with pytest.raises(ValueError):
        num_to_select(7, 1.5)


def test_gradual_ratios_shrink_to_final() -> None:
    ratios = gradual_ratios(0.15, start_ratio=0.6, num_layers=4)
    assert len(ratios) == 5 and ratios[0] == pytest.approx(0.6) and ratios[-1] == pytest.approx(0.15)
    assert all(a > b for a, b in zip(ratios, ratios[1:]))
    assert gradual_ratios(0.15, start_ratio=0.6, num_layers=0) == [0.15]


def test_random_scores_are_seeded() -> None:
    assert torch.equal(random_scores(10, seed=3), random_scores(10, seed=3))
    assert not torch.equal(random_scores(10, seed=3), random_scores(10, seed=4))
