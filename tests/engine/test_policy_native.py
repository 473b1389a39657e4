"""The eviction lists in C (eviction.NativePolicy over kvstored._index.Lru) against the
Python Policy: workloads replayed through a Store with each must evict the same keys in
the same order, hit the same and leave the same lists; and the native calls' own
contract (typed errors, views that stay current, records kept while linked)."""
from __future__ import annotations

import gc
import importlib.util
import os
import random

import pytest

from kvstore.errors import NoSpace
from kvstored.engine import Store, StoreLimits
from kvstored.engine.entries import INDEX_ENV
from kvstored.engine.eviction import (COLD, NONE, PROBATION, PROTECTED, DictGhost, NativePolicy,
                                      Policy, make_policy)

from test_ghost import _trace_sim  # the benchmark's trace replay (benchmarks/trace_sim.py)

HAVE_NATIVE = importlib.util.find_spec("kvstored._index") is not None
pytestmark = pytest.mark.skipif(not HAVE_NATIVE, reason="kvstored._index is not built")
TRACE = os.environ.get("KVSTORE_TRACE", "/work/shared/traces/mooncake_conversation_trace.jsonl")
KiB = 1 << 10
NS = b"ns"
# (index, policy): the dict index has only the Python policy
CONFIGS = [("dict", "python"), ("packed", "python"), ("packed", "native")]


@pytest.fixture(autouse=True)
def index_kind(monkeypatch):
    """Overrides the engine conftest's parametrisation: each test picks its indexes."""
    monkeypatch.delenv(INDEX_ENV, raising=False)


def make_store(monkeypatch, index: str, policy: str, dram: int) -> Store:
    monkeypatch.setenv(INDEX_ENV, index)
    s = Store(StoreLimits(dram_size=dram, slab_size=64 * KiB, max_value_size=64 * KiB,
                          hugepages=False, prefault=False, put_wait_timeout=0.0,
                          high_watermark=1.0, low_watermark=1.0))
    assert isinstance(s.policy, NativePolicy) == (index == "packed")
    if policy == "python" and index == "packed":  # before any put: nothing is linked yet
        s.dram.policy = s.policy = Policy(len(s.arena.classes))
    if policy == "native-dict-ghost":  # the Lru calls a Python ghost's methods
        s.policy.ghost = DictGhost()
    return s


def lists_of(p, nclasses: int) -> list:
    """Every list's keys, newest first."""
    out = []
    for c in range(nclasses):
        for seg in (PROBATION, PROTECTED, COLD):
            if isinstance(p, NativePolicy):
                out.append([e.key for e in p.order(c, seg)])
            else:
                keys, e = [], p.queues[c].lists[seg].head
                while e is not None:
                    keys.append(e.key)
                    e = e.older
                out.append(keys)
    return out


