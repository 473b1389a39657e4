"""When the NVMe tier's writes are made durable against power loss (``nvme.sync``).

O_DIRECT alone survives a process kill, not the device's write cache nor the file
system's unwritten-extent metadata: ``none`` never calls fdatasync, ``interval``
calls it every ``interval`` seconds while there were writes, ``always`` makes every
append wait for an fdatasync issued after its write completed (one fdatasync covers
every write finished before it: group commit).
"""
from __future__ import annotations

import asyncio
import logging
import os

log = logging.getLogger("kvstored.nvme")

SYNC_MODES = ("none", "interval", "always")


class Syncer:
    """fdatasync of one file descriptor for one ``nvme.sync`` mode; counts ``syncs`` and
    ``sync_errors`` in the tier's ``counters``."""

    def __init__(self, fd: int, mode: str, interval: float, counters: dict):
        self.fd = fd
        self.mode = mode
        self.interval = interval
        self.counters = counters
        self.started = 0  # fdatasyncs begun
        self.done = 0  # the highest begun one that finished
        self.dirty = False  # written since the last fdatasync began
        self._task: asyncio.Task | None = None  # the fdatasync running now
        self._interval_task: asyncio.Task | None = None

    def writing(self) -> None:
        """A write is about to be issued (starts the interval task on the running loop)."""
        if self.mode == "interval" and self._interval_task is None:
            self._interval_task = asyncio.get_running_loop().create_task(self._every_interval())

    async def written(self) -> None:
        """A write completed: with ``always``, return once an fdatasync covers it."""
        self.dirty = True
        if self.mode == "always":
            await self.synced()

    async def synced(self) -> None:
        """Return once an fdatasync that began after this call has finished."""
        want = self.started + 1
        while self.done < want:
            if self._task is None:
                self._task = asyncio.get_running_loop().create_task(self._fdatasync())
            await asyncio.shield(self._task)

    async def _fdatasync(self) -> None:
        self.started += 1
        n = self.started
        self.dirty = False
        try:
            await asyncio.get_running_loop().run_in_executor(None, os.fdatasync, self.fd)
        except OSError as e:
            self.counters["sync_errors"] += 1
            log.error("nvme fdatasync failed: %s", e)
            raise
        finally:
            self._task = None
        self.counters["syncs"] += 1
        self.done = n

    async def _every_interval(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if self.dirty:
                try:
                    await self.synced()
                except OSError:
                    pass  # counted and logged; the next interval tries again

    def close(self) -> None:
        for t in (self._interval_task, self._task):
            if t is not None and not t.done():
                try:
                    t.cancel()
                except RuntimeError:  # its event loop is closed already
                    pass
