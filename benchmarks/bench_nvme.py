"""NVMe tier benchmark: demotion and NVMe-served gets beside fio on the same file system.

    python benchmarks/bench_nvme.py [--dir DIR] [--total 3GiB] [--value 1MiB] [--markdown F] [--json F]

1. fio (ioengine=io_uring, direct=1, bs=1M, iodepth=32) sequential write and
   read of a file in DIR: the disk's limit for this access pattern.
2. kvstored with a small DRAM tier (512 MiB) and an NVMe tier file in DIR.
   Demotion: 8 pipelined writers put ``total`` bytes of ``value``-sized
   objects; once DRAM is full every put forces a demotion, so the sustained
   rate is the demotion rate. Figure: NVMe bytes written per second between
   10 % and 90 % of the demoted bytes (from Stats, sampled every 0.2 s).
3. NVMe gets: gets of the objects that now live only on NVMe, 32 in flight
   (queue depth 32 as fio), each promoted into DRAM with its checksum verified
   by the daemon and again by the client.

    python benchmarks/bench_nvme.py --sync-modes [--dir DIR] [--total 512MiB] [--value 256KiB]

What each ``nvme.sync`` mode costs, on the engine alone (no daemon, no fio): for
none, interval (1 s) and always, 32 appends in flight write ``total`` bytes of
``value``-sized records into a fresh tier file (first fill: the file system
converts its unwritten extents), then the same amount again over reclaimed
regions (rewrite: the steady state). Figures: MB/s, records/s, append latency
p50/p99 and the number of fdatasyncs.

    python benchmarks/bench_nvme.py --restart 100000 [--dir DIR] [--value 4KiB] [--keep-file PATH]

Restart cost: write that many records (64 MiB regions), close the tier, and time
opening it again until the Store's index of recovered objects is built, i.e. until
the node could serve (median of three opens; O_DIRECT, so the page cache does not
help). Figures: seconds and per record, wall clock and CPU time (the CPU figure is the
one to compare on a busy machine), split into the tier's scan and the index build.
``--keep-file PATH`` reuses a filled tier file across runs (filling 1 M records takes
about two minutes here).

    python benchmarks/bench_nvme.py --demotion-cpu 20000 [--dir DIR] [--value 4KiB]

CPU per demoted record, on the engine alone: a Store (256 MiB DRAM) with an NVMe tier
on a file in DIR takes that many objects, then demotes all of them at once (the
watermarks set to 0 for one ``maybe_evict``, the way a full node evicts past its high
one) and waits for the writes; three rounds. Figures: process CPU (user and system)
per record from the eviction to the DRAM slot freed, and MB/s of wall time.

    python benchmarks/bench_nvme.py --shutdown-flush 20000 [--dir DIR] [--value 16KiB]

The shutdown flush: a daemon whose DRAM tier holds that many objects, none demoted,
gets SIGTERM; seconds from the signal to its exit, and what its log says the flush
wrote and could not keep.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [HERE, REPO, os.path.join(REPO, "client")]

from bench_tcp import KvstoredDaemon  # noqa: E402
from peers import (human_size, machine_facts, parse_size, peak_rss, reset_peak_rss,  # noqa: E402
                   rss_anon)

MiB = 1 << 20


def fio(path: str, rw: str, size: int, runtime: int = 15) -> dict:
    if shutil.which("fio") is None:
        raise SystemExit("fio is not installed (make bench-deps installs it)")
    cmd = ["fio", "--name=kvstored-peer", f"--filename={path}", f"--size={size}", "--bs=1M",
           "--iodepth=32", "--ioengine=io_uring", "--direct=1", f"--rw={rw}", "--numjobs=1",
           f"--runtime={runtime}", "--output-format=json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime + 120)
    if out.returncode != 0:
        raise SystemExit(f"fio failed: {out.stderr.strip()[-500:]}")
    job = json.loads(out.stdout)["jobs"][0][rw]
    return {"bytes_s": job["bw_bytes"], "iops": job["iops"], "cmd": " ".join(cmd)}


def nvme_counters(client) -> dict:
    t = next(t for t in client.stats().tiers if t.name == "nvme")
    return dict(t.counters)


def demotion_phase(kvstore, address: str, keys: list[bytes], value: bytes, concurrency: int = 8) -> dict:
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sampler():
        with kvstore.Client(address, namespace="bench", timeout=30) as c:
            while not stop.is_set():
                samples.append((time.perf_counter(), nvme_counters(c)["bytes_written"]))
                time.sleep(0.2)

    async def writers():
        async with kvstore.AsyncClient(address, namespace="bench", timeout=60) as ac:
            it = iter(keys)

            async def w():
                for k in it:
                    await ac.put(k, value)
            await asyncio.gather(*(w() for _ in range(concurrency)))

    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    t0 = time.perf_counter()
    asyncio.run(writers())
    put_s = time.perf_counter() - t0
    time.sleep(1.0)  # let the last demotions land in the samples
    stop.set()
    th.join(10)
    total = samples[-1][1]
    lo = next(s for s in samples if s[1] >= 0.1 * total)
    hi = next(s for s in samples if s[1] >= 0.9 * total)
    rate = (hi[1] - lo[1]) / (hi[0] - lo[0]) if hi[0] > lo[0] else 0.0
    return {"demotion_bytes_s": rate, "put_bytes_s": len(keys) * len(value) / put_s,
            "nvme_bytes_written": total}


def get_phase(kvstore, address: str, keys: list[bytes], size: int, concurrency: int = 32) -> dict:
    async def run():
        async with kvstore.AsyncClient(address, namespace="bench", timeout=60) as ac:
            it = iter(keys)
            lat: list[float] = []

            async def r():
                buf = bytearray(size)
                for k in it:
                    t = time.perf_counter()
                    n = await ac.get_into(k, buf)
                    lat.append(time.perf_counter() - t)
                    assert n == size
            t0 = time.perf_counter()
            await asyncio.gather(*(r() for _ in range(concurrency)))
            return time.perf_counter() - t0, sorted(lat)

    dt, lat = asyncio.run(run())
    return {"get_bytes_s": len(keys) * size / dt, "p50_us": lat[len(lat) // 2] * 1e6,
            "p99_us": lat[int(len(lat) * 0.99)] * 1e6, "gets": len(keys)}


def sync_phase(directory: str, total: int, size: int, depth: int = 32) -> list[dict]:
    """Append throughput and latency of the NVMe tier under each nvme.sync mode."""
    import mmap

    from kvstored.engine.nvme import DATA_START, NvmeDevice, NvmeTier, align_up
    from kvstore.wire import checksum

    region = max(16 * MiB, align(2 * (size + 8192)))
    nregions = max(2, -(-total // region))
    buf = mmap.mmap(-1, align_up(size))
    buf[:] = os.urandom(len(buf))
    view = memoryview(buf)
    csum = checksum(view[:size])
    rows = []
    for mode in ("none", "interval", "always"):
        path = os.path.join(directory, f"sync-{mode}.dat")
        dev = NvmeDevice(path, DATA_START + nregions * region, region, "auto", depth)

        async def run() -> list[dict]:
            tier = NvmeTier(dev, sync=mode, sync_interval=1.0, queue_depth=depth)
            out = []
            try:
                n = total // size
                for phase in ("first fill", "rewrite"):
                    keys = iter(range(n))
                    lat: list[float] = []
                    syncs0 = tier.counters["syncs"]

                    async def writer():
                        for i in keys:
                            t = time.perf_counter()
                            await tier.append(b"bench", b"k%d" % i, view, size, csum, align_up(size), 0.0)
                            lat.append(time.perf_counter() - t)
                    t0 = time.perf_counter()
                    await asyncio.gather(*(writer() for _ in range(depth)))
                    dt = time.perf_counter() - t0
                    lat.sort()
                    out.append({"mode": mode, "phase": phase, "bytes_s": n * size / dt,
                                "records_s": n / dt, "p50_us": lat[len(lat) // 2] * 1e6,
                                "p99_us": lat[int(len(lat) * 0.99)] * 1e6,
                                "fdatasyncs": tier.counters["syncs"] - syncs0,
                                "io_backend": tier.io_backend})
            finally:
                tier.close()
            return out
        try:
            rows += asyncio.run(run())
        finally:
            os.unlink(path)
    return rows


def restart_phase(directory: str, records: int, size: int, depth: int = 32,
                  keep: str | None = None) -> dict:
    """Seconds to reopen a tier holding ``records`` records and rebuild the Store's index.
    ``keep``: a tier file to reuse (filled first if it does not exist) and leave in place."""
    import gc
    import mmap
    import statistics

    from kvstored.engine import Store, StoreLimits
    from kvstored.engine.nvme import BLOCK, DATA_START, NvmeDevice, NvmeTier, align_up
    from kvstore.wire import checksum

    region = 64 * MiB
    per_region = (region - 2 * BLOCK) // (BLOCK + align_up(size)) - 8  # room for a summary
    nregions = -(-records // per_region) + 2
    path = keep or os.path.join(directory, "restart.dat")
    fsize = DATA_START + nregions * region
    buf = mmap.mmap(-1, align_up(size))
    buf[:] = os.urandom(len(buf))
    view = memoryview(buf)
    csum = checksum(view[:size])

    async def fill() -> float:
        tier = NvmeTier(NvmeDevice(path, fsize, region, "auto", depth), sync="none", queue_depth=depth)
        keys = iter(range(records))

        async def writer():
            for i in keys:
                await tier.append(b"bench", b"key-%09d" % i, view, size, csum, align_up(size), 0.0)
        t0 = time.perf_counter()
        try:
            await asyncio.gather(*(writer() for _ in range(depth)))
        finally:
            tier.close()
        return time.perf_counter() - t0

    limits = StoreLimits(dram_size=64 * MiB, slab_size=4 * MiB, max_value_size=max(4 * MiB, size),
                         hugepages=False, prefault=False)

    def reopen() -> dict:
        gc.collect()  # the last open's garbage is not this one's cost
        reset_peak_rss()
        r0 = rss_anon()
        h0 = peak_rss()
        t0, c0 = time.perf_counter(), time.process_time()
        tier = NvmeTier(NvmeDevice(path, fsize, region, "auto", depth))
        t1, c1 = time.perf_counter(), time.process_time()
        store = Store(limits, nvme=tier)  # recovered_objects and one index entry per object
        t2, c2 = time.perf_counter(), time.process_time()
        n = store.object_count()
        scanned = tier.counters["restart_scanned_regions"]
        gc.collect()
        # what the node holds per NVMe-only object once ready: the index and the tier's
        # own bookkeeping (the 64 MiB DRAM arena is a memfd: RssShmem, not counted)
        held = (rss_anon() - r0) / max(n, 1)
        peak = (peak_rss() - h0) / max(n, 1)  # recovery's transient: rows, tuples, Locations
        kind = store.index.kind
        store.close()
        return {"scan_s": t1 - t0, "scan_cpu_s": c1 - c0, "index_s": t2 - t1, "index_cpu_s": c2 - c1,
                "ready_s": t2 - t0, "cpu_s": c2 - c0, "objects": n, "scanned_regions": scanned,
                "rss_anon_per_object": held, "peak_rss_per_object": peak, "index_kind": kind}

    fill_s = None
    try:
        if not (keep and os.path.exists(keep)):
            fill_s = asyncio.run(fill())
        opens = [reopen() for _ in range(3)]
    finally:
        if not keep:
            os.unlink(path)
    assert all(o["objects"] == records for o in opens), opens
    out = {"records": records, "value": size, "fill_s": fill_s, "regions": nregions,
           "load_avg": os.getloadavg()[0], "opens": opens}
    for k in ("scan_s", "scan_cpu_s", "index_s", "index_cpu_s", "ready_s", "cpu_s"):
        out[k] = statistics.median(o[k] for o in opens)
    # the first open's: later ones reuse the heap pages an earlier open freed
    out["rss_anon_per_object"] = opens[0]["rss_anon_per_object"]
    out["peak_rss_per_object"] = opens[0]["peak_rss_per_object"]
    out["index_kind"] = opens[0].get("index_kind", "?")
    out["per_record_us"] = out["ready_s"] / records * 1e6
    out["cpu_per_record_us"] = out["cpu_s"] / records * 1e6
    return out


def render_sync(rows: list[dict], size: int, total: int) -> str:
    lines = [f"nvme.sync cost: {human_size(total)} of {human_size(size)} records per phase, 32 appends "
             f"in flight, io backend {rows[0]['io_backend']}", "",
             "| nvme.sync | phase | MB/s | records/s | append p50 us | append p99 us | fdatasyncs |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['phase']} | {r['bytes_s'] / 1e6:.0f} | {r['records_s']:.0f} | "
                     f"{r['p50_us']:.0f} | {r['p99_us']:.0f} | {r['fdatasyncs']} |")
    return "\n".join(lines)


def demotion_cpu_phase(work: str, n: int, size: int, rounds: int = 3) -> list[dict]:
    """CPU per demoted record (engine only): see the module docstring."""
    from kvstored.engine import Store, StoreLimits
    from kvstored.engine.nvme import NvmeDevice, NvmeTier

    async def run() -> list[dict]:
        region = 64 * MiB
        need = rounds * n * (size + 4096 + 4095) // 4096 * 4096 * 2
        dev = NvmeDevice(os.path.join(work, "tier.dat"), MiB + (need // region + 2) * region,
                         region, "auto", 32)
        s = Store(StoreLimits(dram_size=256 * MiB, slab_size=4 * MiB, max_value_size=4 * MiB,
                              prefault=False), nvme=NvmeTier(dev))
        data = os.urandom(size)
        rows = []
        try:
            for rnd in range(rounds):
                for i in range(n):
                    s.put_bytes(b"bench", b"r%dk%d" % (rnd, i), data)
                lim = s.limits
                was = lim.high_watermark, lim.low_watermark
                t0, w0, p0 = os.times(), time.perf_counter(), time.process_time()
                lim.high_watermark = lim.low_watermark = 0.0
                m = s.maybe_evict()
                lim.high_watermark, lim.low_watermark = was
                await s.drain_tasks(120)
                wall, t1, cpu = time.perf_counter() - w0, os.times(), time.process_time() - p0
                rows.append({"records": m, "user_us": (t1.user - t0.user) / m * 1e6,
                             "sys_us": (t1.system - t0.system) / m * 1e6,
                             "cpu_us": cpu / m * 1e6,  # (process_time: finer than os.times)
                             "mb_s": m * size / wall / 1e6, "io_backend": s.nvme.io_backend,
                             "load_avg": os.getloadavg()[0]})
        finally:
            s.close()
        return rows
    return asyncio.run(run())


def shutdown_flush_phase(kvstore, work: str, n: int, size: int) -> dict:
    """SIGTERM with ``n`` DRAM-only objects of ``size`` bytes (a DRAM tier large enough to
    hold them all, so none was demoted): seconds from the signal to the daemon's exit, and
    what its log says the flush wrote and could not keep."""
    import re
    import signal
    tier = os.path.join(work, "tier.dat")
    extra = ["--nvme-path", tier, "--nvme-size", str(align(n * (size + 4096) * 2 + 256 * MiB)),
             "--nvme-region-size", "64MiB"]
    dram = align(n * size * 3 // 2 + 64 * MiB, MiB)
    value = os.urandom(size)
    with KvstoredDaemon("", dram_size=str(dram), max_value_size=max(size, 4 * MiB),
                        slab_size=4 * MiB, extra_args=extra) as d:
        with kvstore.Client(d.address, namespace="bench") as c:
            for i in range(n):
                c.put(b"obj-%08d" % i, value)
            tiers = {t.name: t for t in c.stats().tiers}
            dram_only = tiers["dram"].objects - tiers["nvme"].objects
        t0, c0 = time.perf_counter(), os.times()
        d.proc.send_signal(signal.SIGTERM)
        rc = d.proc.wait(timeout=300)
        wall = time.perf_counter() - t0
        log_text = d.log_tail(200_000)
    m = re.search(r"shutdown: wrote (\d+) DRAM-only objects to NVMe; (\d+) could not be kept", log_text)
    return {"objects": n, "value": size, "dram_only_at_signal": dram_only, "exit_s": wall, "rc": rc,
            "written": int(m.group(1)) if m else None, "not_kept": int(m.group(2)) if m else None,
            "load_avg": os.getloadavg()[0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default=os.path.join(HERE, "out"), help="where the fio and tier files go")
    ap.add_argument("--total", help="bytes demoted (default 3GiB; --sync-modes: 512MiB per phase)")
    ap.add_argument("--value", help="object size (default 1MiB; --sync-modes: 256KiB)")
    ap.add_argument("--sync-modes", action="store_true",
                    help="only measure what each nvme.sync mode costs (engine, no daemon, no fio)")
    ap.add_argument("--restart", type=int, metavar="N",
                    help="only measure how long a restart with N records takes (engine)")
    ap.add_argument("--keep-file", metavar="PATH",
                    help="--restart: reuse this tier file (filled first if absent) and leave it")
    ap.add_argument("--demotion-cpu", type=int, metavar="N",
                    help="only measure the CPU per demoted record, N records a round (engine)")
    ap.add_argument("--shutdown-flush", type=int, metavar="N",
                    help="only measure how long SIGTERM takes with N DRAM-only objects of "
                    "--value (default 16KiB) to flush to NVMe (daemon)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="--demotion-cpu: rounds (the lowest CPU per record is printed too: "
                    "on a shared machine the least disturbed round)")
    ap.add_argument("--backends", default="io_uring,threads",
                    help="nvme.io_backend values to run one after the other (default io_uring,threads)")
    ap.add_argument("--markdown")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    import kvstore

    os.makedirs(args.dir, exist_ok=True)
    if args.demotion_cpu:
        size = parse_size(args.value or "4KiB")
        work = tempfile.mkdtemp(prefix="bench-nvme-demote-", dir=args.dir)
        try:
            rows = demotion_cpu_phase(work, args.demotion_cpu, size, args.rounds)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        for r in rows:
            print(f"{r['records']} records of {human_size(size)} demoted: CPU "
                  f"{r['cpu_us']:.2f} us per record (user {r['user_us']:.1f}, "
                  f"sys {r['sys_us']:.1f}), {r['mb_s']:.0f} MB/s, {r['io_backend']}, "
                  f"load {r['load_avg']:.1f}")
        best = min(r["cpu_us"] for r in rows)
        print(f"lowest of {len(rows)} rounds: CPU {best:.2f} us per record")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"demotion_cpu": rows, "machine": machine_facts()}, f, indent=2)
        return 0
    if args.shutdown_flush:
        size = parse_size(args.value or "16KiB")
        work = tempfile.mkdtemp(prefix="bench-nvme-flush-", dir=args.dir)
        try:
            r = shutdown_flush_phase(kvstore, work, args.shutdown_flush, size)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(f"SIGTERM with {r['dram_only_at_signal']} DRAM-only objects of {human_size(size)}: "
              f"exit in {r['exit_s']:.2f} s (rc {r['rc']}), flush wrote {r['written']}, "
              f"not kept {r['not_kept']}; load average {r['load_avg']:.1f} on {os.cpu_count()} CPUs")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"shutdown_flush": r, "machine": machine_facts()}, f, indent=2)
        return 0
    if args.restart:
        work = tempfile.mkdtemp(prefix="bench-nvme-restart-", dir=args.dir)
        try:
            r = restart_phase(work, args.restart, parse_size(args.value or "4KiB"), keep=args.keep_file)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        filled = f"filled in {r['fill_s']:.1f} s" if r["fill_s"] is not None else "file reused"
        report = (f"restart with {r['records']} records of {human_size(r['value'])} "
                  f"({r['regions']} regions of 64 MiB): ready (Store index built) in "
                  f"{r['ready_s']:.2f} s, {r['per_record_us']:.1f} us per record; CPU {r['cpu_s']:.2f} s, "
                  f"{r['cpu_per_record_us']:.2f} us per record (tier scan {r['scan_s']:.2f} s wall / "
                  f"{r['scan_cpu_s']:.2f} s CPU, index {r['index_s']:.2f} s / {r['index_cpu_s']:.2f} s; "
                  f"median of 3; {filled}; load average {r['load_avg']:.1f} on {os.cpu_count()} CPUs)")
        for o in r["opens"]:
            print(f"  open: ready {o['ready_s']:.2f} s, CPU {o['cpu_s']:.2f} s, "
                  f"regions scanned {o['scanned_regions']}, "
                  f"RssAnon {o['rss_anon_per_object']:.1f} B per object, "
                  f"peak {o['peak_rss_per_object']:.1f} B per object while recovering")
        print(report)
        print(f"held once ready: {r['rss_anon_per_object']:.1f} B of RssAnon per NVMe-only object "
              f"(first open; {r['index_kind']} index and the tier's bookkeeping); peak while "
              f"recovering: {r['peak_rss_per_object']:.1f} B per object")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"restart": r, "machine": machine_facts()}, f, indent=2)
        return 0
    if args.sync_modes:
        total, size = parse_size(args.total or "512MiB"), parse_size(args.value or "256KiB")
        work = tempfile.mkdtemp(prefix="bench-nvme-sync-", dir=args.dir)
        try:
            rows = sync_phase(work, total, size)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        report = render_sync(rows, size, total)
        print(report)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(report + "\n")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"sync_modes": rows, "machine": machine_facts()}, f, indent=2)
        return 0
    total, size = parse_size(args.total or "3GiB"), parse_size(args.value or "1MiB")
    work = tempfile.mkdtemp(prefix="bench-nvme-", dir=args.dir)
    try:
        peer = os.path.join(work, "fio.dat")
        print("fio write ...", flush=True)
        fw = fio(peer, "write", min(total, 2 << 30))
        print("fio read ...", flush=True)
        fr = fio(peer, "read", min(total, 2 << 30))
        os.unlink(peer)
        n = total // size
        keys = [b"obj-%08d" % i for i in range(n)]
        value = os.urandom(size)
        nvme_size = align(int(total * 1.5) + 256 * MiB)
        runs = []
        for want in args.backends.split(","):
            tier = os.path.join(work, f"tier-{want}.dat")
            conf = os.path.join(work, f"kvstored-{want}.toml")
            with open(conf, "w") as f:  # nvme.io_backend has no flag: a config file per run
                f.write(f'[nvme]\nio_backend = "{want}"\n')
            extra = ["--config", conf, "--nvme-path", tier, "--nvme-size", str(nvme_size),
                     "--nvme-region-size", "64MiB"]
            print(f"kvstored ({want}): demoting {human_size(total)} of {human_size(size)} objects ...",
                  flush=True)
            with KvstoredDaemon("", dram_size="512MiB", max_value_size=max(size, 4 * MiB),
                                slab_size=max(size, 4 * MiB), extra_args=extra) as d:
                dem = demotion_phase(kvstore, d.address, keys, value)
                with kvstore.Client(d.address, namespace="bench") as c:
                    on_nvme = [e.key for e in c.list(limit=len(keys)).entries if e.tier == "nvme"]
                    before = nvme_counters(c)
                print(f"kvstored ({want}): getting {len(on_nvme)} NVMe-only objects ...", flush=True)
                got = get_phase(kvstore, d.address, on_nvme, size)
                with kvstore.Client(d.address, namespace="bench") as c:
                    after = nvme_counters(c)
                    backend = next(t for t in c.stats().tiers if t.name == "nvme")
            os.unlink(tier)
            runs.append({**dem, **got, "promotions": after["promotions"] - before["promotions"],
                         "checksum_failures": after["checksum_failures"],
                         "asked": want, "io_backend": backend.io_backend or (
                             "threads" if backend.counters.get("io_backend_fallback") else "io_uring"),
                         "io_backend_reason": backend.io_backend_reason})
        result = {
            "fio_write_bytes_s": fw["bytes_s"], "fio_read_bytes_s": fr["bytes_s"], "runs": runs,
            "value": size, "total": total, "fio_cmd_write": fw["cmd"], "fio_cmd_read": fr["cmd"],
            "machine": machine_facts(),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = render(result)
    print(report)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def align(n: int, a: int = 4096) -> int:
    return (n + a - 1) // a * a


def render(r: dict) -> str:
    gb = lambda x: f"{x / 1e9:.2f}"  # noqa: E731
    lines = [f"NVMe tier, {human_size(r['value'])} objects, {human_size(r['total'])} demoted per "
             "backend, fio measured in the same run on the same file system", "",
             "| what | io backend | kvstored GB/s | fio GB/s | ratio | target |",
             "|---|---|---:|---:|---:|---:|"]
    for x in r["runs"]:
        lines.append(f"| demotion (sequential writes of evicted objects) | {x['io_backend']} | "
                     f"{gb(x['demotion_bytes_s'])} | {gb(r['fio_write_bytes_s'])} | "
                     f"{x['demotion_bytes_s'] / r['fio_write_bytes_s']:.2f} | 0.70 |")
    for x in r["runs"]:
        lines.append(f"| gets served from NVMe (32 in flight) | {x['io_backend']} | {gb(x['get_bytes_s'])} | "
                     f"{gb(r['fio_read_bytes_s'])} | {x['get_bytes_s'] / r['fio_read_bytes_s']:.2f} | 0.60 |")
    lines.append("")
    for x in r["runs"]:
        why = f" (asked {x['asked']}: {x['io_backend_reason']})" if x["io_backend_reason"] else ""
        lines.append(f"{x['io_backend']}{why}: put rate while demoting {gb(x['put_bytes_s'])} GB/s; "
                     f"NVMe get p50 {x['p50_us']:.0f} us, p99 {x['p99_us']:.0f} us; promotions "
                     f"{x['promotions']} for {x['gets']} gets; checksum failures {x['checksum_failures']}")
    lines.append(f"fio: `{r['fio_cmd_write']}` (and --rw=read)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
