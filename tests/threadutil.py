"""Run a test body in several threads at once: every thread joined within a bound, the
first failure of any thread re-raised in the test (an assert inside a thread would
otherwise only print)."""
from __future__ import annotations

import threading


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
