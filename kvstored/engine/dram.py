"""The DRAM tier: the arena's slots, who gets evicted for a new one, and when.

It owns the arena (size classes, slabs), the eviction policy's lists and the
watermarks. What leaving DRAM means (dropped, or demoted to NVMe first) is not
its business: ``evict`` is the tiering's callback, True when the slot is free now,
False when it frees later (a demotion in flight). Runs on the event loop thread;
the coroutines only wait (bounded) for space.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Callable

from kvstore.errors import NoSpace

from .arena import Arena, SizeClass
from .eviction import make_policy

if TYPE_CHECKING:
    from .entries import Entry, Index
    from .limits import StoreLimits


class DramTier:
    def __init__(self, limits: "StoreLimits", clock: Callable[[], float], index: "Index",
                 counters: dict):
        self.limits = limits  # shared with the Store: a reload changes it in place
        self.clock = clock
        self.index = index
        self.counters = counters  # the Store's; this tier counts no_space
        # the arena's shape is its settings' alone (the same whichever index): with the dict
        # index, which keeps every key in RAM, its key records are left unused
        self.arena = Arena(limits.dram_size, limits.slab_size, hugepages=limits.hugepages,
                           key_width=limits.key_area_bytes)
        index.use_slab_size(self.arena.slab_size)  # its slot map is laid out per slab
        if self.arena.key_width:  # the packed index writes and compares key records in C
            index.use_key_area(self.arena.mmap, self.arena.key_width)
        if limits.prefault:
            self.arena.prefault_in_background()
        self.policy = make_policy(len(self.arena.classes), index)
        self.objects = 0  # committed entries holding a slot
        # arena bytes (slot footprints, as Arena.used_bytes counts them) of objects being
        # written to NVMe: their slots free once written, so evict_down counts them gone
        self.demoting_bytes = 0
        self._draining = None  # the slab being emptied for another class, if any
        # while alloc evicts for a slot of this class: the victim's slot, handed over as
        # it is freed (not freed and allocated again; see alloc)
        self._claiming: SizeClass | None = None
        self._claimed: int | None = None
        self._drain_since = 0.0
        # binds lazily to the running loop on first wait, so safe to create outside one
        self._space_freed = asyncio.Event()
        # set by the Store: make an entry leave DRAM (see the module docstring)
        self.evict: Callable[["Entry"], bool] = _no_evict

    # ------------------------------------------------------------ entries
    def link(self, e: "Entry") -> None:
        """A committed entry now holds its slot: it becomes evictable (policy insert)."""
        self.index.place(e)
        self.policy.insert(e)
        self.objects += 1

    def link_loaded(self, e: "Entry", offset: int) -> None:
        """An NVMe-only entry was promoted into the slot at ``offset``."""
        e.offset = offset
        self.index.place(e)
        self.policy.insert_loaded(e)
        self.objects += 1

    def unlink(self, e: "Entry", evicted: bool = False) -> None:
        """A removed entry leaves the policy; its slot is freed now, or by the last
        ``release`` while readers hold it. ``evicted``: its key goes to the ghost."""
        try:
            self.policy.remove(e, evicted)
        except LookupError:
            # keyless, and its key record in the arena no longer verifies (a local client
            # rewrote it): no ghost digest can be made, but it must still leave its list
            self.policy.remove(e)
        self.index.displace(e)
        self.objects -= 1
        if e.refs == 0:
            self.free_slot(e.offset)

    def drop_copy(self, e: "Entry") -> None:
        """Free the DRAM copy of an entry that stays in the index (its copy is on NVMe)."""
        self.policy.remove(e)
        self.index.displace(e)
        self.objects -= 1
        off, e.offset = e.offset, -1
        self.free_slot(off)
        # NVMe-only now: its key is on the record's header, not kept in RAM (packed index)
        self.index.shed_key(e)

    def keep_key_in_arena(self, e: "Entry", off: int, sc: SizeClass, key: bytes) -> None:
        """A committed entry's key goes to the key record of its slot (``off``, of class
        ``sc``) and leaves RAM (``Index.shed_key(e, dram=True)``), where the class has a
        key area and the key fits a record; else it stays in RAM. Called once the entry is
        linked and announced: the policy's insert and the observer read the key, which
        they then have without the loader (``Store._key_of``). The packed index writes the
        record itself (``keep_key_in_area``: the arena given by ``use_key_area``; the
        layout ``Arena.read_key`` reads); the dict index keeps every key in RAM."""
        self.index.keep_key_in_area(e)

    def view(self, e: "Entry") -> memoryview:
        return self.arena.view[e.offset:e.offset + e.size]

    # ---------------------------------------------------------- allocation
    def alloc(self, sc: SizeClass) -> int | None:
        """A free slot of class ``sc``, evicting for it when the class is full; None when
        nothing can go now (everything pinned, referenced or being written)."""
        arena = self.arena
        if sc.partial or arena.free_slabs:  # (Arena.alloc's own test, without its call
            return arena.alloc(sc)          # when the class is full: every evicting put)
        # class full and no free slab: evict in this class, else empty a slab elsewhere
        now = self.clock()
        for _ in range(8):  # demotions free their slot later; a drop frees it now
            victim = self.policy.victim_at(sc.index, now)
            if victim is None:
                break
            # the victim is of class sc: its slot, freed by the eviction, is taken as it
            # is (free_slot hands it over) rather than freed and allocated again
            self._claiming = sc
            try:
                freed = self.evict(victim)
            except BaseException:
                self._claiming = None
                off, self._claimed = self._claimed, None
                if off is not None:
                    self.free_slot(off)
                raise
            self._claiming = None
            off, self._claimed = self._claimed, None
            if off is not None:
                return off
            if freed:
                off = self.arena.alloc(sc)
                if off is not None:
                    return off
        if self.reclaim_slab(sc, now):
            return self.arena.alloc(sc)
        return None

    def alloc_if_free(self, sc: SizeClass) -> int | None:
        """``alloc`` where a slot of class ``sc`` is free without evicting (its first test),
        else None. The data plane's C put run takes its slots so with an NVMe tier, where
        an eviction may start a demotion (a slot freed later, maybe a wait): those puts
        are left to the Python path, whose ``alloc`` evicts once (native/frame.c)."""
        arena = self.arena
        if sc.partial or arena.free_slabs:
            return arena.alloc(sc)
        return None

    async def alloc_wait(self, sc: SizeClass) -> int:
        """``alloc``, waiting up to ``put_wait_timeout`` for a slot (a promotion's)."""
        deadline = self.clock() + self.limits.put_wait_timeout
        while True:
            off = self.alloc(sc)
            if off is not None:
                return off
            left = deadline - self.clock()
            if left <= 0:
                self.counters["no_space"] += 1
                raise NoSpace("no DRAM space to load the object from NVMe")
            await self.wait_for_space(left)

    async def wait_for_space(self, left: float) -> None:
        """Until a slot is freed or an unpin happens, at most ``left`` and 50 ms: pin
        leases lapse without an event, so the caller re-checks that often."""
        self._space_freed.clear()
        try:
            await asyncio.wait_for(self._space_freed.wait(), min(left, 0.05))
        except asyncio.TimeoutError:
            pass

    def free_slot(self, offset: int) -> None:
        if self._claiming is not None:  # alloc's eviction freed its victim's slot: take it
            arena = self.arena
            slab = arena.slabs[offset // arena.slab_size]  # (Arena.slab_of, inlined)
            if slab.size_class is self._claiming and not slab.draining:
                self._claiming = None
                self._claimed = offset
                return
        if self._draining is not None and self.arena.slab_of(offset) is self._draining:
            self._drain_since = self.clock()  # the drain progresses: its timeout restarts
        self.arena.free(offset)
        self._space_freed.set()

    def signal_space(self) -> None:
        self._space_freed.set()

    def reclaim_slab(self, wanted: SizeClass, now: float) -> bool:
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
        at = self.index.at
        d = self._draining
        if d is not None:
            if not d.draining:  # emptied since: it went back to the pool
                self._draining = None
            else:
                left = [e for e in (at(o) for o in self.arena.slots(d)) if e is not None]
                if any(e.pinned(now) for e in left) or \
                        now - self._drain_since > self.limits.put_wait_timeout:
                    # pinned after the drain began, or no slot freed for a while (a long
                    # reader): give up on this slab (it serves its class again), try another
                    self.arena.undrain(d)
                    self._draining = None
                else:
                    for e in left:  # a reader that held one back has let go now
                        if e.refs == 0:
                            self.evict(e)
                    return bool(self.arena.free_slabs)
        for sc in sorted(self.arena.classes, key=lambda c: len(c.slabs), reverse=True):
            if sc is wanted or not sc.slabs:
                continue
            for slab in sc.slabs:
                used = [e for e in (at(o) for o in self.arena.slots(slab)) if e is not None]
                # every used slot must be a committed, evictable object (no reservation,
                # no dead object still being read)
                if len(used) != slab.used or any(e.refs or e.pinned(now) for e in used):
                    continue
                self.arena.drain(slab)
                for e in used:
                    self.evict(e)
                if slab.draining:  # demotions in flight: it frees when they are written
                    self._draining = slab
                    self._drain_since = now
                    return False
                return True
        return False

    def evict_down(self) -> int:
        """Past the high watermark, evict down to the low one; how many were evicted.

        The Store calls it only with an NVMe tier: demotion is asynchronous, so the
        headroom lets puts go on while NVMe writes. Without a tier an eviction is an
        O(1) unlink done by the allocation that needs the slot, so no headroom is kept
        and all of the DRAM holds objects.
        """
        a = self.arena
        if a.used_bytes <= self.limits.high_watermark * a.size:
            return 0
        target = self.limits.low_watermark * a.size
        now = self.clock()
        n = 0
        stuck: set[int] = set()
        pol = self.policy
        sc = None
        held = 0
        while a.used_bytes - self.demoting_bytes > target and len(stuck) < len(a.classes):
            # the class holding the most bytes gives up the next victim. Only the victim's
            # class can change its count, and a demotion does not change it until it is
            # written (the entry stays listed), so the choice is made again only when that
            # count moved: not a scan of every class (~50) per victim
            if sc is None or pol.count(sc.index) != held:
                sc = max((c for c in a.classes if c.index not in stuck),
                         key=lambda c: pol.count(c.index) * c.slot_size)
                held = pol.count(sc.index)
            v = pol.victim_at(sc.index, now)
            if v is None:
                stuck.add(sc.index)
                sc = None
                continue
            self.evict(v)
            n += 1
        return n

    def stats(self) -> dict:
        a = self.arena
        return {"dram_capacity": a.size, "dram_used": a.used_bytes, "slab_size": a.slab_size,
                "slabs_total": len(a.slabs), "slabs_free": len(a.free_slabs),
                "hugepages": a.hugepages, "dram_prefaulted": a.prefaulted}

    def close(self) -> None:
        self.index.use_key_area(None, 0)  # its hold on the mapping, or the unmap fails
        self.arena.close()


def _no_evict(e) -> bool:
    raise RuntimeError("DramTier.evict is not set (the Store wires it to its tiering)")
