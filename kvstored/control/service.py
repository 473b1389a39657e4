"""gRPC control plane: a thin servicer over the Store (same event loop, no locks).

It is given the narrow things it uses, not the node: the store, the config, the node's
status (id, ports, state), the data server (its counters and connections for Stats),
its own counters (``ControlStats``), the epoch gate membership writes (the same object
the data plane consults), and the node's reload entry points. Membership and the
repair agent, which start later, are set on it by the node when they exist.
"""
from __future__ import annotations

import functools
import inspect
import itertools
import logging
import time
from typing import TYPE_CHECKING, Callable

import grpc

import kvstored
from kvstore import errors
from kvstore.control import head_struct
from kvstore.v1 import control_pb2 as pb
from kvstore.v1 import control_pb2_grpc as pb_grpc
from kvstore.wire import MAX_KEY_LEN, PUT_FLAGS, VERSION, checksum, key_bytes, namespace_bytes
from kvstored.auth import ADMIN, READ, WRITE, Unauthenticated
from kvstored.config import ConfigError
from kvstored.looplag import Slices, run_sliced
from kvstored.dataplane.policy import AuthGuard, EpochGate

if TYPE_CHECKING:
    from kvstored.auth import Auth
    from kvstored.config import Config
    from kvstored.dataplane.tcp import DataServer
    from kvstored.engine import Store
    from kvstored.status import NodeStatus
    from kvstored.tls import ServerTLS

    from .stats import ControlStats

log = logging.getLogger("kvstored.control")
_request_ids = itertools.count(1)  # for log lines when the caller sent no x-request-id

GRPC_CODE = {
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.NoSpace: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Conflict: grpc.StatusCode.ALREADY_EXISTS,
    errors.ChecksumMismatch: grpc.StatusCode.DATA_LOSS,
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ProtocolError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Timeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Redirect: grpc.StatusCode.UNAVAILABLE,
    errors.NotVerified: grpc.StatusCode.UNAVAILABLE,
}


def _accepts_not_verified(context) -> bool:
    """The caller's SDK knows errors.NotVerified (metadata ``kvstore-accepts``, which
    kvstore._common.call_metadata sends); older ones get NotFound in its place."""
    return any(k == "kvstore-accepts" and "not-verified" in (w.strip() for w in v.split(","))
               for k, v in context.invocation_metadata() or ())


# Clients' calls, counted as client activity by repair's pace (NodeLoad); not peers'
# (Heads: their repair) nor monitoring and admin calls (Members, Stats, Health, Drain...)
CLIENT_CALLS = frozenset({"Lookup", "Exists", "Pin", "Unpin", "Delete", "Put", "Get", "List",
                          "DeleteAll"})


def _typed_errors(fn: Callable) -> Callable:
    """Turn kvstore errors into gRPC status + the exact code in trailing metadata."""

    method = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self, request, context):
        t0 = time.perf_counter()
        if method in CLIENT_CALLS:  # a client waits on this node (cluster/repair/pace.py)
            self.data.counters["control_client_calls"] += 1
        try:
            result = fn(self, request, context)
            if inspect.isawaitable(result):
                result = await result
            return result
        except errors.KVStoreError as e:
            if type(e) is errors.NotVerified and not _accepts_not_verified(context):
                e = errors.NotFound(e.message)
            self.stats.count_error(e)
            _log_error(method, context, e)
            context.set_trailing_metadata((("kvstore-code", str(e.code)),))
            await context.abort(GRPC_CODE.get(type(e), grpc.StatusCode.INTERNAL), e.message)
        finally:
            self.stats.observe(method, time.perf_counter() - t0)

    return wrapper


SLICE_KEYS = 64  # Heads looks at the loop's slice clock once per this many keys
ANY_TOKEN = 0  # _guard: any valid token will do (no namespace involved)
OPEN = -1  # _guard: no token needed


def _guard(need: int, all_namespaces_if_empty: bool = False) -> Callable:
    """Check the caller's token (metadata ``authorization: Bearer <token>``) for scope
    ``need`` on the request's namespace, when auth is on. With ``all_namespaces_if_empty``
    an empty namespace means every namespace, which needs a token for "*". Apply under
    _typed_errors, so a refusal becomes a typed error."""

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(self, request, context):
            if self.tls is not None:
                self.tls.note_peer(context.peer())
            if self.auth is not None and need != OPEN:
                ns = getattr(request, "namespace", None) if need != ANY_TOKEN else None
                if ns == "" and all_namespaces_if_empty:
                    ns = None
                self._authorize(context, need, ns)
            return fn(self, request, context)
        return wrapper
    return deco


