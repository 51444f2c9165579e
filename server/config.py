"""Server configuration: one validated object, read from a JSON file and/or built in code."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ragzip.compressors.registry import COMPRESSORS, canonical_method
from ragzip.errors import ConfigError

OverloadPolicy = Literal["queue", "uncompressed", "reject"]


def _unknown_stages(method: str) -> list[str]:
    """The stages of a method or '+'-joined pipeline that are not registered compressors."""
    return [n for n in method.split("+") if n not in COMPRESSORS]


def _one_budget(rate: float | None, target_tokens: int | None) -> None:
    if rate is not None and target_tokens is not None:
        raise ValueError("give at most one of rate and target_tokens")


class KeyPolicy(BaseModel):
    """What one API key gets (`keys` in the server config): its compression defaults, its load policy, its limit.

    Example: {"method": "exit", "rate": 0.5, "on_overload": "uncompressed", "rate_limit_rps": 5}
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    compress: bool = Field(default=True, description="False: this key's requests are never compressed (opt-out)")
    method: str | None = Field(default=None, description="This key's default compressor (a request may name "
                                                         "another allowed one)")
    rate: float | None = Field(default=None, gt=0, le=1)
    target_tokens: int | None = Field(default=None, gt=0)
    options: dict[str, object] | None = Field(default=None, description="Options of this key's default method")
    on_overload: OverloadPolicy | None = Field(default=None, description="Overrides the server's on_overload")
    rate_limit_rps: float | None = Field(default=None, gt=0, description="This key's sustained requests/s "
                                                                         "(default: the server's)")
    rate_limit_burst: int | None = Field(default=None, gt=0)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = canonical_method(value)
        if _unknown_stages(value):
            raise ValueError(f"unknown method {value!r}; valid: {sorted(COMPRESSORS)}, or '+'-joined")
        return value

    @model_validator(mode="after")
    def _check(self) -> KeyPolicy:
        _one_budget(self.rate, self.target_tokens)
        return self


