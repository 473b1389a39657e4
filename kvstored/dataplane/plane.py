"""What the data sessions of one server share, and how they dispatch requests.

* ``OpTable``: op -> ``Op`` (handler, the auth scope it needs, whether the
  member-list epoch gates it, what its length field means). The core ops are
  ops.py's ``CORE_OPS``; a transport with more ops registers them on a copy.
* ``Plane``: the store, the op table, the policy objects, counters and latency
  histograms every session of one server uses; ``DataSession(plane, peer)`` opens one.
* ``Call``: a store call that awaits, handed by a session to its driver.
* ``RepairQueue``: peers' repair requests wait their turn while this node's clients wait
  (cluster.repair_hold_requests).

Split from session.py (issue 14), which re-exports these names.
"""
from __future__ import annotations

import asyncio
import collections
import time
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from kvstore import errors
from kvstore.wire import MAX_KEY_LEN, OPS, Header, namespace_bytes

from kvstored.metrics import LatencyHistogram

from .policy import ClientSpace, ConnectionBudget, DataLimits, EpochGate

if TYPE_CHECKING:
    from kvstored.auth import Auth
    from kvstored.engine import Entry, Store

    from .session import DataSession  # noqa: F401 (annotations only; session.py imports this)

# what a request's length field means, per op
BODY = 0  # that many payload bytes follow the key
EMPTY = 1  # nothing follows; a non-zero length is a protocol error (the stream is lost)
SIZE = 2  # a size (e.g. of a shm reservation); nothing follows on this stream

Handler = Callable[["DataSession", Header, bytes, bytes], None]
Deliver = Callable[["DataSession", int, "Entry", float], None]


class Op(NamedTuple):
    handler: Handler
    scope: int | None  # READ / WRITE / LOGIN; None: no auth check (ids are per connection)
    epoch: bool  # gated by the member-list epoch (cluster placement decides these keys)
    length: int  # BODY / EMPTY / SIZE


class OpTable(dict):
    """op -> Op. Transports copy ``CORE_OPS`` and register their own ops on the copy."""

    def register(self, op: int, handler: Handler, *, scope: int | None, epoch: bool = False,
                 length: int = BODY) -> None:
        if op in self:
            raise ValueError(f"op {op} is registered already")
        if op not in OPS:
            raise ValueError(f"op {op} is not in kvstore.wire.OPS")
        self[op] = Op(handler, scope, epoch, length)

    def extended(self) -> "OpTable":
        return OpTable(self)


class Call:
    """Action: the driver awaits ``fn(*args)`` and reports with ``session.call_done``."""

    __slots__ = ("fn", "args", "then", "ctx", "task")

    def __init__(self, fn, args: tuple, then, ctx: Any):
        self.fn, self.args, self.then, self.ctx = fn, args, then, ctx
        self.task: Any = None  # the driver's handle (an asyncio task), to cancel on loss


class Plane:
    """What every session of one server shares: store, op table, policy objects, counters."""

    def __init__(self, store: "Store", ops: OpTable, *, gate: EpochGate | None = None,
                 auth: "Auth | None" = None, max_pipelined: int = 1 << 30,
                 burst: int = 64 << 20, limits: DataLimits | None = None):
        self.store = store
        self.limits = limits or DataLimits(dram_size=store.arena.size)
        self.clients = ClientSpace(self.limits.max_reserved_per_client)
        self.ops = ops
        self.gate = gate or EpochGate()
        self.auth = auth  # None: auth off
        self.max_pipelined = max_pipelined
        self.burst = burst
        self.draining = False  # start no new request (the server is shutting down)
        self.counters: collections.Counter = collections.Counter()
        # Per-op service time, recorded on the hot path (~0.3 us a request, see
        # kvstored/metrics.py); the operation counters are these histograms' counts.
        self.latency = {op: LatencyHistogram() for op in OPS}  # every op the wire knows
        self.latency_other = LatencyHistogram()  # unknown ops (answered with an error)
        # peers' repair requests wait their turn while this node's clients wait (its
        # clients_waiting is set by the node's repair pace, cluster/repair/pace.py)
        self.repair_queue = RepairQueue(self.counters, lambda: self.draining)

    def latency_by_name(self) -> dict[str, LatencyHistogram]:
        return {**{OPS[op]: h for op, h in self.latency.items()}, "other": self.latency_other}

    def budget(self, burst: int | None = None) -> ConnectionBudget:
        """A new connection's bounds (DataSession takes one; the shm driver gives its
        connections a larger burst)."""
        lim = self.limits
        return ConnectionBudget(self.max_pipelined, self.burst if burst is None else burst,
                                lim.max_reserved_per_connection, lim.max_queued_bytes,
                                lim.max_queued_frames)


_VALID_NAMESPACES: set[bytes] = set()


def _check_names(ns: bytes, key: bytes) -> None:
    if ns not in _VALID_NAMESPACES:
        namespace_bytes(ns)
        if len(_VALID_NAMESPACES) < 4096:  # a cache, bounded against namespace spraying
            _VALID_NAMESPACES.add(ns)
    if not 1 <= len(key) <= MAX_KEY_LEN:
        raise errors.InvalidArgument(f"key length {len(key)} outside 1-{MAX_KEY_LEN} bytes")


