"""The streamed repair pass: the store's repair walk (engine/repairhooks.py RepairWalk,
LocalStore.walk a hop at a time) and the agent's pass over it (agent.py). The index
changes between chunks (puts, deletes); held records come first; an EC object's laps on
this node come in the same rows; progress and ETA follow the walk. A real engine Store
on a real asyncio loop in a thread, as in the daemon; the cluster is a stand-in
membership of one member (a pass then asks no peer), small chunks so a few hundred
objects take many hops."""
from __future__ import annotations

import asyncio
import time

import pytest

from kvstore.layout import Policy, lap_key
from kvstore.placement import Member
from kvstored.cluster.repair import agent as agent_mod
from kvstored.cluster.repair import local as local_mod
from kvstored.cluster.repair.agent import RepairAgent, RepairSettings, group, siblings_of
from kvstored.engine import store as store_mod
from kvstored.engine.store import StoreLimits
from clusterutil import store_on_loop

MiB = 1 << 20
REP, EC = b"rep", b"ec"
ME = Member("me", "127.0.0.1:1")


@pytest.fixture(params=["packed", "dict"])
def on_loop(request, monkeypatch):
    """(store, loop, LocalStore) with 16-entry chunks and ~8-row hops."""
    monkeypatch.setattr(store_mod, "WALK_CHUNK", 16)
    monkeypatch.setattr(local_mod, "WALK_ROWS", 8)
    try:
        ctx = store_on_loop(StoreLimits(dram_size=8 * MiB, slab_size=MiB, max_value_size=MiB,
                                        hugepages=False, prefault=False, index=request.param))
        with ctx as got:
            yield got
    except ImportError:
        pytest.skip("kvstored._index not built")


def on(loop, fn):
    """``fn()`` run on the store's loop (the store is not thread-safe)."""
    async def call():
        return fn()
    return asyncio.run_coroutine_threadsafe(call(), loop).result(10)


def fill(store, loop, keys, ns=REP):
    on(loop, lambda: [store.put_bytes(ns, k, b"v" * 100) for k in keys])


def test_walk_sees_puts_skips_deletes_and_gives_each_object_once(on_loop):
    store, loop, local = on_loop
    keys = [b"k%03d" % i for i in range(200)]
    fill(store, loop, keys)
    walk = local.walk()
    rows, share = next(walk)
    first = [r[1] for r in rows]
    assert 0 < len(first) < 60 and 0 < share < 1
    # between hops: deletes of keys not walked yet, puts of new ones (the packed index
    # gives a new object a new record ahead of the cursor; the dict index's phase walks
    # a list of its entries taken when the phase began)
    gone = [k for k in keys[150:] if k not in first][:20]
    new = [b"new%02d" % i for i in range(10)]
    on(loop, lambda: store.delete(REP, gone))
    fill(store, loop, new)
    seen = list(first)
    hops = 1
    for rows, share in walk:
        seen += [r[1] for r in rows]
        hops += 1
        assert hops < 500
    assert len(seen) == len(set(seen)), "an object given twice"
    assert not set(gone) & set(seen), "a key deleted before the walk reached it was given"
    assert set(seen) - set(new) == set(keys) - set(gone)
    if store.index.kind == "packed":
        assert set(new) <= set(seen), "objects put ahead of the walk were not given"
    assert hops >= 180 // 16  # a chunk (16 entries) a hop


def test_held_records_first_then_hot_then_read_then_the_rest(on_loop):
    store, loop, local = on_loop
    keys = [b"k%03d" % i for i in range(120)]
    fill(store, loop, keys)
    held = [keys[100], keys[7], keys[64]]

    def mark():
        for k in held:
            store.index.mark_unverified(store.index.get(REP, k))
        store.pin(REP, [keys[90]], 60)
        store.index.get(REP, keys[50]).reads = 3
    on(loop, mark)
    order = [r[1] for rows, _share in local.walk() for r in rows]
    assert len(order) == len(set(order)) == 120
    # held in index order, whatever their index position
    assert sorted(order[:3]) == sorted(held) and order[3] == keys[90] and order[4] == keys[50]


def test_an_ec_objects_laps_come_in_the_same_rows(on_loop):
    """ec:3+2 on 2 members: this node holds laps 0..2 of each object, far apart in the
    index (every lap 0 put first, then every lap 2, then lap 1): each object's laps are
    given together, and grouped as one object with all of them."""
    store, loop, local = on_loop
    bases = [b"o%03d#ec" % i for i in range(40)]
    for lap in (0, 2, 1):
        fill(store, loop, [lap_key(b, lap) for b in bases], EC)
    pol = {"ec": Policy.parse("ec:3+2")}
    laps: dict[bytes, set] = {}
    for rows, _share in local.walk(siblings_of(pol, 2)):
        for o in group(rows, pol, False):
            assert set(o.mine) == {0, 1, 2}, (o.base, sorted(o.mine))
            assert o.base not in laps, "an object looked at twice"
            laps[o.base] = set(o.mine)
    assert set(laps) == set(bases)


class _Membership:
    degraded = draining = False
    epoch = 1
    policies = {"rep": "replicas:2"}

    def view(self):
        return []

    def placement_members(self):
        return [ME]


