"""A put's index lookups (issues 11, 13): reserve looks the key up once, commit of a new key
not at all (the insert refuses a taken key), and every race between reserve and commit still
resolves as before -- dedup, Conflict, overwrite, an unverified record replaced -- on both
indexes, with no slot leaked. No sockets."""
import pytest

from kvstore.errors import ChecksumMismatch, Conflict, NoSpace
from kvstore.wire import checksum
from kvstored.engine import entries, store as store_mod
from kvstored.engine.store import Store, StoreLimits

MiB = 1 << 20
NS = b"ns"
KINDS = ["dict"] + (["packed"] if entries.make_index("auto").kind == "packed" else [])


def counting(kind):
    """An index of ``kind`` that counts its ``get`` calls."""
    base = type(entries.make_index(kind))

    class Counting(base):
        __slots__ = ("gets",)

        def get(self, ns, key):
            self.gets += 1
            return super().get(ns, key)

    def make(_kind, slab_size):
        ix = Counting(slab_size)
        ix.gets = 0
        return ix
    return make


@pytest.fixture(params=KINDS)
def store(request, monkeypatch):
    monkeypatch.setattr(store_mod, "make_index", counting(request.param))
    s = Store(StoreLimits(dram_size=4 * MiB, slab_size=MiB, max_value_size=MiB,
                          hugepages=False, prefault=False))
    return s


def test_new_key_put_is_one_lookup(store):
    data = b"a" * 1000
    gets = store.index.gets
    assert store.put_bytes(NS, b"k", data) is True
    assert store.index.gets - gets == 1  # reserve's; commit inserted without one
    gets = store.index.gets
    assert store.put_bytes(NS, b"k", data) is False  # dedup: answered by reserve's lookup
    assert store.index.gets - gets == 1
    assert store.counters["dedups"] == 1 and store.counters["puts"] == 1
    with pytest.raises(Conflict):
        store.put_bytes(NS, b"k", b"b" * 1000)
    e = store.index.get(NS, b"k")
    assert bytes(store.arena.view[e.offset:e.offset + e.size]) == data


def test_overwrite_looks_up_once_in_commit_and_inserts_a_free_key(store):
    gets = store.index.gets
    assert store.put_bytes(NS, b"o", b"1" * 100, overwrite=True) is True  # key was free
    assert store.index.gets - gets == 2  # reserve's and commit's (an overwrite looks first)
    gets = store.index.gets
    assert store.put_bytes(NS, b"o", b"2" * 100, overwrite=True) is True
    assert store.index.gets - gets == 2
    e = store.index.get(NS, b"o")
    assert e.checksum == checksum(b"2" * 100) and len(store.index) == 1
    assert store.dram.objects == 1 and store.counters["puts"] == 2


def _race(store, first: bytes, second: bytes, overwrite=False):
    """Reserve ``second`` under a free key, commit ``first`` there meanwhile, then commit."""
    res = store.reserve(NS, b"r", len(second), checksum(second), overwrite)
    assert res is not None
    assert store.put_bytes(NS, b"r", first) is True
    res.view[:] = second
    return store.commit(res)


def test_race_identical_put_dedups_and_frees_the_slot(store):
    reserved0 = store.reserved_bytes
    assert _race(store, b"x" * 500, b"x" * 500) is False
    assert store.counters["dedups"] == 1 and store.counters["puts"] == 1
    assert store.reserved_bytes == reserved0 and len(store.index) == 1
    assert store.dram.objects == 1


def test_race_different_bytes_conflicts(store):
    with pytest.raises(Conflict):
        _race(store, b"x" * 500, b"y" * 500)
    e = store.index.get(NS, b"r")
    assert e.checksum == checksum(b"x" * 500) and store.counters["conflicts"] == 1
    assert store.dram.objects == 1


def test_race_overwrite_replaces(store):
    assert _race(store, b"x" * 500, b"y" * 700, overwrite=True) is True
    e = store.index.get(NS, b"r")
    assert e.size == 700 and e.checksum == checksum(b"y" * 700)
    assert len(store.index) == 1 and store.dram.objects == 1


def test_race_unverified_record_is_replaced(store):
    store.put_bytes(NS, b"u", b"x" * 300)
    res = store.reserve(NS, b"u", 400, checksum(b"z" * 400), True)
    store.index.mark_unverified(store.index.get(NS, b"u"))
    res.view[:] = b"z" * 400
    assert store.commit(res) is True
    e = store.index.get(NS, b"u")
    assert e.size == 400 and not e.unverified and store.unverified == 0


def test_overwrite_of_a_key_deleted_meanwhile_inserts(store):
    store.put_bytes(NS, b"d", b"x" * 300)
    res = store.reserve(NS, b"d", 300, checksum(b"w" * 300), True)
    assert store.delete(NS, [b"d"]) == 1
    res.view[:] = b"w" * 300
    assert store.commit(res) is True
    assert store.index.get(NS, b"d").checksum == checksum(b"w" * 300)


def test_shm_style_commit_without_checksum_dedups(store):
    store.put_bytes(NS, b"s", b"q" * 256)
    res = store.reserve(NS, b"s", 256, None)  # the writer fills in place; commit decides
    res.view[:] = b"q" * 256
    assert store.commit(res) is False
    res = store.reserve(NS, b"s", 256, None)
    res.view[:] = b"p" * 256
    with pytest.raises(Conflict):
        store.commit(res)
    assert store.dram.objects == 1 and store.reserved_bytes == 0


def test_bad_checksum_stores_nothing(store):
    res = store.reserve(NS, b"c", 100, 12345)
    res.view[:] = b"c" * 100
    with pytest.raises(ChecksumMismatch):
        store.commit(res)
    assert store.index.get(NS, b"c") is None and store.dram.objects == 0


def test_failed_insert_frees_the_slot(store, monkeypatch):
    """An insert that fails for another reason than a taken key (e.g. IndexFull) leaks no slot."""
    before = store.dram.objects
    res = store.reserve(NS, b"f", 100, checksum(b"f" * 100))
    res.view[:] = b"f" * 100
    cls = type(store.index)
    real = cls.insert

    def full(self, e):
        raise NoSpace("index full (test)")
    monkeypatch.setattr(cls, "insert", full)
    with pytest.raises(NoSpace):
        store.commit(res)
    monkeypatch.setattr(cls, "insert", real)
    assert store.index.get(NS, b"f") is None and store.dram.objects == before
    assert store.reserved_bytes == 0
    assert store.put_bytes(NS, b"f", b"f" * 100) is True  # the slot is usable again


def test_many_interleaved_reservations_of_one_key(store):
    """Eight concurrent puts of one key (four same bytes, four different): exactly one
    stores, the identical ones dedup, the others conflict; no reservation is left."""
    same, other = b"s" * 1000, b"o" * 1000
    rs = [(store.reserve(NS, b"m", 1000, checksum(d)), d) for d in [same, other] * 4]
    outcomes = []
    for res, d in rs:
        res.view[:] = d
        try:
            outcomes.append(store.commit(res))
        except Conflict:
            outcomes.append("conflict")
    assert outcomes == [True, "conflict", False, "conflict", False, "conflict", False,
                        "conflict"]
    assert store.reserved_bytes == 0 and store.dram.objects == 1 and not store.reservations
