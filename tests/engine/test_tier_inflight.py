"""A record's buffers belong to the kernel until its write has ended: a demotion's DRAM
slot and its batch's header blocks are given back only then, whether the demotion
writer is cancelled meanwhile or an earlier write of the same region fails while it is
in flight; and the tier's own tasks (fdatasync waits of ``sync = always``) are held,
waited for and their failures logged. A real NVMe tier on a file with the thread
backend, whose ``pwritev`` is held at a gate (a worker thread blocked where the kernel
would be reading the buffers)."""
import asyncio
import errno
import threading

import pytest

from kvstored.engine import nvme as nvme_mod, nvmeio, tiering
from test_nvme import NS, make_store, put, read, settle
from test_nvme_demotion_batch import until, val

SLOT = 4096  # one page: the kernel reads the arena slot itself (no bounce page)


class GatedPwrite:
    """``nvmeio._pwritev_all`` with a record's write (header and payload: two buffers or
    more) held in its worker thread until ``open`` (bounded), or failed at once when
    ``fail(payload)`` says so. Region header writes (one buffer) go through."""

    def __init__(self, monkeypatch, fail=lambda payload: False):
        self.real = nvmeio._pwritev_all
        self.fail = fail
        self.gate = threading.Event()
        self.held = threading.Event()  # a write is waiting at the gate
        monkeypatch.setattr(nvmeio, "_pwritev_all", self)

    def __call__(self, fd, bufs, offset):
        if len(bufs) >= 2:
            if self.fail(bytes(bufs[1][:SLOT])):
                raise OSError(errno.EIO, "injected EIO")
            self.held.set()
            self.gate.wait(30)  # bounded: a failing test must not hang the pool's shutdown
        return self.real(fd, bufs, offset)


async def loop_rounds(n: int = 20) -> None:
    """Let the loop run what is ready (a cancellation's delivery, completion callbacks)."""
    for _ in range(n):
        await asyncio.sleep(0)


def test_a_cancelled_writer_keeps_its_slots_until_the_writes_end(tmp_path, monkeypatch):
    """The demotion writer is cancelled while its batch's write is in the kernel: the
    object keeps its DRAM slot (a new put must not get it and have its bytes written under
    the old record's header) until the write ends; then it is demoted, and it reads back
    the same, now and after a restart."""
    monkeypatch.setattr(tiering, "DEMOTION_WRITERS", 1)
    path = tmp_path / "t.dat"
    old, new = val(1, SLOT), val(2, SLOT)

    async def run():
        s = make_store(path, backend="threads")
        gated = GatedPwrite(monkeypatch)
        try:
            await put(s, b"old", old)
            e = s.index.get(NS, b"old")
            assert not s.tiering.evict(e)  # a demotion started
            await until(gated.held.is_set, "the batch's write is in the kernel")
            writers = set(s.tiering._writers)
            for t in writers:
                t.cancel()
            await loop_rounds()
            assert s.index.get(NS, b"old") is e and e.offset >= 0 and e.refs == 1
            await put(s, b"new", new)  # must not get the slot being written
            assert s.index.get(NS, b"new").offset != e.offset
            gated.gate.set()
            await asyncio.wait(writers, timeout=30)
            assert all(t.cancelled() for t in writers)  # the cancellation still stands
            assert e.nvme is not None and e.offset < 0  # demoted once its write ended
            assert not s.nvme.writing and s.dram.demoting_bytes == 0
            assert await read(s, b"old") == old and await read(s, b"new") == new
        finally:
            gated.gate.set()
            await settle(s)
            s.close()
        s = make_store(path, backend="threads")
        try:
            assert await read(s, b"old") == old
            assert s.nvme.counters["checksum_failures"] == 0
        finally:
            s.close()

    asyncio.run(run())


def test_a_failed_write_does_not_free_a_later_one_still_in_flight(tmp_path, monkeypatch):
    """Two runs of one batch in one region: the first write fails while the second is
    still in the kernel. The second's objects fail too (their region is sealed), but their
    slots are given back only once their own write has ended, and the region is not
    reused before."""
    monkeypatch.setattr(tiering, "DEMOTION_WRITERS", 1)
    monkeypatch.setattr(nvme_mod, "RUN_MAX_BYTES", 2 * SLOT)  # a run per record
    first, second, new = val(1, SLOT), val(2, SLOT), val(3, SLOT)

    async def run():
        s = make_store(tmp_path / "t.dat", backend="threads")
        gated = GatedPwrite(monkeypatch, fail=lambda payload: payload == first)
        try:
            await put(s, b"first", first)
            await put(s, b"second", second)
            e2 = s.index.get(NS, b"second")
            for k in (b"first", b"second"):
                assert not s.tiering.evict(s.index.get(NS, k))
            await until(lambda: gated.held.is_set() and s.nvme.counters["write_errors"] == 1,
                        "the first write failed, the second is in the kernel")
            await loop_rounds()
            assert s.index.get(NS, b"second") is e2 and e2.offset >= 0 and e2.refs == 1
            region = s.nvme.regions[[r.index for r in s.nvme.regions if r.pending][0]]
            assert region.state == "full" and region.pending  # sealed, not reclaimable yet
            await put(s, b"new", new)
            assert s.index.get(NS, b"new").offset != e2.offset
            gated.gate.set()
            await until(lambda: not s.tiering._writers, "the writer ended")
            # the region header's own write (a task of its own, rel 0) may end after the
            # writer under load: every write of the region must end, none stay pending
            await until(lambda: not region.pending, "every write of the region ended")
            assert s.index.get(NS, b"first") is None and s.index.get(NS, b"second") is None
            assert s.nvme.counters["demotion_failures"] == 2  # lost, and said so
            assert s.dram.demoting_bytes == 0 and not s.nvme.writing
            assert await read(s, b"new") == new
        finally:
            gated.gate.set()
            await settle(s)
            s.close()

    asyncio.run(run())


