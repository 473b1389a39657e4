"""Run a test body in several threads at once: every thread joined within a bound, the
first failure of any thread re-raised in the test (an assert inside a thread would
otherwise only print). And a clock for a daemon's latency that leaves out the time the
machine had no CPU for it (a loaded CI machine stretches every call)."""
from __future__ import annotations

import os
import threading
import time


def run_threads(fn, args: list, timeout: float = 60.0) -> None:
    """``fn(a)`` in one thread per ``a`` of ``args``, all started, then each joined for at
    most ``timeout`` seconds; asserts none is still running and none raised."""
    errs: list = []

    def body(a) -> None:
        try:
            fn(a)
        except BaseException as e:  # noqa: BLE001 (re-raised in the test below)
            errs.append(e)
    threads = [threading.Thread(target=body, args=(a,)) for a in args]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), f"threads still running after {timeout}s"
    assert not errs, errs


def queued_seconds(pid: int, tid: int | None = None) -> float:
    """Seconds a thread (by default ``pid``'s main thread: an asyncio daemon's loop) has
    waited on a run queue so far: runnable, but the CPUs busy with other work. 0.0 where
    the kernel does not say (no CONFIG_SCHED_INFO)."""
    try:
        with open(f"/proc/{pid}/task/{tid or pid}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def unqueued_clock(pid: int):
    """A clock (seconds) for the latency of calls from the calling thread to the daemon
    ``pid``: wall time less what the daemon's loop and the calling thread waited for a
    CPU. A daemon that works for others, or idles on a timer, while a call waits still
    counts in full; only the machine's load is left out. Where both wait at once that time
    is left out twice, so a short span can read low (even below zero): bound the worst of
    many calls, or compare sums. Plain wall time where the kernel has no schedstat. Make
    one in the thread that uses it."""
    me, mine = threading.get_native_id(), os.getpid()

    def now() -> float:
        return time.perf_counter() - queued_seconds(pid) - queued_seconds(mine, me)
    return now
