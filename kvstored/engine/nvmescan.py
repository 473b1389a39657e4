"""Recovery of the NVMe tier at start: which records every region holds.

A region sealed (full) once all its records were written has a summary at its
end (every record's key, sequence number, offset, length, checksum), so a
restart reads the header, the trailer and the summary of a sealed region and
scans only the others (open at shutdown, or whose summary does not verify).
Headers and trailers of a window of regions are read in one batch, then their
summaries in another (io_uring: one submit per batch, up to the queue depth in
flight), and each summary is decoded whole (nvmeformat.parse_summary).

A scan follows the chain of record headers; at a header that does not verify it
resynchronises on the next 4 KiB block holding a record header of the region's
generation, so a corrupt header costs that record only. A corrupt summary costs
a scan of its region; a scanned region gets the summary it lacked, so the next
start reads it. The region header is written twice; one good copy is enough.

The scan keeps no summary: of each region only where its summary lies and what it
verified as (length, checksum, entry count, generation). Indexing (``Found.take``)
reads the summaries again, a few regions per batch, checks them against what the
scan saw and decodes one region at a time, so recovery's peak is the index plus a
window of summaries (issue 13: holding every body was ~55 B per record). A summary
that fails the second read (read error, short read, other checksum) costs a scan
of its region, as at the first.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import logging
import mmap
import os
import struct
from operator import itemgetter

import xxhash

from .nvmedevice import NvmeDevice, Region
from .nvmeformat import (BLOCK, FLAGS, LENGTH, REGION_HEADER, REL, SEQ, SUMMARY_ENTRY, align_up,
                         parse_record, parse_region_header, parse_summary, parse_trailer, record_len,
                         summary_block, summary_of_rows, tail_size)

log = logging.getLogger("kvstored.nvme")

SCAN_CHUNK = 8 << 20  # bytes read at a time when a region is scanned
HEAD_WINDOW = 64  # regions whose two header copies and trailer are read in one batch
BODY_WINDOW = 64 << 20  # bytes of summaries read in one batch (bounds the buffers held)
# bytes of summaries re-read in one batch while indexing: what recovery holds of them at
# once (a 64 MiB region of 4 KiB records has a ~0.5 MiB summary)
REREAD_WINDOW = 4 << 20
ROWS_SLICE = 4096  # entries of a summary decoded at a time while indexing (~1.5 MB of rows)
STATS = ("restart_summaries", "restart_scanned_regions", "restart_resyncs", "summaries_corrupt",
         "region_headers_repaired", "regions_unreadable", "restart_summaries_written")
_max_seq = itemgetter(SEQ)
_first = itemgetter(0)


@contextlib.contextmanager
def gc_paused():
    """No cyclic garbage collection inside: a restart allocates millions of long-lived
    objects (rows, locations, index entries) and would otherwise trigger a collection
    every 700 of them, each walking the survivors so far (half of a 1 M record restart's
    CPU time, measured). Nothing in recovery makes reference cycles to collect.

    On the way out the survivors go straight to the oldest generation (freeze, then
    unfreeze: two list splices), so the first allocation after it does not walk all of
    them as one young generation; a later full collection still sees them. Skipped when
    someone else froze objects (we would thaw theirs)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            if gc.get_freeze_count() == 0:
                gc.freeze()
                gc.unfreeze()
            gc.enable()


