"""A twin of the verbs interface for tests: two processes, no RDMA hardware.

What a NIC does is done by threads, so the side whose memory is read or written
stays passive as with real RDMA:

* each ``TwinDevice`` has a random 16-byte GID and listens on the abstract Unix
  socket named after it (the "port");
* ``QP.connect(peer endpoint)`` dials the peer device and names the peer QP; the
  peer checks that QP exists, is connected back to us (qpn and psn), and is not
  in the error state;
* a requester thread per QP executes posted work requests in order: RDMA WRITE
  sends the local bytes, RDMA READ receives the remote bytes straight into the
  local registration, SEND with immediate lands in the peer's posted receive;
* the peer device's responder thread checks every access as the hardware would:
  the rkey must be one of *its* registrations (a deregistered or foreign key is
  refused), the range must lie inside that registration, and the registration
  must allow the access (REMOTE_READ / REMOTE_WRITE);
* a failed work request completes with its status (remote access error, retry
  exceeded when the peer is gone), the QP moves to the error state and every
  later work request completes with WC_WR_FLUSH_ERR; completions are in posting
  order, one completion queue per ``create_cq`` with an eventfd that becomes
  readable after ``arm()`` when a completion arrives.

Bytes travel over the socket. ``KVSTORE_TWIN_LINK_BPS`` (bytes/s) throttles
payloads, so a test can kill a peer in the middle of one transfer.
"""
from __future__ import annotations

import collections
import os
import random
import socket
import struct
import threading
import time

from .verbs import (LOCAL_WRITE, MR, QPS_ERR, QPS_RESET, QPS_RTS, REMOTE_READ, REMOTE_WRITE, WC,
                    WC_LOC_LEN_ERR, WC_LOC_PROT_ERR, WC_RECV, WC_REM_ACCESS_ERR, WC_REM_INV_REQ_ERR,
                    WC_RETRY_EXC_ERR, WC_RNR_RETRY_EXC_ERR, WC_SUCCESS, WC_WR_FLUSH_ERR,
                    WR_RDMA_READ, WR_RDMA_WRITE, WR_RDMA_WRITE_WITH_IMM, WR_SEND, WR_SEND_WITH_IMM,
                    Endpoint, RecvWR, VerbsError, buffer_address)
from .verbs import WR as _WR

_HELLO = struct.Struct("<4sIII")  # magic, target qpn, source qpn, source psn
_HELLO_MAGIC = b"KVTW"
_REQ = struct.Struct("<BIQQI")  # op, rkey, remote addr, length, imm
_RESP = struct.Struct("<B")  # status
_OK, _NO_QP, _ACCESS, _RNR, _INVALID = 0, 1, 2, 3, 4
_CHUNK = 1 << 20
_CONNECT_TIMEOUT = 5.0
_JOIN_TIMEOUT = 5.0


def _link_bps() -> float:
    try:
        return float(os.environ.get("KVSTORE_TWIN_LINK_BPS", "0"))
    except ValueError:
        return 0.0


def _send_payload(sock: socket.socket, view: memoryview) -> None:
    bps = _link_bps()
    for off in range(0, len(view), _CHUNK):
        part = view[off:off + _CHUNK]
        sock.sendall(part)
        if bps > 0:
            time.sleep(len(part) / bps)


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    for _ in range(len(view) + 1):  # each round receives at least one byte or raises
        if got == len(view):
            return
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionResetError("peer closed")
        got += n


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    _recv_into(sock, memoryview(buf))
    return bytes(buf)


