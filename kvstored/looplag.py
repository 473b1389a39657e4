"""How late the event loop runs what is due, and long work that gives the loop back.

``LoopLag`` measures: one number for "requests waited behind something" (a long
callback, a thread holding the GIL, a starved CPU), whatever it was.

Every request on the data path, the control plane's handlers and the node's timers run
on one event loop, so a stall there is a stall for every client at once, and it shows in
no per-request histogram that starts timing after the stall (a request's clock starts
when its header is parsed). A timer that asks to wake every ``INTERVAL`` seconds and
records how late it woke measures it from outside: ``kvstored_event_loop_lag_seconds``.
A lag over ``WARN_S`` is also logged (rate-limited like every log line, kvstored/logs.py).

Cost: 40 wake-ups a second, ~20 us of CPU each (<0.1 % of a core).

``LoopLag.recent()`` is the largest lag of the last ``RECENT`` wake-ups: what a request
arriving now would wait behind, read by repair's pace (kvstored/cluster/repair/pace.py)
from its own thread; ``LoopLag.ticks`` are called at every wake-up, on the loop (the
pace's count of clients' requests).

``Slices`` mitigates: work for peers and repair that loops over many items on the event
loop (a Heads call of 4,096 keys, repair's store batches of up to 16 MiB) awaits
``slices.turn()`` between items and so gives the loop back every ``SLICE_S``: a client's
request waits behind at most about that much of it, not the whole batch (a Heads call of
4,096 keys with their first bytes held the loop ~30 ms; benchmarks/RESULTS.md "Tail
latency").
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Iterator

from kvstored.latency import LatencyHistogram

log = logging.getLogger("kvstored")

INTERVAL = 0.025  # seconds between wake-ups: short enough to land in most stalls
WARN_S = 1.0  # a lag this long is logged: every client waited at least this long
# Slices: the longest run of a batch's items between two turns of the loop. A client with
# one request at a time gets one answer per turn: with 2 ms turns a reader of 400 gets/s
# fell behind during a 65,536-key Exists (p99 142-156 ms), with 0.5 ms it did not (22-23)
SLICE_S = 0.0005
RECENT = 8  # wake-ups LoopLag.recent() looks back over (~0.2 s)


class LoopLag:
    """The lag histogram and the largest lag since the node started."""

    def __init__(self):
        self.hist = LatencyHistogram()
        self.max_s = 0.0
        self._task: asyncio.Task | None = None
        # the last RECENT lags, a ring: read from other threads without a lock (a list's
        # items are replaced whole; a reader sees each old or new, never torn)
        self._recent = [0.0] * RECENT
        self._at = 0
        self.ticks: list = []  # f(now) at every wake-up (time.monotonic), on the loop

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def observe(self, lag: float) -> None:
        lag = max(0.0, lag)
        self.hist.observe(lag)
        self._recent[self._at] = lag
        self._at = (self._at + 1) % RECENT
        if lag > self.max_s:
            self.max_s = lag
        if lag >= WARN_S:
            log.warning("event loop blocked: every request waited", extra={"seconds": round(lag, 3)})

    def recent(self) -> float:
        """The largest lag (seconds) of the last RECENT wake-ups; 0.0 before any."""
        return max(self._recent)

    async def _run(self) -> None:
        clock = time.monotonic  # not loop.time(): uvloop's is cached once per iteration
        while True:
            t = clock()
            await asyncio.sleep(INTERVAL)
            now = clock()
            self.observe(now - t - INTERVAL)
            for tick in self.ticks:
                try:
                    tick(now)
                except Exception:  # one hook's bug must not stop the measure
                    log.exception("loop lag tick failed")


class Slices:
    """``await slices.turn()`` between a batch's items: a zero-length sleep (the loop serves
    what is ready, then resumes the batch) once ``SLICE_S`` has passed since the last."""

    __slots__ = ("_t",)

    def __init__(self):
        self._t = time.perf_counter()

    async def turn(self) -> None:
        if time.perf_counter() - self._t >= SLICE_S:
            await asyncio.sleep(0)
            self._t = time.perf_counter()


async def run_sliced(steps: Iterator[None]):
    """Run a generator of steps (the engine's ``Store.*_steps``), giving the loop back
    between steps once SLICE_S has passed (Slices); what it returns."""
    slices = Slices()
    try:
        while True:
            next(steps)
            await slices.turn()
    except StopIteration as done:
        return done.value
