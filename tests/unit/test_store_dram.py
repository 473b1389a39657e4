"""The DRAM tier (kvstored/engine/dram.py) on a small arena: allocation, eviction through
the tiering callback, slab reclaim, watermarks and bounded waits. No Store, no sockets:
the callback here drops an entry, or starts a pretend demotion that the test finishes."""
import asyncio
import time

import pytest

from kvstore.errors import NoSpace
from kvstored.engine.dram import DramTier
from kvstored.engine.entries import DEAD, Entry, Index
from kvstored.engine.store import StoreLimits

KiB, MiB = 1 << 10, 1 << 20
OBJ = 256 * KiB  # 4 slots per 1 MiB slab; a 4 MiB arena holds 16


class Tier:
    def __init__(self, dram=4 * MiB, slab=1 * MiB, **kw):
        self.limits = StoreLimits(dram_size=dram, slab_size=slab, max_value_size=slab,
                                  hugepages=False, prefault=False, **kw)
        self.index = Index()
        self.counters = {"no_space": 0}
        self.dram = DramTier(self.limits, time.monotonic, self.index, self.counters)
        self.dram.evict = self.evict
        self.evicted: list[bytes] = []
        self.demote = False  # True: eviction starts a "demotion" the test finishes
        self.demoting: list[Entry] = []

    def put(self, key: bytes, size: int = OBJ, ns: bytes = b"n") -> Entry | None:
        sc = self.dram.arena.class_for(size)
        off = self.dram.alloc(sc)
        if off is None:
            return None
        e = Entry(ns, key, off, size, 0, sc)
        self.index.insert(e)
        self.dram.link(e)
        return e

    def evict(self, e: Entry) -> bool:
        self.evicted.append(e.key)
        if self.demote:  # as tiering does: a reference keeps the slot while it is written
            e.refs += 1
            self.dram.demoting_bytes += e.sc.footprint
            self.demoting.append(e)
            return False
        self.index.remove(e)
        e.state = DEAD
        self.dram.unlink(e, evicted=True)
        return True

    def finish_demotions(self) -> None:
        for e in self.demoting:
            e.refs -= 1
            self.dram.demoting_bytes -= e.sc.footprint
            self.dram.drop_copy(e)
        self.demoting.clear()

    def fill(self, n: int = 16, size: int = OBJ) -> list[Entry]:
        es = [self.put(b"k%02d" % i, size) for i in range(n)]
        assert all(es) and not self.evicted
        return es

    def close(self):
        self.dram.close()


@pytest.fixture
def t():
    tier = Tier()
    yield tier
    tier.close()


def test_full_class_evicts_its_oldest_unread_entry_and_reuses_the_slot(t):
    es = t.fill()
    assert t.dram.arena.used_bytes == t.dram.arena.size and t.dram.objects == 16
    new = t.put(b"new")
    assert t.evicted == [b"k00"] and new.offset == es[0].offset
    assert t.index.get(b"n", b"k00") is None and t.index.at(new.offset) is new
    assert t.dram.objects == 16


def test_referenced_and_pinned_entries_are_never_victims(t):
    es = t.fill()
    now = time.monotonic()
    for i, e in enumerate(es):
        if i % 2:
            e.refs = 1  # a reader holds it
        else:
            e.pins, e.pin_until = 1, now + 60
    assert t.put(b"new") is None and t.evicted == []
    es[5].refs = 0  # the reader let go
    assert t.put(b"new") is not None and t.evicted == [b"k05"]


def test_a_demotion_in_flight_frees_its_slot_only_when_written(t):
    t.fill()
    t.demote = True
    assert t.put(b"new") is None  # victims are being written: nothing free yet
    assert t.demoting and t.dram.demoting_bytes == len(t.demoting) * t.demoting[0].sc.footprint
    started = len(t.demoting)
    t.finish_demotions()
    assert t.dram.objects == 16 - started and t.dram.demoting_bytes == 0
    assert t.put(b"new") is not None


