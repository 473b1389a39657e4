"""The narrow policy objects a data session consults, instead of the node.

* ``EpochGate``: the node's cluster member-list epoch (membership sets it); a
  request stamped with another epoch is answered Redirect.
* ``AuthGuard``: one connection's identity under token auth: the token it
  showed (kept as a digest) and what it may do in which namespace.
* ``ConnectionBudget``: per-connection bounds: unanswered requests, the
  response bytes one pipelined burst may queue, copied response bytes and
  frames queued unsent, and reserved bytes.
* ``ClientSpace``: reserved bytes per client (peer IP / shm uid).
* ``DataLimits``: the configured bounds (timeouts, rates, caps) in one object.
* ``RepairQueue``: peers' repair requests wait their turn while this node's clients wait.
"""
from __future__ import annotations

import asyncio
import collections
import math
import time
from typing import TYPE_CHECKING, Callable

from kvstore import errors

from kvstored.auth import TOKEN_REQUIRED, Unauthenticated, denial
from kvstored.settings import default as setting_default

if TYPE_CHECKING:
    from kvstored.auth import Auth, Grant

LOGIN = 0  # an op's scope: any authenticated connection (READ / WRITE from kvstored.auth)
_MASK_CACHE = 1024  # namespaces whose permission a connection remembers


class EpochGate:
    """The member-list epoch this node serves (0 = not in a cluster), and the time by
    which its etcd lease may have lapsed.

    ``deadline``: ``time.perf_counter()`` (the data plane's clock, CLOCK_MONOTONIC on
    Linux: it runs while the process is stopped) past which this node's lease may have
    run out unrenewed; membership keeps it from its renewals, ``inf`` while there is no
    lease to keep (static or no cluster, not registered, etcd out of reach). A process
    that was stopped past it runs requests already in its sockets before any timer of
    membership's, so both planes call ``check_lease`` before they answer keyed requests
    (the data plane once per batch of frames): past the deadline, ``lapse()`` runs
    membership's ``on_lapse`` (the node treats itself as dropped) first."""

    __slots__ = ("epoch", "deadline", "on_lapse")

    def __init__(self, epoch: int = 0):
        self.epoch = epoch
        self.deadline = math.inf
        self.on_lapse: Callable[[], None] | None = None

    def check_lease(self, now: float) -> None:
        """``lapse()`` if ``now`` (perf_counter) is past the deadline."""
        if now >= self.deadline:
            self.lapse()

    def lapse(self) -> None:
        """The deadline passed: disarm it and tell membership (once)."""
        self.deadline = math.inf
        if self.on_lapse is not None:
            self.on_lapse()

    def check(self, epoch: int) -> errors.Redirect | None:
        """A Redirect for a request sent with another (non-zero) epoch, else None."""
        mine = self.epoch
        if epoch and mine and epoch != mine:
            return errors.Redirect(f"member list epoch {epoch:08x} is not this node's "
                                   f"{mine:08x}: refresh the member list")
        return None


class AuthGuard:
    """One connection's authentication state against the daemon's token table."""

    __slots__ = ("auth", "grant", "digest", "generation", "masks")

    def __init__(self, auth: "Auth"):
        self.auth = auth
        self.grant: Grant | None = None
        self.digest = b""
        self.generation = 0
        self.masks: dict[bytes, int] = {}

    def login(self, token: bytes) -> None:
        """Bind the connection to ``token``; raises PermissionDenied (and forgets any
        earlier token) if the daemon does not know it."""
        try:
            self.digest, self.grant = self.auth.authenticate(token)
        except errors.PermissionDenied:
            self.grant = None
            raise
        self.generation = self.auth.generation
        self.masks.clear()

    def check(self, ns: bytes, need: int) -> tuple[str, errors.KVStoreError] | None:
        """None if this connection may ``need`` (READ/WRITE; LOGIN: just be authenticated)
        in ``ns``, else ``(counter reason, typed error)``."""
        grant = self.grant
        if grant is None:
            return "no_token", Unauthenticated(TOKEN_REQUIRED)
        if need == LOGIN:
            return None
        auth = self.auth
        if self.generation != auth.generation:  # tokens reloaded: look ours up again
            self.generation = auth.generation
            self.masks.clear()
            grant = self.grant = auth.tokens.get(self.digest)
            if grant is None:
                return "revoked", Unauthenticated(
                    "this connection's token was revoked: authenticate again")
        mask = self.masks.get(ns)
        if mask is None:
            mask = grant.mask(ns)
            if len(self.masks) < _MASK_CACHE:
                self.masks[ns] = mask
        if mask & need:
            return None
        return denial(grant, ns, need, mask)


