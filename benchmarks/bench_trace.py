"""Replay a KV-cache prefix trace against a real kvstored and compare its prefix hit
ratio with offline LRU, FIFO and Belady at the same capacity.

    python benchmarks/bench_trace.py [--trace F] [--caps 2,5,10,20] [--block-size 4KiB]
                                     [--requests N] [--markdown out.md] [--json out.json]

Each trace request (Mooncake format, see /work/shared/traces/README.md and
benchmarks/trace_sim.py) is replayed the way an inference engine uses the store,
through the ``kvstore`` SDK over TCP: ``lookup`` of its block chain (the prefix
hit), ``batch_get`` of the hit blocks (bytes checked on a sample), ``batch_put``
of the missing ones. One kvstored per capacity, DRAM only, started with
``--dram-size`` = capacity x block size (``--slab-size 64KiB`` so the arena
rounds to within 16 blocks; the offline policies get exactly the slot count the
daemon has).

Block size is scaled down for this machine: a 512-token block of a
Llama-3-8B-class model in bf16 is 64 MiB; here it is ``--block-size`` (4 KiB
by default, 1/16384), so every capacity fits in RAM and a run takes about a
minute per capacity. Hit ratios do not depend on the block size (uniform
blocks); throughput is reported in block operations per second.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import trace_sim  # noqa: E402

SLAB = 64 << 10


def parse_size(text: str) -> int:
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "B": 1}
    for u, m in units.items():
        if text.endswith(u):
            return int(float(text[: -len(u)]) * m)
    return int(text)


def block_value(block_id: int, size: int) -> bytes:
    """Deterministic bytes of one block (checked when read back)."""
    pat = block_id.to_bytes(8, "little")
    return (pat * (size // 8 + 1))[:size]


def replay(address: str, reqs: list[list[int]], block: int, check_every: int = 97) -> dict:
    import kvstore

    hits = total = gets = puts = 0
    got_bytes = 0
    t0 = time.perf_counter()
    with kvstore.Client(address, namespace="trace", timeout=30) as c:
        for n, chain in enumerate(reqs):
            keys = [b"%d" % b for b in chain]
            h = c.lookup(keys)
            if h:
                vals = c.batch_get(keys[:h])
                gets += h
                got_bytes += sum(len(v) for v in vals)
                if n % check_every == 0 and bytes(vals[-1]) != block_value(chain[h - 1], block):
                    raise AssertionError(f"block {chain[h - 1]} read back wrong bytes")
            if h < len(keys):
                c.batch_put([(keys[i], block_value(chain[i], block)) for i in range(h, len(keys))])
                puts += len(keys) - h
            hits += h
            total += len(keys)
        st = c.stats()
    dram = next(t for t in st.tiers if t.name == "dram")
    wall = time.perf_counter() - t0
    return {"hit_ratio": hits / total if total else 0.0, "hits": hits, "block_requests": total,
            "gets": gets, "puts": puts, "bytes_served": got_bytes, "wall_s": wall,
            "block_ops_s": (gets + puts) / wall if wall else 0.0,
            "requests_s": len(reqs) / wall if wall else 0.0,
            "objects": dram.objects, "dram_used": dram.used_bytes,
            "dram_capacity": dram.capacity_bytes, "evictions": st.counters["evictions"]}


def run_capacity(reqs, pct: float, uniq: int, block: int, offline: list[str]) -> dict:
    from tests.daemonutil import Daemon

    want = max(1, int(uniq * pct / 100))
    dram = max(SLAB, -(-want * block // SLAB) * SLAB)
    slots = dram // block
    row = {"capacity_pct": pct, "capacity_blocks": slots, "dram_size": dram}
    with tempfile.TemporaryDirectory(prefix="bench-trace-") as tmp:
        d = Daemon(Path(tmp), "--dram-size", str(dram), "--slab-size", str(SLAB),
                   "--max-value-size", str(block), "--metrics-port", "0")
        # Daemon sets defaults first; the later flags win
        d.start()
        try:
            row["kvstored"] = replay(d.control, reqs, block)
        finally:
            d.stop()
    row["offline"] = {p: trace_sim.run(p, slots, reqs) for p in offline}
    return row


def render(rows: list[dict], offline: list[str], block: int, meta: str) -> str:
    out = [meta, "",
           "| capacity | blocks | kvstored | " + " | ".join(f"offline {p}" for p in offline) + " | kvstored - LRU | Belady - kvstored "
           "| kvstored block ops/s | objects / slots |",
           "|---|---|---|" + "---|" * len(offline) + "---|---|---|---|"]
    for r in rows:
        k = r["kvstored"]
        line = (f"| {r['capacity_pct']:g} % | {r['capacity_blocks']} | {k['hit_ratio']:.3f} | "
                + " | ".join(f"{r['offline'][p]:.3f}" for p in offline))
        lru = r["offline"].get("lru")
        bel = r["offline"].get("belady")
        line += f" | {k['hit_ratio'] - lru:+.3f}" if lru is not None else " | -"
        line += f" | {bel - k['hit_ratio']:.3f}" if bel is not None else " | -"
        line += f" | {k['block_ops_s']:.0f} | {k['objects'] / r['capacity_blocks']:.3f} |"
        out.append(line)
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default=trace_sim.DEFAULT_TRACE)
    ap.add_argument("--caps", default="2,5,10,20", help="capacities, %% of the trace's unique blocks")
    ap.add_argument("--block-size", default="4KiB")
    ap.add_argument("--requests", type=int, help="replay only the first N requests")
    ap.add_argument("--offline", default="lru,fifo,belady")
    ap.add_argument("--markdown")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    block = parse_size(a.block_size)
    if not 4096 <= block <= SLAB:
        ap.error(f"--block-size must be between 4KiB and {SLAB >> 10}KiB")
    caps = [float(x) for x in a.caps.split(",") if x]
    offline = [p for p in a.offline.split(",") if p]
    reqs = trace_sim.load_trace(a.trace, a.requests)
    uniq = trace_sim.unique_blocks(reqs)
    n = sum(len(r) for r in reqs)
    meta = (f"trace {os.path.basename(a.trace)}: {len(reqs)} requests, {n} block requests, "
            f"{uniq} unique blocks; block {block} B; one kvstored per capacity "
            f"(DRAM only, slab 64 KiB); {os.cpu_count()} CPUs, load average "
            f"{os.getloadavg()[0]:.1f}")
    print(meta, flush=True)
    rows = []
    for pct in caps:
        r = run_capacity(reqs, pct, uniq, block, offline)
        k = r["kvstored"]
        print(f"  {pct:g} %: kvstored {k['hit_ratio']:.3f}  "
              + "  ".join(f"{p} {r['offline'][p]:.3f}" for p in offline)
              + f"  ({k['wall_s']:.1f} s, {k['block_ops_s']:.0f} block ops/s)", flush=True)
        rows.append(r)
    text = render(rows, offline, block, meta)
    print()
    print(text)
    if a.markdown:
        Path(a.markdown).write_text(text + "\n")
    if a.json:
        Path(a.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
