"""The cluster repair agent's calls on the Store: held records and repair reads.

On a cluster node the objects recovered from NVMe at start are held (``unverified``)
until the repair agent has checked them against the peers; these are the calls it
makes (through the event loop: kvstored/cluster/repair/local.py), plus the snapshot
and head reads it plans with. A mixin of Store: it uses the Store's ``index``,
``clock``, ``counters``, ``arena``, ``load``, ``nvme``, ``_walk_chunks`` and ``_unlink``.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from .entries import DEAD
from .eviction import PROTECTED

if TYPE_CHECKING:
    from .entries import Entry


_KEYLESS_STEP = 2048  # keyless rows placed between turns of the loop
_READ_BUCKETS = 17  # read counts are 16-bit: bit lengths 0..16


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

    async def repair_snapshot(self) -> list[tuple]:
        """(ns, key, size, checksum, unverified, pinned, protected, reads, committed_at) of every object,
        in repair order: unverified first (the node serves them once checked), then
        pinned, then read since put (protected segment), then most read (by powers of
        two of the read count; in index order within one).

        The index is walked ``WALK_CHUNK`` entries at a time with a turn of the event
        loop between (``_walk_chunks``): at ~1.1 us an object, one pass and a sort held the
        loop ~1 s per million objects at every repair pass (a 16 M-object node: longer
        than its etcd lease). The order is built from buckets, not sorted.

        The keys of NVMe-only entries are not in RAM: they are read in bulk, one region
        summary per region (``NvmeTier.keys_at``); an entry whose key cannot be read (its
        record reclaimed meanwhile, a bad summary and header) is left out of this pass."""
        # unverified, pinned, protected, then one bucket per power of two of reads, most first
        buckets: list[list] = [[] for _ in range(3 + _READ_BUCKETS)]
        keyless = []
        for chunk in self._walk_chunks(None):
            now = self.clock()
            for e in chunk:
                if e.state == DEAD:  # deleted since the walk listed it (dict index)
                    continue
                unverified, pinned, protected, reads = (e.unverified, e.pinned(now),
                                                        e.seg == PROTECTED, e.reads)
                b = (0 if unverified else 1 if pinned else 2 if protected
                     else 2 + _READ_BUCKETS - min(reads.bit_length(), _READ_BUCKETS - 1))
                if e.key_in_ram:
                    buckets[b].append((e.ns, e.key, e.size, e.checksum, unverified, pinned,
                                       protected, reads, e.committed_at))
                elif e.nvme is not None:
                    keyless.append((b, e.nvme, e.ns, e.size, e.checksum, unverified, pinned,
                                    protected, reads, e.committed_at))
            await asyncio.sleep(0)  # the loop serves clients between chunks
        if keyless:
            keys = await self.nvme.keys_at([k[1] for k in keyless])
            for i, (k, got) in enumerate(zip(keyless, keys)):
                if got is not None and got[0] == k[2]:
                    buckets[k[0]].append((k[2], got[1]) + k[3:])
                if i % _KEYLESS_STEP == _KEYLESS_STEP - 1:
                    await asyncio.sleep(0)
        return [r for bucket in buckets for r in bucket]

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
