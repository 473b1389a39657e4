"""An identical re-put commits the object again: its ``committed_at`` becomes the put's
time on every path a put takes (Store._same, Store._replace), for DRAM-resident and
NVMe-only entries, on both indexes (tests/engine/conftest.py). A cluster's repair
compares that time with the deletes peers report (kvstored/cluster/repair/decide.py);
the cluster-side checks are in tests/cluster/test_delete_history.py.

On NVMe the refresh is kept in memory only: a restart reads the time the record was
written with (its header and summary), while a DRAM-only record flushed at a clean stop
is written with the refreshed time."""
from __future__ import annotations

import asyncio
import time

import pytest

from kvstore.errors import Conflict
from kvstore.wire import checksum
from kvstored.engine import Store, StoreLimits
from kvstored.engine.nvme import NvmeDevice, NvmeTier
from fakes import Clock

KiB, MiB = 1 << 10, 1 << 20
NS = b"ns"
OLD = 1_000_000.0  # a commit time long past (wall clock): what a refresh replaces


def _store(**kw) -> Store:
    return Store(StoreLimits(dram_size=8 * MiB, slab_size=MiB, max_value_size=MiB,
                             hugepages=False, prefault=False, put_wait_timeout=0.5),
                 clock=Clock(), **kw)


def _aged(s: Store, key: bytes) -> None:
    s.index.get(NS, key).committed_at = OLD


def _at(s: Store, key: bytes) -> float:
    return s.index.get(NS, key).committed_at


def test_every_put_path_refreshes_an_identical_objects_commit_time():
    s = _store()
    try:
        data, other = b"a" * (3 * KiB), b"b" * (3 * KiB)
        cs = checksum(data)
        assert s.put_bytes(NS, b"k", data) is True
        before = time.time()

        def refreshed_by(put) -> None:
            _aged(s, b"k")
            put()
            assert before <= _at(s, b"k") <= time.time() + 1, put

        # buffered TCP / control puts (put_bytes), with and without the overwrite flag
        refreshed_by(lambda: s.put_bytes(NS, b"k", data) is False or pytest.fail("stored"))
        refreshed_by(lambda: s.put_bytes(NS, b"k", data, cs, overwrite=True))
        # a reservation put whose checksum came with the header: reserve finds it stored
        refreshed_by(lambda: s.reserve(NS, b"k", len(data), cs) is None or pytest.fail("slot"))
        # a data-plane put over its bounds, a shm commit: answered from the index
        refreshed_by(lambda: s.dedup(NS, b"k", len(data), cs) or pytest.fail("not a dedup"))

        # two puts of a new key reserved at once (the checksum declared, or known only at
        # commit: shm): the second finds it stored at commit (_replace)
        for i, declared in enumerate((cs, None)):
            key = b"race%d" % i
            r1 = s.reserve(NS, key, len(data), declared)
            r2 = s.reserve(NS, key, len(data), declared)
            r1.view[:] = data
            r2.view[:] = data
            assert s.commit(r1) is True
            _aged(s, key)
            assert s.commit(r2) is False
            assert before <= _at(s, key) <= time.time() + 1, declared
        # what is not an identical re-put of it changes nothing: other bytes (refused),
        # another key, a read
        _aged(s, b"k")
        with pytest.raises(Conflict):
            s.put_bytes(NS, b"k", other)
        with pytest.raises(Conflict):
            s.reserve(NS, b"k", len(other), checksum(other))
        assert s.put_bytes(NS, b"k5", data) is True
        assert s.put_bytes(b"other-ns", b"k", data) is True
        e = s.acquire(NS, b"k")
        assert bytes(s.view(e)) == data
        s.release(e)
        assert _at(s, b"k") == OLD
        assert s.counters["dedups"] == 6
    finally:
        s.close()


def _nvme_store(path, hold: bool = False) -> Store:
    dev = NvmeDevice(str(path), MiB + 2 * 16 * MiB, 16 * MiB, "auto", 32)
    return _store(nvme=NvmeTier(dev, admission="all"), hold_recovered=hold)


