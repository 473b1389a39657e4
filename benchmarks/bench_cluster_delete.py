#!/usr/bin/env python3
"""ClusterClient.delete of many keys: batched calls (one per node and 512 records, each
answer saying which keys the node held) beside one call per record (what a node of an
earlier version, answering only a count, still gets; the client's only way before),
alternated in one run.

    python benchmarks/bench_cluster_delete.py [--nodes 6] [--keys 2000] [--rounds 3]
                                              [--policies ec:4+2,replicas:2]

Standalone nodes (a static member list, no etcd), TCP loopback, 1 KiB objects put
before each delete (not timed). Prints seconds per delete call and us per key, best of
``--rounds``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "client"), str(REPO / "tests")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=6)
    ap.add_argument("--keys", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--policies", default="ec:4+2,replicas:2")
    a = ap.parse_args(argv)
    if not (1 <= a.nodes <= 16 and 1 <= a.keys <= 100_000 and 1 <= a.rounds <= 20):
        ap.error("--nodes 1..16, --keys 1..100000, --rounds 1..20")
    from daemonutil import Daemon, start_all, stop_all

    from kvstore.cluster import ClusterClient

    print("| policy | keys | batched s | per-record s | batched us/key | per-record us/key | load |")
    print("|---|---:|---:|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        ds = [Daemon(Path(tmp), "--dram-size", "256MiB") for _ in range(a.nodes)]
        try:
            start_all(*ds)
            addrs = [d.control for d in ds]
            for pol in a.policies.split(","):
                best = {"batched": float("inf"), "per-record": float("inf")}
                with ClusterClient(addrs, policy=pol, shm=False) as cc:
                    for r in range(a.rounds):
                        for mode in (("batched", "per-record") if r % 2 == 0 else ("per-record", "batched")):
                            keys = [b"%s-%s-%d-%d" % (pol.encode(), mode.encode(), r, i) for i in range(a.keys)]
                            cc.batch_put([(k, os.urandom(1024)) for k in keys])
                            clients = [cc.client(m) for m in cc.members()]
                            if mode == "per-record":  # as a node that answers only a count
                                for c in clients:
                                    c.delete_each = lambda keys, **kw: None
                            t = time.perf_counter()
                            n = cc.delete(keys)
                            dt = time.perf_counter() - t
                            for c in clients:
                                c.__dict__.pop("delete_each", None)
                            assert n == a.keys, (n, a.keys)
                            best[mode] = min(best[mode], dt)
                load = open("/proc/loadavg").read().split()[0]
                b, p = best["batched"], best["per-record"]
                print(f"| {pol} | {a.keys} | {b:.3f} | {p:.3f} | {b / a.keys * 1e6:.0f} | "
                      f"{p / a.keys * 1e6:.0f} | {load} |", flush=True)
        finally:
            stop_all(ds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
