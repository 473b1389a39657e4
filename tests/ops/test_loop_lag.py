"""kvstored_event_loop_lag_seconds: a real daemon's loop lag, and a stall it must report."""
from __future__ import annotations

import os
import signal
import time

from opsutil import scrape, value, wait_for_log

FAMILY = "kvstored_event_loop_lag_seconds"


def _count(d) -> float:
    return value(scrape(d), FAMILY, FAMILY + "_count")


def _at_least(d, seconds: float) -> float:
    """Observations of ``seconds`` or more (the +Inf count less the bucket below it)."""
    m = scrape(d)
    samples = m[FAMILY]["samples"]
    below = max((v for (name, labels), v in samples.items() if name == FAMILY + "_bucket"
                 and dict(labels)["le"] != "+Inf" and float(dict(labels)["le"]) < seconds), default=0.0)
    return value(m, FAMILY, FAMILY + "_count") - below


def test_lag_is_observed_while_idle(start_daemon):
    d = start_daemon()
    m = scrape(d)
    assert m[FAMILY]["type"] == "histogram"
    first = _count(d)
    deadline = time.monotonic() + 30
    while _count(d) < first + 5:  # 40 observations a second on a quiet loop
        assert time.monotonic() < deadline, "the lag timer is not running"
        time.sleep(0.1)


def test_a_stalled_loop_is_measured_and_logged(start_daemon):
    """SIGSTOP stops the loop from outside for 1.5 s: the timer wakes that late, which the
    histogram's >= 1 s buckets and a warning line say."""
    d = start_daemon()
    assert _at_least(d, 1.0) == 0
    start = d.log_path.stat().st_size
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(1.5)
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    line = wait_for_log(d, "event loop blocked", timeout=30, start=start)
    assert "seconds=" in line and "WARNING" in line.upper(), line
    deadline = time.monotonic() + 30
    while _at_least(d, 1.0) < 1:
        assert time.monotonic() < deadline, "no lag of 1 s or more recorded after a 1.5 s stop"
        time.sleep(0.1)
    assert d.proc.poll() is None
