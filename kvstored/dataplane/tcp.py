"""TCP data plane: a thin shell that moves frames between sockets and the Store.

Payloads are received straight into the slot reserved for them (a
BufferedProtocol hands the kernel a memoryview of the arena) and sent from the
arena without copying (uvloop keeps a reference to the memoryview until the
bytes are on the socket). A read reference on the object is held until then,
so eviction can never reuse the space under a send in progress.

Framing errors that leave the byte stream unparseable (bad magic or version, a
payload larger than we are willing to skip) get one error frame and then the
connection is closed; every other bad request gets a typed error frame and the
connection keeps going.
"""
from __future__ import annotations

import asyncio
import collections
import fcntl
import logging
import socket
import termios
from time import perf_counter as _now
from typing import TYPE_CHECKING

from kvstore import errors
from kvstore.wire import (EPOCH_OPS, FLAG_OVERWRITE, HEADER, HEADER_SIZE, MAGIC, MAX_KEY_LEN, MAX_TOKEN_LEN,
                          OP_AUTH, OP_GET, OP_PING, OP_PUT, OPS, VERSION, encode_error,
                          encode_response, namespace_bytes)

from kvstored.auth import READ, TOKEN_REQUIRED, WRITE, Unauthenticated, denial

from kvstored.engine.store import NotResident
from kvstored.metrics import LatencyHistogram

if TYPE_CHECKING:
    from kvstored.auth import Auth, Grant
    from kvstored.engine import Entry, Reservation, Store
    from kvstored.tls import ServerTLS, TLSListener

log = logging.getLogger("kvstored.tcp")

HEADER_BUFFER = 256 << 10  # per-connection buffer for headers (and small payload tails)
DISCARD_LIMIT = 1 << 30  # payloads of rejected puts up to this size are skipped, not fatal
_PRUNE_INTERVAL = 0.002  # how often to release references while sends are queued
LINGER = 2.0  # seconds a draining connection swallows input after its last response
# TLS responses are encrypted copies, not arena views: queue at most this much per connection
TLS_MAX_INFLIGHT = 8 << 20
_MASK_CACHE = 1024  # namespaces whose permission a connection remembers


class DataServer:
    """Owns the listening socket and per-server state shared by connections."""

    def __init__(self, store: "Store", *, max_connections: int, max_inflight_bytes: int,
                 tcp_congestion: str = "", max_connections_per_client: int = 1 << 30,
                 max_pipelined_requests: int = 1 << 30, auth: "Auth | None" = None,
                 tls: "ServerTLS | None" = None):
        self.store = store
        self.max_connections = max_connections
        self.max_inflight_bytes = max_inflight_bytes
        self.tcp_congestion = tcp_congestion
        self.max_per_client = max_connections_per_client
        self.max_pipelined = max_pipelined_requests
        self.per_client: dict[str, int] = {}  # open data connections per peer IP
        self.auth = auth  # None: auth off
        self.tls = tls  # None: plaintext
        self.listener: TLSListener | None = None
        self.connections: set[DataConnection] = set()
        self.scratch = memoryview(bytearray(1 << 20))  # sink for skipped payloads
        self.server: asyncio.base_events.Server | None = None
        self.counters = collections.Counter()
        self.draining = False
        # Cluster member-list epoch (kvstore.layout.member_epoch; 0 = not in a cluster).
        # A put/get sent with another non-zero epoch is answered Redirect.
        self.epoch = 0
        # Per-op service time, recorded on the hot path (~0.3 us a request, see
        # kvstored/metrics.py); the operation counters are these histograms' counts.
        self.latency = {op: LatencyHistogram() for op in OPS}  # every op the wire knows
        self.latency_other = LatencyHistogram()  # unknown ops (answered with an error)
        self.rx_closed = 0  # bytes received / queued by connections already closed
        self.tx_closed = 0

    def latency_by_name(self) -> dict[str, LatencyHistogram]:
        return {**{OPS[op]: h for op, h in self.latency.items()}, "other": self.latency_other}

    def traffic(self) -> tuple[int, int]:
        """(bytes received, bytes queued for sending) over all data connections ever."""
        conns = list(self.connections)
        return (self.rx_closed + sum(c.rx for c in conns),
                self.tx_closed + sum(c.sent for c in conns))

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
        self.draining = True
        while self.connections and loop.time() < deadline:
            for c in list(self.connections):
                if not c.closed and not c.lingering and c.idle():
                    c.close_drained()
            await asyncio.sleep(0.005)
        for c in list(self.connections):
            if c.transport is not None:
                c.transport.abort()
            c.closed = True


