"""Same-host shared-memory path beside a plain memcpy, and TCP beside shm, in one run.

    python benchmarks/bench_shm.py [--sizes 64KiB,256KiB,1MiB,4MiB] [--duration 2] [--markdown F]

memcpy: ``dst[:] = src`` between bytearrays cycling over 32 destinations (the
same working set as the store's 32 keys, so caches help neither side more), and
one 256 MiB copy (the machine's memory bandwidth, out of every cache).
kvstored: one daemon (2 GiB DRAM); ``kvstore.Client(transport="shm")`` and
``kvstore.Client(transport="tcp")`` (the machine's congestion control); every row
names its transport. The client runs untuned (no MALLOC_* variables). Rows:

* put c=1: one put at a time (reserve, copy into the arena, commit); every put
  stores new bytes (a per-put stamp in its first 16 bytes; never a dedup);
* put batch=32: ``batch_put`` of 32 objects, each stamped;
* get_into c=1 / batch=32: one copy out of the arena, checksum verified;
* get c=1: ``get()`` (the SDK's receive pool), the last 16 results held;
* get_view: a leased zero-copy view, released at once (no bytes copied; the
  client's checksum pass is on by default and shown separately with it off).

An shm put carries the checksum of the caller's bytes, computed by the SDK, and
the daemon verifies the slot against it at commit (end to end, issue 17; the
daemon checksummed the slot at commit before too). What that adds is one xxh3
pass over the value in the client: the "SDK checksum" rows give its rate and its
share of a c=1 shm put's time (size / xxh3 rate over size / put rate).

shm and tcp rows take turns (3 each, the median kept), so load on the shared machine
falls on both alike.
"""
from __future__ import annotations

import argparse
import collections
import itertools
import os
import struct
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [HERE, REPO, os.path.join(REPO, "client")]

from bench_tcp import KvstoredDaemon  # noqa: E402
from peers import current_congestion_control, human_size, parse_size  # noqa: E402

KEYS = 32
ROUNDS = 3  # alternating shm / tcp turns per row (median kept)
_NONCE = int.from_bytes(os.urandom(8), "little")
_STAMPS = itertools.count(1)


def stamped(bufs: list[bytearray]):
    """New bytes in ``bufs[j]`` before each put: a nonce and a counter in its first 16 bytes."""
    heads = [memoryview(b)[:16] for b in bufs]

    def stamp(j: int) -> bytearray:
        heads[j][:] = struct.pack("<QQ", _NONCE, next(_STAMPS))
        return bufs[j]
    return stamp


def big_memcpy(duration: float, nbytes: int = 256 << 20) -> float:
    src = bytearray(os.urandom(1 << 20)) * (nbytes >> 20)
    dst = bytearray(nbytes)
    dst[:] = src  # fault both in first
    return rate(lambda: dst.__setitem__(slice(None), src), nbytes, duration, max_calls=50)


def rate(fn, nbytes_per_call: int, duration: float, max_calls: int = 100000) -> float:
    fn()  # warm-up
    n = 0
    t0 = time.perf_counter()
    while n < max_calls:
        fn()
        n += 1
        if time.perf_counter() - t0 >= duration:
            break
    return n * nbytes_per_call / (time.perf_counter() - t0)


