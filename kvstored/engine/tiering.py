"""Moving objects between the DRAM tier and the NVMe tier.

With an NVMe tier, an entry lives in DRAM (``offset >= 0``), on NVMe (``nvme``
is a Location) or both. DRAM eviction demotes an entry (writes it to NVMe,
holding a reference so the slot cannot be reused meanwhile) and only then drops
the DRAM copy. Demotions are queued and written in batches by a few writer tasks
(``_demotion_writer``: many records per region write and per io_uring submission,
completed together), not a task each; a get of an NVMe-only entry promotes it back into a DRAM slot,
verifying its checksum. Deleting or overwriting an entry that has an NVMe copy
appends a tombstone so a restart does not bring it back. At start, the objects
found on NVMe are indexed (``recover``); at shutdown, DRAM-only objects may be
written out (``flush_to_nvme``, in batches as the demotion writers write).

Without an NVMe tier, an eviction is a removal from the index.
"""
from __future__ import annotations

import asyncio
import collections
import errno
import logging
import mmap
import time
from typing import TYPE_CHECKING, Callable

from kvstore.errors import NotFound

from .arena import SLOT_ALIGN
from .entries import DEAD, Entry
from .nvme import KeyMismatch
from .nvmeformat import DATA_START, FLAG_TOMBSTONE, FLAGS as _FLAGS, KEY as _KEY, NS as _NS, REL as _REL
from .nvmeio import HeaderPool
from .nvmescan import gc_paused

if TYPE_CHECKING:
    from .dram import DramTier
    from .entries import Index
    from .nvme import NvmeTier
    from .limits import StoreLimits

log = logging.getLogger("kvstored.store")


