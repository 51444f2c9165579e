from __future__ import annotations

import torch

from ragzip.kvstore.calibrate import agreement, continuation_logits, measure_sensitivity
from ragzip.kvstore.prefill import prefill_chunk


def test_agreement_of_identical_logits_is_perfect() -> None:
    logits = torch.randn(5, 11)
    assert agreement(logits, logits) == (1.0, 0.0)
    top1, kl = agreement(logits, -logits)
    assert top1 < 1.0 and kl > 0


def test_sensitivity_profile_shape_and_sign(tiny_llama: torch.nn.Module) -> None:
    record = prefill_chunk(tiny_llama, list(range(3, 30)))
    cont = [40, 41, 42, 43, 44, 45]
    ref = continuation_logits(tiny_llama, record.layers, cont)
    assert ref.shape == (len(cont), 99)
    profile = measure_sensitivity(tiny_llama, [(record, cont)], step=0.5)
    assert len(profile.sensitivity) == 2 and profile.fingerprint == record.fingerprint
    # KL is never negative; on a tiny random model some tensors barely matter, but noise must show somewhere.
    values = [s for pair in profile.sensitivity for s in pair]
    assert all(s >= 0 for s in values) and max(values) > 0
