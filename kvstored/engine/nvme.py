"""The NVMe tier: a file or block device carved into regions written as logs.

Its modules, one job each: nvmeformat (the on-disk layout and its codec: blocks,
headers, summaries), nvmedevice (opening, locking and formatting the device;
Region and Location), nvmescan (recovery at start: summaries read in batches,
regions without one scanned), nvmesync (fdatasync per ``nvme.sync``), nvmeio
(io_uring or threads) and this one: the tier's appends, reads, region allocation
and reclaim, and tombstones.

A region is reclaimed whole (the unit of eviction is the unit of allocation):
its generation goes up, so records left from before no longer match and are
ignored. A region sealed once all its records were written gets a summary at its
end, so a restart reads it instead of every record header (nvmescan).

No key per object is held in RAM here: a region counts its live records (and
marks forgotten ones in a bitmap, one bit per 4 KiB block), and the keys are read
back from disk when needed: ``region_rows`` (the in-memory summary of an open
region, the summary on disk of a sealed one, else a scan of its headers) for
reclaim and bulk walks (``keys_at``), one record header for ``key_at`` and for
``read(..., expect=(ns, key))``, which refuses a record holding another key.

Durability: a record counts as on NVMe once it and every record before it in
its region are written (the region's "durable frontier"); only then may the
DRAM copy go. Payloads are verified on every read.

About 550 lines on purpose: appends, the durable frontier, reclaim and tombstones
share the regions' state and its ordering rules; what could leave without that
state (format, device, scan, sync, I/O) already has.
"""
from __future__ import annotations

import asyncio
import contextvars
import ctypes
import errno
import logging
import mmap
import os
import time
from collections import Counter
from functools import partial
from operator import itemgetter

import xxhash

from .nvmedevice import Location, NvmeDevice, NvmeError, Region
from .nvmeformat import (BLOCK, COMMITTED, CSUM, DATA_START, FLAG_TOMBSTONE, FLAGS, KEY, LENGTH,
                         NS, REGION_HEADER, REGION_OVERHEAD, REL, SEQ, SUMMARY_ENTRY, align_up,
                         count_entries, key_digest, parse_record, parse_summary, parse_trailer,
                         record_header, record_header_into, region_header, summary_block, summary_entry, tail_size)
from .nvmeio import HeaderPool
from .nvmescan import SCAN_CHUNK, Found, gc_paused, scan, scan_rows
from .nvmesync import SYNC_MODES, Syncer

# the names callers (node, config, benchmarks, tests) import from here
__all__ = ["BLOCK", "DATA_START", "REGION_OVERHEAD", "Location", "NvmeDevice", "NvmeError",
           "NvmeTier", "Region", "SYNC_MODES", "align_up", "key_digest"]

log = logging.getLogger("kvstored.nvme")

BATCH_MAX_RECORDS = 256  # append_batch: two iovecs a record, under Linux's IOV_MAX (1024)
# append_batch: a run of records is one write of at most this many bytes (fio's block size
# in bench_nvme.py): big enough that a write costs little per record, small enough that the
# first records of a batch land (and free their DRAM) without waiting for the whole batch
RUN_MAX_BYTES = 1 << 20
REGION_WAIT = 5.0  # seconds an append may wait for a busy region to become reclaimable
# keys_at: up to this many wanted records of one region are read by their headers (4 KiB
# each); more, and the region's summary is read once instead
KEYS_AT_HEADERS = 8
_key_of = itemgetter(NS, KEY)
_ZERO_BLOCK = memoryview(bytes(BLOCK))
_ENTRY_SIZE = SUMMARY_ENTRY.size
# set while a reclaim carries tombstones: their appends do not wait for the size class's
# region taker (it may be the very append carrying them)
_CARRYING: contextvars.ContextVar[bool] = contextvars.ContextVar("nvme_carrying", default=False)
_flags_of = itemgetter(FLAGS)
_length_of = itemgetter(LENGTH)


def _trim_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc's malloc_trim; elsewhere
    nothing): recovery's large lists leave most of the heap free but mapped."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)


class KeyMismatch(LookupError):
    """``NvmeTier.read(..., expect=(ns, key))`` found a sound record of another key at the
    location: the index matched the wanted key by fingerprint only (a collision, or a
    region reused under the read). A miss for the reader; the record itself is not bad."""


class _Pending:
    """A write in flight in a region (``waiter``: done once the durable frontier passed it,
    or failed once the write itself has ended: never while the kernel may still read its
    buffers). ``failed``: an earlier write of the region failed while this one was in
    flight; it fails so when it ends."""
    __slots__ = ("length", "done", "waiter", "failed")

    def __init__(self, length: int, waiter):
        self.length = length
        self.done = False
        self.waiter = waiter
        self.failed: OSError | None = None


