"""ClusterClient: one logical store over many kvstored nodes, placement done client-side.

No master on the data path: every object's homes come from rendezvous hashing over the
member list (see ``kvstore.layout``), and this client talks to those nodes directly (one
``kvstore.Client`` per node, created lazily), fanning batches out per node in parallel.

Member list: a static list, a callable, or the cluster itself (``ClusterClient.from_cluster``
reads the Members RPC of any node, which watches etcd, together with the cluster's
namespace policies). Every put and get carries the list's epoch; a node with another
list answers Redirect and this client refreshes its list and re-sends (bounded), so a
client with an old list is redirected, not failed.

Redundancy is a per-namespace policy:

* ``none``: one copy, on the object's first node.
* ``replicas:N``: N copies on N nodes (distinct failure domains first). A put is
  acknowledged only when all copies are stored; a get reads the first healthy replica
  and falls back to the next on NotFound / Unavailable / ChecksumMismatch.
* ``ec:K+M``: Reed-Solomon through pyeclib (ISA-L). A put is acknowledged only when all
  K+M records are stored. Healthy gets fetch the first K slots in parallel (concatenated
  when they hold data fragments 0..K-1, decoded otherwise); a missing, slow
  (``fragment_timeout``) or corrupt record turns the read into a degraded one that
  fetches the other slots too and decodes. Objects smaller than ``min_ec_size`` are
  stored whole on the first M+1 slots.

A node that does not answer a put is marked down for ``down_s`` (1 s: a dead node
refuses connections, so finding out again costs milliseconds, and a node that is back
gets its writes within a second) and the put is written again over the other nodes: its records land on the slots the layout gives without that
node, which is where they belong once etcd drops it (and where repair moves them back
from, should it return). Fewer live nodes than the policy spreads over: writes go on (EC slots wrap around, replicas
are written to every live node) while the loss of one more node would still leave the
object readable (``Policy.min_live``), and the nodes' repair loop restores full
redundancy when nodes come back or join. A policy larger than the biggest cluster seen is
refused (InvalidArgument) when it is this client's own; the cluster's policies were
checked against the member count when they were set.

Partial failure of a put: the records this call newly stored are deleted best effort
and the error is raised; objects are immutable and a repeated put of the same bytes is
a no-op, so retrying is idempotent.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from . import errors
from ._common import DEFAULT_NAMESPACE, as_bytes_view, writable_view
from .client import Client
from .layout import (DEFAULT_MIN_EC_SIZE, FRAG_HEADER, Policy, assemble, codec, encode_records,
                     fragment_key, lap_key, member_epoch, parse_head, placement_key, slots)
from .placement import Member, place
from .wire import key_bytes, namespace_bytes

SLOT_CACHE = 1 << 16  # keys whose slots are remembered (KV blocks are read again and again)
REDIRECT_RETRIES = 4  # re-sends after a Redirect (the member list is re-read before each)
_REDIRECT_BACKOFF = (0.0, 0.05, 0.1, 0.25)


@dataclass
class ClusterView:
    """What a member-list source returns: the placement members (live, not draining), the
    cluster's namespace policies and the list's epoch (0: computed from the members)."""

    members: list
    policies: dict = field(default_factory=dict)
    epoch: int = 0


def _as_member(m) -> Member:
    if isinstance(m, Member):
        return m if m.address else Member(m.node_id, m.node_id, m.failure_domain)
    if isinstance(m, str):
        return Member(m, m, "")
    if isinstance(m, dict):
        addr = m.get("address") or m.get("control") or m["node_id"]
        return Member(m.get("node_id") or addr, addr, m.get("failure_domain", ""))
    addr = getattr(m, "address", "") or getattr(m, "control_address", "") or m.node_id
    return Member(m.node_id, addr, getattr(m, "failure_domain", ""))


def view_from_members_response(r) -> ClusterView:
    """A ClusterView from a Members RPC answer: members in the placement set only."""
    ms = [Member(m.node_id, m.control_address, m.failure_domain) for m in r.members
          if m.placement]
    return ClusterView(ms, dict(r.policies), r.epoch)


class ClusterClient:
    """A blocking client over many kvstored nodes (thread-safe).

    ``members``: control addresses (``"host:port"``, each its own node and failure
    domain), ``Member`` objects / objects with ``node_id``, ``address``,
    ``failure_domain``, or a callable returning such a list or a ``ClusterView``
    (re-read every ``refresh_s`` seconds and on Redirect).
    ``policy``: one policy for every namespace, or ``{namespace: policy}`` with an
    optional ``"*"`` default; None = the cluster's policies (from a ClusterView), else none.
    """

    def __init__(self, members: Sequence | Callable[[], object], policy=None, *,
                 namespace: str = DEFAULT_NAMESPACE, min_ec_size: int = DEFAULT_MIN_EC_SIZE,
                 node_timeout: float = 10.0, fragment_timeout: float = 2.0, down_s: float = 1.0,
                 refresh_s: float = 5.0, max_workers: int = 16, **client_kwargs):
        self.namespace = namespace_bytes(namespace).decode()
        self.min_ec_size = int(min_ec_size)
        self.node_timeout = node_timeout
        self.fragment_timeout = fragment_timeout
        self.down_s = down_s
        self.refresh_s = refresh_s
        self._client_kwargs = client_kwargs
        self._source = members if callable(members) else None
        self._members: list[Member] = []
        self._cluster_policies: dict[str, Policy] = {}
        self._epoch = 0
        self._largest = 0  # the most members ever seen: a policy beyond it is impossible
        self._members_at = float("-inf")  # a source is read on first use
        self._clients: dict[str, Client] = {}
        self._down: dict[str, float] = {}
        self._lock = threading.Lock()
        # slots of recent keys under the current member list (dropped when it changes)
        self._slot_cache: dict[tuple, list] = {}
        self._slot_cache_of: list | None = None
        if self._source is None:
            self._adopt(ClusterView(self._check_members(members)))
        if policy is None:
            self._policies: dict[str, Policy] = {}
        elif isinstance(policy, dict):
            self._policies = {k: Policy.parse(v) for k, v in policy.items()}
        else:
            self._policies = {"*": Policy.parse(policy)}
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kvstore-cluster")
        self._closed = False
        self.redirects = 0  # how many Redirect answers this client followed
        if self._source is None:
            for p in self._policies.values():
                p.check_cluster(len(self._members))

    @classmethod
    def from_cluster(cls, addresses: str | Sequence[str], **kw) -> "ClusterClient":
        """A client that reads the member list and namespace policies from the cluster:
        ``addresses`` are control addresses of any nodes (seeds); later refreshes ask
        the known members first, then the seeds."""
        seeds = [addresses] if isinstance(addresses, str) else list(addresses)
        if not seeds:
            raise errors.InvalidArgument("from_cluster needs at least one node address")
        holder: list[ClusterClient] = []

        def source() -> ClusterView:
            cc = holder[0]
            tried = []
            for addr in [m.address for m in cc._members] + seeds:
                if addr in tried:
                    continue
                tried.append(addr)
                try:
                    r = cc._seed_client(addr).members()
                except errors.KVStoreError as e:
                    last = e
                    continue
                return view_from_members_response(r)
            raise errors.Unavailable(f"no node answered the member list ({', '.join(tried)}): {last}")

        cc = cls(source, **kw)
        holder.append(cc)
        cc.members()
        return cc

    # ------------------------------------------------------------ plumbing
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for c in clients:
            c.close()

    @staticmethod
    def _check_members(members) -> list[Member]:
        out = [_as_member(m) for m in members]
        if len({m.node_id for m in out}) != len(out):
            raise errors.InvalidArgument("duplicate node_id in the member list")
        return out

    def _adopt(self, view: ClusterView) -> None:
        ms = self._check_members(view.members)
        # a fixed list sends no epoch (nodes do not redirect it); a source's list does
        epoch = view.epoch or (member_epoch(m.node_id for m in ms) if self._source else 0)
        pols = {k: Policy.parse(v) for k, v in view.policies.items()}
        stale = []
        if ms == self._members:
            ms = self._members  # unchanged: keep the object (the slot cache is tied to it)
        with self._lock:
            self._members, self._epoch, self._cluster_policies = ms, epoch, pols
            self._largest = max(self._largest, len(ms))
            self._members_at = time.monotonic()
            for m in ms:  # a node that came back on another address: a new client
                c = self._clients.get(m.node_id)
                if c is not None and c.address != m.address:
                    stale.append(self._clients.pop(m.node_id))
                    self._down.pop(m.node_id, None)
            for c in self._clients.values():
                c.epoch = epoch
        for c in stale:
            c.close()

    def _refresh(self) -> None:
        v = self._source()
        self._adopt(v if isinstance(v, ClusterView) else ClusterView(list(v)))

    def members(self) -> list[Member]:
        """The placement members (refreshed from the source every ``refresh_s``)."""
        if self._source is not None and time.monotonic() - self._members_at >= self.refresh_s:
            self._refresh()
        return self._members

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_policy(self, namespace: str, policy) -> None:
        """Set this client's policy of ``namespace`` ("*" = the default). The cluster's
        own policies (``kvstore-cli policy set``) are what the nodes repair by."""
        self._policies[namespace if namespace == "*" else namespace_bytes(namespace).decode()] = \
            Policy.parse(policy)

    def policy(self, namespace: str | None = None) -> Policy:
        ns = self._ns(namespace)
        for table in (self._policies, self._cluster_policies):
            p = table.get(ns) or table.get("*")
            if p is not None:
                return p
        return Policy("none", 1)

    def _ns(self, namespace: str | None) -> str:
        return self.namespace if namespace is None else namespace_bytes(namespace).decode()

    def _new_client(self, address: str) -> Client:
        kw = dict(self._client_kwargs)
        kw.setdefault("timeout", self.node_timeout)
        c = Client(address, namespace=self.namespace, **kw)
        c.epoch = self._epoch
        return c

    def client(self, member: Member) -> Client:
        """The plain Client of one node (created on first use)."""
        c = self._clients.get(member.node_id)
        if c is None:
            with self._lock:
                c = self._clients.get(member.node_id)
                if c is None:
                    c = self._clients[member.node_id] = self._new_client(member.address)
        return c

    def _seed_client(self, address: str) -> Client:
        key = "seed:" + address
        c = self._clients.get(key)
        if c is None:
            with self._lock:
                c = self._clients.get(key)
                if c is None:
                    c = self._clients[key] = self._new_client(address)
        return c

    def _node(self, member: Member, op: str, *args, **kw):
        """One call on one node; an unreachable node is marked down for ``down_s`` and
        skipped (Unavailable at once) until then."""
        until = self._down.get(member.node_id)
        if until is not None:
            if time.monotonic() < until:
                raise errors.Unavailable(f"node {member.node_id} marked down")
            self._down.pop(member.node_id, None)
        try:
            return getattr(self.client(member), op)(*args, **kw)
        except errors.Redirect:
            raise
        except errors.Unavailable:
            self._down[member.node_id] = time.monotonic() + self.down_s
            raise
        except OSError as e:
            self._down[member.node_id] = time.monotonic() + self.down_s
            raise errors.Unavailable(f"node {member.node_id}: {e}") from None

    def _submit(self, member: Member, op: str, *args, **kw):
        return self._pool.submit(self._node, member, op, *args, **kw)

    def _redirected(self, fn, *args, **kw):
        """Run ``fn``; on Redirect re-read the member list and run it again (bounded)."""
        for attempt in range(REDIRECT_RETRIES + 1):
            try:
                return fn(*args, **kw)
            except errors.Redirect as e:
                if self._source is None or attempt == REDIRECT_RETRIES:
                    raise errors.Redirect(
                        f"{e} (the member list stayed out of date after {attempt} refresh(es))") from None
                self.redirects += 1
                time.sleep(_REDIRECT_BACKOFF[min(attempt, len(_REDIRECT_BACKOFF) - 1)])
                before = self._epoch
                self._refresh()
                self._down.clear()  # a node marked down may be the new home
                if self._epoch == before:  # the node knows more than the source yet
                    time.sleep(0.1)

    def _slots(self, key: bytes, ns: str, p: Policy, write: bool) -> list[tuple[Member, int]]:
        """The object's slots under the current member list. Writes need ``p.min_live()``
        live members (Unavailable) and a policy the cluster can hold (InvalidArgument);
        reads only some member."""
        ms = self.members()
        if write:
            # a node this client just failed to reach is skipped: its records go to the
            # slots the layout gives without it, which is where they belong once it leaves
            # the member list (and where repair moves them from, if it comes back)
            now = time.monotonic()
            ms = [m for m in ms if self._down.get(m.node_id, 0.0) <= now]
            # a policy this client was given must fit the biggest cluster it has seen; the
            # cluster's own policies were checked when set (kvstore-cli policy set)
            if p.nodes > self._largest and (ns in self._policies or "*" in self._policies):
                p.check_cluster(self._largest)
            if len(ms) < p.min_live():
                raise errors.Unavailable(
                    f"policy {p} takes writes with at least {p.min_live()} live node(s); "
                    f"{len(ms)} are live")
        elif not ms:
            raise errors.Unavailable("the member list is empty")
        full = len(ms) == len(self._members)
        ck = (ns, key, p)
        if full:  # the common case: every member up; placement costs tens of microseconds
            sl = self._slot_cache.get(ck)
            if sl is not None and self._slot_cache_of is self._members:
                return sl
        sl = slots(placement_key(key, p), ms, p, ns)
        if full:
            with self._lock:
                if self._slot_cache_of is not self._members or len(self._slot_cache) >= SLOT_CACHE:
                    self._slot_cache, self._slot_cache_of = {}, self._members
                self._slot_cache[ck] = sl
        return sl

    def _extra(self, key: bytes, ns: str, p: Policy, have: list[tuple[Member, int]],
               n: int) -> list[tuple[Member, int]]:
        """Up to ``n`` lap-0 positions after the slots in preference order: where records
        may still sit after a membership change that repair has not caught up with."""
        ms = self.members()
        taken = {m.node_id for m, _ in have}
        rest = [m for m in place(placement_key(key, p), ms, len(ms), ns) if m.node_id not in taken]
        return [(m, 0) for m in rest[:n]]

    # ------------------------------------------------------------ writes
    def _writes(self, key: bytes, value: memoryview, ns: str, p: Policy) -> list[tuple[Member, bytes, object]]:
        sl = self._slots(key, ns, p, write=True)
        if p.kind != "ec":
            return [(m, key, value) for m, _ in sl]
        fk = fragment_key(key)
        return [(m, lap_key(fk, lap), rec)
                for (m, lap), rec in zip(sl, encode_records(p, value, self.min_ec_size))]

    def _write_all(self, writes: list[tuple[Member, list[tuple[bytes, object]]]], ns: str,
                   overwrite: bool) -> list[list[bool]]:
        """batch_put every node's items in parallel; all must succeed (W = all). On a
        failure the items newly stored by this call are deleted best effort."""
        futs = [self._pool.submit(self._put_records, m, items, ns, overwrite) for m, items in writes]
        wait(futs)
        results, first = [], None
        for (m, items), f in zip(writes, futs):
            e = f.exception()
            if e is not None:
                if first is None or (isinstance(e, errors.Redirect) and not isinstance(first[0], errors.Redirect)):
                    first = (e, m)
                results.append(None)
            else:
                results.append(f.result())
        if first is None:
            return results
        for (m, items), r in zip(writes, results):
            if r is not None:
                fresh = [k for (k, _v), stored in zip(items, r) if stored]
                if fresh:
                    try:  # exactly what this call wrote, where it wrote it: no redirect
                        self._node(m, "delete", fresh, namespace=ns, check_epoch=False)
                    except errors.KVStoreError:
                        pass
        e, m = first
        raise type(e)(f"put not acknowledged: node {m.node_id} ({m.address}) failed: {e}") from e

    def _put_records(self, m: Member, items: list, ns: str, overwrite: bool) -> list[bool]:
        """batch_put on one node. A Conflict on an EC record whose stored record belongs to
        the same object (same length, checksum, K and M: another fragment index left by an
        earlier attempt whose undo did not reach this node) is resolved by overwriting it;
        any other Conflict stands."""
        try:
            return self._node(m, "batch_put", items, namespace=ns, overwrite=overwrite)
        except errors.Conflict:
            if overwrite or not all(isinstance(v, bytes) and parse_head(v) for _k, v in items):
                raise
        out = []
        for k, v in items:
            try:
                out.append(self._node(m, "put", k, v, namespace=ns))
                continue
            except errors.Conflict as conflict:
                try:  # rare path: read the stored record (read scope, not admin)
                    theirs = parse_head(bytes(self._node(m, "get", k, namespace=ns)[:FRAG_HEADER.size]))
                except errors.KVStoreError:
                    raise conflict from None
                mine = parse_head(v)
                if theirs is None or theirs[4:6] != mine[4:6] or theirs[8:10] != mine[8:10]:
                    raise
            out.append(self._node(m, "put", k, v, namespace=ns, overwrite=True))
        return out

    def put(self, key, value, *, namespace: str | None = None, overwrite: bool = False) -> bool:
        """Store ``value`` under the namespace's policy; acknowledged when every replica or
        fragment is stored. Returns False if it was all there already."""
        return self.batch_put([(key, value)], namespace=namespace, overwrite=overwrite)[0]

    def batch_put(self, items: Iterable[tuple[object, object]], *, namespace: str | None = None,
                  overwrite: bool = False) -> list[bool]:
        """Put many objects, one pipelined batch per node, all nodes in parallel."""
        items = [(key_bytes(k), as_bytes_view(v)) for k, v in items]
        return self._redirected(self._batch_put, items, self._ns(namespace), overwrite)

    def _down_now(self) -> set:
        """Nodes skipped now (an expired mark stays in ``_down`` until the node is asked)."""
        now = time.monotonic()
        return {n for n, until in list(self._down.items()) if until > now}

    def _batch_put(self, items, ns: str, overwrite: bool) -> list[bool]:
        down = self._down_now()
        try:
            return self._batch_put_once(items, ns, overwrite)
        except errors.Redirect:
            raise
        except errors.Unavailable:
            if self._down_now() <= down:
                raise
            # a node failed under this put and is marked down now: write again without it
            return self._batch_put_once(items, ns, overwrite)

    def _batch_put_once(self, items, ns: str, overwrite: bool) -> list[bool]:
        p = self.policy(ns)
        per_node: dict[str, tuple[Member, list]] = {}
        owners: list[list[tuple[str, int]]] = []
        for kb, v in items:
            where = []
            for m, sk, rec in self._writes(kb, v, ns, p):
                slot = per_node.setdefault(m.node_id, (m, []))
                where.append((m.node_id, len(slot[1])))
                slot[1].append((sk, rec))
            owners.append(where)
        order = list(per_node.values())
        res = self._write_all(order, ns, overwrite)
        by_id = {m.node_id: r for (m, _), r in zip(order, res)}
        return [any(by_id[nid][i] for nid, i in where) for where in owners]

    # ------------------------------------------------------------ reads
    def get(self, key, *, namespace: str | None = None) -> bytearray:
        """The object's bytes (a new bytearray). Raises NotFound, or Unavailable when too
        few nodes answer."""
        return self._redirected(self._get_one, key_bytes(key), self._ns(namespace))

    def _get_one(self, kb: bytes, ns: str) -> bytearray:
        p = self.policy(ns)
        if p.kind == "ec":
            return self._get_ec(kb, ns, p)
        return self._get_replica(kb, ns, self._slots(kb, ns, p, write=False))

    def _get_replica(self, key: bytes, ns: str, sl: list[tuple[Member, int]]) -> bytearray:
        now = time.monotonic()
        order = sorted((m for m, _ in sl), key=lambda m: self._down.get(m.node_id, 0) > now)
        errs = []
        for m in order:
            try:
                return self._node(m, "get", key, namespace=ns)
            except errors.Redirect:
                raise
            except (errors.NotFound, errors.Unavailable, errors.ChecksumMismatch) as e:
                errs.append(e)
        if all(isinstance(e, errors.NotFound) for e in errs):
            raise errors.NotFound(f"{key[:64]!r} not found on its {len(sl)} node(s)")
        raise errors.Unavailable(f"no healthy replica of {key[:64]!r}: "
                                 + "; ".join(f"{type(e).__name__}: {e}" for e in errs))

    def _get_ec(self, key: bytes, ns: str, p: Policy, got: dict | None = None) -> bytearray:
        """Healthy path: the first K slots in parallel, assembled. Otherwise degraded: the
        other slots too, then up to M further nodes' lap-0 records (where records sit
        after a membership change repair has not caught up with), decoded from any K
        valid fragments. ``got``: records already fetched, by (node_id, lap)."""
        sl = self._slots(key, ns, p, write=False)
        fk = fragment_key(key)
        got = dict(got or {})
        futs = {}
        for m, lap in sl[:p.k]:
            if (m.node_id, lap) not in got:
                futs[self._submit(m, "get", lap_key(fk, lap), namespace=ns)] = (m.node_id, lap)
        self._gather(futs, got, time.monotonic() + self.fragment_timeout)
        out = assemble(p, list(got.values()))
        if out is not None:
            return out
        for extra in (sl[p.k:], self._extra(key, ns, p, sl, p.m)):
            for m, lap in extra:
                if (m.node_id, lap) not in got and (m.node_id, lap) not in futs.values():
                    futs[self._submit(m, "get", lap_key(fk, lap), namespace=ns)] = (m.node_id, lap)
            deadline = time.monotonic() + self.node_timeout + self.fragment_timeout
            while futs and time.monotonic() < deadline:
                self._gather(futs, got, deadline, until_one=True)
                out = assemble(p, list(got.values()))
                if out is not None:
                    return out
        vals = list(got.values())
        if any(isinstance(d, errors.Redirect) for d in vals):
            raise next(d for d in vals if isinstance(d, errors.Redirect))
        if vals and all(isinstance(d, errors.NotFound) for d in vals):
            raise errors.NotFound(f"{key[:64]!r} not found")
        found = sum(1 for d in vals if not isinstance(d, Exception))
        raise errors.Unavailable(f"{key[:64]!r}: {found} record(s) of {p} fetched and no K={p.k} "
                                 "consistent valid fragments among them")

    @staticmethod
    def _gather(futs: dict, got: dict, deadline: float, until_one: bool = False) -> None:
        """Move finished futures' results (or exceptions) from ``futs`` into ``got``."""
        while futs:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            done, _ = wait(list(futs), timeout=left, return_when=FIRST_COMPLETED)
            for f in done:
                i = futs.pop(f)
                e = f.exception()
                got[i] = e if e is not None else f.result()
            if until_one and done:
                return

    def batch_get(self, keys: Sequence, *, namespace: str | None = None) -> list[bytearray]:
        """Get many objects: one batch per node, all nodes in parallel; a key whose node
        batch fails is retried alone (with the single-key fallbacks)."""
        return self._redirected(self._batch_get, [key_bytes(k) for k in keys], self._ns(namespace))

    def _batch_get(self, ks: list[bytes], ns: str) -> list[bytearray]:
        p = self.policy(ns)
        sls = [self._slots(k, ns, p, write=False) for k in ks]
        per_node: dict[str, tuple[Member, list]] = {}
        now = time.monotonic()
        for j, (k, sl) in enumerate(zip(ks, sls)):
            if p.kind == "ec":
                fk = fragment_key(k)
                for m, lap in sl[:p.k]:
                    per_node.setdefault(m.node_id, (m, []))[1].append((j, (m.node_id, lap), lap_key(fk, lap)))
            else:
                m = min((m for m, _ in sl), key=lambda m: self._down.get(m.node_id, 0) > now)
                per_node.setdefault(m.node_id, (m, []))[1].append((j, (m.node_id, 0), k))
        futs = [(items, self._submit(m, "batch_get", [sk for _j, _w, sk in items], namespace=ns))
                for m, items in per_node.values()]
        wait([f for _, f in futs])
        got: list[dict] = [{} for _ in ks]
        for items, f in futs:
            e = f.exception()
            if isinstance(e, errors.Redirect):
                raise e
            if e is None:
                for (j, where, _sk), buf in zip(items, f.result()):
                    got[j][where] = buf
        out = []
        for j, k in enumerate(ks):
            if p.kind != "ec":
                out.append(got[j][next(iter(got[j]))] if got[j] else self._get_replica(k, ns, sls[j]))
                continue
            r = assemble(p, list(got[j].values())) if got[j] else None
            out.append(r if r is not None else self._get_ec(k, ns, p, got[j]))
        return out

    # ------------------------------------------------------------ control
    def _candidates(self, key: bytes, ns: str, p: Policy) -> list[tuple[Member, bytes]]:
        """Where to ask whether ``key`` is stored, best first: with K of K+M records
        present, at least one of any M+1 slots holds one."""
        sl = self._slots(key, ns, p, write=False)
        if p.kind == "ec":
            fk = fragment_key(key)
            return [(m, lap_key(fk, lap)) for m, lap in sl[:p.m + 1]]
        return [(m, key) for m, _ in sl]

    def exists(self, keys: Sequence, *, namespace: str | None = None) -> list[bool]:
        """Whether each key is stored: asked of its first slot, a "no" checked on the
        second, the next slots when a node does not answer; grouped per node, all nodes
        in parallel (a miss costs two rounds)."""
        return self._redirected(self._exists, keys, namespace)

    def _exists(self, keys: Sequence, namespace: str | None) -> list[bool]:
        ns = self._ns(namespace)
        p = self.policy(ns)
        ks = [key_bytes(k) for k in keys]
        cands = [self._candidates(k, ns, p) for k in ks]
        answer: list[bool | None] = [None] * len(ks)
        for rnd in range(max((len(c) for c in cands), default=0)):
            per_node: dict[str, tuple[Member, list]] = {}
            for j, c in enumerate(cands):
                # unanswered keys go on to the next slot; a "no" from the first slot is
                # checked once on the second (a node that just joined, or replaced a lost
                # one, takes over a slot before repair has filled it)
                if rnd < len(c) and (answer[j] is None or (rnd == 1 and answer[j] is False)):
                    m, sk = c[rnd]
                    per_node.setdefault(m.node_id, (m, []))[1].append((j, sk))
            if not per_node:
                break
            futs = []
            for m, items in per_node.values():
                for s in range(0, len(items), 512):
                    chunk = items[s:s + 512]
                    futs.append((chunk, self._submit(m, "exists", [sk for _, sk in chunk], namespace=ns)))
            wait([f for _, f in futs])
            for chunk, f in futs:
                if isinstance(f.exception(), errors.Redirect):
                    raise f.exception()
                if f.exception() is None:
                    for (j, _), e in zip(chunk, f.result()):
                        answer[j] = bool(e) or bool(answer[j])
        return [bool(a) for a in answer]

    def lookup(self, keys: Sequence, *, namespace: str | None = None) -> int:
        """How many of ``keys`` are stored, counting from the first (the prefix hit length)."""
        n = 0
        for e in self.exists(keys, namespace=namespace):
            if not e:
                break
            n += 1
        return n

    def delete(self, keys: Sequence, *, namespace: str | None = None) -> int:
        """Delete every copy / record of ``keys`` on its slots and the next M nodes (best
        effort on unreachable nodes); returns how many keys had something deleted."""
        return self._redirected(self._delete, keys, namespace)

    def _delete(self, keys: Sequence, namespace: str | None) -> int:
        ns = self._ns(namespace)
        p = self.policy(ns)
        hit = [False] * len(keys)
        per_node: dict[str, tuple[Member, list]] = {}
        for j, k in enumerate(keys):
            kb = key_bytes(k)
            sl = self._slots(kb, ns, p, write=False)
            if p.kind == "ec":
                fk = fragment_key(kb)
                where = sl + self._extra(kb, ns, p, sl, p.m)
                pairs = [(m, lap_key(fk, lap)) for m, lap in where]
            else:
                pairs = [(m, kb) for m, _ in sl]
            for m, sk in pairs:
                per_node.setdefault(m.node_id, (m, []))[1].append((j, sk))
        def each(m: Member, items: list) -> list[bool]:
            return [bool(self._node(m, "delete", [sk], namespace=ns)) for _, sk in items]

        futs = [(items, self._pool.submit(each, m, items)) for m, items in per_node.values()]
        wait([f for _, f in futs])
        for items, f in futs:
            if isinstance(f.exception(), errors.Redirect):
                raise f.exception()  # re-run over the current homes (deletes are idempotent)
            if f.exception() is None:
                for (j, _), gone in zip(items, f.result()):
                    hit[j] = hit[j] or gone
        return sum(hit)

    # ------------------------------------------------------------ Client-compatible extras
    # (so the engine adapters and kvstore.torch take a ClusterClient where they take a Client)
    def get_into(self, key, buffer, *, namespace: str | None = None) -> int:
        """The object copied into ``buffer``; returns its size."""
        return self.batch_get_into([key], [buffer], namespace=namespace)[0]

    def batch_get_into(self, keys: Sequence, buffers: Sequence, *,
                       namespace: str | None = None) -> list[int]:
        """``batch_get`` copied into caller buffers (one copy more than a plain Client's
        receive-into: the records are assembled first)."""
        if len(keys) != len(buffers):
            raise errors.InvalidArgument(f"{len(keys)} keys but {len(buffers)} buffers")
        views = [writable_view(b) for b in buffers]
        out = []
        for data, view in zip(self.batch_get(keys, namespace=namespace), views):
            if len(data) > len(view):
                raise errors.InvalidArgument(
                    f"object of {len(data)} bytes does not fit the {len(view)}-byte buffer")
            view[:len(data)] = data
            out.append(len(data))
        return out

    def _records_per_node(self, keys: Sequence, ns: str) -> dict[str, tuple[Member, list]]:
        """Every record key of ``keys`` on its slots, grouped per node."""
        p = self.policy(ns)
        per_node: dict[str, tuple[Member, list]] = {}
        for k in keys:
            kb = key_bytes(k)
            for m, lap in self._slots(kb, ns, p, write=False):
                sk = lap_key(fragment_key(kb), lap) if p.kind == "ec" else kb
                per_node.setdefault(m.node_id, (m, []))[1].append(sk)
        return per_node

    def pin(self, keys: Sequence, ttl: float = 60.0, *, namespace: str | None = None) -> int:
        """Pin every record of ``keys`` on its node for ``ttl`` seconds; returns how many
        records were pinned (a key has one per copy or fragment)."""
        ns = self._ns(namespace)
        futs = [self._submit(m, "pin", sks, ttl, namespace=ns)
                for m, sks in self._records_per_node(keys, ns).values()]
        wait(futs)
        return sum(f.result() for f in futs if f.exception() is None)

    def unpin(self, keys: Sequence, *, namespace: str | None = None) -> int:
        ns = self._ns(namespace)
        futs = [self._submit(m, "unpin", sks, namespace=ns)
                for m, sks in self._records_per_node(keys, ns).values()]
        wait(futs)
        return sum(f.result() for f in futs if f.exception() is None)

    def ping(self) -> float:
        """The slowest data-path round trip over the members, in seconds; Unavailable
        when none answers."""
        futs = [self._submit(m, "ping") for m in self.members()]
        wait(futs)
        rtts = [f.result() for f in futs if f.exception() is None]
        if not rtts:
            raise errors.Unavailable(f"none of the {len(futs)} member(s) answered a ping")
        return max(rtts)

    def delete_all(self, *, namespace: str | None = None) -> int:
        """Admin: every object of the namespace on every member; returns records deleted."""
        ns = self._ns(namespace) if namespace != "" else ""
        futs = [self._submit(m, "delete_all", namespace=ns) for m in self.members()]
        wait(futs)
        for f in futs:
            if f.exception() is not None:
                raise f.exception()
        return sum(f.result() for f in futs)

    def _codec(self, p: Policy):
        return codec(p)


__all__ = ["DEFAULT_MIN_EC_SIZE", "FRAG_HEADER", "ClusterClient", "ClusterView", "Member", "Policy",
           "fragment_key"]
