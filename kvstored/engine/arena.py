"""The DRAM arena: one memfd mapping carved into fixed-size slabs.

A slab is given to one size class on demand and cut into equal slots; a slab
whose slots are all free goes back to the shared pool so another class can
take it, and the store can *drain* a slab (evict or demote what it holds, hand
out none of its slots meanwhile) so that no class is ever stuck without one.
memfd (not anonymous memory) so a same-host client can later map the very same
pages.

Slots of 4 KiB and more are 4 KiB aligned (the NVMe tier writes them with
O_DIRECT); smaller objects get sub-page classes from 256 bytes up, 64-byte
aligned, so a 1 KiB object costs 1 KiB instead of a page (the store copies
those through an aligned bounce page when they go to NVMe).
"""
from __future__ import annotations

import bisect
import ctypes
import logging
import mmap
import os
import threading
import time

log = logging.getLogger("kvstored.arena")

SLOT_ALIGN = 4096  # slots of this size and above are page aligned
MIN_SLOT = 256
SMALL_ALIGN = 64  # sub-page slots: cache-line aligned
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux >= 5.14
PREFAULT_CHUNK = 64 << 20
CLASS_CACHE = 4096  # sizes whose class Arena.class_for remembers


def size_classes(max_slot: int) -> list[int]:
    """Slot sizes: four steps per power of two (<= 25% waste); 4 KiB aligned from
    4 KiB up, 64-byte aligned below.

    Powers of two are classes themselves, so the usual KV block sizes fit exactly.
    """
    out = set()
    p = MIN_SLOT
    while p <= max_slot:
        align = SLOT_ALIGN if p >= SLOT_ALIGN else SMALL_ALIGN
        for step in (4, 5, 6, 7):
            s = p * step // 4
            s = (s + align - 1) // align * align
            if s <= max_slot:
                out.add(s)
        p *= 2
    out.add(max_slot)
    return sorted(out)


class Slab:
    __slots__ = ("index", "base", "size_class", "free", "used", "bump", "draining")

    def __init__(self, index: int, base: int):
        self.index = index
        self.base = base
        self.size_class: SizeClass | None = None
        # Freed slot offsets (absolute in the arena); slots never handed out yet are
        # taken from ``bump`` upwards, so taking a slab costs O(1), not O(slots).
        self.free: list[int] = []
        self.bump = base
        self.used = 0
        self.draining = False  # being emptied for another class: hands out no slot


class SizeClass:
    __slots__ = ("index", "slot_size", "slots_per_slab", "slabs", "partial", "key_base",
                 "footprint")

    def __init__(self, index: int, slot_size: int, slab_size: int, key_width: int = 0):
        self.index = index
        self.slot_size = slot_size
        slots = slab_size // slot_size
        # where a slab's key area begins (offset from its base); 0: this class has none
        self.key_base = 0
        if key_width:
            keyed = slab_size // (slot_size + key_width)
            # the key area takes whole slots: worth it while they cost the slab at most
            # twice the keys' own bytes (e.g. 64 MiB slabs, 40 B keys: classes up to 64 KiB)
            if keyed and (slots - keyed) * slot_size <= 2 * keyed * key_width:
                slots = keyed
                self.key_base = slab_size - keyed * key_width
        self.slots_per_slab = slots
        # arena bytes a slot takes, its key record included: what Arena.used_bytes counts,
        # so that a full arena reads full (the watermarks) whatever its classes' key areas
        self.footprint = slot_size + (key_width if self.key_base else 0)
        self.slabs: set[Slab] = set()
        self.partial: set[Slab] = set()  # slabs of this class with a free slot