class TwinCQ:
    def __init__(self, depth: int):
        self.depth = depth
        self.wcs: collections.deque = collections.deque()
        self.lock = threading.Lock()
        self.armed = False
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.overflows = 0

    def push(self, wc: WC) -> None:
        with self.lock:
            if len(self.wcs) >= self.depth:
                self.overflows += 1  # a real CQ overrun is fatal; the bookkeeping tests look here
            self.wcs.append(wc)
            signal, self.armed = self.armed, False
        if signal:
            try:
                os.eventfd_write(self.fd, 1)
            except OSError:  # closed meanwhile
                pass

    def poll(self, n: int = 64) -> list[WC]:
        with self.lock:
            return [self.wcs.popleft() for _ in range(min(n, len(self.wcs)))]

    def arm(self) -> None:
        with self.lock:
            self.armed = True

    def consume_event(self) -> None:
        try:
            os.eventfd_read(self.fd)
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


class TwinQP:
    def __init__(self, dev: "TwinDevice", cq: TwinCQ, max_send_wr: int, max_recv_wr: int):
        self.dev = dev
        self.cq = cq
        self.max_send_wr = max_send_wr
        self.max_recv_wr = max_recv_wr
        self.qpn = dev._new_qpn()
        self.psn = random.randrange(1 << 24)
        self.state = QPS_RESET
        self.remote: Endpoint | None = None
        self.sq: collections.deque = collections.deque()
        self.rq: collections.deque = collections.deque()
        self.outstanding = 0  # posted send WRs not yet completed
        self.cond = threading.Condition()
        self.sock: socket.socket | None = None
        self.thread: threading.Thread | None = None

    # ---- state
    def connect(self, remote: Endpoint) -> None:
        if self.state != QPS_RESET:
            raise VerbsError("QP is connected already")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(_CONNECT_TIMEOUT)
        try:
            sock.connect(_port_name(remote.gid))
            sock.sendall(_HELLO.pack(_HELLO_MAGIC, remote.qpn, self.qpn, self.psn))
            (status,) = _RESP.unpack(_recv_exact(sock, _RESP.size))
        except OSError as e:
            sock.close()
            raise VerbsError(f"cannot reach the peer's port (GID {remote.gid.hex()}): {e}") from None
        if status != _OK:
            sock.close()
            raise VerbsError(f"peer refused the connection to QP {remote.qpn}")
        sock.settimeout(None)
        self.sock, self.remote = sock, remote
        self.state = QPS_RTS
        self.thread = threading.Thread(target=self._requester, name=f"twin-qp-{self.qpn}",
                                       daemon=True)
        self.thread.start()

    def to_error(self) -> None:
        with self.cond:
            if self.state == QPS_ERR:
                return
            self.state = QPS_ERR
            self.cond.notify_all()
        if self.thread is None:  # never connected: flush here
            self._flush()

    def close(self) -> None:
        self.to_error()
        sock = self.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # unblocks a requester stuck on a dead peer
            except OSError:
                pass
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(_JOIN_TIMEOUT)
        if sock is not None:
            sock.close()
        self.dev._qps.pop(self.qpn, None)

    # ---- posting
    def post_send(self, wrs: list[_WR]) -> None:
        with self.cond:
            if self.state not in (QPS_RTS, QPS_ERR):
                raise VerbsError("post_send on a QP that is not ready to send")
            if self.outstanding + len(wrs) > self.max_send_wr:
                raise VerbsError(f"send queue full ({self.outstanding} of {self.max_send_wr} "
                                 f"outstanding, {len(wrs)} more posted)")
            self.sq.extend(wrs)
            self.outstanding += len(wrs)
            self.cond.notify_all()
            dead = self.state == QPS_ERR
        if dead:  # posting to a QP in error is allowed: the requests complete flushed
            self._flush()

    def post_recv(self, wrs: list[RecvWR]) -> None:
        with self.cond:
            if len(self.rq) + len(wrs) > self.max_recv_wr:
                raise VerbsError("receive queue full")
            self.rq.extend(wrs)

    # ---- the requester ("NIC") thread
    def _requester(self) -> None:
        while True:
            with self.cond:
                while not self.sq and self.state != QPS_ERR:
                    self.cond.wait(1.0)
                if self.state == QPS_ERR:
                    break
                wr = self.sq.popleft()
            status, nbytes = self._execute(wr)
            self._complete(wr, status, nbytes)
            if status != WC_SUCCESS:
                with self.cond:
                    self.state = QPS_ERR
                break
        self._flush()

    def _complete(self, wr: _WR, status: int, nbytes: int) -> None:
        with self.cond:
            self.outstanding -= 1
        self.cq.push(WC(wr.wr_id, status, wr.opcode, nbytes, 0, self.qpn))

    def _flush(self) -> None:
        for _ in range(self.max_send_wr + 1):
            with self.cond:
                if not self.sq:
                    break
                wr = self.sq.popleft()
            self._complete(wr, WC_WR_FLUSH_ERR, 0)
        with self.cond:
            rq, self.rq = list(self.rq), collections.deque()
        for r in rq:
            self.cq.push(WC(r.wr_id, WC_WR_FLUSH_ERR, WC_RECV, 0, 0, self.qpn))

    def _execute(self, wr: _WR) -> tuple[int, int]:
        op = wr.opcode
        need = LOCAL_WRITE if op == WR_RDMA_READ else 0
        local = self.dev._local(wr.lkey, wr.addr, wr.length, need)
        if local is None:
            return WC_LOC_PROT_ERR, 0
        if wr.length > self.remote.max_msg:
            return WC_LOC_LEN_ERR, 0
        sock = self.sock
        try:
            if op in (WR_RDMA_WRITE, WR_RDMA_WRITE_WITH_IMM, WR_SEND, WR_SEND_WITH_IMM):
                sock.sendall(_REQ.pack(op, wr.rkey, wr.remote_addr, wr.length, wr.imm))
                _send_payload(sock, local)
                (st,) = _RESP.unpack(_recv_exact(sock, _RESP.size))
            elif op == WR_RDMA_READ:
                sock.sendall(_REQ.pack(op, wr.rkey, wr.remote_addr, wr.length, 0))
                (st,) = _RESP.unpack(_recv_exact(sock, _RESP.size))
                if st == _OK:
                    _recv_into(sock, local)  # straight into the local registration
            else:
                return WC_REM_INV_REQ_ERR, 0
        except OSError:
            return WC_RETRY_EXC_ERR, 0  # the peer (or its port) is gone
        if st == _OK:
            return WC_SUCCESS, wr.length
        return {_ACCESS: WC_REM_ACCESS_ERR, _RNR: WC_RNR_RETRY_EXC_ERR, _NO_QP: WC_RETRY_EXC_ERR,
                _INVALID: WC_REM_INV_REQ_ERR}.get(st, WC_REM_INV_REQ_ERR), 0


