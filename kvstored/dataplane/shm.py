"""Same-host data path: the client maps the daemon's arena; only ids and offsets travel.

A client connects to a Unix socket. The daemon checks the peer's credentials
(SO_PEERCRED: the daemon's own uid, root, or ``shm.allowed_uids``), then
sends the arena's memfd with SCM_RIGHTS and the arena size. From then on the
connection speaks the ordinary frames (same parser as TCP, auth included) plus
the SHM_* ops of ``kvstore.wire``:

* a get returns the object's offset and a *lease*: the daemon holds a read
  reference until the client releases the lease, the connection closes or the
  lease expires (``shm.lease_ttl``), so the bytes under a view cannot be
  evicted or reused while the lease lives;
* a put reserves a slot (offset + reservation id), the client copies into it,
  and commit checksums the slot and publishes it; nothing is visible before;
* credits make a put one round trip: a commit (or SHM_PUT) asking for a refill is
  answered with a *credit*, a slot of the same size reserved ahead and not yet bound
  to a key. The client copies its next object of that size into it and sends
  SHM_PUT (namespace, key, checksum, credit id); the daemon binds the slot to the key,
  verifies the checksum and publishes, exactly as a commit does. Credits are ordinary
  reservations: they count against the connection's and the uid's reserved-bytes
  bounds, at most ``MAX_CREDITS`` per connection and ``credit_bytes`` of slots, and
  expire like a put's reservation (``put_stall_timeout + size / min_put_rate``), so a
  client that takes them and never puts holds nothing for long; they are never waited
  for (no space: no credit) and die with the connection.

Released leases may arrive late (a client sends them with its next request): a
release of an id this connection was given that is no longer held (expired, or
released twice) is ignored; an id it was never given is a forged id.

The socket is driven by the TCP driver (``tcp.DataConnection``) with this
module's op table (``SHM_OPS``: the core ops plus the SHM_* ops) and a
per-connection ``ShmState`` holding the leases and reservations.

The client never names an offset: it sends lease and reservation ids, which are
looked up in this connection's own tables, so a forged id is rejected and the
daemon never reads or writes outside a slot it handed out. The mapping itself
is read-write, so the channel is for trusted local processes (see README).
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import time
from typing import TYPE_CHECKING

from kvstore import errors
from kvstore.wire import (FLAG_CHECKSUM_UNKNOWN, FLAG_NOT_VERIFIED_OK, FLAG_OVERWRITE, FLAG_REFILL, OP_SHM_COMMIT, OP_SHM_GET,
                          OP_SHM_PUT, OP_SHM_RELEASE, OP_SHM_RESERVE, SHM_HELLO, SHM_IDS, SHM_MAGIC,
                          encode_error, encode_response)

from kvstored.auth import READ, WRITE

from .ops import CORE_OPS
from .session import SIZE, DataSession, _check_names
from .tcp import DataConnection

if TYPE_CHECKING:
    from kvstore.wire import Header

    from kvstored.engine import Entry, Reservation

    from .tcp import DataServer

log = logging.getLogger("kvstored.shm")

SHM_VERSION = 1
_UCRED = struct.Struct("3i")
# Bounds per shm connection: leases held at once (a client that takes views and never
# releases them is refused more, NoSpace, until it does or they expire), and credits
# (slots reserved ahead; the bytes they may hold are ShmServer.credit_bytes).
MAX_LEASES = 4096
MAX_CREDITS = 64


class ShmServer:
    def __init__(self, data_server: "DataServer", path: str, *, allowed_uids: set[int],
                 lease_ttl: float):
        self.ds = data_server
        self.path = path
        self.allowed_uids = allowed_uids | {os.getuid(), 0}
        self.lease_ttl = lease_ttl
        # credits hold at most 1/8 of the arena, all connections together, and 64 MiB
        # per connection: a batch's worth of slots for the next batch, never enough to
        # starve other writers (idle credits are only taken back at their deadline)
        self.credit_total = data_server.store.arena.size // 8
        self.credit_bytes = min(64 << 20, self.credit_total)
        self.credit_held = 0  # bytes of credits of all connections
        self.sock: socket.socket | None = None
        self.task: asyncio.Task | None = None
        self.connections: set[ShmState] = set()

    async def start(self) -> str:
        if os.path.exists(self.path):
            if _in_use(self.path):
                raise OSError(f"shm socket {self.path} is in use by another process")
            os.unlink(self.path)  # a stale socket from a daemon that died
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        # group-accessible; who may really use it is decided per peer (SO_PEERCRED)
        os.chmod(self.path, 0o660)
        self.sock.listen(256)
        self.sock.setblocking(False)
        self.task = asyncio.get_running_loop().create_task(self._accept_loop())
        return self.path

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self.sock)
            except asyncio.CancelledError:
                raise
            except OSError as e:  # EMFILE and friends: keep serving the others
                self.ds.counters["accept_failed"] += 1  # (the log line is rate-limited)
                log.warning("shm accept failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            try:
                await self._admit(conn)
            except OSError as e:
                log.info("shm handshake failed: %s", e)
                conn.close()

    async def _admit(self, conn: socket.socket) -> None:
        pid, uid, gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                      _UCRED.size))
        counters = self.ds.counters
        if uid not in self.allowed_uids or self.ds.draining:
            counters["shm_rejected_peer"] += 1
            why = ("the daemon is shutting down" if self.ds.draining else
                   f"uid {uid} may not use the shared-memory channel (allowed: "
                   f"{', '.join(map(str, sorted(self.allowed_uids)))}; set shm.allowed_uids)")
            log.info("refused shm client pid=%d uid=%d: %s", pid, uid, why)
            conn.setblocking(True)
            conn.settimeout(1.0)
            try:
                conn.sendall(encode_error(0, 0, errors.PermissionDenied.code, why))
            finally:
                conn.close()
            return
        hello = SHM_HELLO.pack(SHM_MAGIC, SHM_VERSION, self.ds.store.arena.size)
        socket.send_fds(conn, [hello], [self.ds.store.arena.fd])  # tiny: never blocks
        counters["shm_connections_total"] += 1
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_unix_connection(
            lambda: DataConnection(self.ds, ops=SHM_OPS, ext=ShmState(self),
                                   peer=f"shm:pid={pid},uid={uid}", client=f"uid:{uid}"),
            sock=conn)
        if transport.is_closing() and type(transport).__module__.startswith("uvloop"):
            # refused in connection_made (too many connections): uvloop closed the fd then
            # but attaches ``conn`` to the transport only afterwards, so nothing detaches it,
            # and its finalizer closed the fd number again when the GC got to it, by then
            # another socket's (a gRPC call's: "Stream removed"). The fd is closed: let go.
            conn.detach()

    def expire_leases(self) -> int:
        """Release leases past their TTL (a client that forgot, or hangs)."""
        now = time.monotonic()
        n = 0
        for c in list(self.connections):
            n += c.expire(now)
        if n:
            self.ds.counters["shm_leases_expired"] += n
            log.warning("released %d expired shm leases", n)
        return n

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.sock is not None:
            self.sock.close()
            try:
                os.unlink(self.path)
            except OSError:
                pass


class ShmState:
    """One shm connection's leases, reservations and credits (the session's ``ext``):
    they live and die with the connection."""

    def __init__(self, shm: ShmServer):
        self.shm = shm
        self.leases: dict[int, tuple["Entry", float]] = {}
        self.reservations: dict[int, "Reservation"] = {}
        self.credits: dict[int, "Reservation"] = {}
        self.credit_bytes = 0  # bytes of the slots in ``credits``
        self.last_id = 0  # ids handed out are 1..last_id: anything above is forged
        self.store = shm.ds.store

    def new_id(self) -> int:
        self.last_id += 1
        return self.last_id

    def made(self, session: DataSession) -> None:
        self.shm.connections.add(self)

    def lost(self, session: DataSession) -> None:
        # a client that dies holding leases or reservations gives them back at once
        self.shm.connections.discard(self)
        for e, _ in self.leases.values():
            self.store.release(e)
        self.leases.clear()
        for res in self.reservations.values():
            session._drop_reservation(res)
        self.reservations.clear()
        for res in self.credits.values():
            session._drop_reservation(res)
        self.credits.clear()
        if self.credit_bytes:
            self.shm.credit_held -= self.credit_bytes
            self.credit_bytes = 0

    def take_credit(self, cid: int) -> "Reservation | None":
        res = self.credits.pop(cid, None)
        if res is not None:
            self.credit_bytes -= res.size
            self.shm.credit_held -= res.size
        return res

    def keep_credit(self, cid: int, res: "Reservation") -> None:
        self.credits[cid] = res
        self.credit_bytes += res.size
        self.shm.credit_held += res.size

    def expire(self, now: float) -> int:
        dead = [lid for lid, (_, until) in self.leases.items() if until <= now]
        for lid in dead:
            self.store.release(self.leases.pop(lid)[0])
        return len(dead)


# SHM_RESERVE's length is the object size, not a payload on the socket: no op here ever
# skips payload bytes (length=SIZE), so their errors skip nothing.

def _shm_get(s: DataSession, h: Header, ns: bytes, key: bytes) -> None:
    if h.flags & FLAG_NOT_VERIFIED_OK:
        s.not_verified_ok = True
    s.acquire(h.req_id, ns, key, OP_SHM_GET, _lease)  # NVMe promotion included


def _lease(s: DataSession, rid: int, e: "Entry", t0: float = 0.0) -> None:
    st: ShmState = s.ext
    if len(st.leases) >= MAX_LEASES:
        s.store.release(e)
        s.counters["shm_leases_refused"] += 1
        s.error(OP_SHM_GET, rid, errors.NoSpace(
            f"this connection holds {len(st.leases)} leases (limit {MAX_LEASES}): release views"))
        return
    lid = st.new_id()
    st.leases[lid] = (e, time.monotonic() + st.shm.lease_ttl)
    s.send(encode_response(OP_SHM_GET, rid, 0, SHM_IDS.size, e.checksum)
           + SHM_IDS.pack(e.offset, e.size, lid))


def _shm_release(s: DataSession, h: Header, ns: bytes, key: bytes) -> None:
    # no answer (saves a round trip per get). A lease this connection was given but no
    # longer holds (expired, released twice) is ignored: releases ride on the client's
    # next request and may come late. An id it was never given is forged: answered with
    # ProtocolError and the connection closed.
    st: ShmState = s.ext
    held = st.leases.pop(h.checksum, None)
    if held is not None:
        s.store.release(held[0])
    elif 0 < h.checksum <= st.last_id:
        s.counters["shm_stale_releases"] += 1
    else:
        s.counters["shm_forged_ids"] += 1
        s.fatal(h.req_id, f"unknown lease {h.checksum}")


def _shm_reserve(s: DataSession, h: Header, ns: bytes, key: bytes) -> None:
    cs = None if h.flags & FLAG_CHECKSUM_UNKNOWN else h.checksum
    # like a TCP put: no space -> wait (bounded) for eviction/demotion, reading nothing else
    s.reserve(OP_SHM_RESERVE, h.req_id, ns, key, h.length, cs, bool(h.flags & FLAG_OVERWRITE),
              _reserved)


def _reserved(s: DataSession, rid: int, res: "Reservation | None", size: int) -> None:
    if res is None:  # the same object is stored already
        s.send(encode_response(OP_SHM_RESERVE, rid, 0, 0, 0, aux=1))
        return
    st: ShmState = s.ext
    rid_res = st.new_id()
    st.reservations[rid_res] = res
    # the client copies from its own memory: nothing to watch progress by, so the slot is
    # reclaimed at put_stall_timeout + size / min_put_rate (set by the session's _hold)
    res.deadline = s.put_cap
    res.on_expire = lambda r: _reservation_expired(s, r)
    s.send(encode_response(OP_SHM_RESERVE, rid, 0, SHM_IDS.size, 0)
           + SHM_IDS.pack(res.offset, res.size, rid_res))


def _reservation_expired(s: DataSession, res: "Reservation") -> None:
    table = s.ext.reservations
    for k, r in list(table.items()):
        if r is res:
            del table[k]
    s.reservation_expired(res)


def _shm_commit(s: DataSession, h: Header, ns: bytes, key: bytes) -> None:
    res = s.ext.reservations.pop(h.checksum, None)
    if res is None:
        s.counters["shm_forged_ids"] += 1
        s.error(OP_SHM_COMMIT, h.req_id, errors.InvalidArgument(f"unknown reservation {h.checksum}"))
        return
    size = res.size
    try:
        stored = s.commit(res)
    except errors.KVStoreError as e:
        s.error(OP_SHM_COMMIT, h.req_id, e)
        return
    _answer(s, OP_SHM_COMMIT, h.req_id, stored, _grant(s, size) if h.flags & FLAG_REFILL else ())


def _answer(s: DataSession, op: int, rid: int, stored: bool, credit: tuple) -> None:
    """A put's answer; with a credit, SHM_IDS and (checksum field) its life in ms."""
    aux = 0 if stored else 1
    if not credit:
        s.send(encode_response(op, rid, aux=aux))
        return
    res, cid = credit
    life_ms = max(int((res.deadline - s.store.clock()) * 1000), 0)
    s.send(encode_response(op, rid, 0, SHM_IDS.size, life_ms, aux) + SHM_IDS.pack(res.offset, res.size, cid))


