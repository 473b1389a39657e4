"""gRPC control plane: a thin servicer over the Store (same event loop, no locks)."""
from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING, Callable

import grpc

import kvstored
from kvstore import errors
from kvstore.v1 import control_pb2 as pb
from kvstore.v1 import control_pb2_grpc as pb_grpc
from kvstore.wire import MAX_KEY_LEN, VERSION, checksum, key_bytes, namespace_bytes

if TYPE_CHECKING:
    from kvstored.node import Node

GRPC_CODE = {
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.NoSpace: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Conflict: grpc.StatusCode.ALREADY_EXISTS,
    errors.ChecksumMismatch: grpc.StatusCode.DATA_LOSS,
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ProtocolError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Timeout: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def _typed_errors(fn: Callable) -> Callable:
    """Turn kvstore errors into gRPC status + the exact code in trailing metadata."""

    @functools.wraps(fn)
    async def wrapper(self, request, context):
        try:
            return fn(self, request, context)
        except errors.KVStoreError as e:
            self.node.count_error(e)
            context.set_trailing_metadata((("kvstore-code", str(e.code)),))
            await context.abort(GRPC_CODE.get(type(e), grpc.StatusCode.INTERNAL), e.message)

    return wrapper


class ControlService(pb_grpc.KVStoreServicer):
    def __init__(self, node: "Node"):
        self.node = node
        self.store = node.store
        self.config = node.config

    def _keys(self, request) -> tuple[bytes, list[bytes]]:
        ns = namespace_bytes(request.namespace)
        if len(request.keys) > self.config.max_batch_keys:
            raise errors.InvalidArgument(
                f"{len(request.keys)} keys in one call; the limit is {self.config.max_batch_keys}")
        return ns, [key_bytes(k) for k in request.keys]

    @_typed_errors
    def Info(self, request, context):
        c = self.config
        return pb.InfoResponse(
            version=kvstored.__version__, node_id=self.node.node_id, data_host=c.host,
            data_port=self.node.data_port, wire_version=VERSION, checksum_algorithm="xxh3-64",
            max_value_size=c.max_value_size, max_control_value_size=c.max_control_value_size,
            max_key_length=MAX_KEY_LEN, max_batch_keys=c.max_batch_keys)

    @_typed_errors
    def Health(self, request, context):
        ready = self.node.ready
        return pb.HealthResponse(live=True, ready=ready, status="serving" if ready else "starting",
                                 uptime_seconds=self.node.uptime())

    @_typed_errors
    def Stats(self, request, context):
        s = self.store.stats()
        namespaces = s.pop("namespaces")
        counters = {k: int(v) for k, v in s.items()}
        counters.update(self.node.data_server.counters)
        dram = pb.TierStats(name="dram", capacity_bytes=s["dram_capacity"], used_bytes=s["dram_used"],
                            objects=s["objects"],
                            counters={k: s[k] for k in ("hits", "misses", "evictions", "evicted_bytes",
                                                        "checksum_failures", "object_bytes")})
        return pb.StatsResponse(counters=counters, namespaces=namespaces, tiers=[dram],
                                connections=len(self.node.data_server.connections),
                                uptime_seconds=self.node.uptime())

    @_typed_errors
    def Lookup(self, request, context):
        ns, keys = self._keys(request)
        return pb.LookupResponse(count=self.store.lookup(ns, keys))

    @_typed_errors
    def Exists(self, request, context):
        ns, keys = self._keys(request)
        return pb.ExistsResponse(exists=self.store.exists(ns, keys))

    @_typed_errors
    def Pin(self, request, context):
        ns, keys = self._keys(request)
        return pb.CountResponse(count=self.store.pin(ns, keys, request.ttl_seconds))

    @_typed_errors
    def Unpin(self, request, context):
        ns, keys = self._keys(request)
        return pb.CountResponse(count=self.store.unpin(ns, keys))

    @_typed_errors
    def Delete(self, request, context):
        ns, keys = self._keys(request)
        return pb.CountResponse(count=self.store.delete(ns, keys))

    @_typed_errors
    def Put(self, request, context):
        ns, key = namespace_bytes(request.namespace), key_bytes(request.key)
        limit = self.config.max_control_value_size
        if len(request.value) > limit:
            raise errors.InvalidArgument(
                f"value of {len(request.value)} bytes is over the control-plane limit {limit}; "
                "use the data path (kvstore.Client.put does)")
        cs = request.checksum if request.HasField("checksum") else checksum(request.value)
        stored = self.store.put_bytes(ns, key, request.value, cs, request.overwrite)
        return pb.PutResponse(stored=stored)

    @_typed_errors
    def Get(self, request, context):
        ns, key = namespace_bytes(request.namespace), key_bytes(request.key)
        e = self.store.acquire(ns, key)
        try:
            if e.size > self.config.max_control_value_size:
                raise errors.InvalidArgument(
                    f"object of {e.size} bytes is over the control-plane limit; use the data path")
            return pb.GetResponse(value=bytes(self.store.view(e)), checksum=e.checksum)
        finally:
            self.store.release(e)

    @_typed_errors
    def List(self, request, context):
        ns = namespace_bytes(request.namespace) if request.namespace else None
        limit = min(request.limit or 100, 10000)
        now = time.time()
        mono = self.store.clock()
        entries = [pb.ListEntry(namespace=e.ns.decode(), key=e.key, size=e.size, checksum=e.checksum,
                                pinned=e.pinned(mono), age_seconds=max(0.0, now - e.committed_at))
                   for e in self.store.sample(ns, limit)]
        total = len(self.store.index) if ns is None else self.store.stats()["namespaces"].get(
            ns.decode(), 0)
        return pb.ListResponse(entries=entries, total=total)


def add_to_server(server: grpc.aio.Server, node: "Node") -> None:
    pb_grpc.add_KVStoreServicer_to_server(ControlService(node), server)