def test_sync_always_waits_are_held_and_a_failure_is_logged(tmp_path, monkeypatch, caplog):
    """With ``sync = always`` a batch's runs wait for an fdatasync in tasks of the tier's
    own: while the fdatasync is held they are listed in ``NvmeTier.tasks`` (none can be
    collected mid-flight), ``drain_tasks`` waits for them, and one that fails is logged."""
    sync_gate = threading.Event()
    real_sync = nvme_mod.os.fdatasync

    def held_fdatasync(fd):
        sync_gate.wait(30)
        real_sync(fd)

    async def run():
        s = make_store(tmp_path / "t.dat", backend="threads", sync="always")
        try:
            for i in range(4):
                await put(s, b"k%d" % i, val(i, SLOT))
            monkeypatch.setattr(nvme_mod.os, "fdatasync", held_fdatasync)
            for i in range(4):
                assert not s.tiering.evict(s.index.get(NS, b"k%d" % i))
            await until(lambda: s.nvme.tasks, "a run waits for its fdatasync")
            held = set(s.nvme.tasks)
            sync_gate.set()
            await s.drain_tasks(30)
            assert all(t.done() for t in held) and not s.nvme.tasks
            assert all(s.index.get(NS, b"k%d" % i).nvme is not None for i in range(4))

            def broken(*a):  # a bug in what a run's wait calls next
                raise RuntimeError("injected bug")
            monkeypatch.setattr(s.nvme, "_write_done", broken)
            await put(s, b"late", val(9, SLOT))
            s.tiering.evict(s.index.get(NS, b"late"))
            await until(lambda: "NVMe tier task failed" in caplog.text, "the failure logged")
        finally:
            sync_gate.set()
            monkeypatch.undo()
            for r in s.nvme.regions:  # the broken run's waiter: no writer left waiting on it
                for p in r.pending.values():
                    if not p.waiter.done():
                        p.waiter.set_exception(OSError(errno.EIO, "test cleanup"))
            await settle(s)
            s.close()

    asyncio.run(run())


def test_a_tombstone_append_cancelled_in_flight_is_still_recorded(tmp_path, monkeypatch):
    """A tombstone's append whose caller is cancelled while the write is in the kernel:
    the write lands (header on disk, entry in the region's summary), so the region keeps
    it in ``tombs`` (carried when the region is reclaimed; one left out let a deleted
    object come back after a restart) and counts it; the cancellation still reaches the
    caller. A write that fails under a cancellation raises the cancellation."""
    path = tmp_path / "t.dat"

    class GatedTombstone(GatedPwrite):
        armed = False

        def __call__(self, fd, bufs, offset):
            if self.armed and len(bufs) == 1:  # the tombstone's header block
                self.held.set()
                self.gate.wait(30)
                if self.fail(b""):
                    raise OSError(errno.EIO, "injected EIO")
            return self.real(fd, bufs, offset)

    async def run(fail: bool):
        s = make_store(path, backend="threads")
        gated = GatedTombstone(monkeypatch, fail=lambda _p: fail)
        try:
            await put(s, b"k", val(1, SLOT))  # a region open for the tombstone
            nv = s.nvme
            before = nv.counters["tombstones"]
            gated.armed = True
            t = asyncio.ensure_future(nv.append(NS, b"gone", None, 0, 0, 0, 0.0, tombstone=True))
            await until(gated.held.is_set, "the tombstone's write is in the kernel")
            t.cancel()
            await loop_rounds()
            assert not t.done()  # it waits for the write
            gated.gate.set()
            await asyncio.wait([t], timeout=30)
            assert t.cancelled()
            if fail:
                assert nv.counters["tombstones"] == before
            else:
                assert nv.counters["tombstones"] == before + 1
                assert any((NS, b"gone") in r.tombs for r in nv.regions), "the tombstone is not kept"
        finally:
            gated.gate.set()
            await settle(s)

    asyncio.run(run(False))
    path.unlink()
    asyncio.run(run(True))