class Tiering:
    def __init__(self, nvme: "NvmeTier | None", index: "Index", dram: "DramTier",
                 limits: "StoreLimits", clock: Callable[[], float],
                 unlink: Callable[..., None], release: Callable[[Entry], None]):
        self.nvme = nvme
        self.index = index
        self.dram = dram
        self.limits = limits
        self.clock = clock
        # the Store's removal from the index (observer, tombstone, slot: Store._unlink)
        # and its reference release (frees a dead entry's slot)
        self._unlink = unlink
        self._release = release
        self.flush_not_kept = 0  # DRAM-only objects the last shutdown flush could not write
        self._flush_refused = 0  # objects the flush under way could not write (it tries again)
        # (id(entry), key) -> promotion in progress. The key too: a keyless entry is found
        # by fingerprint, so two gets of it may ask for different keys, and one's miss
        # (its header holds the other key) must not become the other's
        self._loading: dict[tuple[int, bytes], asyncio.Future] = {}
        self._tasks: set[asyncio.Task] = set()  # writers and tombstone writes in flight
        # demotions waiting for a writer: (entry, seq, key), in eviction order (the key read
        # once, when it was queued: a keyless entry's key record may be rewritten meanwhile)
        self._queue: collections.deque[tuple[Entry, int, bytes]] = collections.deque()
        self._queued_bytes = 0
        self._writers: set[asyncio.Task] = set()  # the demotion writers running (also in _tasks)
        self._batch_bufs: list[_BatchBuffer] = []  # idle writers' buffers, kept for the next
        # Aligned pages for objects under 4 KiB (their arena slots are not page aligned, and
        # O_DIRECT wants aligned buffers): promotions of such objects share these and wait
        # for one, so a burst of thousands holds BOUNCE_PAGES pages, not a mapping each
        # (vm.max_map_count: see nvmeio.HeaderPool). Demotions and the shutdown flush copy
        # theirs into their batch's pages (_BatchBuffer).
        self._bounce = HeaderPool(BOUNCE_PAGES) if nvme is not None else None
        if nvme is not None:
            # before any record (recovery adds them later): Locations pack on any drive size
            index.use_nvme_geometry(DATA_START, nvme.dev.region_size)
            nvme.can_reclaim = self._can_reclaim_region
            nvme.on_reclaim = self._drop_region

    # ------------------------------------------------------------ demotion
    def evict(self, e: Entry) -> bool:
        """Make ``e`` leave DRAM. True if its slot is free now (False: a demotion started)."""
        counters = self.dram.counters
        size = e.size
        counters["evictions"] += 1
        counters["evicted_bytes"] += size
        nvme = self.nvme
        if nvme is None:
            self._unlink(e, evicted=True)
            return True
        if e.nvme is not None:  # a clean copy is on NVMe already
            self.dram.drop_copy(e)
            return True
        # (admit's answer without the call when it admits everything: the common case)
        if (nvme.admission == "all" and not nvme.budget) or nvme.admit(size, e.reads):
            try:
                key = e.key  # keyless: its arena key record's (Store._key_of)
            except LookupError:  # ... rewritten by a local client: no record can name it
                self._unlink(e, evicted=True)
                return True
            try:
                self._start_demotion(e, size, key)
            except MemoryError:
                # the write's reference (the packed index's readers' table growing) could not
                # be taken, and nothing else has changed: the object leaves as an eviction
                # without a copy would, counted lost, so a slab being reclaimed still drains
                nvme.counters["demotion_failures"] += 1
                log.warning("NVMe demotion skipped: the index is out of memory; object dropped",
                            extra={"namespace": e.ns.decode(errors="replace"), "size": size})
                self._unlink(e, evicted=True)
                return True
            return False
        self._unlink(e, evicted=True)
        return True

    def _start_demotion(self, e: Entry, size: int, key: bytes) -> None:
        # the write reads the slot: it must not be freed or reused meanwhile. First: its
        # MemoryError (the packed index) must leave nothing changed (evict relies on it)
        e.refs += 1
        # what the arena counts used for its slot (slot and key record: SizeClass.footprint),
        # so evict_down stops at its target, not past it by the slots' slack
        self.dram.demoting_bytes += e.sc.footprint
        nvme = self.nvme
        seq = nvme.seq  # (next_seq, inlined)
        nvme.seq = seq + 1
        # taken now, in line with deletes: from here its tombstones are carried until it lands
        nvme.writing_begins(e.ns, key, seq)
        self._queue.append((e, seq, key))
        self._queued_bytes += size
        n = len(self._writers)
        if n < DEMOTION_WRITERS and (n == 0 or len(self._queue) > n * DEMOTION_BATCH_RECORDS
                                     or self._queued_bytes > n * DEMOTION_BATCH_BYTES):
            self._start_writer()

    def _start_writer(self) -> None:
        t = asyncio.get_running_loop().create_task(self._demotion_writer())
        self._writers.add(t)
        self._tasks.add(t)
        t.add_done_callback(self._writer_done)

    def _writer_done(self, t: asyncio.Task) -> None:
        self._writers.discard(t)
        self._tasks.discard(t)
        if t.cancelled():
            return
        err = t.exception()
        if err is not None:  # a bug: said loudly, and the queue not left without a writer
            # (its records would wait, holding their DRAM, until the next demotion started one)
            log.error("NVMe demotion writer failed; %d demotions queued go to a new one",
                      len(self._queue), exc_info=err)
            if self._queue and not self._writers:
                self._start_writer()

    async def _demotion_writer(self) -> None:
        """Write queued demotions in batches until the queue is empty (then end: the next
        demotion starts a writer again). A batch is at most DEMOTION_BATCH_RECORDS records
        and DEMOTION_BATCH_BYTES bytes, written by ``NvmeTier.append_batch``; the records
        of each of its writes are completed (``_demoted``) as that write lands."""
        buf = self._batch_bufs.pop() if self._batch_bufs else _BatchBuffer()
        queue = self._queue
        try:
            while queue:
                batch, size = [], 0
                while queue and len(batch) < DEMOTION_BATCH_RECORDS:
                    item = queue.popleft()
                    e = item[0]
                    esize = e.size  # (each field of a packed entry is read once: a C call)
                    if batch and size + esize > DEMOTION_BATCH_BYTES:
                        queue.appendleft(item)  # the next batch's first
                        break
                    self._queued_bytes -= esize
                    if e.state == DEAD:  # deleted or overwritten while queued: not written
                        self._demoted(e, item[1], None, e.ns, item[2])
                        continue
                    batch.append(item)
                    size += esize
                if batch:
                    await self._write_batch(batch, buf)
        finally:
            # (here, not in the done callback: a demotion queued after the loop's last look
            # and before that callback ran would find this writer listed and start none)
            self._writers.discard(asyncio.current_task())
            self._batch_bufs.append(buf)

    def _batch_records(self, batch: list, buf: "_BatchBuffer") -> list:
        """``append_batch``'s records of ``batch`` (``(entry, seq, key)`` each): payloads are
        the arena slots, or ``buf``'s pages for sub-page slots (not page aligned: O_DIRECT)."""
        view = self.dram.arena.view
        recs = []
        for j, (e, seq, key) in enumerate(batch):
            off, size, slot = e.offset, e.size, e.sc.slot_size
            if slot >= SLOT_ALIGN:
                payload = view[off:off + (size + BLOCK - 1) // BLOCK * BLOCK]
            else:  # a sub-page slot is not page aligned (O_DIRECT): through the batch's page
                payload = buf.pages[j]
                payload[:size] = view[off:off + size]
                payload[size:] = _ZERO_PAGE[size:]  # a reused page: no other object's bytes
                slot = SLOT_ALIGN  # NVMe records stay 4 KiB aligned
            recs.append((e.ns, key, payload, size, e.checksum, slot, e.committed_at, seq))
        return recs

    async def _write_batch(self, batch: list, buf: "_BatchBuffer") -> None:
        recs = self._batch_records(batch, buf)
        done = [False] * len(batch)

        def landed(i: int, loc) -> None:  # as each run of records lands (or fails)
            done[i] = True
            e, seq, _key = batch[i]
            rec = recs[i]
            self._demoted(e, seq, loc, rec[0], rec[1])  # (the key bytes read once)

        try:
            out = await self.nvme.append_batch(recs, buf.headers, landed)
        except BaseException as err:  # cancelled (shutdown), or a bug: append_batch reported
            # every record it wrote, once its write ended (the kernel reads their slots and
            # this batch's headers until then); one it never took is left as a failed write
            err = err if isinstance(err, OSError) else OSError(errno.ECANCELED, "cancelled")
            for i, (e, seq, key) in enumerate(batch):
                if not done[i]:
                    self._demoted(e, seq, err, e.ns, key)
            raise
        failed = [x for x in out if isinstance(x, OSError)]
        if failed:
            log.warning("demotion failed (%s); %d objects dropped from DRAM instead", failed[0],
                        len(failed))

    def _demoted(self, e: Entry, seq: int, loc, ns: bytes | None = None,
                 key: bytes | None = None) -> None:
        """A queued demotion ended: written at ``loc``, failed (None, or an OSError), or not
        tried (deleted while queued). ``ns``, ``key``: the entry's, when the caller has them."""
        nvme = self.nvme
        if nvme.closed:  # a write failed by the tier's close, after the arena's: exiting
            return
        if isinstance(loc, OSError):
            loc = None
        if ns is None:
            ns, key = e.ns, e.key
        nvme.writing_ends(ns, key, seq)
        dram = self.dram
        dram.demoting_bytes -= e.sc.footprint
        refs = e.refs - 1
        e.refs = refs
        if e.state == DEAD:  # deleted or overwritten meanwhile
            if loc is not None:  # the delete's tombstone has a higher seq already
                nvme.forget(loc, ns, key)
            if refs == 0:
                dram.free_slot(e.offset)
            return
        if loc is None:  # its only copy was the DRAM one being given up: the object is lost
            nvme.counters["demotion_failures"] += 1
            if refs == 0:
                self._unlink(e)
            return
        if not self._store_location(e, loc, ns, key):
            return  # its DRAM copy stays its only one (still listed: evicted again later)
        if refs == 0 and e.offset >= 0:
            dram.drop_copy(e)

    def _store_location(self, e: Entry, loc, ns: bytes, key: bytes) -> bool:
        """``e.nvme = loc`` for a record just written; False when the index cannot store it
        (MemoryError: a side table's growth). The record is then forgotten (its space goes
        back with its region) and tombstoned: a restart must not bring back a record this
        index never held (a later delete or overwrite of the key writes no tombstone for
        it). The entry is left as it was."""
        try:
            e.nvme = loc
            return True
        except MemoryError:
            nvme = self.nvme
            nvme.forget(loc, ns, key)
            self._spawn(self._tombstone(ns, key, nvme.next_seq()))
            nvme.counters["unindexed_records"] += 1
            log.warning("an NVMe record was written but the index is out of memory for its "
                        "location: the record is dropped, the object keeps its DRAM copy")
            return False

    def _spawn(self, coro) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------- removal
    def removed(self, e: Entry, tombstone: bool) -> None:
        """``e`` left the index: its NVMe copy is forgotten, and with ``tombstone`` (a
        user's delete/overwrite) a tombstone keeps it from coming back at restart."""
        if self.nvme is None:
            return
        stone = tombstone and (e.nvme is not None or e.refs)
        if not (stone or e.nvme is not None):
            return
        try:
            key = e.key  # a keyless entry's is read from its header (Store._unlink restores it when known)
        except LookupError:
            # its header no longer verifies: a restart's scan skips that record anyway
            log.warning("NVMe record at %s: key unreadable; its deletion is not recorded on NVMe", e.nvme)
            e.nvme = None
            return
        if stone:
            # also when a demotion is in flight (refs): its record must not outlive the delete
            self._spawn(self._tombstone(e.ns, key, self.nvme.next_seq()))
        if e.nvme is not None:
            self.nvme.forget(e.nvme, e.ns, key)
            e.nvme = None

    async def _tombstone(self, ns: bytes, key: bytes, seq: int) -> None:
        try:
            await self.nvme.append(ns, key, None, 0, 0, 0, time.time(), tombstone=True, seq=seq)
        except OSError as err:
            log.error("could not persist the deletion of an NVMe object (%s); it may reappear "
                      "after a restart", err)

    # ----------------------------------------------------------- promotion
    async def load(self, e: Entry, key: bytes) -> None:
        """Promote an NVMe-only entry, asked for as ``key``, into DRAM (verified), or raise
        NotFound if its copy is bad or (a keyless entry, found by fingerprint) holds
        another key."""
        pending = self._loading.get((id(e), key))
        if pending is not None:
            await asyncio.shield(pending)
            return
        # first: a reference the index cannot store (MemoryError: the readers' side table's
        # growth) must not leave a load registered that nothing ends (its waiters would hang)
        e.refs += 1  # keeps its region from being reclaimed while we read
        fut = asyncio.get_running_loop().create_future()
        self._loading[(id(e), key)] = fut
        dram = self.dram
        off = page = None
        try:
            off = await dram.alloc_wait(e.sc)
            loc = e.nvme
            small = e.sc.slot_size < SLOT_ALIGN  # not page aligned: read through a bounce page
            if small:
                page, dest = await self._bounce.take_wait()
                dest = dest[:_align(e.size)]
            else:
                dest = dram.arena.view[off:off + _align(e.size)]
            try:
                # a keyless entry was matched by fingerprint: the header must hold ``key``
                ok = loc is not None and await self.nvme.read(
                    loc, dest, expect=None if e.key_in_ram else (e.ns, key))
            except KeyMismatch:
                dram.free_slot(off)
                off = None
                self.nvme.counters["misses"] += 1
                raise NotFound("no such key (the record of the same fingerprint holds another)") \
                    from None
            if ok and small:
                dram.arena.view[off:off + e.size] = dest[:e.size]
            if e.state == DEAD or e.nvme != loc:  # != : a packed index rebuilds Locations
                dram.free_slot(off)
                off = None
                raise NotFound("object was deleted while being read")
            if not ok:
                dram.free_slot(off)
                off = None
                self.nvme.counters["misses"] += 1
                self._unlink(e, tombstone=True, key=key)
                raise NotFound("object failed its checksum on NVMe and was dropped")
            self.nvme.counters["hits"] += 1
            self.nvme.counters["promotions"] += 1
            if not e.key_in_ram:  # its header holds ``key``: in RAM while it is linked
                self.index.restore_key(e, key)
            dram.link_loaded(e, off)
            dram.keep_key_in_arena(e, off, e.sc, key)  # ... then in its slot's key record
            off = None
            fut.set_result(None)
        except BaseException as exc:
            if off is not None:
                dram.free_slot(off)
            fut.set_exception(exc if isinstance(exc, Exception) else NotFound("load cancelled"))
            fut.exception()  # retrieved here; waiters re-raise their own
            raise
        finally:
            if page is not None:
                self._bounce.give(page)
            del self._loading[(id(e), key)]
            self._release(e)

    # ------------------------------------------------------------ recovery
    def recover(self, hold: bool) -> None:
        """Index the objects found on NVMe at start (they stay there until read), region by
        region as the tier decodes them (NvmeTier.recover_into: the peak is the index and
        one region's rows, not every row at once). ``hold``: a cluster node's records stay
        hidden until the repair agent checks them."""
        index = self.index
        with gc_paused():  # millions of long-lived entries: no collection per 700 of them
            skipped = self.nvme.recover_into(_RecoverySink(index, self.dram.arena.class_for, hold),
                                             self.limits.max_value_size)
        if skipped:
            log.warning("%d objects on NVMe exceed max_value_size and are ignored", skipped)
        log.info("NVMe tier: %d objects recovered%s", len(index),
                 " (held from clients until verified by the cluster)" if index.unverified else "")

    # -------------------------------------------------------- region reclaim
    def _can_reclaim_region(self, region, rows) -> bool:
        """Whether ``region`` may be reclaimed: no NVMe-only object whose record is one of
        ``rows`` (NvmeTier.region_rows) is pinned or being read."""
        now = self.clock()
        for e, _key in self._entries_of(region, rows):
            if e.offset < 0 and (e.refs or e.pinned(now)):
                return False  # pinned objects keep their only copy; reads in flight finish
        return True

    def _drop_region(self, region, rows) -> None:
        """``region`` is reclaimed: entries whose NVMe copy was one of ``rows`` lose it, and
        leave the index when it was their only copy."""
        for e, key in self._entries_of(region, rows):  # (each row looked up after the last unlink)
            if e.offset < 0:
                if not e.key_in_ram:  # the row has it: no header read for the KV event
                    self.index.restore_key(e, key)
                e.nvme = None
                self._unlink(e)
            else:  # it keeps its key where it is: RAM, or its DRAM slot's key record
                e.nvme = None

    def _entries_of(self, region, rows):
        """(entry, key) of the index entries whose ``nvme`` Location is the very record of a row of
        ``region`` (same region, generation and offset): an entry of the same key whose
        copy is elsewhere, or a newer one, is not touched."""
        get = self.index.get
        index, gen, base = region.index, region.generation, region.base
        for row in rows:
            if row[_FLAGS] & FLAG_TOMBSTONE:  # no entry points at a tombstone
                continue
            e = get(row[_NS], row[_KEY])
            if e is None:
                continue
            loc = e.nvme
            if (loc is not None and loc.region == index and loc.generation == gen
                    and loc.offset == base + row[_REL]):
                yield e, row[_KEY]

    # ------------------------------------------------------------ shutdown
    async def flush_to_nvme(self, timeout: float) -> int:
        """Demote every DRAM-only object (shutdown); returns how many were written.

        Never at the cost of what is on NVMe already: meanwhile the tier reclaims only
        regions holding no live object. Objects that do not fit (or miss the deadline),
        and those refused in the last walk (a key record that no longer verifies, the
        index out of memory for a reference or a location), stay DRAM-only and are lost
        at exit: ``flush_not_kept`` counts them, and a warning says so. Most-read objects
        go first.
        """
        self.flush_not_kept = 0
        if self.nvme is None:
            return 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        written = 0
        why = ""
        if self._writers:  # demotions in flight first: they would be written twice
            await asyncio.wait(set(self._writers), timeout=max(0.0, deadline - loop.time()))
        self.nvme.keep_live = True
        self._flush_refused = 0
        try:
            for todo in self._flush_chunks(deadline):
                n, why = await self._flush_chunk(todo, deadline)
                written += n
                del todo
                if why:
                    break
        finally:
            self.nvme.keep_live = False
        # what is left DRAM-only is lost at exit: after a stop (why), or when objects were
        # refused (key record unreadable, index out of memory): one refused in the last
        # walk is not written again
        if why or self._flush_refused:
            self.flush_not_kept = self._dram_only_count()
            why = why or "objects refused (key unreadable or index out of memory)"
        if self.flush_not_kept:
            log.warning("shutdown flush: %s; %d DRAM-only objects could not be kept and are lost "
                        "at exit (%d written)", why, self.flush_not_kept, written)
        return written

    def _dram_only_count(self) -> int:
        """Live objects whose only copy is in DRAM (after a flush: those lost at exit)."""
        return sum(1 for x in self.index.iterate()
                   if x.nvme is None and x.offset >= 0 and x.state != DEAD)

    def _flush_chunks(self, deadline: float):
        """The DRAM-only objects, most-read first, in lists of a bounded length: holding a
        view of every object at once costs ~100 B each (~1 GB per 10 M objects).

        A first walk counts objects per read count; the counts are cut into ranges of
        about ``cap`` objects (a read count holding more is split by slot number: no key
        read), each fetched by one walk, so at most about 2 * ``_FLUSH_PASSES`` walks follow (none
        past the deadline: an empty chunk then). A last walk takes what is still DRAM-only
        (an object read meanwhile into a range already written)."""
        loop = asyncio.get_running_loop()
        hist: dict[int, int] = {}
        for e in self.index.iterate():
            if e.nvme is None and e.offset >= 0:
                r = e.reads
                hist[r] = hist.get(r, 0) + 1
        cap = max(_FLUSH_CHUNK, -(-sum(hist.values()) // _FLUSH_PASSES))
        plan: list[tuple[int, int | None, int]] = []  # (lowest reads, above-highest, parts)
        acc, hi = 0, None
        for r in sorted(hist, reverse=True):
            n = hist[r]
            if n > cap:
                if acc:
                    plan.append((r + 1, hi, 1))
                plan.append((r, r + 1, -(-n // cap)))
                acc, hi = 0, r
                continue
            acc += n
            if acc >= cap:
                plan.append((r, hi, 1))
                acc, hi = 0, r
        if acc:
            plan.append((0, hi, 1))
        del hist
        plan.append((0, None, 1))
        for lo, hi, parts in plan:
            for part in range(parts):
                if loop.time() >= deadline:
                    yield []  # _flush_chunk reports the deadline
                    return
                yield sorted((e for e in self.index.iterate()
                              if e.nvme is None and e.offset >= 0 and e.reads >= lo
                              and (hi is None or e.reads < hi)
                              and (parts == 1 or e.offset // e.sc.slot_size % parts == part)),
                             key=_most_read)

    async def _flush_chunk(self, todo: list, deadline: float) -> tuple[int, str]:
        """Write ``todo`` in order, in batches (``append_batch``, as the demotion writers do;
        up to DEMOTION_WRITERS in flight): (how many were written, why it stopped or "")."""
        loop = asyncio.get_running_loop()
        written, why = 0, ""
        flying: set[asyncio.Task] = set()
        i = 0
        try:
            while True:
                while i < len(todo) and len(flying) < DEMOTION_WRITERS and not why:
                    if loop.time() >= deadline:
                        why = "the flush reached its deadline"
                        break
                    batch, size = [], 0
                    while i < len(todo) and len(batch) < DEMOTION_BATCH_RECORDS and (
                            not batch or size + todo[i].size <= DEMOTION_BATCH_BYTES):
                        e = todo[i]
                        i += 1
                        if e.state != DEAD and e.nvme is None:
                            batch.append(e)
                            size += e.size
                    if batch:
                        flying.add(loop.create_task(self._flush_batch(batch)))
                if not todo and loop.time() >= deadline:  # (an empty chunk from a walk not taken)
                    why = "the flush reached its deadline"
                if not flying:
                    return written, why
                done, flying = await asyncio.wait(flying, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    n, err = t.result()
                    written += n
                    if err is not None and not why:  # the batches in flight still land
                        why = f"NVMe tier full or failing ({err.strerror or err})"
        except BaseException:
            for t in flying:  # (each still waits for its writes, then reports its records)
                t.cancel()
            # ... and so does this chunk: flush_to_nvme's caller turns keep_live off once it
            # returns, which must not happen while a batch's writes are in the kernel
            while flying:
                try:
                    await asyncio.shield(asyncio.wait(flying))
                except asyncio.CancelledError:
                    pass
                flying = {t for t in flying if not t.done()}
            raise

    async def _flush_batch(self, batch: list) -> tuple[int, OSError | None]:
        """Write ``batch`` (DRAM-only entries) with one ``append_batch``; each entry keeps its
        DRAM copy and gains its NVMe one. (how many were written, the first error)."""
        nvme = self.nvme
        buf = self._batch_bufs.pop() if self._batch_bufs else _BatchBuffer()
        items = []
        for e in batch:
            try:
                key = e.key  # keyless: its arena key record's
            except LookupError:  # ... rewritten by a local client: no record can name it
                log.warning("shutdown flush: an object whose key record in the arena no longer "
                            "verifies is not written")
                self._flush_refused += 1
                continue
            try:
                e.refs += 1  # its slot is read by the write: not freed meanwhile
            except MemoryError:  # the readers' side table could not grow: not written now
                self._flush_refused += 1
                continue
            seq = nvme.next_seq()
            nvme.writing_begins(e.ns, key, seq)
            items.append((e, seq, key))
        done = [False] * len(items)
        written, first_err = 0, None

        def landed(i: int, loc) -> None:
            nonlocal written, first_err
            done[i] = True
            e, seq, key = items[i]
            nvme.writing_ends(e.ns, key, seq)
            if isinstance(loc, OSError):
                first_err = first_err or loc
            elif e.state == DEAD:  # deleted meanwhile: its tombstone came later
                nvme.forget(loc, e.ns, key)
            elif self._store_location(e, loc, e.ns, key):
                written += 1
            else:
                self._flush_refused += 1  # a later walk writes it again, if one comes
            self._release(e)

        try:
            await nvme.append_batch(self._batch_records(items, buf), buf.headers, landed)
        except BaseException:  # cancelled, or a bug: append_batch reported what it wrote once
            # the write ended; one it never took has nothing in flight
            for i in range(len(items)):
                if not done[i]:
                    landed(i, OSError(errno.ECANCELED, "flush cancelled"))
            raise
        finally:
            self._batch_bufs.append(buf)
        return written, first_err

    def tasks_in_flight(self) -> set[asyncio.Task]:
        """A snapshot of the demotions and tombstone writes in flight: a caller that starts
        some can wait for exactly those (Store.delete_all's backpressure)."""
        return set(self._tasks)

    async def drain_tasks(self, timeout: float) -> None:
        """Let demotions and tombstones in flight finish (bounded), and the tier's own
        tasks they leave (summary writes, fdatasync waits)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        if self.nvme is not None and self.nvme.tasks:
            await asyncio.wait(list(self.nvme.tasks), timeout=max(0.0, deadline - loop.time()))

    def stats(self) -> dict | None:
        if self.nvme is None:
            return None
        return {"name": "nvme", "io_backend": self.nvme.io_backend,
                "io_backend_reason": self.nvme.io_backend_reason,
                "bounce_waits": self._bounce.waits, **self.nvme.stats()}


# The shutdown flush holds at most about max(_FLUSH_CHUNK, objects / _FLUSH_PASSES)
# entry views at once (see Tiering._flush_chunks).
_FLUSH_CHUNK = 1 << 16
_FLUSH_PASSES = 4  # ~1 s per walk of 10 M packed entries; the flush has 60 s


def _most_read(e: Entry) -> int:
    return -e.reads


# The demotion writers: at most DEMOTION_WRITERS batches in flight, each at most
# DEMOTION_BATCH_RECORDS records and DEMOTION_BATCH_BYTES bytes. A batch's records free
# their DRAM slots together, when the last is durable, so the bound is what a burst of
# small records waits on: 64 x 4 KiB records are one 512 KiB write (the per-record Python
# cost is what is left, the per-write cost is 1/64th), and four such writes in flight keep
# a drive busy. 8 MiB caps a batch of large objects (eight 1 MiB ones): four writers keep
# 32 MiB in flight, fio's bs=1M iodepth=32 in bench_nvme.py.
DEMOTION_WRITERS = 4
DEMOTION_BATCH_RECORDS = 64
DEMOTION_BATCH_BYTES = 8 << 20
BLOCK = SLOT_ALIGN  # the NVMe block: a header, a sub-page payload's page
_ZERO_PAGE = memoryview(bytes(BLOCK))

BOUNCE_PAGES = 64  # aligned pages shared by the promotions of sub-page objects


class _BatchBuffer:
    """A demotion writer's aligned pages: the batch's record headers and the pages its
    sub-page objects are copied to (O_DIRECT wants aligned buffers). One mapping per
    writer, reused: not a mapping per record (vm.max_map_count)."""

    __slots__ = ("mm", "headers", "pages")

    def __init__(self):
        n = DEMOTION_BATCH_RECORDS
        self.mm = mmap.mmap(-1, 2 * n * BLOCK)
        view = memoryview(self.mm)
        self.headers = view[:n * BLOCK]
        self.pages = [view[(n + i) * BLOCK:(n + i + 1) * BLOCK] for i in range(n)]


def _align(n: int, a: int = 4096) -> int:
    return (n + a - 1) // a * a


class _RecoverySink:
    """The Store's index as NvmeTier.recover_into sees it (its four calls, as
    nvme._DictSink describes them). Records go in keyless (the key stays on NVMe) and no
    Entry object is kept; a held record is counted by the index as it goes in."""

    __slots__ = ("index", "class_for", "classes", "hold")

    def __init__(self, index: "Index", class_for, hold: bool):
        self.index, self.class_for, self.hold = index, class_for, hold
        self.classes: dict = {}  # length -> size class: a restart sees few distinct lengths

    def _size_class(self, length: int):
        sc = self.classes.get(length)
        if sc is None:
            sc = self.classes[length] = self.class_for(length)
        return sc

    def add(self, ns, key, loc, committed_at) -> None:
        self.index.add(ns, key, -1, loc.length, loc.checksum, self._size_class(loc.length),
                       committed_at, loc, self.hold, keyless=True)

    def add_many(self, items: list) -> list[int]:
        index, hold = self.index, self.hold
        footprint = getattr(index, "footprint", None)  # the packed index's counts
        before = footprint()["keyless"] if footprint else 0
        collided = []
        index_add, get_class = index.add, self.classes.get
        for i, (ns, key, loc, committed_at) in enumerate(items):  # add(), inlined: hot
            length = loc.length
            sc = get_class(length) or self._size_class(length)
            try:
                index_add(ns, key, -1, length, loc.checksum, sc, committed_at, loc, hold,
                          keyless=True)
            except KeyError:  # the dict index, or a key held keyed: indexed already
                collided.append(i)
        if footprint and footprint()["keyless"] - before != len(items) - len(collided):
            # the packed index keeps keyed a record whose fingerprint a keyless one has
            # (maybe the same key from an earlier region): undo those, the tier decides
            done = set(collided)
            for i, (ns, key, loc, _at) in enumerate(items):
                if i in done:
                    continue
                e = index.get(ns, key)
                if e is not None and e.key_in_ram and e.nvme == loc:
                    index.remove(e)
                    collided.append(i)
            collided.sort()
        return collided

    def lookup(self, ns, key):
        e = self.index.get(ns, key)
        return None if e is None else e.nvme

    def remove(self, ns, key, loc) -> None:
        e = self.index.get(ns, key)
        if e is not None and e.nvme == loc:
            self.index.remove(e)
