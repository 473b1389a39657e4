"""File descriptors: the budget set at start-up and the watch while running.

Every connection (data, shm, control, TLS handshake), NVMe file and listening socket is a
descriptor. Under a low ``RLIMIT_NOFILE`` accepts fail with EMFILE: uvloop (data port)
and gRPC (control port) retry on their own and log nothing, so a node at its limit used
to stop answering without a line. Hence:

* ``plan`` (start-up): raise the soft limit to the hard one; refuse to start when too few
  descriptors are left to serve at all; else split what is free between data connections
  (``server.max_connections``), control connections (``server.max_control_connections``)
  and ``HEADROOM`` (metrics, the shm socket, NVMe, TLS handshakes: at most half of it in
  handshakes), warning, with the settings named, when the configured limits do not fit;
  KV event subscribers (``events.max_subscribers``) are kept aside before the split;
* ``resplit`` (SIGHUP / Reload): the same rule for a new ``server.max_connections``, over
  what was free at start; a value over its share is clamped, with the same warning;
* ``Watch`` (maintenance pass): a probe open says when the process is at its limit;
  counted (``descriptor_limit_reached``), logged once per spell (and again each
  ``REMIND`` s while it lasts), and once more when descriptors are free again.
"""
from __future__ import annotations

import errno
import logging
import os
import resource
import time
from dataclasses import dataclass

log = logging.getLogger("kvstored")

# kept beyond the connection limits: metrics, the shm socket, NVMe files, TLS handshakes
# in progress, logs, gRPC's own
HEADROOM = 256
# TLS handshakes in progress at once on the data port: half the headroom kept (128 when
# the settings fit; fewer under a low limit, so handshakes cannot eat the other half)
MAX_HANDSHAKES = HEADROOM // 2
# fewer descriptors than this left at start-up: the node could not serve (refused)
MIN_FREE = 64
MIN_CONNECTIONS = 8  # per plane, whatever the split
REMIND = 60.0  # seconds between warnings while the process stays at its limit


class DescriptorLimitError(OSError):
    """RLIMIT_NOFILE leaves too few descriptors to serve (the daemon exits with the reason)."""


@dataclass(frozen=True)
class Budget:
    soft: int  # RLIMIT_NOFILE after raising it
    data: int  # data connections served at once (<= server.max_connections)
    control: int  # control connections at once (<= server.max_control_connections)
    handshakes: int = MAX_HANDSHAKES  # TLS handshakes in progress at once (data port)
    free: int = 1 << 20  # descriptors left at start-up for connections and headroom
    used: int = 0  # open at start-up

    def fits(self, max_connections: int, max_control_connections: int) -> bool:
        return max_connections + max_control_connections + HEADROOM <= self.free


def open_count() -> int:
    """Descriptors open in this process (-1: unknown)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less listdir's own
    except OSError:
        return -1


def limit() -> tuple[int, int]:
    """RLIMIT_NOFILE (soft, hard), infinity as a large number."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    inf = resource.RLIM_INFINITY
    return (1 << 20 if soft == inf else soft, 1 << 20 if hard == inf else hard)


def raise_soft_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass
    return limit()[0]


def plan(max_connections: int, max_control_connections: int, reserved: int = 0) -> Budget:
    """The start-up budget (see the module docstring); raises DescriptorLimitError.

    ``reserved``: descriptors held for something else that may open later (KV event
    subscribers: ``events.max_subscribers`` + 1 per endpoint), taken from what is free before the split.
    """
    soft = raise_soft_limit()
    hard = limit()[1]
    used = max(open_count(), 0)
    free = soft - used - reserved
    if free < MIN_FREE:
        raise DescriptorLimitError(
            f"RLIMIT_NOFILE is {soft} (hard {hard}) with {used} descriptors open and "
            f"{reserved} kept for KV event subscribers (events.max_subscribers + 1 per "
            f"endpoint): {free} left, too few to serve (at "
            f"least {used + reserved + MIN_FREE} needed; server.max_connections = "
            f"{max_connections} and server.max_control_connections = {max_control_connections} "
            f"want {used + reserved + max_connections + max_control_connections + HEADROOM}); "
            "raise the limit (systemd LimitNOFILE=, ulimit -n)")
    b = split(soft, free, used, max_connections, max_control_connections)
    if not b.fits(max_connections, max_control_connections):
        warn_split(b, max_connections, max_control_connections, "start")
    return b


