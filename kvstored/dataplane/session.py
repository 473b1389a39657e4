"""The data session: the data-plane protocol of one connection, with no I/O.

A transport driver (connection.py drives TCP, TLS and the shm Unix socket)
feeds it events and carries out the actions it asks for.

Events (driver -> session): ``received(n)`` after receiving into
``receive_buffer()`` (or ``feed(data)``: bytes, for tests); ``written(unsent)``
(the transport took ``out``, ``unsent`` bytes still wait in its buffer);
``write_blocked()`` / ``write_unblocked(unsent)``; ``call_done(call, result,
error)``; ``connection_lost()`` (returns the calls to cancel); and a stalled
put's reservation expiring (the store's reaper; ``wake()`` tells the driver).

Actions (session -> driver): receive into ``receive_buffer()`` (while a put's
payload arrives, the reserved arena slot itself: zero copy); send
``take_output()`` in order (a get's payload is an arena view, its read
reference held until ``written`` says the bytes left); run ``take_calls()``
(a put waiting for space, a get loading from NVMe); read or not (``reading``,
back-pressure); ``finish``: "close" after sending, or "abort".

Requests are dispatched through an ``OpTable`` (plane.py: op -> handler, the
scope auth requires, whether the epoch gate applies, what the length field
means); the core ops are in ops.py (``CORE_OPS``), and a transport with more ops registers
them on a copy. Auth and the epoch are checked here, for every op, through
``AuthGuard`` and ``EpochGate`` (policy.py); per-connection bounds are the
session's ``ConnectionBudget``.

The Store is called directly for what is synchronous and in memory (reserve,
commit, acquire, release); what awaits (``reserve_wait``, ``acquire_async``)
goes out as a ``Call``.
"""
from __future__ import annotations

import collections
import logging
from bisect import bisect_left as _bisect_left
from time import perf_counter as _now
from typing import TYPE_CHECKING, Any, Callable

from kvstore import errors
from kvstore.wire import (HEADER_SIZE, MAX_KEY_LEN, OP_GET, OP_PUT, OPS, FrameError, FrameReader,
                          Header, encode_error, encode_response)
from kvstore.wire import checksum as payload_checksum

from kvstored.engine.store import NotResident, checksum_mismatch
from kvstored.latency import BUCKETS as _BUCKETS

# the op table and what sessions share live in plane.py (split for issue 14); they are
# re-exported here, where transports and tests have always imported them from
from .plane import (_VALID_NAMESPACES, BODY, EMPTY, SIZE, Call, Deliver, Handler, Op, OpTable,
                    Plane, _check_names)
from .policy import AuthGuard, ConnectionBudget

__all__ = ["DataSession", "Plane", "OpTable", "Op", "Call", "Handler", "Deliver", "BODY", "EMPTY",
           "SIZE", "HEADER_BUFFER", "DISCARD_LIMIT", "FAIR_FRAMES", "_check_names"]

try:  # FrameReader.next in C (native/frame.c): a tenth of a small put's bytecodes
    from kvstored._frame import next_frame as _next_frame
except ImportError:  # not built: the parser in Python
    def _next_frame(reader: FrameReader, header_type: type):
        return reader.next()
try:  # a run of whole buffered puts stored and answered in one call (native/frame.c)
    from kvstored._frame import put_run as _put_run
except ImportError:  # not built: each put takes the Python path
    _put_run = None

if TYPE_CHECKING:
    from kvstored.engine import Entry, Reservation

log = logging.getLogger("kvstored.tcp")  # the data plane's log lines keep their logger name