class Found:
    """The records each region holds, as ``items``: ``[(region, body, count, body_len,
    checksum, generation)]``. ``body`` is None for a region whose summary is on disk (the
    scan read and verified it, and kept only its length and checksum): ``take`` reads it
    again just before the region is indexed. A scanned region whose summary could not be
    written keeps its body (bytes) here instead.

    ``take`` hands out ``(region, rows)``, one region (or a slice of ROWS_SLICE entries of
    one: a region may come in several parts) decoded at a time, at most ``REREAD_WINDOW``
    bytes of summaries read ahead; ``peak_window`` is the most it held at once (the
    test's measure). Iterating gives the same without consuming
    (tests, tools: decoded once and kept until ``take``, so the same row objects come
    back each time)."""

    def __init__(self, dev: NvmeDevice | None = None):
        self.dev = dev
        self.items: list = []
        self.stats = dict.fromkeys(STATS, 0)  # __iter__'s; take counts into the caller's
        self.peak_window = 0
        self.max_seq = 0  # the highest sequence number of a region scanned by take
        self._rows: list | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        if self._rows is None:
            self._rows = list(self._decode(list(self.items), self.stats))
        return iter(self._rows)

    def take(self, stats: dict | None = None):
        """``(region, rows)`` of every region, once each; a region's summary is let go as
        its rows are handed out. ``stats``: where a second read that fails is counted."""
        items, self.items, self._rows = self.items, [], None
        return self._decode(items, self.stats if stats is None else stats)

    def _decode(self, items: list, stats: dict):
        chunk = None
        i = 0
        while i < len(items):
            window, total = [], 0  # [(item, offset in buf, aligned size | 0 when held)]
            while i < len(items):
                item = items[i]
                size = align_up(max(item[3], 1)) if item[1] is None else 0
                if window and total + size > REREAD_WINDOW:
                    break  # (a first summary larger than the window is read alone)
                window.append((item, total, size))
                items[i] = None
                total += size
                i += 1
            self.peak_window = max(self.peak_window, total)
            buf = mmap.mmap(-1, total) if total else None
            mv = memoryview(buf) if buf is not None else None
            try:
                reqs = [(r.base + r.size - BLOCK - size, mv[at:at + size])
                        for (r, body, *_x), at, size in window if size]
                res = self._read(reqs)
                del reqs
                j = 0
                for k in range(len(window)):
                    (r, body, count, body_len, csum, gen), at, size = window[k]
                    window[k] = None
                    if r.generation != gen:
                        continue  # reclaimed since the scan: its records are gone
                    n = size
                    if size:
                        n, j = res[j], j + 1
                        view = mv[at:at + body_len] if n == size else None
                        if view is not None and xxhash.xxh3_64_intdigest(view, self.dev.seed) != csum:
                            view = None
                    else:
                        view = memoryview(body)
                    del body
                    if view is not None:
                        ok = yield from _slices(r, view, count)
                        del view
                        if ok:
                            continue
                    if chunk is None:
                        chunk = mmap.mmap(-1, SCAN_CHUNK)
                    rows = self._rescan(r, chunk, stats, n, size)
                    if rows:  # (none: a region whose second read and scan both failed)
                        yield r, rows
                    del rows
            finally:
                del mv, buf

    def _read(self, reqs: list) -> list[int]:
        if not reqs:
            return []
        try:
            return self.dev.read_many(reqs)
        except (OSError, RuntimeError) as e:  # the backend failed as a whole: each region is scanned
            log.warning("nvme: reading summaries again failed (%s); scanning their regions", e)
            return [-5] * len(reqs)

    def _rescan(self, r: Region, chunk, stats: dict, n: int, size: int) -> list[tuple]:
        """Rows of ``r`` from its record headers: its summary verified at the scan but not on
        the second read (never indexed unverified). Its records end at ``r.write_ptr``."""
        stats["summaries_corrupt"] = stats.get("summaries_corrupt", 0) + 1
        stats["restart_scanned_regions"] = stats.get("restart_scanned_regions", 0) + 1
        log.warning("nvme region %d: summary %s on the second read; scanning the region",
                    r.index, "does not match its checksum" if n == size else f"unreadable ({n})")
        rows, _end = scan_rows(self.dev, r, chunk, stats, r.write_ptr)
        if rows:
            self.max_seq = max(self.max_seq, max(map(_max_seq, rows)))
        return rows


def _slices(r: Region, view, count: int):
    """Yield ``(r, rows)`` of a verified summary body: in slices of up to ROWS_SLICE entries
    when every entry has one size (a region of 256 MiB holds ~32 k records of 4 KiB: whole,
    its rows and index items were ~16 MB at once), else whole. Returns False, having
    yielded nothing, when the body does not hold ``count`` whole entries (then scan)."""
    stride = _uniform_stride(view, count)
    if stride is None or count <= ROWS_SLICE:
        rows = parse_summary(view, count)
        if rows is None:
            return False
        if rows:
            yield r, rows
        return True
    for a in range(0, count, ROWS_SLICE):
        m = min(ROWS_SLICE, count - a)
        rows = parse_summary(view[a * stride:(a + m) * stride], m)  # of one size: cannot fail
        yield r, rows
        del rows
    return True


