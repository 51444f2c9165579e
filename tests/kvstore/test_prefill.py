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


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gemma"])
def test_header_conditioned_chunk_equals_the_slice_of_a_full_forward(name: str, request: pytest.FixtureRequest) -> None:
    """A chunk computed after the prompt header holds exactly the header+chunk forward's K/V for its tokens."""
    model = request.getfixturevalue(name)
    header, chunk = list(range(40, 47)), list(range(1, 15))
    record = prefill_chunk(model, chunk, header)
    assert record.start == len(header) and record.context == tuple(header) and record.token_ids == tuple(chunk)
    cache = DynamicCache()
    with torch.no_grad():
        model.model(input_ids=torch.tensor([header + chunk]), cache=cache, use_cache=True)
    for (k, v), layer in zip(record.layers, cache.layers):
        torch.testing.assert_close(k, layer.keys[0, :, len(header):], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(v, layer.values[0, :, len(header):], atol=1e-6, rtol=1e-5)
    alone = prefill_chunk(model, chunk)
    assert record.key != alone.key  # another entry than the chunk computed alone
    assert not torch.allclose(record.layers[-1][1], alone.layers[-1][1])  # the header changes the chunk's V


def test_loader_hits_only_with_the_same_context(tiny_llama: torch.nn.Module) -> None:
    from ragzip.kvstore.loader import get_or_compute
    from ragzip.kvstore.stores.memory import MemoryStore

    store = MemoryStore()
    _, hit = get_or_compute(store, tiny_llama, [5, 6, 7], [1, 2])
    assert not hit
    record, hit = get_or_compute(store, tiny_llama, [5, 6, 7], [1, 2])
    assert hit and record.context == (1, 2) and record.start == 2
    assert not get_or_compute(store, tiny_llama, [5, 6, 7], [1, 3])[1]
    assert not get_or_compute(store, tiny_llama, [5, 6, 7])[1]
