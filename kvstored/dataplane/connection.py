"""One data connection: the glue between a uvloop ``BufferedProtocol`` and its session.

Split from tcp.py (issue 14): tcp.py keeps the listening side (``DataServer``:
accept, connection limits, sweep, drain), this module the per-connection side:

* receive: ``get_buffer`` is the session's receive buffer, which for a put's
  payload is a view of the reserved arena slot (the kernel writes the bytes
  straight into the arena, no copy). While a large payload arrives, the socket's
  ``SO_RCVLOWAT`` is raised (``RCVLOWAT_MAX``, bounded by the put-stall rule) so
  the loop wakes once per ~megabyte rather than once per segment burst;
* send: the session's output goes out with one ``writelines`` per burst; a
  get's payload is an arena view that uvloop keeps until the kernel took the
  bytes, and the session holds a read reference on the object until then
  (``written``), so eviction never reuses space under a send in progress;
* store calls that await (a put waiting for space, a get loading from NVMe)
  run as tasks and report back with ``call_done``.
"""
from __future__ import annotations

import asyncio
import fcntl
import logging
import select
import socket
import termios
from typing import TYPE_CHECKING

from kvstore import errors
from kvstore.wire import OP_PING, encode_error

from .plane import repair_admitted
from .policy import DataLimits
from .session import DataSession, OpTable

if TYPE_CHECKING:
    from .session import Call
    from .tcp import DataServer

_PRUNE_INTERVAL = 0.002  # how often to release references while sends are queued
LINGER = 2.0  # seconds a draining connection swallows input after its last response
# TLS responses are encrypted copies, not arena views: queue at most this much per connection
TLS_MAX_INFLIGHT = 8 << 20

# While a put's payload arrives, epoll reports the socket readable only once this many
# bytes wait (SO_RCVLOWAT; fewer when fewer are left, and always at EOF or an error): a
# 4 MiB put then wakes the loop ~3 times instead of ~6 (each wake-up is an epoll_wait, a
# read and the session's Python). Payloads below RCVLOWAT_PAYLOAD are read as they come:
# for them the two setsockopt calls a put (raise, then back to 1) cost more than the
# wake-ups they save (256 KiB puts at c=8: -7 % daemon CPU without them; benchmarks/
# RESULTS.md, H6); nor is the option raised for fewer than RCVLOWAT_MIN bytes left.
RCVLOWAT_MAX = 1 << 20
RCVLOWAT_MIN = 128 << 10
RCVLOWAT_PAYLOAD = 512 << 10

# A put waiting for space (up to put_wait_timeout) reads nothing, so its client's close
# is not seen by the transport: the socket is polled for a hang-up this often meanwhile,
# and the wait ends (no slot is taken for a client that left, no object evicted for it)
HANGUP_POLL = 0.1
_HANGUP = getattr(select, "POLLRDHUP", 0x2000) | select.POLLHUP | select.POLLERR

log = logging.getLogger("kvstored.tcp")  # the data plane's log lines keep their logger name


def rcvlowat_cap(lim: DataLimits) -> int:
    """The largest SO_RCVLOWAT for payloads under ``lim``: bytes the kernel holds back are
    progress the session does not see, so a writer at ``min_put_rate`` must deliver it
    within a quarter of ``put_stall_timeout`` (else a slow but legal put could be reaped
    as stalled). 0: too small to be worth a system call."""
    cap = min(RCVLOWAT_MAX, int(lim.min_put_rate * lim.put_stall_timeout / 4))
    return cap if cap >= RCVLOWAT_MIN else 0


def option_socket(sock):
    """What to call ``setsockopt`` on for a transport's ``sock``, several times a put.
    uvloop's ``PseudoSocket`` builds a ``socket.socket`` (and calls getsockname) for each
    call: ~3 us against ~0.8 us (2-3 calls per put of 1 MiB). For it, one socket object
    over the same fd, made once; the connection ``detach``es it when it ends, so only the
    transport ever closes the fd. Other transports' sockets (asyncio's TransportSocket)
    pass their calls straight on: used as they are."""
    if type(sock).__name__ != "PseudoSocket":
        return sock
    try:
        return socket.socket(sock.family, sock.type, sock.proto, fileno=sock.fileno())
    except OSError:  # the fd is gone already: the calls go through uvloop's, as before
        return sock


