"""RDMA data path: the third driver of the data session, next to TCP and shm.

Set-up rides on an ordinary TCP data connection (auth and the epoch gate apply
as to every frame): the client sends ``RDMA_CONNECT`` with its endpoint (QP
number, PSN, GID/LID, MTU, largest message), the daemon validates it, creates
an RC queue pair for this connection, brings it to RTS and answers with its own
endpoint. Then:

* ``RDMA_PUT`` names the client's registered buffer (address, length, rkey) and
  the object's checksum; the daemon reserves a slot (waiting for space like a
  TCP put), RDMA-READs the buffer into the slot, and commits, which verifies the
  checksum: nothing is visible before, and a failed or interrupted read leaves
  nothing behind;
* ``RDMA_GET`` names the client's destination buffer; the daemon holds a read
  reference on the object, RDMA-WRITEs it from the arena, and answers with the
  size and checksum once the write completed (RC: the bytes are placed then).

The daemon registers its whole arena once at start, in several memory regions
when it exceeds the device's max_mr_size (split at slab boundaries, so no slot
straddles two). Its rkeys never leave the daemon: clients cannot touch the
arena, only the daemon moves bytes. Work requests queued while frames are
parsed are posted together (one doorbell per event-loop turn); completions come
through the completion channel's fd on the event loop. Per connection at most
``max_send_wr`` work requests are outstanding (the rest wait in a backlog) and
reading stops at ``MAX_OPS`` unanswered RDMA requests.

A failed work request (remote access error: the client named memory it had not
registered for that access; retry exceeded: the client is gone) puts the QP in
the error state: that request is answered with the reason, the rest with
Unavailable, and the connection closes once their completions (flushed) are in
— never earlier, since the NIC may still be writing into a slot until then.

(Just over 500 lines, on purpose: the server, the per-connection work-request
bookkeeping and the three op handlers share one lifecycle; the verbs themselves
live in kvstore.rdma.)

About 530 lines on purpose: a connection's queue pair, its posting of work requests and
its completions are one state machine with the ops that drive it (splitting them would
pass RdmaConn's internals between modules), and a sixth of the file is this description.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from typing import TYPE_CHECKING

from kvstore import errors
from kvstore.rdma import verbs
from kvstore.rdma.verbs import (LOCAL_WRITE, QPS_ERR, WC_REM_ACCESS_ERR, WC_SUCCESS,
                                WC_WR_FLUSH_ERR, WR, WR_RDMA_READ, WR_RDMA_WRITE, Endpoint)
from kvstore.wire import (FLAG_NOT_VERIFIED_OK, FLAG_OVERWRITE, OP_RDMA_CONNECT, OP_RDMA_GET, OP_RDMA_PUT, RDMA_DESC,
                          RDMA_SIZE, encode_response)

from kvstored.auth import READ, WRITE

from .ops import CORE_OPS
from .policy import LOGIN
from .session import BODY, OpTable

if TYPE_CHECKING:
    from kvstore.wire import Header

    from kvstored.engine import Entry, Reservation, Store

    from .session import DataSession

log = logging.getLogger("kvstored.rdma")

MAX_SEND_WR = 256  # outstanding work requests per connection (the QP's send queue)
MAX_OPS = 1024  # unanswered RDMA requests per connection before reading stops
CQ_DEPTH = 16384
_POLL_BATCH = 256


class RdmaServer:
    """The device, the arena's registrations, the completion queue; one ``RdmaConn`` per
    connection that sent RDMA_CONNECT."""

    def __init__(self, store: "Store", device, counters: collections.Counter, *,
                 tls: bool = False, max_send_wr: int = MAX_SEND_WR):
        self.store = store
        self.dev = device
        self.counters = counters
        self.tls = tls
        self.max_send_wr = min(max_send_wr, device.max_qp_wr)
        self.mrs: list[tuple[int, int, verbs.MR]] = []  # (arena offset, length, region)
        self.base = 0  # the arena's address
        self.cq = None
        self.conns: set[RdmaConn] = set()
        self.wr_ids = itertools.count(1)
        self.wrs: dict[int, tuple] = {}  # wr_id -> (conn, op record)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ops = rdma_ops(self)

    @property
    def description(self) -> str:
        return f"{self.dev.kind} {self.dev.name}, {len(self.mrs)} MR(s)"

    def start(self) -> None:
        arena = self.store.arena
        view = arena.view
        self.base = verbs.buffer_address(view)[0]
        step = arena.size
        if step > self.dev.max_mr_size:  # split at slab boundaries: no slot spans two regions
            step = max(self.dev.max_mr_size // arena.slab_size, 1) * arena.slab_size
        for off in range(0, arena.size, step):
            n = min(step, arena.size - off)
            self.mrs.append((off, n, self.dev.reg_mr(view[off:off + n], LOCAL_WRITE)))
        self.cq = self.dev.create_cq(CQ_DEPTH)
        self.cq.arm()
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.cq.fd, self._on_completions)
        self.counters["rdma_registered_bytes"] = arena.size

    def close(self) -> None:
        for c in list(self.conns):
            c.destroy()
        if self.loop is not None and self.cq is not None:
            self.loop.remove_reader(self.cq.fd)
        for _, _, mr in self.mrs:
            try:
                self.dev.dereg_mr(mr)
            except verbs.VerbsError:
                pass
        self.mrs.clear()
        if self.cq is not None:
            self.cq.close()
        self.dev.close()

    def local(self, offset: int, size: int) -> tuple[int, int]:
        """(address, lkey) of arena bytes [offset, offset+size)."""
        for off, n, mr in self.mrs:
            if off <= offset and offset + size <= off + n:
                return self.base + offset, mr.lkey
        raise errors.InternalError(f"arena range {offset}+{size} is in no registration")

    # ------------------------------------------------------------ completions
    def _on_completions(self) -> None:
        cq = self.cq
        cq.consume_event()
        cq.arm()  # arm before polling: a completion after the last poll raises the fd again
        touched = set()
        for _ in range(1 << 16):  # bounded; a busy CQ yields to the loop and fires again
            wcs = cq.poll(_POLL_BATCH)
            if not wcs:
                break
            for wc in wcs:
                rec = self.wrs.pop(wc.wr_id, None)
                if rec is None:
                    continue
                conn, op = rec
                conn.completed(op, wc)
                touched.add(conn)
        for conn in touched:
            conn.after_completions()


class _Op:
    """One RDMA request: its work requests (a large object is split by max message size)."""

    __slots__ = ("kind", "rid", "res", "entry", "left", "status", "size", "csum", "expired")

    def __init__(self, kind, rid, res=None, entry=None, size=0, csum=0):
        self.kind, self.rid, self.res, self.entry = kind, rid, res, entry
        self.left = 0
        self.expired = False  # the store's reaper took the reservation (the session knows)
        self.status = WC_SUCCESS
        self.size, self.csum = size, csum


class RdmaConn:
    """One connection's queue pair and RDMA requests (the session's ``ext``)."""

    def __init__(self, server: RdmaServer, session: "DataSession", remote: Endpoint):
        self.server = server
        self.session = session
        self.remote = remote
        self.qp = server.dev.create_qp(server.cq, server.max_send_wr)
        self.ops: dict[int, _Op] = {}  # request id -> op in flight
        self.backlog: collections.deque = collections.deque()  # WRs not posted yet
        self.outstanding = 0
        self.flush_scheduled = False
        self.broken: str | None = None  # why the QP is unusable
        self.gone = False  # the TCP connection is lost
        self.max_msg = min(remote.max_msg, server.dev.max_msg)
        # puts waiting for this connection's reservation bound: a batch of RDMA puts holds
        # every slot while its reads are in flight, so the next waits for one to finish
        self.deferred: collections.deque = collections.deque()
        self.puts = 0  # RDMA puts holding a reservation

    # session ext hooks
    def made(self, session) -> None:
        pass

    def lost(self, session) -> None:
        """The TCP connection is gone: stop the QP; give slots and references back only when
        every work request has completed (flushed), since until then the NIC may use them."""
        self.gone = True
        self._break("the data connection closed")
        self._maybe_destroy()

    # ---- requests
    def start(self, op: _Op, wrs: list[WR]) -> None:
        op.left = len(wrs)
        self.ops[op.rid] = op
        for w in wrs:
            self.server.wrs[w.wr_id] = (self, op)
        self.backlog.extend(wrs)
        if not self.flush_scheduled:  # post everything parsed this turn with one doorbell
            self.flush_scheduled = True
            self.server.loop.call_soon(self.flush)
        if len(self.ops) >= MAX_OPS:
            self.session.reading = False
            self.server.counters["rdma_ops_limit_pauses"] += 1

    def flush(self) -> None:
        self.flush_scheduled = False
        if not self.backlog:
            return
        room = self.server.max_send_wr - self.outstanding
        if self.broken is not None or room <= 0:
            if self.broken is not None:
                self._fail_backlog()
            return
        batch = [self.backlog.popleft() for _ in range(min(room, len(self.backlog)))]
        try:
            self.qp.post_send(batch)
        except verbs.VerbsError as e:
            self.backlog.extendleft(reversed(batch))
            self._break(f"post_send failed: {e}")
            self._fail_backlog()
            return
        self.outstanding += len(batch)
        self.server.counters["rdma_doorbells"] += 1
        self.server.counters["rdma_work_requests"] += len(batch)

    def _fail_backlog(self) -> None:
        """Work requests never posted complete here as flushed, like the posted ones."""
        while self.backlog:
            w = self.backlog.popleft()
            rec = self.server.wrs.pop(w.wr_id, None)
            if rec is not None:
                self.outstanding += 1  # completed() counts it down
                self.completed(rec[1], verbs.WC(w.wr_id, WC_WR_FLUSH_ERR, w.opcode))

    def completed(self, op: _Op, wc: verbs.WC) -> None:
        self.outstanding -= 1
        if wc.status != WC_SUCCESS and op.status == WC_SUCCESS:
            op.status = wc.status
        op.left -= 1
        if op.left == 0:
            self.ops.pop(op.rid, None)
            self._finish(op)
        if wc.status not in (WC_SUCCESS, WC_WR_FLUSH_ERR):
            self.server.counters["rdma_wc_errors"] += 1
            self._break(verbs.WC_STATUS_NAMES.get(wc.status, f"status {wc.status}"))

    def after_completions(self) -> None:
        if self.backlog:
            self.flush()
        s = self.session
        for _ in range(len(self.deferred)):
            if self.broken is not None or s.closed or not _admitted(s, self, self.deferred[0][4]):
                break
            _reserve_put(self, s, *self.deferred.popleft())
        if (not s.reading and not s.closed and len(self.ops) < MAX_OPS // 2
                and self.broken is None and not self.deferred):
            s._unblock()
        if self.broken is not None and not self.ops and not self.gone:
            s.close()  # answers are queued; the connection ends after they are sent
        self._maybe_destroy()
        s.wake()

    def _finish(self, op: _Op) -> None:
        s, srv = self.session, self.server
        ok = op.status == WC_SUCCESS
        if op.kind == OP_RDMA_PUT:
            self.puts -= 1
            res = op.res
            if op.expired:
                return  # the session aborted the connection and accounted for the slot
            if not ok or self.gone:
                s._drop_reservation(res)  # nothing partial becomes visible
                if not self.gone:
                    s.error(OP_RDMA_PUT, op.rid, self._error(op.status))
                srv.counters["rdma_put_failures"] += 1
                return
            try:
                stored = s.commit(res)  # verifies the checksum the client declared
            except errors.KVStoreError as e:
                s.error(OP_RDMA_PUT, op.rid, e)
                return
            srv.counters["rdma_puts"] += 1
            srv.counters["rdma_put_bytes"] += op.size
            s.send(encode_response(OP_RDMA_PUT, op.rid, aux=0 if stored else 1))
        else:
            srv.store.release(op.entry)
            if not ok or self.gone:
                if not self.gone:
                    s.error(OP_RDMA_GET, op.rid, self._error(op.status))
                srv.counters["rdma_get_failures"] += 1
                return
            srv.counters["rdma_gets"] += 1
            srv.counters["rdma_get_bytes"] += op.size
            s.send(encode_response(OP_RDMA_GET, op.rid, 0, RDMA_SIZE.size, op.csum)
                   + RDMA_SIZE.pack(op.size))

    def _error(self, status: int) -> errors.KVStoreError:
        why = verbs.WC_STATUS_NAMES.get(status, f"status {status}")
        if status == WC_REM_ACCESS_ERR:
            return errors.InvalidArgument(
                f"RDMA {why}: the buffer is not registered for this access (rkey, address or "
                "length outside the registration); the connection closes")
        return errors.Unavailable(f"RDMA transfer failed: {why}; the connection closes"
                                  if status != WC_WR_FLUSH_ERR else
                                  f"RDMA queue pair in error state ({self.broken}); reconnect")

    def _break(self, why: str) -> None:
        if self.broken is None:
            self.broken = why
            if self.qp.state != QPS_ERR:
                self.qp.to_error()
            self._fail_backlog()

    def _maybe_destroy(self) -> None:
        if self.gone and not self.ops and self.outstanding <= 0:
            self.destroy()

    def destroy(self) -> None:
        if self in self.server.conns:
            self.server.conns.discard(self)
            self.qp.close()

    def wrs_for(self, opcode: int, local_off: int, size: int, raddr: int, rkey: int) -> list[WR]:
        """Work requests moving ``size`` bytes between the arena and the peer, each at most
        the largest message both sides accept."""
        srv = self.server
        out = []
        for off in range(0, size, self.max_msg):
            n = min(self.max_msg, size - off)
            addr, lkey = srv.local(local_off + off, n)
            out.append(WR(next(srv.wr_ids), opcode, addr, n, lkey, raddr + off, rkey))
        return out


# ================================================================ op handlers

def rdma_ops(server: RdmaServer) -> OpTable:
    """The TCP op table plus the RDMA ops, bound to ``server``."""
    ops = CORE_OPS.extended()
    ops.register(OP_RDMA_CONNECT, lambda s, h, ns, key: _connect(server, s, h),
                 scope=LOGIN, length=BODY)
    ops.register(OP_RDMA_PUT, lambda s, h, ns, key: _with_desc(server, s, h, ns, key, _put),
                 scope=WRITE, epoch=True, length=BODY)
    ops.register(OP_RDMA_GET, lambda s, h, ns, key: _with_desc(server, s, h, ns, key, _get),
                 scope=READ, epoch=True, length=BODY)
    return ops


def _connect(server: RdmaServer, s: "DataSession", h: "Header") -> None:
    rid, n = h.req_id, h.length
    if n != verbs.ENDPOINT.size or h.ns_len or h.key_len:
        server.counters["rdma_bad_setup"] += 1
        return s.reject(OP_RDMA_CONNECT, rid, n, errors.InvalidArgument(
            f"RDMA_CONNECT carries a {verbs.ENDPOINT.size}-byte endpoint and no namespace or key"))
    buf = bytearray(n)
    s.receive_payload(memoryview(buf), n, lambda: _connected(server, s, rid, bytes(buf)))


def _connected(server: RdmaServer, s: "DataSession", rid: int, body: bytes) -> None:
    if server.tls:
        return s.error(OP_RDMA_CONNECT, rid, errors.PermissionDenied(
            "this daemon encrypts its data path (TLS); RDMA would carry the bytes in clear"))
    if isinstance(s.ext, RdmaConn):
        return s.error(OP_RDMA_CONNECT, rid, errors.InvalidArgument(
            "this connection has an RDMA queue pair already"))
    if s.ext is not None:
        return s.error(OP_RDMA_CONNECT, rid, errors.InvalidArgument(
            "RDMA is set up on TCP data connections only"))
    try:
        remote = Endpoint.unpack(body)
    except ValueError as e:
        server.counters["rdma_bad_setup"] += 1
        return s.error(OP_RDMA_CONNECT, rid, errors.InvalidArgument(f"bad RDMA endpoint: {e}"))
    try:
        conn = RdmaConn(server, s, remote)
        conn.qp.connect(remote)
    except verbs.VerbsError as e:
        server.counters["rdma_setup_failures"] += 1
        try:
            conn.qp.close()
        except Exception:
            pass
        return s.error(OP_RDMA_CONNECT, rid, errors.Unavailable(f"cannot connect the RDMA queue "
                                                                f"pair: {e}"))
    s.ext = conn
    server.conns.add(conn)
    server.counters["rdma_connections_total"] += 1
    mine = server.dev.endpoint(conn.qp).pack()
    s.send(encode_response(OP_RDMA_CONNECT, rid, 0, len(mine), 0) + mine)


def _with_desc(server, s: "DataSession", h: "Header", ns: bytes, key: bytes, then) -> None:
    """Receive the request's buffer descriptor, validate it, then run ``then``."""
    rid, n, op = h.req_id, h.length, h.op
    if n != RDMA_DESC.size:
        return s.reject(op, rid, n, errors.InvalidArgument(
            f"an RDMA request carries a {RDMA_DESC.size}-byte buffer descriptor, got {n} bytes"))
    buf = bytearray(n)

    def got() -> None:
        conn = s.ext
        if not isinstance(conn, RdmaConn):
            return s.error(op, rid, errors.InvalidArgument("no RDMA queue pair on this "
                                                           "connection: send RDMA_CONNECT first"))
        if conn.broken is not None:
            return s.error(op, rid, errors.Unavailable(
                f"RDMA queue pair in error state ({conn.broken}); reconnect"))
        if rid in conn.ops:
            server.counters["rdma_replayed_ids"] += 1
            return s.error(op, rid, errors.InvalidArgument(f"request id {rid} is in flight already"))
        addr, length, rkey = RDMA_DESC.unpack(buf)
        if length == 0 or rkey == 0 or addr == 0 or addr + length > 1 << 64:
            return s.error(op, rid, errors.InvalidArgument(
                f"bad RDMA buffer descriptor (address {addr:#x}, length {length}, rkey {rkey:#x})"))
        then(conn, s, h, ns, key, addr, length, rkey)

    s.receive_payload(memoryview(buf), n, got)


