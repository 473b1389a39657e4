"""Repair's batches on the event loop give it back between records (LocalStore's slices),
so clients' requests are served in the middle of a rebuild, not after a whole batch.

A real engine Store on a real asyncio loop in a thread, as in the daemon. With the slice
set to 0 every record is a turn of its own: a ticker task on the same loop must see the
store part-way through a batch (some records stored, not all; some read, not all)."""
from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from kvstored.cluster.repair import local as local_mod
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
    monkeypatch.setattr(local_mod, "LOOP_SLICE_S", 0.0)
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
    assert 0 < local_mod.LOOP_SLICE_S <= 0.01
    out = local.put_many(NS, [(b"s%d" % i, b"x" * 64) for i in range(4)], overwrite=False)
    assert out == [True] * 4
    assert [bytes(g) for g in local.read_many([(NS, b"s%d" % i) for i in range(4)])] == [b"x" * 64] * 4
