"""The Store facade over its parts (index, DRAM tier, tiering without NVMe): the methods
the metrics and admin calls use instead of the index, the limits' defaults, and bad or
racing puts. No sockets."""
import asyncio
import dataclasses

import pytest

from kvstore.errors import ChecksumMismatch, Conflict, InvalidArgument
from kvstore.wire import checksum
from kvstored import settings
from kvstored.dataplane.policy import DataLimits
from kvstored.engine.store import Store, StoreLimits
from fakes import Clock

KiB, MiB = 1 << 10, 1 << 20
NS = b"ns"


@pytest.fixture
def store():
    s = Store(StoreLimits(dram_size=4 * MiB, slab_size=1 * MiB, max_value_size=1 * MiB,
                          hugepages=False, prefault=False), clock=Clock())
    yield s
    s.close()


def test_limits_take_their_defaults_from_the_settings_rows():
    for f in dataclasses.fields(StoreLimits):
        if f.name != "dram_size":  # required: the daemon resolves "auto" itself
            assert f.default == settings.default(f.name), f.name
    d = DataLimits()
    assert d.max_queued_bytes == settings.default("max_queued_response_bytes")
    assert d.idle_timeout == settings.default("idle_timeout")
    assert d.max_reserved_per_client == settings.default("max_reserved_bytes_per_client")
    assert d.max_reserved_per_connection == settings.default("max_reserved_bytes_per_connection")
    with pytest.raises(KeyError, match="no setting has the field 'nonsense'"):
        settings.default("nonsense")


def test_an_oversized_put_is_refused_before_any_slot_is_taken(store):
    with pytest.raises(InvalidArgument, match="exceeds max_value_size"):
        store.reserve(NS, b"big", 1 * MiB + 1, 0)
    assert store.arena.used_bytes == 0 and store.reserved_bytes == 0 and not store.reservations


def test_a_payload_that_fails_its_checksum_stores_nothing(store):
    res = store.reserve(NS, b"k", 4 * KiB, checksum(b"x" * 4 * KiB))
    res.view[:] = b"y" * 4 * KiB
    with pytest.raises(ChecksumMismatch):
        store.commit(res)
    assert store.object_count() == 0 and store.arena.used_bytes == 0
    assert store.counters["checksum_failures"] == 1


def test_racing_reservations_of_one_key_same_bytes_dedup_at_commit(store):
    data = b"a" * 8 * KiB
    r1 = store.reserve(NS, b"k", len(data), checksum(data))
    r2 = store.reserve(NS, b"k", len(data), checksum(data))
    for r in (r1, r2):
        r.view[:] = data
    assert store.commit(r1) is True and store.commit(r2) is False
    slot = store.arena.class_for(len(data)).footprint  # the slot and its key record
    assert store.arena.used_bytes == slot and store.object_count() == 1
    assert store.counters["dedups"] == 1


def test_racing_reservations_of_one_key_different_bytes(store):
    a, b = b"a" * 8 * KiB, b"b" * 8 * KiB
    r1 = store.reserve(NS, b"k", len(a), checksum(a))
    r2 = store.reserve(NS, b"k", len(b), checksum(b))
    r3 = store.reserve(NS, b"k", len(b), None, overwrite=True)  # shm: checksum at commit
    r1.view[:] = a
    r2.view[:] = b
    r3.view[:] = b
    assert store.commit(r1) is True
    with pytest.raises(Conflict):
        store.commit(r2)  # no overwrite: the first writer's bytes stay
    assert bytes(store.view(store.peek(NS, b"k"))) == a
    assert store.commit(r3) is True  # overwrite replaces them
    e = store.peek(NS, b"k")
    assert bytes(store.view(e)) == b and e.checksum == checksum(b)
    slot = store.arena.class_for(len(a)).footprint  # the slot and its key record
    assert store.arena.used_bytes == slot and store.reserved_bytes == 0


def test_usage_pins_and_keys_come_from_store_methods(store):
    for i in range(6):
        store.put_bytes(b"a" if i % 2 else b"b", b"k%d" % i, b"x" * (100 + i))
    assert store.namespace_usage() == {b"a": (3, 101 + 103 + 105), b"b": (3, 100 + 102 + 104)}
    assert sorted(store.keys(b"a")) == [(b"a", b"k1"), (b"a", b"k3"), (b"a", b"k5")]
    assert len(store.keys()) == 6 and store.object_count() == 6
    assert store.pin(b"a", [b"k1", b"k3"], 10) == 2
    assert sorted(e.key for e in store.pinned_entries()) == [b"k1", b"k3"]
    store.clock.t += 11  # the leases lapse
    assert store.pinned_entries() == [] and store.stats()["pinned"] == 0
    store.delete(b"b", [b"k0", b"k2", b"k4"])
    assert store.namespace_usage() == {b"a": (3, 309)}
    assert store.stats()["namespaces"] == {"a": 3}


def test_without_nvme_an_eviction_removes_the_object_and_tells_the_observer(store):
    removed = []
    store.observer = type("O", (), {"stored": lambda self, e: None,
                                    "removed": lambda self, e: removed.append(e.key),
                                    "looked_up": lambda self, *a: None})()
    big = 256 * KiB
    for i in range(16):  # fills the 4 MiB arena
        store.put_bytes(NS, b"k%02d" % i, bytes([i]) * big)
    assert store.arena.used_bytes == store.arena.size and removed == []
    store.put_bytes(NS, b"one-more", b"z" * big)
    assert removed == [b"k00"] and store.peek(NS, b"k00") is None
    assert store.counters["evictions"] == 1 and store.counters["evicted_bytes"] == big
    assert store.object_count() == 16 and store.dram_objects == 16
    assert store.objects_bytes == 16 * big


def test_held_records_are_verified_or_dropped_by_key(store):
    for k in (b"a", b"b", b"c"):
        store.put_bytes(NS, k, k * 100)
        store.index.mark_unverified(store.peek(NS, k))  # as recovery holds them
    assert store.unverified == 3 and store.exists(NS, [b"a", b"b", b"c"]) == [False] * 3
    assert store.verify_key(NS, b"a") is True and store.verify_key(NS, b"absent") is False
    csum = store.peek(NS, b"b").checksum
    assert store.drop_unverified(NS, b"b", csum + 1) is False  # not that record
    assert store.drop_unverified(NS, b"b", csum) is True
    assert store.drop_unverified(NS, b"a", store.peek(NS, b"a").checksum) is False  # served now
    assert store.exists(NS, [b"a", b"b", b"c"]) == [True, False, False]
    assert store.unverified == 1
    rows = asyncio.run(store.repair_snapshot())
    assert [r[1] for r in rows][0] == b"c"  # held records first


def test_the_repair_agents_settle_call_goes_through_store_methods(store):
    import asyncio
    import threading

    from kvstored.cluster.repair.local import LocalStore

    for k in (b"a", b"b"):
        store.put_bytes(NS, k, k * 100)
        store.index.mark_unverified(store.peek(NS, k))
    loop = asyncio.new_event_loop()
    th = threading.Thread(target=loop.run_forever, daemon=True)
    th.start()
    try:
        local = LocalStore(store, loop)
        csum = store.peek(NS, b"b").checksum
        n, dropped = local.settle([(NS, b"a"), (NS, b"gone")], [(NS, b"b", csum)])
        assert n == 1 and dropped == [(NS, b"b")]
        assert store.unverified == 0 and store.keys() == [(NS, b"a")]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        th.join(5)
        loop.close()
