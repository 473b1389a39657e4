"""The NVMe tier: a file or block device carved into regions written as logs.

Layout (all 4 KiB aligned, O_DIRECT)::

    [superblock 4 KiB][pad to 1 MiB][region 0][region 1]...
    region = [region header 4 KiB][its copy 4 KiB][record][record]... (appended in order)
             ... free ...[summary, padded to 4 KiB][summary trailer 4 KiB]   (once sealed)
    record = [record header 4 KiB][payload, padded to 4 KiB]

Every block is self-describing and checksummed (xxh3-64): the superblock
(geometry, a random uuid), each region header (index, generation, size class)
and each record header (magic, generation, sequence, namespace, key, key
digest, length, payload checksum, tombstone flag). Headers, summaries and
trailers are checksummed with a seed derived from the uuid, which only the
daemon reads: a client's payload cannot pass for a header. A region is
reclaimed whole (the unit of eviction is the unit of allocation): its
generation goes up, so records left from before no longer match and are ignored.

Durability: a record counts as on NVMe once it and every record before it in
its region are written (the region's "durable frontier"); only then may the
DRAM copy go. Payloads are verified on every read.

Restart: a region sealed (full) once all its records were written gets a
summary at its end (every record's key, sequence number, offset, length,
checksum), so a restart reads the header, the trailer and the summary of a
sealed region and scans only the others (open at shutdown, or whose summary
does not verify). A scan follows the chain of record headers; at a header
that does not verify it resynchronises on the next 4 KiB block holding a
record header of the region's generation, so a corrupt header costs that
record only. The region header is written twice; one good copy is enough.
"""
from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
import time
import uuid
from dataclasses import dataclass, field

import xxhash

from .nvmeio import open_backend

log = logging.getLogger("kvstored.nvme")

BLOCK = 4096
DATA_START = 1 << 20
MIN_REGION = 16 << 20
MAX_REGION = 256 << 20

SUPER = struct.Struct("<8sIIQQQ16s")  # magic, version, block, size, region_size, nregions, uuid
SUPER_MAGIC = b"KVSDNVM1"
REGION = struct.Struct("<8sIIQQd")  # magic, version, index, generation, slot_size, created
REGION_MAGIC = b"KVSDRGN1"
REGION_HEADER = 2 * BLOCK  # the region header and its copy
RECORD = struct.Struct("<4sHBBQQQQQd")  # magic, flags, ns_len, key_len, generation, seq, length, checksum, key_digest, committed_at
RECORD_MAGIC = b"KVSR"
TRAILER = struct.Struct("<8sIIQQQQQ")  # magic, version, index, generation, slot_size, count, body_len, body_checksum
TRAILER_MAGIC = b"KVSDSUM1"
SUMMARY_ENTRY = struct.Struct("<QIQQdBBB")  # seq, offset in region, length, checksum, committed_at, flags, ns_len, key_len
FLAG_TOMBSTONE = 1
VERSION = 2  # 2: seeded header checksums, doubled region header, region summaries
# what a region needs besides one record's payload: its two headers, a record header,
# a summary block and the trailer (config checks region_size >= max_value_size + this)
REGION_OVERHEAD = REGION_HEADER + 3 * BLOCK
SCAN_CHUNK = 8 << 20  # bytes read at a time when a region is scanned
REGION_WAIT = 5.0  # seconds an append may wait for a busy region to become reclaimable
_CSUM = struct.Struct("<Q")


class NvmeError(Exception):
    """A configuration or device problem found at start (the daemon exits 2)."""


def align_up(n: int, a: int = BLOCK) -> int:
    return (n + a - 1) // a * a


def key_digest(ns: bytes, key: bytes) -> int:
    return xxhash.xxh3_64_intdigest(ns + b"\0" + key)


def _sealed(struct_bytes: bytes, seed: int = 0) -> bytes:
    return struct_bytes + _CSUM.pack(xxhash.xxh3_64_intdigest(struct_bytes, seed))


def _verify(block, size: int, seed: int = 0) -> bool:
    return _CSUM.unpack_from(block, size)[0] == xxhash.xxh3_64_intdigest(bytes(block[:size]), seed)


def _tail(summary_len: int) -> int:
    """Bytes a region keeps free at its end for a summary of ``summary_len`` bytes."""
    return align_up(max(summary_len, 1)) + BLOCK


@dataclass(slots=True)
class Location:
    region: int
    offset: int  # absolute offset of the record header
    length: int
    checksum: int
    generation: int