# RepairQueue: while clients wait, one peer's repair request starts per TURN_S on this node
# (a repair read of a 1 MiB object's fragment under ec:3+2 is ~350 KiB: ~70 MB/s), and none
# waits longer than MAX_HOLD_S, so repair always finishes
REPAIR_TURN_S = 0.005
REPAIR_MAX_HOLD_S = 0.25


class RepairQueue:
    """Peers' repair reads and writes (wire.FLAG_REPAIR) wait behind this node's clients.

    Measured (benchmarks/RESULTS.md, "Peers' repair waits behind clients"): a client's wait during a cluster's
    repair is mostly for a CPU, not behind repair requests on this loop; every node's
    repair competes for the host's cores. Holding peers' repair requests here while this
    node's clients wait slows those peers' repair too (they wait for this node's answers
    instead of working), which is the part of their CPU this node can take back.

    ``clients_waiting(now)``: repair's pace rule (kvstored/cluster/repair/pace.py
    ``Pace.waiting``: clients answered within HOLD_S and the loop lagging over
    ``cluster.repair_yield_lag``), set by the node's repair Pace; None (no repair agent,
    or ``repair_yield_lag = 0``): no request is ever held. While it says so, a repair
    request starts only in its turn (one per REPAIR_TURN_S, node-wide, oldest first) and
    the others wait with their connections unread (later requests on a connection keep
    their order); one held REPAIR_MAX_HOLD_S starts anyway, and all start once clients
    stop waiting or the server drains. Counted: ``repair_requests_held`` and
    ``repair_held_us`` (microseconds held in all)."""

    def __init__(self, counters, draining: Callable[[], bool]):
        self.clients_waiting: Callable[[float], bool] | None = None
        self.counters = counters
        self.draining = draining
        self.held: collections.deque = collections.deque()  # (future, held since, session)
        self.next_turn = 0.0  # time.monotonic() of the next turn
        self.timer: asyncio.TimerHandle | None = None
        self.releasing = None  # the header of the request being started after its wait

    def hold(self, s, h, ns: bytes, key: bytes, handler) -> bool:
        """Called by a repair request's handler before it starts: True if it now waits
        (``handler(s, h, ns, key)`` runs again at its turn), False to start it now."""
        waiting = self.clients_waiting
        if waiting is None or h is self.releasing:
            return False
        now = time.monotonic()
        if not waiting(now):
            return False
        if not self.held and now >= self.next_turn:
            self.next_turn = now + REPAIR_TURN_S  # its turn
            return False
        self.counters["repair_requests_held"] += 1
        loop = asyncio.get_running_loop()  # (the data plane's callbacks run on it)
        entry = (loop.create_future(), now, s)
        self.held.append(entry)
        if self.timer is None:
            self.timer = loop.call_later(REPAIR_TURN_S, self._tick)
        s.reading = False  # nothing more is parsed on this connection meanwhile
        s.waiting = Call(self.turn, (entry,), repair_admitted, (self, h, ns, key, handler, s.t_in))
        s.calls.append(s.waiting)
        return True

    async def turn(self, entry: tuple) -> None:
        """Wait for the held request's turn (the session's Call: cancelled if its
        connection goes)."""
        fut = entry[0]
        try:
            await fut
        finally:
            if not fut.done():  # cancelled: its connection is gone
                fut.cancel()
                if entry in self.held:
                    self.held.remove(entry)

    def _tick(self) -> None:
        self.timer = None
        now = time.monotonic()
        waiting = (self.clients_waiting is not None and not self.draining()
                   and self.clients_waiting(now))
        held = self.held
        while held:  # bounded: each round takes one entry off
            fut, since, s = held[0]
            if s.closed:  # its connection went before its wait began: nothing to start
                held.popleft()
                fut.cancel()
                continue
            if waiting and now - since < REPAIR_MAX_HOLD_S:
                if now < self.next_turn:
                    break
                self.next_turn = now + REPAIR_TURN_S
            held.popleft()
            self.counters["repair_held_us"] += int((now - since) * 1e6)
            if not fut.done():
                fut.set_result(None)
        if held:
            self.timer = asyncio.get_running_loop().call_later(REPAIR_TURN_S, self._tick)


def repair_admitted(s, call, result, err) -> None:
    """A held repair request's turn came (a Call's completion): start it as if just parsed
    (its latency counts from when it was), then parse on."""
    queue, h, ns, key, handler, t_in = call.ctx
    s.waiting = None
    if s.closed:
        return
    if s.plane.draining:  # start nothing new: the server closes the connection
        s.reading = False
        return
    # the gate again, as for a request just parsed: the lease may have lapsed meanwhile,
    # the member list moved on
    s.gate.check_lease(time.perf_counter())
    refused = s.gate.check(h.aux) if h.aux else None
    if refused is not None:
        s.reject(h.op, h.req_id, h.length, refused)  # (a PUT's payload skipped)
    else:
        queue.releasing, s.t_in = h, t_in
        try:
            handler(s, h, ns, key)
        finally:
            queue.releasing = None
    if not s.closed and s.waiting is None:
        if not s.write_paused:
            s.reading = True
        s.advance()
