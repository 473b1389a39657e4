"""The vLLM KV connector against vLLM's published V1 interface and a real kvstored.

Run by tests/integrations/test_vllm.py in the engines environment, with the
``vllm`` package (0.33.0, installed --no-deps: no CUDA kernels) on the path:

    vllm_check.py --address HOST:PORT [--dead-address HOST:PORT]

vLLM's own code here: ``VllmConfig`` / ``KVTransferConfig`` (which validate the
connector by importing it from ``kv_connector_module_path``), the
``KVConnectorFactory`` that builds it for the scheduler and the worker roles,
``KVConnectorBase_V1``, and the scheduler's data types (``Request``,
``KVCacheBlocks``, ``SchedulerOutput``, ``NewRequestData``, ``CachedRequestData``,
``KVCacheConfig``). What stands in for vLLM: the calls its scheduler and model
runner make (in the order they make them, step by step), and the paged KV cache
(CPU tensors ``[2, num_blocks, block_size, heads, head_size]`` per layer, as the
flash-attention backend allocates on GPU). The last stdout line is a JSON object
{check name: "ok" or the failure}.
"""
from __future__ import annotations

import sys
import time

import torch
from vllm import SamplingParams
from vllm.config import CacheConfig, DeviceConfig, KVTransferConfig, VllmConfig
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole
from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, KVCacheTensor
from vllm.v1.request import Request

import kvstore
from kvstore.integrations.vllm import KVStoreConnector, KVStoreConnectorMetadata, rank_key

BLOCK, LAYERS, HEADS, DIM, NUM_BLOCKS = 4, 3, 2, 8, 32
LAYER_NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
CHECKS = {}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


def vllm_config(address: str, namespace: str, *, block_size=BLOCK, **extra) -> VllmConfig:
    kt = KVTransferConfig(kv_connector="KVStoreConnector", kv_connector_module_path="kvstore.integrations.vllm",
                          kv_role="kv_both",
                          kv_connector_extra_config={"address": address, "namespace": namespace, "timeout": 5,
                                                     **extra})
    return VllmConfig(kv_transfer_config=kt, device_config=DeviceConfig(device="cpu"),
                      cache_config=CacheConfig(block_size=block_size))


def kv_cache_config(block_size=BLOCK) -> KVCacheConfig:
    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=HEADS, head_size=DIM, dtype=torch.bfloat16)
    per_layer = 2 * block_size * HEADS * DIM * 2
    return KVCacheConfig(num_blocks=NUM_BLOCKS,
                         kv_cache_tensors=[KVCacheTensor(size=NUM_BLOCKS * per_layer, layers=[n],
                                                         layer_stride=0, block_stride=per_layer)
                                           for n in LAYER_NAMES],
                         kv_cache_groups=[KVCacheGroupSpec(layer_names=LAYER_NAMES, kv_cache_spec=spec)])


class Instance:
    """One vLLM instance: a scheduler-side and a worker-side connector (built by vLLM's
    factory, as vLLM does) and a paged KV cache."""

    def __init__(self, address, namespace, *, seed=None, block_size=BLOCK, **extra):
        cfg = vllm_config(address, namespace, block_size=block_size, **extra)
        kcc = kv_cache_config(block_size)
        self.sched = KVConnectorFactory.create_connector(cfg, KVConnectorRole.SCHEDULER, kcc)
        self.worker = KVConnectorFactory.create_connector(cfg, KVConnectorRole.WORKER, kcc)
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        shape = (2, NUM_BLOCKS, block_size, HEADS, DIM)
        self.kv = {n: (torch.randn(shape, generator=g) if g else torch.zeros(shape)).to(torch.bfloat16)
                   for n in LAYER_NAMES}
        self.worker.register_kv_caches(self.kv)

    def block(self, b: int) -> torch.Tensor:
        return torch.stack([self.kv[n][:, b] for n in LAYER_NAMES])

    def step(self, out: SchedulerOutput) -> KVStoreConnectorMetadata:
        """What vLLM does each step: scheduler builds metadata, worker loads before the
        forward pass and saves after it."""
        meta = self.sched.build_connector_meta(out)
        out.kv_connector_metadata = meta
        self.worker.bind_connector_metadata(meta)
        self.worker.start_load_kv(None)
        for n in LAYER_NAMES:
            self.worker.wait_for_layer_load(n)
            self.worker.save_kv_layer(n, self.kv[n], None)
        self.worker.wait_for_save()
        self.worker.clear_connector_metadata()
        return meta

    def close(self):
        self.sched.shutdown()
        self.worker.shutdown()


