"""One NVMe tier device or file: geometry, locking, the superblock, raw reads.

``NvmeDevice`` opens (O_DIRECT where the file system has it) and locks the file,
checks or writes the superblock, reserves the whole size up front and holds the
I/O backend (nvmeio). ``Region`` and ``Location`` are the in-memory state the
recovery scan (nvmescan) builds and the tier (nvme) keeps.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import stat
import uuid
from dataclasses import dataclass, field

import xxhash

from .nvmeformat import (BLOCK, DATA_START, MAX_REGION, MIN_REGION, SUPER, SUPER_MAGIC, VERSION,
                         align_up, superblock, verify)
from .nvmeio import open_backend

log = logging.getLogger("kvstored.nvme")


class NvmeError(Exception):
    """A configuration or device problem found at start (the daemon exits 2)."""


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
    state: str = "free"  # free | open | full | carrying | reclaiming (full, being reclaimed)
    write_ptr: int = 0  # next record offset, relative to base
    # live records here (each the newest of its key), counted, never listed: the keys stay
    # on disk (record headers, the summary; NvmeTier.region_rows reads them back)
    live_count: int = 0
    # one bit per 4 KiB block: the record starting there was forgotten since the region
    # was opened (or recovered), so a second forget of it changes nothing (None: none yet)
    dead: bytearray | None = None
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
                                f"{e.strerror} (free room on its file system, or lower "
                                "nvme.size)") from None

    def _superblock(self) -> bool:
        """Check or write the superblock; True if the device was formatted now."""
        buf = mmap.mmap(-1, BLOCK)
        try:
            n = os.preadv(self.fd, [memoryview(buf)], 0)
        except OSError:
            n = 0
        head = bytes(buf[:SUPER.size + 8])
        if n == BLOCK and head[:8] == SUPER_MAGIC:
            if not verify(head, SUPER.size):
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
        # reserve before formatting: a start refused for room must leave no superblock
        # behind, or the next start (with room) would take the file for one that shrank
        self._reserve()
        self.uuid = uuid.uuid4().bytes
        buf[:SUPER.size + 8] = superblock(self.size, self.region_size, self.nregions, self.uuid)
        os.pwritev(self.fd, [memoryview(buf)], 0)
        os.fsync(self.fd)
        return True

    def region_base(self, i: int) -> int:
        return DATA_START + i * self.region_size

    def read_into(self, buf, offset: int) -> bool:
        """Fill ``buf`` (aligned) from ``offset``; False on an error or a short read."""
        try:
            return os.preadv(self.fd, [memoryview(buf)], offset) == len(buf)
        except OSError:
            return False

    def read_upto(self, buf, offset: int, n: int) -> int:
        """Read up to ``n`` bytes (rounded up to 4 KiB) into ``buf``; bytes read, 0 on an error."""
        try:
            return os.preadv(self.fd, [memoryview(buf)[:align_up(n)]], offset)
        except OSError:
            return 0

    def read_many(self, reqs: list) -> list[int]:
        """Read every ``(offset, aligned buffer)`` at once through the I/O backend (blocking;
        at start only). Bytes read per request, or -errno."""
        return self.io.read_many(reqs)

    def close(self) -> None:
        self.io.close()
        try:
            os.fsync(self.fd)
        except OSError:
            pass
        os.close(self.fd)  # also drops the flock

