"""asyncio client: many requests in flight on one pipelined data connection.

Responses are matched to requests by id and may arrive in any order. A get's
payload is received straight into the caller's buffer (``get_into``) or a new
bytearray; a put sends the caller's buffer without copying.
"""
from __future__ import annotations

import asyncio
import itertools
import socket
from typing import Sequence

import grpc

from . import errors
from ._common import (CONNECT_TIMEOUT, DEFAULT_NAMESPACE, Namespaced, ServerInfo, TLSConfig,
                      call_metadata, control_channel, data_endpoint, grpc_error,
                      is_unreachable, ride_out_seconds, split_address, tls_diagnosis, value_parts, writable_view)
from .control import AsyncControl, epoch_metadata
from .recvpool import DEFAULT_POOL_BYTES, ReceivePool
from .v1 import control_pb2 as pb
from .v1 import control_pb2_grpc as pb_grpc
from .wire import (FLAG_NOT_VERIFIED_OK, FLAG_OVERWRITE, FLAG_RESPONSE, HEADER, HEADER_SIZE, MAGIC, OP_AUTH, OP_GET, OP_PING,
                   OP_PUT, VERSION, FrameReader, check_response, checksum, checksum_parts, encode_auth,
                   encode_request, key_bytes)

_BUFFER = 256 << 10
_RETRY_BACKOFF = (0.05, 0.1, 0.2, 0.5, 1.0)
_NEVER = float("inf")
# While answers carry large payloads (a get's object of _LARGE bytes or more), a read
# between payloads takes at most _WINDOW bytes: the next header and a little of its
# payload, the rest then lands in the caller's buffer directly. Read whole into the
# 256 KiB frame buffer, the answers of one wake-up (4 x 64 KiB at concurrency 8) were
# copied twice, kernel -> frame buffer -> destination: 47-52 -> 35-40 us of client CPU
# per 64 KiB get for ~2 reads per answer instead of ~0.5 (benchmarks/RESULTS.md, H4).
_WINDOW = 4096
_LARGE = 16 << 10
_unpack_header = HEADER.unpack_from


class _Waiter:
    __slots__ = ("fut", "dest", "rid", "op", "abandoned", "deadline", "timeout")

    def __init__(self, fut: asyncio.Future, dest: memoryview | None, rid: int, op: int):
        self.fut = fut
        self.dest = dest
        self.rid = rid
        self.op = op  # the request's: an OK answer of another op is a ProtocolError
        self.abandoned = False  # caller gave up (timeout/cancel): its buffer must not be touched
        self.deadline = _NEVER  # loop time at which the call times out (see _DataProtocol.track)
        self.timeout = 0.0


