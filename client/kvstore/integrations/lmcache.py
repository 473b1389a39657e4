"""kvstored as an LMCache remote storage plugin (LMCache 0.5.x).

LMCache configuration (YAML), with a daemon on ``10.0.0.5:7070``::

    chunk_size: 256
    local_cpu: true
    max_local_cpu_size: 5            # GB; also the staging buffer of remote reads
    remote_serde: naive
    remote_storage_plugins: ["kvstore"]
    extra_config:
      remote_storage_plugin.kvstore.module_path: kvstore.integrations.lmcache
      remote_storage_plugin.kvstore.class_name: KVStoreConnectorAdapter
      remote_storage_plugin.kvstore.address: 10.0.0.5:7070
      remote_storage_plugin.kvstore.namespace: llama3-8b

LMCache names the connector with a placeholder URL (``plugin://kvstore``), so the
endpoint always comes from ``extra_config`` (or, for the legacy ``remote_url``
form, from ``remote_url: kvstore://host:port``). The plugin name must be
``kvstore`` or ``kvstore.<instance>`` (several daemons: one instance each).

LMCache finds this module only through ``remote_storage_plugins`` and the two
``module_path`` / ``class_name`` keys: a ``remote_url: kvstore://...`` alone makes it
log "No adapter found for URL" once and store nothing. ``python -m
kvstore.integrations.lmcache lmcache.yaml`` checks a configuration and prints the
lines to add (exit status 2 when something is missing).

Mapping onto kvstored:

* a chunk (``CacheEngineKey``) is one object; its kvstored key is the sha256 of
  ``key.to_string()`` (32 bytes: LMCache's strings can exceed the 128-byte key
  limit), in the configured namespace;
* ``batched_put`` / ``batched_get`` are pipelined batch calls of the blocking
  SDK client, run on a small thread pool so LMCache's event loop never blocks;
  the payload goes from the ``MemoryObj``'s buffer to the socket and back into
  a freshly allocated ``MemoryObj`` without intermediate copies;
* ``batched_contains`` / ``batched_async_contains`` (LMCache's prefix lookup) are
  one ``Lookup`` call: "how many of these keys exist, counting from the first";
  with ``pin=True`` the hit chunks also get a kvstored pin with a lease
  (``pin_ttl`` seconds) so they cannot be evicted before LMCache retrieves them;
* objects are stored raw (no header): shapes and dtypes are the engine's
  (``metadata``), and a shorter object is the last, partial chunk of a prompt.
  When LMCache asks for self-describing objects (``save_chunk_meta: true``,
  ``use_layerwise``, or a serde other than ``naive``) each object starts with
  LMCache's ``RemoteMetadata`` header instead, at the price of one copy.

Errors: a missing or corrupt object is a miss (``None``), never an exception;
a put that finds a different object under the same key (``Conflict``: the same
prefix computed again, bit-for-bit different) keeps the stored one. A daemon that
cannot be reached is a miss too (lookups find nothing, gets return ``None``, puts
are dropped with one warning): after such a failure a circuit breaker
(``_breaker.Breaker``) stops asking it, and probes it again after a short back-off.
``ping`` always asks, so LMCache's health monitor sees the truth.

About 510 lines on purpose: most of it is one class, the connector, whose methods are
LMCache's RemoteConnector interface; the configuration check beside it is that class's
command line.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, List, Optional, Sequence

try:
    from lmcache.utils import CacheEngineKey
    from lmcache.v1.memory_management import MemoryObj
    from lmcache.v1.protocol import RemoteMetadata
    from lmcache.v1.storage_backend.connector import (ConnectorAdapter, ConnectorContext,
                                                      extract_plugin_type)
    from lmcache.v1.storage_backend.connector.base_connector import RemoteConnector
except ImportError as e:  # pragma: no cover - exercised only without lmcache
    raise ImportError(
        f"kvstore.integrations.lmcache needs LMCache 0.5.x (pip install lmcache): {e}") from e

from .. import errors
from ._breaker import Breaker, is_outage
from ._config import ClientOptions, client_from_options, lookup_prefix

log = logging.getLogger("kvstore.integrations.lmcache")

PLUGIN_TYPE = "kvstore"
MODULE = "kvstore.integrations.lmcache"  # what module_path names (also when run as __main__)
_PLUGIN_KEYS = ("module_path", "class_name")
# settings of this connector besides the client options (see ClientOptions)
_SETTINGS = {"workers": 4, "pin_ttl": 60.0, "save_chunk_meta": None}


def object_key(key: "CacheEngineKey") -> bytes:
    """The kvstored key of an LMCache chunk: sha256 of its string form (stable
    across processes and hosts; LMCache's own strings may exceed 128 bytes)."""
    return hashlib.sha256(key.to_string().encode()).digest()


def _plugin_name_from_url(url: str | None) -> str | None:
    if url and url.startswith("plugin://"):
        return url[len("plugin://"):].split("/", 1)[0] or None
    return None


def _find_plugin_name(config) -> str:
    """The plugin instance whose extra_config points at this module (for LMCache's
    generic loader, which does not pass the plugin name)."""
    extra = getattr(config, "extra_config", None) or {}
    for name in getattr(config, "remote_storage_plugins", None) or []:
        if extra.get(f"remote_storage_plugin.{name}.module_path") == __name__:
            return name
    return PLUGIN_TYPE


class KVStoreConnector(RemoteConnector):
    """LMCache ``RemoteConnector`` backed by a kvstored daemon."""

    def __init__(self, loop: asyncio.AbstractEventLoop, local_cpu_backend, config,
                 plugin_name: str | None = None, url: str | None = None, metadata=None):
        metadata = metadata if metadata is not None else getattr(local_cpu_backend, "metadata", None)
        super().__init__(config, metadata)
        self.loop = loop
        self.local_cpu_backend = local_cpu_backend
        self.plugin_name = plugin_name or _plugin_name_from_url(url) or _find_plugin_name(config)
        prefix = f"remote_storage_plugin.{self.plugin_name}."
        defaults: dict[str, Any] = {"namespace": "lmcache"}
        if url and url.startswith("kvstore://"):
            defaults["address"] = url
        self.options, rest = ClientOptions.from_mapping(
            config.extra_config, prefix=prefix, defaults=defaults, ignore=_PLUGIN_KEYS)
        settings = dict(_SETTINGS)
        for k, v in rest.items():
            if k not in settings:
                log.warning("LMCache extra_config %s%s is not a kvstore setting (ignored)", prefix, k)
                continue
            settings[k] = v
        self.workers = max(1, int(settings["workers"]))
        self.pin_ttl = float(settings["pin_ttl"])
        scm = settings["save_chunk_meta"]
        if scm is None:
            scm = (config.extra_config or {}).get("save_chunk_meta", False)
        scm = scm if isinstance(scm, bool) else str(scm).strip().lower() in ("1", "true", "yes", "on")
        # raw objects need the engine's fixed layout; anything else is self-describing
        self.save_chunk_meta = bool(scm or config.use_layerwise
                                    or (config.remote_serde or "naive") != "naive")
        self.client = client_from_options(self.options)
        self.breaker = Breaker(f"LMCache {self.plugin_name}", probe=self.client.ping)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="kvstore-lmcache")
        self._closed = False
        self._lock = threading.Lock()
        for problem in check_config(config):
            log.warning("LMCache configuration: %s", problem)
        log.info("LMCache plugin %s -> %s (%s objects, %d workers)", self.plugin_name,
                 self.options.describe(), "self-describing" if self.save_chunk_meta else "raw",
                 self.workers)

    # ------------------------------------------------------------ helpers
    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _allocate(self, shapes=None, dtypes=None, fmt=None) -> Optional[MemoryObj]:
        return self.local_cpu_backend.allocate(shapes or self.meta_shapes, dtypes or self.meta_dtypes,
                                               fmt or self.meta_fmt)

    # ------------------------------------------------------------ exists / lookup
    async def exists(self, key: CacheEngineKey) -> bool:
        return await self._run(self.exists_sync, key)

    def exists_sync(self, key: CacheEngineKey) -> bool:
        return bool(self._ask("exists", self.client.exists, [object_key(key)], default=[False])[0])

    def _ask(self, what: str, fn, *args, default=None):
        """``fn(*args)`` through the breaker: ``default`` when the store is down or does
        not answer (a miss, not an exception in LMCache's threads)."""
        try:
            return self.breaker.call(fn, *args, default=default)
        except errors.KVStoreError as e:
            log.warning("kvstore: %s failed: %s", what, e)
            return default

    def support_batched_contains(self) -> bool:
        return True

    def batched_contains(self, keys: List[CacheEngineKey]) -> int:
        return self._contains([object_key(k) for k in keys], False)

    def support_batched_async_contains(self) -> bool:
        return True

    async def batched_async_contains(self, lookup_id: str, keys: List[CacheEngineKey],
                                     pin: bool = False) -> int:
        return await self._run(self._contains, [object_key(k) for k in keys], pin)

    def _contains(self, okeys: list[bytes], pin: bool) -> int:
        hit = self._ask("lookup", lookup_prefix, self.client, okeys, default=0)
        if pin and hit and self.pin_ttl > 0:
            # a lease, not a hold: lapses by itself if LMCache never retrieves
            try:
                if self.breaker.call(self.client.pin, okeys[:hit], self.pin_ttl) is None:
                    return 0  # went down between the two calls
            except errors.PermissionDenied as e:  # a read-only token: warn once, then no pins
                log.warning("kvstore: this token may not pin (%s); lookups are not pinned", e)
                self.pin_ttl = 0.0
            except errors.KVStoreError as e:
                log.warning("kvstore: pin failed: %s", e)
        return hit

    # ------------------------------------------------------------ put
    async def put(self, key: CacheEngineKey, memory_obj: MemoryObj):
        await self._run(self._put, [key], [memory_obj])

    def support_batched_put(self) -> bool:
        return True

    async def batched_put(self, keys: List[CacheEngineKey], memory_objs: List[MemoryObj]):
        if keys:
            await self._run(self._put, list(keys), list(memory_objs))

    def _payload(self, obj: MemoryObj):
        data = obj.byte_array
        if not self.save_chunk_meta:
            return data
        header = RemoteMetadata(len(data), obj.get_shapes(), obj.get_dtypes(),
                                obj.get_memory_format()).serialize()
        buf = bytearray(len(header) + len(data))
        buf[:len(header)] = header
        buf[len(header):] = data
        return buf

    def _put(self, keys: Sequence[CacheEngineKey], objs: Sequence[MemoryObj]) -> None:
        items = [(object_key(k), self._payload(o)) for k, o in zip(keys, objs, strict=True)]
        if not self.breaker.allow():
            return  # the store is down: the chunks are not stored (a future miss)
        try:
            self.client.batch_put(items)
            self.breaker.success()
        except errors.Conflict as e:
            self.breaker.success()
            # the batch ran to the end; only the conflicting key(s) kept their bytes
            log.debug("kvstore: a chunk was already stored with other bytes (kept): %s", e)
        except errors.NoSpace as e:
            self.breaker.success()
            log.warning("kvstore: store full, %d chunk(s) not stored: %s", len(items), e)
        except errors.KVStoreError as e:
            self.breaker.failure(e)
            if not is_outage(e):
                log.warning("kvstore: %d chunk(s) not stored: %s", len(items), e)

    # ------------------------------------------------------------ get
    async def get(self, key: CacheEngineKey) -> Optional[MemoryObj]:
        return (await self.batched_get([key]))[0]

    def support_batched_get(self) -> bool:
        return True

    async def batched_get(self, keys: List[CacheEngineKey]) -> List[Optional[MemoryObj]]:
        if not keys:
            return []
        fn = self._get_meta if self.save_chunk_meta else self._get_raw
        return await self._run(fn, list(keys))

    def support_batched_get_non_blocking(self) -> bool:
        return True

    async def batched_get_non_blocking(self, lookup_id: str, keys: List[CacheEngineKey]) -> List[MemoryObj]:
        """One batch for LMCache's asynchronous loading: the leading run of chunks that
        came back (the rest, if any arrived, are released)."""
        got = await self.batched_get(list(keys)) if keys else []
        out: List[MemoryObj] = []
        for i, obj in enumerate(got):
            if obj is None:
                for later in got[i + 1:]:
                    if later is not None:
                        later.ref_count_down()
                break
            out.append(obj)
        return out

    def _get_raw(self, keys: list[CacheEngineKey]) -> list[Optional[MemoryObj]]:
        objs: list[Optional[MemoryObj]] = []
        for _ in keys:
            o = self._allocate() if (not objs or objs[-1] is not None) else None
            objs.append(o)
        if objs[0] is None:
            log.warning("kvstore: no local CPU memory to receive %d chunk(s)", len(keys))
            return objs
        live = [i for i, o in enumerate(objs) if o is not None]
        okeys = [object_key(keys[i]) for i in live]
        bufs = [objs[i].byte_array for i in live]
        try:
            sizes: list[Optional[int]] = self._receive(okeys, bufs)
        except BaseException:
            for i in live:
                objs[i].ref_count_down()
            raise
        out: list[Optional[MemoryObj]] = [None] * len(keys)
        for i, n in zip(live, sizes, strict=True):
            obj = objs[i]
            if not n:
                obj.ref_count_down()
                continue
            try:
                out[i] = self.reshape_partial_chunk(obj, n)
            except ValueError as e:
                log.warning("kvstore: object for %s has an unexpected size: %s", keys[i], e)
                obj.ref_count_down()
        return out

    def _receive(self, okeys: list[bytes], bufs: list) -> list[Optional[int]]:
        """Each object's size received into its buffer, None for a miss (every one when
        the store does not answer)."""
        if not self.breaker.allow():
            return [None] * len(okeys)
        try:
            sizes = list(self.client.batch_get_into(okeys, bufs))
            self.breaker.success()
            return sizes
        except (errors.NotFound, errors.NotVerified, errors.ChecksumMismatch, errors.InvalidArgument):
            self.breaker.success()  # rare: a miss or a bad object in the batch
        except errors.KVStoreError as e:
            self.breaker.failure(e)
            log.warning("kvstore: %d chunk(s) not retrieved: %s", len(okeys), e)
            return [None] * len(okeys)
        return self._get_each(okeys, bufs)

    def _get_each(self, okeys: list[bytes], bufs: list) -> list[Optional[int]]:
        sizes: list[Optional[int]] = []
        for i, (k, b) in enumerate(zip(okeys, bufs, strict=True)):
            try:
                sizes.append(self.client.get_into(k, b))
            except (errors.NotFound, errors.NotVerified):  # held back on a cluster node: a miss now
                sizes.append(None)
            except (errors.ChecksumMismatch, errors.InvalidArgument) as e:
                log.warning("kvstore: unusable object, treated as a miss: %s", e)
                sizes.append(None)
            except errors.KVStoreError as e:
                self.breaker.failure(e)
                return sizes + [None] * (len(okeys) - i)
        return sizes

    def _get_meta(self, keys: list[CacheEngineKey]) -> list[Optional[MemoryObj]]:
        okeys = [object_key(k) for k in keys]
        blobs: list[Optional[bytearray]] = [None] * len(okeys)
        if self.breaker.allow():
            try:
                blobs = list(self.client.batch_get(okeys))
                self.breaker.success()
            except (errors.NotFound, errors.NotVerified, errors.ChecksumMismatch, errors.InvalidArgument):
                self.breaker.success()
                for i, k in enumerate(okeys):
                    try:
                        blobs[i] = self.client.get(k)
                    except (errors.NotFound, errors.NotVerified, errors.ChecksumMismatch, errors.InvalidArgument):
                        pass
                    except errors.KVStoreError as e:
                        self.breaker.failure(e)
                        break
            except errors.KVStoreError as e:
                self.breaker.failure(e)
                log.warning("kvstore: %d chunk(s) not retrieved: %s", len(okeys), e)
        out: list[Optional[MemoryObj]] = []
        hdr = self.remote_metadata_bytes
        for key, blob in zip(keys, blobs, strict=True):
            if blob is None or len(blob) < hdr:
                out.append(None)
                continue
            try:
                meta = RemoteMetadata.deserialize(bytes(blob[:hdr]))
            except Exception as e:  # struct.error, KeyError, ValueError: not our header
                log.warning("kvstore: object for %s has no valid header (%s), treated as a miss", key, e)
                out.append(None)
                continue
            if meta.length != len(blob) - hdr:
                log.warning("kvstore: object for %s has a bad header, treated as a miss", key)
                out.append(None)
                continue
            obj = self._allocate(meta.shapes, meta.dtypes, meta.fmt)
            if obj is None:
                log.warning("kvstore: no local CPU memory to receive a chunk")
                out.append(None)
                continue
            dest = memoryview(obj.byte_array).cast("B")
            dest[:meta.length] = memoryview(blob)[hdr:]
            out.append(obj)
        return out

    # ------------------------------------------------------------ misc
    def remove_sync(self, key: CacheEngineKey) -> bool:
        return (self._ask("remove", self.client.delete, [object_key(key)], default=0) or 0) > 0

    def support_ping(self) -> bool:
        return True

    async def ping(self) -> int:
        """Always asks the store (LMCache's health monitor polls it); an answer closes
        the breaker at once."""
        try:
            await self._run(self.client.ping)
        except errors.KVStoreError as e:
            self.breaker.failure(e)
            return e.code
        except OSError as e:
            self.breaker.failure(e)
            return errors.Unavailable.code
        self.breaker.success()
        return 0

    async def list(self) -> List[str]:
        # keys are digests of LMCache's key strings and cannot be listed back
        return []

    async def close(self):
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.breaker.close()
        self._pool.shutdown(wait=True)
        self.client.close()

    def __repr__(self) -> str:
        return f"<KVStoreConnector {self.options.address} ns={self.options.namespace}>"