def test_a_pass_verifies_held_records_first_and_reports_its_progress(on_loop, monkeypatch):
    """A pass over 300 held objects a few rows a hop: every record verified (held ones
    before any other object), each object scanned once; objects put during the pass are
    seen (left for a later pass as young); deleted ones are not looked at; the status's
    total and ETA follow the share walked and end exact."""
    store, loop, local = on_loop
    monkeypatch.setattr(agent_mod, "YOUNG_S", 0.0)
    monkeypatch.setattr(agent_mod, "BATCH", 16)
    keys = [b"k%03d" % i for i in range(300)]
    fill(store, loop, keys)
    on(loop, lambda: store.hold_all())
    fill(store, loop, [b"fresh%d" % i for i in range(5)])  # verified: looked at after the held
    a = RepairAgent("me", local, _Membership(), RepairSettings(0.0, 3600.0, 1 << 40))
    statuses, verified_order = [], []
    walk, settle = local.walk, local.settle
    gone = keys[-10:]

    def watched(siblings=None):
        for n, got in enumerate(walk(siblings)):
            statuses.append(a.status())
            if n == 1:  # while the pass runs
                on(loop, lambda: store.delete(REP, gone))
                fill(store, loop, [b"during%d" % i for i in range(7)])
            yield got

    def settled(verify, drop):
        verified_order.extend(k for _ns, k in verify)
        return settle(verify, drop)
    decided, start = [], a.executor.start

    def deciding(todo, *args):
        decided.extend(o.base for o in todo)
        return start(todo, *args)
    monkeypatch.setattr(local, "walk", watched)
    monkeypatch.setattr(local, "settle", settled)
    monkeypatch.setattr(a.executor, "start", deciding)
    try:
        assert a._pass() == 0
        assert a.st["verified"] == 290 and store.unverified == 0
        assert sorted(verified_order) == sorted(keys[:-10])  # deleted ones not looked at
        assert sorted(decided[:290]) == sorted(keys[:-10])  # the held ones first
        assert sorted(decided[290:]) == [b"fresh%d" % i for i in range(5)]
        assert a.st["scanned"] == a._pass_objects == a.st["total"] == 295  # 290 held + 5 fresh
        assert a._skipped_young == 7  # seen, left to a later pass
        mid = [s for s in statuses[2:] if 0 < s["scanned"] < 290]
        assert mid, statuses
        for s in mid:
            assert s["state"] == "scanning" and 150 <= s["total"] <= 600, s
    finally:
        a.stop()


def test_when_everything_was_held_later_phases_give_what_was_put_since(on_loop):
    """A restart or a drop holds every record: the held phase takes them all, and the
    later phases give only the objects put since the walk began (held or not)."""
    store, loop, local = on_loop
    keys = [b"k%03d" % i for i in range(100)]
    fill(store, loop, keys)
    on(loop, lambda: store.hold_all())
    walk = local.walk()
    seen = [r[1] for r in next(walk)[0]]
    new = [b"new%02d" % i for i in range(6)]
    fill(store, loop, new)  # verified (a client's put), ahead of the walk or not
    seen += [r[1] for rows, _share in walk for r in rows]
    assert sorted(seen) == sorted(keys + new)
    assert set(seen[-6:]) == set(new)  # after every held one


def test_records_repair_writes_during_a_pass_walk_are_left_out_of_it(on_loop):
    """A record repair writes while the agent's walk runs (a peer's copy or rebuilt
    fragment, or this node's own: LocalStore.put_many, recommit off, its source's older
    commit time) is decided by its writer already: the walk leaves it out, where it used
    to walk it, ask the peers and decide it again in the same pass. A client's put
    meanwhile is still given, and a walk not asked to skip (repair_snapshot) gives all."""
    store, loop, local = on_loop
    keys = [b"k%03d" % i for i in range(100)]
    fill(store, loop, keys)
    walk = local.walk()
    seen = [r[1] for r in next(walk)[0]]
    # a repair write of records whose source committed a minute before the walk began
    copies = [b"copy%02d" % i for i in range(12)]
    src_time = time.time() - 60
    assert local.put_many(REP, [(k, b"r" * 100) for k in copies], False,
                          [src_time] * len(copies)) == [True] * len(copies)
    clients = [b"client%02d" % i for i in range(5)]
    fill(store, loop, clients)
    hops = 1
    for rows, _share in walk:
        seen += [r[1] for r in rows]
        hops += 1
        assert hops < 500
    assert not set(copies) & set(seen), "a record repair wrote during the pass was walked"
    assert set(keys) <= set(seen)
    if store.index.kind == "packed":  # (the dict index's phase lists its entries up front)
        assert set(clients) <= set(seen), "a client's put during the pass was left out"
    assert not store.repair_walks, "a finished walk is still told of repair writes"
    # a later walk (the next pass) gives them; so does a walk that was not asked to skip
    again = [r[1] for rows, _share in local.walk() for r in rows]
    assert set(copies) <= set(again)
    snap = asyncio.run_coroutine_threadsafe(store.repair_snapshot(), loop).result(10)
    assert set(copies) <= {r[1] for r in snap}
