"""A small circuit breaker shared by the engine adapters.

An inference engine calls its KV store on every step. When kvstored is down, asking
it again on every step costs the engine a failed connection (or, for a node that hangs,
a whole timeout) per call, and a flood of identical warnings. After a call finds the
store unreachable, the breaker *opens*: calls are skipped (the adapter answers a miss,
or drops the save) for ``backoff`` seconds, doubling up to ``max_backoff`` while the
store stays down (so a store that is back is used again within ``max_backoff``).

Probing: with a ``probe`` callable (the adapters pass the client's ``ping``), a
background thread asks the store after each back-off and closes the breaker when it
answers, so the engine's own calls never pay for a probe: a dead store refuses in
milliseconds, but one that accepts connections and hangs would cost a whole timeout
per probe. Without one, the first call after a back-off goes through as the probe (the
others keep skipping until it returns), and its success closes the breaker.

Only "nobody answered" errors trip it (Unavailable, Timeout, OSError): a NotFound, a
Conflict, a bad argument, a Redirect or a NotVerified (a cluster node holding an object
back until it is checked) is an answer from a live store.
"""
from __future__ import annotations

import logging
import threading
import time

from .. import errors

log = logging.getLogger("kvstore.integrations")


def is_outage(e: BaseException) -> bool:
    """Does ``e`` mean the store did not answer (as opposed to answering no)?"""
    return isinstance(e, (errors.Unavailable, OSError)) and not isinstance(
        e, (errors.Redirect, errors.NotVerified))


class Breaker:
    """Thread-safe; one per adapter instance (i.e. per store it talks to)."""

    def __init__(self, name: str, backoff: float = 0.5, max_backoff: float = 5.0,
                 clock=time.monotonic, probe=None):
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
        self.probes = 0          # background probes made
        self._probe = probe
        self._prober: threading.Thread | None = None
        self._stop = threading.Event()

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
            if self._probe is not None or self._probing or self._clock() < self._open_until:
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
            if self._probe is not None and not self._stop.is_set() and (
                    self._prober is None or not self._prober.is_alive()):
                self._prober = threading.Thread(target=self._probe_loop, daemon=True,
                                                name=f"kvstore-probe-{self.name}")
                self._prober.start()
        if first:
            log.warning("kvstore (%s): store unreachable (%s); answering misses, next try in %.1fs",
                        self.name, e, wait)
        else:
            log.info("kvstore (%s): still unreachable (%s); next try in %.1fs", self.name, e, wait)

    def _probe_loop(self) -> None:
        """While open: wait the back-off, ask the store; stop once it answers (any answer
        but an outage means it is up) or the breaker is closed."""
        while not self._stop.is_set():
            with self._lock:
                wait = self._wait
            if wait == 0.0 or self._stop.wait(wait):
                return
            self.probes += 1
            try:
                self._probe()
            except BaseException as e:  # noqa: BLE001 - a probe never raises out of its thread
                if is_outage(e):
                    with self._lock:
                        if self._wait:
                            self._wait = min(self._wait * 2, self.max_backoff)
                    continue
            self.success()
            return

    def close(self) -> None:
        """Stop the background prober (the adapter is shutting down)."""
        self._stop.set()

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