HEADER_BUFFER = 256 << 10  # per-connection buffer for headers (and small payload tails)
DISCARD_LIMIT = 1 << 30  # payloads of rejected puts up to this size are skipped, not fatal
# requests parsed in one go before the driver lets other connections be served
# (``yield_stop``): a flood of small requests (8192 PINGs per 256 KiB read, and libuv
# reads a ready socket up to 32 times per loop iteration) kept a good client waiting ~1 s
FAIR_FRAMES = 1024
# After a put of LARGE_PAYLOAD bytes or more, a read that is not into a payload takes at
# most HEADER_WINDOW bytes: enough for the next header, its names and a little more, so the
# next large payload lands in its slot from the socket rather than in the header buffer
# first (that copy into the slot was 25 % of the daemon's CPU for 256 KiB puts at c=8; the
# kernel's copy then writes the cold slot instead: 4-9 % less daemon CPU per 1 MiB put,
# benchmarks/RESULTS.md, H6). Below it reads stay whole: a 64 KiB put pays less for the
# copy than for a second read (H4's section and H6's).
LARGE_PAYLOAD = 128 << 10
HEADER_WINDOW = 4 << 10
# Below it, a read ends where whole frames of the last put's length would (``frame``): the
# blocks of a stream are mostly one size, so a full read holds whole puts, which the C run
# (put_run) stores, rather than ending in a put cut at the buffer's end, which took the
# Python path (reserve, receive the rest into the slot, commit: ~900 bytecodes more) and a
# small read of its tail (64 KiB puts at c=8: one put of four, each 256 KiB read)

