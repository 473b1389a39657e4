"""The NVMe tier keeps no key per object in RAM (issue 13): a live count per region, keys
read back from disk when needed (region_rows, key_at, keys_at, read with ``expect``)."""
from __future__ import annotations

import asyncio
import dataclasses
import mmap
import os
import random

import pytest
import xxhash

from kvstored.engine.nvme import BLOCK, DATA_START, KeyMismatch, Location, NvmeDevice, NvmeTier, Region, align_up
from kvstored.engine.nvmeformat import FLAG_TOMBSTONE, FLAGS, KEY, NS, REL, SUMMARY_ENTRY

MiB = 1 << 20
REGION = 16 * MiB
NSP = b"ns"


def _open(path, regions=4, backend="threads") -> NvmeTier:
    return NvmeTier(NvmeDevice(str(path), DATA_START + regions * REGION, REGION, backend, 32),
                    sync="none")


def _payload(i: int, size: int):
    buf = mmap.mmap(-1, align_up(size))
    buf[:size] = (b"%08d" % i) * (size // 8) + bytes(size % 8)
    return memoryview(buf)


async def _put(tier: NvmeTier, key: bytes, i: int, size: int = 4096, ns: bytes = NSP) -> Location:
    view = _payload(i, size)
    return await tier.append(ns, key, view, size, xxhash.xxh3_64_intdigest(view[:size]),
                             align_up(size), 1.0)


async def _summary_written(tier: NvmeTier, r: Region) -> None:
    for _ in range(500):  # bounded: the summary write is one 4 KiB-aligned pwritev
        if r.sum_state == "written":
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"summary of region {r.index} never written ({r.sum_state!r})")


def _corrupt(tier: NvmeTier, offset: int) -> None:
    """Flip one byte at ``offset`` behind the tier's back (buffered fd: O_DIRECT needs
    alignment, and the page cache is coherent with direct I/O on Linux for this)."""
    fd = os.open(tier.dev.path, os.O_RDWR)
    try:
        b = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([b[0] ^ 0xFF]), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _run(coro):
    return asyncio.run(coro)


# ------------------------------------------------------------------ region_rows
def test_region_rows_of_an_open_region_come_from_its_summary_in_memory(tmp_path):
    async def run():
        tier = _open(tmp_path / "t.dat")
        try:
            locs = [await _put(tier, b"k%d" % i, i) for i in range(5)]
            await tier.append(NSP, b"k1", None, 0, 0, 0, 1.0, tombstone=True)
            r = tier.regions[locs[0].region]
            assert r.state == "open" and r.summary is not None
            rows = await tier.region_rows(r)
            data = [(row[NS], row[KEY], row[FLAGS]) for row in rows if not row[FLAGS]]
            assert data == [(NSP, b"k%d" % i, 0) for i in range(5)]
            assert [r.base + row[REL] for row in rows if not row[FLAGS]] == [x.offset for x in locs]
            tomb = tier.regions[tier.open[0].index]
            assert [(row[KEY], row[FLAGS]) for row in await tier.region_rows(tomb)] == \
                [(b"k1", FLAG_TOMBSTONE)]
            assert tier.counters["region_scans"] == 0
        finally:
            tier.close()
    _run(run())


def test_region_rows_of_a_sealed_region_read_its_summary_or_scan_when_it_is_corrupt(tmp_path):
    async def run():
        tier = _open(tmp_path / "t.dat")
        try:
            locs = [await _put(tier, b"key-%03d" % i, i, 8192) for i in range(40)]
            r = tier.regions[locs[0].region]
            tier._seal(r)
            await _summary_written(tier, r)
            assert r.summary is None  # freed once on disk
            want = [(NSP, b"key-%03d" % i, x.offset - r.base) for i, x in enumerate(locs)]
            rows = await tier.region_rows(r)
            assert [(row[NS], row[KEY], row[REL]) for row in rows] == want
            assert tier.counters["region_scans"] == 0
            # a corrupt summary body: its checksum fails, the region's headers are scanned
            body_len = len(locs) * (SUMMARY_ENTRY.size + 2 + 7)  # entry, ns, key
            _corrupt(tier, r.base + r.size - BLOCK - align_up(body_len) + 5)
            rows = await tier.region_rows(r)
            assert [(row[NS], row[KEY], row[REL]) for row in rows] == want
            assert tier.counters["region_scans"] == 1 and tier.counters["summaries_corrupt"] == 1
            # a corrupt trailer, and a corrupt record header: that record only is missing
            _corrupt(tier, r.base + r.size - BLOCK + 3)
            _corrupt(tier, locs[7].offset + 40)
            rows = await tier.region_rows(r)
            assert [(row[NS], row[KEY], row[REL]) for row in rows] == want[:7] + want[8:]
            assert tier.counters["region_scans"] == 2 and tier.counters["scan_resyncs"] == 1
            # the scan left the region as it was
            assert r.state == "full" and r.write_ptr == locs[-1].offset - r.base + 3 * BLOCK
        finally:
            tier.close()
    _run(run())


