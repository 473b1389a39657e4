"""The packed index (native/index.c -> kvstored._index, kvstored/engine/packedindex.py).

Three kinds of check: the dict index's own tests (tests/unit/test_store_entries.py)
run again against the packed one; a seeded random sequence of operations applied to
both indexes must read the same; and what is new with views (identity, records kept
for their holders, packed NVMe locations) plus bad input, which must raise a clear
Python exception and never crash the interpreter.
"""
from __future__ import annotations

import gc
import inspect
import random

import pytest

_index = pytest.importorskip("kvstored._index")

import test_store_entries as dict_tests  # noqa: E402  (tests/unit is on sys.path)

from kvstored.engine.arena import SizeClass  # noqa: E402
from kvstored.engine.entries import Entry as DictEntry, Index as DictIndex, make_index  # noqa: E402
from kvstored.engine.nvmedevice import Location  # noqa: E402
from kvstored.engine.packedindex import Entry, PackedIndex  # noqa: E402

SC = SizeClass(0, 4096, 1 << 20)

# Dict-index tests that read what the packed index does differently on purpose (its
# docstring): the walk order, and the dict index's own pin table (entries._PINS).
DIFFERENT = {"test_iterate_walks_all_or_one_namespace_and_keys_iterate_as_tuples",
             "test_pin_fields_read_and_write_like_fields_and_leave_with_the_entry"}
SHARED = [name for name, f in inspect.getmembers(dict_tests, inspect.isfunction)
          if name.startswith("test_") and name not in DIFFERENT]


@pytest.mark.parametrize("name", SHARED)
def test_the_dict_index_tests_pass_on_the_packed_index(name, monkeypatch):
    monkeypatch.setattr(dict_tests, "Index", PackedIndex)
    monkeypatch.setattr(dict_tests, "Entry", Entry)
    getattr(dict_tests, name)()


def entry(ns: bytes, key: bytes, size: int = 100, offset: int = -1, cls=Entry):
    return cls(ns, key, offset, size, 0x1234, SC)


def test_walks_cover_every_entry_once_and_one_namespace_alone():
    ix = PackedIndex()
    es = [entry(b"n%d" % (i % 3), b"k%d" % i) for i in range(30)]
    for e in es:
        ix.insert(e)
    for e in es[::4]:
        ix.remove(e)
    kept = [e for i, e in enumerate(es) if i % 4]
    walked = list(ix.iterate())
    assert len(walked) == len(kept) and set(map(id, walked)) == set(map(id, kept))
    assert sorted(e.key for e in ix.iterate(b"n1")) == sorted(e.key for e in kept if e.ns == b"n1")
    assert list(ix.iterate(b"absent")) == []
    assert sorted(ix) == sorted((e.ns, e.key) for e in kept)
    assert dict(ix.items())[(b"n2", b"k2")] is es[2]


def test_pins_live_in_a_side_table_and_leave_with_the_entry():
    ix = PackedIndex()
    e = entry(b"n", b"p")
    ix.insert(e)
    assert e.pins == 0 and e.pin_until == 0.0 and not e.pinned(0.0)
    e.pins += 1
    e.pin_until = max(e.pin_until, 50.0)
    assert e.pinned(10.0) and not e.pinned(50.0) and e.pins == 1
    rec = e.record
    del e
    gc.collect()
    e = ix.get(b"n", b"p")  # a new view of the same record: the pin is the record's
    assert e.record == rec and e.pins == 1 and e.pin_until == 50.0
    e.pins, e.pin_until = 0, 0.0
    assert not e.pinned(0.0)
    e.pins, e.pin_until = 2, 99.0
    ix.note_pin(e)
    ix.remove(e)
    assert e.pins == 0 and not e.pinned(0.0) and ix.live_pins(0.0) == []
    # pins set while detached travel into the record
    d = entry(b"n", b"q")
    d.pins, d.pin_until = 3, 7.0
    ix.insert(d)
    assert d.pins == 3 and d.pinned(1.0)


