"""The cluster repair agent's calls on the Store: held records and repair reads.

On a cluster node the objects recovered from NVMe at start are held (``unverified``)
until the repair agent has checked them against the peers; these are the calls it
makes (through the event loop: kvstored/cluster/repair/local.py), plus the walk of the
index it plans with (``RepairWalk``) and its head reads. A mixin of Store: it uses the
Store's ``index``, ``clock``, ``counters``, ``arena``, ``load``, ``nvme``,
``_walk_chunks``, ``_keys_of`` and ``_unlink``.
"""
from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Callable, Iterable

from .entries import DEAD
from .eviction import PROTECTED

if TYPE_CHECKING:
    from .entries import Entry


# the walk's phases, most urgent first: held records (clients get none of them until
# checked); pinned or read since put (protected segment); read at least once; the rest
HELD, HOT, READ, REST = range(4)
WALK_ROWS = 1024  # rows a ``RepairWalk.next`` call aims at (the agent's batch)
# index entries one ``next`` call walks at most: a phase that finds few rows (the hot
# objects of 16 M) gives the repair thread an answer every ~10 ms of the loop, well
# within its hop's timeout, instead of walking the whole index in one call
WALK_STEP_MAX = 32 * 1024


class RepairHooks:
    def verify(self, e: "Entry") -> None:
        """A recovered record was found current: serve it."""
        self.index.verify(e)

    def verify_key(self, ns: bytes, key: bytes) -> bool:
        """``verify`` the record of (ns, key); False when there is none."""
        e = self.index.get(ns, key)
        if e is None:
            return False
        self.index.verify(e)
        return True

    def hold_all(self) -> int:
        """Hold back every record, as if recovered at restart, until the repair agent has
        checked it: this node was dropped from its cluster (its lease ran out while it hung
        or was cut off) and may have missed deletes meanwhile. Returns how many were held."""
        # one pass inside the index (16 M records as views: ~17 s of the loop, 1.7 GB)
        return self.index.mark_all_unverified()

    def drop_unverified(self, ns: bytes, key: bytes, checksum: int) -> bool:
        """Delete a recovered record found stale (deleted or replaced meanwhile), if it is
        still that record."""
        e = self.index.get(ns, key)
        if e is None or not e.unverified or e.checksum != checksum:
            return False
        self._unlink(e, tombstone=True, key=key)
        self.counters["deletes"] += 1
        return True

    def repair_walk(self, siblings=None, skip_repair_writes: bool = False) -> "RepairWalk":
        """A repair pass's walk of the index, a chunk at a time (``RepairWalk``);
        ``skip_repair_writes``: leave out records repair writes while it runs."""
        w = RepairWalk(self, siblings)
        if skip_repair_writes:
            self.repair_walks.add(w)
        return w

    async def repair_snapshot(self) -> list[tuple]:
        """Every row of a ``repair_walk`` at once (tests and tools; a pass takes them a
        chunk at a time)."""
        w, out = self.repair_walk(), []
        while (rows := await w.next(WALK_ROWS)) is not None:
            out += rows
        return out

    async def read_head(self, ns: bytes, key: bytes, n: int) -> tuple[Entry, bytes] | None:
        """The entry and first ``n`` bytes of an object, unverified ones included (repair
        only); None when absent."""
        e = self.index.get(ns, key)
        if e is None:
            return None
        if e.offset < 0:
            await self.load(e, key)
            e = self.index.get(ns, key)
            if e is None or e.offset < 0:
                return None
        return e, bytes(self.arena.view[e.offset:e.offset + min(n, e.size)])