def test_region_rows_of_a_region_sealed_by_a_failed_write_scan_up_to_its_write_pointer(tmp_path):
    async def run():
        tier = _open(tmp_path / "t.dat")
        try:
            locs = [await _put(tier, b"k%d" % i, i) for i in range(6)]
            r = tier.regions[locs[0].region]
            r.summary = None  # as _do_write leaves a region whose write failed
            tier._seal(r)
            r.write_ptr = locs[4].offset - r.base  # the last two records were "lost"
            rows = await tier.region_rows(r)
            assert [row[KEY] for row in rows] == [b"k%d" % i for i in range(4)]
            assert await tier.region_rows(tier.regions[-1]) == []  # a free region
        finally:
            tier.close()
    _run(run())


# ------------------------------------------------------------ read with expect
@pytest.mark.parametrize("backend", ["threads", "auto"])
def test_read_with_expect_checks_the_header_key_and_namespace(tmp_path, backend):
    async def run():
        tier = _open(tmp_path / "t.dat", backend=backend)
        try:
            loc = await _put(tier, b"alpha", 1, 10000, ns=b"n1")
            other = await _put(tier, b"beta", 2, 10000, ns=b"n1")
            dest = memoryview(mmap.mmap(-1, align_up(10000)))
            assert await tier.read(loc, dest, expect=(b"n1", b"alpha"))
            assert bytes(dest[:10000]) == bytes(_payload(1, 10000)[:10000])
            assert await tier.read(loc, dest)  # no expect: as before
            with pytest.raises(KeyMismatch):  # a sound record of another key: not "bad"
                await tier.read(loc, dest, expect=(b"n1", b"beta"))
            with pytest.raises(KeyMismatch):
                await tier.read(loc, dest, expect=(b"n2", b"alpha"))
            assert tier.counters["key_mismatches"] == 2
            # a location whose length/checksum name another record: not this one
            bad = dataclasses.replace(other, checksum=loc.checksum)
            assert not await tier.read(bad, dest, expect=(b"n1", b"beta"))
            before = tier.counters["checksum_failures"]
            _corrupt(tier, loc.offset + 50)  # inside the header: its checksum fails
            assert not await tier.read(loc, dest, expect=(b"n1", b"alpha"))
            assert tier.counters["checksum_failures"] == before + 1
            assert await tier.read(loc, dest)  # the payload itself is intact
            assert tier.counters["key_mismatches"] == 2
            # a stale generation is refused before any I/O
            stale = dataclasses.replace(other, generation=other.generation - 1)
            assert not await tier.read(stale, dest, expect=(b"n1", b"beta"))
            # the header pool is whole again after the reads
            assert len(tier.headers.free) == len(tier.headers.view) // BLOCK
        finally:
            tier.close()
    _run(run())


# --------------------------------------------------------------- key_at, keys_at
def test_key_at_reads_the_header_and_refuses_stale_or_corrupt_ones(tmp_path):
    async def run():
        tier = _open(tmp_path / "t.dat")
        try:
            a = await _put(tier, b"a" * 200, 1, ns=b"x" * 40)
            b = await _put(tier, b"b", 2)
            assert tier.key_at(a) == (b"x" * 40, b"a" * 200)
            assert tier.key_at(b) == (NSP, b"b")
            assert tier.key_at(dataclasses.replace(b, generation=b.generation + 5)) is None
            assert tier.key_at(dataclasses.replace(b, length=b.length + 1)) is None
            _corrupt(tier, b.offset + 60)
            assert tier.key_at(b) is None
            with pytest.raises(ValueError):
                tier.key_at(dataclasses.replace(a, offset=a.offset + 1))
            with pytest.raises(ValueError):
                tier.key_at(dataclasses.replace(a, region=99))
        finally:
            tier.close()
    _run(run())


