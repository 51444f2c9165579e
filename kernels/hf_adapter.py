"""The one place that touches transformers internals (checked against transformers 5.24).

`HFAdapter` wraps a loaded causal LM of a supported family (Llama/SmolLM2, Qwen2, Gemma-3 text) and
exposes what the blended prefill needs: embeddings, per-layer RoPE tables and inverse frequencies,
a K/V projection for deviation scoring, one decoder layer run against a scatter cache with an explicit
4D mask, the LM head, and HF caches for generation. Unsupported configurations raise
`UnsupportedModelError` when the adapter is built, never later.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ragzip.kernels.attention import scatter_kv
from ragzip.kernels.errors import UnsupportedModelError
from ragzip.kernels.rope import rotate_half

LayerKV = tuple[Tensor, Tensor]

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "gemma3_text")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
SUPPORTED_ATTENTION = ("sdpa", "eager")


class ScatterCache:
    """Per-request, per-layer stand-in for an HF `Cache` during a blended pass.

    The attention module calls ``update(k, v, layer_idx)`` with the fresh K/V of the rows it is
    computing; we scatter them into the reused full-length tensors at ``index`` and hand back the
    whole cache, so the selected queries attend over every token. Only ``update`` is used by the
    decoder layers of the supported families.
    """

    def __init__(self, key_cache: Tensor, value_cache: Tensor, index: Tensor, *, limit: int | None = None) -> None:
        self.key_cache = key_cache  # [1, H_kv, N, D]
        self.value_cache = value_cache  # [1, H_kv, N, D]
        self.index = index  # [r]
        self.limit = limit  # hand back only keys [0, limit) (the rows' queries see nothing later)

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> LayerKV:
        scatter_kv(self.key_cache, self.index, key_states)
        scatter_kv(self.value_cache, self.index, value_states)
        if self.limit is None:
            return self.key_cache, self.value_cache
        return self.key_cache[:, :, : self.limit], self.value_cache[:, :, : self.limit]


def _text_config(model: Any) -> Any:
    return model.config.get_text_config(decoder=True)


class HFAdapter:
    """Blending hooks for one loaded HF causal LM.

    Args:
        model: a ``*ForCausalLM`` of a supported family, in eval mode.

    Raises:
        UnsupportedModelError: unknown family, flash/flex attention, RoPE with dynamic scaling or
            partial rotary dimensions, bidirectional or soft-capped attention.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        cfg = _text_config(model)
        self.config = cfg
        self.model_type: str = cfg.model_type
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"selective recompute supports model types {list(SUPPORTED_MODEL_TYPES)}, not {self.model_type!r}"
            )
        impl = model.config._attn_implementation
        if impl not in SUPPORTED_ATTENTION:
            raise UnsupportedModelError(
                f"attention implementation {impl!r} cannot take the exact 4D blend mask; load the model with "
                f"attn_implementation='sdpa' (or 'eager')"
            )
        self.attn_implementation: str = impl
        if getattr(cfg, "use_bidirectional_attention", False):
            raise UnsupportedModelError("bidirectional attention cannot reuse causal chunk caches")
        if getattr(cfg, "attn_logit_softcapping", None) is not None and impl == "sdpa":
            raise UnsupportedModelError("attention soft-capping needs attn_implementation='eager'")
        self.base = model.model
        self.layers = list(self.base.layers)
        self.num_layers = len(self.layers)
        self.layer_types: list[str] = list(getattr(cfg, "layer_types", None) or ["full_attention"] * self.num_layers)
        bad = sorted({t for t in self.layer_types if t not in ("full_attention", "sliding_attention")})
        if bad:
            raise UnsupportedModelError(f"layer types {bad} are not supported by the blended prefill")
        window = getattr(cfg, "sliding_window", None)
        self.sliding_windows: list[int | None] = [
            window if t == "sliding_attention" else None for t in self.layer_types
        ]
        self.head_dim: int = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.num_kv_heads: int = cfg.num_key_value_heads
        self._inv_freq = {t: self._layer_inv_freq(t) for t in set(self.layer_types)}
        self.final_softcap: float | None = getattr(cfg, "final_logit_softcapping", None)

    def _rope_params(self, layer_type: str) -> dict[str, Any]:
        params = dict(self.config.rope_parameters or {})
        if self.model_type == "gemma3_text":
            params = dict(params.get(layer_type, params))
        return params

    def _layer_inv_freq(self, layer_type: str) -> Tensor:
        params = self._rope_params(layer_type)
        rope_type = params.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"RoPE type {rope_type!r} is not supported for chunk KV reuse (supported: "
                f"{list(SUPPORTED_ROPE_TYPES)}); 'dynamic' and 'longrope' change the frequencies with the "
                f"sequence length, so a chunk cached alone cannot be re-rotated into a longer prompt"
            )
        rotary = self.base.rotary_emb
        name = f"{layer_type}_inv_freq" if self.model_type == "gemma3_text" else "inv_freq"
        inv_freq = getattr(rotary, name).detach().float().cpu()  # [D_rot / 2]
        if 2 * inv_freq.numel() != self.head_dim or float(params.get("partial_rotary_factor", 1.0)) != 1.0:
            raise UnsupportedModelError(
                f"partial rotary embeddings (rotary dim {2 * inv_freq.numel()} of head dim {self.head_dim}) are not "
                f"supported for {self.model_type!r}"
            )
        return inv_freq

    # -- per-layer facts -------------------------------------------------------------------------
    def inv_freq(self, layer_idx: int) -> Tensor:
        """``[D / 2]`` unscaled inverse RoPE frequencies of a layer."""
        return self._inv_freq[self.layer_types[layer_idx]]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # -- forward pieces ---------------------------------------------------------------------------
    def embed(self, input_ids: Tensor) -> Tensor:
        """``[1, S]`` ids -> ``[1, S, hidden]`` (Gemma's sqrt(hidden) scaling included)."""
        return self.model.get_input_embeddings()(input_ids)

    def position_embeddings(self, layer_idx: int, hidden: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """HF cos/sin ``[1, S, D]`` for a layer (attention scaling included, as the model applies it)."""
        if self.model_type == "gemma3_text":
            return self.base.rotary_emb(hidden, position_ids, self.layer_types[layer_idx])  # type: ignore[no-any-return]
        return self.base.rotary_emb(hidden, position_ids)  # type: ignore[no-any-return]

    def project_kv(self, layer_idx: int, hidden: Tensor, cos: Tensor, sin: Tensor) -> LayerKV:
        """Fresh rotated K and V ``[1, H_kv, S, D]`` of a layer for ``hidden [1, S, hidden]`` (the layer input)."""
        layer = self.layers[layer_idx]
        attn = layer.self_attn
        normed = layer.input_layernorm(hidden)
        shape = (*normed.shape[:-1], -1, self.head_dim)
        key = attn.k_proj(normed).view(shape).transpose(1, 2)  # [1, H_kv, S, D]
        value = attn.v_proj(normed).view(shape).transpose(1, 2)  # [1, H_kv, S, D]
        if self.model_type == "gemma3_text":
            key = attn.k_norm(key)
        key = key * cos[:, None] + rotate_half(key) * sin[:, None]
        return key, value

    def project_q(self, layer_idx: int, hidden: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Rotated queries ``[1, H, S, D]`` of a layer for ``hidden [1, S, hidden]`` (the layer input)."""
        layer = self.layers[layer_idx]
        attn = layer.self_attn
        normed = layer.input_layernorm(hidden)
        query = attn.q_proj(normed).view(*normed.shape[:-1], -1, self.head_dim).transpose(1, 2)  # [1, H, S, D]
        if self.model_type == "gemma3_text":
            query = attn.q_norm(query)
        return query * cos[:, None] + rotate_half(query) * sin[:, None]  # type: ignore[no-any-return]

    def attention_scaling(self, layer_idx: int) -> float:
        """The softmax scale of a layer's attention (``head_dim ** -0.5``, or Gemma's query_pre_attn_scalar)."""
        return float(self.layers[layer_idx].self_attn.scaling)

    def run_layer(
        self,
        layer_idx: int,
        hidden: Tensor,
        position_ids: Tensor,
        position_embeddings: tuple[Tensor, Tensor],
        cache: ScatterCache,
        *,
        attention_mask: Tensor | None,
    ) -> Tensor:
        """Run one decoder layer on ``hidden [1, r, hidden]``; K/V go through ``cache``."""
        return self.layers[layer_idx](  # type: ignore[no-any-return]
            hidden,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            position_embeddings=position_embeddings,
        )

    def can_use_implicit_causal(self, layer_idx: int, num_tokens: int) -> bool:
        """True when a full in-order pass may skip the mask (SDPA's ``is_causal`` with q_len == kv_len)."""
        window = self.sliding_windows[layer_idx]
        return self.attn_implementation == "sdpa" and (window is None or num_tokens <= window)

    def logits(self, hidden: Tensor) -> Tensor:
        """``[1, r, hidden]`` last-layer states -> ``[1, r, V]`` float32 logits."""
        logits = self.model.lm_head(self.base.norm(hidden)).float()
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits  # type: ignore[no-any-return]

    # -- HF caches for generation ---------------------------------------------------------------
    def make_cache(self, kv: Sequence[LayerKV]) -> Any:
        """An HF `DynamicCache` holding a fused prompt cache (sliding layers keep their own window)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.config)
        for layer_idx, (key, value) in enumerate(kv):
            cache.update(key, value, layer_idx)
        return cache

    def full_prefill(self, input_ids: Tensor) -> tuple[Tensor, Any]:
        """Plain HF prefill: ``[1, S]`` ids -> (last-token logits ``[V]`` float32, HF cache)."""
        out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1].float(), out.cache

    def forward_with_cache(self, input_ids: Tensor, cache: Any, start: int, *, logits_to_keep: int = 0) -> Tensor:
        """Feed ``[1, S]`` ids after ``start`` cached tokens; returns ``[S', V]`` float32 logits and extends cache."""
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)[None]
        out = self.model(
            input_ids=input_ids, cache=cache, position_ids=positions, use_cache=True, logits_to_keep=logits_to_keep
        )
        return out.logits[0].float()  # type: ignore[no-any-return]

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of one token's K and V over all layers in the model's dtype."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    def cache_layers(self, cache: Any) -> list[LayerKV]:
        """Full-attention K/V ``[1, H_kv, S, D]`` per layer from an HF cache (all layers must hold every token)."""
        out = []
        for layer in cache.layers:
            if getattr(layer, "is_sliding", False):
                raise UnsupportedModelError("sliding-window cache layers do not hold every token")
            out.append((layer.keys, layer.values))
        return out
