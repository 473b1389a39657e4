"""A pause point between a pass's reads and its writes, for tests that force an interleaving.

With ``KVSTORED_REPAIR_PAUSE`` naming a directory in the daemon's environment, a pass
about to write a chunk of records while ``DIR/armed`` exists writes the keys of that
chunk to ``DIR/paused`` (one ``namespace key-hex`` line each) and waits until ``armed``
is removed (at most MAX_WAIT_S), then writes. A test arms it, waits for ``paused``, does
what must land between the read and the write (a client's delete), and removes
``armed``; ``DIR/resumed`` then counts the chunks let go. Without the variable (every
daemon outside such tests) ``point`` is None and costs nothing.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger("kvstored.repair")

ENV = "KVSTORED_REPAIR_PAUSE"
MAX_WAIT_S = 60.0  # bounded: a test that forgot to release does not hang the node
POLL_S = 0.02


class PausePoint:
    def __init__(self, where: str):
        self.dir = Path(where)

    def before_write(self, keys: list[tuple[bytes, bytes]]) -> None:
        """Wait here while the test holds the pause (``armed`` exists)."""
        armed = self.dir / "armed"
        if not keys or not armed.exists():
            return
        tmp = self.dir / "paused.tmp"
        tmp.write_text("".join(f"{ns.decode(errors='replace')} {k.hex()}\n" for ns, k in keys))
        tmp.replace(self.dir / "paused")  # whole, at once: the test never reads half a list
        log.warning("repair paused before writing %d records (%s)", len(keys), ENV)
        deadline = time.monotonic() + MAX_WAIT_S
        while armed.exists() and time.monotonic() < deadline:
            time.sleep(POLL_S)
        done = self.dir / "resumed"
        n = int(done.read_text() or 0) if done.exists() else 0
        done.write_text(str(n + 1))


def point() -> PausePoint | None:
    where = os.environ.get(ENV)
    return PausePoint(where) if where else None
