"""Repair's pace: the share of its time repair works while this node's clients wait.

The byte throttle (throttle.py, ``cluster.repair_rate``) does not follow CPU: a rebuild's
reconstruct, hashing, copies and Python per object compete with clients' requests for
the cores, the GIL and the event loop whatever the bytes. So repair also yields to
clients: it calls ``Pace.step()`` between its steps (a batch, a chunk's reads, its
rebuild, each write call), and at pace ``p`` waits ``(1/p - 1)`` times the work it did
since the last step (at most MAX_WAIT_S), so it takes ``p`` of what it would take of the
node; its chunks shrink with it (execute.py: ``p`` of MAX_BATCH_BYTES and PUT_CHUNK), so
the work between two waits is shorter too. Its work is what competes with the node's
clients: the repair thread's CPU and its hops onto the event loop (the agent's
``work`` clock), not the time it waits on its peers (their CPU is not this node's).

The rule (``next_pace``): clients are waiting when data-plane requests other than
repair's (peers' repair reads and writes carry wire.FLAG_REPAIR and are counted apart)
were answered within HOLD_S and the event loop lagged more than
``cluster.repair_yield_lag`` in its last wake-ups (looplag.LoopLag.recent). Then each
step halves the pace, down to ``cluster.repair_min_pace``; otherwise it climbs back to
1 over RECOVER_S. With no clients (an idle cluster) repair runs at full speed however
much its own work makes the loop lag. Bounded: never below ``min_pace`` of its time, so
a busy node still re-protects its data; ``repair_yield_lag = 0`` turns it off.

Clients' control-plane calls (control/service.py ``CLIENT_CALLS``: Exists, Lookup, Get,
Put, ...; not peers' Heads nor monitoring calls) count as client requests too.

The same rule holds peers' repair requests back on this node's data plane
(``NodeLoad.hold_repair_requests``, kvstored/dataplane/plane.py ``RepairQueue``): while
this node's clients wait, a peer's repair read or write starts only in its turn, so the
peers' repair slows with this node's (they wait for its answers instead of taking the
shared cores).

Observable: ``kvstored_repair_pace`` (the current pace) and
``kvstored_repair_yield_seconds_total`` (time spent waiting for clients), and the
agent's pass log line; ``kvstored_repair_requests_held_total`` and
``kvstored_repair_held_seconds_total`` for peers' requests held.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

HOLD_S = 0.5  # clients answered within this long count as present
RECOVER_S = 1.0  # from min_pace back to full speed once clients stop waiting
MAX_WAIT_S = 0.5  # one wait is bounded (a step that worked long waits again next step)
MIN_PACE = 0.05  # the lowest cluster.repair_min_pace accepted (settings.py)


def next_pace(pace: float, waiting: bool, elapsed: float, min_pace: float) -> float:
    """The pace after a step: halved (not below ``min_pace``) while clients wait, else
    raised by ``elapsed / RECOVER_S`` (the seconds since the last step), up to 1."""
    if waiting:
        return max(min_pace, pace * 0.5)
    return min(1.0, pace + max(0.0, elapsed) / RECOVER_S)


def wait_for(pace: float, worked: float) -> float:
    """Seconds to wait after ``worked`` seconds of work at ``pace``."""
    if pace >= 1.0 or worked <= 0.0:
        return 0.0
    return min(MAX_WAIT_S, worked * (1.0 / pace - 1.0))


class NodeLoad:
    """What the pace reads of its node: the event loop's recent lag, and when clients
    (not peers' repair) last had data-plane requests answered, checked at every wake-up
    of the loop-lag timer (every 25 ms, on the loop)."""

    def __init__(self, loop_lag, data_server):
        """``loop_lag``: kvstored.looplag.LoopLag; ``data_server``: the node's DataServer
        (``latency_by_name()``, ``counters``)."""
        self._lag, self._data = loop_lag, data_server
        # the bucket counts of the data plane's histograms, taken once (the plane makes
        # them at start and keeps them: its sessions record into the same objects); a
        # tick sums them without building the by-name dict (40 ticks a second)
        self._counts = [h.counts for op, h in data_server.latency_by_name().items()
                        if op not in ("auth", "ping")]
        self._seen = self.client_requests()
        self.clients_at = float("-inf")  # time.monotonic() the count last grew
        loop_lag.ticks.append(self.tick)

    def lag(self) -> float:
        return self._lag.recent()

    def client_requests(self) -> int:
        """Data-plane requests answered minus those flagged as repair's, plus clients'
        control calls (control/service.py CLIENT_CALLS): a count that only matters by
        how it grows."""
        n = sum(map(sum, self._counts))
        counters = self._data.counters
        return n - counters.get("repair_requests", 0) + counters.get("control_client_calls", 0)

    def hold_repair_requests(self, waiting: Callable[[float], bool]) -> None:
        """Peers' repair requests on this node's data plane wait their turn while
        ``waiting(time.monotonic())`` (kvstored/dataplane/plane.py RepairQueue)."""
        plane = getattr(self._data, "plane", None)
        if plane is not None:
            plane.repair_queue.clients_waiting = waiting

    def tick(self, now: float) -> None:
        """Note ``now`` when the count grew. A high-water mark: a peer's repair request,
        counted as repair's when it starts and as a request when answered, adds nothing."""
        n = self.client_requests()
        if n > self._seen:
            self._seen = n
            self.clients_at = now


class Pace:
    def __init__(self, yield_lag: float, min_pace: float, load: NodeLoad | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 work: Callable[[], float] | None = None, hold_requests: bool = False):
        """``yield_lag``: the loop lag (seconds) over which waiting clients make repair
        yield (0: never); ``min_pace``: the floor; ``load``: the node's NodeLoad (None:
        never yields, a node without one); ``work``: the calling thread's work so far in
        seconds (None: ``clock``, all the time between steps counts); ``hold_requests``
        (cluster.repair_hold_requests): the same rule holds peers' repair requests here."""
        if not 0.0 <= yield_lag:
            raise ValueError(f"repair yield lag must be >= 0, not {yield_lag!r}")
        if not MIN_PACE <= min_pace <= 1.0:
            raise ValueError(f"repair min pace must be within {MIN_PACE}-1, not {min_pace!r}")
        self.yield_lag, self.min_pace, self.load = yield_lag, min_pace, load
        self.on = yield_lag > 0 and load is not None
        self._clock, self._sleep = clock, sleep
        self._work = work or clock
        self.pace = 1.0
        self.yielded_s = 0.0  # seconds waited for clients, ever
        self._lock = threading.Lock()  # write calls to several peers may step at once
        self._mine = threading.local()  # per thread: its work clock when its last step ended
        self._stepped = clock()
        if hold_requests and self.on and isinstance(load, NodeLoad):
            load.hold_repair_requests(self.waiting)

    def begin(self) -> None:
        """A pass or a write call starts: the work before this is not its step's."""
        self._mine.t = self._work()

    def waiting(self, now: float) -> bool:
        """Clients answered within HOLD_S and the loop lagging over yield_lag."""
        return now - self.load.clients_at < HOLD_S and self.load.lag() > self.yield_lag

    def step(self) -> float:
        """Between two steps of repair work: update the pace and wait what it says for
        the work since this thread's last step. The seconds waited."""
        if not self.on:
            return 0.0
        now = self._clock()
        done = self._work()
        worked = done - getattr(self._mine, "t", done)
        with self._lock:
            self.pace = next_pace(self.pace, self.waiting(now), now - self._stepped, self.min_pace)
            self._stepped = now
            wait = wait_for(self.pace, worked)
        if wait:
            self._sleep(wait)
            with self._lock:
                self.yielded_s += wait
        self._mine.t = self._work()
        return wait

    def scale(self, n: float) -> float:
        """``n`` (a batch's size) at the current pace."""
        return n * self.pace if self.on else n
