from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from ragzip.errors import InputError
from ragzip.kvstore.fingerprint import model_fingerprint
from ragzip.kvstore.prefill import prefill_chunk


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gemma"])
def test_continuing_from_record_matches_full_forward(name: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(name)
    ids = torch.arange(1, 25).unsqueeze(0)  # [1, 24]; longer than Gemma's sliding window of 4
    full = model(ids).logits
    record = prefill_chunk(model, ids[0, :19].tolist())
    assert record.start == 0 and record.num_tokens == 19
    assert all(k.shape[1] == 19 and v.shape[1] == 19 for k, v in record.layers)  # sliding layers hold all
    cache = DynamicCache(ddp_cache_data=record.to_cache_data())
    out = model(ids[:, 19:], cache=cache).logits
    torch.testing.assert_close(out, full[:, 19:], atol=1e-5, rtol=1e-4)


def test_layer_types_and_fingerprint(tiny_gemma: torch.nn.Module, tiny_llama: torch.nn.Module) -> None:
    record = prefill_chunk(tiny_gemma, [1, 2, 3])
    assert record.layer_types == ("sliding_attention", "sliding_attention", "full_attention")
    assert prefill_chunk(tiny_llama, [1, 2, 3]).layer_types == ("full_attention",) * 2
    assert model_fingerprint(tiny_llama) != model_fingerprint(tiny_gemma)
    assert model_fingerprint(tiny_llama) == model_fingerprint(tiny_llama)


def test_fingerprint_sees_weights_and_dtype(tiny_llama: torch.nn.Module) -> None:
    import copy

    other = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        other.model.embed_tokens.weight.add_(0.01)
    assert model_fingerprint(other) != model_fingerprint(tiny_llama)
    assert model_fingerprint(copy.deepcopy(tiny_llama).to(torch.bfloat16)) != model_fingerprint(tiny_llama)


def test_empty_chunk_is_an_input_error(tiny_llama: torch.nn.Module) -> None:
    with pytest.raises(InputError):
        prefill_chunk(tiny_llama, [])
