"""Demotions go to NVMe in batches (Tiering's demotion writers, NvmeTier.append_batch):
what happens to a batch's records when they are deleted or overwritten while it is in
flight or still queued, when the shutdown flush comes while it is in flight, and when one
of its writes fails. A real NVMe tier on a file; the writes are the real ones, their
completions held back (``GatedWrites``) so a batch stays in flight for as long as a test
needs."""
import asyncio
import contextlib

import pytest

from kvstore.errors import NotFound
from kvstored.engine import tiering
from test_nvme import NS, make_store, put, read, settle

SMALL, LARGE = 4096, 16384


def val(i: int, size: int = SMALL) -> bytes:
    return bytes([i % 251, 7]) * (size // 2)


class GatedWrites:
    """The tier's batch writes (``writev_many``), each write's completion held until
    ``release`` lets it go. ``fail(bufs)`` may name an OSError: that write is not done and
    fails so."""

    def __init__(self, store, fail=None):
        self.io = store.nvme.dev.io
        self.real = self.io.writev_many
        self.fail = fail
        self.held: list[asyncio.Event] = []  # one per write, in submission order
        self.all_released = False
        self.io.writev_many = self

    @property
    def writes(self) -> int:
        return len(self.held)

    def release(self, first: int | None = None) -> None:
        """Let the first ``first`` writes complete (None: all, and every later one)."""
        if first is None:
            self.all_released = True
        for ev in self.held[:first]:
            ev.set()

    def __call__(self, reqs):
        loop = asyncio.get_running_loop()
        out = []
        for offset, bufs in reqs:
            ev = asyncio.Event()
            self.held.append(ev)
            if self.all_released:
                ev.set()
            err = self.fail(bufs) if self.fail else None
            real = None if err else self.real([(offset, bufs)])[0]
            o = loop.create_future()
            loop.create_task(self._relay(ev, real, o, err))
            out.append(o)
        return out

    async def _relay(self, ev, real, o, err):
        await ev.wait()
        if err is not None:
            o.set_exception(err)
            return
        try:
            o.set_result(await real)
        except OSError as e:
            o.set_exception(e)


def evict_all(s) -> int:
    """Demote every DRAM object now (watermarks at 0): the way a full node evicts."""
    limits = s.limits
    was = limits.high_watermark, limits.low_watermark
    limits.high_watermark = limits.low_watermark = 0.0
    try:
        return s.maybe_evict()
    finally:
        limits.high_watermark, limits.low_watermark = was


async def until(cond, what: str, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():  # bounded: the writers take their batches within a few loop rounds
        if loop.time() > deadline:
            raise AssertionError(f"not reached in {timeout} s: {what}")
        await asyncio.sleep(0.001)


def in_flight(s):
    """(entries whose batch is being written, entries still queued)."""
    queued = [e for e, _seq, _key in s.tiering._queue]
    ids = {id(e) for e in queued}
    writing = [e for e in s.index.values()
               if e.nvme is None and e.offset >= 0 and e.refs and id(e) not in ids]
    return writing, queued


def test_delete_and_overwrite_while_a_batch_is_in_flight_or_queued(tmp_path):
    """Deleted or replaced objects whose demotion is in flight or queued never come back:
    not now, not after a restart; a queued one is not written at all. Until its batch is
    durable an object is served from DRAM."""
    path = tmp_path / "t.dat"
    n = 400  # more than the writers take at once: some stay queued
    cap = tiering.DEMOTION_WRITERS * tiering.DEMOTION_BATCH_RECORDS
    assert n > cap

    async def first():
        s = make_store(path, regions=4)
        try:
            for i in range(n):
                await put(s, b"k%d" % i, val(i))
            gated = GatedWrites(s)
            assert evict_all(s) == n
            await until(lambda: len(s.tiering._queue) == n - cap, "the writers took their batches")
            writing, queued = in_flight(s)
            assert len(writing) == cap and len(queued) == n - cap
            # served from DRAM while its record is not durable
            k = writing[0].key
            assert await read(s, k) == val(int(k[1:]))
            gone = [writing[i].key for i in range(0, 60, 3)] + [queued[i].key for i in range(0, 60, 3)]
            replaced = [writing[i].key for i in range(1, 60, 3)] + [queued[i].key for i in range(1, 60, 3)]
            assert s.delete(NS, gone) == len(gone)
            for k in replaced:
                await put(s, k, val(1000 + int(k[1:])), overwrite=True)
            gated.release()
            await settle(s)
            assert not s.tiering._queue and s.dram.demoting_bytes == 0 and not s.nvme.writing
            # 40 of the queued ones were deleted or replaced before their turn: not written
            st = s.nvme.stats()
            assert st["demotions"] == n - 40
            assert st["objects"] == n - 80  # the in-flight ones that died were forgotten
            for k in gone:
                with pytest.raises(NotFound):
                    await read(s, k)
            for k in replaced:
                assert await read(s, k) == val(1000 + int(k[1:]))
            await s.flush_to_nvme(30)
            await settle(s)
            return gone, replaced
        finally:
            s.close()

    async def second(gone, replaced):
        s = make_store(path, regions=4)
        try:
            assert s.object_count() == n - len(gone)
            for k in gone:
                with pytest.raises(NotFound):
                    await read(s, k)
            for k in replaced:
                assert await read(s, k) == val(1000 + int(k[1:]))
            for i in range(0, n, 37):
                k = b"k%d" % i
                if k not in gone and k not in replaced:
                    assert await read(s, k) == val(i)
        finally:
            await settle(s)
            s.close()

    gone, replaced = asyncio.run(first())
    asyncio.run(second(gone, replaced))


@pytest.mark.parametrize("sync", ["interval", "always"])
def test_shutdown_flush_with_a_batch_in_flight(tmp_path, sync):
    """The shutdown flush waits for the batches in flight (not writing their objects a
    second time) and keeps every object; a restart finds each once. With ``nvme.sync =
    always`` a batch's objects leave DRAM only once an fdatasync covers them."""
    path = tmp_path / "t.dat"
    n = 100

    async def first():
        s = make_store(path, sync=sync)
        try:
            for i in range(n):
                await put(s, b"k%d" % i, val(i))
            gated = GatedWrites(s)
            evict_all(s)
            await until(lambda: not s.tiering._queue and gated.writes, "the batch is written")
            more = [b"x%d" % i for i in range(10)]  # DRAM-only objects the flush writes
            for i, k in enumerate(more):
                await put(s, k, val(i))
            flush = asyncio.get_running_loop().create_task(s.flush_to_nvme(30))
            await asyncio.sleep(0.05)
            assert not flush.done()  # it waits for the batch
            syncs = s.nvme.stats()["syncs"]
            gated.release()
            assert await flush == len(more)
            assert s.flush_not_kept == 0
            st = s.nvme.stats()
            if sync == "always":
                assert st["syncs"] > syncs
            assert st["objects"] == n + len(more) and st["demotions"] == n + len(more)
            await settle(s)
        finally:
            s.close()

    async def second():
        s = make_store(path)
        try:
            assert s.object_count() == n + 10
            for i in range(0, n, 9):
                assert await read(s, b"k%d" % i) == val(i)
            assert await read(s, b"x3") == val(3)
        finally:
            await settle(s)
            s.close()

    asyncio.run(first())
    asyncio.run(second())


@pytest.mark.parametrize("backend", ["io_uring", "threads"])
def test_a_failed_write_in_the_middle_of_a_batch(tmp_path, backend):
    """One batch, two size classes: two writes (a run of records per region). The large
    objects' write fails: those objects are dropped from DRAM (as a failed demotion always
    was), their region is sealed, and the small ones of the same batch are demoted and read
    back. Nothing leaks, and later demotions of that class go to a new region."""
    path = tmp_path / "t.dat"

    async def run():
        s = make_store(path, backend=backend, regions=4)
        if backend == "io_uring" and s.nvme.io_backend != "io_uring":
            pytest.skip(f"io_uring unavailable here: {s.nvme.io_backend_reason}")
        try:
            for i in range(10):
                await put(s, b"s%d" % i, val(i))
                await put(s, b"L%d" % i, val(i, LARGE))
            gated = GatedWrites(s, fail=lambda bufs: OSError(5, "injected EIO")
                                if len(bufs[1]) == LARGE and gated.writes <= 2 else None)
            evict_all(s)
            await until(lambda: gated.writes == 2, "one batch of two writes")
            assert s.nvme.open[LARGE].pending  # in flight, not yet failed
            gated.release()
            await settle(s)
            st = s.nvme.stats()
            assert st["write_errors"] == 1 and st["demotions"] == 10 and st["objects"] == 10
            assert s.nvme.counters["demotion_failures"] == 10  # the large ones: lost, and said so
            assert s.dram.demoting_bytes == 0 and not s.nvme.writing
            assert LARGE not in s.nvme.open  # sealed
            for i in range(10):
                e = s.index.get(NS, b"s%d" % i)
                assert e.nvme is not None and e.offset < 0  # on NVMe only
                assert await read(s, b"s%d" % i) == val(i)  # promoted, verified
                with pytest.raises(NotFound):
                    await read(s, b"L%d" % i)
            await put(s, b"L-after", val(99, LARGE))
            evict_all(s)
            await settle(s)
            assert s.index.get(NS, b"L-after").nvme is not None
            assert s.nvme.stats()["write_errors"] == 1
            assert s.nvme.counters["demotion_failures"] == 10
            assert await read(s, b"L-after") == val(99, LARGE)
        finally:
            await settle(s)
            s.close()

    asyncio.run(run())


def test_append_batch_refuses_more_records_than_a_write_can_carry(tmp_path):
    from kvstored.engine import nvme as nvme_mod

    async def run():
        s = make_store(tmp_path / "t.dat")
        try:
            with pytest.raises(ValueError):
                await s.nvme.append_batch([None] * (nvme_mod.BATCH_MAX_RECORDS + 1), memoryview(b""))
        finally:
            s.close()

    asyncio.run(run())


def test_a_batch_frees_dram_as_each_of_its_writes_lands(tmp_path):
    """A batch of large objects is several writes (a run is at most RUN_MAX_BYTES): the
    objects of the first write leave DRAM once it lands, before the others have."""
    from kvstored.engine import nvme as nvme_mod

    async def run():
        s = make_store(tmp_path / "t.dat", regions=4)
        try:
            size = 64 * 1024
            n = 40  # one batch (under DEMOTION_BATCH_RECORDS and _BYTES), several writes
            assert n * size <= tiering.DEMOTION_BATCH_BYTES and n <= tiering.DEMOTION_BATCH_RECORDS
            for i in range(n):
                await put(s, b"k%d" % i, val(i, size))
            gated = GatedWrites(s)
            evict_all(s)
            per_write = nvme_mod.RUN_MAX_BYTES // (size + 4096)
            await until(lambda: gated.writes == -(-n // per_write), "the batch's writes")
            gated.release(1)
            first = [s.index.get(NS, b"k%d" % i) for i in range(per_write)]
            await until(lambda: all(e.offset < 0 for e in first), "the first write's objects left DRAM")
            rest = [s.index.get(NS, b"k%d" % i) for i in range(per_write, n)]
            assert all(e.offset >= 0 and e.nvme is None for e in rest)  # still in flight
            assert s.dram.demoting_bytes == len(rest) * rest[0].sc.footprint  # the slots' bytes
            gated.release()
            await settle(s)
            assert all(e.offset < 0 and e.nvme is not None for e in rest)
            assert s.nvme.stats()["demotions"] == n
            for i in (0, per_write, n - 1):
                assert await read(s, b"k%d" % i) == val(i, size)
        finally:
            await settle(s)
            s.close()

    asyncio.run(run())


def test_a_batch_of_interleaved_sizes_completes_each_record_once(tmp_path):
    """Demotions of two size classes evicted in turn make one batch whose records
    interleave: each class's records are one run (one write) in its own region. A run that
    lands completes its own records only. Before, it completed every record between its
    first and last, the other class's too: their DRAM was given up before their write had
    landed, and they were completed a second time when it did (a KeyError that killed the
    writer; the puts waiting for space then failed NoSpace: test_eviction's concurrent
    mixed-size test, under load)."""

    async def run():
        s = make_store(tmp_path / "t.dat", regions=4)
        try:
            n = 6
            for i in range(n + 1):
                await put(s, b"s%d" % i, val(i))
                await put(s, b"L%d" % i, val(i, LARGE))
            # each class's region open first: the batch below then takes no region midway
            # (which would submit what it reserved so far as a write of its own)
            for k in (b"s%d" % n, b"L%d" % n):
                s.tiering.evict(s.index.get(NS, k))
            await settle(s)
            small = [s.index.get(NS, b"s%d" % i) for i in range(n)]
            large = [s.index.get(NS, b"L%d" % i) for i in range(n)]
            gated = GatedWrites(s)
            for e_small, e_large in zip(small, large):  # s0, L0, s1, L1, ...: one batch
                assert not s.tiering.evict(e_small) and not s.tiering.evict(e_large)
            await until(lambda: gated.writes == 2, "one write per size class")
            gated.release(1)  # the small objects' run (reserved first)
            await until(lambda: all(e.offset < 0 for e in small), "the small objects' write landed")
            assert all(e.offset >= 0 and e.nvme is None for e in large)  # theirs is in flight
            assert s.dram.demoting_bytes == n * large[0].sc.footprint
            gated.release()
            await settle(s)
            assert all(e.offset < 0 and e.nvme is not None for e in large)
            st = s.nvme.stats()
            assert st["demotions"] == 2 * (n + 1) and not s.nvme.writing and not s.tiering._writers
            for i in range(n):
                assert await read(s, b"s%d" % i) == val(i)
                assert await read(s, b"L%d" % i) == val(i, LARGE)
        finally:
            await settle(s)
            s.close()

    asyncio.run(run())


def test_a_writer_that_fails_hands_its_queue_to_a_new_one(tmp_path, monkeypatch, caplog):
    """A demotion writer killed by an unexpected error (a bug: append_batch raising what it
    should not) is logged, its batch's objects counted as lost, and the demotions still
    queued go to a new writer at once rather than waiting for the next eviction."""
    monkeypatch.setattr(tiering, "DEMOTION_WRITERS", 1)
    monkeypatch.setattr(tiering, "DEMOTION_BATCH_RECORDS", 2)

    async def run():
        s = make_store(tmp_path / "t.dat", regions=4)
        try:
            for i in range(6):
                await put(s, b"k%d" % i, val(i))
            real = s.nvme.append_batch
            calls = []

            async def first_raises(*a, **kw):
                calls.append(1)
                if len(calls) == 1:
                    raise RuntimeError("injected bug")
                return await real(*a, **kw)

            s.nvme.append_batch = first_raises
            for i in range(6):  # three batches of two, one writer
                assert not s.tiering.evict(s.index.get(NS, b"k%d" % i))
            await until(lambda: not s.tiering._queue and not s.tiering._writers, "the queue drained")
            await settle(s)
            assert s.nvme.counters["demotion_failures"] == 2  # the failed batch's two
            assert s.nvme.stats()["demotions"] == 4 and not s.nvme.writing
            for i in range(2, 6):
                assert await read(s, b"k%d" % i) == val(i)
            assert "demotion writer failed" in caplog.text
        finally:
            await settle(s)
            s.close()

    asyncio.run(run())


# ----------------------------------------- the packed index out of memory (_fail_allocs)

def packed_only(index_kind: str, what: str) -> None:
    if index_kind != "packed":
        pytest.skip(f"only the packed index's {what} allocates")


@contextlib.contextmanager
def failing_allocs(n: int):
    """The index's next ``n`` side-table allocations fail (MemoryError), within the block."""
    from kvstored import _index
    _index._fail_allocs(n)
    try:
        yield
    finally:
        _index._fail_allocs(0)


@contextlib.asynccontextmanager
async def opened(path):
    """A store over the tier file ``path``, settled and closed after."""
    s = make_store(path)
    try:
        yield s
    finally:
        from kvstored import _index
        _index._fail_allocs(0)
        await settle(s)
        s.close()


def test_a_written_record_whose_location_the_index_cannot_store(tmp_path, index_kind):
    """The packed index raises MemoryError storing a written record's location (a side
    table's growth; ``_index._fail_allocs``), for a demotion and for the shutdown flush.
    The demoted object keeps its DRAM copy (nothing lost); its record is forgotten (not
    counted live: its space goes with its region) and tombstoned, so an overwrite that
    stays DRAM-only does not let the old value come back at a restart. The flush writes
    such an object again later in the same flush. Before, the MemoryError escaped the
    write's callback: the record stayed live and untracked, and came back."""
    packed_only(index_kind, "location store")
    path = tmp_path / "t.dat"
    old, new, kept = val(1, SMALL), val(2, SMALL), val(3, SMALL)

    async def run():
        async with opened(path) as s:
            await put(s, b"k", old)
            e = s.index.get(NS, b"k")
            assert not e.key_in_ram  # in its slot's key record: its location needs a side table
            assert not s.tiering.evict(e)  # a demotion started
            with failing_allocs(1):  # the next side-table allocation: that location's
                await until(lambda: not s.tiering._writers and e.refs == 0, "the demotion ended")
            assert s.index.get(NS, b"k") is e and e.offset >= 0 and e.nvme is None
            assert s.nvme.counters["unindexed_records"] == 1
            assert s.nvme.counters["demotion_failures"] == 0  # not lost: still in DRAM
            assert s.nvme.stats()["objects"] == 0  # the record is not counted live
            assert await read(s, b"k") == old
            await put(s, b"k", new, overwrite=True)  # DRAM-only: no tombstone of its own
        async with opened(path) as s:  # no flush: DRAM-only objects are gone, so is the old record
            assert s.index.get(NS, b"k") is None
            await put(s, b"f", kept)
            f = s.index.get(NS, b"f")
            assert not f.key_in_ram
            assert await read(s, b"f") == kept  # (the readers' table made: the flush's reference)
            with failing_allocs(1):  # the next side-table allocation: its location's
                # its first record is refused; the flush's last walk writes it again
                assert await s.flush_to_nvme(10) == 1
            assert s.nvme.counters["unindexed_records"] == 1
            assert f.nvme is not None and s.flush_not_kept == 0
        async with opened(path) as s:
            assert await read(s, b"f") == kept and s.index.get(NS, b"k") is None

    asyncio.run(run())


def test_an_object_the_index_refuses_in_the_flushs_last_walk_is_counted_lost(tmp_path, index_kind,
                                                                             caplog):
    """The shutdown flush's last walk is the last try: an object whose location the index
    refuses there too (MemoryError in both walks) stays DRAM-only and is lost at exit, so
    ``flush_not_kept`` counts it and the flush warns. Before, the flush ended without a
    reason (no chunk said why) and reported nothing lost (flush_not_kept 0). Its records
    are tombstoned: a restart has no such key."""
    packed_only(index_kind, "location store")
    path = tmp_path / "t.dat"
    kept = val(4, SMALL)

    async def run():
        async with opened(path) as s:
            await put(s, b"f", kept)
            f = s.index.get(NS, b"f")
            assert not f.key_in_ram  # in its slot's key record: its location needs a side table
            assert await read(s, b"f") == kept  # (the readers' table made: the flush's reference)
            with failing_allocs(2):  # the next two side-table allocations: both walks' stores
                assert await s.flush_to_nvme(10) == 0
            assert s.nvme.counters["unindexed_records"] == 2  # refused in both walks
            assert f.nvme is None and f.offset >= 0  # DRAM-only at exit
            assert s.flush_not_kept == 1
            assert any("could not be kept" in r.getMessage() for r in caplog.records)
        async with opened(path) as s:
            assert s.index.get(NS, b"f") is None

    asyncio.run(run())


def test_a_flush_reference_the_index_cannot_store_leaves_the_object_to_the_last_walk(
        tmp_path, index_kind):
    """The flush's reference on an object (``refs += 1``: the readers' side table, made on
    the first) raises MemoryError: that object is not written in that walk, and the
    flush's last walk writes it. Before, the MemoryError escaped the flush (the node's
    stop raised before draining its tasks)."""
    packed_only(index_kind, "readers' table")
    path = tmp_path / "t.dat"
    kept = val(5, SMALL)

    async def run():
        async with opened(path) as s:
            await put(s, b"g", kept)
            g = s.index.get(NS, b"g")
            assert g.refs == 0 and g.nvme is None
            with failing_allocs(1):  # the next side-table allocation: the readers' table's
                assert await s.flush_to_nvme(10) == 1
            assert g.nvme is not None and g.refs == 0 and s.flush_not_kept == 0
        async with opened(path) as s:
            assert await read(s, b"g") == kept

    asyncio.run(run())


def test_a_promotion_whose_reference_the_index_cannot_store_leaves_no_load_behind(
        tmp_path, index_kind):
    """A read of an NVMe-only object takes a reference before the promotion's read
    (``refs += 1``: on a fresh index, the readers' side table is made then). When the index
    cannot store it (MemoryError) that read fails, and nothing is left registered: the next
    read promotes the object. Before, the promotion in progress stayed registered with
    nobody to end it, and every later read of the key waited on it for good."""
    packed_only(index_kind, "readers' table")
    path = tmp_path / "t.dat"
    kept = val(6, SMALL)

    async def run():
        async with opened(path) as s:
            await put(s, b"p", kept)
            assert await s.flush_to_nvme(10) == 1
        async with opened(path) as s:  # recovered: NVMe-only, no reader yet
            e = s.index.get(NS, b"p")
            assert e.offset < 0 and e.nvme is not None and e.refs == 0
            with failing_allocs(1):  # the next side-table allocation: the readers' table's
                with pytest.raises(MemoryError):
                    await read(s, b"p")
            assert s.tiering._loading == {} and e.refs == 0
            assert await asyncio.wait_for(read(s, b"p"), 30) == kept

    asyncio.run(run())


def test_a_demotion_whose_reference_the_index_cannot_store_drops_the_object_counted(
        tmp_path, index_kind):
    """An eviction's demotion takes a reference on the object first (``refs += 1``: on a
    fresh index, the readers' side table is made then). When the index cannot store it
    (MemoryError), the object leaves as an eviction without a copy does: dropped, counted
    in ``demotion_failures``, its slot free; the store goes on (a later demotion works).
    Before, the MemoryError escaped evict() after the eviction was counted: from
    reclaim_slab it left a slab draining that nothing tracked, never serving slots again."""
    packed_only(index_kind, "readers' table")
    path = tmp_path / "t.dat"
    a, b = val(7, SMALL), val(8, SMALL)

    async def run():
        async with opened(path) as s:
            await put(s, b"a", a)
            await put(s, b"b", b)
            e = s.index.get(NS, b"a")
            assert e.refs == 0 and e.nvme is None
            evictions = s.dram.counters["evictions"]
            with failing_allocs(1):  # the next side-table allocation: the readers' table's
                assert s.tiering.evict(e)  # its slot is free now: no demotion in flight
            assert s.index.get(NS, b"a") is None
            assert s.nvme.counters["demotion_failures"] == 1
            assert s.dram.counters["evictions"] == evictions + 1
            f = s.index.get(NS, b"b")
            assert not s.tiering.evict(f)  # a demotion started: the index has memory again
            await until(lambda: not s.tiering._writers and f.refs == 0, "the demotion ended")
            assert f.nvme is not None and await read(s, b"b") == b
            await put(s, b"a", a)  # the dropped key can be stored again
            assert await read(s, b"a") == a

    asyncio.run(run())
