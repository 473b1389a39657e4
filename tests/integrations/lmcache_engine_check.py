"""LMCache's own engine (LMCacheEngine) storing into and retrieving from kvstored.

Run by tests/integrations/test_lmcache.py with the LMCache environment's Python
(LMCache and its pins live in their own venv, see docs/integrations.md):

    lmcache_engine_check.py store    --address HOST:PORT --namespace NS --config OUT.yaml
    lmcache_engine_check.py retrieve --address HOST:PORT --namespace NS --config OUT.yaml
    (--cluster: the address lists seeds of a cluster; --heads/--head-size: bigger chunks)

``store`` writes the LMCache YAML a user would write (the documented plugin
configuration), builds an engine from it, stores a prompt's KV cache (3.5
chunks, so a partial last chunk too), waits until kvstored has every chunk,
drops LMCache's local CPU copy and retrieves the prompt again: every byte must
come back from kvstored. ``retrieve`` is a fresh process with an empty local
cache that finds and loads the same prompt. The last stdout line is a JSON report.

The "GPU" is a CPU tensor here: ``CPUKVConnector`` below is a test stand-in for
LMCache's GPU connectors (which need CUDA), copying between a
``[layers, 2, tokens, hidden]`` tensor and LMCache's KV_2LTD memory objects.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from lmcache.utils import mock_up_broadcast_fn, mock_up_broadcast_object_fn
from lmcache.v1.cache_engine import LMCacheEngineBuilder
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.gpu_connector.gpu_connectors import GPUConnectorInterface
from lmcache.v1.metadata import LMCacheMetadata

import kvstore
from kvstore.integrations.lmcache import object_key

LAYERS, HEADS, HEAD_SIZE, CHUNK = 4, 2, 16, 64
TOKENS = CHUNK * 3 + CHUNK // 2          # three full chunks and a partial one
DTYPE = torch.bfloat16
MODEL = "kvstore-test/tiny-model"

CONFIG = """\
chunk_size: {chunk}
local_cpu: true
max_local_cpu_size: 0.05
save_unfull_chunk: true
remote_serde: naive
remote_storage_plugins: ["kvstore"]
extra_config:
  remote_storage_plugin.kvstore.module_path: kvstore.integrations.lmcache
  remote_storage_plugin.kvstore.class_name: KVStoreConnectorAdapter
  remote_storage_plugin.kvstore.address: {address}
  remote_storage_plugin.kvstore.namespace: {namespace}