def _plugin_url(url: str | None) -> bool:
    return bool(url) and (url.startswith(("kvstore://", "kvstore+cluster://"))
                          or extract_plugin_type(_plugin_name_from_url(url) or "") == PLUGIN_TYPE)


def check_config(config) -> list[str]:
    """What keeps an LMCache configuration (``LMCacheEngineConfig``) from using kvstored
    as its documented: a list of problems, each saying what to add or change (empty:
    fine). LMCache itself only logs such mistakes and runs without the remote tier."""
    extra = dict(getattr(config, "extra_config", None) or {})
    plugins = list(getattr(config, "remote_storage_plugins", None) or [])
    url = getattr(config, "remote_url", None)
    ours = [p for p in plugins if extract_plugin_type(p) == PLUGIN_TYPE]
    problems = []
    for p in ours:
        pfx = f"remote_storage_plugin.{p}."
        missing = [k for k in _PLUGIN_KEYS if not extra.get(pfx + k)]
        if missing:
            problems.append(
                f"plugin {p!r} is listed but extra_config lacks {', '.join(pfx + k for k in missing)}: "
                f"LMCache cannot load it. Add to extra_config:\n  {pfx}module_path: {MODULE}\n"
                f"  {pfx}class_name: KVStoreConnectorAdapter")
        elif extra.get(pfx + "module_path") != MODULE:
            problems.append(f"plugin {p!r}: {pfx}module_path is {extra.get(pfx + 'module_path')!r}, "
                            f"not {MODULE!r}")
    if url and url.startswith(("kvstore://", "kvstore+cluster://")) and not ours:
        scheme, rest = url.split("://", 1)
        problems.append(
            f"remote_url {url!r} needs the kvstore plugin: LMCache has no adapter for that scheme "
            "by itself (it logs \"No adapter found for URL\" and stores nothing). Write instead "
            "of remote_url:\n"
            "remote_storage_plugins: [\"kvstore\"]\n"
            "extra_config:\n"
            f"  remote_storage_plugin.kvstore.module_path: {MODULE}\n"
            "  remote_storage_plugin.kvstore.class_name: KVStoreConnectorAdapter\n"
            f"  remote_storage_plugin.kvstore.address: {scheme}://{rest.split('/', 1)[0]}")
    elif _plugin_url(url) and ours:
        problems.append(
            f"remote_url {url!r} and remote_storage_plugins {ours} both name kvstored: LMCache "
            "then runs two remote backends against it (every chunk is looked up and sent twice). "
            "Drop remote_url (keep it only for lmcache.v1.basic_check, which requires it).")
    if (ours or _plugin_url(url)) and not (getattr(config, "max_local_cpu_size", 0) or 0) > 0:
        problems.append("LMCache's remote backends receive into its local CPU buffer: set "
                        "max_local_cpu_size > 0 (GB)")
    return problems


