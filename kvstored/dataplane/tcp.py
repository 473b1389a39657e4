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
import logging
import socket
from typing import TYPE_CHECKING

from kvstore import errors
from kvstore.wire import (FLAG_OVERWRITE, HEADER, HEADER_SIZE, MAGIC, MAX_KEY_LEN, OP_GET,
                          OP_PING, OP_PUT, VERSION, encode_error, encode_response, namespace_bytes)

if TYPE_CHECKING:
    from kvstored.engine import Entry, Reservation, Store

log = logging.getLogger("kvstored.tcp")

HEADER_BUFFER = 256 << 10  # per-connection buffer for headers (and small payload tails)
DISCARD_LIMIT = 1 << 30  # payloads of rejected puts up to this size are skipped, not fatal
_PRUNE_INTERVAL = 0.002  # how often to release references while sends are queued


class DataServer:
    """Owns the listening socket and per-server state shared by connections."""

    def __init__(self, store: "Store", *, max_connections: int, max_inflight_bytes: int,
                 tcp_congestion: str = ""):
        self.store = store
        self.max_connections = max_connections
        self.max_inflight_bytes = max_inflight_bytes
        self.tcp_congestion = tcp_congestion
        self.connections: set[DataConnection] = set()
        self.scratch = memoryview(bytearray(1 << 20))  # sink for skipped payloads
        self.server: asyncio.base_events.Server | None = None
        self.counters = collections.Counter()

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: DataConnection(self), host, port,
                                               reuse_address=True, backlog=1024)
        return self.server.sockets[0].getsockname()[1]

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()

    async def drain(self, timeout: float) -> None:
        """Wait (bounded) for queued responses to leave, then close every connection."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline and any(c.busy() for c in self.connections):
            await asyncio.sleep(0.01)
        for c in list(self.connections):
            c.close()


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
        self.reading_paused = False
        self.write_paused = False

    # ------------------------------------------------------------ lifecycle
    def connection_made(self, transport):
        self.transport = transport
        srv = self.server
        if len(srv.connections) >= srv.max_connections:
            srv.counters["rejected_connections"] += 1
            transport.write(encode_error(OP_PING, 0, errors.Unavailable.code,
                                         f"too many connections (max {srv.max_connections})"))
            transport.close()
            self.closed = True
            return
        srv.connections.add(self)
        srv.counters["connections_total"] += 1
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if srv.tcp_congestion:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, srv.tcp_congestion.encode())
        # pause reading once this many response bytes are queued (per-connection back-pressure)
        transport.set_write_buffer_limits(high=srv.max_inflight_bytes, low=srv.max_inflight_bytes // 2)

    def connection_lost(self, exc):
        self.closed = True
        self.server.connections.discard(self)
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
        return bool(self.pending or self.res is not None or self.waiting is not None)

    def pause_writing(self):
        self.write_paused = True
        self._pause_reading()

    def resume_writing(self):
        self.write_paused = False
        self._prune()
        if self.waiting is None:
            self._resume_reading()

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
        if self.hend > HEADER_BUFFER - 65536:
            # only an incomplete header (< 232 bytes) is ever left here: cheap to move
            n = self.hend - self.hstart
            self.hbuf[:n] = self.hbuf[self.hstart:self.hend]
            self.hstart, self.hend = 0, n
        return self.hview[self.hend:]

    def buffer_updated(self, nbytes):
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
        while not self.closed and self.target is None and self.waiting is None:
            avail = self.hend - self.hstart
            if avail < HEADER_SIZE:
                break
            (magic, version, op, flags, rid, _status, ns_len, key_len, _aux, plen,
             csum) = HEADER.unpack_from(hb, self.hstart)
            if magic != MAGIC:
                return self._fatal(rid if version == VERSION else 0, "bad frame magic")
            if version != VERSION:
                return self._fatal(rid, f"unsupported wire version {version} (this daemon speaks {VERSION})")
            head = HEADER_SIZE + ns_len + key_len
            if avail < head:
                break
            p = self.hstart + HEADER_SIZE
            ns = bytes(hb[p:p + ns_len])
            key = bytes(hb[p + ns_len:p + head - HEADER_SIZE])
            self.hstart += head
            self.req_id = rid
            if op == OP_PUT:
                self._begin_put(rid, ns, key, plen, csum, bool(flags & FLAG_OVERWRITE))
            elif op == OP_GET:
                if plen:
                    return self._fatal(rid, "a get request carries no payload")
                self._get(rid, ns, key)
            elif op == OP_PING:
                if plen:
                    return self._fatal(rid, "a ping request carries no payload")
                self._send(encode_response(OP_PING, rid))
            else:
                self._reject(op, rid, plen, errors.InvalidArgument(f"unknown op {op}"))
        if self.hstart == self.hend:
            self.hstart = self.hend = 0

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
        try:
            res = await self.store.reserve_wait(ns, key, plen, csum, overwrite)
        except errors.KVStoreError as e:
            self.waiting = None
            self._reject(OP_PUT, rid, plen, e)
        else:
            self.waiting = None
            if self.closed:
                if res is not None:
                    self.store.abort(res)
                return
            self._start_payload(rid, res, plen)
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
        log.warning("closing a data connection whose put stalled past the reservation timeout")
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
        frame = encode_error(op, rid, err.code, err.message)
        if plen == 0:
            self._send(frame)
            return
        self.after_skip = frame
        self._skip(plen)

    def _error(self, op: int, rid: int, err: errors.KVStoreError) -> None:
        self.server.counters["errors_" + err.name] += 1
        self._send(encode_error(op, rid, err.code, err.message))

    def _fatal(self, rid: int, message: str) -> None:
        self.server.counters["errors_ProtocolError"] += 1
        log.info("closing data connection: %s", message)
        self._send(encode_error(0, rid, errors.ProtocolError.code, message))
        self._flush()
        self.close()

    # ------------------------------------------------------------------ get
    def _get(self, rid: int, ns: bytes, key: bytes) -> None:
        try:
            _check_names(ns, key)
            e = self.store.acquire(ns, key)
        except errors.KVStoreError as err:
            return self._error(OP_GET, rid, err)
        self.out.append(encode_response(OP_GET, rid, 0, e.size, e.checksum))
        self.out.append(self.store.view(e))
        self.sent += HEADER_SIZE + e.size
        self.pending.append((self.sent, e))

    def _send(self, frame: bytes) -> None:
        if not self.closed:
            self.out.append(frame)
            self.sent += len(frame)

    def _flush(self) -> None:
        out, self.out = self.out, []
        if not self.closed:
            self.transport.writelines(out)
            if self.pending:
                self._prune()

    def _prune(self) -> None:
        """Release read references whose bytes have left uvloop's buffer."""
        if self.prune_timer is not None:
            self.prune_timer.cancel()
            self.prune_timer = None
        if self.closed:
            return
        drained = self.sent - self.transport.get_write_buffer_size()
        pending = self.pending
        while pending and pending[0][0] <= drained:
            self.store.release(pending.popleft()[1])
        if pending:
            self.prune_timer = asyncio.get_running_loop().call_later(_PRUNE_INTERVAL, self._prune)


class _Sink:
    """A receive target that swallows any number of bytes into a fixed scratch buffer."""

    __slots__ = ("scratch", "size")

    def __init__(self, scratch: memoryview, size: int):
        self.scratch = scratch
        self.size = size

    def __getitem__(self, s: slice) -> memoryview:
        left = self.size - (s.start or 0)
        return self.scratch[:min(left, len(self.scratch))]


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
