"""Repair's writes into the node's own store (LocalStore.put_many): a record rebuilt for
one of this node's own slots goes straight into its Store on the daemon's event loop, not
through a loopback batch_put to itself. A real engine Store on a real asyncio loop (in a
thread, as in the daemon); the peers of the executor test are an in-memory stand-in for
other nodes (their reads), never for this node."""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from kvstore.layout import FRAG_HEADER, Policy, encode_records, lap_key
from kvstore.placement import Member
from kvstored.cluster.repair import decide as d
from kvstored.cluster.repair.execute import Executor
from kvstored.cluster.repair.local import LocalStore
from kvstored.cluster.repair.throttle import Throttle
from kvstored.engine.store import StoreLimits
from clusterutil import store_on_loop
from fakes import Head as H

MiB = 1 << 20
NS = b"ec"
ME = "me"
HEAD = FRAG_HEADER.size


@pytest.fixture
def local():
    """LocalStore over a 4 MiB Store whose calls run on a loop in another thread."""
    with store_on_loop(StoreLimits(dram_size=4 * MiB, slab_size=1 * MiB, max_value_size=1 * MiB,
                                   hugepages=False, prefault=False, put_wait_timeout=0.2)) as (_s, _l, local):
        yield local


def stored(ls: LocalStore, key: bytes) -> bytes | None:
    return ls.read_many([(NS, key)])[0]


def test_put_many_stores_joined_and_gathered_records_byte_identical(local):
    a, h, p = os.urandom(1000), os.urandom(64), os.urandom(300_000)
    assert local.put_many(NS, [(b"a", a), (b"g", (h, p)), (b"v", (memoryview(h), memoryview(p)))],
                          False) == [True, True, True]
    assert stored(local, b"a") == a
    assert stored(local, b"g") == stored(local, b"v") == h + p


def test_read_heads_gives_first_bytes_of_verified_held_and_short_records():
    """read_heads: the first n bytes of each record (all of a shorter one), None for an
    absent key; a record held back until checked (hold_all) is read too. More keys than
    one slice of the loop (HEAD_SLICE)."""
    import asyncio
    from kvstored.cluster.repair.local import HEAD_SLICE
    with store_on_loop(StoreLimits(dram_size=4 * MiB, slab_size=1 * MiB, max_value_size=1 * MiB,
                                   hugepages=False, prefault=False)) as (store, loop, ls):
        recs = {b"k%d" % i: os.urandom(10 if i == 7 else 100 + i) for i in range(2 * HEAD_SLICE + 3)}
        assert ls.put_many(NS, list(recs.items()), False) == [True] * len(recs)
        keys = [(NS, k) for k in recs] + [(NS, b"absent"), (b"other", b"k1")]
        want = [v[:64] for v in recs.values()] + [None, None]
        assert ls.read_heads(keys, 64) == want
        assert recs[b"k7"] == want[7]  # shorter than n: all of it

        async def hold():
            return store.hold_all()
        assert asyncio.run_coroutine_threadsafe(hold(), loop).result(5) == len(recs)
        assert store.peek(NS, b"k0").unverified
        assert ls.read_heads(keys, 64) == want


def test_read_many_in_place_keeps_the_sources_slots_until_released():
    """Rebuild sources read with ``held``: read-only views of their DRAM slots, each slot's
    read reference kept until release(held) (queued onto the loop); a hop of a Held that
    was released already (a hop that timed out) keeps nothing and gives copies."""
    from kvstored.cluster.repair.local import Held
    with store_on_loop(StoreLimits(dram_size=4 * MiB, slab_size=1 * MiB, max_value_size=1 * MiB,
                                   hugepages=False, prefault=False)) as (store, _l, ls):
        v, w = os.urandom(5000), os.urandom(3000)
        assert ls.put_many(NS, [(b"s", v), (b"w", w)], False) == [True, True]
        held = Held()
        (head, payload), whole, none = ls.read_many([(NS, b"s"), (NS, b"w"), (NS, b"absent")], 1, held=held)
        assert (head, bytes(payload), whole, none) == (v[:HEAD], v[HEAD:], w, None)
        assert type(payload) is memoryview and payload.readonly and type(whole) is bytes
        assert store.peek(NS, b"s").refs == 1 and store.peek(NS, b"w").refs == 0
        ls.release(held)
        ls.read_heads([(NS, b"s")], 8)  # a later hop: the release queued before it has run
        assert store.peek(NS, b"s").refs == 0 and held.closed and not held.entries
        (head, payload), = ls.read_many([(NS, b"s")], 1, held=held)  # closed: copies, nothing kept
        assert type(payload) is bytes and bytes(payload) == v[HEAD:] and store.peek(NS, b"s").refs == 0


