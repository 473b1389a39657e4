"""Recovery at start (kvstored.engine.nvmescan): batched reads of region headers and
summaries, the one-unpack and entry-by-entry summary paths, overwrites and tombstones,
corrupt summaries inside a batch; and the backends' blocking read_many it uses."""
from __future__ import annotations

import asyncio
import errno
import mmap
import os
import random

import pytest

from kvstored.engine import nvmeio, nvmescan
from kvstored.engine.nvme import BLOCK, DATA_START, NvmeDevice, NvmeTier, align_up
from kvstored.engine.nvmeformat import TRAILER

# the tier, its scan and io_uring on their own: no index (tests/engine/conftest.py)
pytestmark = pytest.mark.index_free

MiB = 1 << 20
REGION = 16 * MiB
SIZE = 60 * 1024  # 64 KiB records: ~250 per region


def _payload():
    buf = mmap.mmap(-1, align_up(SIZE))
    buf[:] = os.urandom(len(buf))
    return memoryview(buf)


def _open(path, regions=8, backend="auto") -> NvmeTier:
    return NvmeTier(NvmeDevice(str(path), DATA_START + regions * REGION, REGION, backend, 32), sync="none")


def _write(path, ops, regions=8, backend="auto") -> dict:
    """Apply ``ops`` ((ns, key, "put" | "del")) in order; the model of what a restart must
    find: {(ns, key): seq of the live record}."""
    from kvstore.wire import checksum
    view = _payload()
    csum = checksum(view[:SIZE])
    model: dict = {}

    async def run():
        tier = _open(path, regions, backend)
        try:
            for ns, key, op in ops:
                if op == "put":
                    await tier.append(ns, key, view, SIZE, csum, align_up(SIZE), 1.0)
                    model[(ns, key)] = tier.seq - 1
                else:
                    await tier.append(ns, key, None, 0, 0, 0, 1.0, tombstone=True)
                    model.pop((ns, key), None)
        finally:
            tier.close()
    asyncio.run(run())
    return model


def _recovered(path, regions=8, backend="auto"):
    tier = _open(path, regions, backend)
    try:
        objs = tier.recovered_objects()
        return {(ns, key): loc for ns, key, loc, _at in objs}, dict(tier.counters)
    finally:
        tier.close()


@pytest.fixture
def small_batches(monkeypatch):
    """Two regions' headers per batch and one summary per batch: every window edge is crossed."""
    monkeypatch.setattr(nvmescan, "HEAD_WINDOW", 2)
    monkeypatch.setattr(nvmescan, "BODY_WINDOW", BLOCK)


@pytest.mark.parametrize("backend", ["threads", "auto"])
def test_uniform_keys_recover_through_the_one_unpack_path(tmp_path, small_batches, backend):
    ops = [(b"ns", b"key-%05d" % i, "put") for i in range(1000)]  # ~4 regions, all sealed but one
    model = _write(tmp_path / "t.dat", ops, backend=backend)
    got, c = _recovered(tmp_path / "t.dat", backend=backend)
    assert set(got) == set(model) and len(got) == 1000
    assert c["restart_summaries"] >= 4 and c["restart_scanned_regions"] == 0
    locs = sorted((loc.region, loc.offset) for loc in got.values())
    assert len(set(locs)) == 1000  # one distinct record each


def test_mixed_keys_overwrites_and_deletes_recover_as_written(tmp_path, small_batches):
    rnd = random.Random(13)
    keys = [(rnd.choice([b"a", b"other-ns"]), b"k%d" % rnd.randrange(400)) for _ in range(900)]
    ops = [(ns, key, "del" if rnd.random() < 0.15 else "put") for ns, key in keys]
    model = _write(tmp_path / "t.dat", ops)
    got, c = _recovered(tmp_path / "t.dat")
    assert set(got) == set(model), "a restart disagrees with what was written"
    assert c["restart_scanned_regions"] == 0
    # and again: the first restart wrote nothing that changes the answer
    again, _c = _recovered(tmp_path / "t.dat")
    assert set(again) == set(model)