@dataclass
class Region:
    index: int
    base: int
    size: int
    generation: int = 0
    slot_size: int = 0
    state: str = "free"  # free | open | full
    write_ptr: int = 0  # next record offset, relative to base
    live: set = field(default_factory=set)  # (ns, key) with their newest record here
    pending: dict = field(default_factory=dict)  # record offset -> completed? (writes in flight)
    frontier: int = 0  # every record below this relative offset is on disk
    summary: bytearray | None = None  # entries of the records appended (None: no summary)
    sum_state: str = ""  # "" | writing | written | failed
    # (ns, key) with a deleted or superseded record here: until this region is reclaimed,
    # some tombstone of that key must survive, or a restart would serve the record again
    stale: set = field(default_factory=set)
    tombs: dict = field(default_factory=dict)  # (ns, key) -> seq of the tombstones here

    @property
    def used(self) -> int:
        return self.write_ptr


@dataclass(slots=True)
class RecoveredRecord:
    ns: bytes
    key: bytes
    loc: Location
    seq: int
    tombstone: bool
    committed_at: float


class HeaderPool:
    """4 KiB aligned header blocks for O_DIRECT writes (anonymous mmap is page aligned)."""

    def __init__(self, count: int):
        self.mm = mmap.mmap(-1, count * BLOCK)
        self.view = memoryview(self.mm)
        self.free = list(range(count))

    def take(self) -> tuple[int, memoryview] | None:
        if not self.free:
            return None
        i = self.free.pop()
        return i, self.view[i * BLOCK:(i + 1) * BLOCK]

    def give(self, i: int) -> None:
        self.free.append(i)


