"""Eviction policy (kvstored/engine/eviction.py) and slab rebalancing in the Store (issue 12)."""
from __future__ import annotations

import asyncio

import pytest

from kvstore.errors import NoSpace
from kvstore.wire import checksum
from kvstored.engine import Store, StoreLimits
from kvstored.engine.eviction import COLD, NONE, PROBATION, PROTECTED, Policy
from kvstored.engine.nvme import NvmeDevice, NvmeTier

KiB = 1 << 10
MiB = 1 << 20
NS = b"ns"


class _SC:
    def __init__(self, index):
        self.index = index


class E:
    """The fields Policy uses on a store Entry."""

    def __init__(self, key, sc=0):
        self.ns, self.key, self.sc = NS, key, _SC(sc)
        self.seg, self.stamp, self.newer, self.older = NONE, 0, None, None
        self.busy = False


def evictable(e):
    return not e.busy


def drain_all(p: Policy, n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        v = p.victim(0, evictable)
        if v is None:
            break
        p.remove(v, evicted=True)
        out.append(v.key)
    return out


# ------------------------------------------------------------------ policy
def test_new_entries_leave_in_insertion_order():
    p = Policy(1)
    es = [E(b"k%d" % i) for i in range(5)]
    for e in es:
        p.insert(e)
    assert drain_all(p, 5) == [b"k0", b"k1", b"k2", b"k3", b"k4"]
    assert p.resident == 0


def test_an_access_protects_until_it_ages_out():
    p = Policy(1, protected_share=0.5, age_bonus=1.0)
    es = [E(b"k%d" % i) for i in range(4)]
    for e in es:
        p.insert(e)
    p.touch(es[0])  # read once: protected
    assert es[0].seg == PROTECTED
    assert p.victim(0, evictable) is es[1]
    # many newer insertions: k0's last access is now older than the oldest probation
    # entry by more than age_bonus x resident accesses, so it goes before them
    for i in range(4, 40):
        p.insert(E(b"k%d" % i))
        v = p.victim(0, evictable)
        p.remove(v, evicted=True)
    assert es[0].seg == NONE  # aged out, it did not stay forever


def test_protected_share_is_bounded():
    p = Policy(1, protected_share=0.5)
    es = [E(b"k%d" % i) for i in range(10)]
    for e in es:
        p.insert(e)
    for e in es:
        p.touch(e)
    lists = p.queues[0].lists
    assert lists[PROTECTED].count <= 5 and lists[PROBATION].count >= 5
    assert lists[PROTECTED].count + lists[PROBATION].count == 10


def test_ghost_hit_comes_back_protected():
    p = Policy(1)
    a = E(b"a")
    p.insert(a)
    p.remove(a, evicted=True)
    assert p.in_ghost(NS, b"a") == PROBATION
    a2 = E(b"a")
    p.insert(a2)
    assert a2.seg == PROTECTED and p.counters["ghost_hits"] == 1
    b = E(b"b")
    p.insert(b)
    p.remove(b)  # a delete, not an eviction: no ghost
    assert p.in_ghost(NS, b"b") is None


def test_ghost_is_bounded():
    p = Policy(1, ghost_min=100)
    for i in range(1000):
        e = E(b"k%d" % i)
        p.insert(e)
        p.remove(e, evicted=True)
    assert len(p.ghost) == 100
    assert p.in_ghost(NS, b"k999") is not None and p.in_ghost(NS, b"k0") is None


def test_chain_tail_goes_cold_and_first():
    p = Policy(1, hint_limit=8)
    head = [E(b"c0"), E(b"c1")]
    for e in head:
        p.insert(e)
    p.note_chain(NS, [b"c0", b"c1", b"c2", b"c3"], 2)
    c2, c3 = E(b"c2"), E(b"c3")
    p.insert(c2)
    p.insert(c3)
    assert c2.seg == PROBATION and c3.seg == COLD
    assert p.victim(0, evictable) is c3  # before older probation entries
    # a full hit or a one-key chain names no tail
    p.note_chain(NS, [b"x"], 0)
    p.note_chain(NS, [b"c0", b"c1"], 2)
    assert (NS, b"x") not in p.tail_hints and (NS, b"c1") not in p.tail_hints
    for i in range(50):  # bounded
        p.note_chain(NS, [b"a", b"t%d" % i], 0)
    assert len(p.tail_hints) == 8


def test_touch_chain_leaves_the_head_most_recent():
    p = Policy(1, protected_share=0.9)
    es = [E(b"k%d" % i) for i in range(4)]
    for e in es:
        p.insert(e)
    p.touch_chain(es)
    prot = p.queues[0].lists[PROTECTED]
    assert prot.head is es[0] and es[0].older is es[1] and es[1].older is es[2]
    # the deepest one is the first to leave the protected segment
    assert es[3].seg == PROBATION


def test_gets_after_a_lookup_keep_the_chain_order():
    p = Policy(1, protected_share=0.9)
    es = [E(b"k%d" % i) for i in range(4)]
    for e in es:
        p.insert(e)
    p.touch_chain(es)  # the lookup
    for e in es:  # the batch get of the hit prefix, head first as a client sends it
        p.touch(e)
    prot = p.queues[0].lists[PROTECTED]
    assert prot.head is es[0] and es[0].older is es[1] and es[1].older is es[2]
    # a later lookup ends that window: a touch moves an entry to the head again
    p.touch_chain([])
    p.touch(es[2])
    assert prot.head is es[2]


def test_a_chains_new_blocks_leave_from_its_tail():
    p = Policy(1)
    old = E(b"old")
    p.insert(old)
    p.note_chain(NS, [b"c0", b"c1", b"c2", b"c3", b"t"], 0)
    chain = [E(b"c%d" % i) for i in range(4)]
    for e in chain:  # the batch put of the missing blocks, in chain order
        p.insert(e)
    assert all(e.seg == PROBATION for e in chain)
    # deepest first, the chain's first block last; all after the older entry
    assert drain_all(p, 5) == [b"old", b"c3", b"c2", b"c1", b"c0"]
    assert list(p.parents) == [(NS, b"t")]  # used hints are dropped; the tail's waits


def test_a_block_not_after_its_parent_goes_to_the_head():
    p = Policy(1)
    p.note_chain(NS, [b"a0", b"a1", b"a2"], 0)
    a0, x, a1 = E(b"a0"), E(b"x"), E(b"a1")
    p.insert(a0)
    p.insert(x)  # another client's put in between: a1's parent is not the last insertion
    p.insert(a1)
    assert drain_all(p, 3) == [b"a0", b"x", b"a1"]


def test_parent_hints_are_bounded():
    p = Policy(1, parent_limit=10)
    for i in range(100):
        p.note_chain(NS, [b"h%d" % i] + [b"k%d-%d" % (i, j) for j in range(5)], 0)
    assert len(p.parents) == 10
    q = Policy(1, parent_limit=0)  # off
    q.note_chain(NS, [b"a", b"b", b"c"], 0)
    assert q.parents == {}


def test_ghost_holds_as_many_keys_as_the_cache():
    p = Policy(1, ghost_min=4)
    resident = [E(b"r%d" % i) for i in range(20)]
    for e in resident:
        p.insert(e)
    for i in range(100):
        e = E(b"k%d" % i)
        p.insert(e)
        p.remove(e, evicted=True)
    assert len(p.ghost) == 20  # max(ghost_min, resident)


def test_unevictable_entries_are_skipped_not_lost():
    p = Policy(1)
    es = [E(b"k%d" % i) for i in range(4)]
    for e in es:
        p.insert(e)
    es[0].busy = es[1].busy = True
    assert p.victim(0, evictable) is es[2]
    for e in es:
        e.busy = True
    assert p.victim(0, evictable) is None  # one bounded pass, then None
    assert p.queues[0].count == 4


def test_policy_rejects_bad_share():
    with pytest.raises(ValueError):
        Policy(1, protected_share=1.0)
    with pytest.raises(ValueError):
        Policy(1, age_bonus=-1.0)
    with pytest.raises(ValueError):
        Policy(1, age_bonus=9.0, bonus_max=8.0)
    with pytest.raises(ValueError):
        Policy(1, adapt_rate=-0.5)


def _evict_from(p: Policy, key: bytes, protect: bool) -> None:
    """Insert ``key``, read it if ``protect``, then evict it (the ghost learns its list)."""
    e = E(key)
    p.insert(e)
    if protect:
        p.touch(e)
    p.remove(e, evicted=True)


def test_age_bonus_adapts_to_where_ghost_hits_come_from():
    p = Policy(1, age_bonus=1.0, adapt_rate=8.0, bonus_max=4.0, ghost_min=1024)
    resident = [E(b"r%d" % i) for i in range(16)]
    for e in resident:
        p.insert(e)
    # keys evicted from protected come back: protected entries aged out too early
    for i in range(200):
        _evict_from(p, b"p%d" % i, protect=True)
    assert p.ghost_n[PROTECTED] == 200
    for i in range(200):
        p.insert(E(b"p%d" % i))
        p.remove(p.queues[0].lists[PROTECTED].head)  # keep the resident count steady
    assert p.age_bonus == 4.0  # raised, and held at bonus_max
    assert p.ghost_n[PROTECTED] == 0
    # keys evicted from probation come back: lower it again, never below 0
    for i in range(400):
        _evict_from(p, b"q%d" % i, protect=False)
    for i in range(400):
        p.insert(E(b"q%d" % i))
        p.remove(p.queues[0].lists[PROTECTED].head)
    assert p.age_bonus == 0.0
    assert p.counters["ghost_hits"] == 600


def test_age_bonus_is_fixed_without_adaptation_and_cold_hits_do_not_move_it():
    p = Policy(1, age_bonus=1.5, adapt_rate=0.0)
    for i in range(50):
        _evict_from(p, b"k%d" % i, protect=i % 2 == 0)
    for i in range(50):
        p.insert(E(b"k%d" % i))
    assert p.age_bonus == 1.5 and p.counters["ghost_hits"] == 50
    q = Policy(1, age_bonus=1.5)
    q.note_chain(NS, [b"a", b"t"], 0)
    t = E(b"t")
    q.insert(t)
    assert t.seg == COLD
    q.remove(t, evicted=True)
    assert q.in_ghost(NS, b"t") == COLD
    q.insert(E(b"t"))  # back protected, but a cold hit says nothing about the bonus
    assert q.age_bonus == 1.5


def test_ghost_counts_match_the_ghost_under_churn():
    p = Policy(1, ghost_min=64)
    for i in range(3000):  # keys recur, are evicted again, and fall off the bounded ghost
        e = E(b"k%d" % (i % 97))
        if p.in_ghost(NS, e.key) is not None or i % 3:
            p.insert(e)
            if i % 5 == 0:
                p.touch(e)
            p.remove(e, evicted=True)
        assert sum(p.ghost_n) == len(p.ghost) <= 64
        assert 0.0 <= p.age_bonus <= p.bonus_max


# ------------------------------------------------------------ store level
def limits(**kw) -> StoreLimits:
    args = dict(dram_size=8 * MiB, slab_size=1 * MiB, max_value_size=1 * MiB, hugepages=False,
                prefault=False, put_wait_timeout=5.0, high_watermark=1.0, low_watermark=1.0)
    args.update(kw)
    return StoreLimits(**args)


def make_store(**kw) -> Store:
    return Store(limits(**kw))


def fill_one_class(s: Store, n: int, size: int) -> list[bytes]:
    keys = []
    for i in range(n):
        k = b"f%d" % i
        s.put_bytes(NS, k, bytes([i % 251]) * size)
        keys.append(k)
    return keys


def test_lookup_counts_as_an_access():
    s = make_store()
    try:
        keys = fill_one_class(s, 8 * 4, 256 * KiB)  # the arena is full (32 slots)
        assert s.lookup(NS, [keys[0], keys[1], b"missing"]) == 2
        s.put_bytes(NS, b"new", bytes(256 * KiB))
        assert s.exists(NS, keys[:3]) == [True, True, False]  # keys[2] was the oldest unread
    finally:
        s.close()


def test_a_class_takes_a_slab_from_another_without_a_tier():
    s = make_store()
    try:
        keys = fill_one_class(s, 8 * 4, 256 * KiB)
        assert not s.arena.free_slabs
        for size in (1 * KiB, 4 * KiB, 1 * MiB, 100 * KiB):
            assert s.put_bytes(NS, b"other%d" % size, bytes(size)) is True
        assert sum(s.exists(NS, keys)) < len(keys)
    finally:
        s.close()


def test_pinned_slabs_are_not_taken():
    s = make_store()
    try:
        keys = fill_one_class(s, 8 * 4, 256 * KiB)
        s.pin(NS, keys, ttl=60)
        with pytest.raises(NoSpace):
            s.put_bytes(NS, b"x", bytes(4 * KiB))
        s.unpin(NS, keys[:4])  # one whole slab's worth (4 per 1 MiB slab)
        assert s.put_bytes(NS, b"x", bytes(4 * KiB)) is True
        assert s.exists(NS, keys[4:]) == [True] * 28
    finally:
        s.close()


def make_tier_store(path, **kw) -> Store:
    # room for every object written here: one open region per slot size, so several
    dev = NvmeDevice(str(path), MiB + 12 * 16 * MiB, 16 * MiB, "threads", 32)
    return Store(limits(**kw), nvme=NvmeTier(dev))


async def aput(s: Store, key: bytes, data: bytes) -> None:
    res = await s.reserve_wait(NS, key, len(data), checksum(data))
    if res is not None:
        res.view[:] = data
        s.commit(res)


async def aread(s: Store, key: bytes) -> bytes:
    e = await s.acquire_async(NS, key)
    try:
        return bytes(s.view(e))
    finally:
        s.release(e)


def test_with_a_tier_a_full_class_gives_a_slab_after_demoting(tmp_path):
    """Every slab full of DRAM-only objects of one class (no watermark headroom): other
    sizes used to fail NoSpace for good; now a slab drains through demotion."""
    async def run():
        s = make_tier_store(tmp_path / "t.dat")
        try:
            for i in range(32):
                await aput(s, b"f%d" % i, bytes([i]) * (256 * KiB))
            assert not s.arena.free_slabs
            assert all(e.nvme is None for e in s.index.values())
            sizes = [1 * KiB, 4 * KiB, 1 * MiB, 100 * KiB, 3 * KiB]
            for j, size in enumerate(sizes):
                await asyncio.wait_for(aput(s, b"o%d" % j, bytes([j + 1]) * size), 10)
            for j, size in enumerate(sizes):
                assert await aread(s, b"o%d" % j) == bytes([j + 1]) * size
            for i in range(32):  # demoted, not lost
                assert await aread(s, b"f%d" % i) == bytes([i]) * (256 * KiB)
            await s.drain_tasks(10)
        finally:
            s.close()
    asyncio.run(run())


def test_with_a_tier_concurrent_mixed_sizes_never_no_space(tmp_path):
    async def run():
        s = make_tier_store(tmp_path / "t.dat")
        sizes = [700, 4 * KiB, 20 * KiB, 256 * KiB, 1 * MiB]

        async def writer(w):
            for i in range(40):
                size = sizes[(w + i) % len(sizes)]
                await aput(s, b"w%d-%d" % (w, i), bytes([(w * 40 + i) % 251]) * size)

        try:
            await asyncio.wait_for(asyncio.gather(*(writer(w) for w in range(4))), 60)
            for w in range(4):
                for i in (0, 39):
                    size = sizes[(w + i) % len(sizes)]
                    assert await aread(s, b"w%d-%d" % (w, i)) == bytes([(w * 40 + i) % 251]) * size
            await s.drain_tasks(10)
        finally:
            s.close()
    asyncio.run(run())


def test_watermarks_pace_demotion_with_a_tier(tmp_path):
    async def run():
        s = make_tier_store(tmp_path / "t.dat", high_watermark=0.75, low_watermark=0.5)
        try:
            for i in range(20):
                await aput(s, b"k%d" % i, bytes([i]) * (512 * KiB))
                await asyncio.sleep(0)
            await s.drain_tasks(10)
            assert s.nvme.counters["demotions"] > 0
            assert s.arena.used_bytes <= 0.75 * s.arena.size
            assert await aread(s, b"k0") == bytes([0]) * (512 * KiB)
        finally:
            s.close()
    asyncio.run(run())


def test_small_object_slots_are_packed():
    s = make_store()
    try:
        for i in range(1000):
            s.put_bytes(NS, b"s%d" % i, bytes([i % 251]) * KiB)
        # a 1 KiB slot each, and its key record (arena.SizeClass.footprint)
        assert s.arena.used_bytes == 1000 * s.arena.class_for(KiB).footprint
        assert s.arena.class_for(KiB).slot_size == KiB
        e = s.acquire(NS, b"s999")
        assert bytes(s.view(e)) == bytes([999 % 251]) * KiB
        s.release(e)
    finally:
        s.close()


def test_taking_a_slab_does_not_build_a_free_list():
    """Issue 11: a reservation in a fresh slab cost O(slots) (the free list was rebuilt)."""
    s = make_store(slab_size=1 * MiB)
    try:
        s.put_bytes(NS, b"a", bytes(300))
        slab = s.arena.slab_of(s.index[(NS, b"a")].offset)
        assert slab.free == [] and slab.bump == slab.base + 320
    finally:
        s.close()


# ------------------------------------------------------------ trace input
def test_trace_loader_rejects_malformed_lines(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import trace_sim

    good = tmp_path / "ok.jsonl"
    good.write_text('{"timestamp": 0, "hash_ids": [0, 1, 2]}\n\n{"hash_ids": [0, 3]}\n')
    assert trace_sim.load_trace(str(good)) == [[0, 1, 2], [0, 3]]
    assert trace_sim.load_trace(str(good), limit=1) == [[0, 1, 2]]
    for bad in ('{"timestamp": 0}', "not json", '{"hash_ids": "x"}', '{"hash_ids": [1, "a"]}', "[1, 2]"):
        f = tmp_path / "bad.jsonl"
        f.write_text('{"hash_ids": [0]}\n' + bad + "\n")
        with pytest.raises(ValueError, match=r"bad.jsonl:2"):
            trace_sim.load_trace(str(f))
    # the simulator's model of the engine policy and the references agree on a tiny case
    reqs = [[0, 1, 2], [0, 1, 2, 3], [0, 4], [0, 1, 2, 3, 5]]
    assert trace_sim.run("lru", 100, reqs) == trace_sim.run("kvstored", 100, reqs) == 8 / 14


def test_every_simulated_policy_stays_below_belady_and_fits_its_capacity():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import trace_sim

    # Belady is the per-block optimum, not a proven bound on prefix hits; on this fixed
    # small trace no online policy passes it, and each holds at most its capacity
    reqs = trace_sim.synthetic_trace(n=600, seed=3)
    cap = trace_sim.unique_blocks(reqs) // 20
    best = trace_sim.run("belady", cap, reqs)
    for name in trace_sim.POLICIES:
        p = trace_sim.make(name, cap, reqs)
        hits = total = 0
        for chain in reqs:
            hits += p.request(chain)
            total += len(chain)
            held = getattr(p, "cur", None) or getattr(p, "where", None) or getattr(p, "m", None)
            if held is not None:
                assert len(held) <= cap, name
        assert 0 < hits / total <= best + 1e-9, name
    with pytest.raises(ValueError, match="unknown policy"):
        trace_sim.make("nope", cap, reqs)
