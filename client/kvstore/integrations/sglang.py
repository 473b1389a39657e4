"""kvstored as an SGLang HiCache storage backend (the L3 tier behind the host pool).

SGLang loads it with its dynamic backend::

    python -m sglang.launch_server ... --enable-hierarchical-cache \\
        --hicache-mem-layout page_first \\
        --hicache-storage-backend dynamic \\
        --hicache-storage-backend-extra-config '{"backend_name": "kvstore",
            "module_path": "kvstore.integrations.sglang", "class_name": "KVStoreHiCacheStorage",
            "interface_v1": 1, "address": "10.0.0.5:7070", "namespace": "llama3-8b"}'

``interface_v1: 1`` makes SGLang call the zero-copy ``batch_get_v1`` /
``batch_set_v1``: each page of the host memory pool is sent from, and received
into, the pool's own memory (the buffers ``get_page_buffer_meta`` names), with no
staging copy. Without it SGLang uses the older ``batch_get`` / ``batch_set``
(one flat page tensor per key, one copy on SGLang's side), which work too.

Objects: SGLang names a page by a hex hash chained over the prompt's tokens (not
the model); the kvstored key is ``<page hash>/<identity>/<component>`` where
``identity`` is a short digest of the model, the rank's shard (TP, PP, attention
CP, DCP; not TP for MLA, whose pages every rank shares) and the page geometry,
so two models or two shardings never read each other's bytes, and
``component`` numbers the page's buffers (K and V for MHA, one for MLA; per layer
for the ``layer_first`` layout). ``batch_exists`` is one ``Lookup`` call over
those keys: the prefix of pages whose every component is stored.

Failures: SGLang calls the backend from its prefetch and backup threads, and an
exception there ends the thread for the life of the server. So no call here raises
for a store problem: a page that cannot be read is a miss (``None`` / ``False``), one
that cannot be written reports ``False``. After a call finds the store unreachable, a
circuit breaker (``_breaker.Breaker``) answers misses without asking it, probing it
again after a short back-off, so a dead store costs a step milliseconds.

The hybrid-model ``*_v2`` calls (Mamba / SWA side pools) are not implemented:
SGLang then reports NotImplementedError for such models, as for other backends
without them.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
from typing import Any, List, Optional

try:
    # the engine first: without it this fails at once, before torch's seconds-long import
    from sglang.srt.mem_cache.hicache_storage import (HiCacheStorage, HiCacheStorageConfig,
                                                      HiCacheStorageExtraInfo)
    import torch
except ImportError as e:  # pragma: no cover - exercised only without sglang
    raise ImportError(
        f"kvstore.integrations.sglang needs SGLang with HiCache (sglang.srt.mem_cache): {e}") from e

from .. import errors
from ._breaker import Breaker, is_outage
from ._config import ClientOptions, client_from_options, lookup_prefix

log = logging.getLogger("kvstore.integrations.sglang")

# extra_config keys that belong to SGLang's loader, not to us
_SGLANG_KEYS = ("backend_name", "module_path", "class_name", "interface_v1", "tp_lcm_size")
_SETTINGS = {"skip_existing": True}


def _view(ptr: int, size: int, owner: Any = None) -> memoryview:
    """A writable byte view of ``size`` bytes of host memory at ``ptr`` (no copy).

    ``owner``: the object that owns that memory (a tensor); the view keeps it alive, so
    the memory cannot be freed while the view is in use. Without one (the host pool's
    buffers, which live as long as the pool) the caller guarantees that."""
    arr = (ctypes.c_char * size).from_address(ptr)
    if owner is not None:
        arr._owner = owner  # ctypes instances take attributes; the memoryview holds arr
    return memoryview(arr).cast("B")


def _tensor_view(t: "torch.Tensor") -> memoryview:
    """A byte view of a contiguous CPU tensor that keeps the tensor alive (a temporary
    such as ``v.contiguous()`` would otherwise be freed under the view)."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise errors.InvalidArgument("HiCache pages must be contiguous CPU tensors")
    n = t.numel() * t.element_size()
    return _view(t.data_ptr(), n, t) if n else memoryview(bytearray())


