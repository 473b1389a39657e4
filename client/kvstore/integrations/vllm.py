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
  prompt token to compute) is loaded before the forward pass. The hit blocks are
  leased (a kvstored pin with a TTL, ``lease_ttl``) so they are not evicted before
  the worker has loaded them; the worker (or the scheduler, for blocks it does not
  hand over) unpins them, and an abandoned lease lapses by itself. As prefill
  proceeds, each newly complete prompt block is scheduled for saving.
* Worker side: ``register_kv_caches`` describes the paged cache with
  ``kvstore.torch.KVLayout.vllm``; ``start_load_kv`` scatters the hit blocks into
  their block ids with ``kvstore.torch.get_blocks``, and ``wait_for_save`` gathers
  the new blocks (every layer's K and V of one block is one object) and stores
  those kvstored does not have yet with ``put_blocks``. A block that cannot be
  loaded is reported through ``get_block_ids_with_load_errors`` (vLLM recomputes
  it when ``kv_load_failure_policy`` is ``"recompute"``; see docs/integrations.md);
  a failed save is logged (the cache is best-effort).
* A store that does not answer never stalls a step: the SDK fails fast on a refused
  connection, and after one such failure a circuit breaker (``_breaker.Breaker``)
  answers lookups with no hit, loads with load errors and skips saves, probing the
  store again after a short back-off.
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
    # the engine first: without it this fails at once, before torch's seconds-long import
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1,
                                                                   KVConnectorMetadata,
                                                                   KVConnectorRole)
    import torch
except ImportError as e:  # pragma: no cover - exercised only without vllm
    raise ImportError(f"kvstore.integrations.vllm needs vLLM with the V1 KV connector API: {e}") from e

from .. import errors
from .. import keys as kvkeys
from ._breaker import Breaker, is_outage
from ._config import ClientOptions, client_from_options, lookup_prefix

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger("kvstore.integrations.vllm")

# kv_connector_extra_config keys of this connector besides the client options
_SETTINGS = {"lease_ttl": 60.0}


