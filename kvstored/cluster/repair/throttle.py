"""A token bucket over the bytes repair writes (``cluster.repair_rate``), shared by the
threads that write to peers."""
from __future__ import annotations

import threading
import time

MAX_WAIT_S = 5.0  # one wait is bounded (a huge batch waits again on its next write)


class Throttle:
    def __init__(self, rate: float, clock=time.monotonic, sleep=time.sleep):
        if rate <= 0:
            raise ValueError(f"repair rate must be positive, not {rate!r}")
        self.rate = float(rate)
        self._clock, self._sleep = clock, sleep
        self._t = clock()
        self._budget = 0.0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> float:
        """Account ``nbytes`` about to be written; sleeps while the bucket is in debt (the
        burst is one second's worth). Returns the seconds slept."""
        with self._lock:
            now = self._clock()
            self._budget = min(self.rate, self._budget + (now - self._t) * self.rate) - nbytes
            self._t = now
            wait = -self._budget / self.rate if self._budget < 0 else 0.0
        wait = min(wait, MAX_WAIT_S)
        if wait:
            self._sleep(wait)
        return wait
