"""Same-host shared-memory path beside a plain memcpy, and TCP beside shm, in one run.

    python benchmarks/bench_shm.py [--sizes 64KiB,256KiB,1MiB,4MiB] [--duration 2] [--rounds 5]
                                   [--markdown F]

memcpy: ``dst[:] = src`` between bytearrays cycling over 32 destinations (the
same working set as the store's 32 keys, so caches help neither side more), and
one 256 MiB copy (the machine's memory bandwidth, out of every cache).
kvstored: one daemon (2 GiB DRAM); ``kvstore.Client(transport="shm")`` and
``kvstore.Client(transport="tcp")`` (the machine's congestion control); every row
names its transport. The client runs untuned (no MALLOC_* variables). Rows:

* put c=1: one put at a time: one copy into a slot the daemon reserved ahead (a
  credit) and one SHM_PUT (the first put of a size reserves, copies, commits);
  every put stores new bytes (a per-put stamp in its first 16 bytes; never a dedup);
* put batch=32: ``batch_put`` of 32 objects, each stamped (one round trip);
* get_into c=1 / batch=32: one copy out of the arena (objects up to 128 KiB: inside
  the frames on the Unix socket), checksum verified;
* get c=1: ``get()`` (the SDK's receive pool), the last 16 results held;
* get_view: a leased zero-copy view, released at once (no bytes copied; the
  client's checksum pass is on by default and shown separately with it off).

An shm put carries the checksum of the caller's bytes, computed by the SDK, and
the daemon verifies the slot against it at commit (end to end, issue 17; the
daemon checksummed the slot at commit before too). What that adds is one xxh3
pass over the value in the client: the "SDK checksum" rows give its rate and its
share of a c=1 shm put's time (size / xxh3 rate over size / put rate).

shm and tcp rows take turns (``--rounds`` each, the median kept), so load on the shared
machine falls on both alike. Beside the rates: CPU time per object of the client and of
the daemon (user + system, /proc), and their voluntary context switches (wake-ups) per
object, which a loaded machine inflates far less than it does wall time. The load
average is printed before and after.
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
ROUNDS = 5  # alternating shm / tcp turns per row (median kept); --rounds
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


def rate(fn, nbytes_per_call: int, duration: float, max_calls: int = 100000, cost=None) -> float:
    """Bytes/s of ``fn`` over ``duration``; ``cost``: a Cost that adds this run's CPU and
    wake-ups."""
    fn()  # warm-up
    n = 0
    if cost is not None:
        cost.start()
    t0 = time.perf_counter()
    while n < max_calls:
        fn()
        n += 1
        if time.perf_counter() - t0 >= duration:
            break
    el = time.perf_counter() - t0
    if cost is not None:
        cost.stop(n * nbytes_per_call)
    return n * nbytes_per_call / el


def _proc(pid: int) -> tuple[float, int]:
    """CPU seconds (user + system) and voluntary context switches of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    vol = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches"):
                vol = int(line.split()[1])
    return cpu, vol


class Cost:
    """CPU seconds and wake-ups of the client (this process) and the daemon, summed over
    the runs of one row, per byte moved."""

    def __init__(self, daemon_pid: int):
        self.pids = (os.getpid(), daemon_pid)
        self.totals = [0.0, 0.0, 0, 0]  # client cpu, daemon cpu, client wakes, daemon wakes
        self.nbytes = 0
        self._t0: list = []

    def start(self) -> None:
        self._t0 = [_proc(p) for p in self.pids]

    def stop(self, nbytes: int) -> None:
        now = [_proc(p) for p in self.pids]
        for i, (a, b) in enumerate(zip(self._t0, now)):
            self.totals[i] += b[0] - a[0]
            self.totals[2 + i] += b[1] - a[1]
        self.nbytes += nbytes

    def per_object(self, size: int) -> tuple[float, float, float, float]:
        """(client us, daemon us, client wakes, daemon wakes) per object of ``size``."""
        objs = max(self.nbytes / size, 1)
        c, d, wc, wd = self.totals
        return c / objs * 1e6, d / objs * 1e6, wc / objs, wd / objs


