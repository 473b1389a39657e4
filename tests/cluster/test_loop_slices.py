"""Repair's batches on the event loop, and the Heads calls peers make, give it back between
records (looplag.Slices), so clients' requests are served in the middle of a rebuild,
not after a whole batch.

A real engine Store on a real asyncio loop in a thread, as in the daemon. With the slice
set to 0 every record is a turn of its own: a ticker task on the same loop must see the
store part-way through a batch (some records stored, not all; some read, not all)."""
from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from kvstored import looplag
from clusterutil import store_on_loop
from kvstored.engine.store import StoreLimits

MiB = 1 << 20
NS = b"ec"
RECORDS = 16


@pytest.fixture
def node():
    with store_on_loop(StoreLimits(dram_size=64 * MiB, slab_size=4 * MiB, max_value_size=4 * MiB,
                                   hugepages=False, prefault=False, put_wait_timeout=0.2)) as got:
        yield got


def _watch(loop, probe):
    """Run ``probe()`` at every turn of the loop until stopped (bounded: 30 s)."""
    seen, stop = [], threading.Event()

    async def ticker():
        end = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < end:
            seen.append(probe())
            await asyncio.sleep(0)
    fut = asyncio.run_coroutine_threadsafe(ticker(), loop)
    return seen, stop, fut


def test_put_and_read_batches_yield_between_records(node, monkeypatch):
    store, loop, local = node
    monkeypatch.setattr(looplag, "SLICE_S", 0.0)
    items = [(b"k%02d" % i, os.urandom(MiB)) for i in range(RECORDS)]

    seen, stop, fut = _watch(loop, lambda: store.stats()["objects"])
    try:
        out = local.put_many(NS, items, overwrite=False)
    finally:
        stop.set()
        fut.result(10)
    assert out == [True] * RECORDS
    assert any(0 < n < RECORDS for n in seen), f"no turn of the loop inside the batch: {sorted(set(seen))}"

    reads = []
    real_acquire = store.acquire_async

    async def counting_acquire(ns, key):  # counts the records the batch has reached
        reads.append(key)
        return await real_acquire(ns, key)
    monkeypatch.setattr(store, "acquire_async", counting_acquire)
    seen, stop, fut = _watch(loop, lambda: len(reads))
    try:
        got = local.read_many([(NS, k) for k, _ in items] + [(NS, b"absent")])
    finally:
        stop.set()
        fut.result(10)
    assert [bytes(g) for g in got[:RECORDS]] == [v for _, v in items] and got[RECORDS] is None
    assert any(0 < n < RECORDS for n in seen), f"no turn of the loop inside the read: {sorted(set(seen))}"


def test_default_slice_keeps_a_batch_whole_when_short(node):
    """The default slice only breaks long batches: a handful of tiny records is one turn."""
    store, loop, local = node
    assert 0 < looplag.SLICE_S <= 0.01
    out = local.put_many(NS, [(b"s%d" % i, b"x" * 64) for i in range(4)], overwrite=False)
    assert out == [True] * 4
    assert [bytes(g) for g in local.read_many([(NS, b"s%d" % i) for i in range(4)])] == [b"x" * 64] * 4


def test_heads_gives_the_loop_back_between_keys(node, monkeypatch):
    """A peer's Heads call (4,096 keys a call from repair) is served in slices too: the
    handler itself (under its auth and error wrappers) on the store's loop."""
    from kvstore.v1 import control_pb2 as pb
    from kvstored.config import load_config
    from kvstored.control.service import ControlService
    from kvstored.dataplane.policy import EpochGate

    store, loop, local = node
    monkeypatch.setattr(looplag, "SLICE_S", 0.0)
    keys = [b"h%03d" % i for i in range(64)]
    assert local.put_many(NS, [(k, b"v" * 100) for k in keys], overwrite=False) == [True] * 64
    svc = ControlService(store, load_config(None), None, data=None, stats=None, gate=EpochGate())
    heads = ControlService.Heads.__wrapped__.__wrapped__  # the handler, without the wrappers
    peeked = []
    real_peek = store.peek

    def counting_peek(ns, key):
        peeked.append(key)
        return real_peek(ns, key)
    monkeypatch.setattr(store, "peek", counting_peek)
    seen, stop, fut = _watch(loop, lambda: len(peeked))
    try:
        req = pb.HeadsRequest(namespace="ec", keys=keys + [b"absent"], head_bytes=8)
        r = asyncio.run_coroutine_threadsafe(heads(svc, req, None), loop).result(30)
    finally:
        stop.set()
        fut.result(10)
    assert [h.present for h in r.heads] == [True] * 64 + [False]
    assert all(h.head == b"v" * 8 and h.size == 100 for h in r.heads[:64])
    assert any(0 < n < 65 for n in seen), f"no turn of the loop inside Heads: {sorted(set(seen))}"


