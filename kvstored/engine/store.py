"""Store: the index, the DRAM arena, eviction, pins and two-phase puts.

Everything here runs on the daemon's event loop thread, so there are no locks;
the only coroutine is ``reserve_wait``, which waits (bounded) for space.

Invariants kept here (see docs/architecture.md):
  * put is reserve -> fill -> commit; only committed entries are in the index;
  * an entry with a reader reference, a live pin or no commit is never evicted,
    and its slot is only freed once the last reference is released;
  * a second put of the same key and checksum is a no-op; a different checksum
    is a Conflict unless overwrite is asked.

With an NVMe tier, an entry lives in DRAM (``offset >= 0``), on NVMe
(``nvme`` is a Location) or both. DRAM eviction demotes an entry (writes it
to NVMe, holding a reference so the slot cannot be reused meanwhile) and only
then drops the DRAM copy; a get of an NVMe-only entry promotes it back into a
DRAM slot, verifying its checksum. Deleting or overwriting an entry that has
an NVMe copy appends a tombstone so a restart does not bring it back.
"""
from __future__ import annotations

import asyncio
import logging
import mmap
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

from kvstore.errors import ChecksumMismatch, Conflict, InvalidArgument, NoSpace, NotFound
from kvstore.wire import checksum as payload_checksum

from .arena import SLOT_ALIGN, Arena, SizeClass
from .eviction import NONE, PROTECTED, Policy

if TYPE_CHECKING:
    from .nvme import Location, NvmeTier

log = logging.getLogger("kvstored.store")

COMMITTED = 1
DEAD = 2  # removed from the index (deleted / overwritten / evicted) while still referenced


@dataclass
class StoreLimits:
    dram_size: int
    slab_size: int = 64 << 20
    max_value_size: int = 64 << 20
    high_watermark: float = 0.95
    low_watermark: float = 0.90
    reservation_timeout: float = 30.0
    put_wait_timeout: float = 2.0
    max_pin_ttl: float = 24 * 3600.0
    hugepages: bool = True
    prefault: bool = True


class NotResident(Exception):
    """The object is stored but not in DRAM: ``await Store.load(entry)`` first."""

    def __init__(self, entry: "Entry"):
        super().__init__("object is on NVMe")
        self.entry = entry


class Entry:
    """One committed object. While in DRAM, linked into its size class's eviction lists
    (``seg``, ``stamp``, ``newer``, ``older`` belong to eviction.Policy)."""

    __slots__ = ("ns", "key", "offset", "size", "checksum", "sc", "state", "refs",
                 "pins", "pin_until", "seg", "stamp", "newer", "older", "committed_at", "nvme",
                 "reads", "unverified")

    def __init__(self, ns: bytes, key: bytes, offset: int, size: int, checksum: int, sc: SizeClass):
        self.ns = ns
        self.key = key
        self.offset = offset
        self.size = size
        self.checksum = checksum
        self.sc = sc
        self.state = COMMITTED
        self.refs = 0
        self.pins = 0
        self.pin_until = 0.0
        self.seg = NONE
        self.stamp = 0
        self.newer: Entry | None = None
        self.older: Entry | None = None
        self.committed_at = time.time()
        self.nvme: Location | None = None  # the copy on the NVMe tier, if any
        self.reads = 0
        # Recovered at restart by a cluster node: it may have been deleted or replaced
        # while the node was away, so clients do not see it until the repair agent has
        # checked it against its peers (Store.verify / drop_unverified).
        self.unverified = False

    def pinned(self, now: float) -> bool:
        return self.pins > 0 and self.pin_until > now


class Reservation:
    """A slot being filled by a writer; invisible to readers until commit."""

    __slots__ = ("ns", "key", "offset", "size", "checksum", "sc", "overwrite", "deadline",
                 "view", "on_expire", "done")

    def __init__(self, ns, key, offset, size, checksum, sc, overwrite, deadline, view):
        self.ns = ns
        self.key = key
        self.offset = offset
        self.size = size
        self.checksum = checksum
        self.sc = sc
        self.overwrite = overwrite
        self.deadline = deadline
        self.view: memoryview = view
        # Called by the reaper before the slot is reclaimed, so the writer stops
        # writing into it (the TCP server closes the connection).
        self.on_expire: Callable[[Reservation], None] | None = None
        self.done = False


