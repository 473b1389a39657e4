"""The packed index under review (issue 13, H7): fleet-scale offsets, slot-map edge
cases, re-entrancy from Python code run inside a C call, a full namespace table, the
seeded hash, hostile key shapes, and a wider random differential against the dict index.
Each fix here came with the test that failed before it (see the git log)."""
from __future__ import annotations

import gc
import random
import weakref

import pytest

_index = pytest.importorskip("kvstored._index")

from kvstore.errors import NoSpace  # noqa: E402
from kvstore.wire import MAX_KEY_LEN, MAX_NAMESPACE_LEN  # noqa: E402
from kvstored.engine.arena import SizeClass, size_classes  # noqa: E402
from kvstored.engine.entries import Entry as DictEntry, Index as DictIndex  # noqa: E402
from kvstored.engine.nvmedevice import Location  # noqa: E402
from kvstored.engine.packedindex import Entry, IndexFull, PackedIndex  # noqa: E402
from test_packed_index import collecting_during  # noqa: E402  (tests/unit is on sys.path)

GiB = 1 << 30
SC = SizeClass(0, 4096, 1 << 20)


def entry(ns: bytes, key: bytes, offset: int = -1, size: int = 100, sc=SC, cls=Entry):
    return cls(ns, key, offset, size, 0x1234, sc)


# ------------------------------------------------------------ fleet-scale offsets
def test_every_arena_offset_packs_in_the_record_past_256_gib():
    """Offsets are a 40-bit count of 64-byte units: a 1 TiB (or 64 TiB) arena's objects
    need no side-table entry (before: one dict entry per object past 256 GiB)."""
    slab = 64 << 20
    ix = PackedIndex(slab)
    sc = SizeClass(0, 4096, slab)
    offs = [256 * GiB - 4096, 256 * GiB, 256 * GiB + 4096, 300 * GiB, 1 << 40, (16 << 40) - 4096,
            (1 << 46) - 4096]
    es = []
    for i, off in enumerate(offs):
        e = entry(b"n", b"k%d" % i, offset=off, sc=sc)
        ix.insert(e)
        ix.place(e)
        es.append(e)
    ix.add(b"n", b"added", 2**40 + 4096, 1, 0, sc, 0.0)
    assert ix.footprint()["wide_offsets"] == 0
    for e, off in zip(es, offs):
        assert e.offset == off and ix.at(off) is e
    rec = es[3].record
    del es  # views gone: the record alone holds the offset
    assert ix.get(b"n", b"k3").record == rec and ix.get(b"n", b"k3").offset == 300 * GiB
    assert ix.get(b"n", b"added").offset == 2**40 + 4096
    # what still does not pack (no arena makes it) is kept exactly, and counted
    e = ix.get(b"n", b"k0")
    e.offset = 256 * GiB + 8
    assert e.offset == 256 * GiB + 8 and ix.footprint()["wide_offsets"] == 1
    e.offset = -1
    assert ix.footprint()["wide_offsets"] == 0


def test_arena_slot_offsets_are_all_64_byte_multiples():
    """Why every arena offset packs: slabs are 4 KiB multiples (arena.py refuses others)
    and every slot size is a multiple of 64."""
    for slab in (1 << 20, 64 << 20, 1 << 30):
        assert all(s % 64 == 0 for s in size_classes(slab))


def test_refs_hold_24_bits_and_refuse_more_with_a_clear_error():
    ix = PackedIndex()
    e = entry(b"n", b"k")
    ix.insert(e)
    e.refs = 2**24 - 1
    assert e.refs == 2**24 - 1 and e.offset == -1  # the neighbouring offset bits untouched
    with pytest.raises(ValueError, match="refs out of range"):
        e.refs += 1
    assert e.refs == 2**24 - 1
    e.offset = 2**40
    e.refs = 0
    assert e.offset == 2**40 and e.refs == 0


def test_the_slot_map_reaches_past_2_24_slabs():
    """A small slab size (>= max_value_size) and a big arena: before, a slab number past
    2**24 (64 GiB of 4 KiB slabs) was refused, so every put into it failed."""
    slab = 4096
    ix = PackedIndex(slab)
    sc = SizeClass(0, 4096, slab)
    off = (1 << 24) * slab + 4 * slab
    e = entry(b"n", b"far", offset=off, sc=sc)
    ix.insert(e)
    ix.place(e)
    assert ix.at(off) is e and ix.at(off - slab) is None
    ix.displace(e)
    assert ix.at(off) is None


# ---------------------------------------------------------------- slot map edges
@pytest.mark.parametrize("cls,index", [(Entry, PackedIndex), (DictEntry, DictIndex)])
def test_a_refused_place_leaves_the_slab_map_as_it_was(cls, index):
    slab = 1 << 16
    ix = index(slab)
    small, big = SizeClass(0, 256, slab), SizeClass(1, 512, slab)
    a = entry(b"n", b"a", offset=0, sc=small, cls=cls)
    ix.insert(a)
    ix.place(a)
    b = entry(b"n", b"b", offset=256, sc=big, cls=cls)  # 256 is not a 512-byte slot
    ix.insert(b)
    with pytest.raises(ValueError, match="not a slot of 512 bytes"):
        ix.place(b)
    assert ix.at(0) is a  # before: the refused place had replaced the slab's row


def test_an_offset_changed_without_displace_leaves_no_stale_slot():
    """A record freed and its number reused must never be returned by at() for a slot
    the old object left without a displace (it would be another object)."""
    slab = 1 << 16
    ix = PackedIndex(slab)
    sc = SizeClass(0, 256, slab)
    old = entry(b"n", b"old", offset=512, sc=sc)
    ix.insert(old)
    ix.place(old)
    old.offset = -1  # no displace (a caller's slip)
    rec = old.record
    ix.remove(old)
    del old
    new = entry(b"n", b"new", offset=1024, sc=sc)
    ix.insert(new)
    assert new.record == rec  # the number was reused
    assert ix.at(512) is None


# ------------------------------------------------- Python code run inside a C call
class _CollectingClass:
    """A size class whose slot_size read runs a garbage collection (any getattr may)."""

    index = 0

    def __init__(self, size):
        self._size = size

    @property
    def slot_size(self):
        gc.collect()
        return self._size


def test_a_collection_during_insert_cannot_recycle_the_namespace_in_use():
    """The last record of a namespace, held only by garbage, is freed by a collection
    that runs inside insert: before, its namespace id was recycled under the new
    record (a NULL name: a crash on e.ns)."""
    ix = PackedIndex()
    old = entry(b"tenant", b"old")
    ix.insert(old)
    ix.remove(old)
    cycle = [old]
    cycle.append(cycle)
    del old, cycle  # the removed record now lives only through garbage
    gc.disable()
    try:
        e = entry(b"tenant", b"new", sc=_CollectingClass(4096))
        ix.insert(e)
    finally:
        gc.enable()
    assert e.ns == b"tenant" and ix.count(b"tenant") == 1
    assert ix.namespaces() == {b"tenant": (1, 100)}
    other = entry(b"other", b"x")
    ix.insert(other)  # a fresh id: not the one under e
    assert e.ns == b"tenant" and other.ns == b"other"


