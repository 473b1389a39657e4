"""Control calls (gRPC), each written once for Client and AsyncClient.

A call is a builder: from the client and the caller's arguments it makes a
``Call`` (rpc name, request message, response parser, and the timeout / epoch the
call overrides). ``SyncControl`` and ``AsyncControl`` turn every builder of
``CALLS`` into a method that runs it through the client's ``_call``: the blocking
client calls its sync stub, the asyncio client awaits its aio stub. Retries,
fail-fast and the mapping to typed errors are the clients' ``_call`` (the same
rules on both); argument errors raise when the method is called (awaited, for
AsyncClient), before anything is sent.
"""
from __future__ import annotations

import functools
import struct
from typing import Callable, NamedTuple, Sequence

from . import errors
from .v1 import control_pb2 as pb
from .wire import checksum, key_bytes


class Call(NamedTuple):
    rpc: str  # the KVStore service method
    request: object
    parse: Callable  # response message -> what the method returns
    timeout: float | None = None  # None: the client's timeout
    epoch: int | None = None  # None: the client's epoch; 0: never redirected


def epoch_metadata(metadata: tuple | None, epoch: int) -> tuple | None:
    """The call's metadata: the auth token's plus the member-list epoch when there is one
    (the control plane redirects keyed calls like the data path)."""
    if not epoch:
        return metadata
    return tuple(metadata or ()) + (("kvstore-epoch", str(epoch)),)


CALLS: dict[str, Callable[..., Call]] = {}


def _call(fn):
    """Register a builder under its name (a trailing _ avoids shadowing a builtin here)."""
    CALLS[fn.__name__.rstrip("_")] = fn
    return fn


def _keys(c, keys, namespace) -> pb.KeysRequest:
    return pb.KeysRequest(namespace=c._nss(namespace), keys=c._keys(keys))


def _all_or_mine(c, namespace: str | None) -> str:
    return "" if namespace == "" else c._nss(namespace)


def _count(r) -> int:
    return r.count


def _same(r):
    return r


@_call
def exists(c, keys: Sequence, *, namespace: str | None = None) -> list[bool]:
    """Whether each of ``keys`` is stored."""
    return Call("Exists", _keys(c, keys, namespace), lambda r: list(r.exists))


@_call
def lookup(c, keys: Sequence, *, namespace: str | None = None) -> int:
    """How many of ``keys`` are stored, counting from the first (the prefix hit length)."""
    return Call("Lookup", _keys(c, keys, namespace), _count)


@_call
def pin(c, keys: Sequence, ttl: float = 60.0, *, namespace: str | None = None) -> int:
    """Protect objects from eviction for ``ttl`` seconds; returns how many were pinned."""
    return Call("Pin", pb.PinRequest(namespace=c._nss(namespace), keys=c._keys(keys), ttl_seconds=ttl),
                _count)


@_call
def unpin(c, keys: Sequence, *, namespace: str | None = None) -> int:
    """Let pinned objects be evicted again; returns how many were pinned."""
    return Call("Unpin", _keys(c, keys, namespace), _count)


@_call
def delete(c, keys: Sequence, *, namespace: str | None = None, check_epoch: bool = True) -> int:
    """Delete ``keys``; returns how many existed. ``check_epoch=False``: never
    redirected (ClusterClient undoing exactly the records it has just written)."""
    return Call("Delete", _keys(c, keys, namespace), _count, epoch=None if check_epoch else 0)


@_call
def delete_each(c, keys: Sequence, *, namespace: str | None = None,
                check_epoch: bool = True) -> list[bool] | None:
    """``delete``, answering for each key whether it existed; None from a daemon older
    than this SDK, which answers only the count (``delete``'s)."""
    req = _keys(c, keys, namespace)
    n = len(req.keys)

    def each(r) -> list[bool] | None:
        if len(r.deleted) == n:
            return list(r.deleted)
        return [r.count > 0] if n == 1 else None

    return Call("Delete", req, each, epoch=None if check_epoch else 0)


@_call
def stats(c) -> pb.StatsResponse:
    """The daemon's counters and tier state."""
    return Call("Stats", pb.StatsRequest(), _same)


@_call
def delete_all(c, *, namespace: str | None = None) -> int:
    """Admin: delete every object of the namespace ("" = of every namespace)."""
    return Call("DeleteAll", pb.DeleteAllRequest(namespace=_all_or_mine(c, namespace)), _count)


@_call
def reload(c) -> list[str]:
    """Admin: make the daemon re-read its config, tokens and certificates (like SIGHUP);
    returns what changed."""
    return Call("Reload", pb.ReloadRequest(), lambda r: list(r.changed))


@_call
def health(c, timeout: float | None = None) -> pb.HealthResponse:
    """Liveness and readiness (``.live``, ``.ready``)."""
    return Call("Health", pb.HealthRequest(), _same, timeout=timeout)


@_call
def members(c) -> pb.MembersResponse:
    """Cluster members as the daemon sees them (``.members``, ``.source`` = etcd |
    static | standalone, ``.degraded``)."""
    return Call("Members", pb.MembersRequest(), _same)


@_call
def heads(c, keys: Sequence, *, head_bytes: int = 0, namespace: str | None = None,
          packed: bool = False) -> pb.HeadsResponse:
    """Cluster internals (admin): presence, checksum and first ``head_bytes`` (<= 64)
    of each key, records not yet verified after a restart included. ``packed``: ask for
    the packed form (read either form with ``heads_of``)."""
    return Call("Heads", pb.HeadsRequest(namespace=c._nss(namespace), keys=c._keys(keys),
                                         head_bytes=head_bytes, packed=packed), _same)