def test_another_class_empties_a_whole_slab_of_evictable_entries(t):
    t.fill()  # every slab belongs to the 256 KiB class
    other = t.put(b"small", 100 * KiB)
    assert other is not None and other.sc.slot_size != OBJ
    assert len(t.evicted) == 4  # one slab's worth, all of it
    slab = t.dram.arena.slab_of(other.offset)
    assert slab.size_class is other.sc


@pytest.mark.parametrize("blocker", ["reader", "pin", "reservation"])
def test_a_slab_with_a_busy_slot_is_not_reclaimed(t, blocker):
    es = t.fill(12)
    arena = t.dram.arena
    sc = arena.class_for(OBJ)
    for _ in range(4):  # the 4th slab: four more slots of the same class, not committed
        assert arena.alloc(sc) is not None
    busy = {arena.slab_of(e.offset).index: e for e in es}  # one entry in each of 3 slabs
    for e in busy.values():
        if blocker == "reader":
            e.refs = 1
        elif blocker == "pin":
            e.pins, e.pin_until = 1, time.monotonic() + 60
        else:  # free the entry's slot and take it again as an uncommitted reservation
            t.index.remove(e)
            e.state = DEAD
            t.dram.unlink(e)
            assert arena.alloc(sc) == e.offset
    assert t.put(b"small", 100 * KiB) is None  # the 4th slab is all reservations too
    assert t.dram.reclaim_slab(arena.class_for(100 * KiB), time.monotonic()) is False


def test_a_draining_slab_returns_to_the_pool_once_its_demotions_land(t):
    t.fill()
    t.demote = True
    small = t.dram.arena.class_for(100 * KiB)
    assert t.put(b"small", 100 * KiB) is None
    drained = t.dram._draining
    assert drained is not None and drained.draining and len(t.demoting) == 4
    assert t.put(b"small", 100 * KiB) is None  # one slab drains at a time: no second one
    assert len(t.demoting) == 4
    t.finish_demotions()
    assert not drained.draining and t.dram.arena.free_slabs == [drained]
    e = t.put(b"small", 100 * KiB)
    assert e is not None and e.sc is small


def test_evict_down_goes_from_the_high_watermark_to_the_low_one():
    t = Tier(high_watermark=0.75, low_watermark=0.5)
    try:
        t.fill(12)  # exactly at the high watermark: nothing to do
        assert t.dram.evict_down() == 0
        for i in range(12, 16):
            assert t.put(b"k%02d" % i) is not None
        assert t.dram.evict_down() == 8
        assert t.dram.arena.used_bytes == 0.5 * t.dram.arena.size
        t.demote = True  # demotions in flight count as gone already
        for i in range(8):
            assert t.put(b"m%02d" % i) is not None
        assert t.dram.evict_down() == 8
        assert t.dram.arena.used_bytes == t.dram.arena.size  # not written yet
        t.finish_demotions()
        assert t.dram.arena.used_bytes == 0.5 * t.dram.arena.size
    finally:
        t.close()


