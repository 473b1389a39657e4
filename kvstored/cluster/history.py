"""A cluster node's delete history (kvstored/engine/fence.py, ``DeleteHistory``): made
from the config, kept in files across restarts and crashes. Peers read it through Heads
(``deleted_ago``): a node back after an absence longer than the delete fence's window
drops its records of objects deleted meanwhile, also when every peer restarted since.

The files: ``cluster.delete_history_file`` (the *snapshot*); "" (the default) puts it
beside the NVMe tier's file (``<nvme.path>.deletes``, where the node keeps its
tombstones); without an NVMe tier file (none, or a device) in systemd's state directory
(``$STATE_DIRECTORY/kvstored-<control port>.deletes``, as the shm socket goes to
``$RUNTIME_DIRECTORY``), else nowhere (the history is in memory only, and start-up says
so: set the path); "off" keeps it in memory only. Beside the snapshot, *journals* ``<file>.journal-<generation>``: every
delete call is appended to the current one (``Journal.append``, one ``os.write`` on the
loop thread before the delete is answered), so a SIGKILL loses none; they are fsynced
every SYNC_INTERVAL_S (1 s) on a worker thread, so a power loss loses at most that
long. Every SAVE_INTERVAL_S (5 min) while it changes, and at a clean stop, the node
writes a snapshot (generation g: it holds every journal before g), starts journal g,
and removes the journals before g once the snapshot is renamed in place. At start it
loads the snapshot, replays the journals from its generation on (each up to its first
record a crash cut short), writes a new snapshot when there were any, and opens the
next journal.
"""
from __future__ import annotations

import asyncio
import logging
import os
import stat
import threading

from kvstored.engine.fence import DeleteHistory, journal_head, sync_dir

log = logging.getLogger("kvstored.cluster")

SAVE_INTERVAL_S = 300.0  # a running node writes a snapshot this often (when it changed)
SYNC_INTERVAL_S = 1.0  # and fsyncs the journal this often (when appended to)


def history_file(config) -> str | None:
    """Where the node keeps its delete history across restarts (None: nowhere)."""
    path = config.cluster_delete_history_file
    if path == "off":
        return None
    if path:
        return path
    nvme = config.nvme_path
    try:
        if nvme and stat.S_ISREG(os.stat(nvme).st_mode):
            return f"{nvme}.deletes"
    except FileNotFoundError:
        return f"{nvme}.deletes"  # created at start
    # no file of the tier to keep it beside (none, or a block device)
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    port = getattr(config, "control_port", 0)
    if state and port and os.path.isdir(state):
        return os.path.join(state, f"kvstored-{port}.deletes")
    return None


def journal_path(path: str, generation: int) -> str:
    return f"{path}.journal-{generation}"


def journals(path: str) -> list[tuple[int, str]]:
    """The journals beside the snapshot ``path``: (generation, file), oldest first."""
    d, base = os.path.split(os.path.abspath(path))
    prefix = base + ".journal-"
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        if n.startswith(prefix) and n[len(prefix):].isdigit():
            out.append((int(n[len(prefix):]), os.path.join(d, n)))
    return sorted(out)


class Journal:
    """The journal file deletes are appended to (``append``, the loop thread) and its
    fsyncs (``sync``, a worker thread). Only ``sync`` closes descriptors (those
    ``rotate`` or a failed append set aside), under its own lock, so none is closed
    while another thread fsyncs it. A failed append (disk full) closes the journal
    until the next snapshot opens another: the deletes stay in memory and go into that
    snapshot."""

    def __init__(self, path: str):
        self.path = path  # the snapshot's: journals are named after it
        self.fd: int | None = None
        self.generation = 0  # of the open journal (or of the last one, when none is open)
        self.dirty = False  # appended (or created) since the last fsync
        self._fds = threading.Lock()  # fd and retired, between the loop and a sync
        self._sync = threading.Lock()  # one sync at a time
        self._retired: list[int] = []
        self._new_file = False

    def append(self, data: bytes) -> None:
        fd = self.fd
        if fd is None:
            return
        try:
            if os.write(fd, data) != len(data):
                raise OSError("a short write (disk full?)")
        except OSError as e:
            log.warning("delete journal %s: %s; deletes are kept in memory until the next "
                        "snapshot", journal_path(self.path, self.generation), e)
            with self._fds:
                self._retired.append(fd)
                self.fd = None
            return
        self.dirty = True

    def rotate(self, generation: int | None) -> None:
        """Append to the journal of ``generation`` from now on (None: to none; the
        snapshot being made holds everything before it)."""
        fd = None
        if generation is not None:
            name = journal_path(self.path, generation)
            try:
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND
                             | os.O_CLOEXEC, 0o644)
                os.write(fd, journal_head(generation))
            except OSError as e:
                log.warning("delete journal %s not opened: %s; deletes are kept in memory "
                            "until the next snapshot", name, e)
                if fd is not None:
                    os.close(fd)
                fd = None
        with self._fds:
            if self.fd is not None:
                self._retired.append(self.fd)
            self.fd = fd
            if generation is not None:
                self.generation = generation
            self._new_file = self.dirty = fd is not None

    def sync(self) -> None:
        """fsync what was appended (and the journals set aside, then closed)."""
        with self._sync:
            with self._fds:
                fd, retired, self._retired = self.fd, self._retired, []
                dirty, self.dirty = self.dirty, False
                new, self._new_file = self._new_file, False
            for r in retired:
                try:
                    os.fsync(r)
                except OSError:
                    pass
                os.close(r)
            if fd is not None and dirty:
                try:
                    os.fsync(fd)
                except OSError as e:
                    log.warning("delete journal not synced: %s", e)
            if new:
                sync_dir(self.path)

    def prune(self, before: int) -> None:
        """Remove the journals older than ``before`` (a snapshot of that generation is
        in place)."""
        for g, name in journals(self.path):
            if g < before:
                try:
                    os.unlink(name)
                except OSError as e:
                    log.warning("delete journal %s not removed: %s", name, e)

    def close(self) -> None:
        self.rotate(None)
        self.sync()


