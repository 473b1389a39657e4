"""Store.delete_all / keys_async / sample_keys over NVMe-only (keyless) objects.

DeleteAll used to read every keyless object's key with one synchronous header read on
the event loop (Store.keys), then start one tombstone task per object all at once. Now
the walk goes in steps, reads keys per region in bulk (NvmeTier.keys_at) and waits for a
step's tombstones before the next. These tests check what a user relies on: the objects
are gone and stay gone after a restart, a corrupt header never fails the call, the loop
keeps serving puts and gets meanwhile, objects put meanwhile are kept.
"""
from __future__ import annotations

import asyncio
import gc
import mmap
import time

import pytest

from kvstore.errors import NotFound
from kvstore.wire import checksum
from kvstored.engine import Store, StoreLimits
from kvstored.engine.nvme import BLOCK, NvmeDevice, NvmeTier, align_up

from test_nvme import NS, MiB, put, read, settle, val
from test_nvme_keyless import make_store, put_then_demote_all

# a fixed amount of disk and CPU work: up to 24 s a test at load 12 here, so a 3-4x slower
# CI machine comes near the suite's 120 s hang guard; this limit still only catches a hang
pytestmark = pytest.mark.timeout(300)

OTHER = b"other"


async def put_ns(s: Store, ns: bytes, key: bytes, data: bytes) -> None:
    res = await s.reserve_wait(ns, key, len(data), checksum(data), False)
    if res is not None:
        res.view[:] = data
        s.commit(res)


def test_delete_all_of_a_namespace_then_of_everything_stays_deleted_after_restart(tmp_path, index_kind):
    path = tmp_path / "t.dat"
    keys = [b"k%02d" % i for i in range(16)]
    others = [b"o%d" % i for i in range(4)]

    async def first():
        s = make_store(path, dram=32 * MiB)
        try:
            for i, k in enumerate(others):
                await put_ns(s, OTHER, k, val(100 + i))
            await put_then_demote_all(s, keys)  # every object NVMe-only (keyless when packed)
            assert all(e.key_in_ram == (index_kind == "dict") for e in s.index.iterate())
            r = await s.delete_all(NS)
            assert r == (len(keys), 0, 0)
            assert s.exists(NS, keys) == [False] * len(keys)
            for k in keys[:3]:
                with pytest.raises(NotFound):
                    await read(s, k)
            assert s.exists(OTHER, others) == [True] * len(others)
        finally:
            await settle(s)
            s.close()

    async def second():
        s = make_store(path, dram=32 * MiB)
        try:
            assert s.exists(NS, keys) == [False] * len(keys), "a deleted object came back"
            assert s.object_count() == len(others)
            r = await s.delete_all(None)
            assert (r.deleted, r.unreadable) == (len(others), 0)
            assert s.object_count() == 0
        finally:
            await settle(s)
            s.close()

    async def third():
        s = make_store(path, dram=32 * MiB)
        try:
            assert s.object_count() == 0, "objects came back after DeleteAll of everything"
        finally:
            s.close()

    asyncio.run(first())
    asyncio.run(second())
    asyncio.run(third())


def test_a_corrupt_header_among_them_is_deleted_through_the_summary_and_stays_deleted(tmp_path, index_kind):
    """A keyless object whose header no longer verifies: its key is read from its region's
    summary (keys_at), so it is deleted with a tombstone like the others; nothing raises."""
    if index_kind == "dict":
        pytest.skip("the dict index keeps every key in RAM")
    path = tmp_path / "t.dat"
    keys = [b"k%02d" % i for i in range(6)]  # few: keys_at reads headers, then the summary

    async def first():
        s = make_store(path, dram=32 * MiB)
        try:
            await put_then_demote_all(s, keys)
            bad = s.index.get(NS, b"k03")
            assert not bad.key_in_ram
            with open(path, "r+b") as f:  # scribble inside its header
                f.seek(bad.nvme.offset + 40)
                f.write(b"\xff" * 8)
            r = await s.delete_all(NS)
            assert (r.deleted, r.unreadable) == (len(keys), 0)
            assert s.object_count() == 0
        finally:
            await settle(s)
            s.close()

    async def second():
        s = make_store(path, dram=32 * MiB)
        try:
            assert s.exists(NS, keys) == [False] * len(keys)
        finally:
            s.close()

    asyncio.run(first())
    asyncio.run(second())


