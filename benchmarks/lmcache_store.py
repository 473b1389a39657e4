#!/usr/bin/env python3
"""LMCache engine store / retrieve time per 1k tokens: the kvstore plugin vs LMCache's own
server, in one run (issue 11). Runs with the engines venv's Python:

    .venv/engines/bin/python benchmarks/lmcache_store.py --backend kvstore --address HOST:PORT
    .venv/engines/bin/python benchmarks/lmcache_store.py --backend lm --port P

(bench_tcp.py --lmcache-store runs both, starting kvstored and lmcache_server.)

One ``LMCacheEngine`` per process, as an inference server has; the "GPU" is a CPU tensor
(``CPUKV`` copies between a [layers, 2, tokens, hidden] tensor and LMCache's KV_2LTD
objects). The model shape is Qwen2-0.5B's KV (24 layers, 2 KV heads x 64, bf16: 12 KiB
per token, 3 MiB per 256-token chunk). ``--prompts`` prompts of ``--tokens`` distinct
tokens are stored one after another with ``local_cpu: false``; a store's time runs from
``engine.store()`` until LMCache's RemoteBackend has no put in flight, plus, for
``lm://`` (whose PUT has no answer), one ``exists`` round trip that the server answers
after the puts before it. Then every prompt is retrieved (lookup + retrieve).

Prints one JSON line: backend, store_ms_per_1k_tokens, retrieve_ms_per_1k_tokens, ...
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time

logging.disable(logging.WARNING)

import torch  # noqa: E402
from lmcache.utils import mock_up_broadcast_fn, mock_up_broadcast_object_fn  # noqa: E402
from lmcache.v1.cache_engine import LMCacheEngineBuilder  # noqa: E402
from lmcache.v1.config import LMCacheEngineConfig  # noqa: E402
from lmcache.v1.gpu_connector.gpu_connectors import GPUConnectorInterface  # noqa: E402
from lmcache.v1.metadata import LMCacheMetadata  # noqa: E402

LAYERS, KV_HEADS, HEAD_SIZE, CHUNK = 24, 2, 64, 256
HIDDEN = KV_HEADS * HEAD_SIZE
DTYPE = torch.bfloat16
MODEL = "bench/qwen2-0.5b-shape"


class CPUKV(GPUConnectorInterface):
    """[layers, 2, tokens, hidden] CPU tensor <-> KV_2LTD memory objects."""

    def from_gpu(self, memory_obj, start, end, **kw):
        memory_obj.tensor.copy_(kw["kvcaches"][:, :, start:end, :].permute(1, 0, 2, 3))

    def to_gpu(self, memory_obj, start, end, **kw):
        kw["kvcaches"][:, :, start:end, :].copy_(memory_obj.tensor.permute(1, 0, 2, 3))

    def batched_from_gpu(self, memory_objs, starts, ends, **kw):
        for m, s, e in zip(memory_objs, starts, ends):
            self.from_gpu(m, s, e, **kw)

    def batched_to_gpu(self, memory_objs, starts, ends, **kw):
        for m, s, e in zip(memory_objs, starts, ends):
            self.to_gpu(m, s, e, **kw)

    def get_shape(self, num_tokens: int) -> torch.Size:
        return torch.Size([2, LAYERS, num_tokens, HIDDEN])


def config_text(args) -> str:
    head = (f"chunk_size: {CHUNK}\nlocal_cpu: false\nmax_local_cpu_size: 1\n"
            "save_unfull_chunk: false\nremote_serde: naive\n")
    if args.backend == "lm":
        return head + f'remote_url: "lm://127.0.0.1:{args.port}"\n'
    return head + ('remote_storage_plugins: ["kvstore"]\nextra_config:\n'
                   "  remote_storage_plugin.kvstore.module_path: kvstore.integrations.lmcache\n"
                   "  remote_storage_plugin.kvstore.class_name: KVStoreConnectorAdapter\n"
                   f"  remote_storage_plugin.kvstore.address: {args.address}\n"
                   f"  remote_storage_plugin.kvstore.namespace: bench-{os.getpid()}\n")


def remote_backend(engine):
    for name, b in engine.storage_manager.storage_backends.items():
        if "Remote" in name or "Remote" in type(b).__name__:
            return b
    raise SystemExit(f"no remote backend in {list(engine.storage_manager.storage_backends)}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", choices=["kvstore", "lm"], required=True)
    ap.add_argument("--address", default="")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args()
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(config_text(args))
    try:
        config = LMCacheEngineConfig.from_file(f.name)
    finally:
        os.unlink(f.name)
    meta = LMCacheMetadata(model_name=MODEL, world_size=1, local_world_size=1, worker_id=0,
                           local_worker_id=0, kv_dtype=DTYPE,
                           kv_shape=(LAYERS, 2, CHUNK, KV_HEADS, HEAD_SIZE), chunk_size=CHUNK)
    engine = LMCacheEngineBuilder.get_or_create(f"bench-{args.backend}", config, meta, CPUKV(),
                                                mock_up_broadcast_fn, mock_up_broadcast_object_fn)
    engine.post_init()
    remote = remote_backend(engine)
    g = torch.Generator().manual_seed(7)
    prompts = []
    for p in range(args.prompts):
        tokens = torch.randint(0, 150000, (args.tokens,), generator=g)
        prompts.append((tokens, torch.randn(LAYERS, 2, args.tokens, HIDDEN, generator=g).to(DTYPE)))
    # one untimed warm-up prompt (connections, first allocations)
    wt = torch.randint(0, 150000, (CHUNK * 2,), generator=g)
    engine.store(wt, kvcaches=torch.randn(LAYERS, 2, CHUNK * 2, HIDDEN, generator=g).to(DTYPE))
    _settle(remote, args.backend, wt, engine)
    store_s = []
    for tokens, kv in prompts:
        t = time.perf_counter()
        engine.store(tokens, kvcaches=kv)
        _settle(remote, args.backend, tokens, engine)
        store_s.append(time.perf_counter() - t)
    retrieve_s, hits = [], 0
    for tokens, kv in prompts:
        out = torch.zeros_like(kv)
        t = time.perf_counter()
        mask = engine.retrieve(tokens, kvcaches=out)
        retrieve_s.append(time.perf_counter() - t)
        hits += int(mask.sum())
        if not torch.equal(out[:, :, :int(mask.sum())], kv[:, :, :int(mask.sum())]):
            raise SystemExit("retrieved KV differs from what was stored")
    per_1k = lambda xs: sorted(xs)[len(xs) // 2] / args.tokens * 1000 * 1000  # noqa: E731 (median, ms)
    print(json.dumps({"backend": args.backend, "tokens": args.tokens, "prompts": args.prompts,
                      "bytes_per_token": LAYERS * 2 * HIDDEN * 2,
                      "store_ms_per_1k_tokens": per_1k(store_s),
                      "retrieve_ms_per_1k_tokens": per_1k(retrieve_s),
                      "retrieved_tokens": hits, "stored_tokens": args.tokens * args.prompts,
                      "store_s": store_s, "retrieve_s": retrieve_s}))
    LMCacheEngineBuilder.destroy(f"bench-{args.backend}")
    return 0


def _settle(remote, backend: str, tokens, engine, timeout: float = 60.0) -> None:
    """Until the remote backend has no put in flight (and, for lm://, the server has read
    them: its one connection answers an exists after every put sent before it)."""
    deadline = time.monotonic() + timeout
    while remote.put_tasks:
        if time.monotonic() > deadline:
            raise SystemExit(f"{len(remote.put_tasks)} puts still in flight after {timeout} s")
        time.sleep(0.0005)
    if backend == "lm":
        keys = [k for _s, _e, k in engine.token_database.process_tokens(tokens=tokens)]
        if not remote.connection.exists_sync(keys[-1]):
            raise SystemExit("lmcache_server does not have the last chunk after the store")


if __name__ == "__main__":
    sys.exit(main())