def test_a_location_whose_getattr_grows_the_index_is_stored_on_the_right_record():
    """Entry.nvme reads the Location's fields by getattr: code run there that grows the
    record array must not leave the store writing through a stale pointer."""
    ix = PackedIndex()
    e = entry(b"n", b"k")
    ix.insert(e)

    class Loc:
        offset, length, checksum, generation = 4096, 100, 0x1234, 1

        @property
        def region(self):
            for i in range(20000):  # the record array moves
                ix.add(b"m", b"%d" % i, -1, 1, 0, SC, 0.0)
            return 3

    loc = Loc()
    e.nvme = loc
    assert e.nvme is loc and len(ix) == 20001
    e.nvme = None
    assert e.nvme is None


class _Token:
    """A detached entry's size class held by nothing else: it dies when the GC clears the entry."""


class _CycleHolder:
    """A detached entry's nvme that holds the entry back (the cycle). Its finalizer, run by
    the GC before it clears anything, makes weakrefs the GC does not know of: the token's
    callback then runs while the GC clears the cycle, and reads the entry through them."""

    later: list = []
    seen: list = []

    def __del__(self):
        _CycleHolder.later[:] = [weakref.ref(self), weakref.ref(self.e.sc, _CycleHolder.read)]

    @staticmethod
    def read(_):
        h = _CycleHolder.later[0]()
        if h is None or "e" not in h.__dict__:
            return
        e = h.e
        got = [e.ns, e.key, repr(e), e.nvme is h or e.nvme is None]
        for attempt in (lambda: e.sc, lambda: PackedIndex().insert(e)):
            try:
                got.append(attempt())
            except RuntimeError as err:
                got.append(str(err))
        _CycleHolder.seen.append(got)


def test_a_detached_entry_cleared_by_the_gc_still_reads_what_it_can():
    """The GC clears a cycle's objects one by one (tp_clear); Python run meanwhile (here a
    weakref callback a finalizer made) may still read a cleared entry. Before, tp_clear
    freed a detached entry's fields and the read dereferenced NULL (SIGSEGV). Now ns and key
    stay (exact bytes: in no cycle), and the cleared size class is a typed error."""
    gc.collect()
    gc.disable()  # the entry is older than its holder: the GC clears it first
    try:
        e = entry(b"tenant", b"key", sc=_Token())
        h = _CycleHolder()
        h.e, e.nvme = e, h
        del e, h
        gc.collect()
    finally:
        gc.enable()
    assert _CycleHolder.seen, "the callback never ran during the collection"
    (ns, key, text, nvme_ok, sc_err, insert_err), = _CycleHolder.seen
    assert (ns, key, nvme_ok) == (b"tenant", b"key", True) and "detached" in text
    assert "cleared by the garbage collector" in sc_err
    assert "cleared by the garbage collector" in insert_err
    _CycleHolder.seen.clear()
    _CycleHolder.later.clear()


def test_a_bytes_subclass_namespace_and_key_are_kept_as_plain_bytes():
    """A bytes subclass can carry a __dict__ and so close a cycle through the entry; the
    entry keeps plain bytes of its own, equal to what it was given."""
    class B(bytes):
        pass
    ns, key = B(b"n"), B(b"k")
    e = entry(ns, key)
    ns.e = key.e = e
    assert type(e.ns) is bytes and type(e.key) is bytes and (e.ns, e.key) == (b"n", b"k")
    plain = b"plain"
    assert entry(plain, b"k").ns is plain  # exact bytes are not copied


def test_inserting_an_entry_again_from_python_its_insert_runs_is_refused():
    """Table.insert reads the size class's slot_size by getattr, which may run Python. Here
    that Python inserts the same entry into another index: before, that freed the detached
    fields the first insert went on to read (heap-use-after-free under ASan) and attached
    the entry to both indexes (the other's view slot left dangling). The second insert is
    a typed error now; the first completes."""
    ix, other = PackedIndex(), PackedIndex()
    errors, calls = [], []

    class Reentrant:
        index = 0

        @property
        def slot_size(self):
            if not calls:  # once: the nested insert reads slot_size too
                calls.append(1)
                try:
                    other.insert(e)
                except RuntimeError as err:
                    errors.append(str(err))
            return 4096

    e = entry(b"n", b"k", sc=Reentrant())
    ix.insert(e)
    assert errors and "already being inserted" in errors[0]
    assert ix.get(b"n", b"k") is e and e.record is not None and len(other) == 0
    del e
    gc.collect()
    assert ix.get(b"n", b"k").key == b"k" and other.get(b"n", b"k") is None


def _grow(ix, n=20000):
    """Python that moves the record array (realloc), as a __del__ may."""
    for i in range(n):
        ix.add(b"grow", b"%d" % i, -1, 1, 0, SC, 0.0)


def test_a_pin_count_whose_release_grows_the_index_does_not_write_a_freed_record():
    """remove() drops a pinned entry's pin record; the release of its count (an int
    subclass: its __del__ runs) grows the record array. Before, remove then cleared the pin
    flag through the old array (a heap-use-after-free write under ASan)."""
    ix = PackedIndex()
    e = entry(b"ns", b"k")
    ix.insert(e)
    dels = []

    class Count(int):
        def __del__(self):
            dels.append(1)
            _grow(ix)

    e.pins = Count(1)  # the pin record holds the only reference
    ix.remove(e)
    assert dels and len(ix) == 20000
    assert e.pins == 0 and not e.pinned(0.0)
    ix.insert(e)  # the record is whole: in again, unpinned
    assert ix.get(b"ns", b"k") is e and e.pins == 0


def test_a_side_table_location_whose_release_grows_the_index_frees_its_record_whole():
    """A Location that does not pack is kept whole in a side dict; the record's free (its
    last view gone) releases it, and its __del__ grows the record array. Before, the free
    went on through the old array (heap-use-after-free under ASan); the record is freed
    whole now and its number is reused."""
    ix = PackedIndex()
    e = entry(b"ns", b"k")
    ix.insert(e)
    dels = []

    class Loc:
        region, offset, length, checksum, generation = 1, 4097, 100, 0x1234, 1  # unaligned

        def __del__(self):
            dels.append(1)
            _grow(ix)

    e.nvme = Loc()
    assert ix.footprint()["nvme_side"] == 1
    rec = e.record
    ix.remove(e)
    del e
    gc.collect()
    assert dels and len(ix) == 20000 and ix.footprint()["nvme_side"] == 0
    again = entry(b"ns", b"again")
    ix.insert(again)
    assert len(ix) == 20001 and ix.get(b"ns", b"again").key == b"again"
    assert rec in {again.record} | {x.record for x in ix.iterate(b"grow")}


def test_a_chain_parent_whose_compare_inserts_another_entry_is_pushed_at_the_head():
    """An insert whose chain parent was the last insert goes just behind it: the parent
    (ns, key) is compared with the last insert's, and the compare may run Python (a bytes
    subclass in the parents dict) that inserts another entry, dropping the only reference
    to the old last insert's view. Before, its freed view was read after (heap-use-after-
    free under ASan); now the parent is no longer the last insert and the entry goes to
    the head, as the Python policy would put it."""
    from kvstored.engine.eviction import PROBATION, NativePolicy
    ix = PackedIndex()
    pol = NativePolicy(1, ix)
    a, b, c = (entry(b"ns", k, offset=4096 * (i + 1)) for i, k in enumerate((b"a", b"b", b"c")))
    for e in (a, b, c):
        ix.insert(e)
    pol.insert(a)
    del a  # pol.last_insert holds the only reference to a's view
    fired = []

    class Ns(bytes):
        __hash__ = bytes.__hash__

        def __eq__(self, other):
            if not fired:
                fired.append(1)
                pol.insert(c)
            return bytes.__eq__(self, other)

    pol.parents[(b"ns", b"b")] = (Ns(b"ns"), b"a")
    pol.insert(b)
    assert fired and pol.resident == 3
    assert [e.key for e in pol.order(0, PROBATION)] == [b"b", b"c", b"a"]
    assert pol.lru.last_insert is b