def measure(kvstore, address: str, size: int, duration: float, daemon_pid: int,
            rounds: int = ROUNDS) -> dict:
    value = os.urandom(size)
    src = bytearray(value)
    dsts = [bytearray(size) for _ in range(KEYS)]
    keys = [b"bench-%d" % i for i in range(KEYS)]
    i = [0]

    def step():
        i[0] = (i[0] + 1) % KEYS
        return i[0]

    mc = Cost(daemon_pid)
    out = {"size": size, "memcpy": rate(lambda: dsts[step()].__setitem__(slice(None), src), size, duration,
                                        cost=mc)}
    out["memcpy_cpu"] = mc.per_object(size)[0]
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
        # the machine is shared and noisy: shm and tcp take turns, `rounds` each, median kept
        for op in table["shm"]:
            got: dict = {"shm": [], "tcp": []}
            costs = {t: Cost(daemon_pid) for t in got}
            for r in range(rounds):
                for t in (("shm", "tcp") if r % 2 == 0 else ("tcp", "shm")):
                    fn, nbytes = table[t][op]
                    got[t].append(rate(fn, nbytes, duration / rounds, cost=costs[t]))
                    held.clear()
            for t in got:
                out[f"{t}_{op}"] = sorted(got[t])[rounds // 2]
                out[f"{t}_{op}_cost"] = costs[t].per_object(size)
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
             f"memcpy of 256 MiB: {gb(rows[0]['memcpy_256m'])} GB/s. CPU: microseconds of CPU "
             "per object, client + daemon; wakes: voluntary context switches per object, "
             "client + daemon.", "",
             "| size | op | memcpy GB/s (32 x size) | shm GB/s | shm / memcpy | shm / memcpy 256 MiB "
             "| tcp GB/s | shm / tcp | memcpy CPU | shm CPU | tcp CPU | shm wakes | tcp wakes |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def cpu(c) -> str:
        return f"{c[0]:.0f} + {c[1]:.0f}"

    def wakes(c) -> str:
        return f"{c[2]:.2f} + {c[3]:.2f}"
    for r in rows:
        m = r["memcpy"]
        big = r["memcpy_256m"]
        mcpu = f"{r['memcpy_cpu']:.0f}"
        for op, label in (("put", "put c=1 (new bytes)"), ("put_batch", "put batch=32 (new bytes)"),
                          ("get_into", "get_into c=1"), ("get_into_batch", "get_into batch=32"),
                          ("get", "get c=1 (16 kept)")):
            s, t = r[f"shm_{op}"], r[f"tcp_{op}"]
            sc, tc = r[f"shm_{op}_cost"], r[f"tcp_{op}_cost"]
            lines.append(f"| {human_size(r['size'])} | {label} | {gb(m)} | {gb(s)} | {s / m:.2f} | "
                         f"{s / big:.2f} | {gb(t)} | {s / t:.2f}x | {mcpu} | {cpu(sc)} | {cpu(tc)} "
                         f"| {wakes(sc)} | {wakes(tc)} |")
        for op, label in (("shm_get_view", "get_view (zero copy, checksum verified)"),
                          ("shm_get_view_noverify", "get_view (zero copy, no checksum pass)")):
            v = r[op]
            lines.append(f"| {human_size(r['size'])} | {label} | {gb(m)} | {gb(v)} | {v / m:.2f} | "
                         f"{v / big:.2f} | - | - | - | - | - | - | - |")
        cs = r["checksum"]
        lines.append(f"| {human_size(r['size'])} | SDK checksum of a put (xxh3; {r['shm_put'] / cs:.0%} "
                     f"of a c=1 shm put's time) | {gb(m)} | {gb(cs)} | {cs / m:.2f} | - | - | - "
                     "| - | - | - | - | - |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="64KiB,256KiB,1MiB,4MiB")
    ap.add_argument("--duration", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=ROUNDS, help="shm / tcp turns per row (median kept)")
    ap.add_argument("--markdown")
    args = ap.parse_args(argv)
    import kvstore

    sizes = [parse_size(s) for s in args.sizes.split(",")]
    load0 = os.getloadavg()
    rows = []
    big = big_memcpy(args.duration)
    with KvstoredDaemon("", dram_size="2GiB", max_value_size=max(sizes), slab_size=max(sizes)) as d:
        for size in sizes:
            print(f"measuring {human_size(size)} ...", flush=True)
            rows.append(measure(kvstore, d.address, size, args.duration, d.proc.pid, args.rounds))
            rows[-1]["memcpy_256m"] = big
    load = f"load average (1 min) {load0[0]:.2f} before, {os.getloadavg()[0]:.2f} after, on {os.cpu_count()} CPUs"
    report = render(rows, current_congestion_control()) + "\n\n" + load
    print(report)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
