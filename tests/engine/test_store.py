"""Unit tests of the Store (no networking): two-phase puts, dedup, pins, eviction, accounting."""
from __future__ import annotations

import asyncio
import time

import pytest

from kvstore.errors import ChecksumMismatch, Conflict, InvalidArgument, NoSpace, NotFound
from kvstore.wire import checksum
from kvstored.engine import Store, StoreLimits
from kvstored.engine.arena import MIN_SLOT, size_classes
from fakes import Clock as FakeClock

KiB = 1 << 10
MiB = 1 << 20
NS = b"ns"


def make_store(clock=None, **kw) -> Store:
    args = dict(dram_size=16 * MiB, slab_size=1 * MiB, max_value_size=1 * MiB, hugepages=False,
                reservation_timeout=30.0, put_wait_timeout=0.3, max_pin_ttl=3600.0)
    args.update(kw)
    return Store(StoreLimits(**args), clock=clock or FakeClock())


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def store(clock):
    s = make_store(clock)
    yield s
    s.close()


@pytest.fixture
def nowm_store(clock):
    """No watermark eviction (high = low = 1.0): only allocation pressure evicts."""
    s = make_store(clock, high_watermark=1.0, low_watermark=1.0)
    yield s
    s.close()


def val(i: int, size: int) -> bytes:
    """Distinct, deterministic bytes for object ``i``."""
    pat = i.to_bytes(4, "little") + b"\xa5"
    return (pat * (size // len(pat) + 1))[:size]


def put(store: Store, key: bytes, data: bytes, **kw) -> bool:
    return store.put_bytes(NS, key, data, **kw)


def read(store: Store, key: bytes, ns: bytes = NS) -> bytes:
    """The object's bytes through a read reference (DRAM-resident objects)."""
    e = store.acquire(ns, key)
    try:
        return bytes(store.view(e))
    finally:
        store.release(e)


def check_accounting(store: Store) -> None:
    """Internal bookkeeping agrees with the index (used after every scenario)."""
    a = store.arena
    slots = sum(e.sc.footprint for e in store.index.values())
    res_slots = sum(r.sc.footprint for r in store.reservations)
    # used bytes = committed slots + reserved slots (+ dead-but-referenced slots, none here),
    # each with its key record where its class has one (arena.SizeClass.footprint)
    assert a.used_bytes == slots + res_slots
    assert store.objects_bytes == sum(e.size for e in store.index.values())
    assert store.reserved_bytes == sum(r.size for r in store.reservations)
    assert len(a.free_slabs) + sum(len(c.slabs) for c in a.classes) == len(a.slabs)
    # Stats keeps namespace and pin counts incrementally: they match a full recount
    st = store.stats()
    by_ns: dict[str, int] = {}
    for ns, _k in store.index:
        by_ns[ns.decode()] = by_ns.get(ns.decode(), 0) + 1
    assert st["namespaces"] == by_ns
    now = store.clock()
    assert st["pinned"] == sum(1 for e in store.index.values() if e.pins and e.pin_until > now)


# ------------------------------------------------------------------ two-phase put

def test_reserved_object_is_invisible_until_commit(store):
    data = val(1, 100 * KiB)
    res = store.reserve(NS, b"k", len(data), checksum(data))
    assert res is not None
    res.view[:] = data
    assert store.exists(NS, [b"k"]) == [False]
    assert store.lookup(NS, [b"k"]) == 0
    with pytest.raises(NotFound):
        store.acquire(NS, b"k")
    assert store.stats()["reservations"] == 1 and store.stats()["objects"] == 0
    assert store.commit(res) is True
    assert store.exists(NS, [b"k"]) == [True]
    assert read(store, b"k") == data
    st = store.stats()
    assert st["reservations"] == 0 and st["reserved_bytes"] == 0 and st["objects"] == 1
    check_accounting(store)


def test_abort_leaves_nothing(store):
    data = val(2, 64 * KiB)
    res = store.reserve(NS, b"k", len(data), checksum(data))
    res.view[:10] = data[:10]
    store.abort(res)
    store.abort(res)  # idempotent
    assert store.exists(NS, [b"k"]) == [False]
    assert store.arena.used_bytes == 0 and store.reserved_bytes == 0
    assert not store.reservations
    check_accounting(store)


def test_checksum_mismatch_at_commit(store):
    data = val(3, 200 * KiB)
    res = store.reserve(NS, b"k", len(data), checksum(data))
    bad = bytearray(data)
    bad[12345] ^= 0xFF
    res.view[:] = bad
    with pytest.raises(ChecksumMismatch):
        store.commit(res)
    assert store.exists(NS, [b"k"]) == [False]
    with pytest.raises(NotFound):
        read(store, b"k")
    assert store.arena.used_bytes == 0  # the slot went back
    assert len(store.arena.free_slabs) == len(store.arena.slabs)
    assert store.counters["checksum_failures"] == 1
    assert not store.reservations
    # the key is still free for a correct put
    assert put(store, b"k", data) is True
    assert read(store, b"k") == data
    check_accounting(store)


def test_put_bytes_with_wrong_checksum(store):
    with pytest.raises(ChecksumMismatch):
        put(store, b"k", b"hello", checksum=checksum(b"hellO"))
    assert store.exists(NS, [b"k"]) == [False]
    assert store.arena.used_bytes == 0


def test_value_too_large(store):
    with pytest.raises(InvalidArgument):
        store.reserve(NS, b"k", 1 * MiB + 1, 0)
    assert store.arena.used_bytes == 0
    # exactly the maximum is fine
    data = val(4, 1 * MiB)
    assert put(store, b"max", data)
    assert read(store, b"max") == data


def test_empty_value(store):
    assert put(store, b"empty", b"") is True
    assert read(store, b"empty") == b""
    assert put(store, b"empty", b"") is False  # dedup


# ------------------------------------------------------------------ dedup / conflict / overwrite

def test_dedup_and_conflict(store):
    a, b = val(5, 50 * KiB), val(6, 50 * KiB)
    assert put(store, b"k", a) is True
    used = store.arena.used_bytes
    # same key + same checksum: reserve says "already there"
    assert store.reserve(NS, b"k", len(a), checksum(a)) is None
    assert put(store, b"k", a) is False
    assert store.counters["dedups"] == 2
    assert store.arena.used_bytes == used
    # different bytes: Conflict, the original stays
    with pytest.raises(Conflict):
        store.reserve(NS, b"k", len(b), checksum(b))
    with pytest.raises(Conflict):
        put(store, b"k", b)
    assert store.counters["conflicts"] == 2
    assert read(store, b"k") == a
    # same key in another namespace is a different object
    assert store.put_bytes(b"other", b"k", b) is True
    assert read(store, b"k", b"other") == b and read(store, b"k") == a
    check_accounting(store)


def test_concurrent_identical_puts_dedup_at_commit(store):
    data = val(7, 10 * KiB)
    r1 = store.reserve(NS, b"k", len(data), checksum(data))
    r2 = store.reserve(NS, b"k", len(data), checksum(data))
    r1.view[:] = data
    r2.view[:] = data
    assert store.commit(r1) is True
    assert store.commit(r2) is False  # lost the race: deduplicated, its slot freed
    assert read(store, b"k") == data
    check_accounting(store)


def test_concurrent_different_puts_conflict_at_commit(store):
    a, b = val(8, 10 * KiB), val(9, 10 * KiB)
    r1 = store.reserve(NS, b"k", len(a), checksum(a))
    r2 = store.reserve(NS, b"k", len(b), checksum(b))
    r1.view[:] = a
    r2.view[:] = b
    assert store.commit(r1) is True
    with pytest.raises(Conflict):
        store.commit(r2)
    assert read(store, b"k") == a
    check_accounting(store)


def test_overwrite_keeps_old_bytes_for_a_reader(store):
    old, new = val(10, 300 * KiB), val(11, 300 * KiB)
    assert put(store, b"k", old)
    e = store.acquire(NS, b"k")  # a reader in flight
    old_view = store.view(e)
    assert put(store, b"k", new, overwrite=True) is True
    assert read(store, b"k") == new
    # the reader still sees the old bytes: its slot was not reused
    assert bytes(old_view) == old
    used_with_both = store.arena.used_bytes
    assert used_with_both == 2 * store.arena.class_for(len(old)).footprint
    # a further overwrite / put does not land on the old slot while referenced
    assert put(store, b"k2", val(12, 300 * KiB))
    assert bytes(old_view) == old
    old_view.release()
    store.release(e)
    # now the old slot is freed
    assert store.arena.used_bytes == 2 * store.arena.class_for(len(old)).footprint
    assert read(store, b"k") == new
    check_accounting(store)


def test_overwrite_with_same_bytes_is_a_dedup(store):
    data = val(13, 1000)
    assert put(store, b"k", data)
    assert put(store, b"k", data, overwrite=True) is False  # identical: nothing to replace
    assert read(store, b"k") == data
    assert len(store.index) == 1
    check_accounting(store)


# ------------------------------------------------------------------ queries

def test_lookup_prefix_and_exists(store):
    keys = [b"k%d" % i for i in range(6)]
    for i in (0, 1, 2, 4, 5):
        put(store, keys[i], val(i, 1000))
    assert store.lookup(NS, keys) == 3
    assert store.lookup(NS, keys[3:]) == 0
    assert store.lookup(NS, keys[4:]) == 2
    assert store.lookup(NS, []) == 0
    assert store.lookup(b"other", keys) == 0
    assert store.exists(NS, keys) == [True, True, True, False, True, True]
    assert store.exists(NS, []) == []
    assert store.exists(b"other", keys[:2]) == [False, False]


def test_acquire_missing_counts_miss(store):
    with pytest.raises(NotFound):
        store.acquire(NS, b"nope")
    assert store.counters["misses"] == 1 and store.counters["hits"] == 0


def test_delete(store):
    put(store, b"a", val(1, 5000))
    put(store, b"b", val(2, 5000))
    assert store.delete(NS, [b"a", b"missing"]) == 1
    assert store.exists(NS, [b"a", b"b"]) == [False, True]
    assert store.delete(NS, [b"a"]) == 0
    check_accounting(store)


def test_delete_while_referenced(store):
    data = val(3, 500 * KiB)
    put(store, b"k", data)
    e = store.acquire(NS, b"k")
    mv = store.view(e)
    assert store.delete(NS, [b"k"]) == 1
    assert store.exists(NS, [b"k"]) == [False]
    slot = store.arena.class_for(len(data)).slot_size
    assert store.arena.used_bytes == slot  # still held by the reader
    # new puts never land on the referenced slot
    for i in range(8):
        put(store, b"n%d" % i, val(100 + i, 500 * KiB))
    assert bytes(mv) == data
    mv.release()
    store.release(e)
    assert store.arena.used_bytes == 8 * slot
    # re-putting the key works and is a fresh object
    assert put(store, b"k", data) is True
    check_accounting(store)


def test_sample(store):
    for i in range(5):
        put(store, b"a%d" % i, b"x")
        store.put_bytes(b"other", b"b%d" % i, b"y")
    assert len(store.sample(None, 100)) == 10
    assert len(store.sample(None, 3)) == 3
    assert {e.key for e in store.sample(b"other", 100)} == {b"b%d" % i for i in range(5)}


# ------------------------------------------------------------------ eviction

def fill(store: Store, n: int, size: int, prefix: bytes = b"o") -> list[bytes]:
    keys = [prefix + b"%d" % i for i in range(n)]
    for i, k in enumerate(keys):
        assert put(store, k, val(i, size))
    return keys


def test_eviction_keeps_pinned_and_referenced(nowm_store):
    s = nowm_store
    keys = fill(s, 16, 1 * MiB)  # 16 x 1 MiB slots: the arena is full
    assert s.arena.free_bytes == 0
    assert s.pin(NS, keys[:4], ttl=60) == 4
    readers = [s.acquire(NS, k) for k in keys[4:8]]
    for i in range(6):
        assert put(s, b"new%d" % i, val(1000 + i, 1 * MiB))
    present = s.exists(NS, keys)
    assert all(present[:8]), present  # pinned and referenced survive
    assert sum(present[8:]) == 2  # six of the eight unprotected objects were evicted
    assert s.counters["evictions"] == 6
    for i, k in enumerate(keys[:8]):
        assert read(s, k) == val(i, 1 * MiB)
    for e in readers:
        s.release(e)
    check_accounting(s)


def test_eviction_keeps_recently_read(nowm_store):
    s = nowm_store
    keys = fill(s, 16, 1 * MiB)
    read(s, keys[0])  # the oldest object was read: it moves to the protected segment
    assert put(s, b"new", val(99, 1 * MiB))
    assert s.exists(NS, [keys[0], keys[1]]) == [True, False]
    # a second insertion evicts the next unread one, still not the read one
    assert put(s, b"new2", val(98, 1 * MiB))
    assert s.exists(NS, keys[:3]) == [True, False, False]


def test_pin_lease_expiry_makes_evictable(nowm_store, clock):
    s = nowm_store
    keys = fill(s, 16, 1 * MiB)
    assert s.pin(NS, keys, ttl=10) == 16
    assert s.stats()["pinned"] == 16
    with pytest.raises(NoSpace):
        s.reserve(NS, b"x", 1 * MiB, 0)
    assert s.counters["no_space"] == 1
    clock.advance(9.9)
    with pytest.raises(NoSpace):
        s.reserve(NS, b"x", 1 * MiB, 0)
    clock.advance(0.2)  # the lease lapsed
    assert s.stats()["pinned"] == 0
    assert put(s, b"x", val(77, 1 * MiB))
    assert s.exists(NS, [b"x"]) == [True]
    assert sum(s.exists(NS, keys)) == 15


def test_pin_renewal_and_counts(store, clock):
    put(store, b"a", b"1")
    assert store.pin(NS, [b"a", b"missing"], ttl=5) == 1
    clock.advance(4)
    assert store.pin(NS, [b"a"], ttl=5) == 1  # renewed: now until t+9
    clock.advance(4)
    e = store.index[(NS, b"a")]
    assert e.pinned(clock())
    clock.advance(2)
    assert not e.pinned(clock())
    # a pin taken after the lease lapsed starts afresh (old count forgotten)
    assert store.pin(NS, [b"a"], ttl=5) == 1
    assert e.pins == 1
    assert store.unpin(NS, [b"a"]) == 1
    assert not e.pinned(clock())


def test_unpin_makes_evictable(nowm_store):
    s = nowm_store
    keys = fill(s, 16, 1 * MiB)
    s.pin(NS, keys, ttl=600)
    with pytest.raises(NoSpace):
        s.reserve(NS, b"x", 1 * MiB, 0)
    assert s.unpin(NS, [keys[3], b"missing"]) == 1
    assert s.unpin(NS, [keys[3]]) == 0  # not pinned any more
    assert put(s, b"x", val(5, 1 * MiB))
    assert s.exists(NS, [keys[3]]) == [False]
    assert sum(s.exists(NS, keys)) == 15


def test_pin_counts_stack(nowm_store):
    s = nowm_store
    keys = fill(s, 16, 1 * MiB)
    s.pin(NS, keys, ttl=600)
    s.pin(NS, keys[:1], ttl=600)  # a second holder of keys[0]
    s.unpin(NS, keys[:1])
    with pytest.raises(NoSpace):  # keys[0] still pinned once
        s.reserve(NS, b"x", 1 * MiB, 0)
    s.unpin(NS, keys[:1])
    assert put(s, b"x", val(5, 1 * MiB))
    assert s.exists(NS, keys[:1]) == [False]


@pytest.mark.parametrize("ttl", [0, -1, 3600.5, float("inf"), float("nan")])
def test_pin_ttl_out_of_range(store, ttl):
    put(store, b"a", b"1")
    with pytest.raises(InvalidArgument):
        store.pin(NS, [b"a"], ttl=ttl)
    assert not store.index[(NS, b"a")].pinned(store.clock())


def test_pin_max_ttl_ok(store):
    put(store, b"a", b"1")
    assert store.pin(NS, [b"a"], ttl=3600.0) == 1


def test_full_of_pinned_reserve_raises_no_space(nowm_store):
    s = nowm_store
    keys = fill(s, 64, 256 * KiB)  # 4 per slab: everything in one class
    s.pin(NS, keys, ttl=600)
    for size in (256 * KiB, 4 * KiB, 1 * MiB):  # same class, another class, the largest class
        with pytest.raises(NoSpace):
            s.reserve(NS, b"x", size, 0)
    assert s.arena.used_bytes == s.arena.size
    assert not s.reservations
    check_accounting(s)


def test_reserve_wait_is_bounded():
    s = make_store(time.monotonic, put_wait_timeout=0.3, high_watermark=1.0, low_watermark=1.0)  # real clock: a real wait
    try:
        keys = fill(s, 16, 1 * MiB)
        s.pin(NS, keys, ttl=600)

        async def go():
            t0 = time.monotonic()
            with pytest.raises(NoSpace):
                await asyncio.wait_for(s.reserve_wait(NS, b"x", 1 * MiB, 0), 5.0)
            return time.monotonic() - t0

        took = asyncio.run(go())
        assert 0.25 <= took < 2.0, took
    finally:
        s.close()


def test_reserve_wait_explicit_timeout_and_success_after_unpin():
    s = make_store(time.monotonic, put_wait_timeout=0.3, high_watermark=1.0, low_watermark=1.0)
    try:
        keys = fill(s, 16, 1 * MiB)
        s.pin(NS, keys, ttl=600)
        data = val(42, 1 * MiB)

        async def go():
            t0 = time.monotonic()
            with pytest.raises(NoSpace):
                await asyncio.wait_for(s.reserve_wait(NS, b"x", 1 * MiB, 0, timeout=0.1), 5.0)
            assert time.monotonic() - t0 < 1.0
            # unpin one object while a put waits: the put then succeeds
            task = asyncio.ensure_future(s.reserve_wait(NS, b"x", len(data), checksum(data),
                                                        timeout=3.0))
            await asyncio.sleep(0.05)
            assert not task.done()
            s.unpin(NS, keys[5:6])
            res = await asyncio.wait_for(task, 3.0)
            res.view[:] = data
            assert s.commit(res)

        asyncio.run(go())
        assert read(s, b"x") == data
        assert s.exists(NS, keys[5:6]) == [False]
    finally:
        s.close()


def test_reserve_wait_notices_a_lapsing_lease():
    """No event fires when a pin lease runs out; the waiting put still notices (it re-checks)."""
    s = make_store(time.monotonic, high_watermark=1.0, low_watermark=1.0)
    try:
        keys = fill(s, 16, 1 * MiB)
        s.pin(NS, keys, ttl=600)
        s.pin(NS, keys[:1], ttl=0.3)  # renewing never shortens: keys[0] stays pinned
        s.unpin(NS, keys[1:2])
        s.pin(NS, keys[1:2], ttl=0.3)  # a fresh short lease on keys[1]

        async def go():
            t0 = time.monotonic()
            res = await asyncio.wait_for(s.reserve_wait(NS, b"x", 1 * MiB, 0, timeout=3.0), 5.0)
            took = time.monotonic() - t0
            s.abort(res)
            return took

        took = asyncio.run(go())
        assert 0.2 <= took < 2.0, took
        assert s.exists(NS, keys[:2]) == [True, False]
    finally:
        s.close()


def test_reserve_wait_dedup_returns_none():
    s = make_store(time.monotonic)
    try:
        put(s, b"k", b"abc")
        assert asyncio.run(s.reserve_wait(NS, b"k", 3, checksum(b"abc"))) is None
    finally:
        s.close()


def test_reap_reclaims_expired_reservations(store, clock):
    expired = []
    r1 = store.reserve(NS, b"a", 100 * KiB, 1)
    r1.on_expire = expired.append
    clock.advance(20)
    r2 = store.reserve(NS, b"b", 100 * KiB, 2)
    assert store.reap() == 0
    clock.advance(10.5)  # r1 is 30.5 s old, r2 10.5 s
    assert store.reap() == 1
    assert expired == [r1]
    assert store.reservations == {r2}
    assert store.counters["reservations_expired"] == 1
    assert store.stats()["reservations"] == 1
    assert store.reserved_bytes == 100 * KiB
    clock.advance(30)
    assert store.reap() == 1
    assert not store.reservations and store.reserved_bytes == 0
    assert store.arena.used_bytes == 0
    assert store.exists(NS, [b"a", b"b"]) == [False, False]
    # a reaped reservation cannot be committed or resurrected
    with pytest.raises(Exception):
        store.commit(r1)
    assert store.exists(NS, [b"a"]) == [False]
    assert store.arena.used_bytes == 0 and store.reserved_bytes == 0
    store.abort(r1)  # no double free
    assert store.arena.used_bytes == 0
    check_accounting(store)


def test_reservations_are_never_evicted(nowm_store):
    s = nowm_store
    res = [s.reserve(NS, b"r%d" % i, 1 * MiB, 0) for i in range(16)]
    with pytest.raises(NoSpace):
        s.reserve(NS, b"x", 1 * MiB, 0)
    with pytest.raises(NoSpace):
        s.reserve(NS, b"x", 4 * KiB, 0)
    for r in res:
        s.abort(r)
    assert s.arena.used_bytes == 0


def test_slab_reclaim_for_another_class(nowm_store):
    s = nowm_store
    keys = fill(s, 16 * 16, 64 * KiB)  # every slab belongs to the 64 KiB class
    a = s.arena
    assert not a.free_slabs
    sc64 = a.class_for(64 * KiB)
    assert len(sc64.slabs) == 16
    big = val(7, 1 * MiB)
    assert put(s, b"big", big)  # needs a slab of the 1 MiB class: one whole slab is reclaimed
    assert read(s, b"big") == big
    assert len(sc64.slabs) == 15
    assert s.counters["evictions"] == 16
    assert sum(s.exists(NS, keys)) == 15 * 16
    check_accounting(s)


def test_slab_reclaim_skips_slabs_with_protected_objects(nowm_store):
    s = nowm_store
    keys = fill(s, 16 * 16, 64 * KiB)
    # one pinned object in every slab but the last one filled
    by_slab: dict[int, list[bytes]] = {}
    for k in keys:
        e = s.index[(NS, k)]
        by_slab.setdefault(e.offset // s.arena.slab_size, []).append(k)
    slabs = sorted(by_slab)
    keep = slabs[7]
    for sl in slabs:
        if sl != keep:
            s.pin(NS, by_slab[sl][:1], ttl=600)
    assert put(s, b"big", val(7, 1 * MiB))
    assert s.exists(NS, by_slab[keep]) == [False] * 16
    assert s.index[(NS, b"big")].offset // s.arena.slab_size == keep
    # now every remaining 64 KiB slab has a pinned object and the only 1 MiB slot is pinned
    s.pin(NS, [b"big"], ttl=600)
    with pytest.raises(NoSpace):
        s.reserve(NS, b"big2", 1 * MiB, 0)
    check_accounting(s)


def test_no_watermark_headroom_without_a_tier(clock):
    """Without an NVMe tier eviction happens on demand: the whole arena holds objects
    (watermarks only pace asynchronous demotion; tests/engine/test_eviction.py)."""
    s = make_store(clock, high_watermark=0.75, low_watermark=0.5)
    try:
        for i in range(40):
            put(s, b"k%d" % i, val(i, 1 * MiB))
        assert s.maybe_evict() == 0
        assert s.arena.used_bytes == s.arena.size  # 16 of 16 slots hold objects
        assert s.counters["evictions"] == 40 - 16
        assert s.exists(NS, [b"k39"]) == [True]  # the newest survives
        check_accounting(s)
    finally:
        s.close()


def test_accounting_returns_to_zero(store):
    sizes = [1, 4095, 4096, 4097, 10 * KiB, 64 * KiB, 100 * KiB, 300 * KiB, 1 * MiB]
    keys = []
    for i, sz in enumerate(sizes * 3):
        k = b"k%d" % i
        put(store, k, val(i, sz))
        keys.append(k)
    store.put_bytes(b"other", b"z", b"zz")
    e = store.acquire(NS, keys[0])
    assert store.delete(NS, keys) == len(keys)
    assert store.arena.used_bytes > 0  # the referenced one
    store.release(e)
    assert store.delete(b"other", [b"z"]) == 1
    st = store.stats()
    assert st["dram_used"] == 0 and st["objects"] == 0 and st["object_bytes"] == 0
    assert st["reservations"] == 0 and st["reserved_bytes"] == 0
    assert st["slabs_free"] == st["slabs_total"] == 16
    assert all(not c.slabs and not c.partial for c in store.arena.classes)
    assert st["namespaces"] == {}


def test_stats_fields(store):
    put(store, b"a", b"hello")
    store.put_bytes(b"other", b"a", b"x")
    st = store.stats()
    assert st["dram_capacity"] == 16 * MiB
    assert st["objects"] == 2 and st["object_bytes"] == 6
    assert st["namespaces"] == {"ns": 1, "other": 1}
    assert st["puts"] == 2 and st["put_bytes"] == 6
    assert st["slab_size"] == 1 * MiB and st["hugepages"] is False


# ------------------------------------------------------------------ size classes / limits

def test_size_classes_powers_of_two_exact(store):
    a = store.arena
    p = MIN_SLOT
    while p <= a.slab_size:
        assert a.class_for(p).slot_size == p
        assert a.class_for(p - 1).slot_size <= p
        p *= 2
    prev = 0
    for sz in list(range(1, 9000, 97)) + [64 * KiB + 1, 300 * KiB, 1 * MiB - 1, 1 * MiB]:
        sc = a.class_for(sz)
        assert sc.slot_size >= sz
        # page aligned from 4 KiB up (O_DIRECT demotion), cache-line aligned below
        assert sc.slot_size % (4096 if sc.slot_size >= 4096 else 64) == 0
        if sz > MIN_SLOT:
            assert sc.slot_size <= sz * 1.25 + (4096 if sz > 4096 else 64)  # <= 25% waste
        assert sc.slot_size >= prev
        prev = sc.slot_size
    with pytest.raises(ValueError):
        a.class_for(1 * MiB + 1)


def test_size_classes_list():
    cls = size_classes(64 * MiB)
    assert cls == sorted(set(cls))
    assert cls[0] == MIN_SLOT == 256 and cls[-1] == 64 * MiB
    assert all(c % 4096 == 0 for c in cls if c >= 4096)
    assert all(c % 64 == 0 for c in cls)
    assert 1024 in cls and 1280 in cls  # a 1 KiB object costs 1 KiB, not a page
    for p in (256, 1024, 4096, 1 << 16, 1 << 20, 1 << 26):
        assert p in cls
    # a slab size that is not a power of two is still a class
    assert size_classes(3 * MiB)[-1] == 3 * MiB


def test_limits_validation():
    with pytest.raises(ValueError):
        Store(StoreLimits(dram_size=16 * MiB, slab_size=1 * MiB, max_value_size=2 * MiB,
                          hugepages=False))
    with pytest.raises(ValueError):
        Store(StoreLimits(dram_size=16 * MiB, slab_size=1 * MiB, max_value_size=1 * MiB,
                          high_watermark=0.5, low_watermark=0.9, hugepages=False))
    with pytest.raises(ValueError):
        Store(StoreLimits(dram_size=512 * KiB, slab_size=1 * MiB, max_value_size=1 * MiB,
                          hugepages=False))


def test_many_small_objects_fill_and_recycle(nowm_store):
    """Churn: keep putting distinct objects of mixed sizes; the store never fails or leaks."""
    s = nowm_store
    sizes = [4 * KiB, 16 * KiB, 100 * KiB, 256 * KiB, 1 * MiB]
    for i in range(400):
        data = val(i, sizes[i % len(sizes)])
        assert put(s, b"c%d" % i, data)
        if i % 37 == 0:
            assert read(s, b"c%d" % i) == data
    assert s.counters["evictions"] > 0
    assert s.arena.used_bytes <= s.arena.size
    check_accounting(s)
    for k, e in list(s.index.items()):
        assert read(s, k[1]) == val(int(k[1][1:]), e.size)