def test_a_collection_while_a_view_is_made_that_makes_the_same_view_leaves_one():
    """A record's view is made on demand; its allocation may run a collection, and Python
    run there (a gc callback here) may ask for the same record's view. Before, both were
    filed in the view map and, the outer one gone first, the map kept its freed pointer
    (heap-use-after-free on the next lookup under ASan). Now the outer call returns the
    view the collection made."""
    ix = PackedIndex()
    ix.insert(entry(b"ns", b"k"))  # no view held: every get makes one
    state = {"armed": False, "inner": None}

    def made_inside(phase, info):
        if phase == "start" and state["armed"]:
            state["armed"] = False
            state["inner"] = ix.get(b"ns", b"k")

    threshold = gc.get_threshold()
    gc.callbacks.append(made_inside)
    try:
        for attempt in range(20):  # until a collection runs inside the view's allocation
            gc.collect()
            junk = [[] for _ in range(attempt % 2)]  # noqa: F841 (shifts where the next one runs)
            gc.set_threshold(1)
            state["armed"] = True
            outer = ix.get(b"ns", b"k")
            gc.set_threshold(*threshold)
            state["armed"] = False
            if state["inner"] is not None:
                break
            del outer
    finally:
        gc.set_threshold(*threshold)
        gc.callbacks.remove(made_inside)
    inner = state.pop("inner")
    assert inner is not None, "no collection ran while the view was made"
    assert outer is inner
    del outer, inner
    again = ix.get(b"ns", b"k")
    assert again.key == b"k" and ix.footprint()["views"] == 1


def test_a_location_whose_getattr_indexes_the_same_key_is_a_duplicate_refused():
    """insert() checks the key is free, then stores the NVMe Location, whose fields are read
    by getattr (Python). Here that Python indexes the same key: before, both records went
    into the table (one key, two objects, counted twice). Now the insert is a KeyError
    and the index holds the key once."""
    ix = PackedIndex()

    class Loc:
        offset, length, checksum, generation = 4096, 100, 0x1234, 1

        @property
        def region(self):
            if not len(ix):
                ix.add(b"ns", b"k", -1, 100, 0x1234, SC, 0.0)
            return 3

    e = entry(b"ns", b"k")
    e.nvme = Loc()
    with pytest.raises(KeyError, match="indexed by Python code"):
        ix.insert(e)
    assert len(ix) == 1 and ix.namespaces() == {b"ns": (1, 100)} and e.record is None
    with pytest.raises(KeyError):
        ix.add(b"ns", b"k", -1, 100, 0x1234, SC, 0.0, nvme=Loc())


def test_ghost_items_survives_a_collection_that_adds_digests_midway():
    """Ghost.items allocates a tuple per digest; a collection it triggers may run Python
    (a gc callback here) that adds digests. Before, the list was sized before the walk
    and the walk went on over the grown ring: writes past the list's end (heap-buffer-
    overflow under ASan). It answers from the digests it copied first."""
    ghost = _index.Ghost()
    for d in range(200):
        ghost.add(d, d % 3)
    added = []

    def grow():
        if not added:
            added.append(1)
            for d in range(1000, 3000):
                ghost.add(d, 0)

    got = collecting_during(ghost.items, grow)
    assert added, "no collection ran during items()"
    assert got == [(d, d % 3) for d in range(200)]
    assert len(ghost) == 2200 and ghost.items()[-1] == (2999, 0)


# ------------------------------------------------------------------- hostile input
def test_a_full_namespace_table_is_a_typed_nospace_and_frees_the_id_on_empty():
    ix = PackedIndex()
    es = [ix.add(b"ns%d" % i, b"k", -1, 1, 0, SC, 0.0) for i in range(65535)]
    assert es[0] is None and len(ix.namespaces()) == 65535
    with pytest.raises(NoSpace, match="65535 namespaces") as ei:
        ix.insert(entry(b"one-more", b"k"))
    assert isinstance(ei.value, OverflowError) and isinstance(ei.value, IndexFull)
    assert ix.get(b"one-more", b"k") is None and len(ix) == 65535
    ix.remove(ix.get(b"ns7", b"k"))
    gc.collect()
    ix.insert(entry(b"one-more", b"k"))
    assert ix.count(b"one-more") == 1


def test_wire_limit_keys_and_namespaces_round_trip():
    ix = PackedIndex()
    longest_ns = b"n" * MAX_NAMESPACE_LEN
    keys = [b"", b"\x00", b"\xff" * MAX_KEY_LEN, bytes(range(128)), b"\x00" * 255, b"k" * 255]
    for ns in (longest_ns, b"a:b/c.d-e_f"):
        for k in keys:
            ix.insert(entry(ns, k))
    for ns in (longest_ns, b"a:b/c.d-e_f"):
        for k in keys:
            e = ix.get(ns, k)
            assert e is not None and e.key == k and e.ns == ns
    assert ix.get(longest_ns, b"\x00" * 254) is None and ix.get(longest_ns, b"x" * 256) is None
    with pytest.raises(ValueError, match="at most 255"):
        entry(longest_ns, b"x" * 256)