def _grant(s: DataSession, size: int) -> tuple:
    """A credit for the connection's next put of ``size`` bytes, (reservation, id), or ()
    when a bound says no or there is no free slot right now (a credit is never waited for)."""
    st: ShmState = s.ext
    shm = st.shm
    if len(st.credits) >= MAX_CREDITS or st.credit_bytes + size > shm.credit_bytes or \
            shm.credit_held + size > shm.credit_total:
        return ()
    if s.budget.admit_reservation(s.reserved, size) or s.plane.clients.admit(s.client, size):
        return ()
    # free space only: a slot ahead of a put that may never come must not evict (or
    # push the arena over its high watermark, which evicts at the next put)
    store = s.store
    arena = store.arena
    sc = arena.class_for(size)
    if (not sc.partial and not arena.free_slabs) or \
            arena.used_bytes + sc.footprint > store.limits.high_watermark * arena.size:
        return ()
    try:
        # not bound to any key yet (no object has an empty key): SHM_PUT binds it
        res = store.reserve(b"", b"", size, None)
    except errors.KVStoreError:
        return ()
    s._hold(res)
    # expires like a put's reservation: put_stall_timeout + size / min_put_rate
    res.deadline = s.put_cap
    res.on_expire = lambda r: _credit_expired(s, r)
    cid = st.new_id()
    st.keep_credit(cid, res)
    s.counters["shm_credits_granted"] += 1
    return res, cid