def test_nvme_only_records_are_refreshed_in_memory_and_a_restart_reads_the_written_time(tmp_path):
    """No NVMe write per refresh: a restart sees the time an NVMe record was written with
    (an NVMe-only record re-put since: its first commit), while a DRAM-only one flushed
    at the clean stop carries its refreshed time."""
    path = tmp_path / "t.nvme"
    spilled, dram_only = b"s" * (4 * KiB), b"d" * (4 * KiB)

    async def first_life() -> tuple[float, float]:
        s = _nvme_store(path)
        try:
            assert s.put_bytes(NS, b"spilled", spilled)
            e = s.index.get(NS, b"spilled")
            s.tiering.evict(e)  # written to NVMe, its DRAM copy dropped
            await s.drain_tasks(10)
            e = s.index.get(NS, b"spilled")
            assert e.offset < 0 and e.nvme is not None
            written = e.committed_at
            _aged(s, b"spilled")  # (in memory: the NVMe record keeps ``written``)
            writes = dict(s.nvme.counters)
            t0 = time.time()
            assert s.put_bytes(NS, b"spilled", spilled) is False  # buffered put
            assert t0 <= _at(s, b"spilled")
            _aged(s, b"spilled")
            assert s.reserve(NS, b"spilled", len(spilled), checksum(spilled)) is None
            assert t0 <= _at(s, b"spilled")
            e = s.index.get(NS, b"spilled")
            assert e.offset < 0, "a re-put does not bring an NVMe-only record back to DRAM"
            await s.drain_tasks(10)
            assert (s.nvme.counters["bytes_written"], s.nvme.counters["demotions"]) == \
                (writes["bytes_written"], writes["demotions"]), "a refresh wrote nothing"
            assert s.put_bytes(NS, b"dram", dram_only)
            _aged(s, b"dram")
            assert s.put_bytes(NS, b"dram", dram_only) is False
            refreshed = _at(s, b"dram")
            assert refreshed >= t0 and s.index.get(NS, b"dram").nvme is None
            assert await s.flush_to_nvme(10) == 1  # the clean stop's flush
            await s.drain_tasks(10)
            return written, refreshed
        finally:
            s.close()

    async def second_life(written: float, refreshed: float) -> None:
        s = _nvme_store(path, hold=True)  # a cluster node: held until repair checks them
        try:
            assert s.unverified == 2
            assert _at(s, b"spilled") == written  # the refresh was forgotten: see store._same
            assert _at(s, b"dram") == refreshed
            rows = {r[1]: r for r in await s.repair_snapshot()}
            assert rows[b"spilled"][8] == written and rows[b"dram"][8] == refreshed
            # a client's re-put vouches for the held record and refreshes it again
            t1 = time.time()
            assert s.put_bytes(NS, b"spilled", spilled) is False
            assert t1 <= _at(s, b"spilled") and not s.index.get(NS, b"spilled").unverified
        finally:
            s.close()

    written, refreshed = asyncio.run(first_life())
    assert written > OLD and refreshed >= written
    asyncio.run(second_life(written, refreshed))


def test_a_repair_write_of_the_same_bytes_keeps_the_commit_time():
    """A cluster repair's copy (recommit=False: FLAG_REPAIR puts, the agent's own store
    writes) is not a client's commit. Refreshed by it, a node that missed a client's delete
    and then got a peer's copy written before that delete held a record newer than the
    delete: repair kept it and copied it back, and the deleted object was served again
    (test_chaos, seed 485279573). Each repair path."""
    s = _store()
    try:
        data = b"r" * (3 * KiB)
        cs = checksum(data)
        assert s.put_bytes(NS, b"k", data) is True
        _aged(s, b"k")
        # the data plane's FLAG_REPAIR put: answered from the index, or reserve finds it
        assert s.dedup(NS, b"k", len(data), cs, recommit=False)
        assert s.reserve(NS, b"k", len(data), cs, recommit=False) is None
        # the agent's own writes (checksum None, decided at commit: _replace)
        res = s.reserve(NS, b"k", len(data), None, recommit=False)
        res.view[:] = data
        assert s.commit(res) is False

        async def waited():
            return await s.reserve_wait(NS, b"k", len(data), cs, recommit=False)
        assert asyncio.run(waited()) is None
        assert _at(s, b"k") == OLD
        assert s.counters["dedups"] == 4
        # and a client's put after them all commits it again
        assert s.put_bytes(NS, b"k", data) is False and _at(s, b"k") > OLD
    finally:
        s.close()
