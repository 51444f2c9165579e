"""`RagzipConnector`: vLLM's v1 KV connector backed by a ragzip chunk store (memory, disk or Redis).

Loaded by vLLM, never by ragzip itself:

    --kv-transfer-config '{"kv_connector": "RagzipConnector", "kv_connector_module_path": "ragzip.vllm",
                           "kv_role": "kv_both",
                           "kv_connector_extra_config": {"store": "redis://127.0.0.1:6379/0"}}'

The scheduler half decides (see `plan`): for a new request it cuts the prompt into segments, looks their keys up and
claims the longest block-aligned run it can supply beyond vLLM's own prefix cache; as a step completes a segment it
asks the worker to save it. The worker half moves K/V between vLLM's paged cache (through `PagedLayout`) and
`ChunkRecord`s in the store, verifying each entry before use (checksum and key, then fingerprint, token ids and
context); a failed load is reported as load-error blocks, which vLLM recomputes. Nothing here raises into vLLM for
a cache problem: the worst case is a miss.

Extra config keys (`kv_connector_extra_config`):
    store: `memory` | `disk:/path` | `redis://host:port/db` (required; `memory` is per process).
    codec: the store's codec at rest, `raw` (default: loads are exact) | `int8` | `kvtc:...`.
    chunk_tokens: segment length for prompts without ragzip spans (default 256; a multiple of the block size).
    moved_documents: also reuse a document found at another position, keys re-rotated (default false: an
        approximation, see docs/vllm.md for its measured quality).
    stats_path: a JSON file each half rewrites with its counters (`<stats_path>.scheduler.json` / `.worker.json`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from vllm import _custom_ops as ops
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

from ragzip.errors import ConfigError
from ragzip.kernels.rope import default_inv_freq
from ragzip.kvstore.fingerprint import config_fields, fields_fingerprint
from ragzip.kvstore.stores.base import ByteStore, open_store
from ragzip.vllm.paged import PagedLayout
from ragzip.vllm.plan import Claim, Load, Segment, parse_spans, plan_claim, segments, slots_for, to_save
from ragzip.vllm.transfer import build_records, load_entry

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger("ragzip.vllm")

_STORES: dict[tuple[str, str], ByteStore] = {}
_STORES_LOCK = threading.Lock()


def shared_store(spec: str, codec: str) -> ByteStore:
    """One store per (spec, codec) per process: vLLM's scheduler and worker halves share it when they run in one
    process (which is what makes `memory` usable at all)."""
    with _STORES_LOCK:
        store = _STORES.get((spec, codec))
        if store is None:
            store = _STORES[(spec, codec)] = open_store(spec, codec=codec)
        return store


def weights_identity(model: str, revision: str | None) -> str:
    """What tells two checkpoints of one architecture apart: for a local folder, each weight file's name, size and
    first 64 KiB (the safetensors header with every tensor's name and offsets, and the first tensor's bytes); for a
    hub name, the name and revision."""
    path = Path(model)
    if not path.is_dir():
        return f"{model}@{revision or 'main'}"
    h = hashlib.blake2b(digest_size=16)
    for f in sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf", ".pt")):
        h.update(f"{f.name}:{f.stat().st_size}:".encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 16))
    return h.hexdigest()


def vllm_fingerprint(vllm_config: VllmConfig) -> str:
    """The fingerprint of KV computed by this vLLM: architecture, RoPE, dtype, KV cache dtype, weights, and vLLM's
    version (its kernels' numerics may change between releases)."""
    import vllm

    mc = vllm_config.model_config
    fields = config_fields(mc.hf_config)
    fields["dtype"] = str(mc.dtype).removeprefix("torch.")
    fields["kv_cache_dtype"] = vllm_config.cache_config.cache_dtype
    fields["weights"] = weights_identity(mc.model, mc.revision)
    fields["engine"] = f"vllm-{vllm.__version__}"
    return "vllm-" + fields_fingerprint(fields)


@dataclass(frozen=True)
class ConnectorSettings:
    store: str
    codec: str = "raw"
    chunk_tokens: int = 256
    moved_documents: bool = False
    stats_path: str | None = None

    @classmethod
    def from_extra(cls, extra: dict[str, Any], block_size: int) -> ConnectorSettings:
        unknown = set(extra) - {"store", "codec", "chunk_tokens", "moved_documents", "stats_path"}
        if unknown:
            raise ConfigError(f"unknown ragzip connector settings {sorted(unknown)}")
        if not isinstance(extra.get("store"), str):
            raise ConfigError("the ragzip connector needs kv_connector_extra_config.store "
                              "(memory, disk:/path or redis://host:port/db)")
        chunk = extra.get("chunk_tokens", 256)
        if not isinstance(chunk, int) or chunk <= 0 or chunk % block_size:
            raise ConfigError(f"chunk_tokens must be a positive multiple of the block size {block_size}, got {chunk!r}")
        return cls(store=extra["store"], codec=str(extra.get("codec", "raw")), chunk_tokens=chunk,
                   moved_documents=bool(extra.get("moved_documents", False)), stats_path=extra.get("stats_path"))


@dataclass
class LoadOp:
    req_id: str
    prefix: list[int]  # prompt tokens up to the end of the last segment loaded from
    loads: list[Load]
    block_ids: list[int]


@dataclass
class SaveOp:
    req_id: str
    prefix: list[int]  # prompt tokens up to the segment's end
    segment: Segment
    slots: list[int]
    also_moved: bool  # store the position-free entry too


@dataclass
class RagzipMetadata(KVConnectorMetadata):
    loads: list[LoadOp] = field(default_factory=list)
    saves: list[SaveOp] = field(default_factory=list)


@dataclass
class _Request:
    tokens: list[int]
    segments: list[Segment]
    claim: Claim | None = None
    block_ids: list[int] = field(default_factory=list)
    load_pending: bool = False
    saved: int = 0
    local_hit: int = 0


class RagzipConnector(KVConnectorBase_V1):
    """Chunk KV reuse for vLLM through a ragzip store (see the module docstring)."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.block_size = vllm_config.cache_config.block_size
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self.settings = ConnectorSettings.from_extra(extra, self.block_size)
        self.fingerprint = vllm_fingerprint(vllm_config)
        self.store = shared_store(self.settings.store, self.settings.codec)
        self.counts: dict[str, int] = {"requests": 0, "claimed_tokens": 0, "claimed_requests": 0, "moved_tokens": 0,
                                       "loaded_segments": 0, "load_failures": 0, "saved_segments": 0,
                                       "save_failures": 0, "bad_params": 0, "unsupported": 0,
                                       "saves_dropped": 0}
        self._model_config = vllm_config.model_config
        self._cache_dtype = vllm_config.cache_config.cache_dtype
        self._requests: dict[str, _Request] = {}
        self._skipped: set[str] = set()  # requests the connector leaves alone (see _keyed_by_tokens)
        self._caches: list[torch.Tensor] = []
        self._layout: PagedLayout | None = None
        self._load_errors: set[int] = set()
        self._pending_saves: dict[tuple[str, int], tuple[SaveOp, dict[int, tuple[torch.Tensor, torch.Tensor]]]] = {}
        self._layer_index: dict[str, int] = {}
        self._inv_freq: torch.Tensor | None = None
        self._last_stats: dict[str, Any] | None = None
        # Worker: requests whose load failed this life, and from which position: vLLM ran that step on the blocks
        # it will recompute, so nothing of theirs from there on may be saved.
        self._failed_from: dict[str, int] = {}
        if role == KVConnectorRole.SCHEDULER and self._kv_transfer_config.kv_load_failure_policy != "recompute":
            # A cache that fails to load is a miss, never a failed request: vLLM recomputes those blocks.
            log.info("ragzip connector: kv_load_failure_policy set to 'recompute'")
            self._kv_transfer_config.kv_load_failure_policy = "recompute"
        self.moved = self.settings.moved_documents
        self.enabled = self._check_model()
        log.info("ragzip connector (%s): store %s, codec %s, fingerprint %s, moved documents %s", role.name,
                 self.settings.store, self.settings.codec, self.fingerprint, self.moved)

    # --- checks ------------------------------------------------------------------------------------------------
    def _check_model(self) -> bool:
        parallel = self._vllm_config.parallel_config
        if parallel.world_size > 1:
            # Each rank holds a shard of the heads under the same token ids: one key cannot describe both.
            log.warning("ragzip connector disabled: tensor/pipeline parallel (world size %d) is not supported",
                        parallel.world_size)
            return False
        if str(self._cache_dtype) != "auto":
            log.warning("ragzip connector disabled: KV cache dtype %s (only the model's own dtype is supported)",
                        self._cache_dtype)
            return False
        if self.moved:
            cfg = self._model_config.hf_config.get_text_config()
            params = getattr(cfg, "rope_parameters", None) or {}
            theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            if params.get("rope_type", "default") != "default" or theta is None or \
                    float(params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0))) != 1.0:
                log.warning("ragzip connector: moved documents need plain RoPE; turned off for this model")
                self.moved = False
            else:
                self._inv_freq = default_inv_freq(float(theta), int(head_dim))
        return True

    def _write_stats(self) -> None:
        """Rewrite the stats file when a counter changed (counters only: no scan of the store on the step path)."""
        if not self.settings.stats_path:
            return
        snapshot = {**self.counts, "store": self.store.counters(), "fingerprint": self.fingerprint,
                    "enabled": self.enabled}
        if snapshot == self._last_stats:
            return
        self._last_stats = snapshot
        path = Path(f"{self.settings.stats_path}.{self.role.name.lower()}.json")
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(snapshot))
            tmp.replace(path)
        except OSError as exc:
            log.warning("ragzip connector: cannot write stats to %s: %s", path, exc)

    # --- scheduler side ----------------------------------------------------------------------------------------
    def _request_state(self, request: Request) -> _Request:
        state = self._requests.get(request.request_id)
        if state is None:
            tokens = list(request.prompt_token_ids or [])
            try:
                spans = parse_spans(request.kv_transfer_params, len(tokens))
            except ConfigError as exc:
                log.warning("ragzip connector: ignoring the spans of request %s: %s", request.request_id, exc)
                self.counts["bad_params"] += 1
                spans = None
            segs = segments(self.fingerprint, tokens, spans, chunk_tokens=self.settings.chunk_tokens,
                            moved=self.moved)
            state = self._requests[request.request_id] = _Request(tokens, segs)
            self.counts["requests"] += 1
        return state

    @staticmethod
    def _keyed_by_tokens(request: Request) -> bool:
        """Whether token ids alone determine the request's KV (no adapter, no images, no embeddings, no salt)."""
        return not (request.lora_request or request.mm_features or request.prompt_embeds is not None
                    or request.cache_salt)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        if not self.enabled:
            return 0, False
        if not self._keyed_by_tokens(request):
            if request.request_id not in self._skipped:
                self._skipped.add(request.request_id)
                self.counts["unsupported"] += 1
            return 0, False
        state = self._request_state(request)
        seen: dict[str, bool] = {}

        def available(key: str) -> bool:
            if key not in seen:
                seen[key] = self.store.contains(key)
            return seen[key]

        state.claim = plan_claim(state.segments, len(state.tokens), num_computed_tokens, self.block_size, available)
        state.local_hit = num_computed_tokens
        return state.claim.tokens, False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        state = self._requests.get(request.request_id)
        if state is None or state.claim is None:
            return
        if num_external_tokens <= 0:
            state.claim = Claim(state.claim.computed, state.claim.computed)
            return
        if num_external_tokens != state.claim.tokens:  # vLLM took less than offered: trim the loads to match
            end = state.claim.computed + num_external_tokens
            state.claim = Claim(state.claim.computed, end,
                                [Load(ld.segment, ld.lo, min(ld.hi, end), ld.moved) for ld in state.claim.loads
                                 if ld.lo < end])
        state.load_pending = True

    def _saves(self, req_id: str, state: _Request, done_before: int, done_after: int) -> list[SaveOp]:
        if done_before >= len(state.tokens) or not state.block_ids:
            return []
        stop_at = state.claim.first_moved if state.claim else None
        if self.moved and state.local_hit:
            # vLLM's prefix cache may hold blocks an earlier moved load filled (and what was computed after them):
            # with moved documents on, a request that started from it saves nothing under an exact key.
            return []
        out = []
        for seg in to_save(state.segments, done_before, min(done_after, len(state.tokens)), stop_at=stop_at,
                           present=self.store.contains):
            try:
                slots = slots_for(state.block_ids, self.block_size, seg.start, seg.end)
            except ConfigError:
                continue
            also_moved = seg.moved_key is not None and not self.store.contains(seg.moved_key)
            out.append(SaveOp(req_id, state.tokens[:seg.end], seg, slots, also_moved))
        return out

    def _emit_load(self, meta: RagzipMetadata, req_id: str, state: _Request) -> None:
        if state.load_pending and state.claim is not None and state.claim.loads:
            covered = max(ld.segment.end for ld in state.claim.loads)  # an entry is checked whole
            meta.loads.append(LoadOp(req_id, state.tokens[:covered], state.claim.loads, state.block_ids))
            self.counts["claimed_requests"] += 1
            self.counts["claimed_tokens"] += state.claim.tokens
            self.counts["moved_tokens"] += sum(ld.hi - ld.lo for ld in state.claim.loads if ld.moved)
        state.load_pending = False

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = RagzipMetadata()
        if not self.enabled:
            return meta
        for new in scheduler_output.scheduled_new_reqs:
            state = self._requests.get(new.req_id)
            if state is None:
                continue
            state.block_ids = list(new.block_ids[0])
            self._emit_load(meta, new.req_id, state)
            done_after = new.num_computed_tokens + scheduler_output.num_scheduled_tokens.get(new.req_id, 0)
            meta.saves += self._saves(new.req_id, state, 0, done_after)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._requests.get(req_id)
            if state is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                state.block_ids = list(new_blocks[0]) if new_blocks else []
                self._emit_load(meta, req_id, state)  # asked again after preemption: load into the new blocks
            elif new_blocks:
                state.block_ids += list(new_blocks[0])
            done_before = cached.num_computed_tokens[i]
            done_after = done_before + scheduler_output.num_scheduled_tokens.get(req_id, 0)
            meta.saves += self._saves(req_id, state, done_before, done_after)
        self._write_stats()
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._skipped.discard(request.request_id)
        state = self._requests.pop(request.request_id, None)
        if state is None:
            return False, None
        claim = state.claim
        info = {"prompt_tokens": len(state.tokens), "local_prefix_tokens": state.local_hit,
                "loaded_tokens": claim.tokens if claim else 0,
                "moved_tokens": sum(ld.hi - ld.lo for ld in claim.loads if ld.moved) if claim else 0,
                "segments": len(state.segments)}
        return False, {"ragzip": info}

    # --- worker side -------------------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        names = sorted(kv_caches, key=extract_layer_index)
        self._layer_index = {name: i for i, name in enumerate(names)}
        self._caches = [kv_caches[n] for n in names]
        first = self._caches[0]
        if first.device.type != "cpu" or first.dim() != 4 or first.shape[2] != self.block_size:
            log.warning("ragzip connector disabled: KV cache %s on %s is not vLLM's CPU layout [blocks, heads, "
                        "block, 2 * head dim]", tuple(first.shape), first.device)
            self.enabled = False
            return
        heads, head_dim = first.shape[1], first.shape[3] // 2
        isa = _get_attn_isa(first.dtype, self.block_size, head_dim, self._cache_dtype)

        def write(key: torch.Tensor, value: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                  slots: torch.Tensor) -> None:
            ops.cpu_attn_reshape_and_cache(key, value, kc, vc, slots, isa, k_scale=1.0, v_scale=1.0,
                                           kv_cache_dtype="auto")

        try:
            self._layout = PagedLayout.probe(write, block_size=self.block_size, heads=heads, head_dim=head_dim,
                                             dtype=first.dtype)
        except ConfigError as exc:
            log.warning("ragzip connector disabled: %s", exc)
            self.enabled = False

    def _blocks_of(self, op: LoadOp, lo: int, hi: int) -> set[int]:
        return {op.block_ids[p // self.block_size] for p in range(lo, hi) if p // self.block_size < len(op.block_ids)}

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        if not self.enabled or self._layout is None or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, RagzipMetadata)
        for op in meta.loads:
            for load in op.loads:
                try:
                    problem = load_entry(self.store, load, op.prefix, fingerprint=self.fingerprint,
                                         caches=self._caches, layout=self._layout, block_ids=op.block_ids,
                                         inv_freq=self._inv_freq)
                except Exception as exc:  # never a wrong cache, never a failed request: recompute
                    problem = f"{type(exc).__name__}: {exc}"
                if problem is not None:
                    log.warning("ragzip connector: cannot load %s for %s (%s); vLLM recomputes it",
                                load.segment.key, op.req_id, problem)
                    self.counts["load_failures"] += 1
                    self._load_errors |= self._blocks_of(op, load.lo, load.hi)
                    self._failed_from[op.req_id] = min(self._failed_from.get(op.req_id, load.lo), load.lo)
                else:
                    self.counts["loaded_segments"] += 1

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata,
                      **kwargs: Any) -> None:
        if not self.enabled or self._layout is None or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if not isinstance(meta, RagzipMetadata) or not meta.saves:
            return
        index = self._layer_index.get(layer_name)
        if index is None:
            return
        for op in meta.saves:
            if op.segment.end > self._failed_from.get(op.req_id, op.segment.end):
                continue  # computed on the blocks of a failed load: dropped in wait_for_save
            entry = self._pending_saves.setdefault((op.req_id, op.segment.start), (op, {}))
            entry[1][index] = self._layout.gather(kv_layer, op.slots)

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata() if self.has_connector_metadata() else None
        if isinstance(meta, RagzipMetadata):
            self.counts["saves_dropped"] += sum(op.segment.end > self._failed_from.get(op.req_id, op.segment.end)
                                                for op in meta.saves)
        if not self._pending_saves:
            return
        pending, self._pending_saves = self._pending_saves, {}
        for op, layers in pending.values():
            if len(layers) != len(self._caches):
                self.counts["save_failures"] += 1
                continue
            try:
                for key, record in build_records(self.fingerprint, op.segment, op.prefix,
                                                 [layers[i] for i in range(len(self._caches))],
                                                 moved=op.also_moved):
                    self.store.put(key, record)
                self.counts["saved_segments"] += 1
            except Exception as exc:  # a failed save is a future miss
                log.warning("ragzip connector: cannot save %s: %s", op.segment.key, exc)
                self.counts["save_failures"] += 1
        self._write_stats()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        for req_id in finished_req_ids:
            self._failed_from.pop(req_id, None)
        return None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        if errors:
            self._write_stats()
        return errors


__all__ = ["RagzipConnector", "RagzipMetadata", "shared_store", "vllm_fingerprint", "weights_identity"]