class TwinDevice:
    """One "HCA" with one protection domain. ``max_mr_size`` is small enough by default
    that the daemon's arena is split into several registrations, as on real devices."""

    kind = "twin"

    def __init__(self, name: str = "twin0", *, max_mr_size: int = 1 << 30, max_qp_wr: int = 1024,
                 max_msg: int = 1 << 30, mtu: int = 4096):
        self.name = name
        self.max_mr_size = max_mr_size
        self.max_qp_wr = max_qp_wr
        self.max_msg = max_msg
        self.mtu = mtu
        self.gid = os.urandom(16)
        self.lock = threading.Lock()
        self._mrs: dict[int, MR] = {}  # lkey and rkey -> registration (both keys point to it)
        self._views: dict[int, memoryview] = {}  # lkey -> the registered bytes
        self._qps: dict[int, TwinQP] = {}
        self._closed = False
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(_port_name(self.gid))
        self.listener.listen(64)
        self.acceptor = threading.Thread(target=self._accept, name=f"twin-{name}", daemon=True)
        self.acceptor.start()

    # ---- interface
    def endpoint(self, qp: TwinQP) -> Endpoint:
        return Endpoint(qp.qpn, qp.psn, self.mtu, self.gid, 0, 1, self.max_msg)

    def reg_mr(self, buf, access: int) -> MR:
        addr, length, readonly = buffer_address(buf)
        if length == 0:
            raise VerbsError("cannot register an empty buffer")
        if length > self.max_mr_size:
            raise VerbsError(f"registration of {length} bytes exceeds max_mr_size {self.max_mr_size}")
        if readonly and access & (LOCAL_WRITE | REMOTE_WRITE):
            raise VerbsError("a read-only buffer cannot be registered for writing")  # EFAULT
        if access & REMOTE_WRITE and not access & LOCAL_WRITE:
            raise VerbsError("REMOTE_WRITE needs LOCAL_WRITE")  # EINVAL, as ibv_reg_mr
        view = memoryview(buf).cast("B")
        with self.lock:
            lkey = self._new_key()
            rkey = self._new_key()
            mr = MR(addr, length, lkey, rkey, access, view)
            self._mrs[lkey] = self._mrs[rkey] = mr
            self._views[lkey] = view
        return mr

    def dereg_mr(self, mr: MR) -> None:
        with self.lock:
            if self._mrs.get(mr.lkey) is not mr:
                raise VerbsError("memory region is not registered")
            del self._mrs[mr.lkey], self._mrs[mr.rkey], self._views[mr.lkey]

    def create_cq(self, depth: int) -> TwinCQ:
        return TwinCQ(depth)

    def create_qp(self, cq: TwinCQ, max_send_wr: int, max_recv_wr: int = 1) -> TwinQP:
        if max_send_wr > self.max_qp_wr:
            raise VerbsError(f"max_send_wr {max_send_wr} exceeds the device's {self.max_qp_wr}")
        qp = TwinQP(self, cq, max_send_wr, max_recv_wr)
        with self.lock:
            self._qps[qp.qpn] = qp
        return qp

    def close(self) -> None:
        self._closed = True
        for qp in list(self._qps.values()):
            qp.close()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()

    # ---- internals
    def _new_key(self) -> int:
        for _ in range(1000):
            k = random.randrange(1, 1 << 32)
            if k not in self._mrs:
                return k
        raise VerbsError("no free memory keys")

    def _new_qpn(self) -> int:
        with self.lock:
            for _ in range(1000):
                q = random.randrange(1, 1 << 24)
                if q not in self._qps:
                    return q
        raise VerbsError("no free QP numbers")

    def _lookup(self, key: int, addr: int, length: int, access: int, *, local: bool):
        with self.lock:
            mr = self._mrs.get(key)
            if mr is None or (mr.lkey if local else mr.rkey) != key:
                return None  # deregistered, foreign, or an lkey used as an rkey
            if access & ~mr.access:
                return None
            if length < 0 or addr < mr.addr or addr + length > mr.addr + mr.length:
                return None
            off = addr - mr.addr
            return self._views[mr.lkey][off:off + length]

    def _local(self, lkey: int, addr: int, length: int, access: int):
        return self._lookup(lkey, addr, length, access, local=True)

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._respond, args=(conn,), daemon=True,
                             name=f"twin-{self.name}-responder").start()

    def _respond(self, conn: socket.socket) -> None:
        """Serve one peer QP's requests against this device's registrations."""
        try:
            magic, target, src_qpn, src_psn = _HELLO.unpack(_recv_exact(conn, _HELLO.size))
            qp = self._qps.get(target)
            # the peer may reach RTS before this QP does (as on a fabric): the link is
            # accepted now, and each request checks that this QP is connected back to it
            ok = magic == _HELLO_MAGIC and qp is not None and qp.state != QPS_ERR
            conn.sendall(_RESP.pack(_OK if ok else _NO_QP))
            if not ok:
                return
            for _ in iter(int, 1):  # until the peer goes away
                op, rkey, raddr, length, imm = _REQ.unpack(_recv_exact(conn, _REQ.size))
                r = qp.remote
                if (qp.state != QPS_RTS or r is None or r.qpn != src_qpn or r.psn != src_psn):
                    return  # not connected to that peer (or in error): its request times out
                if length > self.max_msg:  # the peer's length is never trusted for memory
                    conn.sendall(_RESP.pack(_INVALID))
                    qp.to_error()
                    return
                if op == WR_RDMA_READ:
                    view = self._lookup(rkey, raddr, length, REMOTE_READ, local=False)
                    if view is None:
                        conn.sendall(_RESP.pack(_ACCESS))
                        qp.to_error()  # an access violation breaks the connection on both sides
                        return
                    conn.sendall(_RESP.pack(_OK))
                    _send_payload(conn, view)
                elif op in (WR_RDMA_WRITE, WR_RDMA_WRITE_WITH_IMM):
                    view = self._lookup(rkey, raddr, length, REMOTE_WRITE, local=False)
                    if view is None:
                        _drain(conn, length)
                        conn.sendall(_RESP.pack(_ACCESS))
                        qp.to_error()
                        return
                    _recv_into(conn, view)
                    if op == WR_RDMA_WRITE_WITH_IMM:
                        if not self._deliver(qp, length, imm):
                            conn.sendall(_RESP.pack(_RNR))
                            return
                    conn.sendall(_RESP.pack(_OK))
                elif op in (WR_SEND, WR_SEND_WITH_IMM):
                    status = _OK if self._receive(qp, conn, length, imm) else _RNR
                    conn.sendall(_RESP.pack(status))
                    if status != _OK:
                        return
                else:
                    conn.sendall(_RESP.pack(_INVALID))
                    return
        except OSError:
            return
        finally:
            conn.close()

    def _deliver(self, qp: TwinQP, length: int, imm: int) -> bool:
        """A WRITE_WITH_IMM's completion on the next posted receive; False: none posted."""
        with qp.cond:
            if not qp.rq:
                return False
            r = qp.rq.popleft()
        qp.cq.push(WC(r.wr_id, WC_SUCCESS, WC_RECV, length, imm, qp.qpn))
        return True

    def _receive(self, qp: TwinQP, conn: socket.socket, length: int, imm: int) -> bool:
        """A SEND's ``length`` bytes straight into the next posted receive (as a NIC does:
        nothing sized by the peer is allocated); one too short for them completes with
        LOC_LEN_ERR and the bytes are drained. False: no receive posted (RNR)."""
        with qp.cond:
            r = qp.rq.popleft() if qp.rq else None
        if r is None:
            _drain(conn, length)
            return False
        dst = self._local(r.lkey, r.addr, length, LOCAL_WRITE) if length <= r.length else None
        if dst is None:
            _drain(conn, length)
            qp.cq.push(WC(r.wr_id, WC_LOC_LEN_ERR, WC_RECV, 0, imm, qp.qpn))
            return True
        _recv_into(conn, dst)
        qp.cq.push(WC(r.wr_id, WC_SUCCESS, WC_RECV, length, imm, qp.qpn))
        return True


def _drain(conn: socket.socket, n: int) -> None:
    buf = memoryview(bytearray(min(n, _CHUNK) or 1))
    while n > 0:
        take = min(n, len(buf))
        _recv_into(conn, buf[:take])
        n -= take


def _port_name(gid: bytes) -> str:
    return "\0kvstore-rdma-twin-" + gid.hex()


def open_device(name: str | None = None) -> TwinDevice:
    """``KVSTORE_TWIN_MAX_MR_SIZE`` (bytes) lowers max_mr_size, e.g. to make the daemon split
    its arena into several registrations as on a device with a smaller limit."""
    limit = int(os.environ.get("KVSTORE_TWIN_MAX_MR_SIZE", "0") or 0)
    return TwinDevice(name or "twin0", **({"max_mr_size": limit} if limit > 0 else {}))