def test_corrupt_summary_inside_a_batch_costs_a_scan_of_that_region_only(tmp_path, monkeypatch):
    monkeypatch.setattr(nvmescan, "HEAD_WINDOW", 64)
    monkeypatch.setattr(nvmescan, "BODY_WINDOW", 64 * MiB)  # every summary in one batch
    path = tmp_path / "t.dat"
    model = _write(path, [(b"ns", b"key-%05d" % i, "put") for i in range(1000)])
    got, _c = _recovered(path)
    middle = sorted({loc.region for loc in got.values()})[1]
    base = DATA_START + middle * REGION
    with open(path, "r+b") as f:  # a bit inside the summary body (its length from the trailer)
        f.seek(base + REGION - BLOCK)
        body_len = TRAILER.unpack_from(f.read(TRAILER.size))[6]
        at = base + REGION - BLOCK - align_up(body_len) + body_len // 2
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x20]))
    got, c = _recovered(path)
    assert set(got) == set(model)
    assert c["summaries_corrupt"] == 1 and c["restart_scanned_regions"] == 1
    assert c["restart_summaries_written"] == 1  # the scan left a good summary behind


def test_unreadable_region_header_costs_its_region_only(tmp_path, small_batches):
    path = tmp_path / "t.dat"
    model = _write(path, [(b"ns", b"key-%05d" % i, "put") for i in range(600)])
    with open(path, "r+b") as f:  # both copies of region 0's header
        for off in (30, BLOCK + 30):
            f.seek(DATA_START + off)
            f.write(b"\xff")
    got, c = _recovered(path)
    assert c["regions_unreadable"] == 1
    assert got and set(got) < set(model)
    assert all(loc.region != 0 for loc in got.values())


@pytest.mark.parametrize("backend", ["threads", "io_uring"])
def test_read_many_reads_every_request_beyond_the_queue_depth(tmp_path, backend):
    path = tmp_path / "f.dat"
    data = os.urandom(64 * BLOCK)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            io = nvmeio.open_backend(fd, backend, 8, str(tmp_path))
        except OSError as e:
            pytest.skip(f"io_uring cannot run here: {e}")
        try:
            buf = mmap.mmap(-1, 100 * BLOCK)
            mv = memoryview(buf)
            # 100 reads (depth 8), in scrambled order, one of them past the end of the file
            offsets = [(i * 7 % 64) * BLOCK for i in range(99)] + [200 * BLOCK]
            res = io.read_many([(off, mv[i * BLOCK:(i + 1) * BLOCK]) for i, off in enumerate(offsets)])
            assert res[:99] == [BLOCK] * 99 and res[99] == 0
            for i, off in enumerate(offsets[:99]):
                assert mv[i * BLOCK:(i + 1) * BLOCK] == data[off:off + BLOCK]
            assert io.read_many([]) == []
            bad = io.read_many([(-BLOCK, mv[:BLOCK])])  # a negative offset: that request fails
            assert len(bad) == 1 and bad[0] < 0
        finally:
            io.close()
    finally:
        os.close(fd)


