"""TCP data plane (plaintext and TLS): a thin asyncio driver of the data session.

The protocol itself (framing, auth, epoch, the Store calls) is
``session.DataSession``; this module owns the listening socket, connection
limits, and the glue between a uvloop ``BufferedProtocol`` and the session:

* receive: ``get_buffer`` returns the session's receive buffer, which for a
  put's payload is a view of the reserved arena slot (the kernel writes the
  bytes straight into the arena, no copy);
* send: the session's output goes out with one ``writelines`` per burst; a
  get's payload is an arena view that uvloop keeps until the kernel took the
  bytes, and the session holds a read reference on the object until then
  (``written``), so eviction never reuses space under a send in progress;
* store calls that await (a put waiting for space, a get loading from NVMe)
  run as tasks and report back with ``call_done``.

The TLS listener (kvstored/tls.py) hands decrypted bytes to the same driver.
"""
from __future__ import annotations

import asyncio
import fcntl
import socket
import termios
from typing import TYPE_CHECKING

from kvstore import errors
from kvstore.wire import OP_PING, encode_error

from .ops import CORE_OPS
from .policy import EpochGate
from .session import DataSession, OpTable, Plane

if TYPE_CHECKING:
    from kvstored.auth import Auth
    from kvstored.engine import Store
    from kvstored.tls import ServerTLS, TLSListener

    from .session import Call

_PRUNE_INTERVAL = 0.002  # how often to release references while sends are queued
LINGER = 2.0  # seconds a draining connection swallows input after its last response
# TLS responses are encrypted copies, not arena views: queue at most this much per connection
TLS_MAX_INFLIGHT = 8 << 20


