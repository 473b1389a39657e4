#!/usr/bin/env python3
"""The event loop's lag beside a Python-busy thread, by GIL switch interval.

    python benchmarks/bench_gil_switch.py [--intervals 5,1,0.5] [--wakeups 600] [--rounds 2]

kvstored serves every request on one uvloop event loop; the cluster repair agent runs in
threads of its own (blocking SDK calls to peers, Python work per object). While such a
thread runs Python, the loop's thread waits for the GIL at each wake-up, up to
``sys.getswitchinterval()`` (5 ms by default), so every request waits too. This measures
it: a uvloop timer due every 2 ms (600 wake-ups) beside one thread building dicts of
tuples flat out, in a fresh process per switch interval (alternating, ``--rounds``
times). Printed: the timer's lag (p50, p99, max) and the busy thread's work per second
(what the shorter interval costs it). The daemon sets kvstored.__main__.SWITCH_INTERVAL.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import threading
import time


def child(interval_s: float, wakeups: int) -> dict:
    import uvloop
    sys.setswitchinterval(interval_s)
    stop, rounds = [], [0]

    def busy():
        while not stop:
            d = {}
            for i in range(1000):
                d[i] = (i, str(i), i * 2)
            rounds[0] += 1

    async def timer() -> list[float]:
        lags = []
        for _ in range(wakeups):
            t0 = time.perf_counter()
            await asyncio.sleep(0.002)
            lags.append(time.perf_counter() - t0 - 0.002)
        return lags
    t = threading.Thread(target=busy, daemon=True)
    start = time.perf_counter()
    t.start()
    lags = sorted(uvloop.run(timer()))
    stop.append(1)
    t.join(5)
    wall = time.perf_counter() - start
    pick = lambda q: lags[min(len(lags) - 1, int(len(lags) * q))] * 1e3  # noqa: E731
    return {"interval_ms": interval_s * 1e3, "p50_ms": pick(0.5), "p99_ms": pick(0.99),
            "max_ms": lags[-1] * 1e3, "busy_rounds_s": rounds[0] / wall}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--intervals", default="5,1,0.5", help="switch intervals in ms")
    ap.add_argument("--wakeups", type=int, default=600)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", type=float, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child is not None:
        print(json.dumps(child(a.child, a.wakeups)))
        return 0
    rows = []
    for _ in range(a.rounds):
        for ms in (float(x) for x in a.intervals.split(",")):
            out = subprocess.run([sys.executable, __file__, "--child", str(ms / 1e3),
                                  "--wakeups", str(a.wakeups)], capture_output=True, text=True,
                                 timeout=120, check=True)
            rows.append(json.loads(out.stdout))
            print(rows[-1], file=sys.stderr)
    print("| switch interval | timer lag p50 | p99 | max | busy thread rounds/s |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['interval_ms']:.1f} ms | {r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms | "
              f"{r['max_ms']:.2f} ms | {r['busy_rounds_s']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