def replay(monkeypatch, index: str, policy: str, reqs: list, dram: int, extras: bool,
           seed: int = 5) -> dict:
    """Each request a chain of block ids, as an inference engine drives the store: look
    the chain up, read the hit prefix, put the rest (a stored block again is a dedup, an
    access). ``extras``: also pins, readers held across requests, exists, deletes and
    blocks of a second size class. Returns every decision."""
    rnd = random.Random(seed)
    s = make_store(monkeypatch, index, policy, dram)
    victims: list = []
    evict = s.dram.evict

    def recording_evict(e):
        victims.append(e.key)
        return evict(e)

    s.dram.evict = recording_evict
    hits, refused = [], 0
    held: list = []  # readers holding entries across requests
    pinned: list = []
    recent: list = []  # keys put, oldest first
    try:
        for i, chain in enumerate(reqs):
            keys = [b"b%d" % b for b in chain]
            n = s.lookup(NS, keys)
            hits.append(n)
            for k in keys[:n]:
                e = s.acquire(NS, k)
                if extras and rnd.random() < 0.02:
                    held.append(e)
                else:
                    s.release(e)
            for k, b in zip(keys[n:], chain[n:]):
                size = 3 * KiB if extras and b % 5 == 0 else KiB
                try:
                    s.put_bytes(NS, k, bytes([b % 251]) * size)
                except NoSpace:
                    refused += 1
            if not extras:
                continue
            if rnd.random() < 0.05:
                ks = rnd.sample(keys, min(3, len(keys)))
                s.pin(NS, ks, ttl=600)
                pinned.append(ks)
            if pinned and rnd.random() < 0.05:
                s.unpin(NS, pinned.pop(0))
            if held and rnd.random() < 0.3:
                s.release(held.pop(0))
            if rnd.random() < 0.1:
                hits.append(sum(s.exists(NS, rnd.sample(keys, min(4, len(keys))))))
            if rnd.random() < 0.03:
                s.delete(NS, [rnd.choice(keys)])
            recent.extend(keys[n:])
            if i % 40 == 39:  # batch calls of several steps: the earlier steps touched by key
                hits.append(sum(s.exists(NS, recent[-300:])))
                hits.append(s.lookup(NS, recent[-300:]))
        p = s.policy
        return {"victims": victims, "hits": hits, "refused": refused,
                "counters": dict(p.counters), "age_bonus": p.age_bonus, "clock": p.clock,
                "resident": p.resident, "ghost": p.ghost.counts,
                "lists": lists_of(p, len(s.arena.classes)),
                "store": {k: s.counters[k] for k in ("hits", "misses", "evictions", "dedups")}}
    finally:
        for e in held:
            s.release(e)
        s.close()


