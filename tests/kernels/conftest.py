from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch

TinyFactory = Callable[..., Any]


def _build(family: str, **overrides: Any) -> Any:
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    common: dict[str, Any] = dict(
        vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2,
    )
    common.update(overrides)
    torch.manual_seed(0)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif family == "gemma3":
        common.setdefault("head_dim", 8)
        common.setdefault("sliding_window", 16)
        common.setdefault("layer_types", ["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
        common.setdefault("query_pre_attn_scalar", 8)
        model = Gemma3ForCausalLM(Gemma3TextConfig(**common))
    else:
        raise ValueError(family)
    return model.eval()


_CACHE: dict[str, Any] = {}


@pytest.fixture
def tiny_model() -> TinyFactory:
    """A fresh copy of a tiny random fp32 model of a family ('llama', 'qwen2', 'gemma3')."""

    def make(family: str = "llama", **overrides: Any) -> Any:
        if overrides:
            return _build(family, **overrides)
        if family not in _CACHE:
            _CACHE[family] = _build(family)
        return copy.deepcopy(_CACHE[family])

    return make
