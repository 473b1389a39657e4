"""Placement cost per call: kvstore.placement against the frozen previous implementation
(the reference copy in tests/cluster/test_placement_equivalence.py), alternating in one
run so machine load hits both alike. Best of --repeat passes over --keys keys.

    PYTHONPATH=client .venv/bin/python benchmarks/bench_placement.py [--keys 2000] [--repeat 3]
"""
from __future__ import annotations

import argparse
import os
import sys
import timeit

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "cluster"))

import test_placement_equivalence as ref  # noqa: E402
from kvstore import layout, placement  # noqa: E402
from kvstore.placement import Member  # noqa: E402


def per_call(f, keys, repeat: int) -> float:
    """Microseconds per call of f(key), best of `repeat` passes."""
    return min(timeit.repeat(lambda: [f(k) for k in keys], number=1, repeat=repeat)) / len(keys) * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args(argv)
    if not (1 <= a.keys <= 100_000 and 1 <= a.repeat <= 20):
        ap.error("--keys must be 1..100000 and --repeat 1..20")
    keys = [b"\x01" + i.to_bytes(8, "little") + b"frag" for i in range(a.keys)]
    print("| members | call | old us | new us | new/old |")
    print("|---:|---|---:|---:|---:|")
    for m in (4, 5, 6, 16, 100):
        ms = [Member(f"node-{i}", f"127.0.0.1:{7000 + i}", "") for i in range(m)]
        cases = [(f"place_positions n={n}", lambda k, n=n: ref.ref_place_positions(k, ms, n, "ec"),
                  lambda k, n=n: placement.place_positions(k, ms, n, "ec")) for n in (4, 5, 6) if n <= m]
        cases.append(("place n=3", lambda k: ref.ref_place(k, ms, 3, "default"),
                      lambda k: placement.place(k, ms, 3, "default")))
        for name, old, new in cases:
            o = min(per_call(old, keys, a.repeat), per_call(old, keys, a.repeat))
            nw = min(per_call(new, keys, a.repeat), per_call(new, keys, a.repeat))
            print(f"| {m} | {name} | {o:.2f} | {nw:.2f} | {nw / o:.2f} |", flush=True)
    # layout.slots in the repair benchmark's shape: ec:3+2 on 5 members and on 4 survivors
    p = layout.Policy.parse("ec:3+2")
    pkeys = [layout.placement_key(b"blk-%d" % i, p) for i in range(a.keys)]
    fast = layout.place_positions
    for m in (5, 4):
        ms = [Member(f"node-{i}", f"127.0.0.1:{7000 + i}", "") for i in range(m)]
        r = {}
        for name, fn in (("old", ref.ref_place_positions), ("new", fast)) * 2:
            layout.place_positions = fn
            try:
                t = per_call(lambda k: layout.slots(k, ms, p, "ec"), pkeys, a.repeat)
            finally:
                layout.place_positions = fast
            r[name] = min(r.get(name, float("inf")), t)
        print(f"| {m} | layout.slots ec:3+2 | {r['old']:.2f} | {r['new']:.2f} | {r['new'] / r['old']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