def _log_error(method: str, context, e: errors.KVStoreError) -> None:
    """A typed error answered to a caller: debug, with a request id and the peer."""
    if not log.isEnabledFor(logging.DEBUG):
        return
    rid = next((v for k, v in context.invocation_metadata() or () if k == "x-request-id"), None)
    log.debug("%s failed: %s", method, e.message, extra={
        "req_id": rid or f"c{next(_request_ids)}", "peer": context.peer(), "error": e.name})


class ControlService(pb_grpc.KVStoreServicer):
    def __init__(self, store: "Store", config: "Config", status: "NodeStatus", *,
                 data: "DataServer", stats: "ControlStats", gate: EpochGate,
                 auth: "Auth | None" = None, tls: "ServerTLS | None" = None,
                 reload: Callable[[], tuple[list[str], list[str]]] | None = None,
                 reload_security: Callable[[], list[str]] = list):
        """``reload``: re-read the config file (raises ConfigError for a file that does
        not load, changing nothing); None where there is no file (embedded use), and
        Reload then re-reads tokens and certificates alone (``reload_security``)."""
        self.store = store
        self.config = config
        self.status = status
        self.data = data
        self.stats = stats
        self.gate = gate
        self.auth = auth
        self.tls = tls
        self.reload = reload
        self.reload_security = reload_security
        self.membership = None  # kvstored.cluster.Membership, set by the node in a cluster
        self.repair = None  # kvstored.cluster.repair.RepairAgent, likewise

    def _authorize(self, context, need: int, ns: str | None) -> None:
        """Raise Unauthenticated / PermissionDenied unless the call's token may ``need``
        in namespace ``ns`` (None: every namespace; need ANY_TOKEN: just a valid token).
        The check itself is the data plane's (``AuthGuard``): one rule for both planes."""
        header = next((v for k, v in context.invocation_metadata() or () if k == "authorization"),
                      None)
        guard = AuthGuard(self.auth)
        try:
            if header is None:
                guard.login(None)
            else:
                scheme, _, token = header.partition(" ")
                if scheme.lower() != "bearer" or not token.strip():
                    raise Unauthenticated("malformed authorization metadata: expected "
                                          "'Bearer <token>'")
                guard.login(token.strip())
        except Unauthenticated:
            self.stats.count_auth_rejected("no_token" if header is None else "bad_token")
            raise
        # ns None = every namespace: only a token for "*" has scopes there
        refused = guard.check(b"*" if ns is None else ns.encode("utf-8", "replace"), need)
        if refused is not None:
            reason, err = refused
            self.stats.count_auth_rejected(reason)
            raise err

    def _membership(self):
        m = self.membership
        if m is None:
            raise errors.InvalidArgument("this node is not in a cluster (cluster.enabled = false)")
        return m

    def _check_epoch(self, context) -> None:
        """Keyed calls from a cluster client with an old member list are redirected by
        the same gate as the data path (metadata ``kvstore-epoch``; absent or 0 = not
        checked); every keyed call (``context`` None: epoch not checked) first checks the
        gate's lease deadline, as the data path does (EpochGate)."""
        gate = self.gate
        gate.check_lease(time.perf_counter())
        if not gate.epoch or context is None:
            return
        for k, v in context.invocation_metadata() or ():
            if k == "kvstore-epoch":
                try:
                    epoch = int(v)
                except ValueError:
                    raise errors.InvalidArgument(f"kvstore-epoch metadata {v[:20]!r} is not a number") from None
                redirect = gate.check(epoch)
                if redirect is not None:
                    raise redirect
                return

    def _keys(self, request, context=None) -> tuple[bytes, list[bytes]]:
        self._check_epoch(context)
        ns = namespace_bytes(request.namespace)
        if len(request.keys) > self.config.max_batch_keys:
            raise errors.InvalidArgument(
                f"{len(request.keys)} keys in one call; the limit is {self.config.max_batch_keys}")
        # a proto bytes field's items are bytes already: checked in C (min, max) rather
        # than one key_bytes call each (65,536 keys: 14 ms of the loop in one go -> ~5)
        keys = list(request.keys)
        if keys and not (min(map(len, keys)) >= 1 and max(map(len, keys)) <= MAX_KEY_LEN):
            key_bytes(next(k for k in keys if not 1 <= len(k) <= MAX_KEY_LEN))  # raises
        return ns, keys

    @_typed_errors
    @_guard(OPEN)
    def Info(self, request, context):
        c = self.config
        return pb.InfoResponse(
            version=kvstored.__version__, node_id=self.status.node_id, data_host=c.host,
            data_port=self.status.data_port, wire_version=VERSION, checksum_algorithm="xxh3-64",
            max_value_size=c.max_value_size, max_control_value_size=c.max_control_value_size,
            max_key_length=MAX_KEY_LEN, max_batch_keys=c.max_batch_keys,
            shm_socket=self.status.shm_path)

    @_typed_errors
    @_guard(OPEN)
    def Health(self, request, context):
        # live: the process answers; ready: started and not draining (state says which)
        st = self.status
        return pb.HealthResponse(live=True, ready=st.ready, status=st.health_status(),
                                 uptime_seconds=st.uptime())

    @_typed_errors
    @_guard(ANY_TOKEN)
    def Stats(self, request, context):
        s = self.store.stats()
        namespaces = s.pop("namespaces")
        counters = {k: int(v) for k, v in s.items()}
        counters.update(self.data.counters)
        counters.update(self.stats.counters)
        if self.tls is not None:
            counters.update(self.tls.counters())
        tiers = [pb.TierStats(name=t["name"], capacity_bytes=t["capacity"], used_bytes=t["used"],
                              objects=t["objects"],
                              counters={k: int(v) for k, v in t.items()
                                        if isinstance(v, (int, float)) and not isinstance(v, bool)
                                        and k not in ("capacity", "used", "objects")},
                              io_backend=t.get("io_backend", ""),
                              io_backend_reason=t.get("io_backend_reason", ""))
                 for t in self.store.tier_stats()]
        return pb.StatsResponse(counters=counters, namespaces=namespaces, tiers=tiers,
                                connections=len(self.data.connections),
                                uptime_seconds=self.status.uptime())

    # Batch calls run in steps that give the event loop back (looplag.run_sliced): one
    # call of max_batch_keys (65,536) keys held it 120-320 ms, for every client at once.
    @_typed_errors
    @_guard(READ)
    async def Lookup(self, request, context):
        ns, keys = self._keys(request, context)
        return pb.LookupResponse(count=await run_sliced(self.store.lookup_steps(ns, keys)))

    @_typed_errors
    @_guard(READ)
    async def Exists(self, request, context):
        ns, keys = self._keys(request, context)
        return pb.ExistsResponse(exists=await run_sliced(self.store.exists_steps(ns, keys)))

    @_typed_errors
    @_guard(WRITE)
    async def Pin(self, request, context):
        ns, keys = self._keys(request, context)
        return pb.CountResponse(count=await run_sliced(
            self.store.pin_steps(ns, keys, request.ttl_seconds)))

    @_typed_errors
    @_guard(WRITE)
    async def Unpin(self, request, context):
        ns, keys = self._keys(request, context)
        return pb.CountResponse(count=await run_sliced(self.store.unpin_steps(ns, keys)))

    @_typed_errors
    @_guard(WRITE)
    async def Delete(self, request, context):
        ns, keys = self._keys(request, context)
        hits = await run_sliced(self.store.delete_each_steps(ns, keys))
        return pb.DeleteResponse(count=sum(hits), deleted=hits)

    @_typed_errors
    @_guard(WRITE)
    async def Put(self, request, context):
        ns, key = namespace_bytes(request.namespace), key_bytes(request.key)
        limit = self.config.max_control_value_size
        if len(request.value) > limit:
            raise errors.InvalidArgument(
                f"value of {len(request.value)} bytes is over the control-plane limit {limit}; "
                "use the data path (kvstore.Client.put does)")
        cs = request.checksum if request.HasField("checksum") else checksum(request.value)
        # like the data path: without space, wait (bounded by put_wait_timeout), then NoSpace
        res = await self.store.reserve_wait(ns, key, len(request.value), cs, request.overwrite)
        if res is None:
            return pb.PutResponse(stored=False)
        res.view[:] = request.value
        return pb.PutResponse(stored=self.store.commit(res))

    @_typed_errors
    @_guard(READ)
    async def Get(self, request, context):
        self._check_epoch(None)  # the lease deadline only: this call carries no epoch
        ns, key = namespace_bytes(request.namespace), key_bytes(request.key)
        e = await self.store.acquire_async(ns, key)
        try:
            if e.size > self.config.max_control_value_size:
                raise errors.InvalidArgument(
                    f"object of {e.size} bytes is over the control-plane limit; use the data path")
            return pb.GetResponse(value=bytes(self.store.view(e)), checksum=e.checksum)
        finally:
            self.store.release(e)

    @_typed_errors
    @_guard(READ, all_namespaces_if_empty=True)
    async def List(self, request, context):
        ns = namespace_bytes(request.namespace) if request.namespace else None
        limit = min(request.limit or 100, 10000)
        sample = await self.store.sample_keys(ns, limit)  # NVMe-only keys read in bulk
        now = time.time()
        mono = self.store.clock()
        entries = [pb.ListEntry(namespace=e.ns.decode(), key=key, size=e.size, checksum=e.checksum,
                                pinned=e.pinned(mono), age_seconds=max(0.0, now - e.committed_at),
                                tier="+".join(t for t, present in (("dram", e.offset >= 0),
                                                                   ("nvme", e.nvme is not None)) if present))
                   for e, key in sample]
        total = self.store.object_count() if ns is None else self.store.stats()["namespaces"].get(
            ns.decode(), 0)
        return pb.ListResponse(entries=entries, total=total)

    @_typed_errors
    @_guard(ADMIN, all_namespaces_if_empty=True)
    async def DeleteAll(self, request, context):
        """Admin: every object of a namespace ("" = every namespace), pinned ones too; the
        data path is served meanwhile, and objects put meanwhile are kept (Store.delete_all)."""
        only = namespace_bytes(request.namespace) if request.namespace else None
        r = await self.store.delete_all(only)
        log.warning("DeleteAll: deleted %d objects (%d with an unreadable key; %d put meanwhile "
                    "kept)", r.deleted, r.unreadable, r.kept_newer,
                    extra={"namespace": request.namespace or "*", "peer": context.peer()})
        return pb.CountResponse(count=r.deleted)

    @_typed_errors
    @_guard(ADMIN)
    def Reload(self, request, context):
        """Admin: what SIGHUP does (config file, tokens file, TLS certificates)."""
        if self.reload is not None:
            try:
                applied, restart = self.reload()
            except ConfigError as e:
                raise errors.InvalidArgument(f"reload failed, nothing changed: {e}") from None
            lines = list(applied) + [f"needs restart: {r}" for r in restart]
        else:  # no config file to re-read (embedded use): tokens and certificates only
            lines = self.reload_security()
        return pb.ReloadResponse(changed=lines)

    @_typed_errors
    @_guard(ANY_TOKEN)
    def Members(self, request, context):
        """The member list as this node sees it (itself included)."""
        st = self.status
        m = self.membership
        if m is None:  # standalone: just this node
            from kvstored.cluster.membership import member_info
            me = member_info(self.config, st, self.store.arena.size, time.time() - st.uptime())
            rows = [(me, "alive", 0.0, True)]
            source, degraded, detail = "standalone", False, ""
        else:
            rows, source, degraded, detail = m.view(), m.source, m.degraded, m.detail
        placed = {r[0].node_id for r in m.placement_rows()} if m is not None else {st.node_id}
        members = [pb.Member(
            node_id=i.node_id, control_address=i.control_address, data_address=i.data_address,
            shm_socket=i.shm_socket, dram_capacity_bytes=i.dram_capacity_bytes,
            nvme_capacity_bytes=i.nvme_capacity_bytes, failure_domain=i.failure_domain,
            version=i.version, started_at=i.started_at, health=health,
            last_seen_seconds_ago=max(ago, 0.0), self=me, draining=i.draining,
            placement=i.node_id in placed) for i, health, ago, me in rows]
        repair = self.repair
        return pb.MembersResponse(members=members, source=source, degraded=degraded,
                                  cluster=self.config.cluster_name if m is not None else "",
                                  node_id=st.node_id, detail=detail,
                                  epoch=m.epoch if m is not None else 0,
                                  policies=m.policies if m is not None else {},
                                  repair=pb.RepairStatus(**repair.status()) if repair is not None
                                  else pb.RepairStatus(state="off"))

    @_typed_errors
    @_guard(ADMIN, all_namespaces_if_empty=True)
    async def Heads(self, request, context):
        """Cluster: presence, checksum and first bytes of keys, unverified records too."""
        ns, keys = self._keys(request)
        if request.head_bytes > 64:
            raise errors.InvalidArgument(f"head_bytes {request.head_bytes} is over 64")
        out = []
        store, n = self.store, request.head_bytes
        peek, deleted_ago = store.peek, store.fence.deleted_ago
        view = store.arena.view
        if request.packed:  # fixed-width records in one bytes field (kvstore/control.py heads_of)
            pack = head_struct(n).pack

            def absent(deleted: float):
                return pack(False, False, 0, 0, deleted, 0.0, 0, b"")

            def held(e, head: bytes):
                return pack(True, e.unverified, e.size, e.checksum, 0.0,
                            max(0.0, time.time() - e.committed_at), len(head), head)
        else:  # repeated Head messages: a client of an earlier version, or one not asking
            Head = pb.Head

            def absent(deleted: float):
                return Head(present=False, deleted_ago=deleted)

            def held(e, head: bytes):
                return Head(present=True, unverified=e.unverified, size=e.size, checksum=e.checksum,
                            head=head, committed_ago=max(0.0, time.time() - e.committed_at))
        slices = Slices()  # 4,096 keys held the loop ~30 ms in one go (kvstored/looplag.py)
        # A peer's repair asks every node about every object it walks: ~4 us of this loop
        # per key before; the common case (a DRAM-resident record) is read here without a
        # coroutine per key, and the loop is given back every SLICE_KEYS keys at most
        for i, k in enumerate(keys):
            if not i % SLICE_KEYS:
                await slices.turn()
            e = peek(ns, k)
            if e is None:
                out.append(absent(deleted_ago(ns, k)))
                continue
            head = b""
            if n:
                if e.offset >= 0:  # in DRAM: its first bytes, as read_head reads them
                    head = view[e.offset:e.offset + min(n, e.size)].tobytes()
                else:
                    try:
                        got = await store.read_head(ns, k, n)
                    except errors.NotFound:
                        got = None
                    if got is None:
                        out.append(absent(0.0))
                        continue
                    e, head = got
            out.append(held(e, head))
        if request.packed:
            return pb.HeadsResponse(packed_heads=b"".join(out), unverified_objects=store.unverified,
                                    epoch=self.gate.epoch, put_flags=PUT_FLAGS)
        return pb.HeadsResponse(heads=out, unverified_objects=store.unverified,
                                epoch=self.gate.epoch, put_flags=PUT_FLAGS)

    @_typed_errors
    @_guard(ADMIN, all_namespaces_if_empty=True)
    async def Drain(self, request, context):
        """Admin: leave placement and move this node's records to their homes."""
        m = self._membership()
        await m.set_draining(not request.cancel)
        if self.repair is not None:
            self.repair.wake(now=True)
        left = self.store.object_count()
        return pb.DrainResponse(draining=m.draining, objects_left=left,
                                detail="draining: records move to their new homes; stop the node "
                                       "when objects_left is 0" if m.draining else "not draining")

    @_typed_errors
    @_guard(ADMIN, all_namespaces_if_empty=True)
    async def SetPolicy(self, request, context):
        """Admin: a namespace's redundancy policy, cluster-wide (etcd)."""
        m = self._membership()
        ns = request.namespace
        if ns != "*":
            ns = namespace_bytes(ns).decode()
        return pb.SetPolicyResponse(policies=await m.set_policy(ns, request.policy.strip()))


def add_to_server(server: grpc.aio.Server, service: ControlService) -> None:
    # the generated handlers, plus INVALID_ARGUMENT for a body that does not decode
    from kvstored.control.errors import CallsPerClient, register
    service.stats.limit = service.config.max_control_rpcs
    register(server, service, service.stats.count_error,
             request_timeout=service.config.control_request_timeout,
             per_client=CallsPerClient(service.config.control_calls_per_client(),
                                       service.stats.counters),
             calls=service.stats)