class ConnectionBudget:
    """What one connection may hold. ``max_pipelined``: unanswered requests before it
    stops being read; ``burst``: response bytes queued by one burst of frames before
    they are flushed (and the transport's write-buffer limit, so back-pressure starts
    there); ``max_queued_bytes`` / ``max_queued_frames``: copied response bytes (every
    response but a get's arena view) and frames queued since the transport's buffer was
    last empty, before the connection stops being read until it is (a client that
    pipelines small requests and never reads costs at most this much memory);
    ``max_reserved_bytes``: space its unfinished puts may hold (0 = no bound)."""

    __slots__ = ("max_pipelined", "burst", "max_reserved_bytes", "max_queued_bytes",
                 "max_queued_frames")

    def __init__(self, max_pipelined: int, burst: int, max_reserved_bytes: int = 0,
                 max_queued_bytes: int = 1 << 62, max_queued_frames: int = 1 << 62):
        self.max_pipelined = max_pipelined
        self.burst = burst
        self.max_reserved_bytes = max_reserved_bytes
        self.max_queued_bytes = max_queued_bytes
        self.max_queued_frames = max_queued_frames

    def admit_reservation(self, held: int, size: int) -> errors.KVStoreError | None:
        """None if a connection holding ``held`` reserved bytes may reserve ``size`` more."""
        cap = self.max_reserved_bytes
        if cap and held + size > cap:
            return errors.NoSpace(f"this connection already holds {held} bytes of unfinished "
                                  f"puts (limit {cap} per connection)")
        return None


class ClientSpace:
    """Reserved bytes per client (peer IP on TCP, uid on shm), so one client's stalled
    or hoarded puts cannot take the whole arena from the others."""

    __slots__ = ("cap", "held")

    def __init__(self, cap: int = 0):
        self.cap = cap  # 0: no bound
        self.held: dict[str, int] = {}

    def admit(self, client: str, size: int) -> errors.KVStoreError | None:
        cap = self.cap
        if cap and client:
            held = self.held.get(client, 0)
            if held + size > cap:
                return errors.NoSpace(f"client {client} already holds {held} bytes of "
                                      f"unfinished puts (limit {cap} per client)")
        return None

    def add(self, client: str, n: int) -> None:
        if client:
            left = self.held.get(client, 0) + n
            if left > 0:
                self.held[client] = left
            else:
                self.held.pop(client, None)


class DataLimits:
    """The data plane's bounds against hostile and careless clients, from the config
    (issue 17); the defaults are what a DataServer built without a config gets."""

    def __init__(self, config=None, *, dram_size: int = 0):
        # without a config (or a field it lacks): the setting's default, from its row
        def get(name):
            return getattr(config, name) if hasattr(config, name) else setting_default(name)

        self.max_queued_bytes = get("max_queued_response_bytes")
        self.max_queued_frames = get("max_queued_responses")
        self.write_stall_timeout = get("write_stall_timeout")
        self.idle_timeout = get("idle_timeout")
        self.put_stall_timeout = get("put_stall_timeout")
        self.min_put_rate = get("min_put_rate")
        self.handshake_timeout = get("handshake_timeout")
        self.max_handshakes_per_client = get("max_handshakes_per_client")
        per_client = get("max_reserved_bytes_per_client")
        per_conn = get("max_reserved_bytes_per_connection")
        # only a config's sizes bound the per-client cap (a bare DataLimits() has no arena)
        dram = dram_size or getattr(config, "dram_size", 0) or 0
        largest = getattr(config, "max_value_size", 0) or 0
        if dram:  # at most half the arena (a small arena: 64 MiB, so batches still fit)
            per_client = min(per_client, max(dram // 2, 64 << 20, largest))
        self.max_reserved_per_client = per_client
        self.max_reserved_per_connection = min(per_conn, per_client)

    def put_deadline(self, now: float, size: int) -> float:
        """The latest a put of ``size`` bytes reserved at ``now`` may commit."""
        return now + self.put_stall_timeout + size / self.min_put_rate


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
        from .plane import Call  # (plane.py imports this module)
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