def _credit_expired(s: DataSession, res: "Reservation") -> None:
    # unused past its deadline: the store's reaper frees the slot right after this. The
    # connection stays open (an idle client did nothing wrong); a late SHM_PUT naming the
    # credit is answered "unknown credit" and the client puts through reserve/commit.
    st: ShmState = s.ext
    for k, r in list(st.credits.items()):
        if r is res:
            st.take_credit(k)
            s._unhold(res)
            s.counters["shm_credits_expired"] += 1


def _shm_put(s: DataSession, h: Header, ns: bytes, key: bytes) -> None:
    st: ShmState = s.ext
    cid, rid = h.length, h.req_id
    res = st.take_credit(cid)
    if res is None:
        if not 0 < cid <= st.last_id:
            s.counters["shm_forged_ids"] += 1
        s.error(OP_SHM_PUT, rid, errors.InvalidArgument(f"unknown credit {cid} (expired or never given)"))
        return
    try:
        _check_names(ns, key)
    except errors.KVStoreError as e:
        st.keep_credit(cid, res)  # nothing was bound: the client may still use it
        s.error(OP_SHM_PUT, rid, e)
        return
    csum = h.checksum
    if s.store.dedup(ns, key, res.size, csum):  # stored already: the slot stays a credit
        st.keep_credit(cid, res)
        _answer(s, OP_SHM_PUT, rid, False, (res, cid))
        return
    # bind the slot to the key; commit then checks it exactly as after a reservation:
    # checksum of the slot against the client's, then conflict / dedup / overwrite
    res.ns, res.key, res.checksum = ns, key, csum
    res.overwrite = bool(h.flags & FLAG_OVERWRITE)
    res.on_expire = None
    size = res.size
    try:
        stored = s.commit(res)
    except errors.KVStoreError as e:  # the slot is freed: the credit is gone
        s.error(OP_SHM_PUT, rid, e)
        return
    _answer(s, OP_SHM_PUT, rid, stored, _grant(s, size) if h.flags & FLAG_REFILL else ())


SHM_OPS = CORE_OPS.extended()
SHM_OPS.register(OP_SHM_GET, _shm_get, scope=READ, epoch=True, length=SIZE)
SHM_OPS.register(OP_SHM_RELEASE, _shm_release, scope=None, length=SIZE)  # ids are per connection
SHM_OPS.register(OP_SHM_RESERVE, _shm_reserve, scope=WRITE, epoch=True, length=SIZE)
SHM_OPS.register(OP_SHM_COMMIT, _shm_commit, scope=None, length=SIZE)
SHM_OPS.register(OP_SHM_PUT, _shm_put, scope=WRITE, epoch=True, length=SIZE)  # length: credit id


def _in_use(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(0.5)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()