@pytest.mark.parametrize("source", ["mooncake", "synthetic"])
def test_trace_replay_decides_the_same_with_the_lists_in_c(monkeypatch, source):
    ts = _trace_sim()
    if source == "mooncake":
        if not os.path.exists(TRACE):
            pytest.skip(f"no trace at {TRACE}")
        reqs = ts.load_trace(TRACE, limit=600)
    else:
        reqs = ts.synthetic_trace(n=300, seed=4)
    # about 10 % of the unique blocks (1 KiB slots, 64 KiB slabs)
    dram = max(4, ts.unique_blocks(reqs) // 10 // 64) * 64 * KiB
    out = [replay(monkeypatch, i, p, reqs, dram, extras=False) for i, p in CONFIGS]
    assert len(out[0]["victims"]) > 1000 and out[0]["counters"]["ghost_hits"] > 0
    assert sum(out[0]["hits"]) > 0
    for o in out[1:]:
        assert o == out[0]


def test_synthetic_replay_with_pins_readers_deletes_and_two_classes(monkeypatch):
    ts = _trace_sim()
    reqs = ts.synthetic_trace(n=400, seed=9)
    configs = CONFIGS + [("packed", "native-dict-ghost")]
    out = [replay(monkeypatch, i, p, reqs, 512 * KiB, extras=True) for i, p in configs]
    a = out[0]
    assert len(a["victims"]) > 1000 and a["counters"]["ghost_hits"] > 0
    assert a["counters"]["cold_inserts"] > 0 and a["store"]["dedups"] > 0
    classes = [i // 3 for i, keys in enumerate(a["lists"]) if keys]
    assert len(set(classes)) == 2  # both sizes' classes hold entries
    for o in out[1:]:
        assert o == a


# ------------------------------------------------------------ the native calls
@pytest.fixture()
def store(monkeypatch):
    s = make_store(monkeypatch, "packed", "native", 256 * KiB)
    yield s
    s.close()


def sc(store) -> int:
    """The size class of the KiB objects these tests put."""
    return store.arena.class_for(KiB).index


def test_a_held_view_reads_what_the_c_lists_wrote(store):
    for i in range(4):
        store.put_bytes(NS, b"k%d" % i, bytes(KiB))
    e = store.index.get(NS, b"k1")
    assert e.seg == PROBATION
    before = e.stamp
    store.exists(NS, [b"k1"])
    assert e.seg == PROTECTED and e.stamp > before and e.newer is None
    p = store.policy
    assert [x.key for x in p.order(sc(store), PROTECTED)] == [b"k1"]
    assert [x.key for x in p.order(sc(store), PROBATION)] == [b"k3", b"k2", b"k0"]
    assert e.older is None and store.index.get(NS, b"k2").older is store.index.get(NS, b"k0")


def test_native_calls_refuse_what_is_not_theirs(store, monkeypatch):
    store.put_bytes(NS, b"a", bytes(KiB))
    p = store.policy
    e = store.index.get(NS, b"a")
    with pytest.raises(TypeError):
        p.touch(object())
    with pytest.raises(TypeError):
        p.touch_run([e, "x"])
    with pytest.raises(ValueError, match="already"):
        p.insert(e)
    with pytest.raises(ValueError, match="size class index"):
        p.victim(99, 0.0)
    with pytest.raises(ValueError, match="size class index"):
        p.count(-1)
    with pytest.raises(TypeError):
        p.victim(0, "soon")
    with pytest.raises(ValueError):
        p.age_bonus = -1.0
    with pytest.raises(TypeError):
        p.touch_keys(store.index, NS, [b"a", "b"])
    with pytest.raises(TypeError):
        p.touch_keys(object(), NS, [b"a"])
    p.touch_keys(store.index, b"other-ns", [b"a"])  # nothing there: nothing touched
    other = make_store(monkeypatch, "packed", "native", 256 * KiB)
    try:
        other.put_bytes(NS, b"a", bytes(KiB))
        with pytest.raises(KeyError, match="another index"):
            p.touch(other.index.get(NS, b"a"))
    finally:
        other.close()
    assert p.count(sc(store)) == 1 and p.resident == 1  # nothing changed by the refusals


def test_victim_skips_read_and_pinned_entries_and_takes_a_callable(store):
    for i in range(3):
        store.put_bytes(NS, b"k%d" % i, bytes(KiB))
    p, now, c = store.policy, store.clock(), sc(store)
    r = store.acquire(NS, b"k0")
    store.pin(NS, [b"k1"], ttl=60)
    v = p.victim(c, now)
    assert v.key == b"k2"
    p.remove(v)
    assert p.victim(c, now) is None  # one bounded pass, then None
    assert p.victim(c, now + 120).key == b"k1"  # the pin's lease is over by then
    store.release(r)
    assert p.victim(c, lambda e: e.key == b"k0").key == b"k0"
    assert p.victim(c, lambda e: False) is None
    assert p.count(c) == 2


def test_a_linked_record_outlives_its_views_until_unlinked(store):
    """The lists link records by number: a record removed from the index while still
    linked (no view left) must not be freed and reused under the list."""
    store.put_bytes(NS, b"a", bytes(KiB))
    store.put_bytes(NS, b"b", bytes(KiB))
    ix = store.index
    e = ix.get(NS, b"a")
    ix.remove(e)
    del e
    gc.collect()
    store.put_bytes(NS, b"c", bytes(KiB))  # would reuse a freed record
    keys = [x.key for x in store.policy.order(sc(store), PROBATION)]
    assert keys == [b"c", b"b", b"a"]
    e = store.policy.order(sc(store), PROBATION)[2]
    store.policy.remove(e, evicted=True)
    assert e.seg == NONE and store.policy.in_ghost(NS, b"a") == PROBATION
    del e
    gc.collect()
    assert [x.key for x in store.policy.order(sc(store), PROBATION)] == [b"c", b"b"]


def test_a_store_with_the_native_policy_is_collected(monkeypatch):
    """Store -> policy -> Lru -> index -> key loader (a Store method) is a cycle: the Lru
    takes part in the collector's walk, so the Store is freed."""
    import weakref
    s = make_store(monkeypatch, "packed", "native", 256 * KiB)
    s.put_bytes(NS, b"a", bytes(KiB))
    s.index.set_key_loader(s._nvme_key)
    ref = weakref.ref(s)
    s.close()
    del s
    gc.collect()
    assert ref() is None


def test_make_policy_picks_by_index_and_refuses_unknown_kinds(store):
    from kvstored.engine.packedindex import PackedIndex
    assert isinstance(make_policy(2, PackedIndex()), NativePolicy)  # (the store's has its own)
    assert type(make_policy(2, store.index, "python")) is Policy
    assert type(make_policy(2, object())) is Policy  # not the packed index
    with pytest.raises(ValueError, match="policy must be"):
        make_policy(2, store.index, "lru")
    with pytest.raises(ValueError, match="protected_share"):
        make_policy(2, store.index, protected_share=1.5)
    with pytest.raises(TypeError):
        NativePolicy(2, object())  # its lists link the packed index's records


def test_a_second_native_policy_over_one_index_is_refused(store):
    """An index's eviction lists are its records' own link fields: a second Lru over
    it would relink records in the first's lists (each list torn). While one lives,
    another is refused with ValueError, through make_policy or Lru itself; once it is
    gone, one can be made. Before, the second was built and both linked the records."""
    from kvstored._index import Ghost, Lru
    from kvstored.engine.packedindex import PackedIndex
    store.put_bytes(NS, b"a", bytes(KiB))
    with pytest.raises(ValueError, match="live Lru already"):
        make_policy(2, store.index)
    with pytest.raises(ValueError, match="live Lru already"):
        Lru(store.index, 2, Ghost(), {}, {}, {}, 0.5, 1.0, 8.0, 8.0, 64)
    store.put_bytes(NS, b"b", bytes(KiB))  # the first policy's lists are whole
    assert [e.key for e in store.policy.order(sc(store), PROBATION)] == [b"b", b"a"]
    ix = PackedIndex()
    first = NativePolicy(1, ix)
    with pytest.raises(ValueError, match="live Lru already"):
        NativePolicy(1, ix)
    del first
    gc.collect()
    assert NativePolicy(1, ix).resident == 0  # the first is gone: a new one over the index


@pytest.mark.parametrize("kind", ["dict", "packed"])
def test_present_and_prefix_answer_as_get_does(monkeypatch, kind):
    """Store.exists / lookup ask the index for a step's keys at once (the packed one in C,
    no view built): the same answers as get and the unverified flag."""
    s = make_store(monkeypatch, kind, "native" if kind == "packed" else "python", 256 * KiB)
    try:
        for k in (b"a", b"b", b"c"):
            s.put_bytes(NS, k, bytes(100))
        ix = s.index
        ix.mark_unverified(ix.get(NS, b"b"))
        keys = [b"a", b"b", b"c", b"zz", b"x" * 300, b"a"]
        assert ix.present(NS, keys) == [True, False, True, False, False, True]
        assert ix.present(b"no-such-ns", keys) == [False] * 6
        assert ix.prefix(NS, keys) == (1, 100)
        assert ix.prefix(NS, [b"c", b"a"]) == (2, 200)
        assert ix.prefix(NS, []) == (0, 0)
        assert s.exists(NS, keys) == [True, False, True, False, False, True]
        assert s.lookup(NS, [b"a", b"c", b"b"]) == 2
        assert ix.present(NS, (b"a", b"zz")) == ix.present(NS, iter([b"a", b"zz"])) == [True, False]
        # typed errors, the same from both indexes (the dict one said False for a str key)
        for bad_key in ("a", 1, bytearray(b"a"), memoryview(b"a"), None):
            with pytest.raises(TypeError, match="keys are bytes"):
                ix.present(NS, [b"a", bad_key])
            with pytest.raises(TypeError, match="keys are bytes"):
                ix.present(b"no-such-ns", [bad_key])
            with pytest.raises(TypeError, match="keys are bytes"):
                ix.prefix(NS, [b"a", bad_key])
            with pytest.raises(TypeError, match=r"get\(ns: bytes, key: bytes\)"):
                ix.get(NS, bad_key)
        assert ix.prefix(NS, [b"zz", "after the first miss"]) == (0, 0)  # not looked at
        with pytest.raises(TypeError, match="keys are bytes, not str"):
            ix.present(NS, "ab")  # a str is a sequence of str
        for call in (ix.present, ix.prefix):
            with pytest.raises(TypeError, match=r"\(ns: bytes, keys: list\)"):
                call("ns", [b"a"])
            with pytest.raises(TypeError):
                call(NS, None)
        with pytest.raises(TypeError, match=r"get\(ns: bytes, key: bytes\)"):
            ix.get("ns", b"a")
    finally:
        s.close()


def set_clock(p, clock: int) -> None:
    """The test hook: the clock jumps forward, as after that many ticks."""
    if isinstance(p, NativePolicy):
        p.lru.clock = clock
    else:
        p.clock = clock


def _policy_ops(kind: str, seed: int, clock0: int = 0, jump_every: int = 0,
                keyless: bool = False, jump: int = 0, index: str = "packed") -> list:
    """Random policy calls on a packed index's entries, without a Store: inserts (some
    after a lookup named their parent or tail), promotions (insert_loaded), touches,
    chains in parts, victims by an arbitrary test, evictions and plain removals, over
    three size classes. Returns every answer and the final lists. ``clock0``: the clock
    starts there; ``jump_every``: every so many steps it jumps past STAMP_AGE_CAP (every
    entry's age then counts as the cap), or by ``jump`` ticks (the sweep's gradual path:
    ages pass the cap over several jumps); ``index``: ``dict`` for the Python policy
    over exact stamps (the dict index's entries); ``keyless``: half the entries shed their key
    while in DRAM (``shed_key(e, dram=True)``: the loader gives it back)."""
    from kvstored.engine.arena import SizeClass
    from kvstored.engine.entries import Index as DictIndex
    from kvstored.engine.eviction import STAMP_AGE_CAP
    from kvstored.engine.packedindex import PackedIndex

    rnd = random.Random(seed)
    classes = [SizeClass(i, 1024 << i, 1 << 20) for i in range(3)]
    ix = (PackedIndex if index == "packed" else DictIndex)(1 << 20)
    keys_of: dict = {}  # id(entry) -> key, for the loader (the entries stay held in live)
    ix.set_key_loader(lambda e: keys_of[id(e)])
    p = NativePolicy(3, ix, ghost_min=8) if kind == "native" else Policy(3, ghost_min=8)
    if clock0:
        set_clock(p, clock0)
    live: dict = {}  # key -> entry in the lists
    out: list = []
    nxt = 0
    for step in range(4000):
        if jump_every and step % jump_every == jump_every - 1:
            set_clock(p, p.clock + (jump or STAMP_AGE_CAP + rnd.randrange(1 << 20)))
        op = rnd.random()
        if op < 0.35 or not live:
            if rnd.random() < 0.3 and live:  # a lookup that named its missing tail
                chain = rnd.sample(sorted(live), min(3, len(live))) + [b"k%d" % nxt, b"k%d" % (nxt + 1)]
                p.note_chain(NS, chain, len(chain) - 2)
            key = b"k%d" % (nxt if rnd.random() < 0.8 else rnd.randrange(max(nxt, 1)))
            nxt += 1
            if key in live or ix.get(NS, key) is not None:
                continue
            sc = classes[rnd.randrange(3)]
            e = ix.Entry(NS, key, sc.slot_size * nxt, 100, 0, sc)
            ix.insert(e)
            (p.insert_loaded if rnd.random() < 0.1 else p.insert)(e)
            if keyless and rnd.random() < 0.5:
                keys_of[id(e)] = key
                ix.shed_key(e, dram=True)  # (the dict index: a no-op)
            live[key] = e
        elif op < 0.55:
            p.touch(live[rnd.choice(sorted(live))])
        elif op < 0.65:
            run = [live[k] for k in rnd.sample(sorted(live), min(5, len(live)))]
            start = p.chain_begin()
            p.touch_run(run[2:])
            p.touch_keys(ix, NS, [e.key for e in run[:2]] + [b"missing"])
            p.chain_end(start)
        elif op < 0.85:
            c = rnd.randrange(3)
            salt = rnd.randrange(4)
            v = p.victim(c, lambda e: (hash(e.key) + salt) % 4 != 0)
            out.append((c, None if v is None else v.key))
            if v is not None:
                p.remove(v, evicted=True)
                ix.remove(v)
                del live[v.key]
        else:
            k = rnd.choice(sorted(live))
            e = live.pop(k)
            p.remove(e, evicted=rnd.random() < 0.5)
            ix.remove(e)
        out.append(p.count(rnd.randrange(3)))
    out.append((lists_of(p, 3), p.clock, p.resident, p.age_bonus, dict(p.counters),
                p.ghost.counts, sorted(p.tail_hints), sorted(p.parents)))
    return out


@pytest.mark.parametrize("seed", [1, 2])
def test_random_policy_calls_answer_the_same(seed):
    a, b = _policy_ops("python", seed), _policy_ops("native", seed)
    assert a[-1][4]["ghost_hits"] > 0 and a[-1][4]["cold_inserts"] > 0
    assert sum(1 for x in a if isinstance(x, tuple) and len(x) == 2 and x[1] is None) > 0
    assert a == b


@pytest.mark.parametrize("clock0, jump_every, keyless, jump", [
    ((1 << 28) - 1500, 0, False, 0),  # the 28 bits a record keeps wrap during the run
    ((1 << 29) - 700, 700, True, 0),  # and ages pass the cap again and again; keyless entries
    ((1 << 28) - 300, 40, True, (1 << 25) - 1),  # in steps the sweep follows record by record
])
def test_the_clock_across_the_stamps_wrap_and_past_the_age_cap(clock0, jump_every, keyless, jump):
    """The packed record keeps a stamp's low 28 bits (issue 13: a 51-byte record) and
    counts an age past STAMP_AGE_CAP as the cap, as Policy does with exact stamps: the
    two decide the same across the wrap and after jumps past the cap, with DRAM-resident
    entries whose key was shed among them."""
    a = _policy_ops("python", 3, clock0, jump_every, keyless, jump, index="dict")  # exact stamps
    b = _policy_ops("native", 3, clock0, jump_every, keyless, jump)
    assert a[-1][1] > clock0 + 1500 and a[-1][1] >> 28 > clock0 >> 28  # it wrapped
    assert sum(1 for x in a if isinstance(x, tuple) and len(x) == 2 and x[1] is not None) > 100
    assert a == b


def test_stamps_read_back_whole_across_the_wrap_and_clamp_past_the_cap():
    from kvstored import _index
    from kvstored.engine.arena import SizeClass
    from kvstored.engine.eviction import STAMP_AGE_CAP
    from kvstored.engine.packedindex import PackedIndex

    assert _index.STAMP_AGE_CAP == STAMP_AGE_CAP and _index.STAMP_BITS == 28
    sc0 = SizeClass(0, 1024, 1 << 20)
    ix = PackedIndex(1 << 20)
    p = NativePolicy(1, ix)
    p.lru.clock = (1 << 28) - 3
    es = []
    for i in range(6):  # stamped 2**28 - 2 .. 2**28 + 3: across the wrap of the low bits
        e = ix.Entry(NS, b"w%d" % i, 1024 * i, 100, 0, sc0)
        ix.insert(e)
        p.insert(e)
        es.append(e)
    assert [e.stamp for e in es] == [(1 << 28) - 2 + i for i in range(6)]
    assert [e.key for e in p.order(0, PROBATION)] == [b"w%d" % i for i in range(5, -1, -1)]
    p.touch(es[0])
    assert es[0].stamp == p.clock == (1 << 28) + 4 and es[0].seg == PROTECTED
    with pytest.raises(ValueError, match="forward"):
        p.lru.clock = 5
    with pytest.raises(TypeError):
        p.lru.clock = "x"
    # past the cap: every older stamp reads as the cap's (the sweep set it), the order
    # of the lists is kept, and a victim is still the oldest tail
    p.lru.clock = p.clock + STAMP_AGE_CAP + 12345
    assert {e.stamp for e in es} == {p.clock - STAMP_AGE_CAP}
    v = p.victim(0, lambda e: True)
    assert v is es[1]  # the probation tail (ages tie at the cap: probation goes first)
    # Entry.stamp: a value past the clock moves it; one older than the cap is kept at it
    es[2].stamp = p.clock + 10
    assert p.clock == es[2].stamp and es[3].stamp <= p.clock - STAMP_AGE_CAP  # counts as the cap
    es[3].stamp = 1
    assert es[3].stamp == p.clock - STAMP_AGE_CAP
    # an entry never linked reads 0 past the wrap too (it read the window's base, 2**28 x n)
    fresh = ix.Entry(NS, b"fresh", 1024 * 7, 100, 0, sc0)
    ix.insert(fresh)
    assert p.clock > 1 << 28 and fresh.stamp == 0 and fresh.seg == NONE


def _aged_pair(kind: str):
    """Probation's tail ``a`` aged 2**28 + 10 ticks in steps the gradual sweep follows
    (each under 2**25), protected's tail ``b`` 2**24: the victim. Exact stamps (Python,
    dict index) count a's age as the cap, so a goes; a record without the sweep would
    read a's 28 bits as 10 ticks old and pick b."""
    from kvstored.engine.arena import SizeClass
    from kvstored.engine.entries import Index as DictIndex
    from kvstored.engine.packedindex import PackedIndex

    sc0 = SizeClass(0, 1024, 1 << 20)
    ix = PackedIndex(1 << 20) if kind == "native" else DictIndex(1 << 20)
    p = NativePolicy(1, ix) if kind == "native" else Policy(1)
    a, b = (ix.Entry(NS, k, off, 100, 0, sc0) for k, off in ((b"a", 0), (b"b", 1024)))
    for e in (a, b):
        ix.insert(e)
        p.insert(e)
    p.touch(b)
    born = a.stamp
    step = (1 << 25) - 1
    while p.clock + step < born + (1 << 28) - (1 << 24):
        set_clock(p, p.clock + step)
    set_clock(p, born + (1 << 28) - (1 << 24))
    p.touch(b)
    set_clock(p, born + (1 << 28) + 10)
    assert (a.seg, b.seg) == (PROBATION, PROTECTED)
    return p.victim(0, lambda e: True).key


def test_the_sweep_keeps_a_stamp_older_than_its_28_bits_counted_at_the_cap():
    assert _aged_pair("python") == _aged_pair("native") == b"a"


@pytest.mark.parametrize("kind", ["python", "native"])
def test_a_protected_tail_past_the_age_cap_ages_out_whatever_the_bonus(kind):
    """Ages count at most STAMP_AGE_CAP (2**27) ticks. A protected tail goes when it is
    older than the probation tail by age_bonus x resident; once that term passes the cap
    (~16 M resident objects at bonus_max 8) no capped age could ever exceed it and a stale
    protected entry would stay for ever (R1, session 18), where exact stamps let it age
    out. A protected tail at the cap now goes before a probation tail that is not; with
    both at the cap the probation tail goes, as with exact stamps of that order."""
    from kvstored.engine.arena import SizeClass
    from kvstored.engine.eviction import STAMP_AGE_CAP
    from kvstored.engine.packedindex import PackedIndex

    sc0 = SizeClass(0, 1024, 1 << 20)
    ix = PackedIndex(1 << 20)
    p = (NativePolicy(1, ix, age_bonus=float(1 << 26), bonus_max=float(1 << 27), adapt_rate=0.0)
         if kind == "native" else
         Policy(1, age_bonus=float(1 << 26), bonus_max=float(1 << 27), adapt_rate=0.0))
    stale, fresh, later = (ix.Entry(NS, k, 1024 * i, 100, 0, sc0)
                           for i, k in enumerate((b"stale", b"fresh", b"later")))
    for e in (stale, fresh):
        ix.insert(e)
    p.insert(stale)
    p.touch(stale)
    assert stale.seg == PROTECTED
    set_clock(p, p.clock + STAMP_AGE_CAP + 1000)  # the stale one: unread past the cap
    p.insert(fresh)  # resident 2 x bonus 2**26 = 2**27: the term alone reaches the cap
    assert p.victim(0, lambda e: True) is stale
    # both tails past the cap: the probation one goes (exact stamps: it is the older)
    set_clock(p, p.clock + STAMP_AGE_CAP + 1000)
    assert p.victim(0, lambda e: True) is fresh
    # below the cap nothing changed: a touched entry stays while the bonus covers it
    ix.insert(later)
    p.touch(stale)
    p.insert(later)
    assert p.victim(0, lambda e: True) is fresh