def test_a_lookup_returns_the_same_view_while_anyone_holds_it():
    ix = PackedIndex()
    a = entry(b"n", b"a", offset=4096)
    ix.insert(a)
    assert ix.get(b"n", b"a") is a and ix[(b"n", b"a")] is a
    a.refs, a.seg, a.stamp, a.reads, a.offset = 2, 1, 12345678901, 7, 8192
    a.committed_at = 1.5
    a.unverified = True
    a.state = 2
    rec = a.record
    del a
    gc.collect()
    b = ix.get(b"n", b"a")  # every field was the record's, not the old view's
    assert b.record == rec
    assert (b.refs, b.seg, b.stamp, b.reads, b.offset, b.committed_at, b.unverified, b.state) == \
        (2, 1, 12345678901, 7, 8192, 1.5, True, 2)
    assert b.ns == b"n" and b.key == b"a" and b.sc is SC and b.size == 100 and b.checksum == 0x1234


def test_eviction_links_are_views_of_the_linked_records():
    ix = PackedIndex()
    a, b, c = (entry(b"n", k) for k in (b"a", b"b", b"c"))
    for e in (a, b, c):
        ix.insert(e)
    a.older, b.newer, b.older, c.newer = b, a, c, b
    assert a.older is b and b.newer is a and b.older is c and c.newer is b and c.older is None
    rec_c = c.record
    del c
    gc.collect()
    c2 = b.older  # a fresh view of the same record, then the same object again
    assert c2.record == rec_c and b.older is c2 and c2.newer is b
    b.older = None
    assert b.older is None
    other = PackedIndex()
    x = entry(b"n", b"x")
    other.insert(x)
    with pytest.raises(TypeError, match="same index"):
        a.older = x
    with pytest.raises(TypeError, match="same index"):
        a.older = entry(b"n", b"detached")
    with pytest.raises(TypeError, match="same index"):
        a.newer = "not an entry"


def test_a_removed_entry_is_read_by_its_holders_then_its_record_is_reused():
    ix = PackedIndex()
    e = entry(b"n", b"gone", size=77)
    ix.insert(e)
    ix.remove(e)
    assert ix.get(b"n", b"gone") is None and len(ix) == 0 and ix.namespaces() == {}
    # a reader holding it still reads every field (the Store frees its slot on release)
    assert e.ns == b"n" and e.key == b"gone" and e.size == 77
    e.refs += 1
    e.state = 2
    rec = e.record
    assert ix.footprint()["namespaces"] == 1  # its namespace name is kept for it
    del e
    gc.collect()
    assert ix.footprint()["namespaces"] == 0 and ix.footprint()["views"] == 0
    f = entry(b"m", b"new")
    ix.insert(f)
    assert f.record == rec and f.ns == b"m" and f.key == b"new" and f.refs == 0
    # a removed entry may go back in (nothing else took its key)
    ix.remove(f)
    ix.insert(f)
    assert ix.get(b"m", b"new") is f and len(ix) == 1
    with pytest.raises(KeyError):
        ix.insert(f)  # already in


def test_nvme_locations_pack_when_they_can_and_are_kept_whole_otherwise():
    ix = PackedIndex()
    e = entry(b"n", b"k", size=100)
    ix.insert(e)
    assert e.nvme is None
    packed = Location(3, 40 * 4096, 100, 0x1234, 9)
    e.nvme = packed
    assert e.nvme == packed and e.nvme is not packed  # rebuilt from the record
    odd = Location(3, 40 * 4096 + 512, 100, 0x1234, 9)  # not 4 KiB aligned: kept whole
    e.nvme = odd
    assert e.nvme is odd
    big = Location(70000, 4096, 100, 0x1234, 2**40)  # region and generation too wide
    e.nvme = big
    assert e.nvme is big
    e.nvme = None
    assert e.nvme is None
    with pytest.raises(TypeError, match="Location"):
        e.nvme = 12
    d = entry(b"n", b"detached")
    d.nvme = packed
    ix.insert(d)
    assert d.nvme == packed