def _uniform_stride(data, count: int) -> int | None:
    """The size of every entry of a summary body of ``count`` entries when they all have
    one namespace and key length and fill the body exactly, else None (C slices only)."""
    n, esize = len(data), SUMMARY_ENTRY.size
    if count <= 0 or n < esize:
        return None
    ns_len, key_len = data[esize - 2], data[esize - 1]
    stride = esize + ns_len + key_len
    if (stride * count == n and data[esize - 2::stride] == bytes((ns_len,)) * count
            and data[esize - 1::stride] == bytes((key_len,)) * count):
        return stride
    return None


class Recovery:
    """What a start found: every region (state, generation, write pointer), where the
    summary of each region that holds records is (``found``: a Found, read again while
    indexing), the highest sequence number seen, and counters."""

    def __init__(self, regions: list[Region], dev: NvmeDevice | None = None):
        self.regions = regions
        self.found = Found(dev)
        self.max_seq = 0
        self.stats = dict.fromkeys(STATS, 0)

    def add(self, r: Region, body: bytes, count: int, max_seq: int) -> None:
        """A region whose summary is kept in RAM (``body``: its summary could not be written)."""
        if count:
            self.found.items.append((r, body, count, len(body), 0, r.generation))
            self.max_seq = max(self.max_seq, max_seq)

    def add_ref(self, r: Region, count: int, body_len: int, body_csum: int, max_seq: int) -> None:
        """A region whose summary of ``body_len`` bytes is on disk at its end and verified."""
        if count:
            self.found.items.append((r, None, count, body_len, body_csum, r.generation))
            self.max_seq = max(self.max_seq, max_seq)


def summary_facts(body, count: int) -> tuple[bytes, int, tuple | None] | None:
    """(body as bytes, highest sequence number, last entry's row) of a summary body that
    verified, or None when it does not hold exactly ``count`` whole entries (the checks
    of nvmeformat.parse_summary). When every entry has one size (the common case) only
    the sequence numbers are unpacked: the rows are decoded once, when indexed."""
    data = body if isinstance(body, bytes) else bytes(body)
    n, esize = len(data), SUMMARY_ENTRY.size
    if count <= 0 or n < esize:
        return (data, 0, None) if count == 0 and n == 0 else None
    stride = _uniform_stride(data, count)
    if stride is not None:
        top = max(map(_first, _seq_struct(stride).iter_unpack(data)))
        last = SUMMARY_ENTRY.unpack_from(data, n - stride)
        return data, top, last
    rows = parse_summary(data, count)
    if rows is None:
        return None
    return data, max(map(_max_seq, rows)), rows[-1]


@functools.lru_cache(maxsize=64)
def _seq_struct(stride: int) -> struct.Struct:
    return struct.Struct(f"<Q{stride - 8}x")


def scan(dev: NvmeDevice) -> Recovery:
    """Every region's header, then its summary when it has a good one, else a scan."""
    with gc_paused():
        return _scan(dev)


def _scan(dev: NvmeDevice) -> Recovery:
    rec = Recovery([Region(i, dev.region_base(i), dev.region_size) for i in range(dev.nregions)], dev)
    if dev.fresh:
        return rec
    chunk = None
    for w in range(0, len(rec.regions), HEAD_WINDOW):
        window = rec.regions[w:w + HEAD_WINDOW]
        summarized, to_scan = _read_heads(dev, window, rec)
        _read_summaries(dev, summarized, rec, to_scan)
        for r in to_scan:
            rec.stats["restart_scanned_regions"] += 1
            if chunk is None:
                chunk = mmap.mmap(-1, SCAN_CHUNK)
            rows = scan_region(dev, r, chunk, rec.stats)
            if rows:
                body = summary_of_rows(rows)
                count, top = len(rows), max(map(_max_seq, rows))
                del rows
                if _summarize_scanned(dev, r, body, rec.stats):  # read again when indexed
                    rec.add_ref(r, count, len(body), xxhash.xxh3_64_intdigest(body, dev.seed), top)
                else:  # kept: nowhere on disk to read it from
                    rec.add(r, body, count, top)
                del body
    return rec


