"""The Index's narrow API (kvstored/engine/entries.py), without a Store or sockets."""
import pytest

from kvstored.engine.arena import SizeClass
from kvstored.engine.entries import Entry, Index

SC = SizeClass(0, 4096, 1 << 20)


def entry(ns: bytes, key: bytes, size: int = 100, offset: int = -1) -> Entry:
    return Entry(ns, key, offset, size, 0x1234, SC)


def test_insert_get_remove_keep_counts():
    ix = Index()
    a, b, c = entry(b"n1", b"a", 10), entry(b"n1", b"b", 20), entry(b"n2", b"a", 30)
    for e in (a, b, c):
        ix.insert(e)
    assert len(ix) == 3 and ix.object_bytes == 60
    assert ix.get(b"n1", b"a") is a and ix.get(b"n2", b"a") is c
    assert ix.get(b"n1", b"zz") is None and ix.get(b"n3", b"a") is None
    assert (b"n1", b"b") in ix and (b"n2", b"b") not in ix
    assert ix.count(b"n1") == 2 and ix.count(b"n2") == 1 and ix.count(b"none") == 0
    assert ix.namespaces() == {b"n1": (2, 30), b"n2": (1, 30)}
    ix.remove(b)
    assert ix.namespaces() == {b"n1": (1, 10), b"n2": (1, 30)} and ix.object_bytes == 40
    ix.remove(c)
    assert ix.namespaces() == {b"n1": (1, 10)}  # an emptied namespace is forgotten
    assert len(ix) == 1 and ix.get(b"n2", b"a") is None


def test_a_second_entry_under_a_taken_key_is_refused_and_changes_nothing():
    ix = Index()
    first = entry(b"n", b"k", 10)
    ix.insert(first)
    with pytest.raises(KeyError, match="remove the old entry first"):
        ix.insert(entry(b"n", b"k", 99))
    assert ix.get(b"n", b"k") is first
    assert ix.namespaces() == {b"n": (1, 10)} and ix.object_bytes == 10


def test_removing_an_absent_entry_raises():
    ix = Index()
    with pytest.raises(KeyError):
        ix.remove(entry(b"n", b"ghost"))
    assert len(ix) == 0 and ix.namespaces() == {}


def test_iterate_walks_all_or_one_namespace_and_keys_iterate_as_tuples():
    ix = Index()
    es = [entry(b"n%d" % (i % 3), b"k%d" % i) for i in range(30)]
    for e in es:
        ix.insert(e)
    assert list(ix.iterate()) == es  # insertion order
    assert [e.key for e in ix.iterate(b"n1")] == [b"k%d" % i for i in range(1, 30, 3)]
    assert list(ix.iterate(b"absent")) == []
    assert list(ix) == [(e.ns, e.key) for e in es]
    # the dict-like reads kept for tests and tools
    assert ix[(b"n0", b"k0")] is es[0]
    assert dict(ix.items())[(b"n2", b"k2")] is es[2] and list(ix.values()) == es


def test_unverified_records_are_counted_while_indexed():
    ix = Index()
    held = entry(b"n", b"held")
    held.unverified = True
    ix.insert(held)
    fresh = entry(b"n", b"fresh")
    ix.insert(fresh)
    assert ix.unverified == 1
    ix.mark_unverified(fresh)
    ix.mark_unverified(fresh)  # idempotent
    assert ix.unverified == 2
    ix.verify(held)
    ix.verify(held)
    assert ix.unverified == 1 and not held.unverified
    ix.remove(fresh)  # removing a held record stops counting it
    assert ix.unverified == 0 and not fresh.unverified
    # an entry outside the index changes no count
    loose = entry(b"n", b"loose")
    ix.mark_unverified(loose)
    assert ix.unverified == 0 and loose.unverified
    ix.verify(loose)
    assert ix.unverified == 0


def test_dram_slot_map_follows_place_and_displace():
    ix = Index()
    e = entry(b"n", b"k", offset=8192)
    ix.insert(e)
    assert ix.at(8192) is None  # indexed, but not placed in a slot yet
    ix.place(e)
    assert ix.at(8192) is e
    ix.displace(e)
    ix.displace(e)  # twice is harmless
    assert ix.at(8192) is None


def test_live_pins_forget_lapsed_leases_and_removed_entries():
    ix = Index()
    now = 100.0
    es = [entry(b"n", b"p%d" % i) for i in range(4)]
    for i, e in enumerate(es):
        ix.insert(e)
        e.pins, e.pin_until = 1, now + (10 if i % 2 else -1)  # odd ones live
        ix.note_pin(e)
    assert sorted(e.key for e in ix.live_pins(now)) == [b"p1", b"p3"]
    assert len(ix._pinned) == 2  # the lapsed were dropped while walking
    ix.remove(es[1])
    assert [e.key for e in ix.live_pins(now)] == [b"p3"]
    ix.drop_pin(es[3])
    assert ix.live_pins(now) == []


def test_many_entries_keep_exact_counts():
    ix = Index()
    es = [entry(b"ns%d" % (i % 7), b"%06d" % i, size=i + 1) for i in range(5000)]
    for e in es:
        ix.insert(e)
    for e in es[::2]:
        ix.remove(e)
    kept = es[1::2]
    assert len(ix) == len(kept) and ix.object_bytes == sum(e.size for e in kept)
    want: dict = {}
    for e in kept:
        n, b = want.get(e.ns, (0, 0))
        want[e.ns] = (n + 1, b + e.size)
    assert ix.namespaces() == want