def test_bad_input_raises_clear_errors():
    ix = PackedIndex()
    e = entry(b"n", b"k", offset=4096)
    ix.insert(e)
    with pytest.raises(ValueError, match="at most 255"):
        entry(b"n", b"x" * 256)
    with pytest.raises(TypeError):
        Entry("n", b"k", 0, 1, 0, SC)  # str namespace
    with pytest.raises(TypeError):
        Entry(b"n", bytearray(b"k"), 0, 1, 0, SC)
    with pytest.raises((ValueError, OverflowError)):
        Entry(b"n", b"k", 0, 2**32, 0, SC)
    with pytest.raises((ValueError, OverflowError)):
        Entry(b"n", b"k", 0, -1, 0, SC)
    with pytest.raises(ValueError, match="size"):
        Entry(b"n", b"k", 0, 2**64 + 5, 0, SC)  # no silent wrap to 5
    with pytest.raises(TypeError, match="size"):
        Entry(b"n", b"k", 0, 1.5, 0, SC)
    for cs in (-1, 2**64):
        with pytest.raises(ValueError, match="checksum"):
            Entry(b"n", b"k", 0, 1, cs, SC)
    with pytest.raises(TypeError, match="size class"):
        ix.insert(Entry(b"n", b"nosc", 0, 1, 0, object()))
    assert len(ix) == 1 and ix.namespaces() == {b"n": (1, 100)}  # refused inserts change nothing
    for bad in (None, 5, b"k", DictEntry(b"n", b"k", 0, 1, 0, SC)):
        with pytest.raises(TypeError, match="kvstored._index.Entry"):
            ix.insert(bad)
        with pytest.raises(TypeError):
            ix.remove(bad)
        with pytest.raises(TypeError):
            ix.place(bad)
    with pytest.raises(TypeError):
        ix.get("n", "k")
    with pytest.raises(TypeError):
        ix.get(b"n")
    assert ix.get(b"n", b"x" * 1000) is None
    with pytest.raises(TypeError):
        ix.at("4096")
    assert ix.at(-1) is None and ix.at(2**62) is None
    with pytest.raises(OverflowError):
        ix.at(2**70)
    with pytest.raises(KeyError, match="never inserted"):
        ix.remove(entry(b"n", b"k"))
    with pytest.raises(KeyError, match="another index"):
        PackedIndex().remove(e)
    with pytest.raises(ValueError, match="another index"):
        PackedIndex().insert(e)
    with pytest.raises(ValueError, match="out of range"):
        e.refs = -1
    with pytest.raises(ValueError, match="out of range"):
        e.seg = 3
    with pytest.raises(TypeError, match="int"):
        e.offset = 1.5
    with pytest.raises(ValueError, match="COMMITTED"):
        e.state = 0
    with pytest.raises(AttributeError):
        e.size = 5  # fixed once inserted (the counts are made of it)
    with pytest.raises(AttributeError):
        del e.refs
    with pytest.raises(ValueError, match="negative"):
        e.reads = -1
    e.reads = 2**40
    assert e.reads == 15  # saturates (4 bits: the Store asks "read at all?")
    with pytest.raises(ValueError, match="out of range"):
        e.stamp = 2**48  # the record keeps 48 bits of the eviction clock
    with pytest.raises(ValueError, match="out of range"):
        e.offset = -2
    with pytest.raises(ValueError, match="DRAM offset or -1"):
        Entry(b"n", b"k", -2, 1, 0, SC)
    with pytest.raises(ValueError, match="DRAM offset or -1"):
        ix.add(b"n", b"k", -7, 1, 0, SC, 0.0)
    nd = entry(b"n", b"nd")
    ix.insert(nd)
    with pytest.raises(ValueError, match="no DRAM slot"):
        ix.place(nd)
    with pytest.raises(ValueError, match="positive"):
        PackedIndex(0)
    raw = _index.Table.__new__(_index.Table)  # never initialised
    with pytest.raises(RuntimeError, match="__init__"):
        raw.get(b"n", b"k")
    assert len(raw) == 0
    with pytest.raises(RuntimeError, match="twice"):
        ix.__init__(1 << 20)


def test_too_many_namespaces_is_refused_and_emptied_ones_are_reused():
    ix = PackedIndex()
    es = [entry(b"ns%d" % i, b"k") for i in range(65535)]
    for e in es:
        ix.insert(e)
    with pytest.raises(OverflowError, match="65535 namespaces"):
        ix.insert(entry(b"one-more", b"k"))
    ix.remove(es[5])
    del es[5]
    gc.collect()
    ix.insert(entry(b"one-more", b"k"))  # the emptied namespace's id went back
    assert ix.count(b"one-more") == 1 and ix.count(b"ns5") == 0 and len(ix) == 65535


