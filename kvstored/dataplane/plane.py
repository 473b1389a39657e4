"""What the data sessions of one server share, and how they dispatch requests.

* ``OpTable``: op -> ``Op`` (handler, the auth scope it needs, whether the
  member-list epoch gates it, what its length field means). The core ops are
  ops.py's ``CORE_OPS``; a transport with more ops registers them on a copy.
* ``Plane``: the store, the op table, the policy objects, counters and latency
  histograms every session of one server uses; ``DataSession(plane, peer)`` opens one.
* ``Call``: a store call that awaits, handed by a session to its driver.

Split from session.py (issue 14), which re-exports these names.
"""
from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from kvstore import errors
from kvstore.wire import MAX_KEY_LEN, OPS, Header, namespace_bytes

from kvstored.metrics import LatencyHistogram

from .policy import ClientSpace, ConnectionBudget, DataLimits, EpochGate, RepairQueue

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