@dataclasses.dataclass
class BlockTransfer:
    """Blocks of one request to move: ``keys[i]`` (scheduler-side base keys) <-> vLLM
    block id ``block_ids[i]``."""

    req_id: str
    keys: list[bytes]
    block_ids: list[int]
    leased: bool = False  # the scheduler pinned these blocks: the worker unpins them after loading


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
        settings = dict(_SETTINGS)
        for k, v in rest.items():
            if k in settings:
                settings[k] = v
            else:
                log.warning("kv_connector_extra_config %r is not a kvstore setting (ignored)", k)
        try:
            self.lease_ttl = float(settings["lease_ttl"])
        except (TypeError, ValueError):
            raise errors.InvalidArgument(f"kvstore option lease_ttl: not a number: {settings['lease_ttl']!r}") from None
        self.block_size = int(vllm_config.cache_config.block_size)
        self._extra = self._model_identity(vllm_config, kv_cache_config)
        pc = vllm_config.parallel_config
        self._rank_grid = [(tp, pp) for tp in range(int(pc.tensor_parallel_size))
                           for pp in range(int(pc.pipeline_parallel_size))]
        self.client = client_from_options(self.options)
        self.breaker = Breaker(f"vLLM {getattr(role, 'name', role)}", probe=self.client.ping)
        # scheduler side
        self._reqs: dict[str, _Request] = {}
        self._lookups: dict[str, tuple[list[bytes], int, int]] = {}
        self._leases: dict[str, list[bytes]] = {}  # request -> base keys pinned for it
        self._loads: list[BlockTransfer] = []
        # worker side
        self.layout = None
        self.tp_rank, self.pp_rank = self._ranks()
        self._load_errors: set[int] = set()
        log.info("vLLM KV connector (%s) -> %s", getattr(role, "name", role), self.options.describe())
        policy = getattr(self._kv_transfer_config, "kv_load_failure_policy", None)
        if policy == "fail" and role == KVConnectorRole.SCHEDULER:
            # vLLM's default: a block that cannot be loaded (store down, object corrupt)
            # fails the whole request instead of recomputing it
            log.warning("kv_load_failure_policy is 'fail': a block kvstored cannot deliver fails its "
                        "request; set \"kv_load_failure_policy\": \"recompute\" in --kv-transfer-config "
                        "to recompute it instead (docs/integrations.md)")

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
    def _store(self, what: str, fn, *args, default=None, **kw):
        """``fn(*args)`` through the breaker: ``default`` when the store is down or any
        call fails (logged); never an exception into vLLM's scheduler or worker."""
        try:
            return self.breaker.call(fn, *args, default=default, **kw)
        except errors.KVStoreError as e:
            log.warning("kvstore: %s failed: %s", what, e)
            return default

    def _all_ranks(self, base_keys: list[bytes]) -> list[bytes]:
        return [rank_key(k, tp, pp) for k in base_keys for tp, pp in self._rank_grid]

    def _release(self, base_keys: list[bytes]) -> None:
        if base_keys:
            self._store("unpin", self.client.unpin, self._all_ranks(base_keys), default=0)

    def _lookup(self, req_id: str, lookable: list[bytes]) -> int:
        """The stored prefix of ``lookable``, leased for ``lease_ttl`` seconds."""
        hit = self._store("lookup", lookup_prefix, self.client, [rank_key(k, 0, 0) for k in lookable],
                          default=0)
        held = self._leases.get(req_id, [])
        if not hit or self.lease_ttl <= 0 or held[:hit] == lookable[:hit]:
            return hit  # asked again (the request waited a step): the lease still holds
        self._release(self._leases.pop(req_id, []))
        want = lookable[:hit]
        keys = self._all_ranks(want)
        try:
            pinned = self.breaker.call(self.client.pin, keys, self.lease_ttl, default=None)
        except errors.PermissionDenied as e:  # a read-only token: warn once, then no leases
            log.warning("kvstore: this token may not pin (%s); lookups are not leased", e)
            self.lease_ttl = 0
            return hit
        except errors.KVStoreError as e:
            log.warning("kvstore: lease failed: %s", e)
            return hit
        if pinned is None:
            return 0  # the store went down between the lookup and the lease
        self._leases[req_id] = want
        if pinned < len(keys):  # something went between lookup and pin: what is held now
            hit = self._store("lookup", lookup_prefix, self.client, [rank_key(k, 0, 0) for k in want],
                              default=0)
            self._release(want[hit:])
            self._leases[req_id] = want[:hit]
        return hit

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[Optional[int], bool]:
        keys = self._request_keys(request)
        n_prompt = len(request.prompt_token_ids or [])
        lookable = keys[:max(0, (n_prompt - 1) // self.block_size)]  # the last token is computed
        hit = self._lookup(request.request_id, lookable) if lookable else 0
        self._lookups[request.request_id] = (keys, num_computed_tokens, hit)
        return max(0, hit * self.block_size - num_computed_tokens), False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        keys, computed, hit = self._lookups.pop(request.request_id, (None, 0, 0))
        if keys is None:
            keys = self._request_keys(request)
        state = self._reqs.setdefault(request.request_id, _Request(keys))
        state.saved = max(state.saved, hit)  # stored already: never saved again
        leased = self._leases.pop(request.request_id, [])
        if num_external_tokens <= 0:
            self._release(leased)
            return
        ids = list(blocks.get_block_ids()[0])
        start = computed // self.block_size
        end = start + num_external_tokens // self.block_size
        if len(ids) >= end:
            ids = ids[start:end]
        ids = ids[:end - start]
        # the worker unpins what it loads; the blocks vLLM has itself are released here
        handed = end <= len(leased)
        self._release(leased[:start] + leased[end:] if handed else leased)
        self._loads.append(BlockTransfer(request.request_id, keys[start:end], ids, handed))

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
        self._release(self._leases.pop(request.request_id, []))  # looked up, never loaded
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
        meta = self._get_connector_metadata()
        if not isinstance(meta, KVStoreConnectorMetadata) or not meta.loads:
            return
        for t in meta.loads:
            keys = self._keys(t)
            try:
                self._load(t, keys)
            except Exception as e:  # noqa: BLE001 - never into vLLM's worker: recompute instead
                log.warning("kvstore: loading %d block(s) of %s failed: %s", len(keys), t.req_id, e)
                self._load_errors.update(t.block_ids)
            if t.leased:
                self._store("unpin", self.client.unpin, keys, default=0)

    def _load(self, t: BlockTransfer, keys: list[bytes]) -> None:
        from ..torch import get_blocks

        if not self.breaker.allow():
            self._load_errors.update(t.block_ids)  # the store is down: recompute, do not wait
            return
        try:
            get_blocks(self.client, self.layout, keys, t.block_ids)
            self.breaker.success()
            return
        except errors.KVStoreError as e:
            self.breaker.failure(e)
            if is_outage(e):
                log.warning("kvstore: %d block(s) of %s not loaded: %s", len(keys), t.req_id, e)
                self._load_errors.update(t.block_ids)
                return
            log.warning("kvstore: loading %d block(s) of %s failed (%s); finding which",
                        len(keys), t.req_id, e)
        for i, (k, b) in enumerate(zip(keys, t.block_ids)):
            try:
                get_blocks(self.client, self.layout, [k], [b])
            except errors.KVStoreError as e:
                self._load_errors.add(b)
                if is_outage(e):  # went down meanwhile: the rest fail too
                    self.breaker.failure(e)
                    self._load_errors.update(t.block_ids[i:])
                    return

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv loaded every layer

    def save_kv_layer(self, layer_name: str, kv_layer: "torch.Tensor", attn_metadata: Any, **kwargs: Any) -> None:
        return  # whole blocks (every layer) are saved in wait_for_save

    def wait_for_save(self):
        meta = self._get_connector_metadata()
        if not isinstance(meta, KVStoreConnectorMetadata) or not meta.saves:
            return
        for t in meta.saves:
            keys = self._keys(t)
            try:
                self._store(f"saving {len(keys)} block(s) of {t.req_id}", self._save, t, keys)
            except Exception as e:  # noqa: BLE001 - a cache: a lost save is a future miss
                log.warning("kvstore: %d block(s) of %s not saved: %s", len(keys), t.req_id, e)

    def _save(self, t: BlockTransfer, keys: list[bytes]) -> None:
        from ..torch import put_blocks

        have = self.client.exists(keys)
        todo = [(k, b) for k, b, h in zip(keys, t.block_ids, have) if not h]
        if todo:
            try:
                put_blocks(self.client, self.layout, [k for k, _ in todo], [b for _, b in todo])
            except errors.Conflict:
                pass  # the block is stored (bit-for-bit different, same prefix): keep it

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._load_errors = self._load_errors, set()
        return failed

    def shutdown(self):
        self.breaker.close()
        self.client.close()


__all__ = ["BlockTransfer", "KVStoreConnector", "KVStoreConnectorMetadata", "rank_key"]
