"""DeleteAll over NVMe-only (keyless) objects: time, CPU and the longest event-loop stall.

    python benchmarks/bench_delete_all.py --objects 100000 [--dir /work/tmp] [--value 512]
                                          [--mode old,new] [--json F]

For each mode a fresh tier file holding ``--objects`` records (one namespace, keys of 13
bytes) is written, a Store is opened on it (recovery indexes every record keyless, as
a restarted node does), and while a ticker task sleeps 10 ms at a time and records the
longest gap between its wake-ups, the mode runs:

  * ``old``: what the DeleteAll RPC did before (``Store.keys()``: one synchronous header
    read per keyless object, then ``Store.delete`` per namespace), on the loop;
  * ``keys``: only the old ``Store.keys()`` walk (read-only; the old code's dominant part);
  * ``new``: ``await Store.delete_all()`` (keys read per region in bulk, steps of
    WALK_CHUNK entries, each step's tombstones written before the next);
  * ``list-old`` / ``list-new``: the List RPC's largest page (10,000 objects) read the
    old way (``Store.sample`` then ``.key`` of each) and the new (``Store.sample_keys``).

After a deleting mode the Store is closed and reopened: the objects recovered must be 0
(the tombstones hold). The tier file is deleted at the end of each mode.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from peers import machine_facts  # noqa: E402

MiB = 1 << 20
NS = b"bench"


def tier_geometry(records: int, size: int) -> tuple[int, int]:
    from kvstored.engine.nvme import BLOCK, DATA_START, align_up
    region = 64 * MiB
    per_region = (region - 2 * BLOCK) // (BLOCK + align_up(size)) - 8  # room for a summary
    # + room for one tombstone block per record (and a spare region for reclaim)
    nregions = -(-records // per_region) + -(-records * BLOCK // region) + 3
    return DATA_START + nregions * region, region


async def fill(path: str, records: int, size: int, depth: int = 32) -> float:
    from kvstore.wire import checksum
    from kvstored.engine.nvme import NvmeDevice, NvmeTier, align_up
    import mmap
    fsize, region = tier_geometry(records, size)
    buf = mmap.mmap(-1, align_up(size))
    buf[:] = os.urandom(len(buf))
    view = memoryview(buf)
    csum = checksum(view[:size])
    tier = NvmeTier(NvmeDevice(path, fsize, region, "auto", depth), sync="none", queue_depth=depth)
    keys = iter(range(records))
    committed = time.time() - 60  # before the walk begins (delete_all keeps newer objects)

    async def writer():
        for i in keys:
            await tier.append(NS, b"key-%09d" % i, view, size, csum, align_up(size), committed)
    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(writer() for _ in range(depth)))
    finally:
        tier.close()
    return time.perf_counter() - t0


def open_store(path: str, records: int, size: int):
    from kvstored.engine import Store, StoreLimits
    from kvstored.engine.nvme import NvmeDevice, NvmeTier
    fsize, region = tier_geometry(records, size)
    limits = StoreLimits(dram_size=64 * MiB, slab_size=4 * MiB, max_value_size=4 * MiB,
                         hugepages=False, prefault=False)
    return Store(limits, nvme=NvmeTier(NvmeDevice(path, fsize, region, "auto", 32)))


async def timed(store, mode: str) -> dict:
    done = False
    max_gap = 0.0
    ticks = 0

    async def ticker():
        nonlocal max_gap, ticks
        while not done:  # bounded: ends with the measured call
            t = time.perf_counter()
            await asyncio.sleep(0.01)
            max_gap = max(max_gap, time.perf_counter() - t - 0.01)
            ticks += 1

    tick = asyncio.get_running_loop().create_task(ticker())
    await asyncio.sleep(0.02)
    t0, c0 = time.perf_counter(), time.process_time()
    if mode == "new":
        r = await store.delete_all(None)
        n, unreadable = r.deleted, r.unreadable
    elif mode == "old":
        by_ns: dict[bytes, list[bytes]] = {}
        for ns, key in store.keys(None):
            by_ns.setdefault(ns, []).append(key)
        n = sum(store.delete(ns, keys) for ns, keys in by_ns.items())
        unreadable = 0
    elif mode == "list-old":  # what List did: sample, then .key of each (sync reads)
        n, unreadable = len([e.key for e in store.sample(None, 10000)]), 0
    elif mode == "list-new":
        n, unreadable = len(await store.sample_keys(None, 10000)), 0
    else:  # keys
        n, unreadable = len(store.keys(None)), 0
    t1, c1 = time.perf_counter(), time.process_time()
    await store.drain_tasks(120)  # the tombstones the old code left in flight
    t2, c2 = time.perf_counter(), time.process_time()
    await asyncio.sleep(0.02)
    done = True
    await tick
    return {"mode": mode, "objects": n, "unreadable": unreadable, "call_s": t1 - t0,
            "call_cpu_s": c1 - c0, "with_tombstones_s": t2 - t0, "with_tombstones_cpu_s": c2 - c0,
            "max_loop_stall_s": max_gap, "ticks": ticks}


def run_mode(directory: str, mode: str, records: int, size: int) -> dict:
    path = os.path.join(directory, f"delete-all-{mode}.dat")
    try:
        fill_s = asyncio.run(fill(path, records, size))
        t0 = time.perf_counter()
        store = open_store(path, records, size)
        open_s = time.perf_counter() - t0
        assert store.object_count() == records, store.object_count()
        keyless = sum(1 for e in store.index.iterate() if not e.key_in_ram)

        async def go():
            try:
                return await timed(store, mode)
            finally:
                await store.drain_tasks(120)
                store.close()
        out = asyncio.run(go())
        out.update(fill_s=fill_s, open_s=open_s, keyless=keyless, load_avg=os.getloadavg()[0])
        if mode in ("old", "new"):
            again = open_store(path, records, size)
            out["recovered_after"] = again.object_count()
            again.close()
        return out
    finally:
        if os.path.exists(path):
            os.unlink(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objects", type=int, default=100_000)
    ap.add_argument("--value", type=int, default=512, help="bytes per object")
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--mode", default="old,new", help="comma list of old, keys, new, list-old, list-new")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="bench-delete-all-", dir=args.dir)
    rows = []
    try:
        for mode in args.mode.split(","):
            r = run_mode(work, mode, args.objects, args.value)
            rows.append(r)
            print(f"{mode:>4}: {r['objects']} objects ({r['keyless']} keyless) in {r['call_s']:.2f} s "
                  f"(cpu {r['call_cpu_s']:.2f} s; {r['with_tombstones_s']:.2f} s with tombstones "
                  f"written), longest loop stall {r['max_loop_stall_s'] * 1e3:.0f} ms, "
                  f"recovered after: {r.get('recovered_after', '-')}; load {r['load_avg']:.1f}",
                  flush=True)
    finally:
        os.rmdir(work)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "machine": machine_facts()}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
