"""RAM the NVMe tier (and the daemon's Store) holds per NVMe-only object (issue 13).

    python benchmarks/bench_nvme_keys_ram.py write PATH N     # N records of 4 KiB (8 KiB on disk)
    python benchmarks/bench_nvme_keys_ram.py tier PATH N      # tracemalloc: what the tier keeps
    python benchmarks/bench_nvme_keys_ram.py store PATH N     # RssAnon: Store restart over PATH
    python benchmarks/bench_nvme_keys_ram.py live PATH N      # RssAnon: N puts demoted by a live Store

``write`` also reports what the tier kept after its own appends (tracemalloc).
``tier`` reopens PATH and reports the bytes the tier still holds once
``recovered_objects()`` was handed over and dropped (the per-region state: before
issue 13 a set of (ns, key) per region). ``store`` reopens PATH under a Store
(small DRAM arena, default index) and reports the RssAnon growth of the restart
(index entries + tier state) per object, and the peak while it recovered (VmHWM,
reset just before the open: the RAM a node needs to restart, issue 13). Run it with PYTHONPATH at a checkout to
compare two versions over the same file (the on-disk format is the same).
``live`` puts N objects into a Store with a 64 MiB DRAM arena and an NVMe tier at
PATH (overwritten): all but the last few thousand are demoted and leave DRAM, so it
reports the RssAnon growth per object of a running node's NVMe-only objects (their
keys shed by the packed index) rather than a restarted one's.
"""
from __future__ import annotations

import asyncio
import gc
import mmap
import os
import sys
import time
import tracemalloc

import xxhash

from kvstored.engine import Store, StoreLimits
from kvstored.engine.nvme import DATA_START, NvmeDevice, NvmeTier

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peers import peak_rss, reset_peak_rss, rss_anon  # noqa: E402

MiB = 1 << 20
REGION = 256 * MiB
SIZE = 4096




def _tier(path: str, n: int) -> NvmeTier:
    regions = -(-n * 2 * 4096 * 105 // 100 // REGION) + 2
    return NvmeTier(NvmeDevice(path, DATA_START + regions * REGION, REGION, "auto", 64), sync="none")


def write(path: str, n: int) -> None:
    tracemalloc.start()
    tier = _tier(path, n)
    gc.collect()
    base = tracemalloc.get_traced_memory()[0]
    view = memoryview(mmap.mmap(-1, SIZE))
    view[:] = b"x" * SIZE
    csum = xxhash.xxh3_64_intdigest(view)
    t0 = time.perf_counter()

    async def run():
        for b in range(0, n, 512):
            await asyncio.gather(*(tier.append(b"ns", b"key-%010d" % i, view, SIZE, csum, SIZE, 1.0)
                                   for i in range(b, min(b + 512, n))))
        for r in list(tier.open.values()):
            tier._seal(r)
        for _ in range(1000):  # bounded: let the last summaries land
            if all(r.sum_state != "writing" for r in tier.regions):
                break
            await asyncio.sleep(0.01)
    asyncio.run(run())
    gc.collect()
    kept = tracemalloc.get_traced_memory()[0] - base
    print(f"write: {n} records in {time.perf_counter() - t0:.1f} s; tier keeps {kept} B "
          f"= {kept / n:.1f} B/object; objects={tier.stats()['objects']}")
    tier.close()


def tier_mode(path: str, n: int) -> None:
    tracemalloc.start()
    gc.collect()
    base = tracemalloc.get_traced_memory()[0]
    tier = _tier(path, n)
    objs = tier.recovered_objects()
    count = len(objs)
    del objs
    gc.collect()
    kept = tracemalloc.get_traced_memory()[0] - base
    print(f"tier restart: {count} objects; tier keeps {kept} B = {kept / max(count, 1):.1f} B/object")
    tier.close()


def store_mode(path: str, n: int) -> None:
    gc.collect()
    reset_peak_rss()
    before, hwm = rss_anon(), peak_rss()
    t0 = time.perf_counter()
    tier = _tier(path, n)
    limits = StoreLimits(dram_size=64 * MiB, slab_size=MiB, max_value_size=MiB, prefault=False)
    store = Store(limits, nvme=tier)
    secs = time.perf_counter() - t0
    peak = peak_rss() - hwm  # all resident pages; the DRAM arena stays untouched (prefault off)
    gc.collect()
    grew = rss_anon() - before  # (prefault off: the arena is mapped, not touched)
    count = len(store.index)
    print(f"store restart: {count} NVMe-only objects in {secs:.1f} s; RssAnon "
          f"+{grew / MiB:.1f} MiB = {grew / max(count, 1):.1f} B/object held, peak while "
          f"recovering +{peak / MiB:.1f} MiB = {peak / max(count, 1):.1f} B/object "
          f"(index {type(store.index).__name__})")
    store.close()


def live_mode(path: str, n: int) -> None:
    if os.path.exists(path):
        os.unlink(path)  # a fresh tier: the mode's own puts only
    limits = StoreLimits(dram_size=64 * MiB, slab_size=MiB, max_value_size=MiB, prefault=False,
                         hugepages=False, put_wait_timeout=30.0)
    data = b"x" * (SIZE - 16)

    async def run() -> tuple[int, int, float]:
        store = Store(limits, nvme=_tier(path, n))
        try:
            for i in range(2000):  # warm: the arena's classes, pools and tasks exist
                store.put_bytes(b"ns", b"warm-%010d" % i, data + i.to_bytes(16, "little"))
            await store.drain_tasks(30)
            gc.collect()
            before = rss_anon()
            t0 = time.perf_counter()
            for i in range(n):
                v = data + i.to_bytes(16, "little")  # new bytes: no dedup
                res = await store.reserve_wait(b"ns", b"key-%010d" % i, len(v), None)
                res.view[:] = v
                store.commit(res)
                if i % 256 == 0:
                    await asyncio.sleep(0)  # let demotions run
            await store.drain_tasks(60)
            gc.collect()
            grew = rss_anon() - before
            cold = sum(1 for e in store.index.iterate() if e.offset < 0)
            return grew, cold, time.perf_counter() - t0
        finally:
            await store.drain_tasks(10)
            store.close()
    grew, cold, secs = asyncio.run(run())
    print(f"live: {n} puts in {secs:.1f} s, {cold} NVMe-only afterwards; RssAnon +{grew / MiB:.1f} "
          f"MiB = {grew / n:.1f} B/object put")


if __name__ == "__main__":
    mode, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    {"write": write, "tier": tier_mode, "store": store_mode, "live": live_mode}[mode](path, n)