def _admitted(s: "DataSession", conn: RdmaConn, length: int) -> bool:
    """Whether a put may reserve now: within the connection's bound, or nothing of ours is in
    flight (then the session's own answer, NoSpace, is the right one)."""
    return conn.puts == 0 or s.budget.admit_reservation(s.reserved, length) is None


def _put(conn: RdmaConn, s: "DataSession", h: "Header", ns: bytes, key: bytes, addr: int,
         length: int, rkey: int) -> None:
    if conn.deferred or not _admitted(s, conn, length):
        conn.deferred.append((h, ns, key, addr, length, rkey))
        conn.server.counters["rdma_deferred_puts"] += 1
        s.reading = False  # bounded: only frames already received are parsed meanwhile
        return
    _reserve_put(conn, s, h, ns, key, addr, length, rkey)


def _reserve_put(conn: RdmaConn, s: "DataSession", h: "Header", ns: bytes, key: bytes,
                 addr: int, length: int, rkey: int) -> None:
    s.put_t0 = s.t_in

    def reserved(s, rid, res: "Reservation | None", size: int) -> None:
        if res is None:
            return s.send(encode_response(OP_RDMA_PUT, rid, aux=1))  # stored already
        if conn.broken is not None or s.closed:
            s._drop_reservation(res)
            return s.error(OP_RDMA_PUT, rid, errors.Unavailable("RDMA queue pair in error state"))
        op = _Op(OP_RDMA_PUT, rid, res=res, size=size)

        def expired(r: "Reservation") -> None:  # stop the QP before the slot is reused
            op.expired = True
            conn._break("an RDMA read stalled past the reservation timeout")
            s.reservation_expired(r)

        res.on_expire = expired
        conn.puts += 1
        conn.start(op, conn.wrs_for(WR_RDMA_READ, res.offset, size, addr, rkey))

    s.reserve(OP_RDMA_PUT, h.req_id, ns, key, length, h.checksum,
              bool(h.flags & FLAG_OVERWRITE), reserved)