def test_keys_of_every_length_and_binary_content_round_trip():
    ix = PackedIndex()
    keys = [bytes(range(n)) for n in range(256)] + [b"\x00" * 8, b"\x00" * 9, b"\xff" * 255]
    for k in keys:
        ix.insert(entry(b"n", k))
    assert len(ix) == len(keys)
    for k in keys:
        e = ix.get(b"n", k)
        assert e is not None and e.key == k
    assert ix.get(b"n", b"\x00" * 10) is None and ix.get(b"m", b"") is None


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_operations_read_the_same_on_both_indexes(seed):
    """Inserts, removals (some while held), slots, pins and held records, interleaved
    the way a busy event loop does: every read agrees with the dict index."""
    rng = random.Random(seed)
    slab = 1 << 16
    sc = SizeClass(0, 256, slab)
    both = (DictIndex(slab), PackedIndex(slab))
    cls = (DictEntry, Entry)
    held: list[dict] = [{}, {}]  # (ns, key) -> entry, as a caller holding them
    free_slots = list(range(0, 8 * slab, 256))
    rng.shuffle(free_slots)
    for step in range(6000):
        ns = b"ns%d" % rng.randrange(5)
        key = b"%d" % rng.randrange(400)
        op = rng.random()
        cur = [ix.get(ns, key) for ix in both]
        assert (cur[0] is None) == (cur[1] is None)
        if cur[0] is None and op < 0.5:
            off = free_slots.pop() if free_slots and rng.random() < 0.7 else -1
            size, cs = rng.randrange(1, 256), rng.randrange(2**64)
            for i, ix in enumerate(both):
                e = cls[i](ns, key, off, size, cs, sc)
                e.unverified = op < 0.05
                ix.insert(e)
                if off >= 0:
                    ix.place(e)
                held[i][(ns, key)] = e
        elif cur[0] is not None and op < 0.8:
            off = cur[0].offset
            for i, ix in enumerate(both):
                e = cur[i]
                if off >= 0:
                    ix.displace(e)
                ix.remove(e)
                held[i].pop((ns, key), None)
            if off >= 0:
                free_slots.append(off)
        elif cur[0] is not None and op < 0.9:
            flip = rng.random() < 0.5
            for ix, e in zip(both, cur):
                (ix.verify if flip else ix.mark_unverified)(e)
        elif cur[0] is not None:
            until = rng.choice([0.0, 5.0, 50.0])
            for ix, e in zip(both, cur):
                e.pins, e.pin_until = (1, until) if until else (0, 0.0)
                (ix.note_pin if until else ix.drop_pin)(e)
        if rng.random() < 0.02:
            held = [{}, {}]  # the holders let go: views are rebuilt on the next lookup
        if step % 1500 == 0 or step == 5999:
            a, b = both
            assert len(a) == len(b) and a.object_bytes == b.object_bytes
            assert a.unverified == b.unverified and a.namespaces() == b.namespaces()
            rows = lambda ix: sorted((e.ns, e.key, e.size, e.checksum, e.offset, e.unverified,
                                      e.pinned(10.0)) for e in ix.iterate())
            assert rows(a) == rows(b)
            for off in range(0, 8 * slab, 256 * 7):
                x, y = a.at(off), b.at(off)
                assert (x is None) == (y is None) and (x is None or x.key == y.key)
            assert sorted(e.key for e in a.live_pins(10.0)) == sorted(e.key for e in b.live_pins(10.0))


def test_make_index_follows_the_setting_and_the_environment(monkeypatch):
    monkeypatch.delenv("KVSTORED_INDEX", raising=False)
    assert type(make_index("dict")) is DictIndex
    assert type(make_index("packed")) is PackedIndex
    assert type(make_index("auto")) is PackedIndex  # the extension is built here
    monkeypatch.setenv("KVSTORED_INDEX", "dict")
    assert type(make_index("packed")) is DictIndex
    monkeypatch.setenv("KVSTORED_INDEX", "bogus")
    with pytest.raises(ValueError, match="auto, packed or dict"):
        make_index("auto")