class HeadRecord(NamedTuple):
    """One key's answer in a Heads call, as ``heads_of`` gives it (pb.Head's fields)."""
    present: bool
    unverified: bool
    size: int
    checksum: int
    head: bytes
    deleted_ago: float
    committed_ago: float


class Heads(NamedTuple):
    """A HeadsResponse read by ``heads_of``: ``heads`` in the order of the keys asked."""
    heads: list
    unverified_objects: int
    epoch: int
    put_flags: int


# HeadsResponse.packed_heads: per key one record of HEAD_RECORD (present and unverified
# as bytes 0/1) then head_bytes of head (zero padded; its length in the record). One
# struct per head_bytes, made when first used
HEAD_RECORD = struct.Struct("<??QQddB")
_packed: dict[int, struct.Struct] = {}
_record = functools.partial(tuple.__new__, HeadRecord)  # (HeadRecord(*t) checks its arguments: slower)


def head_struct(head_bytes: int) -> struct.Struct:
    """The fixed-width packed record of one key for ``head_bytes`` (0-64)."""
    s = _packed.get(head_bytes)
    if s is None:
        s = _packed[head_bytes] = struct.Struct(f"{HEAD_RECORD.format}{head_bytes}s")
    return s


def heads_of(r, n_keys: int, head_bytes: int) -> Heads:
    """A HeadsResponse of ``n_keys`` keys in either form: packed (a node asked for it)
    or repeated Head messages (a node of an earlier version, or one not asked). An
    answer that does not hold ``n_keys`` heads is a ProtocolError."""
    if r.packed_heads or not r.heads:
        s = head_struct(head_bytes)
        data = r.packed_heads
        if len(data) != n_keys * s.size:
            raise errors.ProtocolError(f"a packed Heads answer of {len(data)} bytes for {n_keys} keys "
                                       f"of {s.size} bytes each")
        out = [_record((p, u, size, csum, head if n == head_bytes else head[:n], deleted, committed))
               for p, u, size, csum, deleted, committed, n, head in s.iter_unpack(data)]
    else:
        if len(r.heads) != n_keys:
            raise errors.ProtocolError(f"a Heads answer of {len(r.heads)} heads for {n_keys} keys")
        out = [HeadRecord(h.present, h.unverified, h.size, h.checksum, h.head, h.deleted_ago,
                          h.committed_ago) for h in r.heads]
    return Heads(out, r.unverified_objects, r.epoch, r.put_flags)


@_call
def drain(c, cancel: bool = False) -> pb.DrainResponse:
    """Admin: take this node out of placement and move its records away (or cancel)."""
    return Call("Drain", pb.DrainRequest(cancel=cancel), _same)


@_call
def set_policy(c, namespace: str, policy: str) -> dict[str, str]:
    """Admin: a namespace's cluster-wide redundancy policy ("*" = default; "" removes it)."""
    ns = namespace if namespace == "*" else c._nss(namespace)
    return Call("SetPolicy", pb.SetPolicyRequest(namespace=ns, policy=policy), lambda r: dict(r.policies))


@_call
def list_(c, *, namespace: str | None = None, limit: int = 100) -> pb.ListResponse:
    """A sample of stored objects (None = this client's namespace, "" = all namespaces)."""
    return Call("List", pb.ListRequest(namespace=_all_or_mine(c, namespace), limit=limit), _same)


@_call
def control_put(c, key, value: bytes, *, namespace: str | None = None, overwrite: bool = False) -> bool:
    """Put a small object over gRPC (no data connection needed)."""
    return Call("Put", pb.PutRequest(namespace=c._nss(namespace), key=key_bytes(key), value=bytes(value),
                                     checksum=checksum(value), overwrite=overwrite), lambda r: r.stored)


@_call
def control_get(c, key, *, namespace: str | None = None) -> bytes:
    """Get a small object over gRPC; its checksum is verified when the client verifies."""
    verify = c.verify_checksums

    def parse(r) -> bytes:
        if verify and checksum(r.value) != r.checksum:
            raise errors.ChecksumMismatch("object bytes do not match their checksum after transfer")
        return r.value

    return Call("Get", pb.GetRequest(namespace=c._nss(namespace), key=key_bytes(key)), parse)


def _named(method, name: str):
    method.__name__ = name
    method.__qualname__ = name
    return method


def _sync(build):
    @functools.wraps(build)
    def method(self, *args, **kw):
        c = build(self, *args, **kw)
        return c.parse(self._call(c.rpc, c.request, c.timeout, c.epoch))
    return method


def _async(build):
    @functools.wraps(build)
    async def method(self, *args, **kw):
        c = build(self, *args, **kw)
        return c.parse(await self._call(c.rpc, c.request, c.timeout, c.epoch))
    return method


class SyncControl:
    """Client's control calls (one method per ``CALLS`` entry, through ``self._call``)."""


class AsyncControl:
    """AsyncClient's control calls (coroutines, through ``await self._call``)."""


for _name, _build in CALLS.items():
    setattr(SyncControl, _name, _named(_sync(_build), _name))
    setattr(AsyncControl, _name, _named(_async(_build), _name))
del _name, _build

__all__ = ["CALLS", "HEAD_RECORD", "AsyncControl", "Call", "HeadRecord", "Heads", "SyncControl", "epoch_metadata",
           "head_struct", "heads_of"]
