"""ClusterClient: one logical store over many kvstored nodes, placement done client-side.

No master on the data path: every object's nodes come from rendezvous hashing over
the member list (``kvstore.placement``), and this client talks to those nodes directly
(one ``kvstore.Client`` per node, created lazily).

Redundancy is a per-namespace policy:

* ``none``: one copy, on the object's first node.
* ``replicas:N``: N copies on N nodes (distinct failure domains first). A put is
  acknowledged only when all N are stored (W = N); a get reads the first healthy
  replica and falls back to the next on NotFound / Unavailable / ChecksumMismatch.
* ``ec:K+M``: Reed-Solomon through pyeclib (ISA-L ``isa_l_rs_vand``, or
  ``isa_l_rs_cauchy`` when M > 4). Fragment i is written to the object's node i under
  ``fragment_key(key)`` (the index is in the record's header, not in the key, so a
  record still counts when a membership change shifts the placement). A put is acknowledged only when all K+M fragments are
  stored. Healthy gets fetch the K data fragments in parallel and concatenate (no
  decode); a missing, slow (``fragment_timeout``) or corrupt fragment turns the read
  into a degraded one that fetches parity and decodes. Objects smaller than
  ``min_ec_size`` are stored whole, M+1 ways, under the keys of fragments 0..M.

Every stored EC record (fragment or small-object replica) starts with ``FRAG_HEADER``:
magic, version, kind, index, K, M, EC type, original length, xxh3-64 of the whole
object, xxh3-64 of the record's payload; a read verifies both.

Partial failure of a put: the records this call newly stored are deleted best effort
and the error is raised; objects are immutable and a repeated put of the same bytes is
a no-op, so retrying is idempotent.
"""
from __future__ import annotations

import hashlib
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass

from . import errors
from ._common import DEFAULT_NAMESPACE, as_bytes_view
from .client import Client
from .placement import Member, place
from .wire import MAX_KEY_LEN, checksum, key_bytes, namespace_bytes

DEFAULT_MIN_EC_SIZE = 256 << 10

# magic, version, kind, index, K, M, ec type, reserved, original length, object xxh3-64,
# payload xxh3-64
FRAG_HEADER = struct.Struct("<4sBBBBBBHQQQ")
FRAG_MAGIC = b"KVEC"
FRAG_VERSION = 1
KIND_FRAGMENT = 0
KIND_REPLICA = 1  # a small object stored whole
EC_TYPES = ("isa_l_rs_vand", "isa_l_rs_cauchy")
_EC_SUFFIX = b"#ec"


def fragment_key(key: bytes) -> bytes:
    """The key under which each node stores its record of an EC object: key + b"#ec", or,
    when that would exceed the 128-byte key limit, sha256(key) + b"#ech". One record per
    node per object (placement picks distinct nodes); the record's index is in its header."""
    if len(key) + len(_EC_SUFFIX) <= MAX_KEY_LEN:
        return key + _EC_SUFFIX
    return hashlib.sha256(key).digest() + b"#ech"


@dataclass(frozen=True)
class Policy:
    kind: str  # "none" | "replicas" | "ec"
    n: int = 1  # replicas (none: 1)
    k: int = 0
    m: int = 0

    @classmethod
    def parse(cls, text: str | Policy) -> Policy:
        if isinstance(text, Policy):
            return text
        t = str(text).strip().lower()
        try:
            if t == "none":
                return cls("none", 1)
            if t.startswith("replicas:"):
                n = int(t.split(":", 1)[1])
                if n >= 1:
                    return cls("replicas", n)
            elif t.startswith("ec:"):
                k, m = (int(x) for x in t.split(":", 1)[1].split("+"))
                if k >= 1 and m >= 1 and k + m <= 32:
                    return cls("ec", k + m, k, m)
        except ValueError:
            pass
        raise errors.InvalidArgument(
            f"invalid redundancy policy {text!r}: use none, replicas:N (N >= 1) or ec:K+M "
            "(K, M >= 1, K+M <= 32)")

    @property
    def nodes(self) -> int:
        """How many distinct nodes the policy needs."""
        return self.n

    @property
    def ec_type(self) -> str:
        return "isa_l_rs_cauchy" if self.m > 4 else "isa_l_rs_vand"

    def __str__(self) -> str:
        if self.kind == "ec":
            return f"ec:{self.k}+{self.m}"
        return "none" if self.kind == "none" else f"replicas:{self.n}"