def test_an_unreadable_key_is_removed_counted_and_never_fails_the_call(tmp_path, index_kind, caplog):
    """Header and summary both unreadable (the region's summary scribbled as well, after a
    restart so that it is read from disk): the entry still leaves the index, counted in
    ``unreadable`` and logged; the others are deleted; after a restart none comes back."""
    if index_kind == "dict":
        pytest.skip("the dict index keeps every key in RAM")
    path = tmp_path / "t.dat"
    keys = [b"k%02d" % i for i in range(6)]

    async def fill():
        s = make_store(path, dram=32 * MiB)
        try:
            await put_then_demote_all(s, keys)
        finally:
            await settle(s)
            s.close()

    async def delete():
        s = make_store(path, dram=32 * MiB)
        try:
            bad = s.index.get(NS, b"k02")
            assert bad is not None and not bad.key_in_ram
            r0 = s.nvme.regions[bad.nvme.region]
            with open(path, "r+b") as f:
                f.seek(bad.nvme.offset + 40)  # its header
                f.write(b"\xff" * 8)
                f.seek(r0.base + r0.size - BLOCK + 8)  # its region's summary trailer
                f.write(b"\xff" * 8)
            r0.summary = None  # (a recovered region may keep its summary in memory: not this case)
            r = await s.delete_all(NS)
            assert (r.deleted, r.unreadable) == (len(keys), 1)
            assert s.object_count() == 0
            assert "removed without a tombstone" in caplog.text
        finally:
            await settle(s)
            s.close()

    async def reopen():
        s = make_store(path, dram=32 * MiB)
        try:
            assert s.object_count() == 0  # the unreadable record cannot be indexed either
        finally:
            s.close()

    asyncio.run(fill())
    asyncio.run(delete())
    asyncio.run(reopen())


N_MANY = 12000  # the old code's synchronous walk alone takes ~1 s here (~100 us an object)
REGION = 16 * MiB


