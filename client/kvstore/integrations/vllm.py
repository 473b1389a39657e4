"""kvstored as a vLLM V1 KV connector (``KVConnectorBase_V1``).

vLLM loads it by module path::

    vllm serve meta-llama/Llama-3.1-8B-Instruct --kv-transfer-config '{
        "kv_connector": "KVStoreConnector",
        "kv_connector_module_path": "kvstore.integrations.vllm",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"address": "10.0.0.5:7070", "namespace": "llama3-8b"}}'

What it does:

* Scheduler side: ``get_num_new_matched_tokens`` names the prompt's full blocks
  with ``kvstore.keys.chain`` (sha256 over the token ids, mixed with the model,
  the KV dtype and geometry, TP/PP sizes, and the request's LoRA, cache salt and
  multimodal hashes) and asks kvstored with one ``Lookup`` how many leading blocks
  are stored; the hit (beyond vLLM's own prefix cache, and always leaving the last
  prompt token to compute) is loaded before the forward pass. As prefill proceeds,
  each newly complete prompt block is scheduled for saving.
* Worker side: ``register_kv_caches`` describes the paged cache with
  ``kvstore.torch.KVLayout.vllm``; ``start_load_kv`` scatters the hit blocks into
  their block ids with ``kvstore.torch.get_blocks``, and ``wait_for_save`` gathers
  the new blocks (every layer's K and V of one block is one object) and stores
  those kvstored does not have yet with ``put_blocks``. A block that cannot be
  loaded is reported through ``get_block_ids_with_load_errors`` and vLLM
  recomputes it; a failed save is logged (the cache is best-effort).
* Each tensor-parallel rank stores its own heads under its own keys; the
  scheduler's lookup asks for rank 0's, and a rank that misses reports a load
  error for the block.

Loads and saves are synchronous within the step (no ``get_finished`` async
transfers); hybrid (HMA) models with several KV-cache groups are not supported
(vLLM then disables its hybrid allocator or refuses the connector). With CUDA
caches, ``kvstore.torch`` stages through pinned memory on a side stream.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import TYPE_CHECKING, Any, Optional

try:
    import torch
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1,
                                                                   KVConnectorMetadata,
                                                                   KVConnectorRole)
except ImportError as e:  # pragma: no cover - exercised only without vllm
    raise ImportError(f"kvstore.integrations.vllm needs vLLM with the V1 KV connector API: {e}") from e

from .. import errors
from .. import keys as kvkeys
from ._config import ClientOptions, client_from_options, lookup_prefix

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger("kvstore.integrations.vllm")


@dataclasses.dataclass
class BlockTransfer:
    """Blocks of one request to move: ``keys[i]`` (scheduler-side base keys) <-> vLLM
    block id ``block_ids[i]``."""

    req_id: str
    keys: list[bytes]
    block_ids: list[int]


@dataclasses.dataclass
class KVStoreConnectorMetadata(KVConnectorMetadata):
    loads: list[BlockTransfer] = dataclasses.field(default_factory=list)
    saves: list[BlockTransfer] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Request:
    keys: list[bytes]                  # base keys of the prompt's full blocks
    block_ids: list[int] = dataclasses.field(default_factory=list)
    saved: int = 0                     # blocks [0, saved) are stored or scheduled to be


def rank_key(base: bytes, tp_rank: int, pp_rank: int) -> bytes:
    """The object key of one rank's share of a block (its heads, its layers)."""
    return hashlib.sha256(base + f"|tp{tp_rank}|pp{pp_rank}".encode()).digest()