class NvmeTier:
    """Region allocation, appends, reads and reclaim over an NvmeDevice.

    The Store owns the index; this class owns regions and I/O, and keeps no key
    per live record in memory (a count per region): the keys are on disk, in the
    record headers and the region summaries (``region_rows``, ``key_at``,
    ``keys_at``, ``read(..., expect=)``). ``can_reclaim`` and ``on_reclaim`` are
    Store callbacks, called with a region and its rows: a region holding a
    pinned or being-read object is not reclaimed; reclaiming drops the Store's
    entries whose only copy was there (an entry whose ``nvme`` Location is one
    of the rows' records).

    ``sync`` says when written records are made durable against power loss
    (none | interval | always: nvmesync.Syncer).
    """

    def __init__(self, device: NvmeDevice, *, admission: str = "all", write_budget_per_hour: int = 0,
                 queue_depth: int = 32, sync: str = "interval", sync_interval: float = 1.0,
                 clock=time.monotonic):
        if admission not in ("all", "read"):
            raise NvmeError(f"nvme.admission must be 'all' or 'read', not {admission!r}")
        if sync not in SYNC_MODES:
            raise NvmeError(f"nvme.sync must be none, interval or always, not {sync!r}")
        if not 0.001 <= sync_interval <= 3600:
            raise NvmeError(f"nvme.sync_interval {sync_interval} is outside 0.001..3600 seconds")
        self.dev = device
        self.admission = admission
        self.budget = write_budget_per_hour
        self.sync = sync
        self.sync_interval = sync_interval
        self.clock = clock
        found = scan(device)
        self.regions, self.recovered = found.regions, found.found  # summaries, read by recover_into
        self.generation = max((r.generation for r in self.regions), default=0) + 1
        self.seq = found.max_seq + 1
        self.open: dict[int, Region] = {}
        self._taking: dict[int, asyncio.Future] = {}  # slot size -> its region taking (done: found one)
        self.headers = HeaderPool(max(queue_depth * 4, 64))
        # both get the region and its rows (region_rows; [] when it holds no live record)
        self.can_reclaim = lambda region, rows: True
        self.on_reclaim = lambda region, rows: None
        # set by the shutdown flush: reclaim only regions holding no live object, so
        # writing DRAM-only objects never destroys the only copy of another one
        self.keep_live = False
        self.stale_count: dict[tuple[bytes, bytes], int] = {}  # key -> regions with a stale record of it
        # key -> sequence numbers of its records being written: a delete may come first, and
        # its tombstone must not be reclaimed before the record lands (then forget marks it)
        # (one seq as an int, the common case: no list per demoted record; several, a list)
        self.writing: dict[tuple[bytes, bytes], int | list[int]] = {}
        self._budget_window = (clock(), 0)  # (window start, bytes written in it)
        self._key_buf: mmap.mmap | None = None  # key_at's aligned header block
        self._mismatch_logged = False
        self.closed = False  # close() writes the summaries still in flight itself
        # tasks the tier starts on its own (summary writes, fdatasync waits of ``always``):
        # held here so none is collected mid-flight, a failure is logged, and shutdown
        # waits for them (``tasks``) or cancels them (close)
        self.tasks: set[asyncio.Task] = set()
        self.counters = dict.fromkeys(
            ("hits", "misses", "demotions", "demoted_bytes", "promotions", "bytes_written",
             "bytes_read", "checksum_failures", "regions_reclaimed", "objects_dropped",
             "write_errors", "read_errors", "demotion_failures", "tombstones", "tombstones_carried", "not_admitted",
             "syncs", "sync_errors", "summaries_written", "summary_errors",
             # reads whose record header named another key than expected; regions whose
             # records had to be found by a header scan outside a restart, and its resyncs
             "key_mismatches", "region_scans", "scan_resyncs",
             # records written whose location the index had no memory for (Tiering._store_location)
             "unindexed_records"), 0)
        self.counters.update(found.stats)
        self.syncer = Syncer(device.fd, sync, sync_interval, self.counters)
        self.counters["io_backend_fallback"] = int(device.io_backend != "io_uring")

    # -- recovery -------------------------------------------------------------
    def recovered_objects(self) -> list[tuple[bytes, bytes, Location, float]]:
        """The newest record of every key that was not deleted afterwards, as
        ``(ns, key, location, committed_at)``: ``recover_into`` with a dict as the index
        (tests, tools; a restart streams into the Store's index instead). Once."""
        sink = _DictSink()
        self.recover_into(sink)
        return [(ns, key, loc, at) for (ns, key), (loc, at) in sink.d.items()]

    def recover_into(self, sink, max_length: int | None = None) -> int:
        """Index what the scan found (once), a region (or a slice of one) at a time: the
        newest record of every key not deleted afterwards goes to ``sink``, an index seen
        through four calls (``add_many``, ``add``, ``lookup``, ``remove``: _DictSink says
        what each does), whatever order the regions (and slices) are read in. Then gives
        recovery's memory back (``settle_after_recovery``).

        Also rebuilds how many live records each region holds (a count: the keys stay
        on disk), which keys have stale records where (older versions, deleted objects)
        and which regions hold tombstones, so reclaim keeps deletes deleted. A newest
        record longer than ``max_length`` is not indexed but forgotten (stale). Returns
        how many were. Memory: the index, a window of summaries read again from disk
        (nvmescan.REREAD_WINDOW; the scan kept where they are, not their bytes), the rows
        of one slice (nvmescan.ROWS_SLICE entries), and a dict of the keys met with
        several records or a tombstone (issue 13: the peak was ~560 B per record with
        every row at once, ~110 B with every summary body held)."""
        with gc_paused():
            skipped = self._recover_into(sink, max_length)
        self.settle_after_recovery()
        return skipped

    def settle_after_recovery(self) -> None:
        """Move what the tier keeps per region out of the memory recovery used.

        The scan and recovery build millions of short-lived rows; the few objects each
        region keeps (its counters, sets) are made among them, so each pins a 1 MiB arena
        of CPython's small-object allocator that the freed rows cannot give back: a
        restarted node stayed at recovery's peak (~560 B per record, 1 M records). Made
        again here, after the rows are gone, they land in arenas still in use, and the
        emptied arenas return to the OS. ``recover_into`` calls it once the recovered
        objects are indexed."""
        def fresh(v):
            if type(v) is int:
                return -(-v)  # a new int object (small ints are shared and cost nothing)
            if type(v) in (set, dict, bytearray):
                return type(v)(v)
            return v
        self.generation, self.seq = fresh(self.generation), fresh(self.seq)
        for r in self.regions:
            for name, v in vars(r).items():
                setattr(r, name, fresh(v))
        for name, v in self.counters.items():
            self.counters[name] = fresh(v)
        _trim_heap()

    def _recover_into(self, sink, max_length: int | None) -> int:
        found, self.recovered = self.recovered, Found(self.dev)
        # Most keys have one record and no tombstone: their record is live and nothing
        # of theirs is stale. Such records go to the sink in bulk; a key seen twice in a
        # region, a tombstone, an over-long record, a key already met with several records
        # (``special``) and a key the sink already holds (an earlier region or slice) go through
        # the per-record rules (_offer), which compare sequence numbers.
        special: dict = {}  # (ns, key) -> [seq, region | None (tombstone), loc, indexed]
        for r, rows in found.take(self.counters):  # summaries read again, a window at a time
            index, base, gen = r.index, r.base, r.generation
            ks = list(map(_key_of, rows))
            slow = set(filter(special.__contains__, ks)) if special else set()
            if len(set(ks)) != len(ks):
                slow.update(k for k, n in Counter(ks).items() if n > 1)
            if any(map(_flags_of, rows)):
                slow.update(k for k, row in zip(ks, rows) if row[FLAGS] & FLAG_TOMBSTONE)
            if max_length is not None and max(map(_length_of, rows)) > max_length:
                slow.update(k for k, row in zip(ks, rows) if row[LENGTH] > max_length)
            bulk = rows if not slow else [row for k, row in zip(ks, rows) if k not in slow]
            items = [(row[NS], row[KEY], Location(index, base + row[REL], row[LENGTH], row[CSUM], gen),
                      row[COMMITTED]) for row in bulk]
            collided = sink.add_many(items)
            r.live_count += len(items) - len(collided)
            for i in collided:  # the sink holds a record of the key from an earlier region
                ns, key, loc, _at = items[i]
                self._offer(special, sink, r, bulk[i], (ns, key), loc, max_length)
            del items, bulk
            if slow:
                for k, row in zip(ks, rows):
                    if k in slow:
                        self._offer(special, sink, r, row, k, None, max_length)
            del ks, rows, slow
        # a region scanned because its summary failed the second read holds the records
        # the summary listed (the scan saw their sequence numbers): this only guards that
        self.seq = max(self.seq, found.max_seq + 1)
        skipped = 0
        for k, cur in special.items():
            if cur[1] is not None and not cur[3]:  # the newest is too long to serve
                self.forget(cur[2], k[0], k[1])
                skipped += 1
        return skipped

    def _offer(self, special: dict, sink, r: Region, row: tuple, k: tuple, loc, max_length) -> None:
        """Record ``row`` of region ``r`` for key ``k`` against the newest record seen so far:
        in ``special``, else the sink's (its sequence number read from the record header)."""
        seq, tomb = row[SEQ], row[FLAGS] & FLAG_TOMBSTONE
        if tomb:
            r.tombs[k] = max(seq, r.tombs.get(k, 0))
        cur = special.get(k)
        if cur is None:
            held = sink.lookup(k[0], k[1])
            if held is not None:
                old = self._record_row(held)
                if old is None:  # unreadable now: the record being recovered replaces it
                    cur = [-1, self.regions[held.region], held, True]
                elif (old[NS], old[KEY]) == k:
                    cur = [old[SEQ], self.regions[held.region], held, True]
                # else another key of equal fingerprint (the packed index): not this key's
        if cur is not None and cur[0] >= seq:  # an older record (or an older tombstone)
            if not tomb:
                self._mark_stale(r, k)
            special[k] = cur
            return
        if cur is not None and cur[1] is not None:  # the live record it replaces is stale
            if cur[3]:
                sink.remove(k[0], k[1], cur[2])
            cur[1].live_count -= 1
            self._mark_stale(cur[1], k)
        if tomb:
            special[k] = [seq, None, None, False]
            return
        if loc is None:
            loc = Location(r.index, r.base + row[REL], row[LENGTH], row[CSUM], r.generation)
        indexed = max_length is None or row[LENGTH] <= max_length
        if indexed:
            sink.add(k[0], k[1], loc, row[COMMITTED])
        r.live_count += 1
        special[k] = [seq, r, loc, indexed]

    def _record_row(self, loc: Location) -> tuple | None:
        """The row of the record header at ``loc`` (one synchronous 4 KiB read: ``key_at``, and
        recovery's sequence number of a record the index holds), or None when it cannot be
        read or does not verify."""
        if self._key_buf is None:
            self._key_buf = mmap.mmap(-1, BLOCK)  # aligned: the device may be O_DIRECT
        buf = self._key_buf
        if not self.dev.read_into(buf, loc.offset):
            self.counters["read_errors"] += 1
            return None
        return self._row_at(memoryview(buf), loc)

    def _mark_stale(self, r: Region, k: tuple[bytes, bytes]) -> None:
        if k not in r.stale:
            r.stale.add(k)
            self.stale_count[k] = self.stale_count.get(k, 0) + 1

    # -- admission --------------------------------------------------------------
    def admit(self, size: int, read_count: int) -> bool:
        if self.admission == "read" and read_count == 0:
            self.counters["not_admitted"] += 1
            return False
        if self.budget:
            start, used = self._budget_window
            now = self.clock()
            if now - start >= 3600:
                start, used = now, 0
            if used + size > self.budget:
                self._budget_window = (start, used)
                self.counters["not_admitted"] += 1
                return False
            self._budget_window = (start, used + size)
        return True

    # -- writes ---------------------------------------------------------------
    @staticmethod
    def _fits(r: Region, rec_len: int, entry_len: int) -> bool:
        """Room for the record, and for the summary once this record's entry is in it."""
        return r.write_ptr + rec_len + tail_size(len(r.summary) + entry_len) <= r.size

    async def _region_for(self, slot_size: int, rec_len: int, entry_len: int) -> Region | None:
        if REGION_HEADER + rec_len + tail_size(entry_len) > self.dev.region_size:
            raise OSError(errno.EFBIG, f"a {rec_len}-byte record does not fit in a region")
        # one append per size class takes a region at a time: taking one awaits (its rows
        # are read, tombstones carried), and appends arriving meanwhile would each reclaim
        # another region, dropping its objects for nothing. The tombstones a carry writes
        # do not wait (their own taker may be the one carrying).
        for _ in range(64):  # bounded: each pass waits for another append's taking
            r = self.open.get(slot_size)
            if r is not None and self._fits(r, rec_len, entry_len):
                return r
            taking = self._taking.get(slot_size)
            if taking is None or _CARRYING.get():
                break
            if not await asyncio.shield(taking):
                return None  # it found no region either
        if r is not None:
            self._seal(r)
        done = asyncio.get_running_loop().create_future()
        mine = slot_size not in self._taking
        if mine:
            self._taking[slot_size] = done
        r = None
        try:
            r = await self._take_region()
        finally:
            if mine:
                del self._taking[slot_size]
                done.set_result(r is not None)
        if r is None:
            return None
        cur = self.open.get(slot_size)
        if cur is not None:  # a carry opened one while this append carried (tombstones)
            if self._fits(cur, rec_len, entry_len):
                self._retire(r)
                return cur
            self._seal(cur)
        r.generation = self.generation
        self.generation += 1
        r.slot_size, r.state, r.write_ptr, r.frontier = slot_size, "open", 0, 0
        r.summary, r.sum_state = bytearray(), ""
        r.live_count, r.dead = 0, None
        r.pending.clear()
        self.open[slot_size] = r
        # the region header (twice) is the first "record": the frontier passes it like any other
        block = memoryview(mmap.mmap(-1, REGION_HEADER))
        data = region_header(r.index, r.generation, slot_size, self.dev.seed)
        block[:len(data)] = data
        block[BLOCK:BLOCK + len(data)] = data
        self._write(r, [block], REGION_HEADER, None, None)
        return r

    def _retire(self, r: Region) -> None:
        """``r`` was reclaimed (its objects left the index) but is not opened now: give it a
        new generation on disk too, so that a restart before its next use does not bring
        its old records back (synchronous: two 4 KiB blocks, on a rare path)."""
        r.generation = self.generation
        self.generation += 1
        block = mmap.mmap(-1, REGION_HEADER)
        data = region_header(r.index, r.generation, 0, self.dev.seed)
        block[:len(data)] = data
        block[BLOCK:BLOCK + len(data)] = data
        try:
            os.pwritev(self.dev.fd, [memoryview(block)], r.base)
        except OSError as e:
            log.warning("nvme region %d: could not retire its header (%s); a restart may see "
                        "objects it dropped", r.index, e)
        r.state = "free"

    def _seal(self, r: Region) -> None:
        """The region takes no more records (full, or a write failed in it)."""
        if self.open.get(r.slot_size) is r:
            del self.open[r.slot_size]
        r.state = "full"
        self._maybe_summarize(r)

    def _maybe_summarize(self, r: Region) -> None:
        """Write a sealed region's summary once every record in it is on disk (a summary
        must never name a record that a crash could still tear)."""
        if (r.state != "full" or r.summary is None or r.sum_state or r.pending
                or r.frontier != r.write_ptr):
            return
        buf = self._summary_block(r)
        r.sum_state = "writing"
        self._spawn(self._write_summary(r, r.generation, buf, r.base + r.size - len(buf)))

    def _spawn(self, coro) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(t)
        t.add_done_callback(self._task_done)

    def _task_done(self, t: asyncio.Task) -> None:
        self.tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:  # a bug: said, not lost
            log.error("NVMe tier task failed", exc_info=t.exception())

    def _summary_block(self, r: Region) -> mmap.mmap:
        return summary_block(r.summary, r.index, r.generation, r.slot_size, self.dev.seed)

    async def _write_summary(self, r: Region, gen: int, buf, offset: int) -> None:
        try:
            n = await self.dev.io.writev(offset, [memoryview(buf)])
            ok = n == len(buf)
        except OSError as e:
            if self.closed:  # the device closed under it: close() wrote this summary itself
                return
            ok = False
            log.warning("nvme region %d: summary write failed (%s); a restart scans it", r.index, e)
        if r.generation != gen:
            return
        r.sum_state = "written" if ok else "failed"
        r.summary = None  # on disk now (or never): free the memory
        self.counters["summaries_written" if ok else "summary_errors"] += 1

    async def _take_region(self) -> Region | None:
        """A free region, else the oldest reclaimable one; waits (bounded) while the only
        candidates are busy for a moment (writes or a summary in flight, tombstones being
        carried) rather than failing the append."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REGION_WAIT
        while True:
            r = await self._take_region_now()
            if r is not None or loop.time() >= deadline:
                return r
            if any(x.state == "free" for x in self.regions):
                continue  # one was handed back while this append waited on a carry
            if not any(x.state in ("carrying", "reclaiming") or (x.state == "full" and (x.pending or x.sum_state == "writing")
                                                 and not (self.keep_live and x.live_count))
                       for x in self.regions):
                return None
            await asyncio.sleep(0.002)

    async def _take_region_now(self) -> Region | None:
        for r in self.regions:
            if r.state == "free":
                return r
        # reclaim whole: the oldest full region that holds nothing pinned or being read
        for r in sorted((r for r in self.regions if r.state == "full" and not r.pending),
                        key=lambda r: r.generation):
            # changed while an earlier candidate carried; or its summary is being written
            if r.state != "full" or r.pending or r.sum_state == "writing":
                continue
            if self.keep_live and r.live_count:
                continue
            rows = await self._rows_to_reclaim(r)
            if rows is None or not self.can_reclaim(r, rows):
                continue
            needed = self._needed_tombstones(r)
            if needed:
                if not await self._carry(r, needed):
                    continue
                if r.state != "full" or r.pending or r.live_count or self._needed_tombstones(r):
                    continue
            self._reclaim(r, rows)
            return r
        return None

    async def _rows_to_reclaim(self, r: Region) -> list[tuple] | None:
        """The rows the Store's callbacks look up before ``r`` is reclaimed (none when it
        holds no live record), or None when ``r`` changed meanwhile. While they are read the
        region is "reclaiming": no other append takes it as a candidate too."""
        if not r.live_count:
            return []
        gen = r.generation
        r.state = "reclaiming"
        try:
            rows = await self.region_rows(r)
        except OSError as e:
            log.warning("nvme region %d: cannot read which records it holds (%s); not reclaimed",
                        r.index, e)
            return None
        finally:
            if r.generation == gen:
                r.state = "full"
        if r.generation != gen or r.pending or r.sum_state == "writing":
            return None
        return rows

    def _needed_tombstones(self, r: Region) -> list[tuple[tuple[bytes, bytes], int]]:
        """Tombstones in ``r`` whose key still has a stale record in another live region."""
        return [(k, seq) for k, seq in r.tombs.items()
                if self.stale_count.get(k) or self._writing_before(k, seq)]

    def _writing_before(self, k: tuple[bytes, bytes], seq: int) -> bool:
        """Whether a record of key ``k`` older than ``seq`` is being written."""
        w = self.writing.get(k)
        if w is None:
            return False
        return w < seq if type(w) is int else any(x < seq for x in w)

    async def _carry(self, r: Region, needed: list) -> bool:
        """Rewrite tombstones that must outlive ``r`` into the open tombstone region, with
        their original sequence numbers (a newer record of the key still wins)."""
        r.state = "carrying"  # no other append picks it meanwhile
        token = _CARRYING.set(True)  # the appends' tasks copy this context
        try:
            results = await asyncio.gather(
                *(self.append(k[0], k[1], None, 0, 0, 0, time.time(), tombstone=True, seq=seq)
                  for k, seq in needed), return_exceptions=True)
        finally:
            _CARRYING.reset(token)
            r.state = "full"
        failed = [e for e in results if isinstance(e, BaseException)]
        self.counters["tombstones_carried"] += len(needed) - len(failed)
        if failed:
            log.warning("could not carry %d tombstones out of region %d (%s); it is not reclaimed",
                        len(failed), r.index, failed[0])
            return False
        for k, _seq in needed:
            r.tombs.pop(k, None)  # the carried copies stand for them now
        return True

    def _reclaim(self, r: Region, rows: list[tuple]) -> None:
        self.on_reclaim(r, rows)
        self.counters["regions_reclaimed"] += 1
        self.counters["objects_dropped"] += r.live_count
        r.live_count = 0
        r.dead = None
        for k in r.stale:
            n = self.stale_count.get(k, 0) - 1
            if n > 0:
                self.stale_count[k] = n
            else:
                self.stale_count.pop(k, None)
        r.stale.clear()
        r.tombs.clear()
        r.state = "free"

    def _write(self, r: Region, bufs: list, rec_len: int, header_index: int | None, fut) -> None:
        """One record's write (``append``; a region header): as a run of one record, its
        header block given back when the write has ended (not before: the kernel reads it)."""
        rel = r.write_ptr
        r.write_ptr += rec_len
        r.pending[rel] = _Pending(rec_len, fut)
        self.syncer.writing()
        # (the backend's one-write call, as a task: nothing cancels it but the loop's end,
        # after close() waited for the device)
        f = asyncio.get_running_loop().create_task(self.dev.io.writev(r.base + rel, bufs))
        if header_index is not None:
            f.add_done_callback(lambda _f: self.headers.give(header_index))
        f.add_done_callback(partial(self._written, r, r.generation, rel, rec_len))

    def _write_done(self, r: Region, gen: int, rel: int, err: OSError | None) -> None:
        """The write at ``rel`` of ``r`` (generation ``gen``) finished (``err``: it failed):
        advance the region's durable frontier, or seal the region at ``rel``."""
        if r.generation != gen:  # cannot happen (pending regions are not reclaimed); be safe
            return
        p = r.pending.get(rel)
        if p is None:  # dropped by an earlier failure in this region
            return
        if p.failed is not None:  # an earlier write failed: this one has ended now
            del r.pending[rel]
            if p.waiter is not None and not p.waiter.done():
                p.waiter.set_exception(p.failed)
            return
        if err is not None:
            self.counters["write_errors"] += 1
            log.error("nvme write failed at offset %d: %s; sealing region %d", r.base + rel, err, r.index)
            # nothing after a failed record is reachable at restart: seal the region here;
            # no summary (it would list records that failed): a restart scans it
            r.summary = None
            self._seal(r)
            failed = OSError(errno.EIO, "nvme region write failed")
            for q_rel, q in list(r.pending.items()):
                if q_rel < rel:
                    continue
                if q_rel == rel or q.done:  # its write has ended: its buffers are free
                    del r.pending[q_rel]
                    if q.waiter is not None and not q.waiter.done():
                        q.waiter.set_exception(failed)
                else:  # still in flight: the kernel reads its buffers (a DRAM slot, a
                    # header block) until it ends, and the region is not reclaimed before
                    q.failed = failed
            r.write_ptr = rel
            return
        self.counters["bytes_written"] += p.length
        p.done = True
        # advance the durable frontier over every contiguous finished record
        while True:
            q = r.pending.get(r.frontier)
            if q is None or not q.done:
                break
            del r.pending[r.frontier]
            r.frontier += q.length
            if q.waiter is not None and not q.waiter.done():
                q.waiter.set_result(None)
        if r.state == "full":
            self._maybe_summarize(r)

    def writing_begins(self, ns: bytes, key: bytes, seq: int) -> None:
        """A record of the key with sequence number ``seq`` will be written (``append_batch``'s
        callers say so when they take ``seq``): its tombstones are carried until it lands."""
        k = (ns, key)
        writing = self.writing
        w = writing.get(k)
        if w is None:
            writing[k] = seq
        elif type(w) is int:
            writing[k] = [w, seq]
        else:
            w.append(seq)

    def writing_ends(self, ns: bytes, key: bytes, seq: int) -> None:
        k = (ns, key)
        writing = self.writing
        w = writing[k]
        if type(w) is int:
            if w != seq:
                raise ValueError(f"no record of sequence number {seq} being written for the key")
            del writing[k]
            return
        w.remove(seq)
        if len(w) == 1:
            writing[k] = w[0]

    async def append_batch(self, recs: list, headers: memoryview, landed=None) -> list:
        """Write many records (the demotion writer's batch, the shutdown flush) in few
        region appends; per record, in order, its Location once it and everything before
        it in its region are on disk (``append``'s promise), or the OSError that failed it.
        ``landed(i, result)``, if given, is called with each record's result as soon as it
        is known (a run's records together), before this returns: the caller frees DRAM
        as each run lands rather than once the slowest has.

        A record's buffers (its payload, its header block) are the kernel's until its
        write has ended, failed or not: its result comes only then. Cancelled (or failing
        on a bug) while writes are in flight, this still waits for them and reports every
        record (those never reserved as ECANCELED) before it re-raises.

        ``recs``: ``(ns, key, payload, length, checksum, slot_size, committed_at, seq)``
        each, ``payload`` as for ``append``; the caller took each ``seq`` with
        ``writing_begins`` and ends it. ``headers``: ``BLOCK * len(recs)`` aligned bytes,
        the records' header blocks, kept by the caller until this returns.

        Consecutive records of one size class that land in one region are one write
        (header, payload, header, payload, ...) of up to RUN_MAX_BYTES, and every write of
        the batch goes in one submission: one completion, one frontier step and one
        fdatasync (``always``) per run of records, not per record. A failed write fails its run and what follows it in
        its region (``_write_done``), as for single appends."""
        if len(recs) > BATCH_MAX_RECORDS:  # a run's iovecs (two a record) stay under IOV_MAX
            raise ValueError(f"append_batch takes at most {BATCH_MAX_RECORDS} records")
        out: list = [None] * len(recs)
        # [region, gen, rel, length, bufs, its records' indices, (unused), _Pending]: a
        # run's records need not be consecutive in ``recs`` (another size class's, in
        # another region, may come between them), so it lists them rather than a range
        runs: list[list] = []
        last_run: dict[int, list] = {}  # region index -> its run still being extended
        failed: dict[int, OSError] = {}  # slot size -> why no region was found for it
        refused: list[int] = []  # records that got no region (nothing of theirs in flight)
        loop = asyncio.get_running_loop()
        seed = self.dev.seed
        todo = 0  # runs[todo:] are reserved but not yet submitted
        stop: BaseException | None = None
        try:
            for i, (ns, key, payload, length, checksum, slot, at, seq) in enumerate(recs):
                err = failed.get(slot)
                if err is not None:
                    out[i] = err
                    refused.append(i)
                    continue
                rec_len = BLOCK + (length + BLOCK - 1) // BLOCK * BLOCK
                entry_len = _ENTRY_SIZE + len(ns) + len(key)
                r = self.open.get(slot)
                # (_fits, inlined: the summary's tail is align_up(its length) + BLOCK)
                if r is None or (r.write_ptr + rec_len + BLOCK
                                 + (len(r.summary) + entry_len + BLOCK - 1) // BLOCK * BLOCK > r.size):
                    # taking a region awaits: what is reserved goes out first (an append that
                    # waits for a region must hold no unsubmitted write a reclaim waits for)
                    todo = self._submit_runs(runs, todo)
                    last_run.clear()
                    try:
                        r = await self._region_for(slot, rec_len, entry_len)
                        if r is None:
                            raise OSError(errno.ENOSPC, "no NVMe region free or reclaimable")
                    except OSError as e:
                        out[i] = failed[slot] = e
                        refused.append(i)
                        continue
                rel = r.write_ptr
                block = headers[i * BLOCK:(i + 1) * BLOCK]
                record_header_into(block, ns, key, r.generation, seq, length, checksum, at, seed)
                r.summary += summary_entry(seq, rel, length, checksum, at, False, ns, key)
                r.write_ptr = rel + rec_len
                run = last_run.get(r.index)
                if run is not None and run[2] + run[3] == rel and run[3] + rec_len <= RUN_MAX_BYTES:
                    run[3] += rec_len
                    run[4] += (block, payload)
                    run[5].append(i)
                    run[7].length += rec_len  # not done before its write is: safe to grow
                else:
                    p = _Pending(rec_len, loop.create_future())
                    r.pending[rel] = p
                    run = [r, r.generation, rel, rec_len, [block, payload], [i], None, p]
                    runs.append(run)
                    last_run[r.index] = run
                out[i] = Location(r.index, r.base + rel, length, checksum, r.generation)
        except BaseException as e:  # cancelled while taking a region (or a bug): what is
            # reserved is written all the same, the rest fails
            stop = e
            err = e if isinstance(e, OSError) else OSError(errno.ECANCELED, "batch append interrupted")
            for i, x in enumerate(out):
                if x is None:
                    out[i] = err
                    refused.append(i)
        self._submit_runs(runs, todo)
        if landed is not None:
            for i in refused:  # no region was found for these
                landed(i, out[i])
        counters = self.counters
        for run in runs:  # (in reservation order: a region's runs land in this order)
            r, gen, mine, p = run[0], run[1], run[5], run[7]
            try:
                while True:
                    try:  # the frontier passed the run: it and all before it are on disk
                        await asyncio.shield(p.waiter)
                        break
                    except asyncio.CancelledError as c:
                        if p.waiter.cancelled():  # (nothing cancels it: be safe)
                            raise OSError(errno.ECANCELED, "write cancelled") from None
                        # the kernel may still read the run's buffers (DRAM slots, header
                        # blocks): the caller must not get them back before it ends
                        stop = c
            except OSError as e:
                for i in mine:
                    out[i] = e
                    if landed is not None:
                        landed(i, e)
                continue
            counters["demotions"] += len(mine)
            for i in mine:
                counters["demoted_bytes"] += recs[i][3]
            if r.generation == gen:
                r.live_count += len(mine)
            if landed is not None:
                for i in mine:
                    landed(i, out[i])
        if stop is not None:
            raise stop
        return out

    def _submit_runs(self, runs: list, start: int) -> int:
        """Submit the writes of ``runs[start:]`` (one submission); returns ``len(runs)``. Each
        write's completion advances its region's frontier as it comes (``_run_written``):
        a region with a write in flight is not reclaimed, and another append may be
        waiting for a region meanwhile."""
        if start >= len(runs):
            return start
        self.syncer.writing()
        futs = self._start_writes([(run[0].base + run[2], run[4]) for run in runs[start:]])
        written = self._written
        for run, f in zip(runs[start:], futs):
            f.add_done_callback(partial(written, run[0], run[1], run[2], run[3]))
        return len(runs)

    def _start_writes(self, reqs: list) -> list[asyncio.Future]:
        """The backend's writes of ``reqs`` (one submission); each future is done once the
        kernel has finished with that write's buffers."""
        try:
            return self.dev.io.writev_many(reqs)
        except OSError as e:  # the backend is closed
            loop = asyncio.get_running_loop()
            futs = []
            for _ in reqs:
                f = loop.create_future()
                f.set_exception(e)
                futs.append(f)
            return futs

    def _written(self, r: Region, gen: int, rel: int, length: int, f: asyncio.Future) -> None:
        """The write of ``length`` bytes at ``rel`` of ``r`` (generation ``gen``) ended."""
        err = OSError(errno.ECANCELED, "write cancelled") if f.cancelled() else f.exception()
        if err is None and f.result() != length:
            err = OSError(errno.EIO, f"short write ({f.result()} of {length} bytes)")
        if err is None and self.syncer.mode == "always":  # done once an fdatasync covers it
            self._spawn(self._run_synced(r, gen, rel))
            return
        if err is None:
            self.syncer.dirty = True  # (Syncer.written without its wait)
        self._write_done(r, gen, rel, err)

    async def _run_synced(self, r: Region, gen: int, rel: int) -> None:
        try:
            await self.syncer.written()
            err = None
        except OSError as e:  # not durable: as a failed write (_do_write does the same)
            err = e
        self._write_done(r, gen, rel, err)

    def next_seq(self) -> int:
        """A sequence number: at restart the highest one per key wins, so callers take it
        at the moment of the event (delete, demotion), not when the write is issued."""
        seq = self.seq
        self.seq += 1
        return seq

    async def append(self, ns: bytes, key: bytes, payload: memoryview | None, length: int,
                     checksum: int, slot_size: int, committed_at: float,
                     tombstone: bool = False, seq: int | None = None) -> Location:
        """Write a record; returns once it and everything before it in its region are on disk
        (and, with ``sync = always``, covered by an fdatasync).

        ``payload`` is a 4 KiB aligned view of ``align_up(length)`` bytes (an arena slot).
        """
        rec_len = BLOCK + (0 if tombstone else align_up(length))
        if seq is None:
            seq = self.next_seq()
        entry_len = SUMMARY_ENTRY.size + len(ns) + len(key)
        # A header block first, waiting while all are in flight (HeaderPool: the bound on
        # appends in flight). Not for the tombstones a region's carry writes: the appends
        # that hold blocks may be waiting for that very carry (_region_for), so those take
        # one if free, else map their own.
        hdr = self.headers.take() if _CARRYING.get() else await self.headers.take_wait()
        try:
            r = await self._region_for(slot_size if not tombstone else 0, rec_len, entry_len)
            if r is None:
                raise OSError(errno.ENOSPC, "no NVMe region free or reclaimable")
        except BaseException:
            if hdr is not None:
                self.headers.give(hdr[0])
            raise
        block = hdr[1] if hdr else memoryview(mmap.mmap(-1, BLOCK))
        data = record_header(ns, key, r.generation, seq, length, checksum, tombstone, committed_at,
                             self.dev.seed)
        block[:len(data)] = data
        block[len(data):] = bytes(BLOCK - len(data))
        bufs = [block] if tombstone else [block, payload]
        gen = r.generation
        r.summary += summary_entry(seq, r.write_ptr, length, checksum, committed_at, tombstone, ns, key)
        loc = Location(r.index, r.base + r.write_ptr, length, checksum, gen)
        fut = asyncio.get_running_loop().create_future()
        self._write(r, bufs, rec_len, hdr[0] if hdr else None, fut)
        k = (ns, key)
        if not tombstone:
            self.writing_begins(ns, key, seq)
        stop = None
        try:
            while True:
                try:
                    await asyncio.shield(fut)
                    break
                except asyncio.CancelledError as c:
                    if fut.cancelled():  # (nothing cancels it: be safe)
                        raise
                    # the kernel may still read ``payload`` (the caller's DRAM slot or
                    # bounce page): the caller gets it back only once the write has ended
                    stop = c
                except BaseException as err:  # the write failed
                    if stop is not None:
                        raise stop from err  # the cancellation still reaches the caller
                    raise
        finally:
            # the caller's forget (if the key was deleted meanwhile) follows without a pause
            if not tombstone:
                self.writing_ends(ns, key, seq)
        if tombstone:
            # kept even when the caller was cancelled meanwhile: the tombstone is on disk
            # and in the region's summary, and one left out of r.tombs is not carried when
            # the region is reclaimed (a deleted object would come back at a restart)
            self.counters["tombstones"] += 1
            if r.generation == gen:
                r.tombs[k] = max(seq, r.tombs.get(k, 0))
            if stop is not None:
                raise stop
        elif stop is not None:
            raise stop  # a demotion the caller gave up: no entry will point at the record
        else:
            self.counters["demotions"] += 1
            self.counters["demoted_bytes"] += length
            if r.generation == gen:
                r.live_count += 1
        return loc

    # -- reads ----------------------------------------------------------------
    async def read(self, loc: Location, dest: memoryview,
                   expect: tuple[bytes, bytes] | None = None) -> bool:
        """Read a record's payload into ``dest`` (aligned, ``align_up(length)`` bytes); verify it.

        With ``expect=(ns, key)`` the record header is read too (one readv: header, then
        payload), its own checksum verified and its namespace and key compared with
        ``expect`` (an index that keeps a fingerprint, not the key, must not serve another
        key's record): a sound header of another key raises KeyMismatch (counted in
        ``key_mismatches``), so the caller can tell it from a bad record (False)."""
        r = self.regions[loc.region]
        if r.generation != loc.generation:
            return False
        hdr = None
        if expect is not None:
            hdr = await self.headers.take_wait()
            block = hdr[1]
            bufs = [block, dest]
        else:
            bufs = [dest]
        try:
            n = await self.dev.io.readv(loc.offset if expect is not None else loc.offset + BLOCK, bufs)
            if expect is not None:
                n -= BLOCK
                if n < 0 or not self._header_is(block, loc, expect):
                    return False  # (another key's header raised KeyMismatch)
        except OSError as e:
            self.counters["read_errors"] += 1
            log.error("nvme read failed at offset %d: %s", loc.offset, e)
            return False
        finally:
            if hdr is not None:
                self.headers.give(hdr[0])
        self.counters["bytes_read"] += n
        if n < loc.length or xxhash.xxh3_64_intdigest(dest[:loc.length]) != loc.checksum:
            self.counters["checksum_failures"] += 1
            log.error("nvme record at offset %d failed its checksum (read %d of %d bytes); dropped",
                      loc.offset, n, loc.length)
            return False
        return True

    def _header_is(self, block, loc: Location, expect: tuple[bytes, bytes]) -> bool:
        """Whether ``block`` is the header of the record at ``loc`` holding ``expect``."""
        row = self._row_at(block, loc)
        if row is None:
            self.counters["checksum_failures"] += 1
            log.error("nvme record header at offset %d does not verify; dropped", loc.offset)
            return False
        if (row[NS], row[KEY]) != tuple(expect):
            self.counters["key_mismatches"] += 1
            if not self._mismatch_logged:  # once: a flood of these would say the same
                self._mismatch_logged = True
                log.warning("nvme record at offset %d holds another key than the index says "
                            "(counted in key_mismatches; logged once)", loc.offset)
            raise KeyMismatch(f"the NVMe record at offset {loc.offset} holds another key")
        return True

    def _row_at(self, block, loc: Location) -> tuple | None:
        """The row of the header ``block`` read at ``loc`` when it verifies and describes the
        record ``loc`` names (generation, length, payload checksum; not a tombstone)."""
        r = self.regions[loc.region]
        row = parse_record(block, loc.generation, self.dev.seed, loc.offset - r.base)
        if (row is None or row[FLAGS] & FLAG_TOMBSTONE or row[LENGTH] != loc.length
                or row[CSUM] != loc.checksum):
            return None
        return row

    def key_at(self, loc: Location) -> tuple[bytes, bytes] | None:
        """``(ns, key)`` of the record at ``loc``, read from its header (synchronous: one 4 KiB
        read; for the rare caller, a delete or an admin walk of a keyless entry). None when
        ``loc`` is of an older generation of its region or its header does not verify."""
        r = self._region_of(loc)
        if r.generation != loc.generation:
            return None
        row = self._record_row(loc)
        return None if row is None else (row[NS], row[KEY])

    async def keys_at(self, locs: list[Location]) -> list[tuple[bytes, bytes] | None]:
        """``key_at`` of every Location in ``locs``, in the same order, for walks over many
        NVMe-only objects: per region, the few wanted records' headers are read, or, when
        many are wanted, the region's summary once (``region_rows``). One region's rows at a
        time are held. A record whose header does not verify is looked up in its region's
        summary too (the summary may still name it: an admin delete then knows the key
        its tombstone needs, as recovery, which trusts a summary, would index it)."""
        out: list[tuple[bytes, bytes] | None] = [None] * len(locs)
        by_region: dict[int, list[int]] = {}
        for i, loc in enumerate(locs):
            r = self._region_of(loc)
            if r.generation == loc.generation:
                by_region.setdefault(loc.region, []).append(i)
        for ri, idxs in by_region.items():
            r = self.regions[ri]
            gen = r.generation
            if len(idxs) <= KEYS_AT_HEADERS:
                await self._keys_from_headers(locs, idxs, out)
                idxs = [i for i in idxs if out[i] is None]
                if not idxs or r.generation != gen:
                    continue
            try:
                rows = await self.region_rows(r)
            except OSError as e:
                self.counters["read_errors"] += 1
                log.warning("nvme region %d: cannot read its records' keys: %s", ri, e)
                continue
            if r.generation != gen:  # reclaimed while read: its records are gone
                continue
            want = {locs[i].offset - r.base: i for i in idxs}
            for row in rows:
                i = want.get(row[REL])
                if i is None or row[FLAGS] & FLAG_TOMBSTONE:
                    continue
                loc = locs[i]
                if row[LENGTH] == loc.length and row[CSUM] == loc.checksum:
                    out[i] = (row[NS], row[KEY])
            if len(want) < len(idxs):  # one record asked for twice: answer every copy
                for i in idxs:
                    if out[i] is None:
                        j = want.get(locs[i].offset - r.base)
                        out[i] = out[j] if j is not None else None
            del rows, want
        return out

    async def _keys_from_headers(self, locs: list, idxs: list[int], out: list) -> None:
        buf = mmap.mmap(-1, BLOCK * len(idxs))
        mv = memoryview(buf)
        try:
            ns = await asyncio.gather(*(self.dev.io.readv(locs[i].offset, [mv[j * BLOCK:(j + 1) * BLOCK]])
                                        for j, i in enumerate(idxs)), return_exceptions=True)
            for j, (i, n) in enumerate(zip(idxs, ns)):
                loc = locs[i]
                if isinstance(n, BaseException) or n != BLOCK:
                    self.counters["read_errors"] += 1
                    continue
                if self._region_of(loc).generation != loc.generation:
                    continue
                row = self._row_at(mv[j * BLOCK:(j + 1) * BLOCK], loc)
                if row is not None:
                    out[i] = (row[NS], row[KEY])
        finally:
            del mv, buf  # (not closed: a backend may still hold a view until it lets go)

    def _region_of(self, loc: Location) -> Region:
        if not 0 <= loc.region < len(self.regions):
            raise ValueError(f"NVMe location names region {loc.region}; the tier has "
                             f"{len(self.regions)}")
        r = self.regions[loc.region]
        rel = loc.offset - r.base
        if rel % BLOCK or not REGION_HEADER <= rel <= r.size - BLOCK:
            raise ValueError(f"NVMe location offset {loc.offset} is not a record offset of "
                             f"region {loc.region}")
        return r

    async def region_rows(self, r: Region) -> list[tuple]:
        """The rows (nvmeformat: seq, rel, length, checksum, committed_at, flags, ns_len,
        key_len, ns, key) of every record in ``r``, tombstones included, in offset order:
        from the summary in memory while the region has one (open, or sealed and not yet
        written), else from its summary on disk (trailer of this generation, checksum
        verified), else from a scan of its record headers up to its write pointer (no
        summary, or one that does not verify). Raises OSError when the device fails."""
        if r.state == "free":
            return []
        gen = r.generation
        if r.summary is not None:
            body = bytes(r.summary)  # a snapshot: appends go on meanwhile
            rows = parse_summary(body, count_entries(body) or 0)
            if rows is not None:
                return rows
        if r.sum_state == "written":
            rows = await self._rows_from_summary(r, gen)
            if rows is not None:
                return rows
        if r.generation != gen:
            return []
        self.counters["region_scans"] += 1
        loop = asyncio.get_running_loop()
        rows, _end = await loop.run_in_executor(None, self._scan_rows, r, r.write_ptr)
        return rows if r.generation == gen else []

    def _scan_rows(self, r: Region, limit: int):
        return scan_rows(self.dev, r, mmap.mmap(-1, SCAN_CHUNK), self.counters, limit, "scan_resyncs")

    async def _rows_from_summary(self, r: Region, gen: int) -> list[tuple] | None:
        """The rows of ``r``'s summary on disk, or None when it is not this generation's or
        does not verify (then the caller scans)."""
        tail = mmap.mmap(-1, BLOCK)
        n = await self.dev.io.readv(r.base + r.size - BLOCK, [memoryview(tail)])
        t = parse_trailer(tail, self.dev.seed) if n == BLOCK else None
        del tail
        if not t:
            return self._summary_bad(r, "trailer unreadable")
        index, tgen, count, body_len, body_csum = t
        if index != r.index or tgen != gen or body_len + BLOCK > r.size - REGION_HEADER:
            return self._summary_bad(r, "trailer of another region or generation")
        size = align_up(max(body_len, 1))
        buf = mmap.mmap(-1, size)
        mv = memoryview(buf)
        try:
            n = await self.dev.io.readv(r.base + r.size - BLOCK - size, [mv])
            rows = None
            if n == size and xxhash.xxh3_64_intdigest(mv[:body_len], self.dev.seed) == body_csum:
                rows = parse_summary(mv[:body_len], count)
        finally:
            del mv, buf
        if rows is None:
            return self._summary_bad(r, "summary does not match its checksum")
        return rows

    def _summary_bad(self, r: Region, why: str) -> None:
        self.counters["summaries_corrupt"] += 1
        log.warning("nvme region %d: %s; scanning its record headers", r.index, why)
        return None

    def forget(self, loc: Location, ns: bytes, key: bytes) -> None:
        """The record at ``loc`` no longer holds the key's current value (deleted,
        overwritten or ignored): it stays on disk until its region is reclaimed, so
        it counts as stale until then (its tombstones must outlive it). Forgetting a
        record twice (or one of a reclaimed generation) changes nothing. ``loc`` must be
        a location ``append`` or ``recovered_objects`` returned (ValueError otherwise)."""
        r = self._region_of(loc)
        if r.generation != loc.generation:
            return
        i = (loc.offset - r.base) // BLOCK
        if r.dead is None:
            r.dead = bytearray((r.size // BLOCK + 7) // 8)
        bit = 1 << (i & 7)
        if not r.dead[i >> 3] & bit:
            r.dead[i >> 3] |= bit
            if r.live_count > 0:
                r.live_count -= 1
        self._mark_stale(r, (ns, key))

    # -- stats ----------------------------------------------------------------
    def stats(self) -> dict:
        used = sum(r.write_ptr for r in self.regions if r.state != "free")
        return {
            "capacity": self.dev.nregions * self.dev.region_size,
            "used": used,
            "objects": sum(r.live_count for r in self.regions),
            "regions_total": self.dev.nregions,
            "regions_free": sum(1 for r in self.regions if r.state == "free"),
            "region_size": self.dev.region_size,
            "header_waits": self.headers.waits,
            **self.counters,
        }

    @property
    def io_backend(self) -> str:
        return self.dev.io_backend

    @property
    def io_backend_reason(self) -> str:
        return getattr(self.dev.io, "reason", "")

    def close(self) -> None:
        # summaries of the open regions, and of sealed ones whose write had no time to
        # run, so the next start reads instead of scanning (same bytes if both land)
        self.closed = True
        for r in self.regions:
            if (r.state not in ("open", "full", "carrying", "reclaiming") or r.sum_state == "written" or r.pending
                    or r.summary is None or r.frontier != r.write_ptr):
                continue
            buf = self._summary_block(r)
            try:
                if os.pwritev(self.dev.fd, [memoryview(buf)], r.base + r.size - len(buf)) == len(buf):
                    self.counters["summaries_written"] += 1
            except OSError as e:
                log.warning("nvme region %d: summary write at close failed: %s", r.index, e)
        self.syncer.close()
        self.dev.close()  # (waits for the writes in flight: the kernel is done with them)
        for t in self.tasks:  # what they waited for has ended or failed with the device
            try:
                t.cancel()
            except RuntimeError:  # its event loop is closed already
                pass


class _DictSink:
    """What ``recover_into`` needs of an index, over a dict (``recovered_objects``).
    ``add_many(items)``: index ``[(ns, key, loc, committed_at)]``, returning the positions
    of those whose key it already holds, left out; ``add``: index one whose key it does
    not hold; ``lookup``: the Location it holds for a key, or None; ``remove(ns, key,
    loc)``: drop the key's entry if it is the one at ``loc``."""

    def __init__(self):
        self.d: dict = {}

    def add_many(self, items: list) -> list[int]:
        d, collided = self.d, []
        for i, (ns, key, loc, at) in enumerate(items):
            if (ns, key) in d:
                collided.append(i)
            else:
                d[ns, key] = (loc, at)
        return collided

    def add(self, ns: bytes, key: bytes, loc: Location, committed_at: float) -> None:
        self.d[ns, key] = (loc, committed_at)

    def lookup(self, ns: bytes, key: bytes) -> Location | None:
        v = self.d.get((ns, key))
        return None if v is None else v[0]

    def remove(self, ns: bytes, key: bytes, loc: Location) -> None:
        v = self.d.get((ns, key))
        if v is not None and v[0] == loc:
            del self.d[ns, key]