def _hostile_keys(n):
    """Key shapes a client could send to force collisions in a weak hash: counters,
    keys differing only in one high byte, zero runs of every length, repeated words."""
    out = [b"%d" % i for i in range(n // 4)]
    out += [b"\x00" * 120 + i.to_bytes(8, "big") for i in range(n // 4)]
    out += [i.to_bytes(8, "little") + b"\x00" * 120 for i in range(n // 4)]
    out += [(b"%08d" % i) * 16 for i in range(n // 4)]
    return list(dict.fromkeys(out))


def test_the_hash_mixes_a_per_table_seed_and_keeps_probe_chains_short():
    a, b = PackedIndex(), PackedIndex()
    for ix in (a, b):
        ix.add(b"n", b"seed", -1, 1, 0, SC, 0.0)
    keys = _hostile_keys(40000)
    ha = [a.key_hash(b"n", k) for k in keys]
    hb = [b.key_hash(b"n", k) for k in keys]
    assert sum(x == y for x, y in zip(ha, hb)) < 5  # two tables: two unrelated hashes
    assert len(set(ha)) == len(keys)  # 64-bit fingerprints: no collision expected
    assert max(ha) >= 2**63 or max(hb) >= 2**63  # all 64 bits are used
    for k in keys:
        a.add(b"n", k, -1, 1, 0, SC, 0.0)
    longest, mean, _ = a.probes()
    rand = PackedIndex()
    rng = random.Random(7)
    for _ in range(len(keys) + 1):
        rand.add(b"n", rng.randbytes(16), -1, 1, 0, SC, 0.0)
    r_longest, r_mean, _ = rand.probes()
    # the crafted keys spread like random ones (linear probing at <= 3/4 load)
    assert mean < 2 * r_mean + 1 and longest < 4 * r_longest + 32, (longest, mean, r_longest, r_mean)
    assert a.key_hash(b"absent", b"k") is None


# ------------------------------------------------------------------ equivalence
@pytest.mark.parametrize("seed, shed", [(11, False), (12, False), (13, True), (14, True)])
def test_random_operations_with_links_offsets_and_held_records_agree(seed, shed, young_heap):
    """A wider differential than test_packed_index's: eviction links (push/remove of a
    list through newer/older), offset moves (displace, change, place), promotion from
    NVMe-only, re-insert of a removed held entry, add(), pins with leases, refs, stamps
    and segments, NVMe locations; every read compared against the dict index. ``shed``:
    the packed index's entries also shed their key (``shed_key(e, dram=True)``, DRAM-
    resident and linked ones included: the record's union and side tables) and get it
    back (``restore_key``) at random; their keys come from a loader."""
    rng = random.Random(seed)
    slab = 1 << 14
    classes = [SizeClass(0, 256, slab), SizeClass(1, 1024, slab)]
    both = (DictIndex(slab), PackedIndex(slab))
    shed_keys: dict = {}  # record -> key of the packed index's keyless entries
    both[1].set_key_loader(lambda e: shed_keys[e.record])
    cls = (DictEntry, Entry)
    heads: list[list] = [[None, None], [None, None]]  # one eviction list per class, per index
    held: list[dict] = [{}, {}]
    gone: list[list] = [[], []]  # removed entries still held by someone
    free = {c.index: [off for s in range(16) for off in range(s * slab, (s + 1) * slab, c.slot_size)]
            for c in classes}
    for c in classes:  # slabs 0-7 are 256-byte ones, 8-15 1024-byte ones
        free[c.index] = [o for o in free[c.index] if (o // slab < 8) == (c.index == 0)]
        rng.shuffle(free[c.index])

    def link(i, e):
        h = heads[i]
        e.older, e.newer = h[e.sc.index], None
        if h[e.sc.index] is not None:
            h[e.sc.index].newer = e
        h[e.sc.index] = e

    def unlink(i, e):
        newer, older = e.newer, e.older
        if newer is not None:
            newer.older = older
        else:
            heads[i][e.sc.index] = older
        if older is not None:
            older.newer = newer
        e.newer = e.older = None

    def chain(i, c):
        out, e, n = [], heads[i][c], 0
        while e is not None and n < 10000:
            out.append((e.ns, e.key))
            e, n = e.older, n + 1
        return out

    for step in range(12000):
        ns = b"ns%d" % rng.randrange(4)
        key = b"%d" % rng.randrange(300)
        op = rng.random()
        cur = [ix.get(ns, key) for ix in both]
        assert (cur[0] is None) == (cur[1] is None)
        if cur[0] is None and op < 0.45:
            sc = rng.choice(classes)
            off = free[sc.index].pop() if free[sc.index] and rng.random() < 0.8 else -1
            size, cs, at = rng.randrange(1, sc.slot_size), rng.randrange(2**64), rng.random()
            unv = rng.random() < 0.05
            for i, ix in enumerate(both):
                if op < 0.1:  # recovery's path: no entry object
                    ix.add(ns, key, off, size, cs, sc, at, None, unv)
                    e = ix.get(ns, key)
                else:
                    e = cls[i](ns, key, off, size, cs, sc)
                    e.committed_at, e.unverified = at, unv
                    ix.insert(e)
                if off >= 0:
                    ix.place(e)
                    link(i, e)
                    e.seg, e.stamp = 0, step
                held[i][(ns, key)] = e
        elif cur[0] is not None and op < 0.7:
            off = cur[0].offset
            keep = rng.random() < 0.2
            for i, ix in enumerate(both):
                e = cur[i]
                ix.remove(e)
                if off >= 0:
                    unlink(i, e)
                    ix.displace(e)
                    e.seg = -1
                e.state = 2
                held[i].pop((ns, key), None)
                if keep:
                    gone[i].append(e)
            if off >= 0:
                free[cur[0].sc.index].append(off)
        elif cur[0] is not None and op < 0.78:
            # move: demote to NVMe-only, or promote/move to another slot
            old, sc = cur[0].offset, cur[0].sc
            new = -1 if old >= 0 and rng.random() < 0.5 else (
                free[sc.index].pop() if free[sc.index] else -1)
            loc = Location(rng.randrange(4), 4096 * rng.randrange(1000), cur[0].size,
                           cur[0].checksum, rng.randrange(5)) if new < 0 else None
            for i, ix in enumerate(both):
                e = cur[i]
                if old >= 0:
                    ix.displace(e)
                    unlink(i, e)
                e.offset = new
                if loc is not None:
                    e.nvme = loc
                if new >= 0:
                    ix.place(e)
                    link(i, e)
            if old >= 0:
                free[sc.index].append(old)
        elif cur[0] is not None and op < 0.84:
            until, pins = rng.choice([0.0, 5.0, 50.0]), rng.randrange(1, 3)
            for ix, e in zip(both, cur):
                e.pins, e.pin_until = (pins, until) if until else (0, 0.0)
                (ix.note_pin if until else ix.drop_pin)(e)
        elif cur[0] is not None and op < 0.9:
            flip, refs, reads = rng.random() < 0.5, rng.randrange(3), rng.randrange(70000)
            for ix, e in zip(both, cur):
                (ix.verify if flip else ix.mark_unverified)(e)
                e.refs, e.reads = refs, min(reads, 15)  # (the packed index saturates at 15)
            pe = cur[1]
            if shed and pe.offset >= 0 and pe.nvme is None and rng.random() < 0.5:
                loc = Location(rng.randrange(4), 4096 * rng.randrange(1000), pe.size, pe.checksum, 1)
                for e in cur:  # a demotion landed, the DRAM copy kept: in both tiers
                    e.nvme = loc
            if shed and (pe.offset >= 0 or pe.nvme is not None) and rng.random() < 0.7:
                shed_keys[pe.record] = key
                both[1].shed_key(pe, dram=True)
            elif shed and rng.random() < 0.5:
                both[1].restore_key(pe, key)
        elif cur[0] is None and gone[0] and op < 0.95:
            # re-insert a removed entry someone still held (its key free again)
            j = rng.randrange(len(gone[0]))
            pair = [gone[0].pop(j), gone[1].pop(j)]
            if both[0].get(pair[0].ns, pair[0].key) is None:
                for i, ix in enumerate(both):
                    pair[i].state = 1
                    pair[i].offset = -1
                    ix.insert(pair[i])
                    held[i][(pair[i].ns, pair[i].key)] = pair[i]
        if rng.random() < 0.02:
            held = [{}, {}]
        if rng.random() < 0.01:
            gone = [[], []]
            gc.collect()
        if step % 2000 == 0 or step == 11999:
            a, b = both
            assert len(a) == len(b) and a.object_bytes == b.object_bytes
            assert a.unverified == b.unverified and a.namespaces() == b.namespaces()
            rows = lambda ix: sorted(
                (e.ns, e.key, e.size, e.checksum, e.offset, e.unverified, e.pinned(10.0), e.pins,
                 e.pin_until, e.committed_at, e.nvme, e.refs, e.reads, e.seg, e.stamp, e.state,
                 e.sc.index, None if e.newer is None else e.newer.key,
                 None if e.older is None else e.older.key) for e in ix.iterate())
            assert rows(a) == rows(b)
            for c in classes:
                assert chain(0, c.index) == chain(1, c.index)
            for off in range(0, 16 * slab, 256):
                x, y = a.at(off), b.at(off)
                assert (x is None) == (y is None) and (x is None or (x.ns, x.key) == (y.ns, y.key))
            assert sorted(e.key for e in a.live_pins(10.0)) == sorted(e.key for e in b.live_pins(10.0))
            for ns_ in (b"ns0", b"ns3", b"absent"):
                assert sorted(e.key for e in a.iterate(ns_)) == sorted(e.key for e in b.iterate(ns_))
                assert a.count(ns_) == b.count(ns_)
            if shed and step == 11999:  # every state of a keyless record was met
                kl = [e for e in b.iterate() if not e.key_in_ram]
                assert any(e.offset >= 0 and e.older is not None for e in kl)
                assert any(e.offset >= 0 and e.nvme is not None for e in kl)
                assert any(e.offset < 0 and e.nvme is not None for e in kl)


def test_a_put_into_one_namespace_too_many_is_nospace_and_frees_its_slot(monkeypatch):
    """Through the Store: the put fails as NoSpace (the wire's typed error) and its DRAM
    slot goes back (before: the reserved slot leaked on every refused put)."""
    from kvstored.engine import Store, StoreLimits
    monkeypatch.setenv("KVSTORED_INDEX", "packed")
    MiB = 1 << 20
    s = Store(StoreLimits(dram_size=16 * MiB, slab_size=MiB, max_value_size=MiB, hugepages=False,
                          reservation_timeout=30.0, put_wait_timeout=0.3, max_pin_ttl=3600.0))
    try:
        assert s.index.kind == "packed"
        sc = s.arena.classes[0]
        for i in range(65534):  # NVMe-only records: namespaces without DRAM
            s.index.add(b"ns%d" % i, b"k", -1, 1, 0, sc, 0.0)
        assert s.put_bytes(b"last", b"k", b"x" * 100)
        used = s.arena.used_bytes
        for _ in range(3):
            with pytest.raises(NoSpace, match="65535 namespaces"):
                s.put_bytes(b"one-too-many", b"k", b"y" * 100)
        assert s.arena.used_bytes == used and s.index.get(b"one-too-many", b"k") is None
    finally:
        s.close()


def test_flagging_an_entry_of_another_index_is_refused_and_counts_stay_exact():
    """Before: the other index's record was flagged without being counted there, so its
    later removal took its unverified count below zero (a u64 wrap to 2**64 - 1)."""
    a, b = PackedIndex(), PackedIndex()
    e = entry(b"n", b"k")
    a.insert(e)
    for call in (b.mark_unverified, b.verify):
        with pytest.raises(ValueError, match="another index"):
            call(e)
    assert not e.unverified
    a.mark_unverified(e)
    a.remove(e)
    assert a.unverified == 0 and b.unverified == 0


def test_nvme_locations_on_a_big_drive_pack_once_the_geometry_is_known():
    """Default 128 MiB regions: a drive past 8 TiB has regions numbered past 65535, and
    absolute offsets pass 16 TiB on a 30 TB drive; before, each such object kept its
    Location in a side dict (a dict entry and an object per object)."""
    from kvstored.engine.nvmeformat import DATA_START
    region = 128 << 20
    ix = PackedIndex()
    ix.use_nvme_geometry(DATA_START, region)
    locs = []
    for i, reg in enumerate((0, 65534, 65535, 200000, 240000)):  # 240000 regions: 30 TiB
        e = entry(b"n", b"k%d" % i, size=5000)
        ix.insert(e)
        loc = Location(reg, DATA_START + reg * region + 4096 * (i * 1000 + 1), 5000, 0x1234, 7 + i)
        e.nvme = loc
        locs.append(loc)
    del e
    assert ix.footprint()["nvme_side"] == 0
    for i, loc in enumerate(locs):
        assert ix.get(b"n", b"k%d" % i).nvme == loc
    # a Location outside its region (none the tier makes) is still kept exactly
    odd = Location(3, DATA_START + 5 * region, 5000, 0x1234, 1)
    e = ix.get(b"n", b"k0")
    e.nvme = odd
    assert e.nvme == odd and ix.footprint()["nvme_side"] == 1
    with pytest.raises(ValueError, match="cannot change"):
        ix.use_nvme_geometry(DATA_START, 64 << 20)
    ix.use_nvme_geometry(DATA_START, region)  # the same again: fine
    with pytest.raises(ValueError, match="4 KiB multiples"):
        PackedIndex().use_nvme_geometry(DATA_START, 512 << 20)
    DictIndex().use_nvme_geometry(DATA_START, region)  # the dict index takes the call too


# ------------------------------------------- the eviction lists' victim callable
@pytest.mark.parametrize("drop", ["other-candidate", "own-record"])
def test_a_victim_test_that_drops_a_listed_record_is_a_runtime_error(drop):
    """Lru.victim(sc, evictable) runs Python per tail record; one that unlinks and frees
    a record the walk holds (PROBATION's candidate while PROTECTED's tail is tested, or
    the record under test itself) is refused. Before, the age comparison read the freed
    record's DRAM part: a null pointer (SIGSEGV; found under ASan/UBSan)."""
    from kvstored.engine.eviction import NativePolicy
    ix = PackedIndex()
    pol = NativePolicy(1, ix)
    for i, k in enumerate((b"a", b"b")):
        ix.insert(entry(b"ns", k, offset=4096 * i))
        pol.insert(ix.get(b"ns", k))
    pol.touch(ix.get(b"ns", b"b"))  # a: PROBATION, b: PROTECTED
    victim = b"a" if drop == "other-candidate" else b"b"

    def evictable(e):
        if e.key == b"b":  # PROTECTED's tail is tested after PROBATION's
            x = ix.get(b"ns", victim)
            pol.remove(x)
            ix.remove(x)  # its last view goes below: the record is freed
        return True

    with pytest.raises(RuntimeError, match="changed the eviction lists"):
        pol.victim(0, evictable)
    assert pol.resident == 1 and len(ix) == 1
    assert pol.victim(0, lambda e: True) is not None  # the lists are whole


def test_a_pin_count_whose_truth_test_grows_the_index_is_written_to_the_record_it_belongs_to():
    """Entry.pins takes an int subclass: its __bool__ runs while the setter decides whether
    the pin record goes. Here it grows the record array (realloc); before, the setter then
    cleared the flag through a pointer into the freed array (heap-use-after-free under
    ASan; unseen in a normal build). The pin record is dropped and the flag follows."""
    ix = PackedIndex()
    e = entry(b"ns", b"pinned")
    ix.insert(e)

    class Zero(int):
        calls = 0

        def __bool__(self):
            Zero.calls += 1
            if Zero.calls == 2:  # the setter's test of the stored count
                for i in range(3000):
                    ix.add(b"ns", b"k%d" % i, -1, 1, 1, SC, 0.0)
            return False

    e.pins = 1
    e.pins = Zero(0)
    assert Zero.calls >= 2 and len(ix) == 3001
    assert e.pins == 0 and not e.pinned(0.0)
    e.pin_until = 5.0  # a fresh pin record works as before
    assert e.pin_until == 5.0 and e.pins == 0
    e.pin_until = 0.0
    assert e.pin_until == 0.0


@pytest.mark.parametrize("seed", [3, 11])
def test_store_like_interleavings_and_refused_misuse_keep_index_and_lists_whole(seed, young_heap):
    """One short round of scripts/stress_index.py (scripts/sanitize.sh runs it for a minute
    under ASan/UBSan): puts, evictions (dropped, or demoted with the key shed), promotions,
    deletes, touches by entry and by key, present/prefix, pins and readers, calls that must
    be refused (a linked entry's key shed, an entry inserted twice), views held and dropped
    in random order, narrow fingerprints; the index, the lists and a model agree."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "scripts" / "stress_index.py"
    spec = importlib.util.spec_from_file_location("stress_index", path)
    stress = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stress)
    stress.Round(random.Random(seed)).run(1500)
    stress.ghost_stress(random.Random(seed), 1500)


def test_a_key_loader_that_unlinks_the_entry_being_evicted_leaves_the_lists_whole():
    """Lru.remove(e, evicted=True) reads a keyless entry's key through the key loader
    (Python) for the ghost's digest; it reads e's list after that. Before, the list read
    first was stale when the loader had unlinked e: it was unlinked twice through its
    freed DRAM part (SIGSEGV). The Store's loader reads NVMe and does not do this."""
    from kvstored.engine.eviction import NONE, NativePolicy
    ix = PackedIndex()
    pol = NativePolicy(1, ix)
    keep = entry(b"ns", b"keep", offset=4096)
    ix.insert(keep)
    pol.insert(keep)
    e = entry(b"ns", b"keyless")
    ix.insert(e)
    e.nvme = Location(1, 40960, 100, 0x1234, 3)
    ix.shed_key(e)
    pol.insert_loaded(e)  # keyless and linked (the Store restores the key first)

    def loader(x):
        pol.remove(x)  # Python code in the middle of remove(evicted=True)
        return b"keyless"

    ix.set_key_loader(loader)
    pol.remove(e, evicted=True)
    assert e.seg == NONE and pol.resident == 1 and pol.count(0) == 1
    assert pol.order(0, keep.seg) == [keep] and pol.in_ghost(b"ns", b"keyless") is not None


# ------------------------------------------ a failed allocation leaves the record as it was
@pytest.fixture
def fail_allocs():
    """kvstored._index._fail_allocs(n, after=0): past the next ``after`` side-table
    allocations, n fail (the test hook; always ended, so no other test meets a failure)."""
    yield _index._fail_allocs
    _index._fail_allocs(0)


def unpacked(i: int = 0) -> Location:
    """A Location that does not pack (its offset is not 4 KiB aligned): the nvside dict."""
    return Location(1, (20 + i) * 4096 + 512, 100, 0x1234, 3)


def test_a_failed_nvme_store_keeps_the_old_location_in_the_side_dict(fail_allocs):
    """Entry.nvme = a new location that packs, on a keyless record in its DRAM form (its
    packed location goes in the aside table, whose first entry allocates), when the old
    location is the side dict's. Before, the old one was dropped first: the failed
    allocation left the entry with no NVMe location (an object only on NVMe lost)."""
    ix = PackedIndex()
    e = entry(b"ns", b"nv")
    ix.insert(e)
    e.nvme = unpacked()
    ix.shed_key(e)
    e.reads = 1  # a DRAM field set: the record takes its DRAM form
    assert ix.footprint()["nvme_aside"] == 0 and e.nvme == unpacked()
    fail_allocs(1)
    with pytest.raises(MemoryError):
        e.nvme = Location(2, 40960, 100, 0x1234, 4)
    assert e.nvme == unpacked() and ix.footprint()["nvme_aside"] == 0
    e.nvme = Location(2, 40960, 100, 0x1234, 4)  # with memory: stored, the old one gone
    assert e.nvme == Location(2, 40960, 100, 0x1234, 4) and ix.footprint()["nvme_aside"] == 1
    e.nvme = unpacked(1)  # and back to the side dict: the aside entry goes
    assert e.nvme == unpacked(1) and ix.footprint()["nvme_aside"] == 0
    e.reads = 0  # back to its NVMe form
    assert ix.get(b"ns", b"nv") is e and e.nvme == unpacked(1) and not e.key_in_ram


def test_a_failed_nvme_store_keeps_the_old_packed_location(fail_allocs):
    """Entry.nvme = a location that does not pack (the side dict's insert fails): the
    entry keeps its packed one; before, it was cleared first and the entry read None."""
    ix = PackedIndex()
    e = entry(b"ns", b"nv")
    ix.insert(e)
    e.nvme = Location(1, 40960, 100, 0x1234, 3)
    fail_allocs(1)
    with pytest.raises(MemoryError):
        e.nvme = unpacked()
    assert e.nvme == Location(1, 40960, 100, 0x1234, 3)
    e.nvme = unpacked()
    assert e.nvme == unpacked()
    fail_allocs(1)
    with pytest.raises(MemoryError):
        e.nvme = unpacked(1)  # one side dict Location for another
    assert e.nvme == unpacked()
    e.nvme = None
    assert e.nvme is None


def test_a_failed_offset_store_keeps_the_old_offset_and_its_slot(fail_allocs):
    """Entry.offset = an offset that does not pack (the wide dict's insert fails): the
    old offset and its slot stay; before, the old wide offset was dropped first (the
    entry read offset -1 with a DRAM copy) and the old slot emptied."""
    ix = PackedIndex(1 << 20)
    e = entry(b"ns", b"off", offset=4096)
    ix.insert(e)
    ix.place(e)
    fail_allocs(1)
    with pytest.raises(MemoryError):
        e.offset = 4096 + 1  # not a multiple of 64: the wide dict
    assert e.offset == 4096 and ix.at(4096) is e
    e.offset = 100
    assert e.offset == 100 and ix.footprint()["wide_offsets"] == 1
    fail_allocs(1)
    with pytest.raises(MemoryError):
        e.offset = 200
    assert e.offset == 100 and ix.footprint()["wide_offsets"] == 1
    e.offset = 8192
    assert e.offset == 8192 and ix.footprint()["wide_offsets"] == 0


def test_fail_allocs_takes_a_count():
    with pytest.raises(ValueError, match=">= 0"):
        _index._fail_allocs(-1)
    with pytest.raises(ValueError, match=">= 0"):
        _index._fail_allocs(1, -1)
    with pytest.raises(TypeError):
        _index._fail_allocs("1")
    with pytest.raises(TypeError):
        _index._fail_allocs()


def test_a_failed_promotion_to_a_wide_offset_drops_its_wide_entry(fail_allocs):
    """Entry.offset = an offset that does not pack, on a keyless NVMe-only record: the
    wide dict's insert passes, then its DRAM form's (the packed NVMe location goes in the
    aside table, whose first entry allocates) fails. The insert is undone: the entry is
    NVMe-only as before, and no wide entry is left behind (after=1: the second
    allocation of the call is the one that fails)."""
    ix = PackedIndex(1 << 20)
    loc = Location(1, 40960, 100, 0x1234, 3)
    ix.add(b"ns", b"kl", -1, 100, 0x1234, SC, 0.0, nvme=loc, keyless=True)
    e = ix.get(b"ns", b"kl")
    assert not e.key_in_ram and ix.footprint()["nvme_aside"] == 0
    fail_allocs(1, 1)
    with pytest.raises(MemoryError):
        e.offset = 4096 + 8
    fp = ix.footprint()
    assert e.offset == -1 and e.nvme == loc and (fp["wide_offsets"], fp["nvme_aside"]) == (0, 0)
    e.offset = 4096 + 8  # with memory: both stored
    fp = ix.footprint()
    assert e.offset == 4104 and e.nvme == loc and (fp["wide_offsets"], fp["nvme_aside"]) == (1, 1)
    e.offset = -1  # NVMe-only again: its DRAM form and both side entries go
    fp = ix.footprint()
    assert e.nvme == loc and (fp["wide_offsets"], fp["nvme_aside"]) == (0, 0)
    assert ix.get(b"ns", b"kl") is e and not e.key_in_ram


def test_a_failed_insert_or_add_indexes_nothing(fail_allocs):
    """A side-table allocation that fails inside insert / add (recovery's add of a keyless
    record whose location does not pack, an entry with readers, one with a wide offset)
    frees the new record whole: nothing indexed, the namespace gone, and the same call
    with memory stores it."""
    ix = PackedIndex(1 << 20)
    fail_allocs(1)
    with pytest.raises(MemoryError):
        ix.add(b"a", b"k", -1, 100, 0x1234, SC, 0.0, nvme=unpacked(), keyless=True)
    e = entry(b"b", b"k", offset=4096)
    e.refs = 2
    fail_allocs(1)
    with pytest.raises(MemoryError):
        ix.insert(e)
    w = entry(b"c", b"k", offset=4096 + 8)
    fail_allocs(1)
    with pytest.raises(MemoryError):
        ix.insert(w)
    fp = ix.footprint()
    assert len(ix) == 0 and ix.namespaces() == {} and e.record is None and w.record is None
    assert (fp["keyless"], fp["nvme_side"], fp["readers"], fp["wide_offsets"]) == (0, 0, 0, 0)
    ix.add(b"a", b"k", -1, 100, 0x1234, SC, 0.0, nvme=unpacked(), keyless=True)
    ix.insert(e)
    ix.insert(w)
    assert ix.get(b"a", b"k").nvme == unpacked() and not ix.get(b"a", b"k").key_in_ram
    assert ix.get(b"b", b"k") is e and e.refs == 2 and e.offset == 4096
    assert ix.get(b"c", b"k") is w and w.offset == 4104 and len(ix) == 3


@pytest.mark.parametrize("seed", range(3))
def test_random_setters_with_failing_allocations_leave_each_entry_as_it_was(fail_allocs, seed):
    """Random NVMe locations (packed, side dict, none), offsets (slot, wide, -1), read
    counts, readers, key sheds and restores and native-policy links, each call with
    0-2 side-table allocations failing (after 0-2 that pass): a call that raises
    MemoryError leaves every field as it was, one that returns has stored its value,
    and the side tables' sizes match the entries' state (no entry left behind, none
    lost) after each call."""
    from kvstored.engine.eviction import COLD, PROBATION, PROTECTED, NativePolicy
    rng = random.Random(seed)
    ix = PackedIndex(1 << 20)
    pol = NativePolicy(1, ix)

    def packed(i: int) -> Location:
        return Location(1, (40 + i) * 4096, 100, 0x1234, i)

    n = 10
    es, model = [], []
    for i in range(n):
        e = entry(b"ns", b"k%d" % i)
        ix.insert(e)
        e.nvme = packed(i)
        es.append(e)
        model.append(dict(nvme=packed(i), off=-1, reads=0, refs=0, keyless=False, slot=None,
                          linked=False))
    raised = 0
    for step in range(1500):
        i = rng.randrange(n)
        e, m = es[i], model[i]
        new = dict(m)
        op = rng.choice(["nvme", "nvme", "offset", "offset", "reads", "refs", "shed", "restore",
                         "link"])
        if op == "nvme":
            v = rng.choice([None, packed(rng.randrange(50)), unpacked(rng.randrange(50))])
            if v is None and m["keyless"] and m["off"] < 0:
                continue  # the key would be nowhere (a keyless record needs its location)
            new["nvme"] = v
            call = lambda: setattr(e, "nvme", v)  # noqa: E731
        elif op == "offset":
            kind = rng.choice(["none", "slot", "wide"])
            off = (2 * i + rng.randrange(2)) * 4096 + (8 if kind == "wide" else 0)
            off = -1 if kind == "none" else off
            if off < 0 and m["keyless"] and m["nvme"] is None:
                continue
            new["off"] = off
            new["slot"] = off if kind == "slot" else None if m["slot"] != off else m["slot"]

            def call(e=e, off=off, kind=kind):
                e.offset = off
                if kind == "slot":
                    ix.place(e)
        elif op == "reads":
            new["reads"] = r = rng.randrange(2)
            call = lambda: setattr(e, "reads", r)  # noqa: E731
        elif op == "refs":
            new["refs"] = r = rng.randrange(3)
            call = lambda: setattr(e, "refs", r)  # noqa: E731
        elif op == "shed":
            if m["keyless"] or m["off"] >= 0 or m["nvme"] is None or m["linked"]:
                continue
            new["keyless"], new["reads"] = True, 0
            call = lambda: ix.shed_key(e)  # noqa: E731
        elif op == "restore":
            if not m["keyless"]:
                continue
            new["keyless"] = False
            call = lambda: ix.restore_key(e, b"k%d" % i)  # noqa: E731
        else:
            if not m["linked"] and m["off"] < 0:
                continue  # the Store links DRAM entries only
            new["linked"] = not m["linked"]
            call = pol.remove if m["linked"] else pol.insert
            call = (lambda f: lambda: f(e))(call)
        fail_allocs(rng.choice([0, 1, 1, 2]), rng.randrange(3))
        try:
            call()
            model[i] = new
        except MemoryError:
            raised += 1
        finally:
            fail_allocs(0)
        wide = side = aside = 0
        for ej, mj in zip(es, model):
            got = (ej.nvme, ej.offset, ej.reads, ej.refs, not ej.key_in_ram, ej.seg >= 0)
            assert got == (mj["nvme"], mj["off"], mj["reads"], mj["refs"], mj["keyless"],
                           mj["linked"]), (step, op)
            if mj["slot"] is not None:
                assert ix.at(mj["slot"]) is ej, (step, op)
            wide += mj["off"] >= 0 and mj["off"] % 64 != 0
            side += mj["nvme"] is not None and mj["nvme"].offset % 4096 != 0
            # a keyless record with DRAM fields keeps its packed location aside
            aside += (mj["keyless"] and mj["nvme"] is not None and mj["nvme"].offset % 4096 == 0
                      and (mj["off"] >= 0 or mj["reads"] or mj["linked"] or ej.stamp != 0))
        fp = ix.footprint()
        sides = (fp["wide_offsets"], fp["nvme_side"], fp["nvme_aside"])
        assert sides == (wide, side, aside), (step, op)
        assert fp["readers"] == sum(1 for mj in model if mj["refs"])
        linked = {id(ej) for ej, mj in zip(es, model) if mj["linked"]}
        assert pol.resident == len(linked)
        assert {id(x) for seg in (PROBATION, PROTECTED, COLD) for x in pol.order(0, seg)} == linked
    assert raised >= 20, raised  # the failures were met


# ------------------------------------------ Entry.seg under the native eviction policy
def test_entry_seg_and_links_are_refused_while_the_native_policy_owns_them():
    """While an Lru lives over the index, its lists own seg and the links: a Python write
    of either is a ValueError unless it changes nothing. Before, seg = 0 on an entry the
    Lru never linked (or had unlinked) passed; its remove then unlinked it from a list it
    was not in: the list's head and tail went (order() empty, victim() None) and its
    count fell below its members. With no Lru, the Python Policy writes them as before."""
    from kvstored.engine.eviction import NONE, PROBATION, PROTECTED, NativePolicy, Policy
    ix = PackedIndex(1 << 20)
    pol = NativePolicy(1, ix)
    a, b, c = (entry(b"ns", k, offset=o) for k, o in ((b"a", 4096), (b"b", 8192), (b"c", 12288)))
    for e in (a, b, c):
        ix.insert(e)
    pol.insert(a)
    pol.insert(b)
    with pytest.raises(ValueError, match="native eviction policy"):
        c.seg = PROBATION  # never linked
    assert c.seg == NONE
    pol.remove(c)  # not linked: nothing happens
    assert pol.count(0) == pol.resident == 2 and pol.order(0, PROBATION) == [b, a]
    assert pol.victim(0, 0.0) is a
    with pytest.raises(ValueError, match="native eviction policy"):
        b.seg = PROTECTED  # linked: moving it is the Lru's (touch)
    with pytest.raises(ValueError, match="native eviction policy"):
        b.older = None
    b.seg, b.older, c.seg = PROBATION, a, NONE  # writes that change nothing pass
    pol.remove(a)
    with pytest.raises(ValueError, match="native eviction policy"):
        a.seg = PROBATION  # unlinked already
    assert pol.count(0) == pol.resident == 1 and pol.order(0, PROBATION) == [b]
    d = entry(b"ns", b"d", offset=16384)
    d.seg = PROTECTED  # a detached entry's field: insert puts it in no list
    ix.insert(d)
    assert d.seg == NONE
    pol.insert(d)
    pol.insert(c)
    assert pol.count(0) == pol.resident == 3 and pol.order(0, PROBATION) == [c, d, b]
    for e in (b, c, d):
        pol.remove(e)
    del pol
    gc.collect()
    py = Policy(1)  # the Python policy over the packed index's entries: its own lists
    py.insert(a)
    assert a.seg == PROBATION and py.queues[0].lists[PROBATION].head is a
    py.remove(a)
    assert a.seg == NONE


def test_order_under_a_collection_that_unlinks_the_next_entry_never_reads_a_freed_record():
    """Lru.order (the eviction list's entries, for tests and tools) makes a view per record;
    a view's allocation may run a collection whose Python unlinks and frees the record
    after it (here a gc callback: the policy's remove, the index's remove, then inserts
    that reuse the freed records). order() read each record's link before making its view
    and followed it after: a freed record's link, whose DRAM form had gone, pointed
    anywhere (stress_index under ASan: a SEGV in Lru_order). It now reads the list before
    any Python runs and answers only entries still in it, or a RuntimeError."""
    from kvstored.engine.eviction import NativePolicy

    sc = SizeClass(0, 4096, 1 << 16)
    ran = 0
    for attempt in range(12):
        ix = PackedIndex(1 << 12)
        pol = NativePolicy(1, ix, ghost="native", parent_limit=8, hint_limit=8)
        keys = [b"k%d" % i for i in range(6)]
        for i, k in enumerate(keys):
            e = Entry(b"ns", k, i * 4096, 100, i, sc)
            ix.insert(e)
            ix.place(e)
            pol.insert(e)
        del e  # no view held: order() makes each one
        state = {"armed": True, "n": 0, "seen": 0}

        def unlink_next():
            # the collections run at each GC allocation: the nth one lands on the nth
            # view order() makes (the first ones run before it walks)
            state["seen"] += 1
            if not state["armed"] or state["seen"] < 2 + attempt % 6:
                return
            state["armed"] = False
            for k in keys[:attempt % 6] + keys[attempt % 6 + 1:]:  # all but one, whichever
                x = ix.get(b"ns", k)  # (order() was making a view of) are freed on return
                if x is not None:
                    pol.remove(x, evicted=True)
                    ix.displace(x)
                    ix.remove(x)
            for j in range(3 if attempt >= 6 else 0):  # reuse the freed records (at the head)
                y = Entry(b"ns", b"new%d-%d" % (attempt, j), (100 + j) * 4096, 100, j, sc)
                ix.insert(y)
                ix.place(y)
                pol.insert(y)
            state["n"] += 1

        try:
            got = collecting_during(lambda: pol.order(0, 0), unlink_next)
        except RuntimeError as err:  # the list changed under it: said, nothing read
            assert "changed" in str(err) or "index" in str(err), err
            got = []
        ran += state["n"]
        for x in got:  # only entries in the list now, each once
            assert ix.get(b"ns", x.key) is x and x.seg == 0
        assert len({x.key for x in got}) == len(got)
    assert ran, "no collection ran inside order()"


def test_a_failed_insert_on_a_ghost_hit_keeps_the_ghost_entry(fail_allocs):
    """Lru.insert of a keyless NVMe-form record that the ghost remembers: its push
    allocates (the record's DRAM form puts its packed location aside). Before, the
    ghost entry was popped (and the age bonus moved) before that allocation: its
    MemoryError lost what the ghost knew. Now the allocation comes first; a failure
    after it (a ghost whose pop raises) takes the record back to its NVMe form."""
    from kvstored.engine.eviction import NONE, PROTECTED, NativePolicy
    ix = PackedIndex()
    pol = NativePolicy(1, ix, ghost="native")
    loc = Location(1, 40960, 100, 0x1234, 3)
    e = entry(b"ns", b"k")
    ix.insert(e)
    e.nvme = loc
    pol.insert(e)
    pol.remove(e, evicted=True)
    origin = pol.in_ghost(b"ns", b"k")
    assert origin is not None
    ix.shed_key(e)  # keyless, NVMe form: no DRAM fields, nothing aside
    bonus = pol.age_bonus
    assert ix.footprint()["nvme_aside"] == 0
    fail_allocs(1)
    with pytest.raises(MemoryError):
        pol.insert(e)
    assert pol.in_ghost(b"ns", b"k") == origin and pol.age_bonus == bonus
    assert pol.counters["ghost_hits"] == 0 and pol.resident == 0 and e.seg == NONE
    assert e.nvme == loc and ix.footprint()["nvme_aside"] == 0

    class Refusing:  # a ghost whose pop fails once the record has its DRAM form
        def pop(self, digest):
            raise RuntimeError("ghost unavailable")

    real = pol.ghost
    pol.ghost = Refusing()
    with pytest.raises(RuntimeError, match="ghost unavailable"):
        pol.insert(e)
    assert e.seg == NONE and e.nvme == loc and ix.footprint()["nvme_aside"] == 0
    pol.ghost = real
    pol.insert(e)  # with memory: the ghost hit, as it would have been
    assert e.seg == PROTECTED and pol.counters["ghost_hits"] == 1
    assert pol.in_ghost(b"ns", b"k") is None and e.nvme == loc
    assert ix.get(b"ns", b"k") is e