def request(req_id: str, tokens: list[int], **kw) -> Request:
    return Request(req_id, tokens, SamplingParams(max_tokens=4), None, **kw)


def blocks(ids: list[int]) -> KVCacheBlocks:
    return KVCacheBlocks((tuple(KVCacheBlock(i) for i in ids),))


def new_step(req: Request, block_ids, computed: int, scheduled: int) -> SchedulerOutput:
    new = NewRequestData(req_id=req.request_id, prompt_token_ids=req.prompt_token_ids, mm_features=[],
                         sampling_params=None, pooling_params=None, block_ids=(list(block_ids),),
                         num_computed_tokens=computed, lora_request=None)
    return output([new], cached(), {req.request_id: scheduled})


def cached(req_ids=(), new_block_ids=(), computed=()) -> CachedRequestData:
    return CachedRequestData(req_ids=list(req_ids), resumed_req_ids=set(), new_token_ids=[[] for _ in req_ids],
                             all_token_ids={}, new_block_ids=list(new_block_ids),
                             num_computed_tokens=list(computed), num_output_tokens=[0 for _ in req_ids])


def output(new, cached_reqs, scheduled, finished=()) -> SchedulerOutput:
    return SchedulerOutput(scheduled_new_reqs=new, scheduled_cached_reqs=cached_reqs,
                           num_scheduled_tokens=scheduled, total_num_scheduled_tokens=sum(scheduled.values()),
                           scheduled_spec_decode_tokens={}, scheduled_encoder_inputs={},
                           finished_req_ids=set(finished), free_encoder_mm_hashes=[])


