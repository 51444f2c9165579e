"""Model fingerprints: what must match for a stored KV to be valid for a model."""

from __future__ import annotations

import hashlib
import json
from typing import Any

_CONFIG_FIELDS = (
    "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "intermediate_size", "rms_norm_eps", "rope_parameters", "layer_types", "sliding_window",
    "query_pre_attn_scalar", "partial_rotary_factor", "max_position_embeddings",
)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def config_fields(config: Any) -> dict[str, Any]:
    """The architecture and RoPE facts of a (text) config that shape K/V."""
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return {name: _jsonable(getattr(config, name, None)) for name in _CONFIG_FIELDS}


def fields_fingerprint(fields: dict[str, Any]) -> str:
    """`<model_type>-<dtype>-<hash of every field>`."""
    digest = hashlib.blake2b(json.dumps(fields, sort_keys=True).encode("utf-8"), digest_size=8).hexdigest()
    return f"{fields['model_type']}-{fields['dtype']}-{digest}"


def fingerprint_fields(model: Any) -> dict[str, Any]:
    """The facts a fingerprint hashes: architecture config, RoPE settings, dtype, revision, a weight sample."""
    import torch

    fields = config_fields(model.config)
    fields["revision"] = getattr(model.config, "_commit_hash", None)
    fields["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    # Two fine-tunes of one architecture share every config field: a small sample of the weights that shape K/V
    # (embeddings and the first and last layers' parameters) tells them apart without hashing the whole model.
    h = hashlib.blake2b(digest_size=16)
    params = list(model.named_parameters())
    with torch.no_grad():
        for _name, p in params[:4] + params[-4:]:
            sample = p.detach().reshape(-1)[:4096].to("cpu", torch.float32).contiguous()
            h.update(sample.numpy().tobytes())
    fields["weights_sample"] = h.hexdigest()
    return fields


def model_fingerprint(model: Any) -> str:
    """A short stable id of a model's KV semantics: `<model_type>-<dtype>-<hash>`.

    Two loads of the same weights at the same dtype give the same fingerprint wherever they live on disk;
    another dtype, RoPE configuration, revision or fine-tune gives another one. Cached on the model object
    (edit weights in place and the cached value is stale).

    Args:
        model: a transformers causal LM.

    Returns:
        For example `llama-bfloat16-3f9c0a1d2e4b5c6d`.
    """
    first = next(model.parameters())
    # Cached per (dtype, storage): a cast or a copy gets a fresh fingerprint. In-place weight edits are not seen.
    dtype = f"{first.dtype}@{first.data_ptr()}"
    cached = getattr(model, "_ragzip_fingerprint", None)
    if isinstance(cached, tuple) and cached[0] == dtype:
        return str(cached[1])
    fp = fields_fingerprint(fingerprint_fields(model))
    try:
        model._ragzip_fingerprint = (dtype, fp)
    except AttributeError:  # objects with __slots__: recompute next time
        pass
    return fp