class Arena:
    """Slot allocator over a memfd mapping. Single-threaded (the daemon's event loop)."""

    def __init__(self, size: int, slab_size: int, *, hugepages: bool = True, name: str = "kvstored-arena",
                 key_width: int = 0):
        if slab_size % SLOT_ALIGN or slab_size < MIN_SLOT:
            raise ValueError(f"slab size {slab_size} must be a multiple of {SLOT_ALIGN}")
        problem = key_width_problem(key_width)
        if problem:
            raise ValueError(f"key area width {key_width!r}: {problem}")
        nslabs = size // slab_size
        if nslabs < 1:
            raise ValueError(f"arena size {size} is smaller than one slab ({slab_size})")
        self.slab_size = slab_size
        self.size = nslabs * slab_size
        self.fd, self.hugepages = _memfd(name, self.size, hugepages)
        self.mmap = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        if hasattr(self.mmap, "madvise") and hasattr(mmap, "MADV_HUGEPAGE") and not self.hugepages:
            try:  # transparent huge pages on shmem, where the kernel allows it
                self.mmap.madvise(mmap.MADV_HUGEPAGE)
            except OSError:
                pass
        self.view = memoryview(self.mmap)
        self.slabs = [Slab(i, i * slab_size) for i in range(nslabs)]
        self.free_slabs: list[Slab] = list(reversed(self.slabs))
        # bytes of a slot's key record (0: no key areas): its length byte, then the key
        # zero-padded (the packed index writes them: Index.keep_key_in_area)
        self.key_width = key_width
        self.classes = [SizeClass(i, s, slab_size, key_width)
                        for i, s in enumerate(size_classes(slab_size))]
        self._class_sizes = [c.slot_size for c in self.classes]
        # size -> class of the sizes met so far: a put's lookup is a dict hit, not a bisect
        # (Store._slot looks here first, without the call)
        # (KV blocks come in a few sizes; bounded against a spray of distinct ones)
        self.class_by_size: dict[int, SizeClass] = {}
        self.used_bytes = 0  # bytes of slots handed out, with their key records
        self.prefaulted = 0  # bytes faulted in by prefault_in_background
        self._prefault_stop = threading.Event()
        self._prefault_thread: threading.Thread | None = None

    # -- classes -----------------------------------------------------------
    def class_for(self, size: int) -> SizeClass:
        sc = self.class_by_size.get(size)
        if sc is not None:
            return sc
        i = bisect.bisect_left(self._class_sizes, max(size, 1))
        if i == len(self.classes):
            raise ValueError(f"object of {size} bytes exceeds the slab size {self.slab_size}")
        sc = self.classes[i]
        if len(self.class_by_size) < CLASS_CACHE:
            self.class_by_size[size] = sc
        return sc

    def slab_of(self, offset: int) -> Slab:
        return self.slabs[offset // self.slab_size]

    # -- allocation --------------------------------------------------------
    def alloc(self, sc: SizeClass) -> int | None:
        """A free slot offset in class ``sc``, taking a free slab if needed; None if neither."""
        if not sc.partial:
            if not self.free_slabs:
                return None
            slab = self.free_slabs.pop()
            slab.size_class = sc
            slab.used = 0
            slab.free = []
            slab.bump = slab.base
            sc.slabs.add(slab)
            sc.partial.add(slab)
        slab = next(iter(sc.partial))
        if slab.free:
            off = slab.free.pop()
        else:
            off = slab.bump
            slab.bump += sc.slot_size
        slab.used += 1
        if slab.used == sc.slots_per_slab:
            sc.partial.discard(slab)
        self.used_bytes += sc.footprint
        return off

    def free(self, offset: int) -> None:
        slab = self.slab_of(offset)
        sc = slab.size_class
        assert sc is not None, "free of a slot in an unassigned slab"
        slab.used -= 1
        self.used_bytes -= sc.footprint
        if slab.used == 0:
            # whole slab free: give it back so any class can use it
            sc.slabs.discard(slab)
            sc.partial.discard(slab)
            slab.size_class = None
            slab.free = []
            slab.bump = slab.base
            slab.draining = False
            self.free_slabs.append(slab)
        else:
            slab.free.append(offset)
            if not slab.draining:
                sc.partial.add(slab)

    def drain(self, slab: Slab) -> None:
        """Hand out no more slots of ``slab``: it returns to the pool once its objects are gone."""
        slab.draining = True
        if slab.size_class is not None:
            slab.size_class.partial.discard(slab)

    def undrain(self, slab: Slab) -> None:
        slab.draining = False
        sc = slab.size_class
        if sc is not None and slab.used < sc.slots_per_slab:
            sc.partial.add(slab)

    def slots(self, slab: Slab) -> range:
        """Offsets of the slots of ``slab`` that were ever handed out (used or freed)."""
        sc = slab.size_class
        return range(slab.base, slab.bump, sc.slot_size) if sc is not None else range(0)


    # -- key areas -------------------------------------------------------------
    # A slot's record is at its slab's base + key_base + slot number x key_width: a length
    # byte, then the key, zero-padded. The packed index writes and reads the same layout in
    # C (every put, and a get's check: Index.use_key_area, keep_key_in_area, get_read).
    def read_key(self, offset: int, sc: SizeClass) -> bytes | None:
        """The bytes in the key record of the slot at ``offset`` of class ``sc``, unchecked
        (a client may have rewritten them: the caller verifies); None where its class has
        no key area or the length byte is past the record. ``offset`` must have been a
        slot of ``sc`` (an entry's own offset and class, even after its slab went to
        another class: the record read is then another object's bytes, which the caller's
        check refuses, and never outside the arena)."""
        base = sc.key_base
        if not base:
            return None
        rel = offset % self.slab_size
        at = offset - rel + base + rel // sc.slot_size * self.key_width
        m = self.mmap
        n = m[at]
        return m[at + 1:at + 1 + n] if n < self.key_width else None

    @property
    def free_bytes(self) -> int:
        return self.size - self.used_bytes

    # -- prefault -------------------------------------------------------------
    def prefault_in_background(self) -> None:
        """Fault every page of the arena in from a helper thread.

        A first write to a memfd page costs a fault plus zeroing: measured 808 us
        per MiB against 57 us warm on the project's VM, so a fresh daemon would run
        its first pass of puts 14x slower. MADV_POPULATE_WRITE does it ahead of
        need; called through ctypes so the GIL is released and the event loop keeps
        serving meanwhile (populating never changes page contents, so it is safe
        under concurrent puts).
        """
        c = ctypes.c_char.from_buffer(self.mmap)
        addr = ctypes.addressof(c)
        del c  # drop the buffer export at once: only the address is needed
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

        def run():
            t = time.monotonic()
            for off in range(0, self.size, PREFAULT_CHUNK):
                if self._prefault_stop.is_set():
                    return
                n = min(PREFAULT_CHUNK, self.size - off)
                if libc.madvise(addr + off, n, MADV_POPULATE_WRITE) != 0:
                    log.info("arena prefault unavailable (%s); pages fault in on first use",
                             os.strerror(ctypes.get_errno()))
                    return
                self.prefaulted += n
            log.info("arena prefaulted: %d MiB in %.1fs", self.size >> 20, time.monotonic() - t)

        self._prefault_thread = threading.Thread(target=run, name="arena-prefault", daemon=True)
        self._prefault_thread.start()

    @property
    def prefaulting(self) -> bool:
        """True while the prefault thread still runs (the node reports "warming")."""
        return self._prefault_thread is not None and self._prefault_thread.is_alive()

    def close(self) -> None:
        self._prefault_stop.set()
        if self._prefault_thread is not None:
            self._prefault_thread.join()
        try:
            self.view.release()
            self.mmap.close()
        except (BufferError, ValueError):  # views still exported at shutdown: the OS reclaims
            pass
        try:
            os.close(self.fd)
        except OSError:
            pass


MAX_KEY_WIDTH = 136  # a record for a wire key of 128 bytes, rounded up to 8


def key_width_problem(width) -> str | None:
    """What is wrong with a key record width (``dram.key_area_bytes``), or None."""
    if isinstance(width, bool) or not isinstance(width, int):
        return f"must be an integer, not {type(width).__name__}"
    if width and not (16 <= width <= MAX_KEY_WIDTH and width % 8 == 0):
        return (f"must be 0 (keys stay in RAM) or a multiple of 8 from 16 to {MAX_KEY_WIDTH}, "
                f"got {width}")
    return None


def _memfd(name: str, size: int, hugepages: bool) -> tuple[int, bool]:
    # Only when enough huge pages are reserved: hugetlb memory is faulted in
    # lazily and an unbacked page would SIGBUS the daemon instead of failing here.
    if hugepages and hasattr(os, "MFD_HUGETLB") and _free_hugepage_bytes() >= size:
        try:
            fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_HUGETLB)
            try:
                os.ftruncate(fd, size)
                return fd, True
            except OSError:
                os.close(fd)
        except OSError:
            pass
        log.info("hugetlb pages unavailable for the arena; using normal pages (THP advised)")
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd, False


def _free_hugepage_bytes() -> int:
    try:
        info = dict(line.split(":", 1) for line in open("/proc/meminfo"))
        free = int(info["HugePages_Free"].split()[0])
        page_kib = int(info["Hugepagesize"].split()[0])
        return free * page_kib * 1024
    except (OSError, KeyError, ValueError):
        return 0
