#!/usr/bin/env python3
"""LMCache's own server through LMCache's own client, for bench_tcp.py (issue 11).

Runs under the engines venv's Python (``.venv/engines``, ``make engines-env``), which has
LMCache; the main venv need not import it:

    .venv/engines/bin/python benchmarks/lmcache_peer.py --port P --sizes 1MiB,4MiB \
        [--duration 2] [--keep 16]

The server is ``lmcache_server 127.0.0.1 P`` (started by bench_tcp.py). The client is
LMCache's ``LMCServerConnector`` (what an LMCache engine with ``remote_url: lm://`` uses),
over a ``LocalCPUBackend`` for its receive buffers, driven on one event loop:

* put: ``connector.put`` of a memory object whose first 8 bytes are stamped per put (new
  bytes every time; the server does not dedup anyway). LMCache's PUT has no answer, so
  the timed loop ends with one ``exists`` round trip (the server reads one connection in
  order: every put is in its store by then);
* get: ``connector.get`` (receives into a buffer from the backend's allocator); the last
  ``--keep`` results are held, as a retrieval holds its blocks until copied out, the
  oldest released as each new one arrives.

Prints one JSON line: {"rows": [{op, size, ops, seconds, bytes_s, p50_us, p99_us}]}.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import os
import sys
import time

logging.disable(logging.WARNING)

import torch  # noqa: E402
from lmcache.utils import CacheEngineKey  # noqa: E402
from lmcache.v1.config import LMCacheEngineConfig  # noqa: E402
from lmcache.v1.memory_management import MemoryFormat  # noqa: E402
from lmcache.v1.metadata import LMCacheMetadata  # noqa: E402
from lmcache.v1.storage_backend.connector.lm_connector import LMCServerConnector  # noqa: E402
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend  # noqa: E402

MODEL = "bench/lmcache-peer"
KEYS = 16


def parse_size(s: str) -> int:
    s = s.strip().lower()
    for suf, m in (("kib", 1 << 10), ("mib", 1 << 20), ("gib", 1 << 30)):
        if s.endswith(suf):
            return int(float(s[:-len(suf)]) * m)
    return int(s)


def key(size: int, i: int) -> CacheEngineKey:
    return CacheEngineKey(model_name=MODEL, world_size=1, worker_id=0,
                          chunk_hash=(size << 20) + i, dtype=torch.bfloat16)


def pct(lat: list[float], q: float) -> float:
    s = sorted(lat)
    return s[min(len(s) - 1, int(q * len(s)))] * 1e6 if s else 0.0


async def run(conn: LMCServerConnector, cpu: LocalCPUBackend, size: int, duration: float,
              keep: int, max_ops: int) -> list[dict]:
    shape = torch.Size([size // 2])
    obj = cpu.allocate(shape, torch.bfloat16, MemoryFormat.KV_2LTD)
    if obj is None:
        raise SystemExit("LocalCPUBackend could not allocate a put buffer")
    raw = memoryview(obj.byte_array).cast("B")
    raw[:] = os.urandom(size)
    keys = [key(size, i) for i in range(KEYS)]
    for k in keys:  # preload what the gets read
        await conn.put(k, obj)
    if not await conn.exists(keys[-1]):
        raise SystemExit("lmcache_server does not hold a preloaded key")
    rows = []
    stamp = memoryview(raw)[:8]
    for op in ("put", "get"):
        held: collections.deque = collections.deque()
        lat: list[float] = []
        n = 0
        t0 = time.perf_counter()
        while n < max_ops and time.perf_counter() - t0 < duration:
            t = time.perf_counter()
            k = keys[n % KEYS]
            if op == "put":
                stamp[:] = (n + 1).to_bytes(8, "little")
                await conn.put(k, obj)
            else:
                got = await conn.get(k)
                if got is None or got.get_size() < size:
                    raise SystemExit(f"lmcache get of {size} bytes returned {got}")
                held.append(got)
                if len(held) > keep:
                    held.popleft().ref_count_down()
            lat.append(time.perf_counter() - t)
            n += 1
        if op == "put":
            await conn.exists(keys[0])  # PUT has no answer: one round trip closes the loop
        secs = time.perf_counter() - t0
        while held:
            held.popleft().ref_count_down()
        rows.append({"op": op, "size": size, "ops": n, "seconds": secs, "bytes_s": n * size / secs,
                     "p50_us": pct(lat, 0.5), "p99_us": pct(lat, 0.99)})
    obj.ref_count_down()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--sizes", default="1MiB,4MiB")
    ap.add_argument("--duration", type=float, default=2.0)
    ap.add_argument("--keep", type=int, default=16)
    ap.add_argument("--max-ops", type=int, default=200_000)
    args = ap.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    need_gb = (args.keep + 4) * max(sizes) * 1.5 / 1e9 + 0.05
    cfg = LMCacheEngineConfig.from_dict({"chunk_size": 256, "local_cpu": False,
                                         "max_local_cpu_size": need_gb, "remote_serde": "naive"})
    meta = LMCacheMetadata(model_name=MODEL, world_size=1, local_world_size=1, worker_id=0,
                           local_worker_id=0, kv_dtype=torch.bfloat16,
                           kv_shape=(1, 2, 256, 1, 64), chunk_size=256)
    cpu = LocalCPUBackend(config=cfg, metadata=meta, dst_device="cpu")
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    conn = LMCServerConnector("127.0.0.1", args.port, loop, cpu)
    rows = []
    for size in sizes:
        rows += loop.run_until_complete(run(conn, cpu, size, args.duration, args.keep, args.max_ops))
    loop.run_until_complete(conn.close())
    print(json.dumps({"rows": rows, "lmcache": __import__("lmcache").__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
