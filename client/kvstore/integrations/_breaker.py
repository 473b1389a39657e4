"""A small circuit breaker shared by the engine adapters.

An inference engine calls its KV store on every step. When kvstored is down, asking
it again on every step costs the engine a failed connection (or, for a node that hangs,
a whole timeout) per call, and a flood of identical warnings. After a call finds the
store unreachable, the breaker *opens*: calls are skipped (the adapter answers a miss,
or drops the save) for ``backoff`` seconds, doubling up to ``max_backoff`` while the
store stays down (so a store that is back is used again within ``max_backoff``; a probe
of a dead store costs milliseconds, since the SDK fails fast on a refused connection). Then one call goes through as a probe (the others keep skipping
until it returns); its success closes the breaker.

Only "nobody answered" errors trip it (Unavailable, Timeout, OSError): a NotFound, a
Conflict or a bad argument is an answer from a live store.
"""
from __future__ import annotations

import logging
import threading
import time

from .. import errors

log = logging.getLogger("kvstore.integrations")


def is_outage(e: BaseException) -> bool:
    """Does ``e`` mean the store did not answer (as opposed to answering no)?"""
    return isinstance(e, (errors.Unavailable, OSError)) and not isinstance(e, errors.Redirect)


class Breaker:
    """Thread-safe; one per adapter instance (i.e. per store it talks to)."""

    def __init__(self, name: str, backoff: float = 0.5, max_backoff: float = 5.0,
                 clock=time.monotonic):
        if backoff <= 0 or max_backoff < backoff:
            raise errors.InvalidArgument("breaker back-off must be positive and at most its maximum")
        self.name = name
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._clock = clock
        self._lock = threading.Lock()
        self._open_until = 0.0   # calls are skipped before this time
        self._wait = 0.0         # current back-off; 0 = closed
        self._probing = False    # a probe call is in flight
        self.skipped = 0         # calls answered without asking the store
        self.trips = 0           # times the breaker opened

    @property
    def closed(self) -> bool:
        return self._wait == 0.0

    def allow(self) -> bool:
        """May a call go to the store now? (True for the one probe after a back-off.)"""
        if self._wait == 0.0:  # closed: the common case, no lock
            return True
        with self._lock:
            if self._wait == 0.0:
                return True
            if self._probing or self._clock() < self._open_until:
                self.skipped += 1
                return False
            self._probing = True
            return True

    def success(self) -> None:
        if self._wait == 0.0 and not self._probing:
            return
        with self._lock:
            was_open = self._wait != 0.0
            self._wait, self._probing, self._open_until = 0.0, False, 0.0
        if was_open:
            log.warning("kvstore (%s): store reachable again, resuming", self.name)

    def failure(self, e: BaseException) -> None:
        """Record a failed call; opens the breaker when ``e`` is an outage."""
        if not is_outage(e):
            if self._wait == 0.0 and not self._probing:
                return
            with self._lock:
                self._probing = False  # the store answered: it is up
                self._wait, self._open_until = 0.0, 0.0
            return
        with self._lock:
            first = self._wait == 0.0
            self._wait = self.backoff if first else min(self._wait * 2, self.max_backoff)
            self._open_until = self._clock() + self._wait
            self._probing = False
            self.trips += first
            wait = self._wait
        if first:
            log.warning("kvstore (%s): store unreachable (%s); answering misses, next try in %.1fs",
                        self.name, e, wait)
        else:
            log.info("kvstore (%s): still unreachable (%s); next try in %.1fs", self.name, e, wait)

    def call(self, fn, *args, default=None, **kw):
        """``fn(*args, **kw)``, or ``default`` when the breaker is open or the call fails
        with an outage (which opens it). Other errors propagate (the caller decides)."""
        if not self.allow():
            return default
        try:
            r = fn(*args, **kw)
        except BaseException as e:
            self.failure(e)
            if is_outage(e):
                return default
            raise
        self.success()
        return r


__all__ = ["Breaker", "is_outage"]