def open_history(config) -> DeleteHistory:
    """The node's delete history, with what its files hold (if anything), its journal open."""
    h = DeleteHistory(config.cluster_delete_horizon, config.cluster_delete_history_keys)
    h.path = history_file(config)
    h.saves = _Saves()
    if h.path is None:
        if config.cluster_delete_history_file != "off":
            log.warning("the delete history is kept in memory only (no NVMe tier file to keep "
                        "it beside, no $STATE_DIRECTORY): deletes this node saw are forgotten "
                        "when it restarts; set cluster.delete_history_file to keep them")
        return h
    try:
        n = h.load(h.path)
        log.info("delete history loaded", extra={"path": h.path, "deletes": n,
                                                 "generation": h.generation})
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:  # the node starts without it: deletes it saw may come back
        log.warning("delete history %s not loaded: %s", h.path, e)
    j = h.journal = Journal(h.path)
    found = journals(h.path)
    top = h.generation
    for g, name in found:
        top = max(top, g)
        if g < h.generation:
            continue  # in the snapshot already (removed below)
        try:
            with open(name, "rb") as f:
                _g, n, whole = h.replay(f.read())
        except (OSError, ValueError) as e:
            log.warning("delete journal %s not read: %s", name, e)
            continue
        log.info("delete journal replayed", extra={"path": name, "deletes": n, "whole": whole})
    if found:  # a crash (or a failed save) left journals: one snapshot holds them all now
        if _write(h, h.snapshot(top + 1), h.changes, top + 1):
            j.prune(top + 1)
    j.rotate(top + 1)
    j.sync()
    return h


class _Saves:
    """One history's writes, in order: a write of an older snapshot never replaces a
    newer one (a periodic save still writing when the shutdown's save runs)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.written = -1  # ``changes`` of the newest snapshot written
        self.generation = 0  # and its generation


def _write(h: DeleteHistory, parts: list[bytes], changes: int, generation: int = 0) -> bool:
    """Write a snapshot; True when it is the newest in place (its journals may go)."""
    saves = h.saves
    if saves is None:
        saves = h.saves = _Saves()
    with saves.lock:
        if changes < saves.written or generation < saves.generation:
            return False
        try:
            size = h.write(h.path, parts)
        except OSError as e:
            log.warning("delete history not saved to %s: %s", h.path, e)
            return False
        saves.written, saves.generation = changes, generation
    log.debug("delete history saved", extra={"path": h.path, "bytes": size})
    return True


def _compact(h: DeleteHistory, parts: list[bytes], changes: int, generation: int) -> None:
    """A snapshot's writing (a worker thread, or the loop at shutdown): the journals set
    aside fsynced first (they stay needed if this write fails), then the snapshot, then
    the journals it holds removed."""
    j = h.journal
    if j is not None:
        j.sync()
    if _write(h, parts, changes, generation) and j is not None:
        j.prune(generation)


def save_history(h: DeleteHistory | None) -> None:
    """Save ``h`` to its file now (shutdown, once nothing deletes any more; the loop
    thread); failures logged. Its journal is closed and, once the snapshot is in
    place, removed."""
    if h is None or h.path is None:
        return
    j = h.journal
    generation = j.generation + 1 if j is not None else 0
    parts = h.snapshot(generation)
    if j is not None:
        j.rotate(None)
    _compact(h, parts, h.changes, generation)
    log.info("delete history saved", extra={"path": h.path, "deletes": len(h)})


async def keep_saving(h: DeleteHistory, interval: float = SAVE_INTERVAL_S,
                      sync_interval: float = SYNC_INTERVAL_S) -> None:
    """fsync the journal every ``sync_interval`` seconds while it is appended to, and
    write a snapshot every ``interval`` seconds while the history changes (a task on the
    node's loop: the snapshot is taken there, the files written on a worker thread)."""
    if h.path is None:
        return
    loop = asyncio.get_running_loop()
    last = 0  # (what start-up loaded and replayed is in the files already: not counted)
    due = loop.time() + interval
    j = h.journal
    while True:
        await asyncio.sleep(min(sync_interval, max(0.0, due - loop.time())))
        if loop.time() < due:
            if j is not None and j.dirty:
                await asyncio.to_thread(j.sync)
            continue
        due = loop.time() + interval
        if h.changes == last:
            continue
        last = h.changes
        generation = j.generation + 1 if j is not None else 0
        parts = h.snapshot(generation)
        if j is not None:
            j.rotate(generation)  # (in the same step as the snapshot: no delete between)
        await asyncio.to_thread(_compact, h, parts, last, generation)
