"""Daemon before/after on one machine: batch puts to nodes of several source trees, in turn.

A node-side change is hard to see on a shared 2-core machine: load drifts by more than the
change between two runs. Here every tree (e.g. a ``git archive`` of the commit before and
the working tree) gets a cluster of its own (``--nodes`` kvstored processes run from that
tree), one ClusterClient per cluster and policy (client code from this repository), and
every turn puts one batch per tree and policy, the order rotated each turn, so drifting
load hits every tree alike. Each batch is deleted after it (as bench_cluster does). Per
tree and policy: medians of the batch's wall time, this thread's CPU (the client: the
fanned-out put runs on the calling thread) and the nodes' CPU (/proc/PID/schedstat, ns),
and the median of the per-turn ratios of the first policy's put time to each policy's.

    git archive HEAD | tar -x -C /tmp/before && cp kvstored/*.so /tmp/before/kvstored/
    python benchmarks/bench_put_trees.py /tmp/before . --turns 60
    python benchmarks/bench_put_trees.py /tmp/before /tmp/before . --size 4MiB --objects 8

Give the same tree twice to see the spread between identical clusters (an A/A run).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def parse_size(s: str) -> int:
    for unit, mult in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if s.endswith(unit):
            return int(float(s[:-len(unit)]) * mult)
    return int(s)


def nodes_cpu_ms(ds) -> float:
    return sum(int(Path(f"/proc/{d.proc.pid}/schedstat").read_text().split()[0]) for d in ds) / 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trees", nargs="+", help="source trees (each with kvstored/ and client/)")
    ap.add_argument("--turns", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=4, help="turns not counted")
    ap.add_argument("--size", default="1MiB")
    ap.add_argument("--objects", type=int, default=32)
    ap.add_argument("--nodes", type=int, default=6)
    ap.add_argument("--policies", default="none,ec:4+2")
    ap.add_argument("--dram", default="384MiB", help="each node's --dram-size")
    a = ap.parse_args(argv)
    trees = [Path(t).resolve() for t in a.trees]
    for t in trees:
        if not (t / "kvstored" / "__main__.py").exists():
            ap.error(f"{t} has no kvstored/ package")
    sys.path[:0] = [str(REPO / "client"), str(REPO / "tests")]
    from daemonutil import Daemon

    from kvstore.cluster import ClusterClient
    from kvstore.layout import Policy

    size, policies = parse_size(a.size), a.policies.split(",")
    tmp = tempfile.mkdtemp(prefix="bench-put-trees-")
    # ``python -m kvstored`` imports from its working directory first: run every node from
    # one that holds no tree, so that PYTHONPATH alone says which tree a node runs
    os.chdir(tmp)
    clusters: list[list] = []
    try:
        for t in trees:
            env = {"PYTHONPATH": f"{t / 'client'}{os.pathsep}{t}"}
            clusters.append([Daemon(Path(tmp), "--dram-size", a.dram, env=env).launch()
                             for _ in range(a.nodes)])
        for ds in clusters:
            for d in ds:
                d.wait_ready(120)
        clients = [{p: ClusterClient([d.control for d in ds], policy=Policy.parse(p), shm=False)
                    for p in policies} for ds in clusters]
        payloads = [os.urandom(size) for _ in range(min(a.objects, 8))]
        got: dict[tuple[int, str], list[tuple[float, float, float]]] = {}
        n = len(trees)
        load0, t_start = os.getloadavg()[0], time.monotonic()
        for turn in range(a.warmup + a.turns):
            order = [(turn + i) % n for i in range(n)]
            for i in order if turn % 2 == 0 else order[::-1]:
                for p in policies if turn % 4 < 2 else policies[::-1]:
                    items = [(f"t{turn}-{i}-{p}-o{j}".encode(), payloads[j % len(payloads)])
                             for j in range(a.objects)]
                    c0, n0, w0 = time.thread_time(), nodes_cpu_ms(clusters[i]), time.perf_counter()
                    stored = clients[i][p].batch_put(items)
                    w, c = time.perf_counter() - w0, time.thread_time() - c0
                    nc = nodes_cpu_ms(clusters[i]) - n0
                    assert all(stored), "a put was a no-op (key already stored)"
                    clients[i][p].delete([k for k, _ in items])
                    if turn >= a.warmup:
                        got.setdefault((i, p), []).append((w * 1e3, c * 1e3, nc))
        med = statistics.median
        print(f"# {a.objects} x {a.size} per batch, {a.nodes} nodes per tree, {a.turns} turns; "
              f"load {load0:.1f} -> {os.getloadavg()[0]:.1f}; {time.monotonic() - t_start:.0f} s\n")
        print("| tree | policy | wall ms | client CPU ms | nodes CPU ms | vs " + policies[0] + " |")
        print("|---|---|---:|---:|---:|---:|")
        for i, t in enumerate(trees):
            base = got[(i, policies[0])]
            for p in policies:
                v = got[(i, p)]
                ratio = med(b[0] / x[0] for b, x in zip(base, v))
                print(f"| {a.trees[i]} | {p} | {med(x[0] for x in v):.1f} | {med(x[1] for x in v):.1f} "
                      f"| {med(x[2] for x in v):.1f} | {ratio:.3f}x |")
        for cs in clients:
            for cc in cs.values():
                cc.close()
    finally:
        for ds in clusters:
            for d in ds:
                try:
                    d.stop()
                except Exception:  # noqa: BLE001 (stop the others)
                    pass
        os.chdir(REPO)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