class DataConnection(asyncio.BufferedProtocol):
    """One connection: moves bytes and events between its transport and its session."""

    def __init__(self, server: DataServer, *, ops: OpTable | None = None, ext=None,
                 peer: str = "", client: str = ""):
        """``ops``: the op table (None: the plane's core ops; the shm channel passes its own);
        ``ext``: the transport's per-connection state, given to the session (``made`` and
        ``lost`` hooks); ``peer``: the name for log lines (default: the socket's peer);
        ``client``: whose space its reservations count against (default: the peer IP)."""
        self.server = server
        self.session: DataSession = DataSession(server.plane, ops=ops, wake=self._act)
        self.session.ext = ext
        self.get_buffer = self.session.receive_buffer  # one call less per read (hot path)
        self.fixed_peer = peer
        self.transport: asyncio.Transport | None = None
        self.done = False  # the transport is closed (or was never ours)
        self.reading = True  # what we last told the transport
        self.prune_timer: asyncio.TimerHandle | None = None
        self.tasks: set[asyncio.Task] = set()
        self.peer_ip: str | None = None
        self.client = client  # ClientSpace key (default: the peer IP)
        self.tight = False  # write-buffer limits lowered until the queue drains (queue_full)
        # activity as the sweep last saw it (idle and write-stall timeouts)
        self.active_at = 0.0
        self.seen_rx = 0
        self.seen_drained = -1
        self.drained_at = 0.0
        self.yielding = False  # reading paused until the loop has served the others
        self.lowat_sock = None  # plain TCP socket whose SO_RCVLOWAT follows the payload
        self.lowat_own = False  # lowat_sock is ours (option_socket): detached, never closed
        self.lowat_cap = 0
        self.lowat = 1  # the socket's SO_RCVLOWAT now (1: the kernel's default)
        # plain TCP: the answers of every read in one loop iteration go out in one write at
        # its end (``flush_due``: that write is scheduled), not one write per read
        self.coalesce = False
        self.flush_due = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.hangup_timer: asyncio.TimerHandle | None = None  # polls while a put waits

    @property
    def closed(self) -> bool:
        return self.done or self.session.closed

    @property
    def peer(self) -> str:
        return self.session.peer

    # node.py's reload hooks set these on live connections
    @property
    def burst(self) -> int:
        return self.session.budget.burst

    @burst.setter
    def burst(self, v: int) -> None:
        self.session.budget.burst = v

    @property
    def max_pipelined(self) -> int:
        return self.session.budget.max_pipelined

    @max_pipelined.setter
    def max_pipelined(self, v: int) -> None:
        self.session.budget.max_pipelined = v

    # ------------------------------------------------------------ lifecycle
    def connection_made(self, transport):
        self.transport = transport
        srv = self.server
        peer = transport.get_extra_info("peername")
        self.session.peer = self.fixed_peer or (
            f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or ""))
        if srv.draining:  # accepted just before the listener closed
            return self._refuse(None)
        # whose connection: the peer IP, or the transport's client (shm: "uid:N"), so a
        # local uid is held to max_connections_per_client too (it took every slot)
        ip = peer[0] if isinstance(peer, tuple) and peer else (self.client or None)
        # the client's own limit first: refused early, naming it, and never evicting others
        n = srv.per_client.get(ip, 0) if ip is not None else 0
        if n >= srv.max_per_client:
            srv.counters["rejected_connections_per_client"] += 1
            return self._refuse(f"too many connections from {ip} "
                                f"(max {srv.max_per_client} per client)")
        if len(srv.connections) >= srv.max_connections and not srv.make_room(ip):
            srv.counters["rejected_connections"] += 1
            return self._refuse(f"too many connections (max {srv.max_connections})")
        if ip is not None:
            srv.per_client[ip] = srv.per_client.get(ip, 0) + 1
            self.peer_ip = ip
        self.session.client = self.client or ip or ""
        self.active_at = self.drained_at = asyncio.get_running_loop().time()
        srv.connections.add(self)
        srv.counters["connections_total"] += 1
        if self.session.ext is not None:
            self.session.ext.made(self.session)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if srv.tcp_congestion:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, srv.tcp_congestion.encode())
            if srv.tls is None and sock.type == socket.SOCK_STREAM:  # TLS reads ciphertext
                self.lowat_cap = rcvlowat_cap(srv.limits)
                if self.lowat_cap:
                    self.lowat_sock = option_socket(sock)
                    self.lowat_own = self.lowat_sock is not sock
                self.coalesce = True
                self.loop = asyncio.get_running_loop()
        # pause reading once this many response bytes are queued (per-connection back-pressure)
        if srv.tls is not None:
            self.burst = min(self.burst, TLS_MAX_INFLIGHT)
        transport.set_write_buffer_limits(high=self.burst, low=self.burst // 2)

    def _refuse(self, message: str | None) -> None:
        if message is not None:
            self.transport.write(encode_error(OP_PING, 0, errors.Unavailable.code, message))
        self.transport.close()
        self.done = True
        self.session.close()

    def connection_lost(self, exc):
        self.done = True
        self._drop_lowat()
        srv = self.server
        if self.peer_ip is not None:
            left = srv.per_client.get(self.peer_ip, 1) - 1
            if left > 0:
                srv.per_client[self.peer_ip] = left
            else:
                srv.per_client.pop(self.peer_ip, None)
            self.peer_ip = None
        s = self.session
        for call in s.connection_lost():  # a put waiting for space (TLS notices the close
            # itself; plain TCP and shm by _poll_hangup): the wait ends, nothing reserved;
            # or a peer's repair request waiting for its turn (plane.RepairQueue)
            if call.then is not repair_admitted:
                srv.counters["put_waits_ended_by_disconnect"] += 1
                log.info("connection closed while its put waited for space: wait ended",
                         extra={"peer": self.peer, "req_id": s.req_id})
            if call.task is not None:
                call.task.cancel()
        if self in srv.connections:
            srv.connections.discard(self)
            srv.rx_closed += s.rx
            srv.tx_closed += s.sent
        if self.prune_timer is not None:
            self.prune_timer.cancel()
            self.prune_timer = None
        if self.hangup_timer is not None:
            self.hangup_timer.cancel()
            self.hangup_timer = None

    def close(self) -> None:
        if not self.done and self.transport is not None:
            self.transport.close()
        self.done = True
        self._drop_lowat()
        self.session.close()

    def abort(self) -> None:
        if not self.done and self.transport is not None:
            self.transport.abort()
        self.done = True
        self._drop_lowat()
        self.session.close("abort")

    def close_drained(self) -> None:
        """Drain: send what is queued, then FIN; swallow further input until the client closes."""
        self._act()
        if self.transport is None or self.closed:
            return
        if not self._unread():
            self.close()
            return
        # Closing a socket with unread input sends a RST, which can destroy responses
        # still on their way. Half-close instead and discard input for a while.
        self.session.linger()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._act()
        asyncio.get_running_loop().call_later(LINGER, self.close)

    def _unread(self) -> bool:
        if self.session.reader.buffered():
            return True
        sock = self.transport.get_extra_info("socket")
        try:
            return sock is not None and int.from_bytes(
                fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"), "little") > 0
        except OSError:
            return True

    # -------------------------------------------------------------- events
    # get_buffer is the session's receive_buffer, bound in __init__

    def buffer_updated(self, nbytes):
        s = self.session
        # a read that did not fill its buffer drained the socket: libuv waits in epoll next
        drained = nbytes < s.offered
        s.received(nbytes)
        if self.lowat_sock is not None:
            r = s.reader
            want = 1
            if r.target is not None and r.want >= RCVLOWAT_PAYLOAD:
                # a large payload is arriving: wake when much of it is here
                left = r.want - r.got
                if left >= RCVLOWAT_MIN:
                    want = min(left, self.lowat_cap)
            # Lowered at once (a mark above the bytes still to come would stall the
            # connection), raised only once a read drained the socket: libuv reads a full
            # buffer's socket again without epoll, where the mark plays no part, so a
            # client that keeps the pipe full (each put's payload read whole, then the next
            # header) costs no setsockopt at all, where it cost two a put. A mark left low
            # costs at most an early wake-up.
            if want < self.lowat or (want > self.lowat and drained):
                self._set_lowat(want)
        if self.coalesce and s.out and not (s.calls or s.finish is not None or s.burst_stop
                                            or s.reading != self.reading or s.yield_stop or s.queue_full):
            # only answers to send: libuv may read this socket again in this iteration (up
            # to 32 times while reads fill their buffer: a put's payload, then the next
            # header), and other connections are served too; one write at the iteration's
            # end carries all their answers. Anything else (a call to start, reading to
            # pause, a burst to flush, a close) is acted on at once, as before.
            if not self.flush_due:
                self.flush_due = True
                self.loop.call_soon(self._flush)
            return
        if not (s.out or s.calls or s.finish is not None or s.reading != self.reading
                or s.pending or s.yield_stop or s.queue_full):
            return  # _act would find nothing to do (the usual read of a payload's middle)
        self._act()

    def _flush(self) -> None:
        self.flush_due = False
        if not self.done:
            self._act()

    def _set_lowat(self, n: int) -> None:
        self.lowat = n
        try:
            self.lowat_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)
        except OSError:  # not supported here: read as the bytes come
            self._drop_lowat()

    def _drop_lowat(self) -> None:
        """No more SO_RCVLOWAT changes; a socket object of our own lets go of the fd
        (the transport owns and closes it)."""
        sock, self.lowat_sock = self.lowat_sock, None
        if self.lowat_own and sock is not None:  # never the transport's own socket object
            self.lowat_own = False
            sock.detach()

    def _yield(self) -> None:
        """The session parsed FAIR_FRAMES requests: read nothing until the loop has served
        the other connections, then parse on."""
        self.yielding = True
        if self.reading and not self.done:
            self.transport.pause_reading()
        asyncio.get_running_loop().call_soon(self._end_yield)

    def _end_yield(self) -> None:
        self.yielding = False
        s = self.session
        s.yield_stop = False
        if not self.done:
            s.advance()
            self._act()
        if self.reading and not self.done and not self.yielding:
            self.transport.resume_reading()

    def eof_received(self):
        return False  # close our side too; connection_lost cleans up

    def pause_writing(self):
        self.session.write_blocked()
        self._set_reading(False)

    def resume_writing(self):
        if self.tight:  # the queue drained: back to the usual limits
            self.tight = False
            self.transport.set_write_buffer_limits(high=self.burst, low=self.burst // 2)
        self.session.write_unblocked(self.transport.get_write_buffer_size())
        self._act()

    def check(self, now: float, lim: DataLimits) -> None:
        """The sweep's look at this connection (see ``DataServer._sweep``)."""
        if self.done or self.transport is None:
            return
        s = self.session
        unsent = self.transport.get_write_buffer_size()
        drained = s.sent - unsent
        if s.rx != self.seen_rx or drained != self.seen_drained:
            self.seen_rx, self.active_at = s.rx, now
        if drained != self.seen_drained:
            self.seen_drained, self.drained_at = drained, now
        if unsent and now - self.drained_at >= lim.write_stall_timeout:
            self.server.counters["closed_write_stalled"] += 1
            log.info("closing a data connection that took none of its responses for %gs "
                     "(%d bytes queued)", lim.write_stall_timeout, unsent,
                     extra={"peer": self.peer})
            self.abort()
        elif (s.reader.receiving and s.res is None and not s.reserved
              and now - self.active_at >= lim.put_stall_timeout):
            # a payload skipped (its request refused) or read into no reservation: no
            # reaper watches it and the connection is never idle, so a client that stops
            # sending in it held the connection for good
            self.server.counters["closed_payload_stalled"] += 1
            log.info("closing a data connection whose request payload stalled for %gs",
                     lim.put_stall_timeout, extra={"peer": self.peer})
            self.abort()
        elif (not unsent and not s.pending and not s.reserved and s.idle()
              and now - self.active_at >= lim.idle_timeout):
            self.server.counters["closed_idle"] += 1
            log.info("closing a data connection idle for %gs", lim.idle_timeout,
                     extra={"peer": self.peer})
            self.close()

    # ------------------------------------------------------------- actions
    def _act(self) -> None:
        """Carry out what the session asks for: send, run store calls, read or not, close."""
        s = self.session
        while s.out:
            out = s.take_output()
            if self.done or s.finish == "abort":
                break
            if len(out) > 2:
                # an arena view in out (a get's payload) has its entry in pending until its
                # bytes left: with none pending, out is small frames only, joined at once
                out = _coalesce(out) if s.pending else [b"".join(out)]
            self.transport.writelines(out)  # one syscall for a whole pipelined burst
            if s.pending or not s.reading or s.queued:  # else written() has nothing to do
                s.written(self.transport.get_write_buffer_size())
            if s.burst_stop:  # parsing stopped to flush a burst: go on
                s.advance()
        if not (s.calls or s.finish is not None or s.reading != self.reading or s.pending
                or s.yield_stop or s.queue_full):
            return  # the usual case: nothing more to do
        if s.calls:
            loop = asyncio.get_running_loop()
            for call in s.take_calls():
                call.task = t = loop.create_task(self._run(call))
                self.tasks.add(t)
                t.add_done_callback(self.tasks.discard)
        if s.finish is not None:
            if not self.done:
                self.abort() if s.finish == "abort" else self.close()
            return
        if s.reading != self.reading:
            self._set_reading(s.reading)
        if s.yield_stop and not self.yielding and not self.done:
            self._yield()
        if s.queue_full and not self.tight and not self.done:
            # have the transport say when its buffer is empty (resume_writing), then read on
            self.tight = True
            self.transport.set_write_buffer_limits(high=0, low=0)
        if s.pending and self.prune_timer is None and not self.done:
            self.prune_timer = asyncio.get_running_loop().call_later(_PRUNE_INTERVAL, self._prune)

    async def _run(self, call: "Call") -> None:
        if call is self.session.waiting and self.hangup_timer is None:
            self.hangup_timer = asyncio.get_running_loop().call_later(HANGUP_POLL, self._poll_hangup)
        try:
            result = await call.fn(*call.args)
        except errors.KVStoreError as e:
            self.session.call_done(call, None, e)
        else:
            self.session.call_done(call, result, None)
        self._act()

    def _poll_hangup(self) -> None:
        """While a put waits for space: if the client hung up, end the connection, which
        cancels the wait (``connection_lost``); a slot it got meanwhile is aborted."""
        self.hangup_timer = None
        if self.done or self.session.waiting is None:
            return
        if _hung_up(self.transport):
            self.abort()  # connection_lost counts and logs it
            return
        self.hangup_timer = asyncio.get_running_loop().call_later(HANGUP_POLL, self._poll_hangup)

    def _prune(self) -> None:
        self.prune_timer = None
        if not self.done:
            self.session.written(self.transport.get_write_buffer_size())
            self._act()

    def _set_reading(self, on: bool) -> None:
        if self.done or on == self.reading:
            return
        self.reading = on
        if self.yielding:
            return  # paused already; _end_yield resumes if we still read then
        if on:
            self.transport.resume_reading()
        else:
            self.transport.pause_reading()


def _hung_up(transport) -> bool:
    """The peer closed (FIN or RST), though unread bytes may still wait in the socket."""
    sock = transport.get_extra_info("socket")
    try:
        fd = sock.fileno() if sock is not None else -1
        if fd < 0:
            return False
        p = select.poll()
        p.register(fd, _HANGUP)
        return any(ev & _HANGUP for _, ev in p.poll(0))
    except (OSError, ValueError):
        return False


def _coalesce(out: list) -> list:
    """Join runs of small response frames into one bytes object each: queued in the
    transport, thousands of 32-byte objects cost several times their size (a client that
    pipelines PINGs and never reads grew the daemon by ~458 MiB per connection). Arena
    views (get payloads) stay as they are: no copy."""
    res: list = []
    run: list = []
    for b in out:
        if type(b) is bytes and len(b) < 4096:
            run.append(b)
            continue
        if run:
            res.append(run[0] if len(run) == 1 else b"".join(run))
            run = []
        res.append(b)
    if run:
        res.append(run[0] if len(run) == 1 else b"".join(run))
    return res