class NvmeDevice:
    """Geometry, locking, formatting and the I/O backend of one device or file."""

    def __init__(self, path: str, size: int, region_size: int, io_backend: str = "auto",
                 queue_depth: int = 32):
        self.path = path
        if region_size % BLOCK or not MIN_REGION <= region_size <= MAX_REGION:
            raise NvmeError(f"nvme.region_size {region_size} must be a multiple of 4 KiB "
                            f"between {MIN_REGION >> 20} MiB and {MAX_REGION >> 20} MiB")
        if size % BLOCK:
            raise NvmeError(f"nvme.size {size} is not a multiple of 4 KiB")
        if size < DATA_START + region_size:
            raise NvmeError(f"nvme.size {size} is below one region ({region_size} bytes) plus the "
                            f"{DATA_START >> 20} MiB header area")
        self.size = size
        self.region_size = region_size
        self.nregions = (size - DATA_START) // region_size
        self.fd = self._open(path, size)
        self.uuid = b""
        try:
            self.fresh = self._superblock()
            self._reserve()
        except BaseException:
            os.close(self.fd)
            raise
        # headers are checksummed with this seed: only this daemon knows it (0600 file)
        self.seed = xxhash.xxh3_64_intdigest(self.uuid)
        self.scan_stats = dict.fromkeys(
            ("restart_summaries", "restart_scanned_regions", "restart_resyncs", "summaries_corrupt",
             "region_headers_repaired", "regions_unreadable", "restart_summaries_written"), 0)
        self.io = open_backend(self.fd, io_backend, queue_depth,
                               os.path.dirname(os.path.abspath(path)))
        self.io_backend = self.io.name
        self.io_backend_reason = self.io.reason  # why not io_uring ("" when it is, or not wanted)

    def _open(self, path: str, size: int) -> int:
        flags = os.O_RDWR | os.O_CLOEXEC
        exists = os.path.exists(path)
        if not exists:
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                raise NvmeError(f"nvme.path {path}: directory {parent} does not exist")
            flags |= os.O_CREAT
        try:
            fd = os.open(path, flags | os.O_DIRECT, 0o600)
        except OSError as e:
            if e.errno == errno.EINVAL:  # file system without O_DIRECT (tmpfs): buffered I/O
                fd = os.open(path, flags, 0o600)
                log.warning("nvme.path %s does not support O_DIRECT; using buffered I/O", path)
            else:
                raise NvmeError(f"nvme.path {path}: cannot open for writing: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise NvmeError(f"nvme.path {path} is in use by another kvstored (it holds the lock)") from None
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            pass  # space is reserved after the superblock check (never touch foreign data)
        elif stat.S_ISBLK(st.st_mode):
            dev_size = os.lseek(fd, 0, os.SEEK_END)
            if dev_size < size:
                os.close(fd)
                raise NvmeError(f"nvme.path {path}: device has {dev_size} bytes, nvme.size asks {size}")
        else:
            os.close(fd)
            raise NvmeError(f"nvme.path {path} is neither a regular file nor a block device")
        return fd

    def _reserve(self) -> None:
        """Allocate the whole file now: a full disk is an error at start, not mid-write."""
        st = os.fstat(self.fd)
        if stat.S_ISREG(st.st_mode) and st.st_size < self.size:
            try:
                os.posix_fallocate(self.fd, 0, self.size)
            except OSError as e:
                raise NvmeError(f"nvme.path {self.path}: cannot reserve {self.size} bytes: "
                                f"{e.strerror}") from None

    def _superblock(self) -> bool:
        """Check or write the superblock; True if the device was formatted now."""
        buf = mmap.mmap(-1, BLOCK)
        try:
            n = os.preadv(self.fd, [memoryview(buf)], 0)
        except OSError:
            n = 0
        head = bytes(buf[:SUPER.size + 8])
        if n == BLOCK and head[:8] == SUPER_MAGIC:
            if not _verify(head, SUPER.size):
                raise NvmeError(f"nvme.path {self.path}: superblock checksum mismatch; refusing to use it")
            _m, ver, block, size, region_size, nregions, uid = SUPER.unpack_from(head)
            if ver == 1:
                raise NvmeError(f"nvme.path {self.path} holds tier format 1 (an older kvstored); this "
                                f"one writes format {VERSION} (region summaries): move the file aside "
                                "or point nvme.path at a new one (its objects are not read)")
            if ver != VERSION or block != BLOCK:
                raise NvmeError(f"nvme.path {self.path}: formatted by an incompatible version ({ver})")
            if region_size != self.region_size:
                raise NvmeError(f"nvme.path {self.path} was formatted with region_size {region_size}; "
                                f"nvme.region_size is {self.region_size} (use the old value or a new file)")
            if size > self.size:
                raise NvmeError(f"nvme.path {self.path} was formatted with size {size}; nvme.size "
                                f"{self.size} would cut off regions")
            st = os.fstat(self.fd)
            if stat.S_ISREG(st.st_mode) and st.st_size < size:
                raise NvmeError(f"nvme.path {self.path} shrank to {st.st_size} bytes (formatted for {size})")
            self.size, self.nregions, self.uuid = size, nregions, uid
            return False
        if n == BLOCK and any(buf[:4096]) and head[:8] != SUPER_MAGIC:
            raise NvmeError(f"nvme.path {self.path} holds data that is not a kvstored tier; "
                            "refusing to overwrite it (use an empty file or device)")
        self.uuid = uuid.uuid4().bytes
        buf[:SUPER.size + 8] = _sealed(SUPER.pack(SUPER_MAGIC, VERSION, BLOCK, self.size,
                                                  self.region_size, self.nregions, self.uuid))
        os.pwritev(self.fd, [memoryview(buf)], 0)
        os.fsync(self.fd)
        return True

    def region_base(self, i: int) -> int:
        return DATA_START + i * self.region_size

    # -- recovery -----------------------------------------------------------
    def scan(self) -> tuple[list[Region], list[RecoveredRecord]]:
        """Every region's header, then its summary when it has a good one, else a scan."""
        regions = [Region(i, self.region_base(i), self.region_size) for i in range(self.nregions)]
        records: list[RecoveredRecord] = []
        if self.fresh:
            return regions, records
        hbuf = mmap.mmap(-1, REGION_HEADER)
        tbuf = mmap.mmap(-1, BLOCK)
        chunk = mmap.mmap(-1, SCAN_CHUNK)
        st = self.scan_stats
        for r in regions:
            head = self._region_generation(r, hbuf)
            if head is None:
                continue
            r.generation, r.slot_size = head
            r.state = "full"  # never appended to again: a restart opens new regions
            if self._read_summary(r, tbuf, records):
                st["restart_summaries"] += 1
                r.sum_state = "written"
            else:
                st["restart_scanned_regions"] += 1
                found: list[RecoveredRecord] = []
                self._scan_region(r, chunk, found)
                records.extend(found)
                self._summarize_scanned(r, found)
        return regions, records

    def _summarize_scanned(self, r: Region, found: list) -> None:
        """Give a scanned region the summary it lacked, so the next start reads it. Its
        records end before the tail the writer had reserved for a summary of at least
        these entries, so the summary overwrites none of them."""
        if not found:
            return
        body = bytearray()
        for rec in found:
            body += SUMMARY_ENTRY.pack(rec.seq, rec.loc.offset - r.base, rec.loc.length,
                                       rec.loc.checksum, rec.committed_at,
                                       FLAG_TOMBSTONE if rec.tombstone else 0,
                                       len(rec.ns), len(rec.key)) + rec.ns + rec.key
        if r.write_ptr + _tail(len(body)) > r.size:
            return
        r.summary = body
        buf = summary_block(r, self.seed)
        r.summary = None
        try:
            if os.pwritev(self.fd, [memoryview(buf)], r.base + r.size - len(buf)) == len(buf):
                r.sum_state = "written"
                self.scan_stats["restart_summaries_written"] += 1
        except OSError as e:
            log.warning("nvme region %d: could not write its summary after the scan: %s", r.index, e)

    def _region_generation(self, r: Region, buf) -> tuple[int, int] | None:
        """(generation, slot_size) from the better of the region header's two copies."""
        if not self._read_into(buf, r.base):
            return None
        good, seen = [], 0
        for off in (0, BLOCK):
            blk = memoryview(buf)[off:off + BLOCK]
            if bytes(blk[:8]) != REGION_MAGIC:
                continue
            seen += 1
            if not _verify(blk, REGION.size, self.seed):
                continue
            _m, _v, index, gen, slot_size, _created = REGION.unpack_from(blk)
            if index == r.index:
                good.append((gen, slot_size))
        if not good:
            if seen:
                self.scan_stats["regions_unreadable"] += 1
                log.error("nvme region %d: both copies of its header are corrupt; its records "
                          "are not recovered", r.index)
            return None
        if len(good) < 2 and seen:
            self.scan_stats["region_headers_repaired"] += 1
            log.warning("nvme region %d: one copy of its header is corrupt; using the other", r.index)
        # a torn reopen may leave one copy from the region's previous use: the newer wins
        return max(good)

    def _read_summary(self, r: Region, tbuf, records: list) -> bool:
        """Add the records of ``r``'s summary; False (nothing added) when it has none that
        belongs to its current generation and verifies."""
        if not self._read_into(tbuf, r.base + r.size - BLOCK):
            return False
        t = memoryview(tbuf)
        if bytes(t[:8]) != TRAILER_MAGIC:
            return False
        if not _verify(t, TRAILER.size, self.seed):
            self.scan_stats["summaries_corrupt"] += 1
            log.warning("nvme region %d: summary trailer is corrupt; scanning the region", r.index)
            return False
        _m, _v, index, gen, _slot, count, body_len, body_csum = TRAILER.unpack_from(t)
        if index != r.index or gen != r.generation:
            return False  # left from the region's previous use
        if body_len + BLOCK > r.size - REGION_HEADER:
            self.scan_stats["summaries_corrupt"] += 1
            return False
        body = mmap.mmap(-1, align_up(max(body_len, 1)))
        start = r.base + r.size - BLOCK - len(body)
        if not self._read_into(body, start):
            return False
        view = memoryview(body)[:body_len]
        if xxhash.xxh3_64_intdigest(view, self.seed) != body_csum:
            self.scan_stats["summaries_corrupt"] += 1
            log.warning("nvme region %d: summary does not match its checksum; scanning the region",
                        r.index)
            return False
        # the hot loop of a restart (one pass per record): locals only
        out, pos, end = [], 0, REGION_HEADER
        unpack, esize, data = SUMMARY_ENTRY.unpack_from, SUMMARY_ENTRY.size, bytes(view)
        index, base, append = r.index, r.base, out.append
        for _ in range(count):
            seq, rel, length, csum, committed_at, flags, ns_len, key_len = unpack(data, pos)
            pos += esize
            ns = data[pos:pos + ns_len]
            pos += ns_len
            key = data[pos:pos + key_len]
            pos += key_len
            tomb = flags & FLAG_TOMBSTONE == FLAG_TOMBSTONE
            append(RecoveredRecord(ns, key, Location(index, base + rel, length, csum, gen),
                                   seq, tomb, committed_at))
            # entries are in offset order: the last one ends the region's records
            end = rel + BLOCK + (0 if tomb else (length + BLOCK - 1) // BLOCK * BLOCK)
        if pos != body_len:
            self.scan_stats["summaries_corrupt"] += 1
            return False
        records.extend(out)
        r.write_ptr = r.frontier = end
        return True

    def _scan_region(self, r: Region, chunk, records: list) -> None:
        """Follow the chain of record headers; past one that does not verify, look at every
        following 4 KiB block for the next header of this generation (resync)."""
        gen, seed = r.generation, self.seed
        cstart, clen = -1, 0
        ptr = end = REGION_HEADER
        gap = False
        big = False  # the last record was large: read just the next header, not 8 MiB of payloads
        while ptr + BLOCK <= r.size:
            if not cstart <= ptr or ptr + BLOCK > cstart + clen:
                cstart = ptr
                want = BLOCK if big and not gap else SCAN_CHUNK
                clen = self._read_upto(chunk, r.base + ptr, min(want, r.size - ptr))
                if clen < BLOCK:
                    break
            view = memoryview(chunk)[ptr - cstart:ptr - cstart + BLOCK]
            rec = _parse_record(view, gen, seed) if bytes(view[:4]) == RECORD_MAGIC else None
            if rec is None:
                ptr += BLOCK
                gap = True
                continue
            ns, key, flags, seq, length, csum, committed_at = rec
            rec_len = BLOCK + (0 if flags & FLAG_TOMBSTONE else align_up(length))
            if ptr + rec_len > r.size:
                ptr += BLOCK
                gap = True
                continue
            if gap:
                self.scan_stats["restart_resyncs"] += 1
                log.warning("nvme region %d: unreadable record header(s) before offset %d; "
                            "resumed at the next good one", r.index, ptr)
                gap = False
            records.append(RecoveredRecord(ns, key, Location(r.index, r.base + ptr, length, csum, gen),
                                           seq, bool(flags & FLAG_TOMBSTONE), committed_at))
            ptr += rec_len
            end = ptr
            big = rec_len > SCAN_CHUNK // 32
        r.write_ptr = r.frontier = end

    def _read_into(self, buf, offset: int) -> bool:
        try:
            return os.preadv(self.fd, [memoryview(buf)], offset) == len(buf)
        except OSError:
            return False

    def _read_upto(self, buf, offset: int, n: int) -> int:
        try:
            return os.preadv(self.fd, [memoryview(buf)[:align_up(n)]], offset)
        except OSError:
            return 0

    def close(self) -> None:
        self.io.close()
        try:
            os.fsync(self.fd)
        except OSError:
            pass
        os.close(self.fd)  # also drops the flock


def region_header(index: int, generation: int, slot_size: int, seed: int) -> bytes:
    return _sealed(REGION.pack(REGION_MAGIC, VERSION, index, generation, slot_size, time.time()), seed)


def record_header(ns: bytes, key: bytes, generation: int, seq: int, length: int, checksum: int,
                  tombstone: bool, committed_at: float, seed: int) -> bytes:
    return _sealed(RECORD.pack(RECORD_MAGIC, FLAG_TOMBSTONE if tombstone else 0, len(ns), len(key),
                               generation, seq, length, checksum, key_digest(ns, key), committed_at)
                   + ns + key, seed)


def _parse_record(view, gen: int, seed: int):
    """(ns, key, flags, seq, length, checksum, committed_at) of a record header block of
    generation ``gen``, or None when it is not one."""
    (_m, flags, ns_len, key_len, rgen, seq, length, csum, digest,
     committed_at) = RECORD.unpack_from(view)
    hsize = RECORD.size + ns_len + key_len
    if rgen != gen or hsize + 8 > BLOCK or not _verify(view, hsize, seed):
        return None
    ns = bytes(view[RECORD.size:RECORD.size + ns_len])
    key = bytes(view[RECORD.size + ns_len:hsize])
    if key_digest(ns, key) != digest:
        return None
    return ns, key, flags, seq, length, csum, committed_at


def summary_block(r: Region, seed: int) -> mmap.mmap:
    """The summary of region ``r`` and its trailer, as one aligned buffer for its tail."""
    body = bytes(r.summary)
    count = 0
    pos = 0
    while pos < len(body):  # entries are variable-length: count them
        ns_len, key_len = body[pos + SUMMARY_ENTRY.size - 2], body[pos + SUMMARY_ENTRY.size - 1]
        pos += SUMMARY_ENTRY.size + ns_len + key_len
        count += 1
    blen = align_up(max(len(body), 1))
    buf = mmap.mmap(-1, blen + BLOCK)
    buf[:len(body)] = body
    buf[blen:blen + TRAILER.size + 8] = _sealed(TRAILER.pack(
        TRAILER_MAGIC, VERSION, r.index, r.generation, r.slot_size, count, len(body),
        xxhash.xxh3_64_intdigest(body, seed)), seed)
    return buf


class _Pending:
    __slots__ = ("length", "done", "waiter")

    def __init__(self, length: int, waiter):
        self.length = length
        self.done = False
        self.waiter = waiter


SYNC_MODES = ("none", "interval", "always")


class NvmeTier:
    """Region allocation, appends, reads and reclaim over an NvmeDevice.

    The Store owns the index; this class owns regions and I/O. ``can_reclaim``
    and ``on_reclaim`` are Store callbacks: a region holding a pinned or
    being-read object is not reclaimed; reclaiming drops the Store's entries
    whose only copy was there.

    ``sync`` says when written records are made durable against power loss
    (O_DIRECT alone survives a process kill, not the device's write cache nor the
    file system's unwritten-extent metadata): ``none`` never calls fdatasync,
    ``interval`` calls it every ``sync_interval`` seconds while there were writes,
    ``always`` makes every append wait for an fdatasync issued after its write
    completed (one fdatasync covers every write finished before it: group commit).
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
        self.regions, self.recovered = device.scan()
        self.generation = max((r.generation for r in self.regions), default=0) + 1
        self.seq = max((rec.seq for rec in self.recovered), default=0) + 1
        self.open: dict[int, Region] = {}
        self.headers = HeaderPool(max(queue_depth * 4, 64))
        self.can_reclaim = lambda region: True
        self.on_reclaim = lambda region: None
        # set by the shutdown flush: reclaim only regions holding no live object, so
        # writing DRAM-only objects never destroys the only copy of another one
        self.keep_live = False
        self.stale_count: dict[tuple[bytes, bytes], int] = {}  # key -> regions with a stale record of it
        # key -> sequence numbers of its records being written: a delete may come first, and
        # its tombstone must not be reclaimed before the record lands (then forget marks it)
        self.writing: dict[tuple[bytes, bytes], list[int]] = {}
        self._budget_window = (clock(), 0)  # (window start, bytes written in it)
        self._syncs_started = 0
        self._syncs_done = 0
        self._sync_task: asyncio.Task | None = None  # the fdatasync running now
        self._interval_task: asyncio.Task | None = None
        self._dirty = False  # written since the last fdatasync began
        self.counters = dict.fromkeys(
            ("hits", "misses", "demotions", "demoted_bytes", "promotions", "bytes_written",
             "bytes_read", "checksum_failures", "regions_reclaimed", "objects_dropped",
             "write_errors", "read_errors", "tombstones", "tombstones_carried", "not_admitted",
             "syncs", "sync_errors", "summaries_written", "summary_errors"), 0)
        self.counters.update(device.scan_stats)
        self.counters["io_backend_fallback"] = int(device.io_backend != "io_uring")

    # -- recovery -------------------------------------------------------------
    def recovered_objects(self) -> list[RecoveredRecord]:
        """The newest record of every key that was not deleted afterwards.

        Also rebuilds which regions hold stale records (older versions, deleted
        objects) and which hold tombstones, so reclaim keeps deletes deleted.
        """
        newest: dict[tuple[bytes, bytes], RecoveredRecord] = {}
        get = newest.get
        tombstones = False
        for rec in self.recovered:
            k = (rec.ns, rec.key)
            old = get(k)
            if old is None or rec.seq > old.seq:
                newest[k] = rec
            tombstones = tombstones or rec.tombstone
        if tombstones or len(newest) != len(self.recovered):  # else nothing is stale
            for rec in self.recovered:
                k = (rec.ns, rec.key)
                r = self.regions[rec.loc.region]
                if rec.tombstone:
                    r.tombs[k] = max(rec.seq, r.tombs.get(k, 0))
                elif newest[k] is not rec:
                    self._mark_stale(r, k)
        self.recovered = []
        live = [rec for rec in newest.values() if not rec.tombstone]
        regions = self.regions
        for rec in live:
            regions[rec.loc.region].live.add((rec.ns, rec.key))
        return live

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
        return r.write_ptr + rec_len + _tail(len(r.summary) + entry_len) <= r.size

    async def _region_for(self, slot_size: int, rec_len: int, entry_len: int) -> Region | None:
        if REGION_HEADER + rec_len + _tail(entry_len) > self.dev.region_size:
            raise OSError(errno.EFBIG, f"a {rec_len}-byte record does not fit in a region")
        r = self.open.get(slot_size)
        if r is not None and self._fits(r, rec_len, entry_len):
            return r
        if r is not None:
            self._seal(r)
        r = await self._take_region()
        if r is None:
            return None
        cur = self.open.get(slot_size)
        if cur is not None:  # another append opened one while this one waited (carrying tombstones)
            if self._fits(cur, rec_len, entry_len):
                r.state = "free"
                return cur
            self._seal(cur)
        r.generation = self.generation
        self.generation += 1
        r.slot_size, r.state, r.write_ptr, r.frontier = slot_size, "open", 0, 0
        r.summary, r.sum_state = bytearray(), ""
        r.pending.clear()
        self.open[slot_size] = r
        # the region header (twice) is the first "record": the frontier passes it like any other
        block = memoryview(mmap.mmap(-1, REGION_HEADER))
        data = region_header(r.index, r.generation, slot_size, self.dev.seed)
        block[:len(data)] = data
        block[BLOCK:BLOCK + len(data)] = data
        self._write(r, [block], REGION_HEADER, None, None)
        return r

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
        buf = summary_block(r, self.dev.seed)
        r.sum_state = "writing"
        asyncio.get_running_loop().create_task(
            self._write_summary(r, r.generation, buf, r.base + r.size - len(buf)))

    async def _write_summary(self, r: Region, gen: int, buf, offset: int) -> None:
        try:
            n = await self.dev.io.writev(offset, [memoryview(buf)])
            ok = n == len(buf)
        except OSError as e:
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
            if not any(x.state == "carrying" or (x.state == "full" and (x.pending or x.sum_state == "writing")
                                                 and not (self.keep_live and x.live))
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
            if self.keep_live and r.live:
                continue
            if not self.can_reclaim(r):
                continue
            needed = self._needed_tombstones(r)
            if needed:
                if not await self._carry(r, needed):
                    continue
                if r.state != "full" or r.pending or r.live or self._needed_tombstones(r):
                    continue
            self._reclaim(r)
            return r
        return None

    def _needed_tombstones(self, r: Region) -> list[tuple[tuple[bytes, bytes], int]]:
        """Tombstones in ``r`` whose key still has a stale record in another live region."""
        return [(k, seq) for k, seq in r.tombs.items()
                if self.stale_count.get(k) or any(w < seq for w in self.writing.get(k, ()))]

    async def _carry(self, r: Region, needed: list) -> bool:
        """Rewrite tombstones that must outlive ``r`` into the open tombstone region, with
        their original sequence numbers (a newer record of the key still wins)."""
        r.state = "carrying"  # no other append picks it meanwhile
        try:
            results = await asyncio.gather(
                *(self.append(k[0], k[1], None, 0, 0, 0, time.time(), tombstone=True, seq=seq)
                  for k, seq in needed), return_exceptions=True)
        finally:
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

    def _reclaim(self, r: Region) -> None:
        self.on_reclaim(r)
        self.counters["regions_reclaimed"] += 1
        self.counters["objects_dropped"] += len(r.live)
        r.live.clear()
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
        rel = r.write_ptr
        r.write_ptr += rec_len
        r.pending[rel] = _Pending(rec_len, fut)
        loop = asyncio.get_running_loop()
        if self.sync == "interval" and self._interval_task is None:
            self._interval_task = loop.create_task(self._sync_every_interval())
        loop.create_task(self._do_write(r, rel, bufs, rec_len, header_index))

    async def _do_write(self, r: Region, rel: int, bufs: list, rec_len: int, header_index) -> None:
        gen = r.generation
        err = None
        try:
            n = await self.dev.io.writev(r.base + rel, bufs)
            if n != rec_len:
                err = OSError(errno.EIO, f"short write ({n} of {rec_len} bytes)")
            else:
                self._dirty = True
                if self.sync == "always":
                    await self._synced()
        except OSError as e:
            err = e
        finally:
            if header_index is not None:
                self.headers.give(header_index)
        if r.generation != gen:  # cannot happen (pending regions are not reclaimed); be safe
            return
        p = r.pending.get(rel)
        if p is None:  # dropped by an earlier failure in this region
            return
        if err is not None:
            self.counters["write_errors"] += 1
            log.error("nvme write failed at offset %d: %s; sealing region %d", r.base + rel, err, r.index)
            # nothing after a failed record is reachable at restart: seal the region here;
            # no summary (it would list records that failed): a restart scans it
            r.summary = None
            self._seal(r)
            for q_rel, q in list(r.pending.items()):
                if q_rel >= rel:
                    del r.pending[q_rel]
                    if q.waiter is not None and not q.waiter.done():
                        q.waiter.set_exception(OSError(errno.EIO, "nvme region write failed"))
            r.write_ptr = rel
            return
        self.counters["bytes_written"] += rec_len
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

    # -- fdatasync --------------------------------------------------------------
    async def _synced(self) -> None:
        """Return once an fdatasync that began after this call has finished."""
        want = self._syncs_started + 1
        while self._syncs_done < want:
            if self._sync_task is None:
                self._sync_task = asyncio.get_running_loop().create_task(self._fdatasync())
            await asyncio.shield(self._sync_task)

    async def _fdatasync(self) -> None:
        self._syncs_started += 1
        n = self._syncs_started
        self._dirty = False
        try:
            await asyncio.get_running_loop().run_in_executor(None, os.fdatasync, self.dev.fd)
        except OSError as e:
            self.counters["sync_errors"] += 1
            log.error("nvme fdatasync failed: %s", e)
            raise
        finally:
            self._sync_task = None
        self.counters["syncs"] += 1
        self._syncs_done = n

    async def _sync_every_interval(self) -> None:
        while True:
            await asyncio.sleep(self.sync_interval)
            if self._dirty:
                try:
                    await self._synced()
                except OSError:
                    pass  # counted and logged; the next interval tries again

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
        r = await self._region_for(slot_size if not tombstone else 0, rec_len, entry_len)
        if r is None:
            raise OSError(errno.ENOSPC, "no NVMe region free or reclaimable")
        hdr = self.headers.take()
        block = hdr[1] if hdr else memoryview(mmap.mmap(-1, BLOCK))
        data = record_header(ns, key, r.generation, seq, length, checksum, tombstone, committed_at,
                             self.dev.seed)
        block[:len(data)] = data
        block[len(data):] = bytes(BLOCK - len(data))
        bufs = [block] if tombstone else [block, payload]
        gen = r.generation
        flags = FLAG_TOMBSTONE if tombstone else 0
        r.summary += SUMMARY_ENTRY.pack(seq, r.write_ptr, length, checksum, committed_at, flags,
                                        len(ns), len(key)) + ns + key
        loc = Location(r.index, r.base + r.write_ptr, length, checksum, gen)
        fut = asyncio.get_running_loop().create_future()
        self._write(r, bufs, rec_len, hdr[0] if hdr else None, fut)
        k = (ns, key)
        if not tombstone:
            self.writing.setdefault(k, []).append(seq)
        try:
            await fut
        finally:
            # the caller's forget (if the key was deleted meanwhile) follows without a pause
            if not tombstone:
                seqs = self.writing[k]
                seqs.remove(seq)
                if not seqs:
                    del self.writing[k]
        if tombstone:
            self.counters["tombstones"] += 1
            if r.generation == gen:
                r.tombs[k] = max(seq, r.tombs.get(k, 0))
        else:
            self.counters["demotions"] += 1
            self.counters["demoted_bytes"] += length
            if r.generation == gen:
                r.live.add(k)
        return loc

    # -- reads ----------------------------------------------------------------
    async def read(self, loc: Location, dest: memoryview) -> bool:
        """Read a record's payload into ``dest`` (aligned, ``align_up(length)`` bytes); verify it."""
        r = self.regions[loc.region]
        if r.generation != loc.generation:
            return False
        try:
            n = await self.dev.io.readv(loc.offset + BLOCK, [dest])
        except OSError as e:
            self.counters["read_errors"] += 1
            log.error("nvme read failed at offset %d: %s", loc.offset, e)
            return False
        self.counters["bytes_read"] += n
        if n < loc.length or xxhash.xxh3_64_intdigest(dest[:loc.length]) != loc.checksum:
            self.counters["checksum_failures"] += 1
            log.error("nvme record at offset %d failed its checksum (read %d of %d bytes); dropped",
                      loc.offset, n, loc.length)
            return False
        return True

    def forget(self, loc: Location, ns: bytes, key: bytes) -> None:
        """The record at ``loc`` no longer holds the key's current value (deleted,
        overwritten or ignored): it stays on disk until its region is reclaimed, so
        it counts as stale until then (its tombstones must outlive it)."""
        r = self.regions[loc.region]
        if r.generation == loc.generation:
            k = (ns, key)
            r.live.discard(k)
            self._mark_stale(r, k)

    # -- stats ----------------------------------------------------------------
    def stats(self) -> dict:
        used = sum(r.write_ptr for r in self.regions if r.state != "free")
        return {
            "capacity": self.dev.nregions * self.dev.region_size,
            "used": used,
            "objects": sum(len(r.live) for r in self.regions),
            "regions_total": self.dev.nregions,
            "regions_free": sum(1 for r in self.regions if r.state == "free"),
            "region_size": self.dev.region_size,
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
        for r in self.regions:
            if (r.state not in ("open", "full") or r.sum_state == "written" or r.pending
                    or r.summary is None or r.frontier != r.write_ptr):
                continue
            buf = summary_block(r, self.dev.seed)
            try:
                if os.pwritev(self.dev.fd, [memoryview(buf)], r.base + r.size - len(buf)) == len(buf):
                    self.counters["summaries_written"] += 1
            except OSError as e:
                log.warning("nvme region %d: summary write at close failed: %s", r.index, e)
        for t in (self._interval_task, self._sync_task):
            if t is not None and not t.done():
                try:
                    t.cancel()
                except RuntimeError:  # its event loop is closed already
                    pass
        self.dev.close()