def _get(conn: RdmaConn, s: "DataSession", h: "Header", ns: bytes, key: bytes, addr: int,
         length: int, rkey: int) -> None:
    def deliver(s, rid: int, e: "Entry", t0: float = 0.0) -> None:
        if e.size > length:
            s.store.release(e)
            return s.error(OP_RDMA_GET, rid, errors.InvalidArgument(
                f"object of {e.size} bytes does not fit the {length}-byte buffer"))
        if conn.broken is not None or s.closed:
            s.store.release(e)
            return s.error(OP_RDMA_GET, rid, errors.Unavailable("RDMA queue pair in error state"))
        if e.size == 0:
            s.store.release(e)
            return s.send(encode_response(OP_RDMA_GET, rid, 0, RDMA_SIZE.size, e.checksum)
                          + RDMA_SIZE.pack(0))
        op = _Op(OP_RDMA_GET, rid, entry=e, size=e.size, csum=e.checksum)
        conn.start(op, conn.wrs_for(WR_RDMA_WRITE, e.offset, e.size, addr, rkey))

    if h.flags & FLAG_NOT_VERIFIED_OK:
        s.not_verified_ok = True
    s.acquire(h.req_id, ns, key, OP_RDMA_GET, deliver)


def start_server(store: "Store", counters, kind: str, device: str = "", *,
                 tls: bool = False) -> RdmaServer:
    """Open the device and register the arena; raises verbs.Unsupported with the reason."""
    from kvstore.rdma import open_device
    dev = open_device(kind, device or None)
    srv = RdmaServer(store, dev, counters, tls=tls)
    try:
        srv.start()
    except BaseException:
        srv.close()
        raise
    return srv


def enable(data_server, *, tls: bool = False) -> tuple[RdmaServer | None, str]:
    """Serve RDMA on ``data_server``'s connections when a device is usable; returns the
    server (or None) and a status line for the log, ``status`` and the metrics.

    ``KVSTORE_RDMA_VERBS``: unset = pyverbs when a device with an active port exists
    (else off, said once at INFO); ``pyverbs`` = required (a start-up error without it);
    ``twin`` = the test twin; ``off``. ``KVSTORE_RDMA_DEVICE`` names the device.
    """
    import os

    want = os.environ.get("KVSTORE_RDMA_VERBS", "")
    if want == "off":
        return None, "off"
    try:
        srv = start_server(data_server.store, data_server.counters, want or "pyverbs",
                           os.environ.get("KVSTORE_RDMA_DEVICE", ""), tls=tls)
    except verbs.Unsupported as e:
        if want:
            raise OSError(f"KVSTORE_RDMA_VERBS={want} but RDMA is not usable: {e}") from None
        log.info("RDMA off: %s", e)
        data_server.counters["rdma_unavailable"] = 1
        return None, f"off ({e})"
    data_server.plane.ops = srv.ops
    log.info("RDMA on: %s", srv.description)
    return srv, srv.description