class _DataProtocol(asyncio.BufferedProtocol):
    def __init__(self, verify: bool, pool: ReceivePool, loop: asyncio.AbstractEventLoop, max_payload: int):
        # the connection's loop, kept: asyncio.get_running_loop() costs a getpid() syscall
        # per call (its fork check), three per request on the hot path
        self.loop = loop
        self.verify = verify
        self.pool = pool  # get()'s receive buffers (kvstore.recvpool)
        self.max_payload = max_payload  # the daemon's max_value_size: no GET answer claims more
        self.reader = FrameReader(_BUFFER)  # the same frame reader as the daemon's
        self.waiters: dict[int, _Waiter] = {}
        # the answer whose payload is arriving: finish(*fargs) runs once it is complete
        # (fargs[0] is its waiter, already out of ``waiters``)
        self.finish = None
        self.fargs: tuple = ()
        self.owner: _Waiter | None = None  # whose buffer the payload goes into, if a caller's
        self.window = False  # the last get's answer was large: read headers _WINDOW at a time
        self.transport: asyncio.Transport | None = None
        self.lost: Exception | None = None
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.rid = itertools.count(1)
        self._out: list = []  # frames of this loop iteration's requests, sent by _flush
        # one timer for the connection, at the earliest deadline of the calls in flight (a
        # timer per call cost ~3 us of call_at + cancel per request at concurrency 8)
        self.expiry: asyncio.TimerHandle | None = None
        self.expiry_at = _NEVER

    def send(self, bufs: list, busy: bool) -> None:
        """Write ``bufs`` now when nothing else is in flight (a lone request waits for
        nothing); else send them with every other request made in this loop iteration:
        one ``writev`` for the gets of 8 tasks instead of 8 syscalls (each of which also
        runs the loopback receive path in this process)."""
        if not busy and not self._out:
            self.transport.writelines(bufs)
            return
        if not self._out:
            self.loop.call_soon(self._flush)
        self._out.extend(bufs)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if out and self.lost is None and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(out)

    def call(self, op: int, ns: bytes, key: bytes, dest: memoryview | None, deadline: float,
             timeout: float, n: int = 0, csum: int = 0, flags: int = 0, parts: Sequence = ()) -> _Waiter:
        """Send one request (``parts``: a put's payload) and return its waiter, timed out at
        ``deadline``: AsyncClient._one's hot path, one call where _requests takes several."""
        rid = next(self.rid)
        w = _Waiter(self.loop.create_future(), dest, rid, op)
        busy = bool(self.waiters)
        self.waiters[rid] = w
        frame = encode_request(op, rid, ns, key, n, csum, flags)
        self.send([frame, *parts] if parts else [frame], busy)
        w.deadline, w.timeout = deadline, timeout
        if deadline < self.expiry_at:
            self._arm(deadline)
        return w

    def end(self, w: _Waiter) -> None:
        """The caller is done with ``w`` (answered, failed, timed out or cancelled): a late
        answer is then simply dropped, and never written into its buffer."""
        self.waiters.pop(w.rid, None)
        w.abandoned = True
        f = w.fut
        if not f.done():
            f.cancel()
        elif not f.cancelled():
            f.exception()  # retrieved: no "never retrieved" warnings

    def track(self, waiters: list[_Waiter], deadline: float, timeout: float) -> None:
        """Time the call of ``waiters`` out at ``deadline`` (loop time)."""
        for w in waiters:
            w.deadline = deadline
            w.timeout = timeout
        if deadline < self.expiry_at:
            self._arm(deadline)

    def _arm(self, when: float) -> None:
        if self.expiry is not None:
            self.expiry.cancel()
        self.expiry_at = when
        self.expiry = self.loop.call_at(when, self._expire_due)

    def _expire_due(self) -> None:
        """Fail the calls past their deadline; arm the timer for the next deadline."""
        self.expiry, self.expiry_at = None, _NEVER
        # the loop's timers have millisecond resolution and may fire that much early
        now = self.loop.time() + 0.001
        due, nxt = [], _NEVER
        ws = list(self.waiters.values())
        if self.finish is not None:
            ws.append(self.fargs[0])  # its payload is still arriving: it may time out too
        for w in ws:
            if w is None or w.abandoned or w.fut.done():
                continue
            if w.deadline <= now:
                due.append(w)
            elif w.deadline < nxt:
                nxt = w.deadline
        for w in due:
            _expire(w)
        if nxt < _NEVER:
            self._arm(nxt)

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        self.lost = errors.Unavailable(f"data connection lost: {exc or 'closed by kvstored'}")
        for w in self.waiters.values():
            if not w.fut.done():
                w.fut.set_exception(self.lost)
        self.waiters.clear()
        if self.finish is not None:  # an answer cut off in its payload
            w = self.fargs[0]
            self.finish, self.fargs = None, ()
            if w is not None and not w.fut.done():
                w.fut.set_exception(self.lost)
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry, self.expiry_at = None, _NEVER
        self.can_write.set()

    def pause_writing(self):
        self.can_write.clear()

    def resume_writing(self):
        self.can_write.set()

    def get_buffer(self, sizehint):
        if self.owner is not None and self.owner.abandoned:
            # the caller timed out or was cancelled: never write into its buffer again
            self.reader.divert()
            self.owner = None
        if self.window and self.reader.target is None:
            return self.reader.buffer()[:_WINDOW]
        return self.reader.buffer()

    def buffer_updated(self, nbytes):
        reader = self.reader
        if reader.target is None:
            reader.end += nbytes  # FrameReader.filled without a payload target, inlined
        elif reader.filled(nbytes):
            finish, args = self.finish, self.fargs
            self.finish, self.fargs, self.owner = None, (), None
            finish(*args)
        else:
            return  # the payload is still arriving
        self._parse()

    def _fail(self, message: str | errors.KVStoreError, spare_others: bool = False) -> None:
        """Drop the connection: every call waiting on it fails with ``message``, or with
        ``spare_others`` (the failing answer's own call has its error already) with
        Unavailable, which retries them on a fresh connection (AsyncClient._requests)."""
        err = errors.ProtocolError(message) if isinstance(message, str) else message
        # the stream is out of step: never used again, even before connection_lost runs
        # (the callers woken below may send their next request first)
        if self.lost is None:
            self.lost = errors.Unavailable(f"data connection dropped: {err.message}")
        if spare_others:
            err = self.lost
        for w in self.waiters.values():
            if not w.fut.done():
                w.fut.set_exception(err)
        self.waiters.clear()
        self.transport.abort()

    def _receive(self, dest: memoryview, n: int, finish, args: tuple, owner: "_Waiter | None" = None) -> None:
        if self.reader.receive_into(dest, n):
            finish(*args)
        else:
            self.finish, self.fargs, self.owner = finish, args, owner

    def _parse(self) -> None:
        # FrameReader.next inlined, without its Header, namespace and key objects: a few
        # microseconds per answer on the path of many small concurrent requests
        reader = self.reader
        buf = reader.buf
        waiters = self.waiters
        while reader.target is None:
            start, end = reader.start, reader.end
            if end - start < HEADER_SIZE:
                break
            t = _unpack_header(buf, start)
            if t[0] != MAGIC or t[1] != VERSION or not t[3] & FLAG_RESPONSE:
                return self._fail("malformed response frame from kvstored")
            # magic, version, op, flags, req_id, status, ns_len, key_len, aux, length, checksum
            op, rid, status, plen = t[2], t[4], t[5], t[9]
            w = waiters.pop(rid, None)
            try:  # before anything is allocated or received for it (as every SDK reader)
                check_response(op, rid, status, t[6], t[7], plen, self.max_payload,
                               None if w is None else w.op)
            except errors.ProtocolError as err:
                # the call it claims to answer gets the error; the others on this
                # connection, innocent, are retried elsewhere (unknown id: all fail)
                self._resolve_exc(w, err)
                return self._fail(err, spare_others=w is not None)
            e = start + HEADER_SIZE  # an answer names no key (checked)
            if e == end:
                reader.start = reader.end = 0
            else:
                reader.start = e
            if status:
                msg = bytearray(plen)
                self._receive(memoryview(msg), plen, self._error, (w, status, msg, rid))
            elif op == OP_GET:
                self.window = plen >= _LARGE
                dest = None
                if w is not None and not w.abandoned and w.dest is not None:
                    if plen <= len(w.dest):
                        dest = w.dest[:plen]
                    else:
                        self._resolve_exc(w, errors.InvalidArgument(
                            f"object of {plen} bytes does not fit the {len(w.dest)}-byte buffer"))
                        w = None
                if dest is not None:
                    self._receive(dest, plen, self._got, (w, dest, t[10], True), w)
                else:
                    buf_ = memoryview(self.pool.take(plen))
                    self._receive(buf_, plen, self._got, (w, buf_, t[10], False))
            elif op == OP_PUT:
                self._resolve(w, t[8] != 1)  # aux=1: deduplicated
            else:
                self._resolve(w, True)

    def _got(self, w: _Waiter | None, buf: memoryview, csum: int, into: bool) -> None:
        if w is None or w.abandoned:
            return
        if self.verify and checksum(buf) != csum:
            return self._resolve_exc(w, errors.ChecksumMismatch(
                "object bytes do not match their checksum after transfer"))
        self._resolve(w, len(buf) if into else buf.obj)

    def _error(self, w: _Waiter | None, status: int, msg: bytearray, rid: int) -> None:
        err = errors.error_for_code(status, msg.decode("utf-8", "replace"), rid)
        if w is None:
            if rid == 0 or isinstance(err, errors.ProtocolError):  # connection-level: fail everything
                return self._fail(err)
            return
        self._resolve_exc(w, err)

    @staticmethod
    def _resolve(w: _Waiter | None, value) -> None:
        if w is not None and not w.fut.done():
            w.fut.set_result(value)

    @staticmethod
    def _resolve_exc(w: _Waiter | None, exc: Exception) -> None:
        if w is not None and not w.fut.done():
            w.fut.set_exception(exc)


