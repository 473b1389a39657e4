"""ClusterClient throughput: 1 MiB objects across 5 local kvstored nodes, per policy.

Starts 5 kvstored processes (tests/daemonutil.Daemon), then for none, replicas:2 and
ec:3+2 measures aggregate batch_put / batch_get / sequential get of 1 MiB objects
(bytes of user data per second), plus pyeclib's raw encode / decode of 1 MiB in the
same run. Runs with MALLOC_TRIM_THRESHOLD_ / MALLOC_MMAP_THRESHOLD_ set (re-executes
itself if needed): glibc otherwise grows and trims the heap on every 1 MiB
allocation (docs: DESIGN.md pitfalls). All on one host: the nodes share the client's
cores, so this measures the client and the codec, not a network.

    PYTHONPATH=client:. python benchmarks/bench_cluster.py [--objects 64] [--shm]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20


def _reexec_with_malloc_env() -> None:
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        env = dict(os.environ, MALLOC_TRIM_THRESHOLD_=str(256 * MIB), MALLOC_MMAP_THRESHOLD_=str(64 * MIB))
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def rate(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def bench_codec(k: int, m: int, ec_type: str, rounds: int) -> dict:
    from pyeclib.ec_iface import ECDriver
    d = ECDriver(k=k, m=m, ec_type=ec_type)
    data = os.urandom(MIB)
    frags = d.encode(data)
    for _ in range(5):
        d.encode(data)
    t = time.perf_counter()
    for _ in range(rounds):
        d.encode(data)
    enc = time.perf_counter() - t
    subset = frags[m:m + k]  # lose the first m data fragments: a real reconstruction
    assert d.decode(subset) == data
    t = time.perf_counter()
    for _ in range(rounds):
        d.decode(subset)
    dec = time.perf_counter() - t
    return {"codec": f"{ec_type} {k}+{m}", "encode_GBps": round(rate(rounds * MIB, enc), 2),
            f"decode_GBps (lost {m} data)": round(rate(rounds * MIB, dec), 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objects", type=int, default=64, help="1 MiB objects per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shm", action="store_true", help="let clients use the same-host shm path")
    args = ap.parse_args(argv)
    _reexec_with_malloc_env()
    sys.path[:0] = [str(REPO / "client"), str(REPO / "tests")]
    from daemonutil import Daemon
    from kvstore.cluster import ClusterClient

    cc_algo = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    results = {"congestion_control": cc_algo, "transport": "shm" if args.shm else "tcp",
               "object": "1 MiB", "objects_per_batch": args.objects, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        nodes = [Daemon(Path(tmp), "--dram-size", "256MiB", "--max-value-size", "4MiB").start()
                 for _ in range(5)]
        try:
            policies = {"none": "none", "rep2": "replicas:2", "ec32": "ec:3+2"}
            with ClusterClient([d.control for d in nodes], policy=policies, namespace="none",
                               shm=None if args.shm else False) as cc:
                payloads = [os.urandom(MIB) for _ in range(args.objects)]
                for ns, pol in policies.items():
                    puts, gets, seq = [], [], []
                    for r in range(args.rounds):
                        items = [(f"r{r}-o{i}".encode(), payloads[i]) for i in range(args.objects)]
                        t = time.perf_counter()
                        cc.batch_put(items, namespace=ns)
                        puts.append(time.perf_counter() - t)
                        keys = [k for k, _ in items]
                        t = time.perf_counter()
                        got = cc.batch_get(keys, namespace=ns)
                        gets.append(time.perf_counter() - t)
                        assert all(g == payloads[i] for i, g in enumerate(got))
                        del got
                        t = time.perf_counter()
                        for k in keys[:16]:
                            cc.get(k, namespace=ns)
                        seq.append(time.perf_counter() - t)
                        cc.delete(keys, namespace=ns)
                    n = args.objects * MIB
                    results["rows"].append({
                        "policy": pol,
                        "batch_put_GBps": round(rate(n, min(puts)), 2),
                        "batch_get_GBps": round(rate(n, min(gets)), 2),
                        "sequential_get_ms": round(min(seq) / 16 * 1e3, 2),
                    })
        finally:
            for d in nodes:
                d.stop()
    results["codec"] = [bench_codec(3, 2, "isa_l_rs_vand", 300), bench_codec(4, 2, "isa_l_rs_vand", 300)]
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
