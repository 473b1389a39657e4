"""``kvstore-cli bench``: data-path put/get throughput and latency over the transport
the CLI uses (TCP unless --shm), with fresh bytes on every put."""
from __future__ import annotations

import math
import os
import secrets
import struct
import sys
import time
from typing import Callable

from .. import errors
from ..client import Client
from .common import EXIT_OK, PROG, Progress, emit_json, human_duration, human_size, table

# Prefix of the keys `bench` writes; a random run id below it keeps concurrent runs
# (and real data) apart, so the clean-up deletes only what this run wrote.
BENCH_PREFIX = "kvstore-cli-bench"


def _percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile: an observed latency, never an interpolation."""
    if not sorted_values:
        return 0.0
    return sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)]


def _timed(op: Callable[[int, int], None], count: int, duration: float | None,
           before: Callable[[int, int], None] | None = None,
           tick: Callable[[int, float], None] | None = None) -> list[float]:
    """Latencies of ``op(round, index)`` over the key set: one pass, or passes until
    ``duration`` elapses. ``before`` runs untimed ahead of each op (the payload stamp);
    ``tick(ops done, seconds)`` after each (the progress line)."""
    lat: list[float] = []
    clock = time.perf_counter
    start = clock()
    deadline = start + duration if duration else None
    for rnd in range(sys.maxsize):
        for i in range(count):
            if before is not None:
                before(rnd, i)
            t = clock()
            op(rnd, i)
            end = clock()
            lat.append(end - t)
            if tick is not None:
                tick(len(lat), end - start)
            if deadline is not None and end >= deadline:
                return lat
        if deadline is None:
            return lat
    return lat


def _phase_doc(lat: list[float], size: int, transport: str) -> dict:
    total = sum(lat)
    s = sorted(lat)
    return {"transport": transport, "size": size, "ops": len(lat), "bytes": len(lat) * size,
            "seconds": total,
            "ops_per_second": len(lat) / total if total else 0.0,
            "bytes_per_second": len(lat) * size / total if total else 0.0,
            "p50_seconds": _percentile(s, 50), "p99_seconds": _percentile(s, 99),
            "max_seconds": s[-1] if s else 0.0}


# Each put's payload starts with (round, index): every put stores bytes the daemon has not
# seen under that key, so no put is a dedup no-op and no pass re-sends the previous one.
_STAMP = struct.Struct("<QQ")


def cmd_bench(c: Client, args) -> int:
    size, count = args.size, args.count
    info = c.info(refresh=True)
    if size > info.max_value_size:
        raise errors.InvalidArgument(f"--size {human_size(size)} is over the daemon's max_value_size "
                                     f"{human_size(info.max_value_size)}")
    if args.op != "put":
        # reads of objects the same run evicted would fail with NotFound: keep the set well
        # inside the store (half its capacity leaves room for the daemon's other data)
        capacity = sum(t.capacity_bytes for t in c.stats().tiers)
        if capacity and size * count > capacity // 2:
            raise errors.InvalidArgument(
                f"{count} x {human_size(size)} = {human_size(size * count)} would not stay resident "
                f"in the daemon's {human_size(capacity)}; use a smaller --count or --size "
                "(at most half the capacity) or --op put")
    prefix = f"{BENCH_PREFIX}/{secrets.token_hex(4)}/"
    keys = [f"{prefix}{i}".encode() for i in range(count)]
    # random bytes: a real KV block does not compress, so neither should the payload
    payload = bytearray(os.urandom(size))
    stamp_len = min(_STAMP.size, size)
    dedups = 0  # puts the daemon answered "already stored" (possible only below 16 bytes)
    stored = 0  # puts answered (the clean-up's business)
    results: dict[str, dict] = {}
    progress = Progress(args.progress)

    def stamp(rnd: int, i: int) -> None:
        payload[:stamp_len] = _STAMP.pack(rnd, i)[:stamp_len]

    def put(rnd: int, i: int) -> None:
        nonlocal dedups, stored
        # overwrite after the first pass: the key holds the previous pass's bytes
        if not c.put(keys[i], payload, overwrite=rnd > 0):
            dedups += 1
        stored += 1

    buf = bytearray(size)

    def get(rnd: int, i: int) -> None:
        c.get_into(keys[i], buf)  # into one reused buffer: time the transfer, not the allocator

    def ticker(op: str) -> Callable[[int, float], None] | None:
        if not progress.enabled:
            return None  # no per-op call at all when nobody sees the line
        goal = f"{args.duration:g}s" if args.duration else f"{count} ops"
        return lambda n, t: progress.update(f"bench {op} over {transport}: {n} ops in {t:.1f}s "
                                            f"(of {goal})")

    deleted = 0
    try:
        c.ping()  # connect the data path first, so the first timed op is not a TCP handshake
        transport = c.transport
        if args.op in ("put", "both"):
            lat = _timed(put, count, args.duration, before=stamp, tick=ticker("put"))
            results["put"] = {**_phase_doc(lat, size, transport), "dedups": dedups}
        else:
            for i in range(count):  # untimed fill for --op get, each object its own bytes
                stamp(0, i)
                c.put(keys[i], payload, overwrite=True)
                stored += 1
                progress.update(f"bench: storing {i + 1}/{count} objects to read back")
        if args.op in ("get", "both"):
            results["get"] = _phase_doc(_timed(get, count, args.duration, tick=ticker("get")),
                                        size, transport)
    finally:
        progress.update("bench: deleting the bench keys")
        progress.done()
        # clean up even after an error or ^C; a clean-up failure must not hide the first error
        # (a token refused before anything was stored leaves nothing to delete: no warning)
        refused = isinstance(sys.exc_info()[1], errors.PermissionDenied)
        todo = [] if refused and not stored else keys
        try:
            for i in range(0, len(todo), max(1, info.max_batch_keys)):
                deleted += c.delete(todo[i:i + info.max_batch_keys])
        except errors.KVStoreError as e:
            print(f"{PROG}: warning: could not delete the bench keys under {prefix!r}: {e.message}",
                  file=sys.stderr)
    if args.json:
        emit_json({"namespace": c.namespace, "transport": transport, "size": size, "count": count,
                   "prefix": prefix, "duration": args.duration, "results": results,
                   "deleted": deleted})
        return EXIT_OK
    print(f"bench: {count} x {human_size(size)} objects over {transport} in namespace "
          f"{c.namespace!r}, keys under {prefix!r}")
    if "put" in results:
        print("every put stored new bytes" if not dedups else
              f"{dedups} puts were dedups: the daemon already held those bytes under the key")
    rows = [[op, r["transport"], human_size(r["size"]), r["ops"], human_size(r["bytes"]),
             human_duration(r["seconds"]), f"{r['ops_per_second']:.0f}",
             human_size(r["bytes_per_second"]) + "/s", human_duration(r["p50_seconds"]),
             human_duration(r["p99_seconds"]), human_duration(r["max_seconds"]),
             r.get("dedups", "-")] for op, r in results.items()]
    print(table(["OP", "TRANSPORT", "SIZE", "OPS", "BYTES", "TIME", "OPS/S", "THROUGHPUT", "P50",
                 "P99", "MAX", "DEDUP"], rows, right=range(2, 12)))
    gone = f" (the other {count - deleted} were already evicted)" if deleted < count else ""
    print(f"deleted {deleted} bench keys{gone}")
    return EXIT_OK