def _prepare_put(key, value, limit: int) -> tuple:
    """(key bytes, value parts, size, checksum) of one put; a value over ``limit`` (the
    daemon's max_value_size) is refused here."""
    parts, n = value_parts(value)
    if n > limit:
        raise errors.InvalidArgument(f"value of {n} bytes exceeds the daemon's max_value_size {limit}")
    return key_bytes(key), parts, n, checksum_parts(parts)


def _expire(w: _Waiter) -> None:
    w.abandoned = True
    if not w.fut.done():
        w.fut.set_exception(errors.Timeout(f"no answer from kvstored within {w.timeout}s"))


class AsyncClient(AsyncControl, Namespaced):
    """An asyncio kvstored client; safe to share between tasks of one event loop.

    Control calls are kvstore.control's table, the same as Client's (awaited here)."""

    def __init__(self, address: str = "127.0.0.1:7070", *, namespace: str = DEFAULT_NAMESPACE,
                 timeout: float = 30.0, verify_checksums: bool = True, data_address: str | None = None,
                 tcp_congestion: str = "", tls: TLSConfig | None = None, token: str | None = None,
                 ride_out_restarts: bool | float = False, connect_timeout: float = CONNECT_TIMEOUT,
                 get_pool_bytes: int = DEFAULT_POOL_BYTES):
        """Arguments as for :class:`kvstore.Client` (``ride_out_restarts``: an unreachable
        daemon fails at once by default; True or seconds keep retrying it; ``get_pool_bytes``:
        the receive pool behind ``get()``, whose results follow kvstore.recvpool's rule)."""
        super().__init__(namespace)
        self._pool = ReceivePool(get_pool_bytes)
        self.address = address
        self.timeout = timeout
        self.verify_checksums = verify_checksums
        self.tcp_congestion = tcp_congestion
        self.tls = tls
        self._token = token or None
        self._metadata = call_metadata(self._token)
        self._ssl = tls.ssl_context() if tls is not None else None
        if not connect_timeout > 0:
            raise errors.InvalidArgument(f"connect_timeout must be positive, not {connect_timeout!r}")
        self.connect_timeout = connect_timeout
        self.ride_out_restarts = ride_out_restarts
        self._ride_out = ride_out_seconds(ride_out_restarts, timeout)
        self._data_address = data_address
        self._channel: grpc.aio.Channel | None = None
        self._stub = None
        self._info: ServerInfo | None = None
        self._proto: _DataProtocol | None = None
        self._connecting: asyncio.Lock | None = None
        self._closed = False
        self.epoch = 0  # cluster member-list epoch of control calls (as Client's; 0 = none)

    async def __aenter__(self):
        await self.connect()
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def connect(self) -> None:
        await self._data()

    async def close(self) -> None:
        self._closed = True
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()
        if self._channel is not None:
            await self._channel.close()

    # ------------------------------------------------------------ plumbing
    def _control(self):
        if self._channel is None:
            self._channel = control_channel(self.address, self.tls, aio=True,
                                            connect_timeout=self.connect_timeout)
            self._stub = pb_grpc.KVStoreStub(self._channel)
        return self._stub

    async def _call(self, method: str, request, timeout: float | None = None, epoch: int | None = None):
        """One control call, failing fast; riding out a restart as ``ride_out_restarts``
        allows (see Client._call)."""
        loop = asyncio.get_running_loop()
        timeout = timeout or self.timeout
        deadline = loop.time() + timeout
        ride_until = loop.time() + min(self._ride_out, timeout)
        diagnosed = False
        for attempt in itertools.count():
            tried = loop.time()
            try:
                return await getattr(self._control(), method)(
                    request, timeout=max(deadline - loop.time(), 0.001), wait_for_ready=False,
                    metadata=epoch_metadata(self._metadata, self.epoch if epoch is None else epoch))
            except grpc.RpcError as e:
                err = grpc_error(e, self.address)
            if not is_unreachable(err):
                raise err from None
            if not diagnosed and loop.time() - tried < 0.9 * self.connect_timeout:  # see Client._call
                diagnosed = True
                diag = await self._diagnose(*split_address(self.address))
                if diag is not None:
                    raise diag from None
            left = ride_until - loop.time()
            if left <= 0 or self._closed:
                raise err from None
            await asyncio.sleep(min(_RETRY_BACKOFF[min(attempt, len(_RETRY_BACKOFF) - 1)], left))

    async def _diagnose(self, host: str, port: int) -> errors.KVStoreError | None:
        return await asyncio.to_thread(tls_diagnosis, host, port, self.tls,
                                       min(self.timeout, self.connect_timeout, 3.0))

    async def info(self, refresh: bool = False) -> ServerInfo:
        if self._info is None or refresh:
            self._info = ServerInfo.from_pb(await self._call("Info", pb.InfoRequest()))
        return self._info

    async def _data(self) -> _DataProtocol:
        p = self._proto
        if p is not None and p.lost is None:
            return p
        if self._closed:
            raise errors.Unavailable("client is closed")
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            p = self._proto
            if p is not None and p.lost is None:
                return p
            if self._data_address:
                host, _, port = self._data_address.rpartition(":")
                info = await self.info()
            else:
                info = await self.info(refresh=True)
                host, port = data_endpoint(info, self.address)
            loop = asyncio.get_running_loop()
            tls = {} if self._ssl is None else {
                "ssl": self._ssl, "server_hostname": self.tls.server_name or host}
            try:
                _, p = await asyncio.wait_for(
                    loop.create_connection(lambda: _DataProtocol(self.verify_checksums, self._pool, loop,
                                                                 info.max_value_size),
                                           host, int(port), **tls),
                    self.timeout if tls else min(self.timeout, self.connect_timeout))  # TLS: + handshake
            except (OSError, asyncio.TimeoutError) as e:
                # a dial that timed out made no connection: nothing for a TLS diagnosis to see
                diag = None if isinstance(e, TimeoutError) else await self._diagnose(host, int(port))
                if diag is not None:
                    raise diag from None
                raise errors.Unavailable(f"cannot connect to kvstored data path {host}:{port}: {e}") from None
            sock = p.transport.get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tcp_congestion:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, self.tcp_congestion.encode())
            p.transport.set_write_buffer_limits(high=64 << 20)
            await self._setup(p, host, int(port))
            self._proto = p
            return p

    async def _setup(self, p: _DataProtocol, host: str, port: int) -> None:
        """First exchange: AUTH with the token, or a PING (see DataConnection.setup)."""
        loop = asyncio.get_running_loop()
        rid = next(p.rid)
        w = _Waiter(loop.create_future(), None, rid, OP_AUTH if self._token else OP_PING)
        p.waiters[rid] = w
        p.transport.write(encode_auth(rid, self._token) if self._token
                          else encode_request(OP_PING, rid, b"", b""))
        try:
            await asyncio.wait_for(w.fut, self.timeout)
        except errors.KVStoreError as e:
            p.transport.close()
            if isinstance(e, errors.Unavailable) and p.lost is not None:
                diag = await self._diagnose(host, port)  # closed during set-up: TLS refusal?
                if diag is not None:
                    raise diag from None
            raise
        except asyncio.TimeoutError:
            p.transport.close()
            raise errors.Timeout(f"no answer from kvstored within {self.timeout}s") from None

    async def _requests(self, build, deadline: float | None = None) -> list:
        """Send frames made by ``build(proto) -> (buffers, waiters)``, await every answer.

        On a lost connection reconnects once, and with ``ride_out_restarts`` keeps
        retrying for that long: every data-path request is idempotent. ``deadline``: the
        call's, when _one began it on a connection that was then lost.
        """
        p = self._proto
        loop = p.loop if p is not None and p.lost is None else asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self.timeout
        ride_until = deadline - self.timeout + self._ride_out
        for attempt in itertools.count():
            p = self._proto
            cached = p is not None and p.lost is None
            try:
                if p is None or p.lost is not None:
                    p = await self._data()
                if not p.can_write.is_set():
                    await p.can_write.wait()
                    if p.lost is not None:
                        raise p.lost
                busy = bool(p.waiters)
                bufs, waiters = build(p)
                p.send(bufs, busy)
                p.track(waiters, deadline, self.timeout)  # the connection's timer expires them
                try:
                    if len(waiters) == 1:
                        return [await waiters[0].fut]
                    return await asyncio.gather(*(w.fut for w in waiters))
                finally:
                    for w in waiters:
                        p.end(w)
            except (errors.Timeout, errors.NotVerified):  # NotVerified: an answer, retried by the caller
                raise
            except errors.Unavailable as e:
                if self._closed or loop.time() >= deadline:
                    raise errors.Unavailable(f"kvstored data path unreachable: {e.message}") from None
                if cached and attempt == 0:
                    continue  # the kept connection may predate a restart: one fresh one, now
                left = ride_until - loop.time()
                if left <= 0:
                    raise errors.Unavailable(f"kvstored data path unreachable: {e.message}") from None
                await asyncio.sleep(min(_RETRY_BACKOFF[min(attempt, len(_RETRY_BACKOFF) - 1)], left))

    # ------------------------------------------------------------ data path
    # put / get / get_into are the hot path of many small concurrent requests (every
    # microsecond of Python is per op): they go through _one, which sends on the kept
    # connection directly; batches, the first call and reconnects take _requests
    async def put(self, key, value, *, namespace: str | None = None, overwrite: bool = False) -> bool:
        info = self._info
        if info is None:
            return (await self.batch_put([(key, value)], namespace=namespace, overwrite=overwrite))[0]
        ns = self._nsb(namespace)
        k, parts, n, cs = _prepare_put(key, value, info.max_value_size)
        return await self._one(OP_PUT, ns, k, None, n, cs, FLAG_OVERWRITE if overwrite else 0, parts)

    async def batch_put(self, items, *, namespace: str | None = None, overwrite: bool = False) -> list[bool]:
        ns = self._nsb(namespace)
        limit = (self._info or await self.info()).max_value_size
        # a value: one buffer, or several stored as their concatenation
        prepared = [_prepare_put(k, v, limit) for k, v in items]
        return await self._puts(ns, prepared, FLAG_OVERWRITE if overwrite else 0)

    async def _puts(self, ns: bytes, prepared: list, flags: int, deadline: float | None = None) -> list[bool]:
        def build(p: _DataProtocol):
            loop = p.loop
            bufs, waiters = [], []
            for k, parts, n, cs in prepared:
                rid = next(p.rid)
                w = _Waiter(loop.create_future(), None, rid, OP_PUT)
                p.waiters[rid] = w
                waiters.append(w)
                bufs.append(encode_request(OP_PUT, rid, ns, k, n, cs, flags))
                bufs += parts
            return bufs, waiters

        return await self._requests(build, deadline)

    async def get(self, key, *, namespace: str | None = None) -> bytearray:
        return await self._one(OP_GET, self._nsb(namespace), key_bytes(key), None,
                               flags=FLAG_NOT_VERIFIED_OK)

    async def get_into(self, key, buffer, *, namespace: str | None = None) -> int:
        return await self._one(OP_GET, self._nsb(namespace), key_bytes(key), writable_view(buffer),
                               flags=FLAG_NOT_VERIFIED_OK)

    async def _one(self, op: int, ns: bytes, key: bytes, dest: memoryview | None, n: int = 0,
                   csum: int = 0, flags: int = 0, parts: Sequence = ()):
        """One get (into ``dest`` if given) or put (``parts``) on the kept connection; with
        none yet, one lost or one pushing back, the way of batches (_requests)."""
        p = self._proto
        deadline = None
        if p is not None and p.lost is None and p.can_write.is_set():
            deadline = p.loop.time() + self.timeout
            w = p.call(op, ns, key, dest, deadline, self.timeout, n, csum, flags, parts)
            try:
                return await w.fut
            except errors.NotVerified:  # an answer (held back, retry shortly), not a lost connection
                raise
            except errors.Unavailable:
                pass  # the kept connection is gone (a restart?): on with a fresh one
            finally:
                p.end(w)
        if op == OP_PUT:
            return (await self._puts(ns, [(key, parts, n, csum)], flags, deadline))[0]
        return (await self._gets(ns, [key], [dest], deadline))[0]

    async def batch_get(self, keys: Sequence, *, namespace: str | None = None) -> list[bytearray]:
        ks = self._keys(keys)
        return await self._gets(self._nsb(namespace), ks, [None] * len(ks))

    async def batch_get_into(self, keys: Sequence, buffers: Sequence, *,
                             namespace: str | None = None) -> list[int]:
        ks = self._keys(keys)
        if len(ks) != len(buffers):
            raise errors.InvalidArgument(f"{len(ks)} keys but {len(buffers)} buffers")
        return await self._gets(self._nsb(namespace), ks, [writable_view(b) for b in buffers])

    async def _gets(self, ns: bytes, keys: list[bytes], dests: list, deadline: float | None = None) -> list:
        def build(p: _DataProtocol):
            loop = p.loop
            frames, waiters = [], []
            for k, d in zip(keys, dests):
                rid = next(p.rid)
                w = _Waiter(loop.create_future(), d, rid, OP_GET)
                p.waiters[rid] = w
                waiters.append(w)
                frames.append(encode_request(OP_GET, rid, ns, k, flags=FLAG_NOT_VERIFIED_OK))
            return [b"".join(frames)], waiters

        return await self._requests(build, deadline)

    async def ping(self) -> float:
        loop = asyncio.get_running_loop()
        t = loop.time()

        def build(p: _DataProtocol):
            rid = next(p.rid)
            w = _Waiter(loop.create_future(), None, rid, OP_PING)
            p.waiters[rid] = w
            return [encode_request(OP_PING, rid, b"", b"")], [w]

        await self._requests(build)
        return loop.time() - t
