"""Same-host shared-memory path beside a plain memcpy, and TCP beside shm, in one run.

    python benchmarks/bench_shm.py [--sizes 1MiB,4MiB] [--duration 2] [--markdown F]

memcpy: ``dst[:] = src`` between bytearrays cycling over 32 destinations (the
same working set as the store's 32 keys, so caches help neither side more).
kvstored: one daemon (2 GiB DRAM); ``kvstore.Client`` with shm (auto) and
with ``shm=False`` (TCP, the machine's congestion control). Rows:

* put c=1: one put at a time (reserve, copy into the arena, commit);
* put batch=32: ``batch_put`` of 32 objects (commits overlap the next copies);
* get_into c=1 / batch=32: one copy out of the arena, checksum verified;
* get_view: a leased zero-copy view, released at once (no bytes copied; the
  client's checksum pass is on by default and shown separately with it off).

An shm put carries the checksum of the caller's bytes, computed by the SDK, and
the daemon verifies the slot against it at commit (end to end, issue 17; the
daemon checksummed the slot at commit before too). What that adds is one xxh3
pass over the value in the client: the "SDK checksum" rows give its rate and its
share of a c=1 shm put's time (size / xxh3 rate over size / put rate).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [HERE, REPO, os.path.join(REPO, "client")]

from bench_tcp import KvstoredDaemon  # noqa: E402
from peers import current_congestion_control, human_size, parse_size  # noqa: E402

KEYS = 32


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
    for transport, shm in (("shm", None), ("tcp", False)):
        with kvstore.Client(address, namespace="bench", shm=shm) as c:
            assert c.transport == transport, f"wanted {transport}, got {c.transport}"
            c.batch_put([(k, value) for k in keys], overwrite=True)
            out[f"{transport}_put"] = rate(lambda: c.put(keys[step()], value, overwrite=True), size, duration)
            out[f"{transport}_put_batch"] = rate(
                lambda: c.batch_put([(k, value) for k in keys], overwrite=True), size * KEYS, duration)
            out[f"{transport}_get_into"] = rate(lambda: c.get_into(keys[step()], dsts[i[0]]), size, duration)
            out[f"{transport}_get_into_batch"] = rate(lambda: c.batch_get_into(keys, dsts), size * KEYS,
                                                      duration)
            if transport == "shm":
                def view():
                    with c.get_view(keys[step()]):
                        pass
                out["shm_get_view"] = rate(view, size, duration)
                c.verify_checksums = False
                out["shm_get_view_noverify"] = rate(view, size, duration)
                c.verify_checksums = True
    return out


def render(rows: list[dict], cc: str) -> str:
    gb = lambda x: f"{x / 1e9:.2f}"  # noqa: E731
    lines = [f"Same host, one client process; TCP rows use congestion control `{cc}`.", "",
             "| size | op | memcpy GB/s | shm GB/s | shm / memcpy | tcp GB/s | shm / tcp |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        m = r["memcpy"]
        for op, label in (("put", "put c=1"), ("put_batch", "put batch=32"),
                          ("get_into", "get_into c=1"), ("get_into_batch", "get_into batch=32")):
            s, t = r[f"shm_{op}"], r[f"tcp_{op}"]
            lines.append(f"| {human_size(r['size'])} | {label} | {gb(m)} | {gb(s)} | {s / m:.2f} | "
                         f"{gb(t)} | {s / t:.2f}x |")
        for op, label in (("shm_get_view", "get_view (zero copy, checksum verified)"),
                          ("shm_get_view_noverify", "get_view (zero copy, no checksum pass)")):
            v = r[op]
            lines.append(f"| {human_size(r['size'])} | {label} | {gb(m)} | {gb(v)} | {v / m:.2f} | - | - |")
        cs = r["checksum"]
        lines.append(f"| {human_size(r['size'])} | SDK checksum of a put (xxh3; {r['shm_put'] / cs:.0%} "
                     f"of a c=1 shm put's time) | {gb(m)} | {gb(cs)} | {cs / m:.2f} | - | - |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1MiB,4MiB")
    ap.add_argument("--duration", type=float, default=2.0)
    ap.add_argument("--markdown")
    args = ap.parse_args(argv)
    import kvstore

    sizes = [parse_size(s) for s in args.sizes.split(",")]
    rows = []
    with KvstoredDaemon("", dram_size="2GiB", max_value_size=max(sizes), slab_size=max(sizes)) as d:
        for size in sizes:
            print(f"measuring {human_size(size)} ...", flush=True)
            rows.append(measure(kvstore, d.address, size, args.duration))
    report = render(rows, current_congestion_control())
    print(report)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
