#!/usr/bin/env python3
"""The delete history (kvstored/engine/fence.py DeleteHistory): memory per remembered
delete, and what it adds to the delete path, in process (no daemon).

    python benchmarks/bench_delete_history.py [--keys 1000000] [--batch 512] [--rounds 3] [--dir D]

Measured: the history's table bytes (and tracemalloc's count of what it allocated) per
key after ``--keys`` deletes of 40-byte keys; ``Store.delete_each`` of stored 1 KiB
objects in batches of ``--batch`` keys, on a Store without and with a history
and with its journal (a file in ``--dir``, appended at each delete call: alternated,
best of ``--rounds``; the fence's own recording included in all); the journal's cost
per delete call of one key, and one fsync of it; a lookup (``deleted_at``) of
remembered and of unknown keys; save and load of the file.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "client"), str(REPO)]

from kvstored.engine.fence import DeleteHistory  # noqa: E402
from kvstored.engine.store import Store, StoreLimits  # noqa: E402


def _memory(n: int) -> None:
    keys = [b"key-%036d" % i for i in range(n)]
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    h = DeleteHistory(86400.0, max(n, 1000))
    for j in range(0, n, 512):
        h.add_many(b"ns", keys[j:j + 512], time.monotonic())
    traced = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    h = DeleteHistory(86400.0, max(n, 1000))  # again, timed (tracemalloc slows every allocation)
    t0 = time.perf_counter()
    for j in range(0, n, 512):
        h.add_many(b"ns", keys[j:j + 512], time.monotonic())
    add_s = time.perf_counter() - t0
    s = h.stats()
    print(f"{n:>9} deletes: tables {s['bytes'] / n:5.1f} B/key (tracemalloc {traced / n:5.1f} B/key), "
          f"{s['tables']} tables, overflowed {s['overflowed']}; add_many {add_s / n * 1e6:.2f} us/key")
    probe = keys[::max(1, n // 20000)]
    t0 = time.perf_counter()
    hits = sum(h.deleted_at(b"ns", k) > float("-inf") for k in probe)
    hit_us = (time.perf_counter() - t0) / len(probe) * 1e6
    t0 = time.perf_counter()
    miss = sum(h.deleted_at(b"other", k) > float("-inf") for k in probe)
    miss_us = (time.perf_counter() - t0) / len(probe) * 1e6
    print(f"           lookup: remembered {hit_us:.2f} us ({hits}/{len(probe)} found), "
          f"unknown {miss_us:.2f} us ({miss} found)")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "h.deletes")
        t0 = time.perf_counter()
        size = h.save(path)
        save_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        g = DeleteHistory(86400.0, max(n, 1000))
        g.load(path)
        load_s = time.perf_counter() - t0
    print(f"           file {size / 2**20:.1f} MiB: save {save_s * 1e3:.0f} ms, load {load_s * 1e3:.0f} ms")


def _store(history: str, where: str) -> Store:
    """A Store whose fence keeps no history, a history, or a history and its journal
    (a file in ``where``: a node's cluster.delete_history_file, written as each delete
    call is made)."""
    s = Store(StoreLimits(dram_size=256 << 20, slab_size=4 << 20, max_value_size=1 << 20,
                          hugepages=False, prefault=False))
    if history != "none":
        s.fence.history = DeleteHistory()
    if history == "journal":
        from kvstored.cluster.history import Journal
        journal = s.fence.history.journal = Journal(os.path.join(where, "h.deletes"))
        journal.rotate(1)
    return s


def _delete_path(n: int, batch: int, rounds: int, where: str) -> None:
    keys = [b"obj-%036d" % i for i in range(n)]
    value = os.urandom(1024)
    best: dict[str, float] = {}
    for _ in range(rounds):
        for history in ("none", "history", "journal"):
            s = _store(history, where)
            journal = s.fence.history.journal if s.fence.history is not None else None
            try:
                for k in keys:
                    s.put_bytes(b"ns", k, value)
                t0 = time.perf_counter()
                for j in range(0, n, batch):
                    s.delete_each(b"ns", keys[j:j + batch])
                dt = (time.perf_counter() - t0) / n
                best[history] = min(best.get(history, dt), dt)
            finally:
                if journal is not None:
                    t0 = time.perf_counter()
                    journal.sync()
                    best["sync"] = min(best.get("sync", 1e9), time.perf_counter() - t0)
                    journal.close()
                s.close()
    print(f"Store.delete_each, {n} stored 1 KiB objects in batches of {batch}: "
          f"{best['none'] * 1e6:.2f} us/key without a history, {best['history'] * 1e6:.2f} us/key "
          f"with (+{(best['history'] - best['none']) * 1e6:.2f} us), "
          f"{best['journal'] * 1e6:.2f} us/key with its journal "
          f"(+{(best['journal'] - best['history']) * 1e6:.2f} us over the history alone)")
    # one key a delete call, the journal's worst case: DeleteHistory.add_many alone,
    # without and with the journal, alternated, best of 5
    from kvstored.cluster.history import Journal
    one = keys[:20000]
    for _ in range(5):
        for journaled in (False, True):
            h = DeleteHistory()
            jl = None
            if journaled:
                jl = h.journal = Journal(os.path.join(where, "one.deletes"))
                jl.rotate(1)
            t0 = time.perf_counter()
            for k in one:
                h.add_many(b"ns", (k,), t0)
            dt = (time.perf_counter() - t0) / len(one)
            best[journaled] = min(best.get(journaled, dt), dt)
            if jl is not None:
                jl.close()
    print(f"DeleteHistory.add_many of one key a call ({len(one)} calls): {best[False] * 1e6:.2f} us "
          f"without its journal, {best[True] * 1e6:.2f} us with (+{(best[True] - best[False]) * 1e6:.2f}"
          f" us: one os.write); an fsync of the journal {best['sync'] * 1e3:.1f} ms (in {where}; "
          "a node makes one a second at most, on a worker thread)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the journal is written (default: the "
                    "temporary directory; give one on the disk a node would use)")
    a = ap.parse_args(argv)
    for n in sorted({min(a.keys, 100_000), a.keys}):
        _memory(n)
    with tempfile.TemporaryDirectory(dir=a.dir) as where:
        _delete_path(min(a.keys, 100_000), a.batch, a.rounds, where)
    return 0


if __name__ == "__main__":
    sys.exit(main())
