"""The delete fence (kvstored/engine/fence.py) on a fake clock, and the Store's delete
paths that fill it: what a repair write of a deleted key is refused by, and for how long."""
from __future__ import annotations

import asyncio

from kvstored.engine import Store, StoreLimits
from kvstored.engine.fence import DELETED, MAX_WRITE_AGE_S, OVERFLOW, WINDOW_S, DeleteFence
from fakes import Clock

NS = b"ns"


def test_a_deleted_key_is_fenced_for_the_window_and_no_longer():
    c = Clock()
    f = DeleteFence(window=60.0, clock=c)
    f.record(NS, [b"a", b"absent-here"])  # recorded whether the node held it or not
    assert f.refusal(NS, b"a") == f.refusal(NS, b"absent-here") == DELETED
    assert not f.refusal(NS, b"b") and not f.refusal(b"other", b"a")
    c.t += 59.9
    assert f.refusal(NS, b"a")
    c.t += 0.2
    assert not f.refusal(NS, b"a")
    assert f.counters["refused"] == 3 and f.counters["recorded"] == 2
    f.record(NS, [b"c"])  # a later delete trims what expired
    assert len(f) == 1


def test_a_second_delete_restarts_the_window():
    c = Clock()
    f = DeleteFence(window=10.0, clock=c)
    f.record(NS, [b"a"])
    c.t += 8
    f.record(NS, [b"a", b"b"])
    c.t += 8  # 16 s after the first delete, 8 after the second
    assert f.refusal(NS, b"a") and f.refusal(NS, b"b")
    assert len(f) == 2


def test_over_the_count_bound_every_repair_write_is_refused_until_the_forgotten_expire():
    c = Clock()
    f = DeleteFence(window=10.0, max_keys=3, clock=c)
    f.record(NS, [b"k1", b"k2"])
    c.t += 1
    f.record(NS, [b"k3", b"k4", b"k5"])  # k1 and k2 forgotten before their window ended
    assert len(f) == 3 and f.counters["overflowed"] == 2
    # k1 is no longer listed, but nothing deleted within the window may be written back:
    # the floor refuses every key (even one never deleted) until k2's window has passed
    # (refused as OVERFLOW: no evidence that a given key was deleted)
    assert f.refusal(NS, b"k1") == f.refusal(NS, b"never-deleted") == OVERFLOW
    assert f.refusal(NS, b"k5") == DELETED
    c.t += 9.5  # 10.5 s after k1 and k2, 9.5 after the rest
    assert not f.refusal(NS, b"k1") and not f.refusal(NS, b"never-deleted")
    assert f.refusal(NS, b"k5")


def test_delete_all_fences_its_namespace_or_every_namespace():
    c = Clock()
    f = DeleteFence(window=10.0, clock=c)
    f.record_namespace(b"a")
    assert f.refusal(b"a", b"any") and not f.refusal(b"b", b"any")
    f.record_namespace(None)
    assert f.refusal(b"b", b"any")
    c.t += 10.5
    assert not f.refusal(b"a", b"any") and not f.refusal(b"b", b"any")
    f.record(NS, [b"x"])  # trims the expired marks too
    assert not f._namespaces


def test_the_writer_bound_leaves_room_in_the_window():
    # a write decided from Heads at most MAX_WRITE_AGE_S old is refused for every delete
    # that reached its target after those Heads, and for deletes up to the rest before
    assert 0 < MAX_WRITE_AGE_S <= WINDOW_S / 2


def test_store_deletes_fill_the_fence_and_repair_deletes_do_not():
    s = Store(StoreLimits(dram_size=8 << 20, slab_size=1 << 20, max_value_size=1 << 20))
    s.put_bytes(NS, b"held", b"v" * 100)
    assert s.delete(NS, [b"held", b"absent"]) == 1
    assert s.fence.refusal(NS, b"held") and s.fence.refusal(NS, b"absent")
    s.put_bytes(NS, b"moved", b"v" * 100)
    assert s.delete(NS, [b"moved"], fence=False) == 1  # repair's own (a hand-over's) delete
    assert not s.fence.refusal(NS, b"moved")
    assert s.put_bytes(NS, b"held", b"w" * 100)  # a client's re-put is never fenced
    res = asyncio.run(s.delete_all(b"other"))
    assert res.deleted == 0 and s.fence.refusal(b"other", b"anything")
    assert not s.fence.refusal(b"third", b"anything")


def test_a_delete_of_no_keys_records_nothing():
    f = DeleteFence(window=10.0, clock=Clock())
    f.record(NS, [])
    assert len(f) == 0 and not f.refusal(NS, b"a") and f.counters["recorded"] == 0
