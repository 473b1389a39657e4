"""TCP data plane (plaintext and TLS): the listening side of the asyncio driver.

The protocol itself (framing, auth, epoch, the Store calls) is
``session.DataSession``; one connection's glue between a uvloop
``BufferedProtocol`` and its session is ``connection.DataConnection``
(re-exported here). This module owns the listening socket and what the
connections share: connection limits (total, per client, fair eviction of
idle ones), the sweep of idle and write-stalled connections, and drain.

The TLS listener (kvstored/tls.py) hands decrypted bytes to the same driver.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from kvstored.descriptors import MAX_HANDSHAKES

from .connection import TLS_MAX_INFLIGHT, DataConnection
from .ops import CORE_OPS
from .policy import DataLimits, EpochGate
from .session import Plane

if TYPE_CHECKING:
    from kvstored.auth import Auth
    from kvstored.engine import Store
    from kvstored.tls import ServerTLS, TLSListener

__all__ = ["DataServer", "DataConnection", "TLS_MAX_INFLIGHT"]

log = logging.getLogger("kvstored.tcp")


class DataServer:
    """Owns the listening socket and the state its connections share (the ``Plane``)."""

    def __init__(self, store: "Store", *, max_connections: int, max_inflight_bytes: int,
                 tcp_congestion: str = "", max_connections_per_client: int = 1 << 30,
                 max_pipelined_requests: int = 1 << 30, auth: "Auth | None" = None,
                 tls: "ServerTLS | None" = None, gate: EpochGate | None = None, config=None):
        """``config``: the daemon's Config, for the bounds of ``DataLimits`` (issue 17)."""
        self.store = store
        self.limits = DataLimits(config, dram_size=store.arena.size)
        self.plane = Plane(store, CORE_OPS, gate=gate, auth=auth,
                           max_pipelined=max_pipelined_requests, burst=max_inflight_bytes,
                           limits=self.limits)
        self.listener: TLSListener | None = None
        self._max_connections = max_connections
        self._max_handshakes = MAX_HANDSHAKES  # TLS ones at once (the node: its descriptor budget's)
        self.tcp_congestion = tcp_congestion
        self.max_per_client = max_connections_per_client
        self.per_client: dict[str, int] = {}  # open data connections per peer IP
        self.auth = auth  # None: auth off
        self.tls = tls  # None: plaintext
        self.connections: set[DataConnection] = set()
        self.server: asyncio.base_events.Server | None = None
        self.counters = self.plane.counters
        self.latency = self.plane.latency
        self.rx_closed = 0  # bytes received / queued by connections already closed
        self.tx_closed = 0
        self.sweeper: asyncio.Task | None = None

    # The TLS listener's cap on handshakes in progress is min(max_connections,
    # max_handshakes): set again whenever either changes (a SIGHUP that lowers
    # max_connections lowers it too; it was read once, at start).
    @property
    def max_connections(self) -> int:
        return self._max_connections

    @max_connections.setter
    def max_connections(self, v: int) -> None:
        self._max_connections = v
        self._cap_handshakes()

    @property
    def max_handshakes(self) -> int:
        return self._max_handshakes

    @max_handshakes.setter
    def max_handshakes(self, v: int) -> None:
        self._max_handshakes = v
        self._cap_handshakes()

    def _cap_handshakes(self) -> None:
        if self.listener is not None:
            self.listener.max_handshakes = min(self._max_connections, self._max_handshakes)

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
        loop = asyncio.get_running_loop()
        if self.sweeper is None:
            self.sweeper = loop.create_task(self._sweep())
        if self.tls is not None:
            from kvstored.tls import TLSListener
            lim = self.limits
            self.listener = TLSListener(self.tls, lambda: DataConnection(self), self.counters,
                                        max_handshakes=min(self._max_connections,
                                                           self._max_handshakes),
                                        max_per_client=lim.max_handshakes_per_client,
                                        timeout=lim.handshake_timeout)
            return await self.listener.start(host, port)
        self.server = await loop.create_server(lambda: DataConnection(self), host, port,
                                               reuse_address=True, backlog=1024)
        return self.server.sockets[0].getsockname()[1]

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.listener is not None:
            self.listener.close()
        if self.sweeper is not None:
            self.sweeper.cancel()
            self.sweeper = None

    async def _sweep(self) -> None:
        """Close connections that hold a slot without using it: idle past ``idle_timeout``
        (nothing received, nothing sent, nothing in progress), or with responses queued
        that the client has not taken for ``write_stall_timeout``."""
        lim = self.limits
        period = max(0.05, min(1.0, lim.idle_timeout / 4, lim.write_stall_timeout / 4))
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(period)
            now = loop.time()
            for c in list(self.connections):
                try:
                    c.check(now, lim)
                except Exception:  # one connection's bug must not stop the sweep
                    log.exception("data connection check failed")

    def make_room(self, ip: str | None) -> bool:
        """At max_connections: close the longest-idle connection of the client holding the
        most connections, if that is more than ``ip`` would hold with one more, so clients
        with few connections are never starved by one with many. True if room was made."""
        per = self.per_client
        mine = per.get(ip, 0) + 1 if ip is not None else 1
        if not per:
            return False
        top = max(per, key=per.get)
        if per[top] <= mine:
            return False
        victims = [c for c in self.connections
                   if c.peer_ip == top and not c.closed and c.session.idle()
                   and not c.session.pending and not c.session.reserved]
        if not victims:
            return False
        v = min(victims, key=lambda c: c.active_at)
        self.counters["connections_evicted_for_fairness"] += 1
        log.info("closing an idle data connection of %s (%d connections) to admit %s",
                 top, per[top], ip, extra={"peer": v.peer})
        v.abort()
        v.connection_lost(None)  # free its slot now; the transport's callback is then a no-op
        return True

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