def test_keys_at_over_several_regions_in_mixed_order(tmp_path):
    async def run():
        tier = _open(tmp_path / "t.dat", regions=5)
        try:
            locs = {}
            for i in range(40):  # 1 MiB records: 15 per region, three regions
                k = b"obj-%d" % i
                locs[k] = await _put(tier, k, i, MiB - 4096)
            regions = {x.region for x in locs.values()}
            assert len(regions) == 3
            first = tier.regions[locs[b"obj-0"].region]
            await _summary_written(tier, first)
            keys = list(locs)
            random.Random(3).shuffle(keys)
            keys = keys[:30] + [b"obj-39", b"obj-39"]  # a duplicate; the last region: headers
            asked = [locs[k] for k in keys]
            stale = dataclasses.replace(locs[b"obj-1"], generation=0)
            asked.insert(5, stale)
            got = await tier.keys_at(asked)
            expected = [(NSP, k) for k in keys]
            expected.insert(5, None)
            assert got == expected
            assert await tier.keys_at([]) == []
        finally:
            tier.close()
    _run(run())


# ---------------------------------------------------------------- live counts
def test_live_counts_are_exact_and_no_key_set_is_kept(tmp_path):
    path = tmp_path / "t.dat"

    async def first():
        tier = _open(path)
        try:
            locs = [await _put(tier, b"k%d" % i, i) for i in range(30)]
            r = tier.regions[locs[0].region]
            assert r.live_count == 30 and tier.stats()["objects"] == 30
            await tier.append(NSP, b"k0", None, 0, 0, 0, 1.0, tombstone=True)
            assert tier.stats()["objects"] == 30  # a tombstone is no live record
            tier.forget(locs[0], NSP, b"k0")
            assert r.live_count == 29
            tier.forget(locs[0], NSP, b"k0")  # twice: idempotent
            assert r.live_count == 29
            tier.forget(dataclasses.replace(locs[1], generation=0), NSP, b"k1")  # stale: nothing
            assert r.live_count == 29
            with pytest.raises(ValueError):
                tier.forget(dataclasses.replace(locs[1], offset=locs[1].offset + 512), NSP, b"k1")
            # no container in a region grows with its live records (keys stay on disk)
            assert not hasattr(r, "live")
            for f in dataclasses.fields(Region):
                v = getattr(r, f.name)
                if isinstance(v, (set, dict, list, frozenset)):
                    assert len(v) <= 1, f.name  # stale: k0 only; tombs, pending: none here
            assert r.dead is not None and len(r.dead) == REGION // BLOCK // 8
        finally:
            tier.close()

    _run(first())
    tier = _open(path)  # recovery: the 29 live records, none for the deleted key
    try:
        objs = tier.recovered_objects()
        assert sorted(k for _n, k, _l, _a in objs) == sorted(b"k%d" % i for i in range(1, 30))
        assert sum(r.live_count for r in tier.regions) == 29 == tier.stats()["objects"]
        loc = next(loc for _n, k, loc, _a in objs if k == b"k5")
        tier.forget(loc, NSP, b"k5")
        tier.forget(loc, NSP, b"k5")
        assert tier.stats()["objects"] == 28
    finally:
        tier.close()


def test_live_counts_through_reclaim_and_exact_record_matching(tmp_path):
    """Reclaim hands the callbacks the region's rows; the count goes to zero; a key whose
    newest record is elsewhere is not the reclaimed region's."""
    async def run():
        tier = _open(tmp_path / "t.dat", regions=3)
        index: dict = {}  # key -> Location: the model of the Store's index
        seen: list = []

        def can(region, rows):
            return True

        def drop(region, rows):
            seen.append((region.index, len(rows)))
            for row in rows:
                k = row[KEY]
                loc = index.get(k)
                if (loc is not None and loc.region == region.index
                        and loc.generation == region.generation
                        and loc.offset == region.base + row[REL]):
                    del index[k]

        tier.can_reclaim, tier.on_reclaim = can, drop
        try:
            for i in range(15):
                index[b"k%d" % i] = await _put(tier, b"k%d" % i, i, MiB - 4096)
            r0 = tier.regions[index[b"k0"].region]
            # k0 is rewritten: its newest record goes elsewhere; the old one is forgotten
            old = index[b"k0"]
            index[b"k0"] = await _put(tier, b"k0", 100, MiB - 4096)
            tier.forget(old, NSP, b"k0")
            assert r0.live_count == 14
            for i in range(15, 45):  # fills the other regions: r0 (oldest) is reclaimed
                index[b"k%d" % i] = await _put(tier, b"k%d" % i, i, MiB - 4096)
            assert tier.counters["regions_reclaimed"] >= 1
            assert seen[0] == (r0.index, 15)
            assert b"k0" in index and all(b"k%d" % i not in index for i in range(1, 15))
            assert tier.counters["regions_reclaimed"] == 1 and tier.counters["objects_dropped"] == 14
            assert sum(r.live_count for r in tier.regions) == len(index) == tier.stats()["objects"]
            for k, loc in index.items():
                assert tier.key_at(loc) == (NSP, k)
        finally:
            tier.close()
    _run(run())