class DataConnection(asyncio.BufferedProtocol):
    def __init__(self, server: DataServer):
        self.server = server
        self.store = server.store
        self.max_value = server.store.limits.max_value_size
        self.hbuf = bytearray(HEADER_BUFFER)
        self.hview = memoryview(self.hbuf)
        self.hstart = 0  # first unparsed byte in hbuf
        self.hend = 0  # end of received bytes in hbuf
        # payload being received: into a reservation's slot, or skipped into scratch
        self.target: memoryview | None = None
        self.got = 0
        self.want = 0
        self.res: Reservation | None = None
        self.req_id = 0
        self.after_skip: bytes | None = None  # frame to send once a skipped payload is consumed
        self.waiting: asyncio.Task | None = None  # reserve_wait in progress
        self.sent = 0  # bytes queued for the transport (out + handed over)
        # Responses made while handling one batch of received bytes go out in one
        # writelines (one syscall for a whole pipelined burst).
        self.out: list = []
        self.pending: collections.deque[tuple[int, Entry]] = collections.deque()
        self.prune_timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.loads = 0  # gets waiting for a promotion from NVMe
        self.reading_paused = False
        self.write_paused = False
        self.t_in = 0.0  # when the bytes being parsed arrived (latency start)
        self.put_t0 = 0.0  # when the current put's header arrived
        self.rx = 0  # bytes received
        self.peer = ""  # "host:port", for log lines
        self.lingering = False  # draining: answered all it will, swallowing input until EOF
        self.in_parse = False
        self.max_pipelined = server.max_pipelined  # unanswered requests before reading stops
        self.burst = server.max_inflight_bytes  # response bytes queued before a mid-parse flush
        self.flushed_at = 0  # self.sent at the last flush
        self.peer_ip: str | None = None
        # auth: the connection's token (by digest) and its permission per namespace
        self.auth = server.auth
        self.grant: Grant | None = None
        self.digest = b""
        self.auth_gen = 0
        self.masks: dict[bytes, int] = {}

    # ------------------------------------------------------------ lifecycle
    def connection_made(self, transport):
        self.transport = transport
        srv = self.server
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "")
        if srv.draining:  # accepted just before the listener closed
            transport.close()
            self.closed = True
            return
        if len(srv.connections) >= srv.max_connections:
            srv.counters["rejected_connections"] += 1
            transport.write(encode_error(OP_PING, 0, errors.Unavailable.code,
                                         f"too many connections (max {srv.max_connections})"))
            transport.close()
            self.closed = True
            return
        ip = peer[0] if isinstance(peer, tuple) and peer else None
        if ip is not None:
            n = srv.per_client.get(ip, 0)
            if n >= srv.max_per_client:
                srv.counters["rejected_connections_per_client"] += 1
                transport.write(encode_error(OP_PING, 0, errors.Unavailable.code,
                                             f"too many connections from {ip} "
                                             f"(max {srv.max_per_client} per client)"))
                transport.close()
                self.closed = True
                return
            srv.per_client[ip] = n + 1
            self.peer_ip = ip
        srv.connections.add(self)
        srv.counters["connections_total"] += 1
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if srv.tcp_congestion:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, srv.tcp_congestion.encode())
        # pause reading once this many response bytes are queued (per-connection back-pressure)
        if srv.tls is not None:
            self.burst = min(self.burst, TLS_MAX_INFLIGHT)
        transport.set_write_buffer_limits(high=self.burst, low=self.burst // 2)

    def connection_lost(self, exc):
        self.closed = True
        if self.peer_ip is not None:
            left = self.server.per_client.get(self.peer_ip, 1) - 1
            if left > 0:
                self.server.per_client[self.peer_ip] = left
            else:
                self.server.per_client.pop(self.peer_ip, None)
            self.peer_ip = None
        if self in self.server.connections:
            self.server.connections.discard(self)
            self.server.rx_closed += self.rx
            self.server.tx_closed += self.sent
        if self.waiting is not None:
            self.waiting.cancel()
        if self.res is not None:
            self.store.abort(self.res)  # mid-payload disconnect: nothing becomes visible
            self.res = None
        self.target = None
        while self.pending:
            self.store.release(self.pending.popleft()[1])
        if self.prune_timer is not None:
            self.prune_timer.cancel()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.close()
        self.closed = True

    def busy(self) -> bool:
        return bool(self.pending or self.res is not None or self.waiting is not None or self.loads)

    def idle(self) -> bool:
        """No request half done: nothing being received, waited for or loaded."""
        return self.target is None and self.res is None and self.waiting is None and not self.loads

    def close_drained(self) -> None:
        """Drain: send what is queued, then FIN; swallow further input until the client closes."""
        self._flush()
        if self.transport is None or self.closed:
            return
        if not self._unread():
            self.close()
            return
        # Closing a socket with unread input sends a RST, which can destroy responses
        # still on their way. Half-close instead and discard input for a while.
        self.lingering = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._resume_reading()
        asyncio.get_running_loop().call_later(LINGER, self.close)

    def _unread(self) -> bool:
        if self.hend > self.hstart:
            return True
        sock = self.transport.get_extra_info("socket")
        try:
            return sock is not None and int.from_bytes(
                fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"), "little") > 0
        except OSError:
            return True

    def pause_writing(self):
        self.write_paused = True
        self._pause_reading()

    def resume_writing(self):
        self.write_paused = False
        self._prune()
        self._unblock()

    def _unblock(self) -> None:
        """Resume reading, and parse frames already received, once nothing holds the
        connection back (queued responses, a put waiting for space, too many requests)."""
        if (self.closed or self.in_parse or self.lingering or self.write_paused
                or self.waiting is not None or self.server.draining
                or len(self.pending) + self.loads >= self.max_pipelined):
            return
        self._resume_reading()
        if self.target is None and self.hend - self.hstart >= HEADER_SIZE:
            self._parse()
            if self.out:
                self._flush()

    def _pause_reading(self):
        if not self.reading_paused and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self):
        if self.reading_paused and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    # -------------------------------------------------------------- receive
    def get_buffer(self, sizehint):
        if self.target is not None:
            return self.target[self.got:]
        if self.lingering:
            return self.server.scratch
        if self.hend > HEADER_BUFFER - 65536:
            # only an incomplete header (< 232 bytes) is ever left here: cheap to move
            n = self.hend - self.hstart
            self.hbuf[:n] = self.hbuf[self.hstart:self.hend]
            self.hstart, self.hend = 0, n
        return self.hview[self.hend:]

    def buffer_updated(self, nbytes):
        self.rx += nbytes
        if self.lingering:  # draining: input after our last response is discarded
            return
        if self.target is not None:
            self.got += nbytes
            if self.got == self.want:
                self._payload_done()
                self._parse()
        else:
            self.hend += nbytes
            self._parse()
        if self.out:
            self._flush()

    def eof_received(self):
        return False  # close our side too; connection_lost cleans up

    def _parse(self) -> None:
        hb = self.hbuf
        self.t_in = _now()
        self.in_parse = True
        # stop at a payload, a put waiting for space, a full write buffer, or
        # max_pipelined unanswered requests; _unblock() picks up from there
        while (not self.closed and self.target is None and self.waiting is None
               and not self.write_paused and len(self.pending) + self.loads < self.max_pipelined):
            if self.server.draining:  # start nothing new; DataServer.drain closes us
                self._pause_reading()
                break
            avail = self.hend - self.hstart
            if avail < HEADER_SIZE:
                break
            (magic, version, op, flags, rid, _status, ns_len, key_len, epoch, plen,
             csum) = HEADER.unpack_from(hb, self.hstart)
            if magic != MAGIC:
                return self._fatal(rid if version == VERSION else 0, "bad frame magic")
            if version != VERSION:
                return self._fatal(rid, f"unsupported wire version {version} (this daemon speaks {VERSION})")
            head = HEADER_SIZE + ns_len + key_len
            if avail < head:
                break
            if op == OP_AUTH and avail < head + plen <= head + MAX_TOKEN_LEN:
                break  # wait for the whole token
            p = self.hstart + HEADER_SIZE
            ns = bytes(hb[p:p + ns_len])
            key = bytes(hb[p + ns_len:p + head - HEADER_SIZE])
            self.hstart += head
            self.req_id = rid
            if epoch and epoch != self.server.epoch and self.server.epoch and op in EPOCH_OPS:
                self._reject(op, rid, plen if op == OP_PUT else 0, errors.Redirect(
                    f"member list epoch {epoch:08x} is not this node's {self.server.epoch:08x}: "
                    "refresh the member list"))
                continue
            if op == OP_PUT:
                self.put_t0 = self.t_in
                if self.auth is not None and not self._allowed(ns, WRITE, op, rid, plen):
                    continue
                self._begin_put(rid, ns, key, plen, csum, bool(flags & FLAG_OVERWRITE))
            elif op == OP_GET:
                if plen:
                    return self._fatal(rid, "a get request carries no payload")
                if self.auth is not None and not self._allowed(ns, READ, op, rid, 0):
                    continue
                self._get(rid, ns, key)
            elif op == OP_PING:
                if plen:
                    return self._fatal(rid, "a ping request carries no payload")
                if self.auth is not None and self.grant is None:
                    self._unauthenticated(op, rid, 0)
                    continue
                self._send(encode_response(OP_PING, rid))
            elif op == OP_AUTH:
                if ns_len or key_len or not 1 <= plen <= MAX_TOKEN_LEN:
                    self._reject(op, rid, plen, errors.InvalidArgument(
                        f"an auth frame carries a token of 1-{MAX_TOKEN_LEN} bytes and no "
                        "namespace or key"))
                    continue
                token = bytes(hb[self.hstart:self.hstart + plen])
                self.hstart += plen
                self._authenticate(rid, token)
            elif not self._other_op(op, flags, rid, ns, key, plen, csum):
                self._reject(op, rid, plen, errors.InvalidArgument(f"unknown op {op}"))
        self.in_parse = False
        if self.hstart == self.hend:
            self.hstart = self.hend = 0
        elif len(self.pending) + self.loads >= self.max_pipelined and not self.reading_paused:
            self.server.counters["pipeline_limit_pauses"] += 1
            self._pause_reading()  # too many unanswered requests: _prune/_flush resume

    def _other_op(self, op: int, flags: int, rid: int, ns: bytes, key: bytes, plen: int,
                  csum: int) -> bool:
        """Ops of a derived transport (the shm channel); False: unknown here."""
        return False

    # ----------------------------------------------------------------- auth
    def _authenticate(self, rid: int, token: bytes) -> None:
        auth = self.auth
        if auth is None:  # auth off: a token is accepted and ignored
            self._send(encode_response(OP_AUTH, rid))
            return
        try:
            self.digest, self.grant = auth.authenticate(token)
        except errors.PermissionDenied as e:
            self.grant = None
            self.server.counters["auth_rejected_bad_token"] += 1
            self.server.counters["errors_PermissionDenied"] += 1
            log.info("closing data connection: %s", e.message, extra={"req_id": rid, "peer": self.peer})
            self._send(encode_error(OP_AUTH, rid, e.code, e.message))
            self._flush()
            self.close()
            return
        self.auth_gen = auth.generation
        self.masks.clear()
        self.server.counters["auth_ok"] += 1
        self._send(encode_response(OP_AUTH, rid))

    def _unauthenticated(self, op: int, rid: int, plen: int, reason: str = "no_token",
                         message: str = "") -> None:
        # the request is refused (its payload skipped); the connection stays open for an AUTH
        self.server.counters["auth_rejected_" + reason] += 1
        self._reject(op, rid, plen, Unauthenticated(message or TOKEN_REQUIRED))

    def _allowed(self, ns: bytes, need: int, op: int, rid: int, plen: int) -> bool:
        """Whether this connection's token may ``need`` (READ/WRITE) in ``ns``; if not,
        the request is answered with PermissionDenied (and its payload skipped)."""
        grant = self.grant
        if grant is None:
            self._unauthenticated(op, rid, plen)
            return False
        if self.auth_gen != self.auth.generation:  # tokens reloaded: look ours up again
            self.auth_gen = self.auth.generation
            self.masks.clear()
            grant = self.grant = self.auth.tokens.get(self.digest)
            if grant is None:
                self._unauthenticated(op, rid, plen, "revoked",
                                      "this connection's token was revoked: authenticate again")
                return False
        mask = self.masks.get(ns)
        if mask is None:
            mask = grant.mask(ns)
            if len(self.masks) < _MASK_CACHE:
                self.masks[ns] = mask
        if mask & need:
            return True
        reason, err = denial(grant, ns, need, mask)
        self.server.counters["auth_rejected_" + reason] += 1
        self._reject(op, rid, plen, err)
        return False

    # ------------------------------------------------------------------ put
    def _begin_put(self, rid: int, ns: bytes, key: bytes, plen: int, csum: int, overwrite: bool) -> None:
        try:
            _check_names(ns, key)
            res = self.store.reserve(ns, key, plen, csum, overwrite)
        except errors.NoSpace:
            # wait (bounded) for eviction / unpins without reading further frames
            self._pause_reading()
            self.waiting = asyncio.get_running_loop().create_task(
                self._reserve_later(rid, ns, key, plen, csum, overwrite))
            return
        except errors.KVStoreError as e:
            return self._reject(OP_PUT, rid, plen, e)
        self._start_payload(rid, res, plen)

    async def _reserve_later(self, rid, ns, key, plen, csum, overwrite) -> None:
        await self._wait_for_space(ns, key, plen, csum, overwrite,
                                   lambda res: self._start_payload(rid, res, plen),
                                   lambda e: self._reject(OP_PUT, rid, plen, e))

    async def _wait_for_space(self, ns, key, size, csum, overwrite, reserved, failed) -> None:
        """A put that found no space: wait (bounded) for it, then go on reading frames.

        While ``self.waiting`` is set nothing else on this connection is parsed, so
        answers keep the order of the requests."""
        try:
            res = await self.store.reserve_wait(ns, key, size, csum, overwrite)
        except errors.KVStoreError as e:
            self.waiting = None
            failed(e)
        else:
            self.waiting = None
            if self.closed:
                if res is not None:
                    self.store.abort(res)
                return
            reserved(res)
        if not self.closed:
            if not self.write_paused:
                self._resume_reading()
            self._parse()
        if self.out:
            self._flush()

    def _start_payload(self, rid: int, res: "Reservation | None", plen: int) -> None:
        if res is None:  # same object already stored: skip the payload, answer "deduplicated"
            self.after_skip = _dedup_response(rid)
            self._skip(plen)
            return
        self.res = res
        res.on_expire = self._reservation_expired
        self._receive_into(res.view, plen)

    def _receive_into(self, target: memoryview, plen: int) -> None:
        # the part of the payload that already arrived with the header
        take = min(self.hend - self.hstart, plen)
        if take:
            target[:take] = self.hview[self.hstart:self.hstart + take]
            self.hstart += take
        self.target, self.got, self.want = target, take, plen
        if take == plen:
            self._payload_done()

    def _payload_done(self) -> None:
        res, self.res = self.res, None
        self.target = None
        if res is None:  # a skipped payload
            if self.after_skip is not None:
                self._send(self.after_skip)
                self.after_skip = None
            return
        try:
            stored = self.store.commit(res)
        except errors.KVStoreError as e:
            self._error(OP_PUT, self.req_id, e)
            return
        self._send(encode_response(OP_PUT, self.req_id, 0) if stored else _dedup_response(self.req_id))

    def _reservation_expired(self, res: "Reservation") -> None:
        # the writer stalled past reservation_timeout: stop writing into the slot now
        log.warning("closing a data connection whose put stalled past the reservation timeout",
                    extra={"req_id": self.req_id, "peer": self.peer, "size": res.size})
        self.server.counters["stalled_puts"] += 1
        self.res = None
        self.target = None
        if self.transport is not None:
            self.transport.abort()
        self.closed = True

    def _skip(self, plen: int) -> None:
        """Consume ``plen`` payload bytes without storing them, then send ``after_skip``."""
        if plen > DISCARD_LIMIT:
            return self._fatal(self.req_id, f"payload of {plen} bytes is too large to skip")
        scratch = self.server.scratch
        take = min(self.hend - self.hstart, plen)
        self.hstart += take
        left = plen - take
        if left == 0:
            if self.after_skip is not None:
                self._send(self.after_skip)
                self.after_skip = None
            return
        # receive the rest into scratch, wrapping around: content is thrown away
        self.target = _Sink(scratch, left)
        self.got, self.want = 0, left

    def _reject(self, op: int, rid: int, plen: int, err: errors.KVStoreError) -> None:
        """Answer with a typed error once the request's payload has been skipped."""
        self.server.counters["errors_" + err.name] += 1
        _log_error(op, rid, self.peer, err)
        frame = encode_error(op, rid, err.code, err.message)
        if plen == 0:
            self._send(frame)
            return
        self.after_skip = frame
        self._skip(plen)

    def _error(self, op: int, rid: int, err: errors.KVStoreError) -> None:
        self.server.counters["errors_" + err.name] += 1
        _log_error(op, rid, self.peer, err)
        self._send(encode_error(op, rid, err.code, err.message))

    def _fatal(self, rid: int, message: str) -> None:
        self.in_parse = False
        self.server.counters["errors_ProtocolError"] += 1
        log.info("closing data connection: %s", message, extra={"req_id": rid, "peer": self.peer})
        self._send(encode_error(0, rid, errors.ProtocolError.code, message))
        self._flush()
        self.close()

    # ------------------------------------------------------------------ get
    def _get(self, rid: int, ns: bytes, key: bytes, op: int = OP_GET, deliver=None) -> None:
        """Answer a get with ``deliver(rid, entry, t0)`` (default: send the bytes)."""
        deliver = deliver or self._send_object
        try:
            _check_names(ns, key)
            e = self.store.acquire(ns, key)
        except NotResident:
            # on NVMe: promote in the background; later requests go on meanwhile and this
            # response may overtake or follow them (responses carry the request id)
            self.loads += 1
            asyncio.get_running_loop().create_task(self._get_later(rid, ns, key, op, deliver, self.t_in))
            return
        except errors.KVStoreError as err:
            return self._error(op, rid, err)
        deliver(rid, e, 0.0)

    async def _get_later(self, rid: int, ns: bytes, key: bytes, op: int, deliver, t0: float) -> None:
        try:
            e = await self.store.acquire_async(ns, key)
        except errors.KVStoreError as err:
            self.loads -= 1
            if not self.closed:
                self._error(op, rid, err)
                self._flush()
            return
        self.loads -= 1
        if self.closed:
            self.store.release(e)
            return
        deliver(rid, e, t0)
        self._flush()

    def _send_object(self, rid: int, e: "Entry", t0: float = 0.0) -> None:
        self.out.append(encode_response(OP_GET, rid, 0, e.size, e.checksum))
        self.out.append(self.store.view(e))
        self.sent += HEADER_SIZE + e.size
        # the get's latency is observed when its bytes have left for the kernel (_prune)
        self.pending.append((self.sent, e, t0 or self.t_in))
        if self.sent - self.flushed_at >= self.burst:
            self._flush()  # bound what one pipelined burst queues (pause_writing may follow)

    def _send(self, frame: bytes) -> None:
        if not self.closed:
            self.out.append(frame)
            self.sent += len(frame)
            op = frame[5]  # every response but a get's object passes here: time it by its op
            if op == OP_PUT:
                self.server.latency[OP_PUT].observe(_now() - self.put_t0)
            elif op:  # 0: a connection-level error, not an answer to a request
                self.server.latency.get(op, self.server.latency_other).observe(_now() - self.t_in)

    def _flush(self) -> None:
        out, self.out = self.out, []
        self.flushed_at = self.sent
        if not self.closed:
            self.transport.writelines(out)
            if self.pending:
                self._prune()
            elif self.reading_paused:
                self._unblock()

    def _prune(self) -> None:
        """Release read references whose bytes have left uvloop's buffer."""
        if self.prune_timer is not None:
            self.prune_timer.cancel()
            self.prune_timer = None
        if self.closed:
            return
        drained = self.sent - self.transport.get_write_buffer_size()
        pending = self.pending
        if pending and pending[0][0] <= drained:
            hist, now = self.server.latency[OP_GET], _now()
            while pending and pending[0][0] <= drained:
                _, e, t0 = pending.popleft()
                self.store.release(e)
                hist.observe(now - t0)
        if pending:
            self.prune_timer = asyncio.get_running_loop().call_later(_PRUNE_INTERVAL, self._prune)
        if self.reading_paused:
            self._unblock()


class _Sink:
    """A receive target that swallows any number of bytes into a fixed scratch buffer."""

    __slots__ = ("scratch", "size")

    def __init__(self, scratch: memoryview, size: int):
        self.scratch = scratch
        self.size = size

    def __getitem__(self, s: slice) -> memoryview:
        left = self.size - (s.start or 0)
        return self.scratch[:min(left, len(self.scratch))]


def _log_error(op: int, rid: int, peer: str, err: errors.KVStoreError) -> None:
    """A typed error answered to a client: debug (the client has it; the metric counts it)."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug("request failed: %s", err.message, extra={
            "req_id": rid, "peer": peer, "op": OPS.get(op, op), "error": err.name})


def _dedup_response(rid: int) -> bytes:
    # aux=1 tells the client the object was already stored (a no-op put)
    return HEADER.pack(MAGIC, VERSION, OP_PUT, 0x8000, rid, 0, 0, 0, 1, 0, 0)


_VALID_NAMESPACES: set[bytes] = set()


def _check_names(ns: bytes, key: bytes) -> None:
    if ns not in _VALID_NAMESPACES:
        namespace_bytes(ns)
        if len(_VALID_NAMESPACES) < 4096:  # a cache, bounded against namespace spraying
            _VALID_NAMESPACES.add(ns)
    if not 1 <= len(key) <= MAX_KEY_LEN:
        raise errors.InvalidArgument(f"key length {len(key)} outside 1-{MAX_KEY_LEN} bytes")