def test_many_objects_grow_the_table_and_keep_exact_counts():
    ix = PackedIndex()
    n = 200_000
    for i in range(n):
        ix.insert(Entry(b"n", i.to_bytes(8, "little") * 4, -1, 256, i, SC))
    for i in range(0, n, 2):
        ix.remove(ix.get(b"n", i.to_bytes(8, "little") * 4))
    assert len(ix) == n // 2 and ix.object_bytes == 256 * (n // 2)
    assert all(ix.get(b"n", i.to_bytes(8, "little") * 4).checksum == i for i in range(1, n, 2002))  # odd: kept
    fp = ix.footprint()
    assert fp["views"] == 0 and fp["records"] == n * fp["record_size"]
    for i in range(0, n, 2):  # the freed records are reused, not appended
        ix.insert(Entry(b"n", i.to_bytes(8, "little") * 4, -1, 256, i, SC))
    assert ix.footprint()["records"] == fp["records"] and len(ix) == n


@pytest.mark.parametrize("make", [DictIndex, PackedIndex])
def test_add_indexes_a_recovered_record_like_insert(make):
    ix = make()
    loc = Location(2, 8 * 4096, 100, 0xABC, 4)
    ix.add(b"n", b"k", -1, 100, 0xABC, SC, 12.5, loc, True)
    ix.add(b"n", b"k2", -1, 50, 1, SC, 13.0)
    e = ix.get(b"n", b"k")
    assert (e.size, e.checksum, e.offset, e.committed_at, e.unverified, e.nvme) == \
        (100, 0xABC, -1, 12.5, True, loc)
    assert ix.get(b"n", b"k2").nvme is None and not ix.get(b"n", b"k2").unverified
    assert len(ix) == 2 and ix.unverified == 1 and ix.namespaces() == {b"n": (2, 150)}
    with pytest.raises(KeyError, match="remove the old entry first"):
        ix.add(b"n", b"k", -1, 1, 1, SC, 0.0)
    assert len(ix) == 2 and ix.object_bytes == 150


def test_add_refuses_bad_fields_and_changes_nothing():
    ix = PackedIndex()
    with pytest.raises(ValueError, match="at most 255"):
        ix.add(b"n", b"x" * 256, -1, 1, 1, SC, 0.0)
    with pytest.raises(ValueError, match="checksum"):
        ix.add(b"n", b"k", -1, 1, -5, SC, 0.0)
    with pytest.raises(ValueError, match="size"):
        ix.add(b"n", b"k", -1, 2**70, 1, SC, 0.0)
    with pytest.raises(TypeError, match="Location"):
        ix.add(b"n", b"k", -1, 1, 1, SC, 0.0, "not a location")
    with pytest.raises(TypeError):
        ix.add(b"n", b"k", -1, 1, 1, SC, "noon")
    with pytest.raises(TypeError, match="size class"):
        ix.add(b"n", b"k", -1, 1, 1, None, 0.0)
    assert len(ix) == 0 and ix.namespaces() == {} and ix.footprint()["namespaces"] == 0
    ix.add(b"n", b"k", -1, 1, 1, SC, 0.0)  # the refused ones left no trace of the key
    assert len(ix) == 1 and ix.footprint()["records"] == ix.footprint()["record_size"]


def test_dram_offsets_that_do_not_pack_are_kept_exactly():
    """A record keeps a DRAM offset as a u32 count of 64-byte units (slots are 64-byte
    aligned, up to 256 GiB); any other offset goes to a side table, read back the same."""
    ix = PackedIndex(1 << 30)
    e = entry(b"n", b"k", offset=4096)
    ix.insert(e)
    for off in (0, 64, 4096 + 8, 2**38 - 64, 2**38, 2**45 + 64, 2**62, -1, 128):
        e.offset = off
        assert e.offset == off
    e.offset = 4096 + 8
    rec = e.record
    del e
    e = ix.get(b"n", b"k")
    assert e.record == rec and e.offset == 4096 + 8
    with pytest.raises(ValueError, match="not a slot of 4096 bytes"):
        ix.place(e)
    big = entry(b"n", b"big", offset=300 * 2**30)  # past 256 GiB: 300 slabs of 1 GiB
    ix.insert(big)
    ix.place(big)
    assert ix.at(300 * 2**30) is big and big.offset == 300 * 2**30
    ix.displace(big)
    assert ix.at(300 * 2**30) is None
    ix.add(b"n", b"added", 2**40 + 8, 1, 0, SC, 0.0)
    assert ix.get(b"n", b"added").offset == 2**40 + 8
    ix.remove(ix.get(b"n", b"added"))
    assert _index.RECORD_SIZE == 51  # the record; a keyed one's chunk is in footprint()