@pytest.mark.parametrize("rpc", ["Exists", "Lookup", "Pin", "Unpin", "Delete"])
def test_batch_calls_give_the_loop_back_between_steps(node, monkeypatch, rpc):
    """A client's batch call of many keys (up to max_batch_keys, 65,536) runs in steps of
    BATCH_STEP keys with a turn of the loop between them (looplag.run_sliced)."""
    from kvstore.v1 import control_pb2 as pb
    from kvstored.config import load_config
    from kvstored.control.service import ControlService
    from kvstored.dataplane.policy import EpochGate
    from kvstored.engine import store as store_mod

    store, loop, local = node
    monkeypatch.setattr(looplag, "SLICE_S", 0.0)
    monkeypatch.setattr(store_mod, "BATCH_STEP", 4)
    keys = [b"b%03d" % i for i in range(40)]
    assert local.put_many(NS, [(k, b"v" * 100) for k in keys], overwrite=False) == [True] * 40
    if rpc == "Unpin":
        assert store.pin(NS, keys, 60) == 40
    svc = ControlService(store, load_config(None), None, data=None, stats=None, gate=EpochGate())
    handler = getattr(ControlService, rpc).__wrapped__.__wrapped__
    req = (pb.PinRequest(namespace="ec", keys=keys, ttl_seconds=60) if rpc == "Pin"
           else pb.KeysRequest(namespace="ec", keys=keys))
    reached = []

    class CountingIndex:  # the native index's methods cannot be patched: a proxy counts gets
        def __init__(self, real):
            self._real = real

        def __getattr__(self, name):
            return getattr(self._real, name)

        def get(self, ns, key):
            reached.append(key)
            return self._real.get(ns, key)

        def present(self, ns, keys):  # Exists: a step's keys at once
            reached.extend(keys)
            return self._real.present(ns, keys)

        def prefix(self, ns, keys):  # Lookup: likewise
            reached.extend(keys)
            return self._real.prefix(ns, keys)
    monkeypatch.setattr(store, "index", CountingIndex(store.index))
    # the policy touches by key in the index it was built over (the Lru checks it is its own)
    touch_keys = store.policy.touch_keys
    monkeypatch.setattr(store.policy, "touch_keys",
                        lambda index, ns, keys: touch_keys(getattr(index, "_real", index), ns, keys))
    seen, stop, fut = _watch(loop, lambda: len(set(reached)))
    try:
        r = asyncio.run_coroutine_threadsafe(handler(svc, req, None), loop).result(30)
    finally:
        stop.set()
        fut.result(10)
    want = {"Exists": lambda: list(r.exists) == [True] * 40, "Lookup": lambda: r.count == 40,
            "Pin": lambda: r.count == 40, "Unpin": lambda: r.count == 40,
            "Delete": lambda: list(r.deleted) == [True] * 40 and r.count == 40}[rpc]
    assert want(), r
    assert any(0 < n < 40 for n in seen), f"no turn of the loop inside {rpc}: {sorted(set(seen))}"


def test_concurrent_sliced_deletes_report_each_key_once(node, monkeypatch):
    """Two Delete calls of the same keys interleave step by step now: each key is still
    reported deleted by exactly one of them, and a Lookup beside them never counts past
    a key already gone."""
    from kvstore.v1 import control_pb2 as pb
    from kvstored.config import load_config
    from kvstored.control.service import ControlService
    from kvstored.dataplane.policy import EpochGate
    from kvstored.engine import store as store_mod

    store, loop, local = node
    monkeypatch.setattr(looplag, "SLICE_S", 0.0)
    monkeypatch.setattr(store_mod, "BATCH_STEP", 3)
    keys = [b"d%03d" % i for i in range(60)]
    assert local.put_many(NS, [(k, b"v" * 64) for k in keys], overwrite=False) == [True] * 60
    svc = ControlService(store, load_config(None), None, data=None, stats=None, gate=EpochGate())
    delete = ControlService.Delete.__wrapped__.__wrapped__
    lookup = ControlService.Lookup.__wrapped__.__wrapped__
    req = pb.KeysRequest(namespace="ec", keys=keys)

    async def both():
        return await asyncio.gather(delete(svc, req, None), lookup(svc, req, None),
                                    delete(svc, req, None))
    a, lk, b = asyncio.run_coroutine_threadsafe(both(), loop).result(30)
    assert [x + y for x, y in zip(a.deleted, b.deleted)] == [1] * 60
    assert a.count + b.count == 60
    assert lk.count == 0  # the first Delete's first step (keys 0-2) ran before the Lookup's
    assert local.read_many([(NS, k) for k in keys]) == [None] * 60