def test_demotions_in_flight_count_their_slots_not_their_sizes():
    """Objects of 200 KiB in 224 KiB slots (the arena counts slots, and key records where a
    class keeps them: SizeClass.footprint): the demotions evict_down starts count their
    slots' bytes as gone, so it stops at the low watermark, as plain evictions do. Counted
    by object size it demoted 16 where 14 reach the target (the slots' slack)."""
    t = Tier(dram=8 * MiB, high_watermark=0.75, low_watermark=0.5)
    try:
        es = [t.put(b"k%02d" % i, 200 * KiB) for i in range(32)]
        es = [e for e in es if e is not None]
        fp = es[0].sc.footprint
        assert fp > 200 * KiB and t.dram.arena.used_bytes == len(es) * fp
        t.demote = True
        used, target = t.dram.arena.used_bytes, 0.5 * t.dram.arena.size
        n = t.dram.evict_down()
        assert n == -(-(used - target) // fp)  # the fewest that reach the target
        assert t.dram.demoting_bytes == n * fp
        t.finish_demotions()
        assert t.dram.demoting_bytes == 0 and t.dram.arena.used_bytes <= target
    finally:
        t.close()


@pytest.mark.parametrize("demote", [False, True])
def test_evict_down_takes_each_victim_from_the_class_holding_most_bytes(demote):
    """2 MiB of 256 KiB objects beside 2 MiB of 128 KiB ones, down to half: dropped
    victims alternate between the classes as their bytes fall (a tie goes to the smaller
    class, listed first); demotions leave every object listed until written, so the
    class chosen first gives all the victims."""
    t = Tier(high_watermark=0.75, low_watermark=0.5)
    try:
        big = [t.put(b"b%02d" % i, OBJ) for i in range(8)]
        small = [t.put(b"s%02d" % i, OBJ // 2) for i in range(16)]
        assert all(big + small) and t.dram.arena.used_bytes == t.dram.arena.size
        t.demote = demote
        assert t.dram.evict_down() == (16 if demote else 12)
        if demote:
            assert t.evicted == [e.key for e in small]
            t.finish_demotions()
        else:  # KiB held (big, small) before each victim: 2048/2048 -> small, 2048/1920
            # -> big, 1792/1920 -> small, 1792/1792 -> small, ... down to 1024/1024
            assert b"".join(k[:1] for k in t.evicted) == b"sbssbssbssbs"
        assert t.dram.arena.used_bytes == 0.5 * t.dram.arena.size
    finally:
        t.close()


def test_evict_down_stops_when_nothing_is_evictable():
    t = Tier(high_watermark=0.5, low_watermark=0.25)
    try:
        for e in t.fill():
            e.refs = 1
        assert t.dram.evict_down() == 0 and t.evicted == []
    finally:
        t.close()


def test_an_object_larger_than_a_slab_has_no_class(t):
    with pytest.raises(ValueError, match="exceeds the slab size"):
        t.dram.arena.class_for(1 * MiB + 1)
    assert t.dram.arena.used_bytes == 0


def test_alloc_wait_gives_up_after_put_wait_timeout_with_nospace():
    t = Tier(put_wait_timeout=0.15)
    try:
        for e in t.fill():
            e.refs = 1
        sc = t.dram.arena.class_for(OBJ)
        start = time.monotonic()
        with pytest.raises(NoSpace, match="no DRAM space"):
            asyncio.run(t.dram.alloc_wait(sc))
        assert 0.15 <= time.monotonic() - start < 2
        assert t.counters["no_space"] == 1
    finally:
        t.close()


def test_concurrent_waiters_share_the_slots_freed_meanwhile():
    # the slots are freed 0.05 s in; the 2 s wait (the third waiter's NoSpace) is what a
    # loaded machine may stall this process for without the first two timing out first
    t = Tier(put_wait_timeout=2.0)
    try:
        es = t.fill()
        for e in es:
            e.refs = 1
        sc = t.dram.arena.class_for(OBJ)

        async def run():
            waiters = [asyncio.ensure_future(t.dram.alloc_wait(sc)) for _ in range(3)]
            await asyncio.sleep(0.05)
            es[3].refs = 0  # two readers let go: two slots can be had by eviction
            es[7].refs = 0
            t.dram.signal_space()
            return await asyncio.gather(*waiters, return_exceptions=True)

        got = asyncio.run(run())
        offsets = [g for g in got if isinstance(g, int)]
        assert sorted(offsets) == sorted([es[3].offset, es[7].offset])
        assert sum(isinstance(g, NoSpace) for g in got) == 1
        assert sorted(t.evicted) == [b"k03", b"k07"]
    finally:
        t.close()


def test_unlink_while_read_keeps_the_slot_until_it_is_freed(t):
    e = t.put(b"read")
    e.refs = 1
    t.index.remove(e)
    e.state = DEAD
    t.dram.unlink(e)
    assert t.dram.arena.used_bytes == OBJ and t.dram.objects == 0
    assert t.index.at(e.offset) is None
    t.dram.free_slot(e.offset)  # what Store.release does for the last reader
    assert t.dram.arena.used_bytes == 0