def test_garbage_into_every_call_raises_a_typed_error_and_leaves_the_index_whole():
    ix = PackedIndex()
    e = entry(b"n", b"k", offset=4096)
    ix.insert(e)
    junk = [None, -1, 2**64, 2**200, -2**70, 1.5, float("nan"), "s", b"", b"x" * 300,
            bytearray(b"k"), (), [], {}, object()]  # entries: the tests above
    allowed = (TypeError, ValueError, KeyError, OverflowError, AttributeError)
    calls = 0
    for name in ("get", "insert", "remove", "place", "displace", "at", "count", "iterate",
                 "mark_unverified", "verify", "use_slab_size"):
        f = getattr(ix, name)
        for a in junk:
            for args in ((a,), (a, a), (b"n", a)):
                calls += 1
                try:
                    r = f(*args)
                    if name == "iterate":
                        list(r)
                except allowed:
                    pass
    for attr in ("offset", "refs", "seg", "stamp", "reads", "committed_at", "state", "unverified",
                 "newer", "older", "nvme", "pins", "pin_until", "size", "ns", "key", "sc"):
        before = getattr(e, attr)
        for a in junk:
            calls += 1
            try:
                setattr(e, attr, a)
            except allowed:
                pass
        try:
            setattr(e, attr, before)
        except AttributeError:
            pass  # read-only
    e.newer = e.older = None
    assert calls > 500
    assert ix.get(b"n", b"k") is e and len(ix) == 1 and e.key == b"k" and e.size == 100


def test_holding_every_view_at_once_then_letting_go_shrinks_the_view_map():
    ix = PackedIndex()
    for i in range(50_000):
        ix.insert(Entry(b"n", b"%d" % i, -1, 1, i, SC))
    held = list(ix.iterate())  # as the shutdown flush does
    assert ix.footprint()["views"] == 50_000 and len({id(e) for e in held}) == 50_000
    assert [e.checksum for e in held[:3]] == [0, 1, 2]
    big = ix.footprint()["view_slots"]
    assert big >= 100_000
    del held
    assert ix.footprint()["views"] == 0 and ix.footprint()["view_slots"] <= 2048
    again = list(ix.iterate())  # the shrunk map still finds and files every view
    assert len(again) == 50_000 and all(ix.get(b"n", e.key) is e for e in again[::997])


def collecting_during(call, on_start):
    """``call()`` with a collection made to run inside it (threshold 1, with 2-tuples held
    so the tuples it allocates are fresh ones, which count towards a collection) and
    ``on_start()`` run at the start of each collection: the Python a C walk may meet
    midway. Returns what ``call`` returned."""
    def cb(phase, info):
        if phase == "start":
            on_start()

    held = [(i, -i) for i in range(5000)]  # noqa: F841 (kept alive through the call)
    threshold = gc.get_threshold()
    gc.callbacks.append(cb)
    gc.set_threshold(1)
    try:
        return call()
    finally:
        gc.set_threshold(*threshold)
        gc.callbacks.remove(cb)


def test_namespaces_survives_a_collection_that_adds_namespaces_midway():
    """Table.namespaces allocates a tuple per namespace; a collection it triggers may run
    Python (here a gc callback) that adds namespaces, so the spaces array moves under
    the loop. It must answer from what it read, not from the moved array (under
    `make sanitize` a stale read is a heap-use-after-free report)."""
    ix = PackedIndex()
    keep = [entry(b"ns%d" % i, b"k", size=10 + i) for i in range(64)]
    for e in keep:
        ix.insert(e)
    added = []

    def grow():
        if not added:
            added.extend(entry(b"new%d" % i, b"k", size=7) for i in range(4096))
            for e in added:
                ix.insert(e)

    got = collecting_during(ix.namespaces, grow)
    assert added, "no collection ran during namespaces()"
    for i in range(64):
        assert got[b"ns%d" % i] == (1, 10 + i)
    assert set(got) - {b"ns%d" % i for i in range(64)} <= {b"new%d" % i for i in range(4096)}
    assert all(got[k] == (1, 7) for k in got if k.startswith(b"new"))