def _read_heads(dev: NvmeDevice, window: list[Region], rec: Recovery):
    """Both region header copies and the trailer of each region in ``window``, one batch.
    Returns ([(region, trailer fields)] to read summaries of, [regions to scan])."""
    step = REGION_HEADER + BLOCK
    buf = mmap.mmap(-1, len(window) * step)
    mv = memoryview(buf)
    reqs = []
    for j, r in enumerate(window):
        reqs.append((r.base, mv[j * step:j * step + REGION_HEADER]))
        reqs.append((r.base + r.size - BLOCK, mv[j * step + REGION_HEADER:(j + 1) * step]))
    res = dev.read_many(reqs)
    summarized, to_scan = [], []
    try:
        for j, r in enumerate(window):
            if res[2 * j] != REGION_HEADER:
                continue  # unreadable: as if never written
            head = _region_generation(r, mv[j * step:j * step + REGION_HEADER], dev.seed, rec.stats)
            if head is None:
                continue
            r.generation, r.slot_size = head
            r.state = "full"  # never appended to again: a restart opens new regions
            t = None
            if res[2 * j + 1] == BLOCK:
                t = _trailer(r, mv[j * step + REGION_HEADER:(j + 1) * step], dev.seed, rec.stats)
            if t is None:
                to_scan.append(r)
            else:
                summarized.append((r, t))
    finally:
        del reqs, mv, buf  # the backend is done with them (read_many waited for every read)
    return summarized, to_scan


def _region_generation(r: Region, buf, seed: int, stats: dict) -> tuple[int, int] | None:
    """(generation, slot_size) from the better of the region header's two copies."""
    good, seen = [], 0
    for off in (0, BLOCK):
        head = parse_region_header(buf[off:off + BLOCK], r.index, seed)
        if head is False:
            continue
        seen += 1
        if head is not None:
            good.append(head)
    if not good:
        if seen:
            stats["regions_unreadable"] += 1
            log.error("nvme region %d: both copies of its header are corrupt; its records "
                      "are not recovered", r.index)
        return None
    if len(good) < 2:
        stats["region_headers_repaired"] += 1
        log.warning("nvme region %d: one copy of its header is corrupt; using the other", r.index)
    # a torn reopen may leave one copy from the region's previous use: the newer wins
    return max(good)


def _trailer(r: Region, block, seed: int, stats: dict):
    """(count, body_len, body_checksum) of ``r``'s summary trailer when it belongs to the
    region's current generation and verifies, else None (the region is scanned)."""
    t = parse_trailer(block, seed)
    if t is False:
        return None
    if t is None:
        stats["summaries_corrupt"] += 1
        log.warning("nvme region %d: summary trailer is corrupt; scanning the region", r.index)
        return None
    index, gen, count, body_len, body_csum = t
    if index != r.index or gen != r.generation:
        return None  # left from the region's previous use
    if body_len + BLOCK > r.size - REGION_HEADER:
        stats["summaries_corrupt"] += 1
        return None
    return count, body_len, body_csum