class ServerConfig(BaseModel):
    """Everything the proxy can be told at startup. Unknown keys are rejected.

    Example (JSON file for `ragzip serve --config server.json`):
        {"upstream": "http://127.0.0.1:8001/v1", "method": "exit", "rate": 0.5, "api_keys": ["sk-local"]}
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Generation backend: an OpenAI-compatible upstream (base URL including /v1) or, when None, the local engine.
    upstream: str | None = Field(default=None, description="OpenAI-compatible base URL, e.g. http://host:8000/v1")
    upstream_api_key: str | None = Field(default=None, description="Bearer key sent to the upstream")
    upstream_timeout_s: float = Field(default=120.0, gt=0, description="Read timeout for one upstream call")
    upstream_connect_timeout_s: float = Field(default=5.0, gt=0)
    upstream_kind: Literal["openai", "vllm"] = Field(
        default="openai", description="openai: forward chat completions; vllm: send the answer prompt as token ids "
        "to the upstream's /v1/completions, documents in a canonical order with their spans in kv_transfer_params "
        "(for vLLM's prefix cache and the ragzip KV connector)")
    upstream_tokenizer: str | None = Field(default=None, description="upstream_kind vllm: the served model's "
                                           "tokenizer (packaged alias, local path or hub name)")
    canonical_order: bool = Field(default=True, description="upstream_kind vllm: put documents in a canonical order "
                                  "so a set that recurs in another order is the same prompt")
    llm: str | None = Field(default=None, description="Local engine model (default: Settings.llm)")
    dtype: str | None = Field(default=None, description="Local engine dtype (default: Settings.dtype)")
    device: str | None = Field(default=None, description="auto | cpu | cuda | cuda:N for every model the proxy "
                                                         "loads (default: Settings.device)")
    model_name: str = Field(default="ragzip-local", description="Model name the local engine reports")
    kv_store: str | None = Field(default=None, description="Local engine KV reuse store: memory, disk:/p, redis://")
    kv_mode: Literal["auto", "blend", "prefix", "reuse", "full"] = Field(
        default="auto", description="KV reuse mode: auto blends only where the model is qualified (`ragzip kv "
                                    "qualify`), else exact prefix reuse, which answers as full prefill")
    kv_ratio: float | None = Field(default=None, ge=0, le=1, description="Recompute ratio of kv_mode blend "
                                                                         "(default 0.15)")
    max_new_tokens: int = Field(default=512, gt=0, description="Cap on max_tokens for the local engine")
    default_max_new_tokens: int = Field(default=128, gt=0)

    # Compression defaults (a request's `ragzip` object overrides them).
    method: str = Field(default="exit", description="Compressor or '+'-joined pipeline")
    rate: float | None = Field(default=None, gt=0, le=1)
    target_tokens: int | None = Field(default=None, gt=0)
    tokenizer: str | None = Field(default=None, description="Tokenizer that counts budgets (default: the LLM's)")
    options: dict[str, object] = Field(default_factory=dict, description="Options of the default method")
    allowed_methods: list[str] | None = Field(default=None, description="The methods requests may name: "
                                              "registered names, or pipelines listed whole ('exit+lingua2')")
    allow_request_options: bool = Field(default=False, description="Let requests pass compressor options")
    warm_compressor: bool = Field(default=True, description="Load the default compressor's models at start; "
                                                            "/readyz is 503 until they are loaded")
    batch_window_ms: float = Field(default=4.0, ge=0, le=100, description="Compressions that arrive within this "
                                   "many ms of each other share batched encoder forwards (0: no waiting)")
    max_batch: int = Field(default=16, gt=0, le=256, description="The most requests compressed in one batch")
    on_overload: OverloadPolicy = Field(
        default="queue", description="When the compressor's queue would take longer than compress_wait_ms: queue "
        "(wait anyway), uncompressed (forward the chat request uncompressed, header x-ragzip-fallback: overload) "
        "or reject (429 with Retry-After at once)")
    compress_wait_ms: float = Field(default=2000.0, gt=0, description="The longest expected wait for the "
                                    "compressor before on_overload applies")
    compress_timeout_ms: float | None = Field(default=None, gt=0, description="A chat request whose compression "
                                              "takes longer is forwarded uncompressed (x-ragzip-fallback: timeout); "
                                              "/v1/compress answers 504")
    result_cache_mb: float = Field(default=64.0, ge=0, description="Memory for remembered compression results, "
                                   "per worker (0: no result cache)")
    result_cache_ttl_s: float = Field(default=3600.0, gt=0, description="How long the shared (Redis) result "
                                      "cache keeps an entry")

    # Deployment: worker processes and state they share.
    workers: int | Literal["auto"] = Field(default=1, description="Worker processes (auto: one per core); each "
                                                                  "loads the models once")
    shared: str | None = Field(default=None, description="redis://host:port/db holding what workers and replicas "
                               "share: rate-limit buckets, the result cache, the index's ids and documents")
    keys: dict[str, KeyPolicy] = Field(default_factory=dict, description="Accepted API keys with their own "
                                       "method, budget, overload policy and rate limit (beside api_keys)")

    # The proxy's own index.
    embedder: str | None = None
    chunk_tokens: int = Field(default=256, gt=0)
    top_k: int = Field(default=5, gt=0, le=100)
    max_index_chunks: int = Field(default=100_000, gt=0)

    # Protection.
    api_keys: list[str] = Field(default_factory=list, description="Accepted keys; empty = no auth")
    max_body_bytes: int = Field(default=8 << 20, gt=0)
    max_documents: int = Field(default=256, gt=0)
    max_concurrency: int = Field(default=8, gt=0, description="Requests in flight; more wait in the queue")
    queue_depth: int = Field(default=64, ge=0, description="Requests that may wait for a slot; more get 429")
    queue_timeout_s: float = Field(default=10.0, ge=0, description="Longest wait in the queue before a 429")
    rate_limit_rps: float | None = Field(default=None, gt=0, description="Sustained requests/s per API key (per "
                                                                         "client address without keys); None: off")
    rate_limit_burst: int = Field(default=20, gt=0, description="Requests a key may send at once above the rate")
    max_document_chars: int = Field(default=100_000, gt=0, description="Longest text of one document")
    max_context_chars: int = Field(default=200_000, gt=0, description="Longest total text of a request's "
                                                                        "documents (however they arrive)")
    drain_timeout_s: float = Field(default=30.0, ge=0, description="On SIGTERM, how long in-flight requests may "
                                                                   "finish before the server exits")
    readiness_timeout_s: float = Field(default=2.0, gt=0, description="Timeout of /readyz's upstream probe")

    @field_validator("method")
    @classmethod
    def _canonical_method(cls, value: str) -> str:
        return canonical_method(value)  # as requests' methods are compared: "EXIT" is "exit"

    @field_validator("allowed_methods")
    @classmethod
    def _canonical_allowed(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        names = [canonical_method(m) for m in value]
        unknown = sorted({n for m in names for n in _unknown_stages(m)})
        if unknown:
            raise ValueError(f"allowed_methods names unknown compressors {unknown}; valid: {sorted(COMPRESSORS)}")
        return names

    @model_validator(mode="after")
    def _check(self) -> ServerConfig:
        _one_budget(self.rate, self.target_tokens)
        if self.upstream is not None and not self.upstream.startswith(("http://", "https://")):
            raise ValueError(f"upstream must be an http(s) URL, got {self.upstream!r}")
        if self.kv_store is not None:
            _check_store_spec(self.kv_store)
        if self.upstream_kind == "vllm" and (self.upstream is None or self.upstream_tokenizer is None):
            raise ValueError("upstream_kind 'vllm' needs upstream (vLLM's base URL) and upstream_tokenizer (the served "
                             "model's tokenizer)")
        if isinstance(self.workers, int) and not 1 <= self.workers <= 64:
            raise ValueError(f"workers must be 1..64 or 'auto', got {self.workers}")
        if self.shared is not None and not self.shared.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"shared must be a redis:// (or rediss://, unix://) URL, got {self.shared!r}")
        if any(not k.strip() for k in self.keys):
            raise ValueError("keys: an API key may not be empty")
        if self.max_document_chars > self.max_context_chars:
            raise ValueError("max_document_chars must be <= max_context_chars")
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError("default_max_new_tokens must be <= max_new_tokens")
        if not (self.method.endswith(".json") and Path(self.method).is_file()):
            unknown = _unknown_stages(self.method)
            if unknown:
                raise ValueError(f"unknown method {self.method!r} ({', '.join(map(repr, unknown))}); valid: "
                                 f"{sorted(COMPRESSORS)}, '+'-joined, or a pipeline JSON file")
        return self

    @property
    def accepted_keys(self) -> list[str]:
        """Every accepted API key: api_keys and the keys of `keys` (empty: no auth)."""
        return list(dict.fromkeys([*self.api_keys, *self.keys]))

    def worker_count(self) -> int:
        """`workers`, with auto as one per core this process may use."""
        if self.workers != "auto":
            return int(self.workers)
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _check_store_spec(spec: str) -> None:
    """The syntax of a KV store spec (reachability is checked when the server starts)."""
    if spec == "memory" or spec.startswith(("redis://", "rediss://", "unix://")):
        return
    path = spec.removeprefix("disk:")
    if not path or "://" in path:
        raise ValueError(f"kv_store {spec!r}: use memory, disk:/path or redis://host:port/db")


def load_config(path: str | Path | None, **overrides: object) -> ServerConfig:
    """Read a JSON server config (or none) and apply non-None `overrides`; an overriding `rate` or
    `target_tokens` replaces the file's budget (both are never set at once).

    Raises:
        ConfigError: unreadable file, invalid JSON or invalid values (the message lists each problem).
    """
    data: dict[str, object] = {}
    if path is not None:
        try:
            loaded = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read server config {path}: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        data.update(loaded)
    given = {k: v for k, v in overrides.items() if v is not None}
    if {"rate", "target_tokens"} & set(given):
        data.pop("rate", None)
        data.pop("target_tokens", None)
    data.update(given)
    try:
        return ServerConfig(**data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid server config: {problems}") from None
