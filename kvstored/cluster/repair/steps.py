"""Where a pass spends its time: CPU and wall seconds per step, logged when a pass ends.

The repair thread's CPU per step is ``time.thread_time()`` (its own user and system time:
a step that waits on a peer or on a hop onto the event loop costs wall time, not CPU);
the event loop's CPU over the pass (serving peers' reads and this node's local hops)
comes from the loop thread's CPU clock. A few calls per batch, not per object.
"""
from __future__ import annotations

import threading
import time


class Steps:
    def __init__(self):
        self.cpu: dict[str, float] = {}
        self.wall: dict[str, float] = {}
        self._lock = threading.Lock()  # the writer thread (execute.PIPELINED) adds too

    def reset(self) -> None:
        with self._lock:
            self.cpu, self.wall = {}, {}

    def add(self, name: str, cpu: float, wall: float) -> None:
        with self._lock:
            self.cpu[name] = self.cpu.get(name, 0.0) + cpu
            self.wall[name] = self.wall.get(name, 0.0) + wall

    def timed(self, name: str, fn, *args):
        """``fn(*args)``, its CPU (this thread's) and wall time added to ``name``."""
        c0, w0 = time.thread_time(), time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.add(name, time.thread_time() - c0, time.perf_counter() - w0)

    def summary(self) -> str:
        """``name=cpu_ms/wall_ms ...`` in the order the steps first ran."""
        with self._lock:
            return " ".join(f"{k}={self.cpu[k] * 1e3:.0f}/{self.wall[k] * 1e3:.0f}" for k in self.cpu)


def thread_clock(ident: int | None):
    """A function returning thread ``ident``'s CPU seconds (Linux), or None."""
    if ident is None:
        return None
    try:
        clock = time.pthread_getcpuclockid(ident)
        time.clock_gettime(clock)
    except (AttributeError, OSError):
        return None
    return lambda: time.clock_gettime(clock)