class KVStoreConnectorAdapter(ConnectorAdapter):
    """What ``remote_storage_plugin.<name>.class_name`` names: builds a
    :class:`KVStoreConnector` for ``plugin://kvstore[.<instance>]`` and for the legacy
    ``remote_url: kvstore://host:port``."""

    def __init__(self) -> None:
        super().__init__("kvstore://")

    def can_parse(self, url: str) -> bool:
        if url.startswith(self.schema):
            return True
        name = _plugin_name_from_url(url)
        return name is not None and extract_plugin_type(name) == PLUGIN_TYPE

    def create_connector(self, context: "ConnectorContext") -> RemoteConnector:
        return KVStoreConnector(context.loop, context.local_cpu_backend, context.config,
                                plugin_name=context.plugin_name, url=context.url,
                                metadata=context.metadata)


def main(argv: list[str] | None = None) -> int:
    """``python -m kvstore.integrations.lmcache CONFIG.yaml``: check an LMCache
    configuration for the kvstore plugin (exit 0: fine, 2: something to fix)."""
    import argparse
    import sys

    from lmcache.v1.config import LMCacheEngineConfig

    ap = argparse.ArgumentParser(prog="python -m kvstore.integrations.lmcache",
                                 description="Check an LMCache YAML configuration for the kvstore plugin.")
    ap.add_argument("config", help="the file LMCACHE_CONFIG_FILE names")
    a = ap.parse_args(argv)
    try:
        config = LMCacheEngineConfig.from_file(a.config)
    except Exception as e:  # noqa: BLE001 - LMCache raises many kinds for a bad file
        print(f"{a.config}: LMCache cannot read it: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    problems = check_config(config)
    for p in problems:
        print(f"{a.config}: {p}", file=sys.stderr)
    if not problems:
        print(f"{a.config}: the kvstore plugin is configured")
    return 2 if problems else 0


__all__ = ["KVStoreConnector", "KVStoreConnectorAdapter", "check_config", "object_key"]

if __name__ == "__main__":
    raise SystemExit(main())
