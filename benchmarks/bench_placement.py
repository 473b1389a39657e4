"""Placement cost per key: kvstore.placement's C path (kvstore._placement, native/placement.c)
against its Python path, alternating in one run so machine load hits both alike. Best of
--repeat passes over --keys keys (a tenth of them at 1,000 members).

    PYTHONPATH=client .venv/bin/python benchmarks/bench_placement.py [--keys 2000] [--repeat 3]

Two tables: layout.slots / place_positions / place on plain clusters of 4, 5, 50 and 1,000
members (the repair benchmark's shape is ec:3+2 on 5 members, 4 after a loss), then
docs/scale.md's shape (benchmarks/sim_scale.py's members: one failure domain per 20 nodes;
policies none, replicas:3, ec:4+2 at 10, 100 and 1,000 members).
"""
from __future__ import annotations

import argparse
import sys
import timeit

from kvstore import layout, placement
from kvstore.placement import Member
from sim_scale import keys as scale_keys, members as scale_members  # benchmarks/ (the script's dir)


def per_key(f, keys, repeat: int) -> float:
    """Microseconds per call of f(key), best of `repeat` passes."""
    return min(timeit.repeat(lambda: [f(k) for k in keys], number=1, repeat=repeat)) / len(keys) * 1e6


def both(f, keys, repeat: int) -> tuple[float, float]:
    """(Python us, C us) per key for f, each the best of two alternating rounds."""
    r = {True: float("inf"), False: float("inf")}
    for native in (False, True, False, True):
        placement._NATIVE = native
        try:
            r[native] = min(r[native], per_key(f, keys, repeat))
        finally:
            placement._NATIVE = True
    return r[False], r[True]


def row(m, name: str, py: float, c: float) -> None:
    print(f"| {m:,} | {name} | {py:.2f} | {c:.2f} | {py / c:.1f}x |", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args(argv)
    if not (10 <= a.keys <= 100_000 and 1 <= a.repeat <= 20):
        ap.error("--keys must be 10..100000 and --repeat 1..20")
    if placement._C is None:
        print("kvstore._placement is not built (native/placement.c needs libxxhash-dev)", file=sys.stderr)
        return 2
    ec32, rep3 = layout.Policy.parse("ec:3+2"), layout.Policy.parse("replicas:3")
    names = [b"blk-%d" % i for i in range(a.keys)]
    print("| members | call | Python us | C us | speed-up |")
    print("|---:|---|---:|---:|---:|")
    for m in (4, 5, 50, 1000):
        ms = [Member(f"node-{i}", f"127.0.0.1:{7000 + i}", "") for i in range(m)]
        ks = names if m < 1000 else names[:max(10, a.keys // 10)]
        ec_keys = [layout.placement_key(k, ec32) for k in ks]
        row(m, "layout.slots ec:3+2", *both(lambda k: layout.slots(k, ms, ec32, b"default"), ec_keys, a.repeat))
        row(m, "layout.slots replicas:3", *both(lambda k: layout.slots(k, ms, rep3, b"default"), ks, a.repeat))
        n = min(5, m)
        row(m, f"place_positions n={n}", *both(lambda k: placement.place_positions(k, ms, n, "ec"), ec_keys, a.repeat))
        row(m, "place n=3", *both(lambda k: placement.place(k, ms, 3, "default"), ks, a.repeat))
    print()
    print("| members | layout.slots (docs/scale.md shape) | Python us | C us | speed-up |")
    print("|---:|---|---:|---:|---:|")
    for m in (10, 100, 1000):
        ms = scale_members(m, domains=max(1, m // 20))
        ks = scale_keys(a.keys if m < 1000 else max(10, a.keys // 10))
        for text in ("none", "replicas:3", "ec:4+2"):
            p = layout.Policy.parse(text)
            pk = [layout.placement_key(k, p) for k in ks]
            row(m, text, *both(lambda k: layout.slots(k, ms, p, b"ns"), pk, a.repeat))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