class RepairWalk:
    """A repair pass's walk of the index: ``await next(n)`` gives the next ~``n`` rows
    (ns, key, size, checksum, unverified, pinned, protected, reads, committed_at), None
    once the walk is done. Nothing but a chunk is held: a pass over 16 M objects no
    longer builds a row per object up front (docs/scale.md, "Where it stops").

    Repair order by phases, each a walk of the whole index ``WALK_CHUNK`` entries at a
    time (``Store._walk_chunks``) with a turn of the loop between: held records first
    (HELD: clients get none until checked; the phase is skipped when none are held),
    then pinned or read since put (HOT), read at least once (READ), the rest (REST). A
    phase takes the entries of its own bucket and of the more urgent ones that the
    earlier phases did not take (changed since, or put since). An entry taken is marked
    (a bit per record number of the packed index, the entry's id for the dict index) and
    not taken again, unless it was committed after the walk began (its record reused by
    a newer object, or an identical re-put). A record a repair wrote meanwhile keeps its
    source's older commit time (docs/cluster.md, "Deletes and repair"), so it may be
    left to the next pass (on a record number this walk took already, or once the walk
    looks only at entries committed since it began). At ~0.2 us per entry a phase that takes
    nothing costs 3 s of the loop over 16 M entries, in 2,048-entry turns.

    The index may change between chunks: an entry deleted meanwhile (DEAD) is left out,
    an object put ahead of the cursor (or before a later phase) is seen, one put behind
    it in the last phase is left to the next pass. Keys of NVMe-only entries come from
    NVMe in bulk per chunk (``NvmeTier.keys_at``); one whose key cannot be read is left
    out of this pass.

    A record a repair writes while the walk runs (a peer's copy or rebuilt fragment, or
    this node's own; ``Store._publish`` calls ``written``) is left out of it, when the
    walk was asked to (the agent's passes): its writer has just decided its object with
    every slot's Heads, and the copy keeps its source's older commit time, so without
    this each such record was walked, asked of the peers and decided again in the same
    pass (bench_repair: ~25 % more objects per pass after a node loss). A sibling of a
    row the walk gives still comes with it (its object is grouped whole).

    ``siblings(ns, key, unverified)`` (optional) names the other keys that belong to
    the same object as a row's (an EC object's other laps on this node): those present
    are given right after it in the same call, so the agent groups a whole object from
    one call's rows, and are marked taken."""

    def __init__(self, store, siblings: Callable[[bytes, bytes, bool], Iterable[bytes]] | None):
        self._s = store
        self._siblings = siblings
        self.started = time.time()
        self.expected = max(1, len(store.index))  # entries when it began (progress)
        self.taken = 0  # rows given so far
        self.phase = HELD if store.index.unverified else HOT
        self._held_old = 0  # entries committed before the walk began that HELD took
        # every entry that was in the index when the walk began is taken (everything
        # was held: a restart, a drop from the cluster): a later phase looks only at
        # entries committed since, at one attribute read each
        self._only_new = False
        self._chunks = None  # the current phase's walk
        packed = store.index.kind == "packed"
        self._bits = bytearray() if packed else None  # record number -> taken
        self._ids: set[int] | None = None if packed else set()

    @property
    def share(self) -> float:
        """The share of the walk done (rows given / entries when it began), below 1
        until it is done."""
        return 1.0 if self.phase > REST else min(0.99, self.taken / self.expected)

    def written(self, e: "Entry") -> None:
        """``e`` was just written by repair (Store._publish): not a row of this walk."""
        if self.phase <= REST:
            self._take(e)

    def _take(self, e: "Entry") -> None:
        if self._bits is None:
            self._ids.add(id(e))
            return
        r = e.record
        if r is None:
            return
        if (r >> 3) >= len(self._bits):
            self._bits.extend(bytes((r >> 3) + 1 - len(self._bits) + len(self._bits) // 2))
        self._bits[r >> 3] |= 1 << (r & 7)

    async def next(self, n: int = WALK_ROWS) -> list[tuple] | None:
        """The next rows: at least ``n`` unless the walk ends, or fewer (even none) once
        ``WALK_STEP_MAX`` entries were walked in this call; None when it is done."""
        rows: list[tuple] = []
        walked = 0
        while len(rows) < n and walked < WALK_STEP_MAX and self.phase <= REST:
            if self._chunks is None:
                self._chunks = self._s._walk_chunks(None)
            chunk = next(self._chunks, None)
            if chunk is None:
                self._chunks = None
                if self.phase == HELD and self._held_old >= self.expected:
                    self._only_new = True
                self.phase += 1
                continue
            walked += len(chunk)
            await self._rows_of(chunk, rows)
            await asyncio.sleep(0)  # the loop serves clients between chunks
        self.taken += len(rows)
        if not rows and self.phase > REST:
            self._s.repair_walks.discard(self)
            return None
        return rows

    async def _rows_of(self, chunk: list, rows: list) -> None:
        # one loop over the chunk, the checks inlined: ~1 us per entry taken, ~0.2 per
        # entry left to another phase (a pass walks the index once per phase)
        phase, now, started = self.phase, self._s.clock(), self.started
        bits, ids = self._bits, self._ids
        mark = phase < REST  # the last phase's entries need no mark (only its siblings)
        only_new = self._only_new
        keyless = []
        first = len(rows)
        for e in chunk:
            if only_new and e.committed_at <= started:
                continue
            if e.state == DEAD:  # deleted since the walk listed it (dict index)
                continue
            held, pinned, protected = e.unverified, e.pinned(now), e.seg == PROTECTED
            if held:
                b = HELD
            elif pinned or protected:
                b = HOT
            else:
                b = READ if e.reads else REST
            if b > phase:
                continue  # a later phase's
            if e.committed_at <= started:  # else put since the walk began: not taken yet
                if bits is None:
                    if id(e) in ids:
                        continue
                else:
                    r = e.record
                    if r is None or ((r >> 3) < len(bits) and bits[r >> 3] >> (r & 7) & 1):
                        continue
            if mark:
                if bits is None:
                    ids.add(id(e))
                else:
                    r = e.record
                    if (r >> 3) >= len(bits):
                        self._take(e)  # (grows the bitmap)
                    else:
                        bits[r >> 3] |= 1 << (r & 7)
                if b == HELD and e.committed_at <= started:
                    self._held_old += 1
            # in RAM, or in its DRAM slot's key record (else NVMe's, in bulk below)
            key = e.key if e.key_in_ram else self._s._key_in_dram(e)
            if key is not None:
                rows.append((e.ns, key, e.size, e.checksum, held, pinned, protected, e.reads,
                             e.committed_at))
            elif e.nvme is not None:
                keyless.append(e)
        if keyless:  # their keys from NVMe in bulk; one that cannot be read is left out
            now = self._s.clock()
            for e, key in zip(keyless, await self._s._keys_of(keyless)):
                if key is not None and e.state != DEAD:  # (deleted during the read)
                    rows.append(_row(e, key, now))
        if self._siblings is not None:
            self._add_siblings(rows, first)

    def _add_siblings(self, rows: list, first: int) -> None:
        """After each of ``rows[first:]``, its siblings that are in the index (marked
        taken)."""
        index, siblings, now = self._s.index, self._siblings, self._s.clock()
        mine = rows[first:]
        del rows[first:]
        for r in mine:
            rows.append(r)
            for k in siblings(r[0], r[1], r[4]):
                s = index.get(r[0], k)
                if s is not None and s.state != DEAD and k != r[1]:
                    self._take(s)
                    rows.append(_row(s, k, now))


def _row(e: "Entry", key: bytes, now: float) -> tuple:
    return (e.ns, key, e.size, e.checksum, e.unverified, e.pinned(now), e.seg == PROTECTED,
            e.reads, e.committed_at)
