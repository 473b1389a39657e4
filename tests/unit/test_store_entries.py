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
    # namespace by namespace (in order of first use), each in insertion order
    grouped = [e for n in (b"n0", b"n1", b"n2") for e in es if e.ns == n]
    assert list(ix.iterate()) == grouped
    assert [e.key for e in ix.iterate(b"n1")] == [b"k%d" % i for i in range(1, 30, 3)]
    assert list(ix.iterate(b"absent")) == []
    assert list(ix) == [(e.ns, e.key) for e in grouped]
    # the dict-like reads kept for tests and tools
    assert ix[(b"n0", b"k0")] is es[0]
    with pytest.raises(KeyError):
        ix[(b"n0", b"k1")]  # k1 is in n1
    assert dict(ix.items())[(b"n2", b"k2")] is es[2] and list(ix.values()) == grouped


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


def test_entries_of_a_namespace_share_one_bytes_object():
    ix = Index()
    es = [entry(b"model-a|"[:-1], b"k%d" % i) for i in range(5)]  # a fresh bytes object each
    assert len({id(e.ns) for e in es}) == 5
    for e in es:
        ix.insert(e)
    assert len({id(e.ns) for e in es}) == 1 and es[0].ns == b"model-a"
    # a refused insert leaves the caller's entry as it was
    dup = entry(b"model-a|"[:-1], b"k0")
    ns_before = dup.ns
    with pytest.raises(KeyError):
        ix.insert(dup)
    assert dup.ns is ns_before and ix.count(b"model-a") == 5


def test_slot_map_survives_a_slab_changing_class():
    slab = 1 << 20
    small, big = SizeClass(0, 256, slab), SizeClass(1, 320 * 1024, slab)  # 320 KiB: 3 per slab
    ix = Index()
    ix.use_slab_size(slab)
    a = Entry(b"n", b"a", slab + 512, 100, 1, small)
    ix.insert(a)
    ix.place(a)
    assert ix.at(slab + 512) is a and ix.at(slab + 256) is None and ix.at(slab + 100) is None
    ix.displace(a)  # the slab empties and goes to the 320 KiB class
    b = Entry(b"n", b"b", slab + 320 * 1024, 100, 1, big)
    ix.insert(b)
    ix.place(b)
    assert ix.at(slab + 320 * 1024) is b and ix.at(slab + 512) is None
    # past the last whole slot (3 x 320 KiB < 1 MiB) and in an unknown slab: nothing
    assert ix.at(slab + 3 * 320 * 1024) is None and ix.at(7 * slab) is None
    with pytest.raises(ValueError, match="cannot change"):
        ix.use_slab_size(2 * slab)
    with pytest.raises(ValueError, match="positive"):
        Index(0)


def test_a_misaligned_offset_is_refused_with_a_clear_error():
    ix = Index()
    ix.use_slab_size(1 << 20)
    e = entry(b"n", b"k", offset=4096 + 8)
    ix.insert(e)
    with pytest.raises(ValueError, match="not a slot of 4096 bytes"):
        ix.place(e)


def test_pin_fields_read_and_write_like_fields_and_leave_with_the_entry():
    from kvstored.engine import entries

    ix = Index()
    e = entry(b"n", b"p")
    ix.insert(e)
    assert e.pins == 0 and e.pin_until == 0.0 and not e.pinned(0.0)
    assert e not in entries._PINS  # an unpinned entry costs nothing there
    e.pins += 1
    e.pin_until = max(e.pin_until, 50.0)
    assert e.pinned(10.0) and not e.pinned(50.0) and e.pins == 1
    e.pins -= 1
    assert not e.pinned(10.0) and e in entries._PINS  # pin_until still set
    e.pin_until = 0.0
    assert e not in entries._PINS
    e.pins, e.pin_until = 2, 99.0
    ix.note_pin(e)
    ix.remove(e)  # a removed entry's record goes with it: no leak of deleted pinned keys
    assert e not in entries._PINS and e.pins == 0 and ix.live_pins(0.0) == []


def test_many_namespaces_and_slots_concurrently_interleaved():
    # 2000 entries over 13 namespaces, placed and displaced out of order: counts, slots
    # and lookups stay exact (the interleaving a busy event loop produces)
    slab = 1 << 16
    sc = SizeClass(0, 256, slab)
    ix = Index()
    ix.use_slab_size(slab)
    es = [Entry(b"ns%d" % (i % 13), b"%05d" % i, i * 256, 10, i, sc) for i in range(2000)]
    for e in es:
        ix.insert(e)
        ix.place(e)
    for e in es[::3]:
        ix.displace(e)
        ix.remove(e)
    kept = [e for i, e in enumerate(es) if i % 3]
    assert len(ix) == len(kept) and ix.object_bytes == 10 * len(kept)
    assert all(ix.at(e.offset) is e and ix.get(e.ns, e.key) is e for e in kept)
    assert all(ix.at(e.offset) is None and ix.get(e.ns, e.key) is None for e in es[::3])
    assert sorted(ix, key=lambda k: k[1]) == [(e.ns, e.key) for e in kept]
