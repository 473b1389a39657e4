"""systemd's sd_notify protocol without a dependency: one datagram to $NOTIFY_SOCKET.

``notify("READY=1", "STATUS=serving")`` does nothing (returns False) when the
daemon was not started by systemd with ``Type=notify``. An address starting
with ``@`` is in the abstract namespace (the ``@`` stands for a NUL byte).
``watchdog_interval()`` says how often to send ``WATCHDOG=1`` when the unit
sets ``WatchdogSec=`` (half the timeout, as sd_watchdog_enabled(3) advises).
"""
from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("kvstored.systemd")


def notify(*states: str) -> bool:
    """Send ``states`` (``"READY=1"``, ``"STATUS=..."``...) to systemd; True if sent."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    elif addr[0] != "/":  # vsock:... and other transports: not supported here
        log.debug("NOTIFY_SOCKET %r is not a unix socket path; not notifying", addr)
        return False
    payload = "\n".join(s.replace("\n", " ") for s in states).encode()
    try:
        # non-blocking: a notify socket whose queue is full (a reader that does not read)
        # must never stall the event loop; the message is dropped and logged instead
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                           | socket.SOCK_NONBLOCK) as s:
            s.connect(addr)
            s.send(payload)
    except OSError as e:
        log.warning("sd_notify failed: %s", e, extra={"notify_socket": addr.replace("\0", "@")})
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings, or None when systemd does not watch us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec), 0) / 2e6 or None
    except ValueError:
        return None


__all__ = ["notify", "watchdog_interval"]