"""


class CPUKVConnector(GPUConnectorInterface):
    """Copies KV between a CPU ``kvcaches`` tensor [layers, 2, tokens, hidden] and
    LMCache memory objects (KV_2LTD: [2, layers, tokens, hidden])."""

    def __init__(self, layers: int, hidden: int):
        self.layers, self.hidden = layers, hidden

    def from_gpu(self, memory_obj, start, end, **kwargs):
        src = kwargs["kvcaches"][:, :, start:end, :]
        memory_obj.tensor.copy_(src.permute(1, 0, 2, 3))

    def to_gpu(self, memory_obj, start, end, **kwargs):
        dst = kwargs["kvcaches"][:, :, start:end, :]
        dst.copy_(memory_obj.tensor.permute(1, 0, 2, 3))

    def batched_from_gpu(self, memory_objs, starts, ends, **kwargs):
        for m, s, e in zip(memory_objs, starts, ends):
            self.from_gpu(m, s, e, **kwargs)

    def batched_to_gpu(self, memory_objs, starts, ends, **kwargs):
        for m, s, e in zip(memory_objs, starts, ends):
            self.to_gpu(m, s, e, **kwargs)

    def get_shape(self, num_tokens: int) -> torch.Size:
        return torch.Size([2, self.layers, num_tokens, self.hidden])


def prompt() -> tuple[list[int], torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, 32000, (TOKENS,), generator=g).tolist()
    kv = torch.randn(LAYERS, 2, TOKENS, HEADS * HEAD_SIZE, generator=g).to(DTYPE)
    return tokens, kv


def build_engine(config_path: str):
    config = LMCacheEngineConfig.from_file(config_path)
    metadata = LMCacheMetadata(model_name=MODEL, world_size=1, local_world_size=1, worker_id=0,
                               local_worker_id=0, kv_dtype=DTYPE,
                               kv_shape=(LAYERS, 2, CHUNK, HEADS, HEAD_SIZE), chunk_size=CHUNK)
    engine = LMCacheEngineBuilder.get_or_create(
        "kvstore-check", config, metadata, CPUKVConnector(LAYERS, HEADS * HEAD_SIZE),
        mock_up_broadcast_fn, mock_up_broadcast_object_fn)
    engine.post_init()
    return engine


def chunk_keys(engine, tokens) -> list[bytes]:
    return [object_key(k) for _s, _e, k in engine.token_database.process_tokens(tokens=tokens)]


def retrieve_all(engine, tokens, report: dict, tag: str) -> None:
    hit = engine.lookup(tokens=tokens)
    out = torch.zeros(LAYERS, 2, TOKENS, HEADS * HEAD_SIZE, dtype=DTYPE)
    mask = engine.retrieve(torch.tensor(tokens), kvcaches=out)
    _, kv = prompt()
    report[f"{tag}_lookup_tokens"] = int(hit)
    report[f"{tag}_retrieved_tokens"] = int(mask.sum())
    report[f"{tag}_equal"] = bool(torch.equal(out, kv))


def main() -> int:
    global HEADS, HEAD_SIZE
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("store", "retrieve"))
    ap.add_argument("--address", required=True)
    ap.add_argument("--namespace", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--cluster", action="store_true",
                    help="--address lists seeds of a kvstored cluster (comma-separated)")
    ap.add_argument("--heads", type=int, default=2, help="KV heads (the chunk size scales with them)")
    ap.add_argument("--head-size", type=int, default=16)
    a = ap.parse_args()
    HEADS, HEAD_SIZE = a.heads, a.head_size
    if a.mode == "store":
        address = f"kvstore+cluster://{a.address}" if a.cluster else a.address
        with open(a.config, "w") as f:
            f.write(CONFIG.format(chunk=CHUNK, address=address, namespace=a.namespace))
    report: dict = {"mode": a.mode, "tokens": TOKENS, "pythonhashseed": os.environ.get("PYTHONHASHSEED")}
    engine = build_engine(a.config)
    tokens, kv = prompt()
    keys = chunk_keys(engine, tokens)
    report["chunks"] = len(keys)
    report["chunk_bytes"] = LAYERS * 2 * CHUNK * HEADS * HEAD_SIZE * torch.finfo(DTYPE).bits // 8
    if a.cluster:
        from kvstore.cluster import ClusterClient
        c = ClusterClient.from_cluster(a.address.split(","), namespace=a.namespace, node_timeout=10)
    else:
        c = kvstore.Client(a.address, namespace=a.namespace, timeout=10)
    with c:
        if a.mode == "store":
            report["stored_before"] = c.lookup(keys)
            engine.store(torch.tensor(tokens), kvcaches=kv.clone())
            deadline = time.monotonic() + 20
            while c.lookup(keys) < len(keys) and time.monotonic() < deadline:
                time.sleep(0.02)  # remote puts are asynchronous
            report["stored_after"] = c.lookup(keys)
            sizes = [len(b) for b in c.batch_get(keys)]
            report["object_sizes"] = sizes
            # drop LMCache's own copy: what comes back now can only come from kvstored
            sm = engine.storage_manager
            report["local_cleared"] = int(sm.clear(locations=["LocalCPUBackend"]))
            local = sm.storage_backends["LocalCPUBackend"]
            _s, _e, first = next(iter(engine.token_database.process_tokens(tokens=tokens)))
            report["local_has_first_chunk"] = bool(local.contains(first))
            hits0 = _hits(c)
            retrieve_all(engine, tokens, report, "after_drop")
        else:
            report["stored_before"] = c.lookup(keys)
            hits0 = _hits(c)
            retrieve_all(engine, tokens, report, "fresh")
        hits1 = _hits(c)
    report["daemon_get_hits"] = hits1 - hits0
    LMCacheEngineBuilder.destroy("kvstore-check")
    print(json.dumps(report), flush=True)
    return 0


def _hits(c) -> int:
    """Get hits of the daemon, or summed over a cluster's members."""
    from kvstore.cluster import ClusterClient
    if isinstance(c, ClusterClient):
        return sum(int(c.client(m).stats().counters.get("hits", 0)) for m in c.members())
    return int(c.stats().counters.get("hits", 0))


if __name__ == "__main__":
    sys.exit(main())