def test_put_many_identical_conflicting_and_overwritten(local):
    v, w = os.urandom(5000), os.urandom(5000)
    assert local.put_many(NS, [(b"k", v)], False) == [True]
    # the same bytes again: "already there"; other bytes without overwrite: failed, kept
    assert local.put_many(NS, [(b"k", (v[:64], v[64:])), (b"k", w)], False) == [False, None]
    assert stored(local, b"k") == v
    assert local.put_many(NS, [(b"k", w)], True) == [True]
    assert stored(local, b"k") == w


def test_put_many_keeps_the_commit_time_it_is_given():
    """The agent's own store writes keep the source's commit time (a copy is no client's
    commit: docs/cluster.md "Deletes and repair"); None: the write's own. Writing the same
    bytes again with another time changes nothing (a repair write never refreshes)."""
    import time
    with store_on_loop(StoreLimits(dram_size=4 * MiB, slab_size=1 * MiB, max_value_size=1 * MiB,
                                   hugepages=False, prefault=False)) as (store, _l, ls):
        old = time.time() - 7200.0
        v = os.urandom(3000)
        assert ls.put_many(NS, [(b"old", v), (b"new", (v[:64], v[64:]))], False, [old, None]) == [True, True]
        assert store.peek(NS, b"old").committed_at == old
        assert time.time() - 60 < store.peek(NS, b"new").committed_at <= time.time()
        assert ls.put_many(NS, [(b"old", v)], False, [time.time()]) == [False]
        assert store.peek(NS, b"old").committed_at == old


def test_put_many_oversized_and_no_space_fail_per_record(local):
    big = b"x" * (MiB + 1)  # over max_value_size: refused, the others still stored
    ok = os.urandom(100)
    assert local.put_many(NS, [(b"big", big), (b"ok", ok)], False) == [None, True]
    assert stored(local, b"big") is None and stored(local, b"ok") == ok
    # fill the 4 MiB arena with pinned records: a record that finds no space within
    # put_wait_timeout fails, and the call still answers for every record
    recs = [(b"f%d" % i, os.urandom(900_000)) for i in range(4)]
    assert local.put_many(NS, recs, False) == [True] * 4

    async def pin():  # everything the arena holds (the small record took a slot too)
        return local._store.pin(NS, [k for _ns, k in local._store.keys(NS)], 60.0)
    assert local._run(pin) >= 3
    more = os.urandom(900_000)
    assert local.put_many(NS, [(b"more", more), (b"small", b"s" * 10)], False) == [None, True]
    assert stored(local, b"more") is None and stored(local, b"small") == b"s" * 10
    assert local.put_many(NS, [], False) == []


def test_put_many_from_several_threads_at_once(local):
    """Peer threads and the repair thread may write at once: each call is one loop hop,
    and every record lands whole."""
    items = {t: [(b"t%d-%d" % (t, i), os.urandom(20_000 + i)) for i in range(16)] for t in range(6)}
    with ThreadPoolExecutor(6) as pool:
        outs = list(pool.map(lambda t: local.put_many(NS, items[t], False), range(6)))
    assert outs == [[True] * 16] * 6
    for its in items.values():
        for k, v in its:
            assert stored(local, k) == v


