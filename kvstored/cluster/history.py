"""A cluster node's delete history (kvstored/engine/fence.py, ``DeleteHistory``): made
from the config, loaded at start from the file the node saved it to at its last clean
shutdown, saved again at this one. Peers read it through Heads (``deleted_ago``): a node
back after an absence longer than the delete fence's window drops its records of
objects deleted meanwhile, also when every peer restarted since (cleanly: SIGTERM).

The file is ``cluster.delete_history_file``; "" (the default) puts it beside the NVMe
tier's file (``<nvme.path>.deletes``, where the node keeps its tombstones), or nowhere
when the node has no NVMe tier or it is a device; "off" keeps the history in memory
only. A node that crashes (SIGKILL, power) saves nothing: its peers then lack the
evidence of the deletes it saw since its last clean shutdown.
"""
from __future__ import annotations

import logging
import os
import stat

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


def save_history(h: DeleteHistory | None) -> None:
    """Save ``h`` to its file (shutdown, once nothing deletes any more); failures logged."""
    if h is None or h.path is None:
        return
    try:
        size = h.save(h.path)
    except OSError as e:
        log.warning("delete history not saved to %s: %s", h.path, e)
        return
    log.info("delete history saved", extra={"path": h.path, "deletes": len(h), "bytes": size})