def split(soft: int, free: int, used: int, max_connections: int,
          max_control_connections: int) -> Budget:
    """Share ``free`` descriptors between data connections, control connections and the
    headroom (TLS handshakes get half of what headroom is kept); no logging."""
    if max_connections + max_control_connections + HEADROOM <= free:
        return Budget(soft, max_connections, max_control_connections, MAX_HANDSHAKES, free, used)
    headroom = min(HEADROOM, free // 4)
    rest = free - headroom
    data = max(MIN_CONNECTIONS, rest * max_connections // (max_connections + max_control_connections))
    data = min(data, max_connections)
    control = min(max_control_connections, max(MIN_CONNECTIONS, rest - data))
    return Budget(soft, data, control, max(1, min(MAX_HANDSHAKES, headroom // 2)), free, used)


def resplit(start: Budget, max_connections: int, max_control_connections: int) -> Budget:
    """Reload: the start-up rule applied to new settings, with the descriptors that were
    free at start (what connections hold now is theirs, not lost); warns when it clamps.
    Control connections keep their start-up share (gRPC reads its limit once)."""
    b = split(start.soft, start.free, start.used, max_connections, max_control_connections)
    b = Budget(b.soft, b.data, start.control, start.handshakes, b.free, b.used)
    if b.data < max_connections:
        warn_split(b, max_connections, max_control_connections, "reload")
    return b


def warn_split(b: Budget, max_connections: int, max_control_connections: int, when: str) -> None:
    log.warning("RLIMIT_NOFILE is %d: serving at most %d data connections (server."
                "max_connections = %d) and %d control connections (server."
                "max_control_connections = %d), %d TLS handshakes at once; those settings need "
                "%d descriptors with %d open and %d kept for metrics, the shm socket, NVMe and "
                "TLS handshakes; raise the hard limit (LimitNOFILE=) or lower the settings",
                b.soft, b.data, max_connections, b.control, max_control_connections,
                b.handshakes, b.used + max_connections + max_control_connections + HEADROOM,
                b.used, HEADROOM, extra={"hard": limit()[1], "when": when})


class Watch:
    """Notices the process at its descriptor limit (``check`` from the maintenance pass)."""

    def __init__(self, counters, clock=time.monotonic):
        self.counters = counters  # the data plane's: Stats and /metrics read them
        self.clock = clock
        self.since: float | None = None  # when the current spell at the limit began
        self.warned = 0.0

    def check(self) -> bool:
        """True while at the limit: a probe open fails with EMFILE (or ENFILE: the host's)."""
        try:
            fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE):
                return False
            self._at_limit(e)
            return True
        os.close(fd)
        if self.since is not None:
            log.info("file descriptors free again: new connections are accepted",
                     extra={"at_limit_s": round(self.clock() - self.since, 1),
                            "open": open_count()})
            self.since = None
        return False

    def _at_limit(self, e: OSError) -> None:
        self.counters["descriptor_limit_reached"] += 1
        now = self.clock()
        if self.since is None:
            self.since = now
        elif now - self.warned < REMIND:
            return
        self.warned = now
        log.warning("out of file descriptors (%s): new connections on the control, data, "
                    "shm, metrics and KV event ports fail until some close; raise "
                    "RLIMIT_NOFILE (LimitNOFILE=) or lower server.max_connections / "
                    "server.max_control_connections",
                    os.strerror(e.errno), extra={"open": open_count(), "limit": limit()[0]})