class _Codec:
    """A pyeclib driver plus whether its data fragments are the object's bytes after a
    fixed-size liberasurecode header (checked once), which allows decode-free reads."""

    def __init__(self, k: int, m: int, ec_type: str):
        try:
            from pyeclib.ec_iface import ECDriver
        except ImportError as e:
            raise errors.InvalidArgument(
                "ec policies need pyeclib (pip install 'kvstored[cluster]' or pyeclib==1.8.0)") from e
        self.k, self.m, self.ec_type = k, m, ec_type
        from pyeclib.ec_iface import ECDriverError
        self.errors = ECDriverError
        self.driver = ECDriver(k=k, m=m, ec_type=ec_type)
        self.lock = threading.Lock()
        probe = bytes((i * 7 + 3) & 0xFF for i in range(k * 1000 + 17))
        frags = self.driver.encode(probe)
        self.offset = None
        for off in (80,):  # liberasurecode's fragment header
            if b"".join(f[off:] for f in frags[:k])[:len(probe)] == probe:
                self.offset = off

    def encode(self, data: bytes) -> list[bytes]:
        return self.driver.encode(data)

    def decode(self, fragments: list[bytes]) -> bytes:
        # pyeclib needs bytes (a bytearray aborts the process inside liberasurecode)
        return self.driver.decode([bytes(f) for f in fragments])


def _parse_record(buf) -> tuple | None:
    """(header tuple, payload view) of a stored EC record, or None if it is not a valid one."""
    if buf is None or len(buf) < FRAG_HEADER.size:
        return None
    h = FRAG_HEADER.unpack_from(buf)
    magic, ver, kind, _index, _k, _m, _t, _r, olen, ocsum, pcsum = h
    if magic != FRAG_MAGIC or ver != FRAG_VERSION or kind not in (KIND_FRAGMENT, KIND_REPLICA):
        return None
    payload = memoryview(buf)[FRAG_HEADER.size:]
    if checksum(payload) != pcsum:
        return None
    if kind == KIND_REPLICA and (len(payload) != olen or pcsum != ocsum):
        return None
    return h, payload


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


