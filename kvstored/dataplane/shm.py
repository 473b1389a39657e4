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

from .tcp import DataConnection, _check_names

if TYPE_CHECKING:
    from kvstored.engine import Entry, Reservation

    from .tcp import DataServer

log = logging.getLogger("kvstored.shm")

READ, WRITE = 1, 2  # the scopes tcp.DataConnection._allowed checks
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
        self.connections: set[ShmConnection] = set()

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
            lambda: ShmConnection(self.ds, self, f"shm:pid={pid},uid={uid}"), sock=conn)

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


class ShmConnection(DataConnection):
    def __init__(self, server: "DataServer", shm: ShmServer, peer: str = "shm"):
        super().__init__(server)
        self.shm = shm
        self.shm_peer = peer
        self.leases: dict[int, tuple["Entry", float]] = {}
        self.shm_reservations: dict[int, "Reservation"] = {}
        self.ids = itertools.count(1)

    def connection_made(self, transport):
        super().connection_made(transport)
        self.peer = self.shm_peer  # log lines name the process, not an empty socket address
        if not self.closed:
            self.shm.connections.add(self)

    def connection_lost(self, exc):
        # a client that dies holding leases or reservations gives them back at once
        self.shm.connections.discard(self)
        for e, _ in self.leases.values():
            self.store.release(e)
        self.leases.clear()
        for res in self.shm_reservations.values():
            self.store.abort(res)
        self.shm_reservations.clear()
        super().connection_lost(exc)

    def busy(self) -> bool:
        return super().busy() or bool(self.shm_reservations)

    def expire(self, now: float) -> int:
        dead = [lid for lid, (_, until) in self.leases.items() if until <= now]
        for lid in dead:
            self.store.release(self.leases.pop(lid)[0])
        return len(dead)

    def _other_op(self, op, flags, rid, ns, key, plen, csum) -> bool:
        # SHM_RESERVE's length is the object size, not a payload on the socket: no op
        # here ever skips payload bytes, so errors pass plen=0
        if op == OP_SHM_GET:
            if self.auth is not None and not self._allowed(ns, READ, op, rid, 0):
                return True
            self._get(rid, ns, key, OP_SHM_GET, self._lease)  # NVMe promotion included
        elif op == OP_SHM_RELEASE:
            # no answer on success (saves a round trip per get); a lease this connection
            # never held is a forged id: answered with ProtocolError and the connection closed
            held = self.leases.pop(csum, None)
            if held is None:
                self.server.counters["shm_forged_ids"] += 1
                self._fatal(rid, f"unknown lease {csum}")
            else:
                self.store.release(held[0])
        elif op == OP_SHM_RESERVE:
            if self.auth is not None and not self._allowed(ns, WRITE, op, rid, 0):
                return True
            self._shm_reserve(rid, ns, key, plen, csum, flags)
        elif op == OP_SHM_COMMIT:
            res = self.shm_reservations.pop(csum, None)
            if res is None:
                self.server.counters["shm_forged_ids"] += 1
                self._error(op, rid, errors.InvalidArgument(f"unknown reservation {csum}"))
                return True
            try:
                stored = self.store.commit(res)
            except errors.KVStoreError as e:
                self._error(op, rid, e)
                return True
            self._send(encode_response(op, rid, aux=0 if stored else 1))
        else:
            return False
        return True

    def _lease(self, rid: int, e: "Entry", t0: float = 0.0) -> None:
        lid = next(self.ids)
        self.leases[lid] = (e, time.monotonic() + self.shm.lease_ttl)
        self._send(encode_response(OP_SHM_GET, rid, 0, SHM_IDS.size, e.checksum)
                   + SHM_IDS.pack(e.offset, e.size, lid))

    def _shm_reserve(self, rid, ns, key, size, csum, flags) -> None:
        try:
            _check_names(ns, key)
            cs = None if flags & FLAG_CHECKSUM_UNKNOWN else csum
            res = self.store.reserve(ns, key, size, cs, bool(flags & FLAG_OVERWRITE))
        except errors.NoSpace:
            # like a TCP put: wait (bounded) for eviction/demotion, reading nothing else meanwhile
            self._pause_reading()
            self.waiting = asyncio.get_running_loop().create_task(
                self._shm_reserve_later(rid, ns, key, size, cs, bool(flags & FLAG_OVERWRITE)))
            return
        except errors.KVStoreError as err:
            return self._error(OP_SHM_RESERVE, rid, err)
        self._reserved(rid, res)

    async def _shm_reserve_later(self, rid, ns, key, size, cs, overwrite) -> None:
        await self._wait_for_space(ns, key, size, cs, overwrite,
                                   lambda res: self._reserved(rid, res),
                                   lambda e: self._error(OP_SHM_RESERVE, rid, e))

    def _reserved(self, rid: int, res: "Reservation | None") -> None:
        if res is None:  # the same object is stored already
            self._send(encode_response(OP_SHM_RESERVE, rid, 0, 0, 0, aux=1))
            return
        rid_res = next(self.ids)
        self.shm_reservations[rid_res] = res
        res.on_expire = self._shm_reservation_expired
        self._send(encode_response(OP_SHM_RESERVE, rid, 0, SHM_IDS.size, 0)
                   + SHM_IDS.pack(res.offset, res.size, rid_res))

    def _shm_reservation_expired(self, res: "Reservation") -> None:
        for k, r in list(self.shm_reservations.items()):
            if r is res:
                del self.shm_reservations[k]
        self._reservation_expired(res)


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