class KVStoreHiCacheStorage(HiCacheStorage):
    """``HiCacheStorage`` backed by a kvstored daemon (see the module docstring)."""

    def __init__(self, storage_config: "HiCacheStorageConfig", kwargs: dict | None = None):
        self.storage_config = storage_config
        extra = dict(storage_config.extra_config or {}) if storage_config else {}
        self.options, rest = ClientOptions.from_mapping(
            extra, defaults={"namespace": "sglang"}, ignore=_SGLANG_KEYS)
        settings = dict(_SETTINGS)
        for k, v in rest.items():
            if k in settings:
                settings[k] = v
            else:
                log.warning("HiCache extra_config %r is not a kvstore setting (ignored)", k)
        self.skip_existing = str(settings["skip_existing"]).lower() not in ("0", "false", "no", "off")
        c = storage_config
        self.is_mla = bool(getattr(c, "is_mla_model", False))
        writer = getattr(c, "is_storage_writer", None)
        self.is_writer = bool(writer) if writer is not None else (not self.is_mla or c.tp_rank == 0)
        shard = [f"pp{c.pp_rank}/{c.pp_size}"]
        if not self.is_mla:
            shard.append(f"tp{c.tp_rank}/{c.tp_size}")
        if getattr(c, "attn_cp_size", 1) > 1:
            shard.append(f"cp{c.attn_cp_rank}/{c.attn_cp_size}")
        if getattr(c, "dcp_size", 1) > 1:
            shard.append(f"dcp{c.dcp_rank}/{c.dcp_size}")
        self._shard = f"{c.model_name or ''}|{'mla' if self.is_mla else 'mha'}|{','.join(shard)}"
        self.mem_pool_host = None
        self._sizes: Optional[list[int]] = None  # byte size of each buffer of one page
        self._ident_v1: Optional[str] = None
        self._ident = self._digest("flat")
        self.client = client_from_options(self.options)
        self.breaker = Breaker("SGLang HiCache", probe=self.client.ping)
        log.info("SGLang HiCache -> %s (shard %s)", self.options.describe(), self._shard)

    def _store(self, what: str, fn, *args, default=None, **kw):
        """``fn(*args)`` through the breaker; ``default`` when the store is down or the
        call fails (logged): never an exception into SGLang's threads."""
        try:
            return self.breaker.call(fn, *args, default=default, **kw)
        except errors.KVStoreError as e:
            log.warning("kvstore: %s failed: %s", what, e)
            return default

    # ------------------------------------------------------------ keys
    def _digest(self, geometry: str) -> str:
        return hashlib.sha256(f"{self._shard}|{geometry}".encode()).hexdigest()[:16]

    def register_mem_pool_host(self, mem_pool_host) -> None:
        super().register_mem_pool_host(mem_pool_host)
        self._sizes = None
        try:
            self._learn_geometry(torch.arange(mem_pool_host.page_size, dtype=torch.int64))
        except Exception as e:  # pools without page meta: learned on the first v1 call
            log.debug("kvstore: page geometry not known yet (%s)", e)

    def _learn_geometry(self, one_page: "torch.Tensor") -> list[int]:
        _ptrs, sizes = self.mem_pool_host.get_page_buffer_meta(one_page)
        self._sizes = [int(s) for s in sizes]
        layout = getattr(self.mem_pool_host, "layout", "?")
        self._ident_v1 = self._digest(f"v1|{layout}|{self._sizes}|{getattr(self.mem_pool_host, 'dtype', '')}")
        return self._sizes

    def _page_keys(self, keys: List[str]) -> list[bytes]:
        n = len(self._sizes or [1])
        return [f"{k}/{self._ident_v1}/{j}".encode() for k in keys for j in range(n)]

    def _flat_key(self, key: str) -> bytes:
        return f"{key}/{self._ident}/flat".encode()

    def _buffers(self, keys: List[str], host_indices: "torch.Tensor"):
        ptrs, sizes = self.mem_pool_host.get_page_buffer_meta(host_indices)
        if not keys or len(ptrs) % len(keys):
            raise errors.InvalidArgument(f"{len(keys)} keys but {len(ptrs)} page buffers")
        if self._sizes is None or len(self._sizes) * len(keys) != len(ptrs):
            self._sizes = [int(s) for s in sizes[:len(ptrs) // len(keys)]]
            layout = getattr(self.mem_pool_host, "layout", "?")
            self._ident_v1 = self._digest(
                f"v1|{layout}|{self._sizes}|{getattr(self.mem_pool_host, 'dtype', '')}")
        views = [_view(int(p), int(s)) for p, s in zip(ptrs, sizes)]
        return self._page_keys(keys), views, len(ptrs) // len(keys)

    # ------------------------------------------------------------ zero-copy (interface_v1)
    def batch_exists(self, keys: List[str], extra_info: "Optional[HiCacheStorageExtraInfo]" = None) -> int:
        if not keys:
            return 0
        if self._sizes is None:
            if self.mem_pool_host is None:
                return 0
            self._learn_geometry(torch.arange(self.mem_pool_host.page_size, dtype=torch.int64))
        n = len(self._sizes)
        return self._store("lookup", lookup_prefix, self.client, self._page_keys(keys), default=0) // n

    def batch_get_v1(self, keys: List[str], host_indices: "torch.Tensor",
                     extra_info: "Optional[HiCacheStorageExtraInfo]" = None) -> List[bool]:
        if not keys:
            return []
        try:
            okeys, views, n = self._buffers(keys, host_indices)
        except errors.InvalidArgument as e:
            log.warning("kvstore: %d page(s) not loaded: %s", len(keys), e)
            return [False] * len(keys)
        ok = self._get_into(okeys, views)
        return [all(ok[i * n:(i + 1) * n]) for i in range(len(keys))]

    def _get_into(self, okeys: list[bytes], views: list) -> list[bool]:
        """Receive each object into its view: one batch, or key by key when the batch
        has a miss or a bad object; all False when the store does not answer."""
        if not self.breaker.allow():
            return [False] * len(okeys)
        try:
            sizes = self.client.batch_get_into(okeys, views)
            self.breaker.success()
            return [s == len(v) for s, v in zip(sizes, views)]
        except (errors.NotFound, errors.NotVerified, errors.ChecksumMismatch, errors.InvalidArgument):
            self.breaker.success()
        except errors.KVStoreError as e:
            self.breaker.failure(e)
            log.warning("kvstore: %d object(s) not loaded: %s", len(okeys), e)
            return [False] * len(okeys)
        ok = []
        for i, (k, v) in enumerate(zip(okeys, views)):
            try:
                ok.append(self.client.get_into(k, v) == len(v))
            except (errors.NotFound, errors.NotVerified, errors.ChecksumMismatch, errors.InvalidArgument):
                ok.append(False)
            except errors.KVStoreError as e:
                self.breaker.failure(e)
                return ok + [False] * (len(okeys) - i)
        return ok

    def batch_set_v1(self, keys: List[str], host_indices: "torch.Tensor",
                     extra_info: "Optional[HiCacheStorageExtraInfo]" = None) -> List[bool]:
        if not keys:
            return []
        if not self.is_writer:
            return [True] * len(keys)  # MLA: another rank writes the identical pages
        try:
            okeys, views, n = self._buffers(keys, host_indices)
        except errors.InvalidArgument as e:
            log.warning("kvstore: %d page(s) not stored: %s", len(keys), e)
            return [False] * len(keys)
        done = self._put(okeys, views)
        return [all(done[i * n:(i + 1) * n]) for i in range(len(keys))]

    def _put(self, okeys: list[bytes], views: list) -> list[bool]:
        """Store each object (skipping those stored already); which ones are stored."""
        if not self.breaker.allow():
            return [False] * len(okeys)
        try:
            present = self.client.exists(okeys) if self.skip_existing else [False] * len(okeys)
            todo = [(k, v) for k, v, p in zip(okeys, views, present) if not p]
            if todo:
                self.client.batch_put(todo)
            self.breaker.success()
            return [True] * len(okeys)
        except errors.Conflict:
            self.breaker.success()
            return [True] * len(okeys)  # the page is stored (with other bytes): keep it
        except errors.KVStoreError as e:
            self.breaker.failure(e)
            log.warning("kvstore: %d object(s) not stored: %s", len(okeys), e)
            if is_outage(e):
                return [False] * len(okeys)
        done = self._store("exists", self.client.exists, okeys, default=None)
        return list(done) if done is not None else [False] * len(okeys)

    # ------------------------------------------------------------ per-key interface (one flat page per key)
    def exists(self, key: str) -> bool:
        if self._sizes is not None:
            return self.batch_exists([key]) == 1
        return bool(self._store("exists", self.client.exists, [self._flat_key(key)], default=[False])[0])

    def get(self, key: str, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> "torch.Tensor | None":
        return self.batch_get([key], [target_location] if target_location is not None else None)[0]

    def batch_get(self, keys: List[str], target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> "List[torch.Tensor | None]":
        okeys = [self._flat_key(k) for k in keys]
        if target_locations is None:
            out: list = []
            for i, k in enumerate(okeys):
                if not self.breaker.allow():
                    return out + [None] * (len(okeys) - i)
                try:
                    out.append(torch.frombuffer(self.client.get(k), dtype=torch.uint8))
                    self.breaker.success()
                except (errors.NotFound, errors.NotVerified, errors.ChecksumMismatch):
                    out.append(None)
                except errors.KVStoreError as e:
                    self.breaker.failure(e)
                    log.warning("kvstore: %d page(s) not loaded: %s", len(okeys) - i, e)
                    return out + [None] * (len(okeys) - i)
            return out
        try:
            views = [_tensor_view(t) for t in target_locations]
        except errors.InvalidArgument as e:
            log.warning("kvstore: %s", e)
            return [None] * len(keys)
        ok = self._get_into(okeys, views)
        return [t if good else None for t, good in zip(target_locations, ok)]

    def set(self, key: str, value: Optional[Any] = None, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> bool:
        return self.batch_set([key], [value])

    def batch_set(self, keys: List[str], values: Optional[Any] = None,
                  target_locations: Optional[Any] = None, target_sizes: Optional[Any] = None) -> bool:
        if not keys:
            return True
        if not self.is_writer:
            return True
        if not self.breaker.allow():
            return False
        try:
            # each view holds its tensor (v.contiguous() may be a temporary copy)
            self.client.batch_put([(self._flat_key(k), _tensor_view(v.contiguous()))
                                   for k, v in zip(keys, values)])
            self.breaker.success()
            return True
        except errors.Conflict:
            self.breaker.success()
            return True
        except errors.KVStoreError as e:
            self.breaker.failure(e)
            log.warning("kvstore: %d page(s) not stored: %s", len(keys), e)
            return False

    # ------------------------------------------------------------ admin
    def clear(self) -> None:
        """SGLang's "flush the storage": delete every object of this namespace (needs an
        admin token when kvstored has auth on)."""
        try:
            n = self.client.delete_all()
            log.info("kvstore: cleared %d object(s) of namespace %s", n, self.options.namespace)
        except (errors.KVStoreError, OSError) as e:
            log.warning("kvstore: clear failed: %s", e)

    def get_stats(self):
        return None

    def close(self) -> None:
        self.breaker.close()
        self.client.close()


__all__ = ["KVStoreHiCacheStorage"]