def measure(kvstore, address: str, size: int, duration: float) -> dict:
    value = os.urandom(size)
    src = bytearray(value)
    dsts = [bytearray(size) for _ in range(KEYS)]
    keys = [b"bench-%d" % i for i in range(KEYS)]
    i = [0]

    def step():
        i[0] = (i[0] + 1) % KEYS
        return i[0]

    out = {"size": size, "memcpy": rate(lambda: dsts[step()].__setitem__(slice(None), src), size, duration)}
    from kvstore.wire import checksum
    out["checksum"] = rate(lambda: checksum(src), size, duration)
    stamp = stamped([bytearray(value) for _ in range(KEYS)])
    held: collections.deque = collections.deque(maxlen=16)
    clients = {t: kvstore.Client(address, namespace="bench", transport=t) for t in ("shm", "tcp")}
    try:
        for t, c in clients.items():
            c.batch_put([(k, value) for k in keys], overwrite=True)
            assert c.transport == t, f"wanted {t}, got {c.transport}"

        def ops(c):
            return {
                "put": (lambda: c.put(keys[step()], stamp(0), overwrite=True), size),
                "put_batch": (lambda: c.batch_put([(k, stamp(j)) for j, k in enumerate(keys)],
                                                  overwrite=True), size * KEYS),
                "get_into": (lambda: c.get_into(keys[step()], dsts[i[0]]), size),
                "get_into_batch": (lambda: c.batch_get_into(keys, dsts), size * KEYS),
                "get": (lambda: held.append(c.get(keys[step()])), size),
            }
        table = {t: ops(c) for t, c in clients.items()}
        # the machine is shared and noisy: shm and tcp take turns, ROUNDS each, median kept
        for op in table["shm"]:
            got: dict = {"shm": [], "tcp": []}
            for _ in range(ROUNDS):
                for t in ("shm", "tcp"):
                    fn, nbytes = table[t][op]
                    got[t].append(rate(fn, nbytes, duration / ROUNDS))
                    held.clear()
            for t in got:
                out[f"{t}_{op}"] = sorted(got[t])[ROUNDS // 2]
        c = clients["shm"]

        def view():
            with c.get_view(keys[step()]):
                pass
        out["shm_get_view"] = rate(view, size, duration)
        c.verify_checksums = False
        out["shm_get_view_noverify"] = rate(view, size, duration)
        c.verify_checksums = True
    finally:
        for c in clients.values():
            c.close()
    return out


def render(rows: list[dict], cc: str) -> str:
    gb = lambda x: f"{x / 1e9:.2f}"  # noqa: E731
    lines = [f"Same host, one client process (untuned); tcp rows use congestion control `{cc}`; "
             f"memcpy of 256 MiB: {gb(rows[0]['memcpy_256m'])} GB/s.", "",
             "| size | op | memcpy GB/s (32 x size) | shm GB/s | shm / memcpy | shm / memcpy 256 MiB "
             "| tcp GB/s | shm / tcp |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        m = r["memcpy"]
        big = r["memcpy_256m"]
        for op, label in (("put", "put c=1 (new bytes)"), ("put_batch", "put batch=32 (new bytes)"),
                          ("get_into", "get_into c=1"), ("get_into_batch", "get_into batch=32"),
                          ("get", "get c=1 (16 kept)")):
            s, t = r[f"shm_{op}"], r[f"tcp_{op}"]
            lines.append(f"| {human_size(r['size'])} | {label} | {gb(m)} | {gb(s)} | {s / m:.2f} | "
                         f"{s / big:.2f} | {gb(t)} | {s / t:.2f}x |")
        for op, label in (("shm_get_view", "get_view (zero copy, checksum verified)"),
                          ("shm_get_view_noverify", "get_view (zero copy, no checksum pass)")):
            v = r[op]
            lines.append(f"| {human_size(r['size'])} | {label} | {gb(m)} | {gb(v)} | {v / m:.2f} | "
                         f"{v / big:.2f} | - | - |")
        cs = r["checksum"]
        lines.append(f"| {human_size(r['size'])} | SDK checksum of a put (xxh3; {r['shm_put'] / cs:.0%} "
                     f"of a c=1 shm put's time) | {gb(m)} | {gb(cs)} | {cs / m:.2f} | - | - | - |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="64KiB,256KiB,1MiB,4MiB")
    ap.add_argument("--duration", type=float, default=2.0)
    ap.add_argument("--markdown")
    args = ap.parse_args(argv)
    import kvstore

    sizes = [parse_size(s) for s in args.sizes.split(",")]
    rows = []
    big = big_memcpy(args.duration)
    with KvstoredDaemon("", dram_size="2GiB", max_value_size=max(sizes), slab_size=max(sizes)) as d:
        for size in sizes:
            print(f"measuring {human_size(size)} ...", flush=True)
            rows.append(measure(kvstore, d.address, size, args.duration))
            rows[-1]["memcpy_256m"] = big
    report = render(rows, current_congestion_control())
    print(report)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