class ClusterClient:
    """A blocking client over many kvstored nodes (thread-safe).

    ``members``: control addresses (``"host:port"``, each its own node and failure
    domain), ``Member`` objects / objects with ``node_id``, ``address``,
    ``failure_domain``, or a callable returning such a list (re-read every
    ``refresh_s`` seconds; e.g. a view of the etcd membership).
    ``policy``: one policy for every namespace, or ``{namespace: policy}`` with an
    optional ``"*"`` default (else ``none``).
    """

    def __init__(self, members: Sequence | Callable[[], Sequence], policy="none", *,
                 namespace: str = DEFAULT_NAMESPACE, min_ec_size: int = DEFAULT_MIN_EC_SIZE,
                 node_timeout: float = 10.0, fragment_timeout: float = 2.0, down_s: float = 5.0,
                 refresh_s: float = 5.0, max_workers: int = 16, **client_kwargs):
        self.namespace = namespace_bytes(namespace).decode()
        self.min_ec_size = int(min_ec_size)
        self.node_timeout = node_timeout
        self.fragment_timeout = fragment_timeout
        self.down_s = down_s
        self.refresh_s = refresh_s
        self._client_kwargs = client_kwargs
        self._source = members if callable(members) else None
        self._members: list[Member] = [] if callable(members) else self._check_members(members)
        self._members_at = 0.0
        if isinstance(policy, dict):
            self._policies = {k: Policy.parse(v) for k, v in policy.items()}
        else:
            self._policies = {"*": Policy.parse(policy)}
        self._clients: dict[str, Client] = {}
        self._down: dict[str, float] = {}
        self._lock = threading.Lock()
        self._codecs: dict[tuple, _Codec] = {}
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kvstore-cluster")
        self._closed = False
        if self._source is None:
            for p in self._policies.values():
                self._check_policy(p, len(self._members))

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

    @staticmethod
    def _check_policy(p: Policy, n: int) -> None:
        if p.nodes > n:
            raise errors.InvalidArgument(
                f"policy {p} needs {p.nodes} nodes but the cluster has {n}")

    def members(self) -> list[Member]:
        if self._source is not None and time.monotonic() - self._members_at >= self.refresh_s:
            ms = self._check_members(self._source())
            with self._lock:
                self._members, self._members_at = ms, time.monotonic()
        return self._members

    def set_policy(self, namespace: str, policy) -> None:
        """Set the policy of ``namespace`` ("*" = the default)."""
        self._policies[namespace if namespace == "*" else namespace_bytes(namespace).decode()] = \
            Policy.parse(policy)

    def policy(self, namespace: str | None = None) -> Policy:
        ns = self._ns(namespace)
        return self._policies.get(ns) or self._policies.get("*") or Policy("none", 1)

    def _ns(self, namespace: str | None) -> str:
        return self.namespace if namespace is None else namespace_bytes(namespace).decode()

    def client(self, member: Member) -> Client:
        """The plain Client of one node (created on first use)."""
        c = self._clients.get(member.node_id)
        if c is None:
            with self._lock:
                c = self._clients.get(member.node_id)
                if c is None:
                    kw = dict(self._client_kwargs)
                    kw.setdefault("timeout", self.node_timeout)
                    c = self._clients[member.node_id] = Client(member.address, namespace=self.namespace, **kw)
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
        except errors.Unavailable:
            self._down[member.node_id] = time.monotonic() + self.down_s
            raise
        except OSError as e:
            self._down[member.node_id] = time.monotonic() + self.down_s
            raise errors.Unavailable(f"node {member.node_id}: {e}") from None

    def _submit(self, member: Member, op: str, *args, **kw):
        return self._pool.submit(self._node, member, op, *args, **kw)

    def _placed(self, key: bytes, ns: str, p: Policy, extra: int = 0, read: bool = False) -> list[Member]:
        """The policy's nodes for ``key``, then up to ``extra`` next ones in preference order
        (the same prefix whatever ``extra`` is). Writes need all the policy's nodes; reads
        only enough to succeed (K for EC, 1 otherwise), so a cluster that lost nodes from
        its member list still serves what it holds."""
        ms = self.members()
        if not read:
            self._check_policy(p, len(ms))
        elif len(ms) < (p.k if p.kind == "ec" else 1):
            raise errors.Unavailable(f"policy {p} cannot read with {len(ms)} member(s)")
        return place(key, ms, min(p.nodes + extra, len(ms)), ns)

    def _codec(self, p: Policy) -> _Codec:
        c = self._codecs.get((p.k, p.m))
        if c is None:
            c = self._codecs[(p.k, p.m)] = _Codec(p.k, p.m, p.ec_type)
        return c

    # ------------------------------------------------------------ records
    def _records(self, p: Policy, value: memoryview) -> list[tuple[int, bytes]]:
        """(index, stored bytes) of every record of an object under an EC policy."""
        n = len(value)
        ocsum = checksum(value)
        if n < self.min_ec_size:
            return [(i, b"".join((FRAG_HEADER.pack(FRAG_MAGIC, FRAG_VERSION, KIND_REPLICA, i, p.k, p.m,
                                                   EC_TYPES.index(p.ec_type), 0, n, ocsum, ocsum), value)))
                    for i in range(p.m + 1)]
        frags = self._codec(p).encode(bytes(value))
        out = []
        for i, f in enumerate(frags):
            hdr = FRAG_HEADER.pack(FRAG_MAGIC, FRAG_VERSION, KIND_FRAGMENT, i, p.k, p.m,
                                   EC_TYPES.index(p.ec_type), 0, n, ocsum, checksum(f))
            out.append((i, hdr + f))
        return out

    def _writes(self, key: bytes, value: memoryview, ns: str, p: Policy) -> list[tuple[Member, bytes, object]]:
        placed = self._placed(key, ns, p)
        if p.kind != "ec":
            return [(m, key, value) for m in placed]
        return [(placed[i], fragment_key(key), rec) for i, rec in self._records(p, value)]

    def _write_all(self, writes: list[tuple[Member, list[tuple[bytes, object]]]], ns: str,
                   overwrite: bool) -> list[list[bool]]:
        """batch_put every node's items in parallel; all must succeed (W = all). On a
        failure the items newly stored by this call are deleted best effort."""
        futs = [self._submit(m, "batch_put", items, namespace=ns, overwrite=overwrite)
                for m, items in writes]
        wait(futs)
        results, first = [], None
        for (m, items), f in zip(writes, futs):
            e = f.exception()
            if e is not None:
                first = first or (e, m)
                results.append(None)
            else:
                results.append(f.result())
        if first is None:
            return results
        for (m, items), r in zip(writes, results):
            if r is not None:
                fresh = [k for (k, _v), stored in zip(items, r) if stored]
                if fresh:
                    try:
                        self._node(m, "delete", fresh, namespace=ns)
                    except errors.KVStoreError:
                        pass
        e, m = first
        raise type(e)(f"put not acknowledged: node {m.node_id} ({m.address}) failed: {e}") from e

    # ------------------------------------------------------------ data path
    def put(self, key, value, *, namespace: str | None = None, overwrite: bool = False) -> bool:
        """Store ``value`` under the namespace's policy; acknowledged when every replica or
        fragment is stored. Returns False if it was all there already."""
        return self.batch_put([(key, value)], namespace=namespace, overwrite=overwrite)[0]

    def batch_put(self, items: Iterable[tuple[object, object]], *, namespace: str | None = None,
                  overwrite: bool = False) -> list[bool]:
        """Put many objects, one pipelined batch per node, all nodes in parallel."""
        ns = self._ns(namespace)
        p = self.policy(ns)
        per_node: dict[str, tuple[Member, list]] = {}
        owners: list[list[tuple[str, int]]] = []
        for k, v in items:
            kb = key_bytes(k)
            where = []
            for m, sk, rec in self._writes(kb, as_bytes_view(v), ns, p):
                slot = per_node.setdefault(m.node_id, (m, []))
                where.append((m.node_id, len(slot[1])))
                slot[1].append((sk, rec))
            owners.append(where)
        order = list(per_node.values())
        res = self._write_all(order, ns, overwrite)
        by_id = {m.node_id: r for (m, _), r in zip(order, res)}
        return [any(by_id[nid][i] for nid, i in where) for where in owners]

    def get(self, key, *, namespace: str | None = None) -> bytearray:
        """The object's bytes (a new bytearray). Raises NotFound, or Unavailable when too
        few nodes answer."""
        ns = self._ns(namespace)
        p = self.policy(ns)
        kb = key_bytes(key)
        if p.kind == "ec":
            return self._get_ec(kb, ns, p, self._placed(kb, ns, p, extra=p.m, read=True))
        return self._get_replica(kb, ns, self._placed(kb, ns, p, read=True))

    def _get_replica(self, key: bytes, ns: str, placed: list[Member]) -> bytearray:
        now = time.monotonic()
        order = sorted(placed, key=lambda m: self._down.get(m.node_id, 0) > now)  # down nodes last
        errs = []
        for m in order:
            try:
                return self._node(m, "get", key, namespace=ns)
            except (errors.NotFound, errors.Unavailable, errors.ChecksumMismatch) as e:
                errs.append(e)
        if all(isinstance(e, errors.NotFound) for e in errs):
            raise errors.NotFound(f"{key[:64]!r} not found on its {len(placed)} node(s)")
        raise errors.Unavailable(f"no healthy replica of {key[:64]!r}: "
                                 + "; ".join(f"{type(e).__name__}: {e}" for e in errs))

    def _get_ec(self, key: bytes, ns: str, p: Policy, placed: list[Member]) -> bytearray:
        """Healthy path: the records of nodes 0..K-1 in parallel, concatenated. Otherwise
        degraded: the records of nodes K..K+M-1 too (then up to M further nodes in
        preference order, where records land after a membership change), decoded from any
        K valid fragments."""
        fk = fragment_key(key)
        futs = {}
        got: dict[int, object] = {}  # position in ``placed`` -> buffer or exception
        for i in range(p.k):
            futs[self._submit(placed[i], "get", fk, namespace=ns)] = i
        self._gather(futs, got, time.monotonic() + self.fragment_timeout)
        data = [got.get(i) for i in range(min(p.k, len(placed)))]
        if all(isinstance(d, errors.NotFound) for d in data):
            raise errors.NotFound(f"{key[:64]!r} not found")
        out = self._assemble(p, got, fast=True)
        if out is not None:
            return out
        # degraded: fetch the other records too (pending fetches stay in play)
        for extra in (range(p.k, min(p.k + p.m, len(placed))), range(p.k + p.m, len(placed))):
            for i in extra:
                futs[self._submit(placed[i], "get", fk, namespace=ns)] = i
            deadline = time.monotonic() + self.node_timeout + self.fragment_timeout
            while futs and time.monotonic() < deadline:
                self._gather(futs, got, deadline, until_one=True)
                out = self._assemble(p, got, fast=False)
                if out is not None:
                    return out
            out = self._assemble(p, got, fast=False)
            if out is not None:
                return out
        if all(isinstance(d, errors.NotFound) for d in got.values()):
            raise errors.NotFound(f"{key[:64]!r} not found")
        valid = len(self._valid(p, got))
        raise errors.Unavailable(f"{key[:64]!r}: only {valid} valid record(s) of {p}, need {p.k}")

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

    @staticmethod
    def _valid(p: Policy, got: dict) -> dict:
        """index (from the header) -> parsed record, for every valid record fetched."""
        out = {}
        for d in got.values():
            r = _parse_record(d) if isinstance(d, (bytes, bytearray)) else None
            if r is not None and r[0][4] == p.k and r[0][5] == p.m:
                out.setdefault((r[0][2], r[0][3]), r)
        return out

    def _assemble(self, p: Policy, got: dict, fast: bool) -> bytearray | None:
        recs = self._valid(p, got)
        # a whole-object copy (small objects) wins at once
        for (kind, _i), r in sorted(recs.items()):
            if kind == KIND_REPLICA:
                return bytearray(r[1])
        frags = {i: r for (kind, i), r in recs.items() if kind == KIND_FRAGMENT and i < p.k + p.m}
        if not frags:
            return None
        # the object the majority of valid fragments describe (length, checksum)
        groups: dict[tuple, list[int]] = {}
        for i, r in frags.items():
            groups.setdefault((r[0][8], r[0][9]), []).append(i)
        (olen, ocsum), idx = max(groups.items(), key=lambda kv: len(kv[1]))
        codec = self._codec(p)
        if fast:
            if codec.offset is None or any(i not in idx for i in range(p.k)):
                return None
            out = bytearray(olen)
            pos = 0
            for i in range(p.k):
                part = frags[i][1][codec.offset:]
                take = min(len(part), olen - pos)
                out[pos:pos + take] = part[:take]
                pos += take
            if pos == olen and checksum(out) == ocsum:
                return out
            return None
        if len(idx) < p.k:
            return None
        try:
            data = codec.decode([frags[i][1] for i in sorted(idx)])
        except codec.errors:  # pyeclib's own errors: not enough consistent fragments
            return None
        if len(data) != olen or checksum(data) != ocsum:
            return None
        return bytearray(data)

    def batch_get(self, keys: Sequence, *, namespace: str | None = None) -> list[bytearray]:
        """Get many objects: one batch per node, all nodes in parallel; a key whose node
        batch fails is retried alone (with the single-key fallbacks)."""
        ns = self._ns(namespace)
        p = self.policy(ns)
        ks = [key_bytes(k) for k in keys]
        placed = [self._placed(k, ns, p, extra=p.m if p.kind == "ec" else 0, read=True) for k in ks]
        per_node: dict[str, tuple[Member, list]] = {}
        for j, (k, pl) in enumerate(zip(ks, placed)):
            if p.kind == "ec":
                for i in range(p.k):
                    per_node.setdefault(pl[i].node_id, (pl[i], []))[1].append((j, i, fragment_key(k)))
            else:
                now = time.monotonic()
                m = min(pl, key=lambda m: self._down.get(m.node_id, 0) > now)
                per_node.setdefault(m.node_id, (m, []))[1].append((j, 0, k))
        futs = [(items, self._submit(m, "batch_get", [sk for _j, _i, sk in items], namespace=ns))
                for m, items in per_node.values()]
        wait([f for _, f in futs])
        got: list[dict] = [{} for _ in ks]
        for items, f in futs:
            if f.exception() is None:
                for (j, i, _sk), buf in zip(items, f.result()):
                    got[j][i] = buf
        out = []
        for j, k in enumerate(ks):
            if p.kind != "ec":
                out.append(got[j][0] if 0 in got[j] else self._get_replica(k, ns, placed[j]))
                continue
            r = self._assemble(p, got[j], fast=True) if len(got[j]) == p.k else None
            out.append(r if r is not None else self._get_ec(k, ns, p, placed[j]))
        return out

    # ------------------------------------------------------------ control
    def _candidates(self, key: bytes, ns: str, p: Policy) -> list[tuple[Member, bytes]]:
        """Where to ask whether ``key`` is stored, best first."""
        placed = self._placed(key, ns, p, read=True)
        if p.kind == "ec":
            return [(m, fragment_key(key)) for m in placed[:p.m + 1]]
        return [(m, key) for m in placed]

    def exists(self, keys: Sequence, *, namespace: str | None = None) -> list[bool]:
        """Whether each key is stored: asked of its first node (then the next ones when a
        node does not answer), grouped per node, all nodes in parallel."""
        ns = self._ns(namespace)
        p = self.policy(ns)
        ks = [key_bytes(k) for k in keys]
        cands = [self._candidates(k, ns, p) for k in ks]
        answer: list[bool | None] = [None] * len(ks)
        for rnd in range(max((len(c) for c in cands), default=0)):
            per_node: dict[str, tuple[Member, list]] = {}
            for j, c in enumerate(cands):
                if answer[j] is None and rnd < len(c):
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
                if f.exception() is None:
                    for (j, _), e in zip(chunk, f.result()):
                        answer[j] = bool(e)
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
        """Delete every copy / record of ``keys`` (best effort on unreachable nodes); returns
        how many keys had something deleted."""
        ns = self._ns(namespace)
        p = self.policy(ns)
        hit = [False] * len(keys)
        per_node: dict[str, tuple[Member, list]] = {}
        for j, k in enumerate(keys):
            kb = key_bytes(k)
            placed = self._placed(kb, ns, p, extra=p.m if p.kind == "ec" else 0, read=True)
            sks = [fragment_key(kb)] * len(placed) if p.kind == "ec" else [kb] * len(placed)
            for m, sk in zip(placed, sks):
                per_node.setdefault(m.node_id, (m, []))[1].append((j, sk))
        for m, items in per_node.values():
            for j, sk in items:
                try:
                    if self._node(m, "delete", [sk], namespace=ns):
                        hit[j] = True
                except errors.KVStoreError:
                    pass
        return sum(hit)


__all__ = ["DEFAULT_MIN_EC_SIZE", "FRAG_HEADER", "ClusterClient", "Member", "Policy", "fragment_key"]