def many_store(path) -> Store:
    per_region = (REGION - 2 * BLOCK) // (2 * BLOCK) - 8
    regions = -(-N_MANY // per_region) + -(-N_MANY * BLOCK // REGION) + 3  # + tombstones
    dev = NvmeDevice(str(path), MiB + regions * REGION, REGION, "threads", 32)
    limits = StoreLimits(dram_size=16 * MiB, slab_size=MiB, max_value_size=MiB, prefault=False,
                         put_wait_timeout=2.0)
    return Store(limits, nvme=NvmeTier(dev))


async def fill_many(path) -> None:
    """N_MANY records of 512 B written straight to a tier (as a node's disk holds them
    after a restart): the Store opened on it indexes them all NVMe-only."""
    s = many_store(path)
    tier = s.nvme
    data = bytes(range(256)) * 2
    buf = mmap.mmap(-1, align_up(len(data)))  # page-aligned: the tier may write O_DIRECT
    buf[:len(data)] = data
    view = memoryview(buf)
    cs = checksum(data)
    todo = iter(range(N_MANY))
    past = time.time() - 60

    async def writer():
        for i in todo:
            await tier.append(NS, b"key-%06d" % i, view, len(data), cs, align_up(len(data)), past)
    try:
        await asyncio.gather(*(writer() for _ in range(16)))
    finally:
        await settle(s)
        s.close()


def test_delete_all_keeps_the_loop_serving_and_keeps_what_is_put_meanwhile(tmp_path, index_kind):
    path = tmp_path / "t.dat"
    asyncio.run(fill_many(path))

    async def run():
        s = many_store(path)
        try:
            assert s.object_count() == N_MANY
            done = started = False
            worst = 0.0
            early = []
            ops = 0
            fresh = []

            async def data_path():
                # puts and gets on the loop while the walk runs: each round's gap is the stall
                nonlocal worst, ops
                # the stall is the loop's own work between two rounds: this thread's CPU
                # time, which other processes on a loaded machine do not stretch (its wall
                # time they do: 0.64 s seen at load 10)
                last = time.thread_time()
                for i in range(100000):  # bounded; ends with the walk
                    if done:
                        return
                    k = b"new-%05d" % i
                    began = started  # a put begun before the walk may be deleted by it
                    await put(s, k, b"v" * 1000)
                    (fresh if began else early).append(k)
                    assert await read(s, k) == b"v" * 1000
                    if i == 5:  # an old object overwritten meanwhile keeps its new value
                        await put(s, b"key-%06d" % (N_MANY - 1), b"w" * 700, overwrite=True)
                    ops += 1
                    await asyncio.sleep(0.002)
                    now = time.thread_time()
                    worst = max(worst, now - last)
                    last = now

            task = asyncio.get_running_loop().create_task(data_path())
            await asyncio.sleep(0.01)
            t0 = time.perf_counter()
            started = True
            r = await s.delete_all(NS)
            took = time.perf_counter() - t0
            done = True
            await asyncio.wait_for(task, 10)
            assert ops > 5
            assert worst < 0.5, f"the loop worked {worst:.3f} s of CPU without serving during DeleteAll ({took:.2f} s)"
            assert r.unreadable == 0
            assert r.deleted >= N_MANY - 1
            assert r.kept_newer <= len(fresh) + 1
            # every object put meanwhile is kept; every older one is gone
            assert s.exists(NS, fresh) == [True] * len(fresh)
            assert await read(s, b"key-%06d" % (N_MANY - 1)) == b"w" * 700
            assert s.object_count() == len(fresh) + 1 + sum(s.exists(NS, early))
            assert s.exists(NS, [b"key-%06d" % i for i in range(0, N_MANY - 1, 97)]) == \
                [False] * len(range(0, N_MANY - 1, 97))
            await s.flush_to_nvme(10)
            left = s.object_count()
        finally:
            await settle(s)
            s.close()
        return fresh, left

    # the daemon freezes its heap once ready (kvstored/__main__.py: gc.freeze); a test
    # worker's heap holds what earlier tests left, and one full collection of it on the
    # loop's thread is not DeleteAll's stall (0.618 s was seen once in a loaded CI run, 0.05 s
    # usual; a collection is the likely cause, not proven)
    gc.collect()
    gc.freeze()
    try:
        fresh, left = asyncio.run(run())
    finally:
        gc.unfreeze()

    async def reopen():
        s = many_store(path)
        try:
            assert s.object_count() == left, "old objects came back after a restart"
            assert s.exists(NS, fresh) == [True] * len(fresh)
        finally:
            s.close()
    asyncio.run(reopen())


def test_sample_keys_and_keys_async_read_keyless_keys_in_bulk(tmp_path, index_kind):
    async def run():
        s = make_store(tmp_path / "t.dat", dram=32 * MiB)
        try:
            keys = [b"k%02d" % i for i in range(12)]
            await put_then_demote_all(s, keys)
            await put(s, b"dram", b"d" * 100)  # one with a DRAM copy and its key in RAM
            want = sorted(keys + [b"dram"])
            assert sorted(k for _ns, k in await s.keys_async(NS)) == want
            assert sorted(k for _ns, k in await s.keys_async(None)) == want
            assert await s.keys_async(b"nope") == []
            got = await s.sample_keys(NS, 100)
            assert sorted(k for _e, k in got) == want
            for e, k in got:
                assert s.index.get(NS, k) is e
            assert len(await s.sample_keys(NS, 5)) == 5
            assert await s.sample_keys(b"nope", 5) == []
        finally:
            await settle(s)
            s.close()
    asyncio.run(run())