class KVStoreConnector(KVConnectorBase_V1):
    """vLLM V1 KV connector backed by kvstored (see the module docstring)."""

    def __init__(self, vllm_config: "VllmConfig", role: "KVConnectorRole",
                 kv_cache_config: "Optional[KVCacheConfig]" = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self.options, rest = ClientOptions.from_mapping(extra, defaults={"namespace": "vllm"})
        for k in rest:
            log.warning("kv_connector_extra_config %r is not a kvstore setting (ignored)", k)
        self.block_size = int(vllm_config.cache_config.block_size)
        self._extra = self._model_identity(vllm_config, kv_cache_config)
        self.client = client_from_options(self.options)
        # scheduler side
        self._reqs: dict[str, _Request] = {}
        self._lookups: dict[str, tuple[list[bytes], int, int]] = {}
        self._loads: list[BlockTransfer] = []
        # worker side
        self.layout = None
        self.tp_rank, self.pp_rank = self._ranks()
        self._load_errors: set[int] = set()
        log.info("vLLM KV connector (%s) -> %s", getattr(role, "name", role), self.options.describe())

    # ------------------------------------------------------------ identity
    @staticmethod
    def _model_identity(vllm_config, kv_cache_config) -> bytes:
        """What makes KV bytes differ besides the tokens (mixed into every key)."""
        mc = getattr(vllm_config, "model_config", None)
        cc = vllm_config.cache_config
        pc = vllm_config.parallel_config
        dtype = str(getattr(cc, "cache_dtype", "auto"))
        if dtype == "auto" and mc is not None:
            dtype = str(getattr(mc, "dtype", "auto"))
        parts = ["vllm1", str(getattr(mc, "model", "") if mc else ""), dtype, f"bs{cc.block_size}",
                 f"tp{pc.tensor_parallel_size}", f"pp{pc.pipeline_parallel_size}"]
        groups = getattr(kv_cache_config, "kv_cache_groups", None) or []
        if groups:
            spec = groups[0].kv_cache_spec
            parts.append(f"{getattr(spec, 'num_kv_heads', '?')}x{getattr(spec, 'head_size', '?')}"
                         f"/{getattr(spec, 'dtype', '?')}")
        return "|".join(parts).encode()

    @staticmethod
    def _ranks() -> tuple[int, int]:
        try:
            from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank
            return int(get_tensor_model_parallel_rank()), int(get_pp_group().rank_in_group)
        except Exception:  # not initialised (a single process, tests): rank 0
            return 0, 0

    def _request_keys(self, request: "Request") -> list[bytes]:
        tokens = list(request.prompt_token_ids or [])
        extra = [self._extra]
        lora = getattr(request, "lora_request", None)
        if lora is not None:
            extra.append(f"lora={getattr(lora, 'lora_name', lora)}".encode())
        salt = getattr(request, "cache_salt", None)
        if salt:
            extra.append(f"salt={salt}".encode())
        for f in getattr(request, "mm_features", None) or []:
            extra.append(f"mm={getattr(f, 'identifier', f)}".encode())
        return kvkeys.chain(tokens, self.block_size, namespace=self.options.namespace,
                            extra=b"\0".join(extra))

    # ------------------------------------------------------------ scheduler side
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[Optional[int], bool]:
        keys = self._request_keys(request)
        n_prompt = len(request.prompt_token_ids or [])
        lookable = keys[:max(0, (n_prompt - 1) // self.block_size)]  # the last token is computed
        try:
            hit = lookup_prefix(self.client, [rank_key(k, 0, 0) for k in lookable]) if lookable else 0
        except errors.KVStoreError as e:
            log.warning("kvstore: lookup failed, no external hit: %s", e)
            hit = 0
        self._lookups[request.request_id] = (keys, num_computed_tokens, hit)
        return max(0, hit * self.block_size - num_computed_tokens), False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        keys, computed, hit = self._lookups.pop(request.request_id, (None, 0, 0))
        if keys is None:
            keys = self._request_keys(request)
        state = self._reqs.setdefault(request.request_id, _Request(keys))
        state.saved = max(state.saved, hit)  # stored already: never saved again
        if num_external_tokens <= 0:
            return
        ids = list(blocks.get_block_ids()[0])
        start = computed // self.block_size
        end = start + num_external_tokens // self.block_size
        if len(ids) >= end:
            ids = ids[start:end]
        ids = ids[:end - start]
        self._loads.append(BlockTransfer(request.request_id, keys[start:end], ids))

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = KVStoreConnectorMetadata(loads=self._loads)
        self._loads = []
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            state = self._reqs.get(new.req_id)
            if state is None:  # vLLM calls update_state_after_alloc first; never seen: skip
                continue
            state.block_ids = list(new.block_ids[0])
            self._plan_save(meta, new.req_id, state, new.num_computed_tokens + scheduled.get(new.req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._reqs.get(req_id)
            if state is None:
                continue
            new_ids = cached.new_block_ids[i]
            if new_ids is not None:
                if req_id in cached.resumed_req_ids:
                    state.block_ids = list(new_ids[0])  # all of the request's blocks
                else:
                    state.block_ids.extend(new_ids[0])
            self._plan_save(meta, req_id, state, cached.num_computed_tokens[i] + scheduled.get(req_id, 0))
        for req_id in scheduler_output.finished_req_ids:
            self._reqs.pop(req_id, None)
        return meta

    def _plan_save(self, meta: KVStoreConnectorMetadata, req_id: str, state: _Request, done_tokens: int):
        full = min(len(state.keys), done_tokens // self.block_size, len(state.block_ids))
        if full > state.saved:
            meta.saves.append(BlockTransfer(req_id, state.keys[state.saved:full],
                                            state.block_ids[state.saved:full]))
            state.saved = full

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, Optional[dict[str, Any]]]:
        self._reqs.pop(request.request_id, None)
        self._lookups.pop(request.request_id, None)
        return False, None  # saves finish within the step: blocks can be freed now

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a save that never happens is a future miss, nothing more

    # ------------------------------------------------------------ worker side
    def register_kv_caches(self, kv_caches: dict[str, "torch.Tensor"]):
        from ..torch import KVLayout

        layers = list(kv_caches.values())
        first = layers[0]
        if first.dim() == 5 and first.shape[0] == 2:
            self.layout = KVLayout.vllm(layers)
        elif first.dim() == 5 and first.shape[1] == 2:
            self.layout = KVLayout.vllm(layers, kv_first=False)
        else:  # MLA: one latent plane per layer, [num_blocks, block_size, head_size]
            self.layout = KVLayout(layers, engine="vllm-mla")
        log.info("kvstore: %r (tp rank %d, pp rank %d)", self.layout, self.tp_rank, self.pp_rank)

    def _keys(self, t: BlockTransfer) -> list[bytes]:
        return [rank_key(k, self.tp_rank, self.pp_rank) for k in t.keys]

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        from ..torch import get_blocks

        meta = self._get_connector_metadata()
        if not isinstance(meta, KVStoreConnectorMetadata) or not meta.loads:
            return
        for t in meta.loads:
            keys = self._keys(t)
            try:
                get_blocks(self.client, self.layout, keys, t.block_ids)
            except errors.KVStoreError as e:
                log.warning("kvstore: loading %d block(s) of %s failed (%s); finding which",
                            len(keys), t.req_id, e)
                for k, b in zip(keys, t.block_ids):
                    try:
                        get_blocks(self.client, self.layout, [k], [b])
                    except errors.KVStoreError:
                        self._load_errors.add(b)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv loaded every layer

    def save_kv_layer(self, layer_name: str, kv_layer: "torch.Tensor", attn_metadata: Any, **kwargs: Any) -> None:
        return  # whole blocks (every layer) are saved in wait_for_save

    def wait_for_save(self):
        from ..torch import put_blocks

        meta = self._get_connector_metadata()
        if not isinstance(meta, KVStoreConnectorMetadata) or not meta.saves:
            return
        for t in meta.saves:
            keys = self._keys(t)
            try:
                have = self.client.exists(keys)
                todo = [(k, b) for k, b, h in zip(keys, t.block_ids, have) if not h]
                if todo:
                    put_blocks(self.client, self.layout, [k for k, _ in todo], [b for _, b in todo])
            except errors.Conflict:
                pass  # the block is stored (bit-for-bit different, same prefix): keep it
            except errors.KVStoreError as e:
                log.warning("kvstore: %d block(s) of %s not saved: %s", len(keys), t.req_id, e)

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._load_errors = self._load_errors, set()
        return failed

    def shutdown(self):
        self.client.close()


__all__ = ["BlockTransfer", "KVStoreConnector", "KVStoreConnectorMetadata", "rank_key"]