# ---------------------------------------------------------------- concurrency
@pytest.mark.parametrize("backend", ["threads", "auto"])
def test_reads_with_expect_interleaved_with_reclaim(tmp_path, backend):
    """Bounded: appends that keep reclaiming regions while readers read what the model
    index holds; every read that succeeds returns the key's bytes, none reads another's."""
    size = 256 * 1024 - 4096

    async def run():
        tier = _open(tmp_path / "t.dat", regions=3, backend=backend)
        index: dict = {}

        def drop(region, rows):
            for row in rows:
                loc = index.get(row[KEY])
                if loc is not None and loc.region == region.index and \
                        loc.offset == region.base + row[REL] and loc.generation == region.generation:
                    del index[row[KEY]]

        tier.on_reclaim = drop
        rnd = random.Random(7)
        ok = bad = 0
        stop = asyncio.Event()

        async def writer():
            try:
                for i in range(400):  # ~100 MiB through 48 MiB of regions
                    k = b"w%d" % i
                    index[k] = await _put(tier, k, i, size)
            finally:
                stop.set()

        async def reader():
            nonlocal ok, bad
            dest = memoryview(mmap.mmap(-1, align_up(size)))
            for _ in range(2000):
                if stop.is_set():
                    break
                if not index:
                    await asyncio.sleep(0.001)
                    continue
                k = rnd.choice(list(index))
                loc = index[k]
                try:
                    good = await tier.read(loc, dest, expect=(NSP, k))
                except KeyMismatch:
                    good = False
                if good:
                    i = int(k[1:])
                    assert bytes(dest[:16]) == b"%08d" % i * 2
                    ok += 1
                else:
                    bad += 1  # only when its region was reclaimed under the read
                    assert tier.regions[loc.region].generation != loc.generation or \
                        index.get(k) is not loc
                    # (a record read while its region was reused fails its key or checksum)

        async def walker():
            for _ in range(50):
                if stop.is_set():
                    break
                items = list(index.items())[:64]
                got = await tier.keys_at([loc for _k, loc in items])
                for (k, loc), g in zip(items, got):
                    assert g in (None, (NSP, k))
                    if g is None:
                        assert tier.regions[loc.region].generation != loc.generation
                await asyncio.sleep(0.001)

        try:
            await asyncio.wait_for(asyncio.gather(writer(), reader(), reader(), walker()), 60)
            assert tier.counters["regions_reclaimed"] >= 3
            assert ok > 0
            assert tier.counters["checksum_failures"] + tier.counters["key_mismatches"] <= bad
            assert sum(r.live_count for r in tier.regions) == len(index)
        finally:
            tier.close()
    _run(run())


def test_concurrent_appends_of_one_size_class_reclaim_one_region_at_a_time(tmp_path):
    """Taking a region awaits (its rows are read): appends arriving meanwhile wait for it
    instead of reclaiming (and emptying) regions of their own."""
    async def run():
        tier = _open(tmp_path / "t.dat", regions=3)
        try:
            for i in range(45):  # 15 per region: all three full of live records
                await _put(tier, b"a%d" % i, i, MiB - 4096)
            before = tier.counters["regions_reclaimed"]
            assert before == 0
            locs = await asyncio.gather(*(_put(tier, b"b%d" % i, i, MiB - 4096) for i in range(10)))
            assert tier.counters["regions_reclaimed"] == 1  # ten records fit in one region
            assert len({x.region for x in locs}) == 1
            assert tier.stats()["objects"] == 45 - 15 + 10
        finally:
            tier.close()
    _run(run())


def test_settle_after_recovery_keeps_every_region_value(tmp_path):
    """settle_after_recovery makes the per-region objects again (so recovery's freed
    arenas can go back to the OS): same values, new containers, tier still works."""
    async def fill():
        tier = _open(tmp_path / "t.dat")
        try:
            for i in range(6):
                await _put(tier, b"k%d" % i, i, 10000)
        finally:
            tier.close()
    _run(fill())

    async def check():
        tier = _open(tmp_path / "t.dat")
        try:
            assert len(tier.recovered_objects()) == 6
            before = [dict(vars(r)) for r in tier.regions]
            sets = [r.stale for r in tier.regions]
            counters = dict(tier.counters)
            tier.settle_after_recovery()
            assert [dict(vars(r)) for r in tier.regions] == before
            assert all(r.stale is not old for r, old in zip(tier.regions, sets))
            assert tier.counters == counters
            loc = await _put(tier, b"after", 7, 10000)
            dest = memoryview(mmap.mmap(-1, align_up(10000)))
            assert await tier.read(loc, dest, expect=(NSP, b"after"))
        finally:
            tier.close()
    _run(check())