def test_read_many_refuses_a_ring_with_io_in_flight(tmp_path):
    fd = os.open(tmp_path / "f.dat", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            io = nvmeio.open_backend(fd, "io_uring", 8, str(tmp_path))
        except OSError as e:
            pytest.skip(f"io_uring cannot run here: {e}")
        try:
            buf = bytearray(BLOCK)

            async def busy():
                task = asyncio.ensure_future(io.writev(0, [memoryview(buf)]))
                await asyncio.sleep(0)  # submitted; its completion is not reaped before we yield again
                with pytest.raises(RuntimeError, match="idle ring"):
                    io.read_many([(0, memoryview(bytearray(BLOCK)))])
                assert await asyncio.wait_for(task, 10) == BLOCK
            asyncio.run(busy())
        finally:
            io.close()
        with pytest.raises(OSError, match="closed"):
            io.read_many([(0, memoryview(bytearray(BLOCK)))])
    finally:
        os.close(fd)


def test_read_many_errors_are_negative_errno_on_threads(tmp_path):
    fd = os.open(tmp_path / "f.dat", os.O_WRONLY | os.O_CREAT, 0o600)  # not readable
    try:
        io = nvmeio.open_backend(fd, "threads", 8)
        try:
            assert io.read_many([(0, memoryview(bytearray(BLOCK)))]) == [-errno.EBADF]
        finally:
            io.close()
    finally:
        os.close(fd)


def test_gc_paused_restores_collection_and_freezes_nothing():
    import gc
    assert gc.isenabled()
    with nvmescan.gc_paused():
        assert not gc.isenabled()
        with nvmescan.gc_paused():  # nested (recovered_objects inside the index build)
            assert not gc.isenabled()
        assert not gc.isenabled(), "the inner pause re-enabled collection"
        junk = [[i] for i in range(10000)]  # tracked objects allocated while paused
    assert gc.isenabled() and gc.get_freeze_count() == 0
    # the survivors went straight to the oldest generation, not one young one to walk
    oldest = {id(o) for o in gc.get_objects(generation=2)}
    assert id(junk[0]) in oldest and id(junk[-1]) in oldest
    del junk
    gc.disable()
    try:
        with nvmescan.gc_paused():
            pass
        assert not gc.isenabled(), "a pause turned on collection that was off before it"
    finally:
        gc.enable()
    with pytest.raises(ZeroDivisionError):  # an error inside still restores collection
        with nvmescan.gc_paused():
            1 / 0
    assert gc.isenabled()


def _reference(found):
    """What a restart must rebuild, by the plain per-record rules: live keys per region,
    stale keys per region, tombstone seqs per region."""
    newest = {}
    for r, rows in found:
        for row in rows:
            k = (row[8], row[9])
            if k not in newest or row[0] > newest[k][1][0]:
                newest[k] = (r.index, row)
    live, stale, tombs = {}, {}, {}
    for r, rows in found:
        for row in rows:
            k = (row[8], row[9])
            if row[5] & 1:
                tombs.setdefault(r.index, {})[k] = max(row[0], tombs.get(r.index, {}).get(k, 0))
            elif newest[k][1] is not row:
                stale.setdefault(r.index, set()).add(k)
    for k, (ri, row) in newest.items():
        if not row[5] & 1:
            live.setdefault(ri, set()).add(k)
    return live, stale, tombs


@pytest.mark.parametrize("seed", [1, 2])
def test_region_state_after_restart_matches_the_per_record_rules(tmp_path, seed):
    """Untouched keys first (regions with no special key: the bulk path), then overwrites
    and deletes of some of them and of new ones (regions mixing both)."""
    rnd = random.Random(seed)
    ops = [(b"ns", b"key-%05d" % i, "put") for i in range(600)]
    for _ in range(500):
        i = rnd.randrange(300, 900)  # the first 300 keys are never touched again
        ops.append((b"ns", b"key-%05d" % i, "del" if rnd.random() < 0.3 else "put"))
    model = _write(tmp_path / "t.dat", ops)
    tier = _open(tmp_path / "t.dat")
    try:
        live, stale, tombs = _reference(tier.recovered)
        objs = tier.recovered_objects()
        assert {(ns, key) for ns, key, _l, _a in objs} == set(model)
        assert len(objs) == len(model)  # one entry per key
        for r in tier.regions:
            assert r.live_count == len(live.get(r.index, ())), r.index
            assert r.stale == stale.get(r.index, set()), r.index
            assert r.tombs == tombs.get(r.index, {}), r.index
        assert sum(tier.stale_count.values()) == sum(len(v) for v in stale.values())
        for ns, key, loc, _at in objs:  # each location is the key's newest record
            assert loc.generation == tier.regions[loc.region].generation
    finally:
        tier.close()
