"""The batch queries in steps (Store.exists/lookup/pin/unpin/delete_each_steps): the same
answers and the same eviction order as in one pass, and safe when the store changes
between steps (what the control plane's turns of the loop allow)."""
from __future__ import annotations

import pytest

from kvstore.errors import InvalidArgument
from kvstored.engine import store as store_mod
from kvstored.engine.store import Store, StoreLimits, run_steps
from test_store import read  # (DRAM-resident objects, through a read reference)

MiB = 1 << 20
NS = b"ns"
N = 1300  # several steps (BATCH_STEP keys each)


def make_store() -> Store:
    return Store(StoreLimits(dram_size=8 * MiB, slab_size=1 * MiB, max_value_size=1 * MiB,
                             hugepages=False, prefault=False))


def filled() -> tuple[Store, list[bytes]]:
    s = make_store()
    keys = [b"k%05d" % i for i in range(N)]
    for i, k in enumerate(keys):
        s.put_bytes(NS, k, bytes([i % 251]) * 100)
    return s, keys


def stamps(s: Store, keys) -> list[int]:
    return [s.index.get(NS, k).stamp for k in keys]


def run_all(s: Store, keys) -> dict:
    """Every batch query once, on a chain with a missing key in its third step."""
    chain = keys[:1100] + [b"missing"] + keys[1100:]
    out = {"exists": s.exists(NS, chain), "lookup": s.lookup(NS, chain)}
    out["stamps_after_lookup"] = stamps(s, keys)
    out["pin"] = s.pin(NS, keys[:900] + [b"missing"], 30)
    out["unpin"] = s.unpin(NS, keys[100:1000])
    out["delete"] = s.delete_each(NS, keys[::3] + [b"missing"])
    out["left"] = s.exists(NS, keys)
    out["stamps_end"] = [e.stamp for e in map(lambda k: s.index.get(NS, k), keys) if e is not None]
    out["counters"] = {k: s.counters[k] for k in ("pins", "unpins", "deletes")}
    return out


def test_steps_answer_and_order_as_one_pass(monkeypatch):
    stepped, keys = filled()
    try:
        got = run_all(stepped, keys)
    finally:
        stepped.close()
    monkeypatch.setattr(store_mod, "BATCH_STEP", 1 << 30)  # one step: the old single pass
    whole, keys = filled()
    try:
        want = run_all(whole, keys)
    finally:
        whole.close()
    assert got == want
    assert got["lookup"] == 1100 and got["exists"].count(False) == 1
    # the chain's head is the most recent: stamps fall along the hits
    s = got["stamps_after_lookup"][:1100]
    assert all(a > b for a, b in zip(s, s[1:]))


def test_changes_between_steps_are_safe(monkeypatch):
    """Between two steps, keys of an earlier step and of a later one are deleted and new
    objects are stored (their records may reuse the deleted ones'): the lookup counts
    to the first key missing when its step reached it, and touches only live entries."""
    monkeypatch.setattr(store_mod, "BATCH_STEP", 5)
    s = make_store()
    try:
        keys = [b"c%02d" % i for i in range(20)]
        for k in keys:
            s.put_bytes(NS, k, b"x" * 100)
        steps = s.lookup_steps(NS, keys)
        next(steps)  # the first step (keys 0-4) is scanned
        assert s.delete(NS, [keys[2], keys[12]]) == 2
        for i in range(4):
            s.put_bytes(NS, b"new%d" % i, b"y" * 100)
        n = run_steps(steps)
        assert n == 12  # keys[12] was gone when its step came; keys[2] after it was counted
        assert s.exists(NS, keys) == [k not in (keys[2], keys[12]) for k in keys]
        assert [read(s, b"new%d" % i) for i in range(4)] == [b"y" * 100] * 4

        ex = s.exists_steps(NS, keys)
        next(ex)
        s.delete(NS, [keys[0], keys[19]])  # one scanned, one not yet
        # keys[0] was there when its step read it; keys[19] was gone when its step came
        assert run_steps(ex) == [k not in (keys[2], keys[12]) for k in keys[:5]] + \
            [k not in (keys[2], keys[12], keys[19]) for k in keys[5:]]
        # the eviction lists are sound: fill the arena twice over; every object evicts
        # in turn and the last ones put read back
        for i in range(256):
            s.put_bytes(NS, b"fill%03d" % i, bytes([i]) * (64 << 10))
        assert s.counters["evictions"] > 0
        assert [read(s, b"fill%03d" % i) for i in range(250, 256)] == \
            [bytes([i]) * (64 << 10) for i in range(250, 256)]
    finally:
        s.close()


def test_pin_ttl_refused_before_any_step():
    s = make_store()
    try:
        s.put_bytes(NS, b"a", b"1")
        with pytest.raises(InvalidArgument):
            s.pin(NS, [b"a"], 0)
        with pytest.raises(InvalidArgument):
            next(s.pin_steps(NS, [b"a"], -1))
        assert s.index.get(NS, b"a").pins == 0
    finally:
        s.close()


def test_repair_snapshot_order_in_buckets_and_turns(monkeypatch):
    """Repair's walk goes over the index a chunk at a time with a turn of the loop between
    (a key deleted meanwhile is left out), in repair order: held, then pinned or
    protected, then read at least once, then the rest (each in index order)."""
    import asyncio
    monkeypatch.setattr(store_mod, "WALK_CHUNK", 8)
    s = make_store()
    try:
        keys = [b"r%02d" % i for i in range(40)]
        for k in keys:
            s.put_bytes(NS, k, b"z" * 64)
        s.index.mark_unverified(s.index.get(NS, keys[30]))
        s.pin(NS, [keys[20]], 60)
        s.exists(NS, [keys[10]])  # read: moves to the protected segment
        for k, n in ((keys[1], 1), (keys[2], 5), (keys[3], 300), (keys[4], 2)):
            s.index.get(NS, k).reads = n

        async def run():
            turns = []

            async def ticker():
                for _ in range(10_000):
                    turns.append(1)
                    if len(turns) == 2:
                        s.delete(NS, [keys[39]])  # while the walk is under way
                    await asyncio.sleep(0)
            t = asyncio.ensure_future(ticker())
            await asyncio.sleep(0)
            seen = len(turns)
            rows = await s.repair_snapshot()
            during = len(turns) - seen
            t.cancel()
            return rows, during
        rows, during = asyncio.run(run())
        assert during >= 40 // 8 - 1, during  # the loop ran between chunks
        order = [r[1] for r in rows]
        assert keys[39] not in order and len(order) == 39
        assert order[:3] == [keys[30], keys[10], keys[20]]
        assert order[3:7] == [keys[1], keys[2], keys[3], keys[4]]  # read: 1, 5, 300, 2 times
        assert rows[0][4] and rows[1][6] and rows[2][5]  # unverified, protected, pinned
        assert sorted(order) == sorted(keys[:39])  # each once
    finally:
        s.close()
