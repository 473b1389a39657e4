"""A cluster node's delete history (kvstored/engine/fence.py, ``DeleteHistory``): made
from the config, loaded at start from the file the node last saved it to, saved every
few minutes and at a clean shutdown. Peers read it through Heads (``deleted_ago``): a node
back after an absence longer than the delete fence's window drops its records of
objects deleted meanwhile, also when every peer restarted since (cleanly: SIGTERM).

The file is ``cluster.delete_history_file``; "" (the default) puts it beside the NVMe
tier's file (``<nvme.path>.deletes``, where the node keeps its tombstones), or nowhere
when the node has no NVMe tier or it is a device; "off" keeps the history in memory
only. A running node also saves it every SAVE_INTERVAL_S (5 min) while it changes: a
node that crashes (SIGKILL, power) loses the deletes of at most that long.
"""
from __future__ import annotations

import asyncio
import logging
import os
import stat
import threading

from kvstored.engine.fence import DeleteHistory

log = logging.getLogger("kvstored.cluster")


def history_file(config) -> str | None:
    """Where the node keeps its delete history across restarts (None: nowhere)."""
    path = config.cluster_delete_history_file
    if path == "off":
        return None
    if path:
        return path
    nvme = config.nvme_path
    if not nvme:
        return None
    try:
        if not stat.S_ISREG(os.stat(nvme).st_mode):
            return None  # a block device: no file beside it
    except FileNotFoundError:
        pass  # created at start
    return f"{nvme}.deletes"


def open_history(config) -> DeleteHistory:
    """The node's delete history, with what its last clean shutdown saved (if anything)."""
    h = DeleteHistory(config.cluster_delete_horizon, config.cluster_delete_history_keys)
    h.path = history_file(config)
    h.saves = _Saves()
    if h.path is None:
        return h
    # (the file stays: after a crash the next start reads it again, its ages grown by
    # the wall-clock time since it was saved, which is still true of the deletes in it)
    try:
        n = h.load(h.path)
    except FileNotFoundError:
        return h
    except (OSError, ValueError) as e:  # the node starts without it: deletes it saw may come back
        log.warning("delete history %s not loaded: %s", h.path, e)
        return h
    log.info("delete history loaded", extra={"path": h.path, "deletes": n})
    return h


SAVE_INTERVAL_S = 300.0  # a running node saves its history this often (when it changed)


class _Saves:
    """One history's writes, in order: a write of an older snapshot never replaces a
    newer one (a periodic save still writing when the shutdown's save runs)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.written = -1  # ``changes`` of the newest snapshot written


def _write(h: DeleteHistory, parts: list[bytes], changes: int) -> None:
    saves = h.saves
    if saves is None:
        saves = h.saves = _Saves()
    with saves.lock:
        if changes < saves.written:
            return
        try:
            size = h.write(h.path, parts)
        except OSError as e:
            log.warning("delete history not saved to %s: %s", h.path, e)
            return
        saves.written = changes
    log.debug("delete history saved", extra={"path": h.path, "bytes": size})


def save_history(h: DeleteHistory | None) -> None:
    """Save ``h`` to its file now (shutdown, once nothing deletes any more; the loop
    thread); failures logged."""
    if h is None or h.path is None:
        return
    _write(h, h.snapshot(), h.changes)
    log.info("delete history saved", extra={"path": h.path, "deletes": len(h)})


async def keep_saving(h: DeleteHistory, interval: float = SAVE_INTERVAL_S) -> None:
    """Save ``h`` every ``interval`` seconds while it changes (a task on the node's loop:
    the snapshot is taken there, written on a worker thread), so a node that crashes
    loses at most the deletes of the last interval, not all since its last clean stop."""
    if h.path is None:
        return
    last = 0  # (what was loaded is in the file already: only this process's deletes count)
    while True:
        await asyncio.sleep(interval)
        if h.changes == last:
            continue
        last = h.changes
        await asyncio.to_thread(_write, h, h.snapshot(), last)
