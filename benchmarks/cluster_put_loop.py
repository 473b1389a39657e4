"""A ClusterClient put loop of fixed length on local nodes, to attach a profiler to.

Starts N kvstored nodes (TCP, no shm: as between hosts), prints their pids and the client's
(for ``perf record -p`` / ``py-spy record --pid``), then puts batches of ``--objects`` x
``--size`` under one policy for ``--seconds`` (new keys each batch, 8 random payloads
cycled; each batch deleted after it unless ``--keep``) and prints the median put time per
batch, the client's CPU per turn and the nodes' together (their schedstat run time, ns
resolution). ``--pool`` sends every node's part on the thread pool (``fanout_puts=False``,
the path before the fanned-out put). An ec:4+2 batch of 32 x 1 MiB is 192 records of
256 KiB + 128 B: ``--policy none --size 262272 --objects 192`` moves the same records
without encoding them (what the transport alone costs).

    python benchmarks/cluster_put_loop.py --policy ec:4+2 --seconds 10
    python benchmarks/cluster_put_loop.py --policy none --seconds 10 --pool
    python benchmarks/cluster_put_loop.py --policy ec:4+2 --seconds 12 --keep --dram 1536MiB &
    perf record -a -F 999 -- sleep 5      # once the pids are printed
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def nodes_cpu_s(ds) -> float:
    """CPU seconds the node processes have run (/proc/PID/schedstat: nanoseconds)."""
    total = 0
    for d in ds:
        try:
            total += int(Path(f"/proc/{d.proc.pid}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", default="ec:4+2")
    ap.add_argument("--nodes", type=int, default=6)
    ap.add_argument("--objects", type=int, default=32)
    ap.add_argument("--size", type=int, default=1 << 20, help="object size in bytes")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=int, default=10, help="batches not counted")
    ap.add_argument("--dram", default="256MiB", help="each node's --dram-size")
    ap.add_argument("--keep", action="store_true", help="no delete after each batch (nodes evict)")
    ap.add_argument("--pool", action="store_true", help="fanout_puts=False")
    a = ap.parse_args(argv)
    sys.path[:0] = [str(REPO / "client"), str(REPO / "tests")]
    from daemonutil import Daemon

    from kvstore.cluster import ClusterClient
    from kvstore.layout import Policy

    slab = max(4 << 20, 1 << (a.size - 1).bit_length())
    with tempfile.TemporaryDirectory() as tmp:
        ds = [Daemon(Path(tmp), "--dram-size", a.dram, "--slab-size", f"{slab >> 20}MiB",
                     "--max-value-size", f"{slab >> 20}MiB").launch() for _ in range(a.nodes)]
        try:
            for d in ds:
                d.wait_ready(60)
            cc = ClusterClient([d.control for d in ds], policy=Policy.parse(a.policy), shm=False,
                               fanout_puts=not a.pool)
            payloads = [os.urandom(a.size) for _ in range(8)]
            print("nodes", " ".join(str(d.proc.pid) for d in ds), "client", os.getpid(), flush=True)
            times: list[float] = []
            end = time.monotonic() + a.seconds
            c0, n0, r = time.process_time(), nodes_cpu_s(ds), 0
            while time.monotonic() < end:
                items = [(f"r{r}-o{i}".encode(), payloads[i % 8]) for i in range(a.objects)]
                t0 = time.perf_counter()
                cc.batch_put(items)
                t1 = time.perf_counter()
                if not a.keep:
                    cc.delete([k for k, _ in items])
                r += 1
                if r > a.warmup:
                    times.append(t1 - t0)
            cpu = (time.process_time() - c0) / max(r, 1)
            ncpu = (nodes_cpu_s(ds) - n0) / max(r, 1)
            if not times:
                print("no batch after the warm-up: raise --seconds", file=sys.stderr)
                return 1
            med = statistics.median(times)
            print(f"{a.policy} {'pool' if a.pool else 'fanned out'}: {len(times)} batches, median put "
                  f"{med * 1e3:.1f} ms/batch ({a.objects * a.size / med / 1e9:.2f} GB/s), client CPU "
                  f"{cpu * 1e3:.1f} ms/turn, nodes CPU {ncpu * 1e3:.1f} ms/turn{'' if a.keep else ' (put + delete)'}"
                  + ("" if a.pool else f", node parts sent on the pool {cc.pooled_put_jobs}"))
            cc.close()
        finally:
            for d in ds:
                d.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