class Store:
    def __init__(self, limits: StoreLimits, clock: Callable[[], float] = time.monotonic,
                 nvme: "NvmeTier | None" = None, hold_recovered: bool = False):
        if limits.max_value_size > limits.slab_size:
            raise ValueError("max_value_size must not exceed slab_size")
        if not 0 < limits.low_watermark <= limits.high_watermark <= 1:
            raise ValueError("watermarks must satisfy 0 < low <= high <= 1")
        self.limits = limits
        self.clock = clock
        self.arena = Arena(limits.dram_size, limits.slab_size, hugepages=limits.hugepages)
        if limits.prefault:
            self.arena.prefault_in_background()
        self.index: dict[tuple[bytes, bytes], Entry] = {}
        self.policy = Policy(len(self.arena.classes))
        self._by_offset: dict[int, Entry] = {}
        self._draining = None  # the slab being emptied for another class, if any
        self._drain_since = 0.0
        self.reservations: set[Reservation] = set()
        # binds lazily to the running loop on first wait, so safe to create outside one
        self._space_freed = asyncio.Event()
        self.counters = dict.fromkeys(
            ("puts", "put_bytes", "dedups", "conflicts", "gets", "get_bytes", "hits", "misses",
             "evictions", "evicted_bytes", "checksum_failures", "reservations_expired",
             "deletes", "no_space", "pins", "unpins"), 0)
        self.objects_bytes = 0
        self.reserved_bytes = 0
        self.dram_objects = 0
        self.demoting_bytes = 0
        # kept as we go so Stats and metric scrapes never walk the whole index
        self._ns_objects: dict[bytes, int] = {}
        self._pinned: set[Entry] = set()  # entries with a pin count (leases may have lapsed)
        self._loading: dict[int, asyncio.Future] = {}  # id(entry) -> promotion in progress
        self._tasks: set[asyncio.Task] = set()
        self.nvme = nvme
        self.flush_not_kept = 0  # DRAM-only objects the last shutdown flush could not write
        self.unverified = 0  # entries hidden from clients until verified (hold_recovered)
        # Told of index changes and lookups (KV events, per-namespace metrics): an object
        # with stored(entry), removed(entry), looked_up(ns, asked, hits, hit_bytes); None = off.
        self.observer = None
        self._hold_recovered = hold_recovered
        if nvme is not None:
            nvme.can_reclaim = self._can_reclaim_region
            nvme.on_reclaim = self._drop_region
            self._recover()

    # ------------------------------------------------------------------ put
    def reserve(self, ns: bytes, key: bytes, size: int, checksum: int | None,
                overwrite: bool = False) -> Reservation | None:
        """Reserve a slot for ``size`` bytes, or None when the same object is already stored.

        Raises Conflict (different checksum, no overwrite), InvalidArgument (too
        large) or NoSpace (nothing evictable right now; see ``reserve_wait``).
        ``checksum=None``: the writer fills the slot in place (shm) and ``commit``
        computes the checksum; dedup and conflicts are then decided at commit.
        """
        if size > self.limits.max_value_size:
            raise InvalidArgument(
                f"value of {size} bytes exceeds max_value_size {self.limits.max_value_size}")
        if self.dedup(ns, key, size, checksum):
            return None
        old = self.index.get((ns, key))
        if old is not None and old.unverified:
            overwrite = True  # a fresh write beats a record not yet verified
        if old is not None and not overwrite and checksum is not None:
            self.counters["conflicts"] += 1
            raise Conflict(f"key exists with a different checksum (size {old.size}); "
                           "objects are immutable unless overwrite is asked")
        sc = self.arena.class_for(size)
        off = self._alloc(sc)
        if off is None:
            self.counters["no_space"] += 1
            raise NoSpace(f"no space for {size} bytes: every candidate is pinned, referenced "
                          "or being written")
        view = self.arena.view[off:off + size]
        res = Reservation(ns, key, off, size, checksum, sc, overwrite,
                          self.clock() + self.limits.reservation_timeout, view)
        self.reservations.add(res)
        self.reserved_bytes += size
        return res

    def dedup(self, ns: bytes, key: bytes, size: int, checksum: int | None) -> bool:
        """True when exactly these bytes (size and checksum) are stored under the key: the
        put is answered from the index alone, overwrite or not, before any slot is taken
        (re-puts, e.g. a cluster client's, otherwise reserve, copy and free a slot)."""
        old = self.index.get((ns, key))
        if old is None or checksum is None or old.checksum != checksum or old.size != size:
            return False
        if old.unverified:
            self.verify(old)  # a writer vouches for exactly these bytes
        self.policy.touch(old)  # a put of what is stored is an access
        self.counters["dedups"] += 1
        return True

    async def reserve_wait(self, ns: bytes, key: bytes, size: int, checksum: int,
                           overwrite: bool = False, timeout: float | None = None) -> Reservation | None:
        """``reserve``, waiting up to ``put_wait_timeout`` for space to be freed."""
        deadline = self.clock() + (self.limits.put_wait_timeout if timeout is None else timeout)
        while True:
            try:
                return self.reserve(ns, key, size, checksum, overwrite)
            except NoSpace:
                left = deadline - self.clock()
                if left <= 0:
                    raise
                self._space_freed.clear()
                try:
                    await asyncio.wait_for(self._space_freed.wait(), min(left, 0.05))
                except asyncio.TimeoutError:
                    pass  # re-check: pin leases may have lapsed meanwhile

    def commit(self, res: Reservation) -> bool:
        """Verify the checksum and publish. True if stored, False if it deduplicated."""
        actual = payload_checksum(res.view)
        if res.checksum is None:
            res.checksum = actual
        ok = actual == res.checksum
        self._finish(res)
        if not ok:
            self.counters["checksum_failures"] += 1
            self._free_slot(res.offset)
            raise ChecksumMismatch("payload checksum does not match the declared checksum; "
                                   "nothing was stored")
        k = (res.ns, res.key)
        old = self.index.get(k)
        if old is not None and old.unverified:
            self._unlink(old, tombstone=True)
            old = None
        if old is not None:
            if old.checksum == res.checksum and old.size == res.size:
                self._free_slot(res.offset)  # a concurrent identical put won the race
                self.counters["dedups"] += 1
                return False
            if not res.overwrite:
                self._free_slot(res.offset)
                self.counters["conflicts"] += 1
                raise Conflict("key exists with different bytes; objects are immutable unless "
                               "overwrite is asked")
            self._unlink(old, tombstone=True)
        e = Entry(res.ns, res.key, res.offset, res.size, res.checksum, res.sc)
        self.index[k] = e
        self._ns_objects[res.ns] = self._ns_objects.get(res.ns, 0) + 1
        self._by_offset[res.offset] = e
        self.policy.insert(e)
        self.dram_objects += 1
        self.objects_bytes += res.size
        self.counters["puts"] += 1
        self.counters["put_bytes"] += res.size
        if self.observer is not None:
            self.observer.stored(e)
        self.maybe_evict()
        return True

    def abort(self, res: Reservation) -> None:
        """Drop a reservation (failed or abandoned write); nothing becomes visible."""
        if not res.done:
            self._finish(res)
            self._free_slot(res.offset)

    def put_bytes(self, ns: bytes, key: bytes, data, checksum: int | None = None,
                  overwrite: bool = False) -> bool:
        """One-shot put from a buffer (control-plane small objects)."""
        cs = payload_checksum(data) if checksum is None else checksum
        res = self.reserve(ns, key, len(data), cs, overwrite)
        if res is None:
            return False
        try:
            res.view[:] = data
        except BaseException:
            self.abort(res)
            raise
        return self.commit(res)

    def _finish(self, res: Reservation) -> None:
        res.done = True
        res.view.release()
        self.reservations.discard(res)
        self.reserved_bytes -= res.size

    # ------------------------------------------------------------------ get
    def acquire(self, ns: bytes, key: bytes) -> Entry:
        """Take a read reference on a committed object (release it when done)."""
        e = self.index.get((ns, key))
        if e is None or e.unverified:
            self.counters["gets"] += 1
            self.counters["misses"] += 1
            raise NotFound(f"no key {_show(key)} in namespace {ns.decode(errors='replace')}")
        if e.offset < 0:
            raise NotResident(e)  # the get is counted when the loaded entry is acquired
        self.counters["gets"] += 1
        self.counters["hits"] += 1
        self.counters["get_bytes"] += e.size
        self.policy.touch(e)
        e.reads += 1
        e.refs += 1
        return e

    async def acquire_async(self, ns: bytes, key: bytes) -> Entry:
        """``acquire``, promoting the object from NVMe into DRAM when needed."""
        try:
            return self.acquire(ns, key)
        except NotResident as nr:
            await self.load(nr.entry)
            return self.acquire(ns, key)

    async def load(self, e: Entry) -> None:
        """Promote an NVMe-only entry into DRAM (verified), or raise NotFound if its copy is bad."""
        pending = self._loading.get(id(e))
        if pending is not None:
            await asyncio.shield(pending)
            return
        fut = asyncio.get_running_loop().create_future()
        self._loading[id(e)] = fut
        e.refs += 1  # keeps its region from being reclaimed while we read
        off = None
        try:
            off = await self._alloc_wait(e.sc)
            loc = e.nvme
            small = e.sc.slot_size < SLOT_ALIGN  # not page aligned: read through a bounce page
            dest = memoryview(mmap.mmap(-1, _align(e.size))) if small else \
                self.arena.view[off:off + _align(e.size)]
            ok = loc is not None and await self.nvme.read(loc, dest)
            if ok and small:
                self.arena.view[off:off + e.size] = dest[:e.size]
            if e.state == DEAD or e.nvme is not loc:
                self._free_slot(off)
                off = None
                raise NotFound("object was deleted while being read")
            if not ok:
                self._free_slot(off)
                off = None
                self.nvme.counters["misses"] += 1
                self._unlink(e, tombstone=True)
                raise NotFound("object failed its checksum on NVMe and was dropped")
            self.nvme.counters["hits"] += 1
            self.nvme.counters["promotions"] += 1
            e.offset = off
            self._by_offset[off] = e
            self.policy.insert_loaded(e)
            self.dram_objects += 1
            off = None
            fut.set_result(None)
        except BaseException as exc:
            if off is not None:
                self._free_slot(off)
            fut.set_exception(exc if isinstance(exc, Exception) else NotFound("load cancelled"))
            fut.exception()  # retrieved here; waiters re-raise their own
            raise
        finally:
            del self._loading[id(e)]
            self.release(e)

    async def _alloc_wait(self, sc: SizeClass) -> int:
        deadline = self.clock() + self.limits.put_wait_timeout
        while True:
            off = self._alloc(sc)
            if off is not None:
                return off
            left = deadline - self.clock()
            if left <= 0:
                self.counters["no_space"] += 1
                raise NoSpace("no DRAM space to load the object from NVMe")
            self._space_freed.clear()
            try:
                await asyncio.wait_for(self._space_freed.wait(), min(left, 0.05))
            except asyncio.TimeoutError:
                pass

    def view(self, e: Entry) -> memoryview:
        return self.arena.view[e.offset:e.offset + e.size]

    def release(self, e: Entry) -> None:
        e.refs -= 1
        if e.refs == 0 and e.state == DEAD and e.offset >= 0:
            self._free_slot(e.offset)

    # ------------------------------------------------------- batch queries
    def exists(self, ns: bytes, keys: Iterable[bytes]) -> list[bool]:
        """Which of ``keys`` are stored. Counts as an access of those found (prefix
        lookups are made with it too), the first key most recent."""
        idx = self.index
        out = []
        found = []
        for k in keys:
            e = idx.get((ns, k))
            ok = e is not None and not e.unverified
            out.append(ok)
            if ok:
                found.append(e)
        self.policy.touch_chain(found)
        return out

    def lookup(self, ns: bytes, keys: Iterable[bytes]) -> int:
        """How many of ``keys`` exist, counting from the first (a prefix hit length).

        The hits count as accesses, and a missing last key is noted as a chain tail
        (eviction.Policy.note_chain)."""
        keys = keys if isinstance(keys, list) else list(keys)
        hits = []
        hit_bytes = 0
        idx = self.index
        held = self.unverified  # records held back after a restart count as absent
        for k in keys:
            e = idx.get((ns, k))
            if e is None or (held and e.unverified):
                break
            hits.append(e)
            hit_bytes += e.size
        self.policy.touch_chain(hits)
        self.policy.note_chain(ns, keys, len(hits))
        n = len(hits)
        if self.observer is not None:
            self.observer.looked_up(ns, len(keys), n, hit_bytes)
        return n

    def pin(self, ns: bytes, keys: Iterable[bytes], ttl: float) -> int:
        """Protect objects from eviction for ``ttl`` seconds (or until unpinned)."""
        if not 0 < ttl <= self.limits.max_pin_ttl:
            raise InvalidArgument(f"pin ttl {ttl} outside (0, {self.limits.max_pin_ttl}] seconds")
        until = self.clock() + ttl
        n = 0
        for k in keys:
            e = self.index.get((ns, k))
            if e is None or e.unverified:
                continue
            if e.pin_until <= self.clock():
                e.pins = 0  # the old lease lapsed: start afresh
            e.pins += 1
            e.pin_until = max(e.pin_until, until)
            self._pinned.add(e)
            n += 1
        self.counters["pins"] += n
        return n

    def unpin(self, ns: bytes, keys: Iterable[bytes]) -> int:
        n = 0
        for k in keys:
            e = self.index.get((ns, k))
            if e is None or e.pins == 0:
                continue
            e.pins -= 1
            if e.pins == 0:
                e.pin_until = 0.0
                self._pinned.discard(e)
            n += 1
        self.counters["unpins"] += n
        if n:
            self._signal_space()
        return n

    def delete(self, ns: bytes, keys: Iterable[bytes]) -> int:
        n = 0
        for k in keys:
            e = self.index.get((ns, k))
            if e is not None:
                self._unlink(e, tombstone=True)
                n += 1
        self.counters["deletes"] += n
        return n

    def sample(self, ns: bytes | None, limit: int) -> list[Entry]:
        """Up to ``limit`` committed entries (dict order), optionally of one namespace."""
        out = []
        for (ens, _), e in self.index.items():
            if (ns is None or ens == ns) and not e.unverified:
                out.append(e)
                if len(out) >= limit:
                    break
        return out

    # The index as the control plane's admin calls see it (they never read self.index):
    def object_count(self) -> int:
        """Objects in the index, held (unverified) records included."""
        return len(self.index)

    def keys(self, ns: bytes | None = None) -> list[tuple[bytes, bytes]]:
        """A snapshot of (namespace, key) of every object, optionally of one namespace."""
        return [k for k in self.index if ns is None or k[0] == ns]

    def peek(self, ns: bytes, key: bytes) -> Entry | None:
        """The entry of (ns, key) without counting an access (cluster Heads), or None."""
        return self.index.get((ns, key))

    # ------------------------------------------------------------ eviction
    def _alloc(self, sc: SizeClass) -> int | None:
        off = self.arena.alloc(sc)
        if off is not None:
            return off
        # class full and no free slab: evict in this class, else empty a slab elsewhere
        now = self.clock()

        def evictable(e: Entry) -> bool:
            return e.refs == 0 and not e.pinned(now)

        for _ in range(8):  # demotions free their slot later; a drop frees it now
            victim = self.policy.victim(sc.index, evictable)
            if victim is None:
                break
            if self._evict(victim):
                off = self.arena.alloc(sc)
                if off is not None:
                    return off
        if self._reclaim_slab(sc, now):
            return self.arena.alloc(sc)
        return None

    def _reclaim_slab(self, wanted: SizeClass, now: float) -> bool:
        """Empty a slab of another class for ``wanted``. True if a slab is free now.

        A slab qualifies when every used slot holds a committed object that is
        neither referenced nor pinned. Its objects are evicted like any victim:
        dropped, or demoted first when an NVMe tier is configured, in which case the
        slab is *drained* (hands out no slot) until the writes finish and it returns
        to the pool; the caller waits for it (``reserve_wait``). One slab drains at
        a time, so concurrent waiters do not empty several.
        """
        if self.arena.free_slabs:
            return True
        d = self._draining
        if d is not None:
            if not d.draining:  # emptied since: it went back to the pool
                self._draining = None
            else:
                left = [e for e in (self._by_offset.get(o) for o in self.arena.slots(d))
                        if e is not None]
                if any(e.pinned(now) for e in left) or \
                        now - self._drain_since > self.limits.put_wait_timeout:
                    # pinned after the drain began, or no slot freed for a while (a long
                    # reader): give up on this slab (it serves its class again), try another
                    self.arena.undrain(d)
                    self._draining = None
                else:
                    for e in left:  # a reader that held one back has let go now
                        if e.refs == 0:
                            self._evict(e)
                    return bool(self.arena.free_slabs)
        for sc in sorted(self.arena.classes, key=lambda c: len(c.slabs), reverse=True):
            if sc is wanted or not sc.slabs:
                continue
            for slab in sc.slabs:
                used = [e for e in (self._by_offset.get(o) for o in self.arena.slots(slab))
                        if e is not None]
                # every used slot must be a committed, evictable object (no reservation,
                # no dead object still being read)
                if len(used) != slab.used or any(e.refs or e.pinned(now) for e in used):
                    continue
                self.arena.drain(slab)
                for e in used:
                    self._evict(e)
                if slab.draining:  # demotions in flight: it frees when they are written
                    self._draining = slab
                    self._drain_since = now
                    return False
                return True
        return False

    def maybe_evict(self) -> int:
        """With an NVMe tier, demote down to the low watermark once use passes the high one.

        Demotion is asynchronous, so the headroom lets puts go on while NVMe writes.
        Without a tier an eviction is an O(1) unlink done by the allocation that needs
        the slot, so no headroom is kept and all of the DRAM holds objects.
        """
        a = self.arena
        if self.nvme is None or a.used_bytes <= self.limits.high_watermark * a.size:
            return 0
        target = self.limits.low_watermark * a.size
        now = self.clock()

        def evictable(e: Entry) -> bool:
            return e.refs == 0 and not e.pinned(now)

        n = 0
        stuck: set[int] = set()
        pol = self.policy
        while a.used_bytes - self.demoting_bytes > target and len(stuck) < len(a.classes):
            # the class holding the most bytes gives up the next victim
            sc = max((c for c in a.classes if c.index not in stuck),
                     key=lambda c: pol.count(c.index) * c.slot_size)
            v = pol.victim(sc.index, evictable)
            if v is None:
                stuck.add(sc.index)
                continue
            self._evict(v)
            n += 1
        return n

    def _evict(self, e: Entry) -> bool:
        """Make ``e`` leave DRAM. True if its slot is free now (False: a demotion started)."""
        self.counters["evictions"] += 1
        self.counters["evicted_bytes"] += e.size
        if self.nvme is None:
            self._unlink(e, evicted=True)
            return True
        if e.nvme is not None:  # a clean copy is on NVMe already
            self._drop_dram(e)
            return True
        if self.nvme.admit(e.size, e.reads):
            self._start_demotion(e)
            return False
        self._unlink(e, evicted=True)
        return True

    def _drop_dram(self, e: Entry) -> None:
        self.policy.remove(e)
        self._by_offset.pop(e.offset, None)
        self.dram_objects -= 1
        off, e.offset = e.offset, -1
        self._free_slot(off)

    def _start_demotion(self, e: Entry) -> None:
        e.refs += 1  # the write reads the slot: it must not be freed or reused meanwhile
        self.demoting_bytes += e.size
        t = asyncio.get_running_loop().create_task(self._demote(e, self.nvme.next_seq()))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _demote(self, e: Entry, seq: int) -> None:
        try:
            loc = await self.nvme.append(e.ns, e.key, self._nvme_payload(e), e.size, e.checksum,
                                         _nvme_slot(e), e.committed_at, seq=seq)
        except OSError as err:
            loc = None
            log.warning("demotion failed (%s); object dropped from DRAM instead", err)
        finally:
            self.demoting_bytes -= e.size
        e.refs -= 1
        if e.state == DEAD:  # deleted or overwritten meanwhile
            if loc is not None:  # the delete's tombstone has a higher seq already
                self.nvme.forget(loc, e.ns, e.key)
            if e.refs == 0:
                self._free_slot(e.offset)
            return
        if loc is None:
            if e.refs == 0:
                self._unlink(e)
            return
        e.nvme = loc
        if e.refs == 0 and e.offset >= 0:
            self._drop_dram(e)

    def _nvme_payload(self, e: Entry) -> memoryview:
        """The object's bytes as the NVMe tier writes them (O_DIRECT): page aligned, whole
        pages. Sub-page slots are not page aligned, so they are copied to a bounce page."""
        if e.sc.slot_size >= SLOT_ALIGN:
            return self.arena.view[e.offset:e.offset + _align(e.size)]
        page = memoryview(mmap.mmap(-1, _align(e.size)))
        page[:e.size] = self.arena.view[e.offset:e.offset + e.size]
        return page

    def _spawn(self, coro) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _tombstone(self, e: Entry, seq: int) -> None:
        try:
            await self.nvme.append(e.ns, e.key, None, 0, 0, 0, time.time(), tombstone=True, seq=seq)
        except OSError as err:
            log.error("could not persist the deletion of an NVMe object (%s); it may reappear "
                      "after a restart", err)

    def _unlink(self, e: Entry, tombstone: bool = False, evicted: bool = False) -> None:
        """Remove from the index; free the slot now or when the last reader releases.

        ``tombstone``: the removal is a user's delete/overwrite, so an NVMe copy must
        not come back at restart. ``evicted``: the store dropped it for space (its key
        goes to the eviction ghost).
        """
        del self.index[(e.ns, e.key)]
        if self.observer is not None:
            self.observer.removed(e)
        if e.unverified:
            e.unverified = False
            self.unverified -= 1
        left = self._ns_objects[e.ns] - 1
        if left:
            self._ns_objects[e.ns] = left
        else:
            del self._ns_objects[e.ns]
        self._pinned.discard(e)
        self.objects_bytes -= e.size
        e.state = DEAD
        if self.nvme is not None and tombstone and (e.nvme is not None or e.refs):
            # also when a demotion is in flight (refs): its record must not outlive the delete
            self._spawn(self._tombstone(e, self.nvme.next_seq()))
        if e.nvme is not None:
            self.nvme.forget(e.nvme, e.ns, e.key)
            e.nvme = None
        if e.offset >= 0:
            self.policy.remove(e, evicted)
            self._by_offset.pop(e.offset, None)
            self.dram_objects -= 1
            if e.refs == 0:
                self._free_slot(e.offset)

    # --------------------------------------------------------------- NVMe tier
    def _recover(self) -> None:
        """Index the objects found on NVMe at start (they stay there until read)."""
        skipped = 0
        for rec in self.nvme.recovered_objects():
            if rec.loc.length > self.limits.max_value_size:
                skipped += 1
                self.nvme.forget(rec.loc, rec.ns, rec.key)
                continue
            e = Entry(rec.ns, rec.key, -1, rec.loc.length, rec.loc.checksum,
                      self.arena.class_for(rec.loc.length))
            e.committed_at = rec.committed_at
            e.nvme = rec.loc
            if self._hold_recovered:
                e.unverified = True
                self.unverified += 1
            self.index[(rec.ns, rec.key)] = e
            self._ns_objects[rec.ns] = self._ns_objects.get(rec.ns, 0) + 1
            self.objects_bytes += e.size
        if skipped:
            log.warning("%d objects on NVMe exceed max_value_size and are ignored", skipped)
        log.info("NVMe tier: %d objects recovered%s", len(self.index),
                 " (held from clients until verified by the cluster)" if self.unverified else "")

    # --------------------------------------------------------- cluster repair
    def verify(self, e: Entry) -> None:
        """A recovered record was found current: serve it."""
        if e.unverified:
            e.unverified = False
            self.unverified -= 1

    def drop_unverified(self, ns: bytes, key: bytes, checksum: int) -> bool:
        """Delete a recovered record found stale (deleted or replaced meanwhile), if it is
        still that record."""
        e = self.index.get((ns, key))
        if e is None or not e.unverified or e.checksum != checksum:
            return False
        self._unlink(e, tombstone=True)
        self.counters["deletes"] += 1
        return True

    def repair_snapshot(self) -> list[tuple]:
        """(ns, key, size, checksum, unverified, pinned, protected, reads, committed_at) of every object,
        in repair order: unverified first (the node serves them once checked), then
        pinned, then read since put (protected segment), then most read."""
        now = self.clock()
        rows = [(e.ns, e.key, e.size, e.checksum, e.unverified, e.pinned(now), e.seg == PROTECTED, e.reads,
                 e.committed_at) for e in self.index.values()]
        rows.sort(key=lambda r: (not r[4], not r[5], not r[6], -r[7]))
        return rows

    async def read_head(self, ns: bytes, key: bytes, n: int) -> tuple[Entry, bytes] | None:
        """The entry and first ``n`` bytes of an object, unverified ones included (repair
        only); None when absent."""
        e = self.index.get((ns, key))
        if e is None:
            return None
        if e.offset < 0:
            await self.load(e)
            e = self.index.get((ns, key))
            if e is None or e.offset < 0:
                return None
        return e, bytes(self.arena.view[e.offset:e.offset + min(n, e.size)])

    def _can_reclaim_region(self, region) -> bool:
        now = self.clock()
        for k in region.live:
            e = self.index.get(k)
            if e is None or e.nvme is None or e.nvme.region != region.index:
                continue
            if e.offset < 0 and (e.refs or e.pinned(now)):
                return False  # pinned objects keep their only copy; reads in flight finish
        return True

    def _drop_region(self, region) -> None:
        for k in list(region.live):
            e = self.index.get(k)
            if e is None or e.nvme is None or e.nvme.region != region.index:
                continue
            e.nvme = None
            if e.offset < 0:
                self._unlink(e)

    async def flush_to_nvme(self, timeout: float) -> int:
        """Demote every DRAM-only object (shutdown); returns how many were written.

        Never at the cost of what is on NVMe already: meanwhile the tier reclaims only
        regions holding no live object. Objects that do not fit (or miss the deadline)
        stay DRAM-only and are lost at exit: ``flush_not_kept`` counts them, and a
        warning says so. Most-read objects go first.
        """
        self.flush_not_kept = 0
        if self.nvme is None:
            return 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        todo = sorted((e for e in self.index.values() if e.nvme is None and e.offset >= 0),
                      key=lambda e: -e.reads)
        written = 0
        why = ""
        self.nvme.keep_live = True
        try:
            for i, e in enumerate(todo):
                if loop.time() >= deadline:
                    why = "the flush reached its deadline"
                elif e.state == DEAD or e.nvme is not None:
                    continue
                if why:
                    self.flush_not_kept = sum(1 for x in todo[i:] if x.state != DEAD and x.nvme is None)
                    break
                e.refs += 1
                try:
                    loc = await self.nvme.append(e.ns, e.key, self._nvme_payload(e), e.size,
                                                 e.checksum, _nvme_slot(e), e.committed_at)
                    if e.state == DEAD:  # deleted meanwhile: its tombstone came later
                        self.nvme.forget(loc, e.ns, e.key)
                    else:
                        e.nvme = loc
                    written += 1
                except OSError as err:
                    why = f"NVMe tier full or failing ({err.strerror or err})"
                    self.flush_not_kept = sum(1 for x in todo[i:] if x.state != DEAD and x.nvme is None)
                    break
                finally:
                    e.refs -= 1
        finally:
            self.nvme.keep_live = False
        if self.flush_not_kept:
            log.warning("shutdown flush: %s; %d DRAM-only objects could not be kept and are lost "
                        "at exit (%d written)", why, self.flush_not_kept, written)
        return written

    async def drain_tasks(self, timeout: float) -> None:
        """Let demotions and tombstones in flight finish (bounded)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    def _free_slot(self, offset: int) -> None:
        if self._draining is not None and self.arena.slab_of(offset) is self._draining:
            self._drain_since = self.clock()  # the drain progresses: its timeout restarts
        self.arena.free(offset)
        self._signal_space()

    def _signal_space(self) -> None:
        self._space_freed.set()

    # --------------------------------------------------------- maintenance
    def reap(self) -> int:
        """Reclaim reservations past their deadline (writer died or stalled)."""
        now = self.clock()
        expired = [r for r in self.reservations if r.deadline <= now]
        for r in expired:
            if r.on_expire is not None:
                r.on_expire(r)
            self.abort(r)
            self.counters["reservations_expired"] += 1
            log.warning("reclaimed an abandoned reservation: ns=%s key=%s size=%d",
                        r.ns.decode(errors="replace"), r.key.hex()[:32], r.size)
        return len(expired)

    def tier_stats(self) -> list[dict]:
        a = self.arena
        dram = {"name": "dram", "capacity": a.size, "used": a.used_bytes, "objects": self.dram_objects,
                "hits": self.counters["hits"], "misses": self.counters["misses"],
                "evictions": self.counters["evictions"], "evicted_bytes": self.counters["evicted_bytes"],
                "checksum_failures": self.counters["checksum_failures"]}
        tiers = [dram]
        if self.nvme is not None:
            tiers.append({"name": "nvme", "io_backend": self.nvme.io_backend,
                          "io_backend_reason": self.nvme.io_backend_reason, **self.nvme.stats()})
        return tiers

    def stats(self) -> dict:
        a = self.arena
        now = self.clock()
        lapsed = [e for e in self._pinned if e.pin_until <= now]
        self._pinned.difference_update(lapsed)  # O(pinned), not O(objects)
        pinned = len(self._pinned)
        namespaces = {ns.decode(errors="replace"): n for ns, n in self._ns_objects.items()}
        return {
            "dram_capacity": a.size,
            "dram_used": a.used_bytes,
            "objects": len(self.index),
            "unverified": self.unverified,
            "object_bytes": self.objects_bytes,
            "reservations": len(self.reservations),
            "reserved_bytes": self.reserved_bytes,
            "pinned": pinned,
            "slab_size": a.slab_size,
            "slabs_total": len(a.slabs),
            "slabs_free": len(a.free_slabs),
            "hugepages": a.hugepages,
            "dram_prefaulted": a.prefaulted,
            "namespaces": namespaces,
            **self.counters,
            # every tier's failures (the DRAM tier's own are self.counters'; see tier_stats)
            "checksum_failures": self.counters["checksum_failures"]
            + (self.nvme.counters["checksum_failures"] if self.nvme is not None else 0),
        }

    def close(self) -> None:
        if self.nvme is not None:
            self.nvme.close()
        self.arena.close()


def _align(n: int, a: int = 4096) -> int:
    return (n + a - 1) // a * a


def _nvme_slot(e: Entry) -> int:
    """The slot size the NVMe tier groups records by: NVMe records stay 4 KiB aligned."""
    return max(e.sc.slot_size, SLOT_ALIGN)


def _show(key: bytes) -> str:
    """A key for messages: text when printable, else hex; truncated."""
    try:
        text = key.decode()
        if text.isprintable():
            return repr(text[:64])
    except UnicodeDecodeError:
        pass
    return "0x" + key[:32].hex()