def prompt(n=18, seed=0) -> list[int]:
    return torch.randint(0, 32000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def store_prompt(inst: Instance, tokens: list[int], ids: list[int], req_id="a", chunk=10) -> list:
    """Prefill ``tokens`` on ``inst`` in chunks of ``chunk`` tokens (chunked prefill)."""
    req = request(req_id, tokens)
    assert inst.sched.get_num_new_matched_tokens(req, 0) == (0, False)
    inst.sched.update_state_after_alloc(req, blocks(ids), 0)
    saves = list(inst.step(new_step(req, ids, 0, min(chunk, len(tokens)))).saves)
    done = min(chunk, len(tokens))
    while done < len(tokens):
        n = min(chunk, len(tokens) - done)
        saves += inst.step(output([], cached([req_id], [None], [done]), {req_id: n})).saves
        done += n
    return saves


def namespace_objects(address, namespace) -> int:
    with kvstore.Client(address, timeout=5) as c:
        return c.stats().namespaces.get(namespace, 0)


@check
def factory_builds_both_roles(a):
    inst = Instance(a.address, "vl-factory")
    for c in (inst.sched, inst.worker):
        assert isinstance(c, KVStoreConnector) and isinstance(c, KVConnectorBase_V1), type(c)
    assert inst.sched.role == KVConnectorRole.SCHEDULER and inst.worker.role == KVConnectorRole.WORKER
    assert inst.worker.layout.num_layers == LAYERS
    assert inst.worker.layout.block_nbytes == LAYERS * 2 * BLOCK * HEADS * DIM * 2
    inst.close()


@check
def chunked_prefill_saves_complete_blocks(a):
    inst = Instance(a.address, "vl-save", seed=1)
    tokens, ids = prompt(18), [5, 9, 2, 7, 11]
    saves = store_prompt(inst, tokens, ids, chunk=10)
    # step 1 computed 10 tokens: blocks 0-1; step 2 the rest: blocks 2-3 (the 2 trailing
    # tokens fill no block)
    assert [t.block_ids for t in saves] == [[5, 9], [2, 7]], [t.block_ids for t in saves]
    assert namespace_objects(a.address, "vl-save") == 4
    inst.close()


@check
def another_instance_loads_the_prefix(a):
    src = Instance(a.address, "vl-load", seed=2)
    tokens = prompt(18, seed=2)
    store_prompt(src, tokens, [5, 9, 2, 7, 11])
    dst = Instance(a.address, "vl-load")
    req = request("b", tokens)
    # 4 full blocks stored; the last prompt token must be computed: 16 tokens to load
    assert dst.sched.get_num_new_matched_tokens(req, 0) == (16, False)
    dst.sched.update_state_after_alloc(req, blocks([3, 4, 6, 8, 1]), 16)
    meta = dst.step(new_step(req, [3, 4, 6, 8, 1], 16, 2))
    assert [t.block_ids for t in meta.loads] == [[3, 4, 6, 8]]
    assert meta.saves == [], "loaded blocks are saved again"
    for s, d in zip([5, 9, 2, 7], [3, 4, 6, 8]):
        assert torch.equal(src.block(s), dst.block(d)), f"block {s} -> {d}"
    assert torch.count_nonzero(dst.block(1)) == 0, "a block beyond the hit was written"
    assert dst.worker.get_block_ids_with_load_errors() == set()
    src.close()
    dst.close()


@check
def local_prefix_hit_is_not_loaded_again(a):
    src = Instance(a.address, "vl-local", seed=3)
    tokens = prompt(18, seed=3)
    store_prompt(src, tokens, [1, 2, 3, 4, 5])
    dst = Instance(a.address, "vl-local")
    req = request("c", tokens)
    assert dst.sched.get_num_new_matched_tokens(req, 8) == (8, False)  # 2 blocks cached locally
    dst.sched.update_state_after_alloc(req, blocks([20, 21, 22, 23, 24]), 8)
    meta = dst.step(new_step(req, [20, 21, 22, 23, 24], 16, 2))
    assert [t.block_ids for t in meta.loads] == [[22, 23]]
    assert torch.equal(src.block(3), dst.block(22)) and torch.equal(src.block(4), dst.block(23))
    src.close()
    dst.close()


@check
def missing_block_is_a_load_error(a):
    src = Instance(a.address, "vl-err", seed=4)
    tokens = prompt(18, seed=4)
    store_prompt(src, tokens, [1, 2, 3, 4, 5])
    dst = Instance(a.address, "vl-err")
    req = request("d", tokens)
    assert dst.sched.get_num_new_matched_tokens(req, 0) == (16, False)
    dst.sched.update_state_after_alloc(req, blocks([10, 11, 12, 13, 14]), 16)
    # evicted between the lookup and the load
    third = dst.sched._reqs["d"].keys[2]
    with kvstore.Client(a.address, namespace="vl-err") as c:
        assert c.delete([rank_key(third, 0, 0)]) == 1
    dst.step(new_step(req, [10, 11, 12, 13, 14], 16, 2))
    assert dst.worker.get_block_ids_with_load_errors() == {12}
    assert dst.worker.get_block_ids_with_load_errors() == set(), "errors are reported once"
    assert torch.equal(src.block(1), dst.block(10)) and torch.equal(src.block(4), dst.block(13))
    src.close()
    dst.close()


@check
def keys_depend_on_model_geometry_and_request(a):
    src = Instance(a.address, "vl-id", seed=5)
    tokens = prompt(18, seed=5)
    store_prompt(src, tokens, [1, 2, 3, 4, 5])
    other_block = Instance(a.address, "vl-id", block_size=8)
    assert other_block.sched.get_num_new_matched_tokens(request("e", tokens), 0) == (0, False)
    salted = request("f", tokens, cache_salt="tenant-b")
    assert src.sched.get_num_new_matched_tokens(salted, 0) == (0, False)
    assert src.sched.get_num_new_matched_tokens(request("g", tokens[:9] + [1] + tokens[10:]), 0) == (8, False)
    assert rank_key(b"k" * 32, 0, 0) != rank_key(b"k" * 32, 1, 0)
    src.close()
    other_block.close()


@check
def finished_requests_are_forgotten(a):
    inst = Instance(a.address, "vl-fin", seed=6)
    req = request("h", prompt(18, seed=6))
    inst.sched.get_num_new_matched_tokens(req, 0)
    inst.sched.update_state_after_alloc(req, blocks([1, 2, 3, 4, 5]), 0)
    inst.step(new_step(req, [1, 2, 3, 4, 5], 0, 4))
    assert inst.sched.request_finished(req, [1, 2, 3, 4, 5]) == (False, None)
    assert "h" not in inst.sched._reqs
    inst.close()


@check
def unreachable_daemon_is_a_miss(a):
    inst = Instance(a.dead_address, "vl-dead", seed=7)
    req = request("i", prompt(18, seed=7))
    t = time.monotonic()
    assert inst.sched.get_num_new_matched_tokens(req, 0) == (0, False)
    inst.sched.update_state_after_alloc(req, blocks([1, 2, 3, 4, 5]), 0)
    inst.step(new_step(req, [1, 2, 3, 4, 5], 0, 18))  # the save fails quietly
    assert time.monotonic() - t < 1.0, f"{time.monotonic() - t:.2f}s against a refused port"
    inst.close()


def pinned(address: str, namespace: str) -> int:
    with kvstore.Client(address, timeout=5) as c:
        return sum(e.pinned for e in c.list(namespace=namespace, limit=1000).entries)


@check
def lookup_leases_the_hit_until_loaded(a):
    """What the scheduler reports as a hit is pinned (with a TTL) until the worker has
    loaded it, so it cannot be evicted in between; every path releases the lease."""
    src = Instance(a.address, "vl-lease", seed=9)
    tokens = prompt(18, seed=9)
    store_prompt(src, tokens, [1, 2, 3, 4, 5])
    dst = Instance(a.address, "vl-lease", lease_ttl=30)
    assert pinned(a.address, "vl-lease") == 0
    req = request("l", tokens)
    assert dst.sched.get_num_new_matched_tokens(req, 0) == (16, False)
    assert pinned(a.address, "vl-lease") == 4
    # asked again (the request waited a step): the same lease, not a second pin
    assert dst.sched.get_num_new_matched_tokens(req, 0) == (16, False)
    dst.sched.update_state_after_alloc(req, blocks([10, 11, 12, 13, 14]), 16)
    assert pinned(a.address, "vl-lease") == 4, "released before the worker loaded"
    dst.step(new_step(req, [10, 11, 12, 13, 14], 16, 2))
    assert dst.worker.get_block_ids_with_load_errors() == set()
    assert torch.equal(src.block(1), dst.block(10)) and torch.equal(src.block(4), dst.block(13))
    assert pinned(a.address, "vl-lease") == 0, "the worker did not release what it loaded"
    # looked up, then finished (aborted) without a load
    req2 = request("m", tokens)
    assert dst.sched.get_num_new_matched_tokens(req2, 0) == (16, False)
    assert pinned(a.address, "vl-lease") == 4
    dst.sched.request_finished(req2, [])
    assert pinned(a.address, "vl-lease") == 0
    # vLLM holds the first 2 blocks itself: those are released at once, the other 2 on load
    req3 = request("n", tokens)
    assert dst.sched.get_num_new_matched_tokens(req3, 8) == (8, False)
    dst.sched.update_state_after_alloc(req3, blocks([20, 21, 22, 23, 24]), 8)
    assert pinned(a.address, "vl-lease") == 2
    dst.step(new_step(req3, [20, 21, 22, 23, 24], 16, 2))
    assert pinned(a.address, "vl-lease") == 0
    # lease_ttl 0: no lease
    nolease = Instance(a.address, "vl-lease", lease_ttl=0)
    assert nolease.sched.get_num_new_matched_tokens(request("o", tokens), 0) == (16, False)
    assert pinned(a.address, "vl-lease") == 0
    for inst in (src, dst, nolease):
        inst.close()
    try:
        Instance(a.address, "vl-lease", lease_ttl="soon")
    except kvstore.InvalidArgument:
        pass
    else:
        raise AssertionError("lease_ttl 'soon' was accepted")


@check
def read_only_token_looks_up_without_a_lease(a):
    """A token that may read but not write (pin needs write) still gets its hits: the
    first lease is refused, said once, and later lookups do not try again."""
    import logging
    import os

    rw, ro = os.environ["KVSTORE_TEST_TOKENS"].split(",")
    src = Instance(a.auth_address, "vl-ro", seed=10, token=rw)
    tokens = prompt(18, seed=10)
    store_prompt(src, tokens, [1, 2, 3, 4, 5])
    records = []

    class Grab(logging.Handler):
        def emit(self, r):
            records.append(r.getMessage())

    h = Grab()
    logging.getLogger("kvstore.integrations.vllm").addHandler(h)
    try:
        dst = Instance(a.auth_address, "vl-ro", token=ro)
        for i in range(3):
            assert dst.sched.get_num_new_matched_tokens(request(f"ro{i}", tokens), 0) == (16, False)
    finally:
        logging.getLogger("kvstore.integrations.vllm").removeHandler(h)
    said = [m for m in records if "may not pin" in m]
    assert len(said) == 1 and dst.sched.lease_ttl == 0, records
    req = request("ro-load", tokens)
    assert dst.sched.get_num_new_matched_tokens(req, 0) == (16, False)
    dst.sched.update_state_after_alloc(req, blocks([10, 11, 12, 13, 14]), 16)
    dst.step(new_step(req, [10, 11, 12, 13, 14], 16, 2))
    assert dst.worker.get_block_ids_with_load_errors() == set()
    assert torch.equal(src.block(1), dst.block(10))
    src.close()
    dst.close()


@check
def dead_daemon_costs_a_step_milliseconds(a):
    """A real kvstored, killed under a running instance: the load scheduled before the
    death turns into load errors (vLLM recomputes those blocks), no call raises, and
    every later step (lookup, prefill, save) is answered by the circuit breaker
    without asking the dead store."""
    from checkmain import kill_victim, step_figures

    src = Instance(a.victim_address, "vl-kill", seed=8)
    tokens = prompt(18, seed=8)
    store_prompt(src, tokens, [1, 2, 3, 4, 5])
    dst = Instance(a.victim_address, "vl-kill")
    req = request("k", tokens)
    assert dst.sched.get_num_new_matched_tokens(req, 0) == (16, False)
    kill_victim(a)
    dst.sched.update_state_after_alloc(req, blocks([10, 11, 12, 13, 14]), 16)
    t = time.monotonic()
    dst.step(new_step(req, [10, 11, 12, 13, 14], 16, 2))
    first = time.monotonic() - t
    assert dst.worker.get_block_ids_with_load_errors() == {10, 11, 12, 13}
    dst.sched.request_finished(req, [])
    times = []
    for i in range(40):
        r = request(f"k{i}", prompt(18, seed=100 + i))
        ids = [1 + (i % 6), 7, 8, 9, 15]
        t = time.monotonic()
        assert dst.sched.get_num_new_matched_tokens(r, 0) == (0, False)
        dst.sched.update_state_after_alloc(r, blocks(ids), 0)
        meta = dst.step(new_step(r, ids, 0, 18))
        dst.sched.request_finished(r, ids)
        times.append(time.monotonic() - t)
        assert meta.saves, "nothing was planned for saving"
    step_figures("vllm, dead kvstored", [first] + times)
    assert first < 1.0, f"the load after the death took {first:.3f}s"
    assert max(times) < 0.25, f"a later step took {max(times):.3f}s"
    assert sum(times[1:]) / len(times[1:]) < 0.02
    assert dst.worker.breaker.skipped > 0 and dst.sched.breaker.skipped > 0
    src.close()
    dst.close()


if __name__ == "__main__":
    from checkmain import main  # the script's own folder is on sys.path
    sys.exit(main(CHECKS))
