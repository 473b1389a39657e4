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
  and commit checksums the slot and publishes it; nothing is visible before.

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
import itertools
import logging
import os
import socket
import struct
import time
from typing import TYPE_CHECKING

from kvstore import errors
from kvstore.wire import (FLAG_CHECKSUM_UNKNOWN, FLAG_OVERWRITE, OP_SHM_COMMIT, OP_SHM_GET, OP_SHM_RELEASE,
                          OP_SHM_RESERVE, SHM_HELLO, SHM_IDS, SHM_MAGIC, encode_error,
                          encode_response)

from kvstored.auth import READ, WRITE

from .ops import CORE_OPS
from .session import SIZE, DataSession
from .tcp import DataConnection

if TYPE_CHECKING:
    from kvstore.wire import Header

    from kvstored.engine import Entry, Reservation

    from .tcp import DataServer

log = logging.getLogger("kvstored.shm")

SHM_VERSION = 1
_UCRED = struct.Struct("3i")


class ShmServer:
    def __init__(self, data_server: "DataServer", path: str, *, allowed_uids: set[int],
                 lease_ttl: float):
        self.ds = data_server
        self.path = path
        self.allowed_uids = allowed_uids | {os.getuid(), 0}
        self.lease_ttl = lease_ttl
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
        await loop.create_unix_connection(
            lambda: DataConnection(self.ds, ops=SHM_OPS, ext=ShmState(self),
                                   peer=f"shm:pid={pid},uid={uid}", client=f"uid:{uid}"),
            sock=conn)

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
    """One shm connection's leases and reservations (the session's ``ext``): they live
    and die with the connection."""

    def __init__(self, shm: ShmServer):
        self.shm = shm
        self.leases: dict[int, tuple["Entry", float]] = {}
        self.reservations: dict[int, "Reservation"] = {}
        self.ids = itertools.count(1)
        self.store = shm.ds.store

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

    def expire(self, now: float) -> int:
        dead = [lid for lid, (_, until) in self.leases.items() if until <= now]
        for lid in dead:
            self.store.release(self.leases.pop(lid)[0])
        return len(dead)


# SHM_RESERVE's length is the object size, not a payload on the socket: no op here ever
# skips payload bytes (length=SIZE), so their errors skip nothing.

def _shm_get(s: DataSession, h: Header, ns: bytes, key: bytes) -> None:
    s.acquire(h.req_id, ns, key, OP_SHM_GET, _lease)  # NVMe promotion included


def _lease(s: DataSession, rid: int, e: "Entry", t0: float = 0.0) -> None:
    st: ShmState = s.ext
    lid = next(st.ids)
    st.leases[lid] = (e, time.monotonic() + st.shm.lease_ttl)
    s.send(encode_response(OP_SHM_GET, rid, 0, SHM_IDS.size, e.checksum)
           + SHM_IDS.pack(e.offset, e.size, lid))


def _shm_release(s: DataSession, h: Header, ns: bytes, key: bytes) -> None:
    # no answer on success (saves a round trip per get); a lease this connection never
    # held is a forged id: answered with ProtocolError and the connection closed
    held = s.ext.leases.pop(h.checksum, None)
    if held is None:
        s.counters["shm_forged_ids"] += 1
        s.fatal(h.req_id, f"unknown lease {h.checksum}")
    else:
        s.store.release(held[0])


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
    rid_res = next(st.ids)
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
    try:
        stored = s.commit(res)
    except errors.KVStoreError as e:
        s.error(OP_SHM_COMMIT, h.req_id, e)
        return
    s.send(encode_response(OP_SHM_COMMIT, h.req_id, aux=0 if stored else 1))


SHM_OPS = CORE_OPS.extended()
SHM_OPS.register(OP_SHM_GET, _shm_get, scope=READ, epoch=True, length=SIZE)
SHM_OPS.register(OP_SHM_RELEASE, _shm_release, scope=None, length=SIZE)  # ids are per connection
SHM_OPS.register(OP_SHM_RESERVE, _shm_reserve, scope=WRITE, epoch=True, length=SIZE)
SHM_OPS.register(OP_SHM_COMMIT, _shm_commit, scope=None, length=SIZE)


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