class OtherNodes:
    """The other nodes' records ({node_id: {(ns, key): bytes}}) as PeerIO serves them;
    a write to this node through here fails the test."""

    def __init__(self, data):
        self.data, self.calls = data, []

    def get_many(self, member, ns, keys, verify=True):
        assert member.node_id != ME
        self.calls.append(("get", member.node_id, len(keys)))
        return [self.data.get(member.node_id, {}).get((ns, k)) for k in keys]

    def put_many(self, member, ns, items, overwrite, committed=None):
        assert member.node_id != ME, "a record for this node's own slot went over the wire"
        self.calls.append(("put", member.node_id, len(items)))
        return [True] * len(items)


def test_rebuilt_records_for_my_own_slots_go_into_my_store(local):
    """ec:3+2 on 4 live nodes: this node holds lap 0 (index 0) and gets lap 1 (the fifth
    slot). It reads 2 sources from peers, rebuilds index 4 and stores it locally under
    the lap-1 key, byte-identical to what the encoder made; no write goes to a peer."""
    pytest.importorskip("pyeclib")
    p = Policy.parse("ec:3+2")
    me, a, b, c = (Member(n, f"127.0.0.1:{1000 + i}") for i, n in enumerate([ME, "a", "b", "c"]))
    objs, heads, remote, want = [], {}, {}, {}
    for n in range(12):
        base = b"obj%d#ec" % n
        recs = encode_records(p, os.urandom(200_000 + n), 1)
        assert local.put_many(NS, [(base, recs[0])], False) == [True]
        o = d.Obj(NS, base, p, True)
        o.mine[0] = d.Local(base, len(recs[0]), 0, False, recs[0][:FRAG_HEADER.size], 0.0)
        o.slots = [(me, 0), (a, 0), (b, 0), (c, 0), (me, 1)]
        objs.append(o)
        for j, node in ((1, a), (2, b), (3, c)):
            remote.setdefault(node.node_id, {})[(NS, base)] = recs[j]
        heads[id(o)] = {(node.node_id, 0): H(True, head=recs[j][:FRAG_HEADER.size])
                        for j, node in ((1, a), (2, b), (3, c))}
        want[lap_key(base, 1)] = recs[4]
    peers = OtherNodes(remote)
    counts: dict = {}

    def count(name, k=1):
        counts[name] = counts.get(name, 0) + k
    ex = Executor(local, peers, Throttle(1 << 40), count,
                  lambda fn, jobs: {k: fn(j) for k, j in jobs.items()}, lambda: False)
    assert ex.run(objs, heads, d.Peers(ME, {}, {}, [])) == [True] * 12
    for key, rec in want.items():
        assert stored(local, key) == rec
    assert sorted(peers.calls) == [("get", "a", 12), ("get", "b", 12)]  # sources only
    assert counts["records_written"] == 12
    assert counts["bytes_written"] == sum(len(r) for r in want.values())
    # a second run finds nothing to do (the local records are there now)
    o2 = []
    for o in objs:
        x = d.Obj(o.ns, o.base, p, True, dict(o.mine), o.slots)
        x.mine[1] = d.Local(lap_key(o.base, 1), 0, 0, False, want[lap_key(o.base, 1)][:FRAG_HEADER.size], 0.0)
        o2.append(x)
    heads2 = {id(x): heads[id(o)] for x, o in zip(o2, objs)}
    peers.calls.clear()
    assert ex.run(o2, heads2, d.Peers(ME, {}, {}, [])) == [True] * 12
    assert peers.calls == []