class DataServer:
    """Owns the listening socket and the state its connections share (the ``Plane``)."""

    def __init__(self, store: "Store", *, max_connections: int, max_inflight_bytes: int,
                 tcp_congestion: str = "", max_connections_per_client: int = 1 << 30,
                 max_pipelined_requests: int = 1 << 30, auth: "Auth | None" = None,
                 tls: "ServerTLS | None" = None, gate: EpochGate | None = None):
        self.store = store
        self.plane = Plane(store, CORE_OPS, gate=gate, auth=auth,
                           max_pipelined=max_pipelined_requests, burst=max_inflight_bytes)
        self.max_connections = max_connections
        self.tcp_congestion = tcp_congestion
        self.max_per_client = max_connections_per_client
        self.per_client: dict[str, int] = {}  # open data connections per peer IP
        self.auth = auth  # None: auth off
        self.tls = tls  # None: plaintext
        self.listener: TLSListener | None = None
        self.connections: set[DataConnection] = set()
        self.server: asyncio.base_events.Server | None = None
        self.counters = self.plane.counters
        self.latency = self.plane.latency
        self.rx_closed = 0  # bytes received / queued by connections already closed
        self.tx_closed = 0

    # Cluster member-list epoch (kvstore.layout.member_epoch; 0 = not in a cluster), kept
    # by the plane's EpochGate: a put/get sent with another non-zero epoch gets Redirect.
    @property
    def epoch(self) -> int:
        return self.plane.gate.epoch

    @epoch.setter
    def epoch(self, v: int) -> None:
        self.plane.gate.epoch = v

    @property
    def draining(self) -> bool:
        return self.plane.draining

    @property
    def max_inflight_bytes(self) -> int:
        return self.plane.burst

    @max_inflight_bytes.setter
    def max_inflight_bytes(self, v: int) -> None:
        self.plane.burst = v  # new connections; node's reload hook updates existing ones

    @property
    def max_pipelined(self) -> int:
        return self.plane.max_pipelined

    @max_pipelined.setter
    def max_pipelined(self, v: int) -> None:
        self.plane.max_pipelined = v

    def set_max_inflight_bytes(self, v: int) -> None:
        """Reload: new and existing connections queue at most ``v`` response bytes."""
        self.plane.burst = v
        burst = min(v, TLS_MAX_INFLIGHT) if self.tls is not None else v
        for c in list(self.connections):
            if c.transport is not None and not c.closed:
                c.burst = burst
                c.transport.set_write_buffer_limits(high=burst, low=burst // 2)

    def set_max_pipelined(self, v: int) -> None:
        """Reload: new and existing connections stop reading at ``v`` unanswered requests."""
        self.plane.max_pipelined = v
        for c in list(self.connections):
            c.max_pipelined = v

    def latency_by_name(self):
        return self.plane.latency_by_name()

    def traffic(self) -> tuple[int, int]:
        """(bytes received, bytes queued for sending) over all data connections ever."""
        conns = list(self.connections)
        return (self.rx_closed + sum(c.session.rx for c in conns),
                self.tx_closed + sum(c.session.sent for c in conns))

    async def start(self, host: str, port: int) -> int:
        if self.tls is not None:
            from kvstored.tls import TLSListener
            self.listener = TLSListener(self.tls, lambda: DataConnection(self), self.counters,
                                        max_handshakes=self.max_connections)
            return await self.listener.start(host, port)
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: DataConnection(self), host, port,
                                               reuse_address=True, backlog=1024)
        return self.server.sockets[0].getsockname()[1]

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.listener is not None:
            self.listener.close()

    async def drain(self, timeout: float) -> None:
        """Finish in-flight requests (bounded by ``timeout``), then close every connection.

        From now on no connection starts a new request. Each one finishes what it is
        doing (a payload being received and committed, a put waiting for space, a get
        loading from NVMe), sends its queued responses, then half-closes (FIN after the
        last response, so a client reads every answer it was given) and is closed.
        Requests it had not started get no answer: the client sees the connection end,
        which is never an acknowledgement. At the deadline the rest are aborted (their
        reservations are dropped: nothing partial becomes visible).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self.plane.draining = True
        while self.connections and loop.time() < deadline:
            for c in list(self.connections):
                if not c.closed and not c.session.lingering and c.session.idle():
                    c.close_drained()
            await asyncio.sleep(0.005)
        for c in list(self.connections):
            c.abort()


class DataConnection(asyncio.BufferedProtocol):
    """One connection: moves bytes and events between its transport and its session."""

    def __init__(self, server: DataServer, *, ops: OpTable | None = None, ext=None,
                 peer: str = ""):
        """``ops``: the op table (None: the plane's core ops; the shm channel passes its own);
        ``ext``: the transport's per-connection state, given to the session (``made`` and
        ``lost`` hooks); ``peer``: the name for log lines (default: the socket's peer)."""
        self.server = server
        self.session: DataSession = server.plane.session(ops=ops, wake=self._act)
        self.session.ext = ext
        self.get_buffer = self.session.receive_buffer  # one call less per read (hot path)
        self.fixed_peer = peer
        self.transport: asyncio.Transport | None = None
        self.done = False  # the transport is closed (or was never ours)
        self.reading = True  # what we last told the transport
        self.prune_timer: asyncio.TimerHandle | None = None
        self.tasks: set[asyncio.Task] = set()
        self.peer_ip: str | None = None

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
        if len(srv.connections) >= srv.max_connections:
            srv.counters["rejected_connections"] += 1
            return self._refuse(f"too many connections (max {srv.max_connections})")
        ip = peer[0] if isinstance(peer, tuple) and peer else None
        if ip is not None:
            n = srv.per_client.get(ip, 0)
            if n >= srv.max_per_client:
                srv.counters["rejected_connections_per_client"] += 1
                return self._refuse(f"too many connections from {ip} "
                                    f"(max {srv.max_per_client} per client)")
            srv.per_client[ip] = n + 1
            self.peer_ip = ip
        srv.connections.add(self)
        srv.counters["connections_total"] += 1
        if self.session.ext is not None:
            self.session.ext.made(self.session)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if srv.tcp_congestion:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, srv.tcp_congestion.encode())
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
        srv = self.server
        if self.peer_ip is not None:
            left = srv.per_client.get(self.peer_ip, 1) - 1
            if left > 0:
                srv.per_client[self.peer_ip] = left
            else:
                srv.per_client.pop(self.peer_ip, None)
            self.peer_ip = None
        s = self.session
        for call in s.connection_lost():
            if call.task is not None:
                call.task.cancel()
        if self in srv.connections:
            srv.connections.discard(self)
            srv.rx_closed += s.rx
            srv.tx_closed += s.sent
        if self.prune_timer is not None:
            self.prune_timer.cancel()
            self.prune_timer = None

    def close(self) -> None:
        if not self.done and self.transport is not None:
            self.transport.close()
        self.done = True
        self.session.close()

    def abort(self) -> None:
        if not self.done and self.transport is not None:
            self.transport.abort()
        self.done = True
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
        self.session.received(nbytes)
        self._act()

    def eof_received(self):
        return False  # close our side too; connection_lost cleans up

    def pause_writing(self):
        self.session.write_blocked()
        self._set_reading(False)

    def resume_writing(self):
        self.session.write_unblocked(self.transport.get_write_buffer_size())
        self._act()

    # ------------------------------------------------------------- actions
    def _act(self) -> None:
        """Carry out what the session asks for: send, run store calls, read or not, close."""
        s = self.session
        while s.out:
            out = s.take_output()
            if self.done or s.finish == "abort":
                break
            self.transport.writelines(out)  # one syscall for a whole pipelined burst
            if s.pending or not s.reading:  # written() has nothing to do otherwise (hot path)
                s.written(self.transport.get_write_buffer_size())
            if s.burst_stop:  # parsing stopped to flush a burst: go on
                s.advance()
        if not (s.calls or s.finish is not None or s.reading != self.reading or s.pending):
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
        if s.pending and self.prune_timer is None and not self.done:
            self.prune_timer = asyncio.get_running_loop().call_later(_PRUNE_INTERVAL, self._prune)

    async def _run(self, call: "Call") -> None:
        try:
            result = await call.fn(*call.args)
        except errors.KVStoreError as e:
            self.session.call_done(call, None, e)
        else:
            self.session.call_done(call, result, None)
        self._act()

    def _prune(self) -> None:
        self.prune_timer = None
        if not self.done:
            self.session.written(self.transport.get_write_buffer_size())
            self._act()

    def _set_reading(self, on: bool) -> None:
        if self.done or on == self.reading:
            return
        self.reading = on
        if on:
            self.transport.resume_reading()
        else:
            self.transport.pause_reading()