def _read_summaries(dev: NvmeDevice, summarized: list, rec: Recovery, to_scan: list) -> None:
    """Read the summaries of ``summarized`` in batches of up to BODY_WINDOW bytes, verify
    them and note where they are (not their bytes: Found.take reads them again); a region
    whose summary cannot be read or does not verify goes to ``to_scan``."""
    i = 0
    while i < len(summarized):
        batch, total = [], 0  # [(region and trailer, offset in buf, aligned size)]
        while i < len(summarized):
            size = align_up(max(summarized[i][1][1], 1))  # body_len, read in whole blocks
            if batch and total + size > BODY_WINDOW:
                break  # (a first summary larger than the window is read alone)
            batch.append((summarized[i], total, size))
            total += size
            i += 1
        buf = mmap.mmap(-1, total)
        mv = memoryview(buf)
        try:
            res = dev.read_many([(r.base + r.size - BLOCK - size, mv[at:at + size])
                                 for (r, _t), at, size in batch])
            for ((r, (count, body_len, body_csum)), at, size), n in zip(batch, res):
                facts = None
                if n == size:
                    body = mv[at:at + body_len]
                    if xxhash.xxh3_64_intdigest(body, dev.seed) == body_csum:
                        facts = summary_facts(body, count)
                    del body
                    if facts is None:
                        rec.stats["summaries_corrupt"] += 1
                        log.warning("nvme region %d: summary does not match its checksum; "
                                    "scanning the region", r.index)
                if facts is None:
                    to_scan.append(r)
                    continue
                rec.stats["restart_summaries"] += 1
                r.sum_state = "written"
                # entries are in offset order: the last one ends the region's records
                _data, top, last = facts
                del facts, _data
                r.write_ptr = r.frontier = (last[REL] + record_len(last[FLAGS], last[LENGTH])
                                            if last else REGION_HEADER)
                rec.add_ref(r, count, body_len, body_csum, top)
        finally:
            del mv, buf


def scan_region(dev: NvmeDevice, r: Region, chunk, stats: dict) -> list[tuple]:
    """Follow the chain of record headers; past one that does not verify, look at every
    following 4 KiB block for the next header of this generation (resync). Sets the
    region's write pointer past the last record found (at start only)."""
    rows, end = scan_rows(dev, r, chunk, stats, r.size)
    r.write_ptr = r.frontier = end
    return rows


def scan_rows(dev: NvmeDevice, r: Region, chunk, stats: dict, limit: int,
              resync_stat: str = "restart_resyncs") -> tuple[list[tuple], int]:
    """The rows of the records of ``r``'s generation below ``limit`` (relative), and where
    the last one ends; ``r`` is not changed (NvmeTier.region_rows scans live regions)."""
    gen, seed = r.generation, dev.seed
    rows: list[tuple] = []
    cstart, clen = -1, 0
    ptr = end = REGION_HEADER
    gap = False
    big = False  # the last record was large: read just the next header, not 8 MiB of payloads
    limit = min(limit, r.size)
    while ptr + BLOCK <= limit:
        if not cstart <= ptr or ptr + BLOCK > cstart + clen:
            cstart = ptr
            want = BLOCK if big and not gap else SCAN_CHUNK
            clen = dev.read_upto(chunk, r.base + ptr, min(want, limit - ptr))
            if clen < BLOCK:
                break
        row = parse_record(memoryview(chunk)[ptr - cstart:ptr - cstart + BLOCK], gen, seed, ptr)
        if row is None:
            ptr += BLOCK
            gap = True
            continue
        rec_len = record_len(row[FLAGS], row[LENGTH])
        if ptr + rec_len > limit:
            ptr += BLOCK
            gap = True
            continue
        if gap:
            stats[resync_stat] = stats.get(resync_stat, 0) + 1
            log.warning("nvme region %d: unreadable record header(s) before offset %d; "
                        "resumed at the next good one", r.index, ptr)
            gap = False
        rows.append(row)
        ptr += rec_len
        end = ptr
        big = rec_len > SCAN_CHUNK // 32
    return rows, end


def _summarize_scanned(dev: NvmeDevice, r: Region, body: bytes, stats: dict) -> bool:
    """Give a scanned region the summary it lacked (``body``: its records' entries), so the
    next start reads it (and this one's indexing: True when written). Its records end
    before the tail the writer had reserved for a summary of at least these entries, so
    the summary overwrites none of them."""
    if r.write_ptr + tail_size(len(body)) > r.size:
        return False
    buf = summary_block(body, r.index, r.generation, r.slot_size, dev.seed)
    try:
        if os.pwritev(dev.fd, [memoryview(buf)], r.base + r.size - len(buf)) == len(buf):
            r.sum_state = "written"
            stats["restart_summaries_written"] += 1
            return True
    except OSError as e:
        log.warning("nvme region %d: could not write its summary after the scan: %s", r.index, e)
    return False