def test_affected_objects_match_placing_on_both_member_lists():
    """A pass after a membership change looks at the objects whose slots moved; when the
    member count crosses K+M (or the copy count) it skips placing on the old list, since
    the slots differ anyway. Same answer as comparing both placements, object by object."""
    from kvstore.layout import slots
    from kvstored.cluster.repair.agent import RepairAgent, RepairSettings
    six = [Member(f"n{i}", f"127.0.0.1:{2000 + i}") for i in range(6)]
    pols = [Policy.parse("ec:3+2"), Policy.parse("replicas:3"), Policy.parse("ec:2+1")]
    for prev, now in ((six[:5], six[:2] + six[3:5]),  # 5 -> 4: below K+M of ec:3+2
                      (six, six[:2] + six[3:]),  # 6 -> 5: every policy still fits
                      (six[:4], six[:5])):  # 4 -> 5: a node joins
        a = RepairAgent("n0", None, None, RepairSettings(1.0, 60.0, 1 << 20))
        a._prev_members, a._pending_keys, a._slots_of = prev, set(), {}
        a._started = a._prev_started = {m.node_id: 1.0 for m in six}
        objs = [d.Obj(NS, b"k%d" % i, pols[i % 3], pols[i % 3].kind == "ec") for i in range(300)]
        got = a._affected(objs, now)
        want = [o for o in objs if [(x.node_id, lap) for x, lap in slots(o.base, prev, o.policy, NS)]
                != [(x.node_id, lap) for x, lap in slots(o.base, now, o.policy, NS)]]
        assert [id(o) for o in got] == [id(o) for o in want] and want
        for o in got:
            assert o.slots == slots(o.base, now, o.policy, NS)


@pytest.mark.parametrize("parallel", [False, True])
def test_peer_calls_one_after_another_or_at_once(monkeypatch, parallel):
    """PARALLEL_PEERS off (a node with < 4 cores): every peer's job runs on the calling
    thread, in order; on: each on a worker thread. Same results either way."""
    from kvstored.cluster.repair import agent as ag
    monkeypatch.setattr(ag, "PARALLEL_PEERS", parallel)
    a = ag.RepairAgent("n0", None, None, ag.RepairSettings(1.0, 60.0, 1 << 20))
    seen = []

    def job(x):
        seen.append((x, threading.current_thread().name))
        return x * 2
    try:
        assert a._per_peer(job, {"a": 1, "b": 2, "c": 3}) == {"a": 2, "b": 4, "c": 6}
    finally:
        a.stop()
    names = {name for _x, name in seen}
    if parallel:
        assert all(n.startswith("kvstored-repair") for n in names)
    else:
        assert seen == [(1, threading.current_thread().name), (2, threading.current_thread().name),
                        (3, threading.current_thread().name)]


def test_put_many_that_timed_out_writes_nothing_afterwards(monkeypatch):
    """A put_many hop the caller gave up on (past its timeout) is cancelled on the loop:
    its records may be views of this node's DRAM slots (repair's in-place sources), whose
    read references the executor gives back once the write raised, so a record written
    after that could copy another object's bytes. Here the source changes after the
    timeout (a reused slot) and space then frees: nothing is stored."""
    from kvstored.cluster.repair import local as local_mod
    with store_on_loop(StoreLimits(dram_size=4 * MiB, slab_size=1 * MiB, max_value_size=1 * MiB,
                                   hugepages=False, prefault=False, put_wait_timeout=30.0)) as (store, _l, ls):
        assert ls.put_many(NS, [(b"f%d" % i, os.urandom(900_000)) for i in range(4)], False) == [True] * 4

        async def hold():  # every slot read-referenced: nothing can be evicted for a new one
            return [store.acquire(NS, b"f%d" % i) for i in range(4)]
        held = ls._run(hold)
        src = bytearray(os.urandom(900_000))
        monkeypatch.setattr(local_mod, "CALL_TIMEOUT", 0.3)
        with pytest.raises(TimeoutError):
            ls.put_many(NS, [(b"late", (memoryview(src)[:HEAD], memoryview(src)[HEAD:]))], False)
        monkeypatch.setattr(local_mod, "CALL_TIMEOUT", 10.0)
        src[:] = b"\xee" * len(src)  # the slot the view read is another object's now

        async def let_go():
            for e in held:
                store.release(e)
        ls._run(let_go)
        # a hop left running would now find space within its wait (50 ms polls) and store
        import time
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            assert store.peek(NS, b"late") is None
            time.sleep(0.05)
        assert stored(ls, b"late") is None