class DataSession:
    def __init__(self, plane: Plane, peer: str = "", *, ops: OpTable | None = None,
                 budget: ConnectionBudget | None = None, burst: int | None = None,
                 wake: Callable[[], None] | None = None, client: str = ""):
        self.plane = plane
        self.store = plane.store
        # hot-path shortcuts, taken once per connection rather than looked up per request
        self.clock = plane.store.clock
        self.stall = plane.limits.put_stall_timeout
        self.clients = plane.clients
        self.ops = plane.ops if ops is None else ops
        self.gate = plane.gate
        self.guard = AuthGuard(plane.auth) if plane.auth is not None else None
        self.counters = plane.counters
        self.latency, self.latency_other = plane.latency, plane.latency_other
        self.put_latency = plane.latency[OP_PUT]
        self.budget = budget or plane.budget(burst)
        self.wake = wake or (lambda: None)
        self.peer = peer  # for log lines
        self.client = client  # whose reservations these are (peer IP, shm uid): ClientSpace key
        self.reader = FrameReader(HEADER_BUFFER)
        self.ext: Any = None  # a transport's per-connection state (shm: leases, reservations)
        # actions
        self.out: list = []
        self.calls: list[Call] = []
        self.reading = True
        self.finish: str | None = None
        # state
        self.closed = False  # no new work: finished, or the connection is gone
        self.lingering = False  # draining: answered all it will, swallowing input
        self.write_paused = False
        self.burst_stop = False  # parsing stopped to let a burst of responses be flushed
        self.yield_stop = False  # parsing stopped after FAIR_FRAMES: the driver yields, then advance()
        self.in_advance = False
        self.sent = 0  # bytes queued for the transport
        # copied response bytes / frames queued since the transport's buffer was last empty
        # (an upper bound of what they cost); over the budget: stop reading until it empties
        self.queued = 0
        self.queued_frames = 0
        self.queue_full = False
        self.put_cap = 0.0  # the store clock's latest commit time for the put being received
        # until then (store clock) a put finding no space is refused at once: this connection
        # just waited put_wait_timeout in vain, so a batch waits once, not once per object
        self.no_wait_until = 0.0
        # a get on this connection carried wire.FLAG_NOT_VERIFIED_OK: its client knows
        # errors.NotVerified (older ones get NotFound for a record held back)
        self.not_verified_ok = False
        self.flushed_at = 0  # self.sent at the last take_output
        self.rx = 0  # bytes received
        self.offered = 0  # size of the buffer receive_buffer handed out last
        self.pending: collections.deque = collections.deque()  # (sent end, entry, t0) of gets
        self.loads = 0  # gets waiting for a promotion from NVMe
        self.waiting: Call | None = None  # a reservation waiting for space: nothing is parsed
        self.res: Reservation | None = None  # the put whose payload is being received
        self.put_rid = 0
        self.on_payload: Callable[[], None] | None = None  # run when the payload target is full
        self.reserved = 0  # bytes of this connection's unfinished reservations
        self.req_id = 0
        self.t_in = 0.0  # when the bytes being parsed arrived (latency start)
        self.put_t0 = 0.0
        self.window = 0  # HEADER_WINDOW after a large put (see there), else 0: no bound
        self.frame = 0  # the last put's frame length (below LARGE_PAYLOAD; see there)
        self.put_done: Callable[[], None] | None = None  # ops.py's put completion, bound once
        self.expired = self.reservation_expired  # a put's on_expire (bound once, not per put)
        self.fast_put = _fast_put_context(self)  # put_run's context, or None: no C path

    # ================================================================ events
    def receive_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next received bytes go (a BufferedProtocol's get_buffer); its size is
        kept in ``offered`` (a read of fewer bytes drained the socket)."""
        if self.lingering:
            return _swallow
        reader = self.reader
        b = reader.buffer()
        if reader.target is None:
            if self.window:
                b = b[:self.window]
            elif self.frame:  # up to whole frames of that length after the first unparsed byte
                held = reader.end - reader.start
                f = self.frame
                want = (len(b) + held) // f * f - held
                if want > 0:
                    b = b[:want]
        self.offered = len(b)
        return b

    def received(self, n: int) -> None:
        self.rx += n
        if self.lingering:  # draining: input after our last response is discarded
            return
        reader = self.reader
        if reader.target is not None:
            res = self.res
            if res is not None:  # a put progresses: it may pause put_stall_timeout again
                d = self.clock() + self.stall
                res.deadline = d if d < self.put_cap else self.put_cap
            got = reader.got = reader.got + n  # FrameReader.filled, inlined (a call per read)
            if got < reader.want:
                return
            reader.target = None
            done, self.on_payload = self.on_payload, None
            if done is not None:
                done()
        else:
            reader.end += n  # FrameReader.filled without a payload target, inlined (hot path)
        self.advance()

    def feed(self, data) -> int:
        """Bytes in, for drivers (and tests) that get bytes rather than lend buffers.
        Returns how many were taken: it stops while the session does not want input."""
        mv = memoryview(data).cast("B")
        done = 0
        for _ in range(len(mv) + 1):  # each round takes at least one byte or stops
            if done == len(mv) or self.closed or not self.reading:
                break
            dst = self.receive_buffer()
            n = min(len(dst), len(mv) - done)
            if n == 0:
                break
            dst[:n] = mv[done:done + n]
            done += n
            self.received(n)
        return done

    def written(self, unsent: int) -> None:
        """The transport holds ``unsent`` bytes not yet given to the kernel: release the read
        references of gets whose bytes have left, and read again if nothing holds us back."""
        drained = self.sent - unsent
        if not unsent:
            self.queued = self.queued_frames = 0
            self.queue_full = False
        pending = self.pending
        if pending and pending[0][0] <= drained:
            hist, now, release = self.latency[OP_GET], _now(), self.store.release
            while pending and pending[0][0] <= drained:
                _, e, t0 = pending.popleft()
                release(e)
                hist.observe(now - t0)  # a get's latency ends when its bytes left for the kernel
        if not self.reading:
            self._unblock()

    def write_blocked(self) -> None:
        self.write_paused = True
        self.reading = False
        if self.res is not None:  # we stop reading its payload: only the put's cap applies
            self.res.deadline = self.put_cap

    def write_unblocked(self, unsent: int) -> None:
        self.write_paused = False
        self.written(unsent)

    def call_done(self, call: Call, result: Any, error: errors.KVStoreError | None) -> None:
        call.then(self, call, result, error)

    def connection_lost(self) -> list[Call]:
        """Give everything back; returns the calls whose tasks the driver should cancel."""
        self.closed = True
        self.reading = False
        cancel = [self.waiting] if self.waiting is not None else []
        if self.res is not None:
            self._drop_reservation(self.res)  # mid-payload disconnect: nothing becomes visible
            self.res = None
        self.reader.abandon()
        self.on_payload = None
        release = self.store.release
        while self.pending:
            release(self.pending.popleft()[1])
        if self.ext is not None:
            self.ext.lost(self)
        return cancel

    # ===================================================== driver's queries
    def take_output(self) -> list:
        out, self.out = self.out, []
        self.flushed_at = self.sent
        return out

    def take_calls(self) -> list[Call]:
        calls, self.calls = self.calls, []
        return calls

    def idle(self) -> bool:
        """No request half done: nothing being received, waited for or loaded."""
        return (not self.reader.receiving and self.res is None and self.waiting is None
                and not self.loads)

    def linger(self) -> None:
        """Draining: every answer is queued; swallow further input until the peer closes."""
        self.lingering = True
        self.reading = True

    def close(self, how: str = "close") -> None:
        """Stop: ``close`` after sending what is queued, ``abort`` at once."""
        if self.finish is None:
            self.finish = how
        self.closed = True
        self.reading = False

    # ============================================================== parsing
    def advance(self) -> None:
        """Handle buffered frames until one blocks: a payload, a put waiting for space, a
        full write buffer, max_pipelined unanswered requests, or a burst to flush."""
        self.burst_stop = False
        if self.closed or self.lingering or self.in_advance or self.yield_stop:
            return
        self.in_advance = True
        reader, ops, budget, pending = self.reader, self.ops, self.budget, self.pending
        guard, plane, next_frame = self.guard, self.plane, _next_frame
        fast, put_run = self.fast_put, _put_run
        # the bounds cannot change while this loop runs (a reload sets them between events)
        max_pipelined, max_qbytes = budget.max_pipelined, budget.max_queued_bytes
        max_qframes, burst = budget.max_queued_frames, budget.burst
        self.t_in = t_in = _now()
        if t_in >= self.gate.deadline:  # the lease may have lapsed: dropped before any answer
            self.gate.lapse()  # (EpochGate.check_lease, inline)
        n = 0
        while True:  # bounded: FAIR_FRAMES frames at most, then yield_stop
            if reader.end - reader.start < HEADER_SIZE:  # the usual way out: tested first
                break
            if (self.closed or reader.target is not None or self.waiting is not None
                    or self.write_paused or len(pending) + self.loads >= max_pipelined
                    or self.queued >= max_qbytes or self.queued_frames >= max_qframes):
                break
            if self.sent - self.flushed_at >= burst:
                self.burst_stop = True  # the driver flushes, then calls advance() again
                break
            if n >= FAIR_FRAMES:
                self.yield_stop = True
                break
            n += 1
            if plane.draining:  # start nothing new; the server closes us
                self.reading = False
                break
            if fast is not None:  # whole buffered puts, in C; 0: this frame is the Python path's
                took = put_run(self, fast, FAIR_FRAMES + 1 - n)
                if took:
                    n += took - 1
                    continue
            try:
                frame = next_frame(reader, Header)  # reader.next()
            except FrameError as e:
                self.fatal(e.request_id or 0, e.message)
                break
            if frame is None:
                break
            h, ns, key = frame
            self.req_id = rid = h.req_id
            op = ops.get(h.op)
            if op is None:
                self.reject(h.op, rid, h.length, errors.InvalidArgument(f"unknown op {h.op}"))
                continue
            handler, scope, gated, length = op
            if gated and h.aux:
                err = self.gate.check(h.aux)
                if err is not None:
                    self.reject(h.op, rid, h.length if length == BODY else 0, err)
                    continue
            if length == EMPTY and h.length:
                self.fatal(rid, f"a {OPS[h.op]} request carries no payload")
                break
            if guard is not None and scope is not None:
                refused = guard.check(ns, scope)
                if refused is not None:
                    self.counters["auth_rejected_" + refused[0]] += 1
                    self.reject(h.op, rid, h.length if length == BODY else 0, refused[1])
                    continue
            handler(self, h, ns, key)
        self.in_advance = False
        if (self.reading and reader.end != reader.start and not self.closed
                and len(pending) + self.loads >= max_pipelined):
            self.counters["pipeline_limit_pauses"] += 1
            self.reading = False  # too many unanswered requests: written() resumes
        if ((self.queued >= max_qbytes or self.queued_frames >= max_qframes)
                and not self.closed and reader.target is None):
            # responses pile up unread: read nothing more until the transport's buffer is
            # empty (the driver asks to be told: write_unblocked)
            if not self.queue_full:
                self.counters["queue_limit_pauses"] += 1
            self.queue_full = True
            self.reading = False

    def _unblock(self) -> None:
        """Read again, and handle frames already received, once nothing holds us back."""
        if (self.closed or self.in_advance or self.lingering or self.write_paused
                or self.yield_stop or self.queue_full or self.waiting is not None or self.plane.draining
                or len(self.pending) + self.loads >= self.budget.max_pipelined):
            return
        self.reading = True
        if self.reader.target is None and self.reader.buffered() >= HEADER_SIZE:
            self.advance()

    # ================================================ helpers for op handlers
    def send(self, frame: bytes) -> None:
        if not self.closed:
            n = len(frame)
            self.out.append(frame)
            self.sent += n
            self.queued += n
            self.queued_frames += 1
            op = frame[5]  # every response but a get's object passes here: time it by its op
            if op == OP_PUT:  # LatencyHistogram.observe, inlined (a call a put)
                d = _now() - self.put_t0
                h = self.put_latency
                h.counts[_bisect_left(_BUCKETS, d)] += 1
                h.sum += d
            elif op:  # 0: a connection-level error, not an answer to a request
                self.latency.get(op, self.latency_other).observe(_now() - self.t_in)

    def error(self, op: int, rid: int, err: errors.KVStoreError) -> None:
        self.reject(op, rid, 0, err)

    def reject(self, op: int, rid: int, plen: int, err: errors.KVStoreError) -> None:
        """Answer with a typed error once the request's ``plen`` payload bytes are skipped."""
        if type(err) is errors.NotVerified and not self.not_verified_ok:
            err = errors.NotFound(err.message)
        self.counters["errors_" + err.name] += 1
        if log.isEnabledFor(logging.DEBUG):  # the client has it; the metric counts it
            log.debug("request failed: %s", err.message, extra={
                "req_id": rid, "peer": self.peer, "op": OPS.get(op, op), "error": err.name})
        self.skip_then_send(rid, plen, encode_error(op, rid, err.code, err.message))

    def skip_then_send(self, rid: int, plen: int, frame: bytes) -> None:
        """Skip the request's ``plen`` payload bytes, then answer with ``frame``."""
        if plen == 0:
            self.send(frame)
        elif plen > DISCARD_LIMIT:
            self.fatal(rid, f"payload of {plen} bytes is too large to skip")
        elif self.reader.skip(plen):
            self.send(frame)
        else:
            self.on_payload = lambda: self.send(frame)

    def fatal(self, rid: int, message: str) -> None:
        """The stream cannot go on: one ProtocolError frame, then close."""
        self.counters["errors_ProtocolError"] += 1
        log.info("closing data connection: %s", message, extra={"req_id": rid, "peer": self.peer})
        self.send(encode_error(0, rid, errors.ProtocolError.code, message))
        self.close()

    def receive_payload(self, view: memoryview, n: int, done: Callable[[], None]) -> None:
        """Receive the request's ``n`` payload bytes into ``view``, then run ``done``."""
        if self.reader.receive_into(view, n):
            done()
        else:
            self.on_payload = done

    def acquire(self, rid: int, ns: bytes, key: bytes, op: int, deliver: Deliver) -> None:
        """Look an object up and answer with ``deliver(session, rid, entry, t0)`` (which
        owns the read reference); one on NVMe is promoted by a Call meanwhile, and its
        answer may overtake or follow later requests (responses carry the request id)."""
        try:
            _check_names(ns, key)
            e = self.store.acquire(ns, key)
        except NotResident:
            self.loads += 1
            self.calls.append(Call(self.store.acquire_async, (ns, key), _loaded,
                                   (rid, op, deliver, self.t_in)))
            return
        except errors.KVStoreError as err:
            return self.error(op, rid, err)
        deliver(self, rid, e, 0.0)

    def reserve(self, op: int, rid: int, ns: bytes, key: bytes, size: int, csum: int | None,
                overwrite: bool, reserved: Callable, skip: int = 0, stream: bool = False,
                recommit: bool = True) -> None:
        """Reserve a slot and run ``reserved(session, rid, reservation or None, size)`` (None:
        the object is stored already). Without space, a Call waits (bounded) for it and nothing
        else on this connection is parsed meanwhile, so answers keep the requests' order.
        A failure is answered here, after skipping ``skip`` payload bytes.

        ``stream``: the ``size`` payload bytes follow the request on this stream (a TCP put).
        An object stored already is then answered so even past this connection's or client's
        bound (the store's reserve finds it otherwise, in the lookup it makes anyway); and
        when the whole payload is buffered already, ``reserved`` commits it before this call
        returns, so the reservation is not counted in the connection's and client's bytes
        (no event could see them) nor given a stall deadline. ``recommit=False``: a cluster
        repair's write (Store.reserve)."""
        refused = (self.budget.admit_reservation(self.reserved, size)
                   or self.clients.admit(self.client, size))
        if refused is not None:  # this connection's (client's) own bound: waiting would not help
            if stream and self.store.dedup(ns, key, size, csum, recommit):
                return reserved(self, rid, None, size)
            self.counters["reservations_refused_over_limit"] += 1
            return self.reject(op, rid, skip, refused)
        try:
            _check_names(ns, key)
            res = self.store.reserve(ns, key, size, csum, overwrite, recommit)
        except errors.NoSpace as e:
            return self._no_space(e, op, rid, ns, key, size, csum, overwrite, reserved, skip,
                                  recommit)
        except errors.KVStoreError as e:
            return self.reject(op, rid, skip, e)
        if res is None:  # stored already: no slot was taken
            return reserved(self, rid, None, size)
        if stream and self.reader.end - self.reader.start >= size:
            self.no_wait_until = 0.0  # (what _hold does besides counting)
        else:
            self._hold(res)
        reserved(self, rid, res, size)

    def _no_space(self, e: errors.NoSpace, op: int, rid: int, ns: bytes, key: bytes, size: int,
                  csum: int | None, overwrite: bool, reserved: Callable, skip: int,
                  recommit: bool = True) -> None:
        """``reserve`` found no space: a Call waits (bounded) for it, unless this
        connection's last wait was in vain lately (then refused at once)."""
        if self.no_wait_until and self.store.clock() < self.no_wait_until:
            return self.reject(op, rid, skip, e)
        self.reading = False
        self.waiting = Call(self.store.reserve_wait, (ns, key, size, csum, overwrite, None, recommit),
                            _reserved_later, (op, rid, size, reserved, skip))
        self.calls.append(self.waiting)

    def put_buffered(self, op: int, rid: int, ns: bytes, key: bytes, size: int, csum: int,
                     overwrite: bool, reserved: Callable) -> bool | None:
        """A put whose ``size`` payload bytes are all buffered after its header (TCP): the
        store copies them into a free slot, verifies and indexes them in one call
        (``Store.put_bytes``), so there is no reservation for any event to see (none is
        counted in the connection's and client's bytes, nor given a stall deadline), and
        the bytes are taken from the buffer. The bounds are ``reserve``'s, and ``reserve``
        takes the put over when one refuses it; a typed error is answered (the payload
        skipped); without space the put waits as any does (then ``reserved`` takes the
        payload from the buffer). True: stored; False: stored already (deduplicated);
        None: answered or waiting."""
        # ConnectionBudget.admit_reservation's and ClientSpace.admit's tests, inlined (two
        # calls a put): what either refuses goes to reserve, which asks them and answers
        cap, clients = self.budget.max_reserved_bytes, self.clients
        if ((cap and self.reserved + size > cap)
                or (clients.cap and self.client
                    and clients.held.get(self.client, 0) + size > clients.cap)):
            return self.reserve(op, rid, ns, key, size, csum, overwrite, reserved, size, True)
        reader = self.reader
        start = reader.start
        try:
            if ns not in _VALID_NAMESPACES or not 0 < len(key) <= MAX_KEY_LEN:
                _check_names(ns, key)  # (what it passes, inlined: a call a put)
            stored = self.store.put_bytes(ns, key, reader.view[start:start + size], csum,
                                          overwrite)
        except errors.NoSpace as e:
            return self._no_space(e, op, rid, ns, key, size, csum, overwrite, reserved, size)
        except errors.KVStoreError as e:
            return self.reject(op, rid, size, e)
        reader.start = start = start + size  # (FrameReader.skip of buffered bytes, inlined)
        if start == reader.end:
            reader.start = reader.end = 0
        self.no_wait_until = 0.0  # (what _hold does besides counting)
        return stored

    def _hold(self, res: "Reservation | None") -> None:
        self.no_wait_until = 0.0  # space again: the next put may wait
        if res is not None:
            size = res.size
            res.held = True
            self.reserved += size
            self.clients.add(self.client, size)
            # a stalled put is reclaimed soon: put_stall_timeout without a byte (TCP), and
            # put_stall_timeout + size / min_put_rate in all (never later than the store's
            # reservation_timeout), so a slow writer that progresses keeps its slot
            now = self.clock()
            cap = self.plane.limits.put_deadline(now, size)
            if res.deadline < cap:
                cap = res.deadline
            self.put_cap = cap
            d = now + self.stall
            res.deadline = d if d < cap else cap

    def _unhold(self, res: "Reservation") -> None:
        if res.held:
            res.held = False
            self.reserved -= res.size
            self.clients.add(self.client, -res.size)

    def commit(self, res: "Reservation") -> bool:
        """Publish a reservation this connection holds; raises the store's typed errors."""
        self._unhold(res)
        return self.store.commit(res)

    def _drop_reservation(self, res: "Reservation") -> None:
        self._unhold(res)
        self.store.abort(res)

    def reservation_expired(self, res: "Reservation") -> None:
        """The writer stalled past reservation_timeout (the store's reaper dropped ``res``):
        stop writing into the slot now, and abort the connection."""
        log.warning("closing a data connection whose put stalled past the reservation timeout",
                    extra={"req_id": self.req_id, "peer": self.peer, "size": res.size})
        self.counters["stalled_puts"] += 1
        self._unhold(res)
        if self.res is res:
            self.res = None
            self.reader.abandon()
            self.on_payload = None
        self.close("abort")
        self.wake()


# ============================================================ puts in C

def _fast_put_context(s: DataSession) -> tuple | None:
    """``put_run``'s context (native/frame.c: the C_* order there), or None where a put
    must take the Python path: the extension is not built, or the op table's PUT is not
    ops._put (marked ``native_put``) with its epoch gate and payload.

    With auth on, the run takes a put only where the connection's ``AuthGuard`` has the
    namespace's scope bits cached and they grant the op's scope (the guard's own cache,
    filled by its ``check`` on the namespace's first put, which takes the Python path):
    every refusal is the guard's, counted and answered by the Python path. With an NVMe
    tier, the run's slots come from ``DramTier.alloc_if_free``: a put that needs an
    eviction (maybe a demotion) is the Python path's, whose ``alloc`` evicts once; past
    the high watermark, ``Store._publish`` starts demotions from either path alike."""
    op = s.ops.get(OP_PUT)
    if (_put_run is None or op is None
            or not getattr(op[0], "native_put", False) or not op[2] or op[3] != BODY):
        return None
    store = s.store
    dram = store.dram
    ok = encode_response(OP_PUT, 0)
    scope = op[1] if op[1] is not None else 0  # (LOGIN, 0: any authenticated connection)
    guard = s.guard if op[1] is not None else None
    if guard is not None and not scope:  # (no such PUT: guard.check's LOGIN case is not in C)
        return None
    return (store.index.get, store.arena.class_by_size, store.arena.view,
            dram.alloc if store.nvme is None else dram.alloc_if_free,
            dram.free_slot, store._publish, store.counters, store.limits,
            _VALID_NAMESPACES, payload_checksum, _now, _BUCKETS, ok[:8], ok[16:],
            checksum_mismatch, LARGE_PAYLOAD, HEADER_WINDOW, errors.KVStoreError, store._same,
            guard, scope)


# ====================================================== store call completions

def _loaded(s: DataSession, call: Call, e: "Entry | None", err) -> None:
    rid, op, deliver, t0 = call.ctx
    s.loads -= 1
    if err is not None:
        if not s.closed:
            s.error(op, rid, err)
    elif s.closed:
        s.store.release(e)
    else:
        deliver(s, rid, e, t0)
    if not s.reading:
        s._unblock()


def _reserved_later(s: DataSession, call: Call, res: "Reservation | None", err) -> None:
    op, rid, size, reserved, skip = call.ctx
    s.waiting = None
    if err is not None:
        if isinstance(err, errors.NoSpace):
            s.no_wait_until = s.store.clock() + s.store.limits.put_wait_timeout
        s.reject(op, rid, skip, err)
    elif s.closed:
        if res is not None:
            s.store.abort(res)
        return
    else:
        s._hold(res)
        reserved(s, rid, res, size)
    if not s.closed:
        if not s.write_paused:
            s.reading = True
        s.advance()


_swallow = memoryview(bytearray(64 << 10))  # draining connections' input lands here, unread
