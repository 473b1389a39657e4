"""Focused checks of the LMCache plugin through LMCache's own RemoteBackend.

Run by tests/integrations/test_lmcache.py with the LMCache environment's Python:

    lmcache_connector_check.py --address HOST:PORT [--dead-address HOST:PORT]
        [--victim-address HOST:PORT --victim-pid PID]

Each check runs against the real daemon at --address (its own namespace) and
the last stdout line is a JSON object {check name: "ok" or the failure}.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
import traceback

import torch
from lmcache.utils import CacheEngineKey
from lmcache.v1.check.utils import EventLoopManager
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.metadata import LMCacheMetadata
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend
from lmcache.v1.storage_backend.remote_backend import RemoteBackend

import kvstore
from kvstore.integrations import lmcache as plugin

CHUNK = 16
MODEL = "kvstore-test/connector"
METADATA = LMCacheMetadata(model_name=MODEL, world_size=1, local_world_size=1, worker_id=0,
                           local_worker_id=0, kv_dtype=torch.bfloat16,
                           kv_shape=(2, 2, CHUNK, 2, 8), chunk_size=CHUNK)
CHECKS = {}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


class Env:
    def __init__(self, address: str, dead: str, args=None):
        self.address, self.dead = address, dead
        self.args = args  # the command line (the victim daemon's address and pid)
        self.loops = EventLoopManager()
        self.loops.start()
        self.loop = self.loops.get_loop()
        self.cpu = LocalCPUBackend(config=self.config("unused"), metadata=METADATA, dst_device="cpu")
        self.backends = []
        self.owned = []  # test objects, released after each check

    def config(self, namespace: str, *, address=None, remote_url=None, class_name="KVStoreConnectorAdapter",
               plugin_name="kvstore", **extra):
        pfx = f"remote_storage_plugin.{plugin_name}."
        ec = {pfx + "module_path": "kvstore.integrations.lmcache", pfx + "class_name": class_name,
              pfx + "namespace": namespace, pfx + "timeout": 5}
        if address is not False:
            ec[pfx + "address"] = address or self.address
        ec.update(extra)
        d = {"chunk_size": CHUNK, "local_cpu": False, "max_local_cpu_size": 0.02, "remote_serde": "naive",
             "remote_storage_plugins": [plugin_name], "extra_config": ec}
        if remote_url:
            d["remote_url"] = remote_url
        return LMCacheEngineConfig.from_dict(d)

    def backend(self, namespace: str, *, legacy=False, plugin_name="kvstore", **kw) -> RemoteBackend:
        cfg = self.config(namespace, plugin_name=plugin_name, **kw)
        b = RemoteBackend(cfg, METADATA, self.loop, self.cpu, dst_device="cpu",
                          plugin_name=None if legacy else plugin_name)
        assert b.connection is not None, "LMCache could not create the kvstore connector"
        self.backends.append(b)
        return b

    def connector(self, b: RemoteBackend) -> "plugin.KVStoreConnector":
        c = b.connection.getWrappedConnector()
        assert isinstance(c, plugin.KVStoreConnector), type(c)
        return c

    def run(self, coro, timeout=20):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def obj(self, tokens=CHUNK, seed=0):
        o = self.cpu.allocate(METADATA.get_shapes(tokens), METADATA.get_dtypes(), None)
        assert o is not None, "no local CPU memory"
        g = torch.Generator().manual_seed(seed)
        o.tensor.copy_(torch.randn(o.tensor.shape, generator=g).to(o.tensor.dtype))
        self.owned.append(o)
        return o

    def release(self):
        for o in self.owned:
            o.ref_count_down()
        self.owned = []

    def allocated(self) -> int:
        return self.cpu.memory_allocator.pin_allocator.total_allocated_size

    def put(self, b: RemoteBackend, keys, objs, namespace: str):
        b.batched_submit_put_task(keys, objs)
        okeys = [plugin.object_key(k) for k in keys]
        with kvstore.Client(self.address, namespace=namespace, timeout=5) as c:
            deadline = time.monotonic() + 10
            while not all(c.exists(okeys)):
                assert time.monotonic() < deadline, "puts did not reach kvstored"
                time.sleep(0.01)

    def close(self):
        for b in self.backends:
            b.close()
        self.loops.stop()


def key(i: int, tag: str = "k") -> CacheEngineKey:
    return CacheEngineKey(model_name=MODEL, world_size=1, worker_id=0,
                          chunk_hash=hash((tag, i)) & ((1 << 63) - 1), dtype=torch.bfloat16)


def same(a, b) -> bool:
    return a is not None and b is not None and torch.equal(a.tensor, b.tensor)


@check
def batched_roundtrip(env: Env):
    b = env.backend("rt")
    keys = [key(i, "rt") for i in range(6)]
    objs = [env.obj(seed=i) for i in range(6)]
    env.put(b, keys, objs, "rt")
    got = b.batched_get_blocking(keys)
    assert all(same(g, o) for g, o in zip(got, objs)), "batched get returned other bytes"
    assert all(b.contains(k) for k in keys)
    with kvstore.Client(env.address, namespace="rt") as c:
        sizes = [len(x) for x in c.batch_get([plugin.object_key(k) for k in keys])]
    assert sizes == [objs[0].get_size()] * 6, f"raw objects expected, sizes {sizes}"
    for g in got:
        g.ref_count_down()


@check
def prefix_lookup_and_pin(env: Env):
    b = env.backend("px", **{"remote_storage_plugin.kvstore.pin_ttl": 30})
    keys = [key(i, "px") for i in range(4)]
    env.put(b, [keys[0], keys[1], keys[3]], [env.obj(seed=i) for i in (0, 1, 3)], "px")
    assert b.batched_contains(keys) == 2, "sync prefix lookup"
    assert env.run(b.batched_async_contains("lookup-1", keys)) == 2, "async prefix lookup"
    assert env.run(b.batched_async_contains("lookup-2", keys[2:])) == 0
    with kvstore.Client(env.address, namespace="px") as c:
        before = c.stats().counters["pinned"]
        assert env.run(b.batched_async_contains("lookup-3", keys, pin=True)) == 2
        pinned = c.stats().counters["pinned"] - before
    assert pinned == 2, f"pin=True should pin the 2 hit chunks, pinned {pinned}"


@check
def misses_are_none_and_released(env: Env):
    b = env.backend("miss")
    k0, k1, absent = key(0, "miss"), key(1, "miss"), key(2, "miss")
    o0, o1 = env.obj(seed=10), env.obj(seed=11)
    env.put(b, [k0, k1], [o0, o1], "miss")
    base = env.allocated()
    got = b.batched_get_blocking([k0, absent, k1])
    assert got[1] is None, "an absent chunk must be a miss"
    assert same(got[0], o0) and same(got[2], o1), "present chunks around a miss"
    for g in (got[0], got[2]):
        g.ref_count_down()
    assert env.allocated() == base, f"buffers leaked: {env.allocated() - base} bytes"
    assert b.get_blocking(absent) is None and env.allocated() == base
    assert b.contains(absent) is False


@check
def non_blocking_get_returns_the_prefix(env: Env):
    b = env.backend("nb")
    keys = [key(i, "nb") for i in range(4)]
    objs = [env.obj(seed=80 + i) for i in range(4)]
    env.put(b, [keys[0], keys[1], keys[3]], [objs[0], objs[1], objs[3]], "nb")
    base = env.allocated()
    got = env.run(b.batched_get_non_blocking("lookup-nb", keys))
    assert len(got) == 2 and same(got[0], objs[0]) and same(got[1], objs[1]), len(got)
    for g in got:
        g.ref_count_down()
    assert env.allocated() == base, "chunks after the first miss were not released"


@check
def partial_chunk(env: Env):
    b = env.backend("part")
    k = key(0, "part")
    o = env.obj(tokens=CHUNK // 2 + 1, seed=20)
    env.put(b, [k], [o], "part")
    g = b.get_blocking(k)
    assert g is not None and g.tensor.shape == o.tensor.shape, (g and g.tensor.shape, o.tensor.shape)
    assert torch.equal(g.tensor, o.tensor)
    g.ref_count_down()


@check
def conflict_keeps_first(env: Env):
    b = env.backend("cf")
    conn = env.connector(b)
    k = key(0, "cf")
    first, second = env.obj(seed=30), env.obj(seed=31)
    env.run(conn.batched_put([k], [first]))
    env.run(conn.batched_put([k], [second]))  # must not raise
    g = b.get_blocking(k)
    assert same(g, first), "a conflicting put replaced the stored chunk"
    g.ref_count_down()


@check
def self_describing_objects(env: Env):
    b = env.backend("meta", **{"remote_storage_plugin.kvstore.save_chunk_meta": "true"})
    conn = env.connector(b)
    assert conn.save_chunk_meta
    k_full, k_part = key(0, "meta"), key(1, "meta")
    full, part = env.obj(seed=40), env.obj(tokens=5, seed=41)
    env.put(b, [k_full, k_part], [full, part], "meta")
    got = b.batched_get_blocking([k_full, k_part])
    assert same(got[0], full) and same(got[1], part), "self-describing round trip"
    assert got[1].tensor.shape == part.tensor.shape
    with kvstore.Client(env.address, namespace="meta") as c:
        n = len(c.get(plugin.object_key(k_full)))
    assert n == full.get_size() + conn.remote_metadata_bytes, n
    # a raw object read by a self-describing connector is a miss, never garbage
    raw = env.backend("raw-for-meta")
    env.put(raw, [key(2, "meta")], [env.obj(seed=42)], "raw-for-meta")
    meta2 = env.backend("raw-for-meta", plugin_name="kvstore.meta",
                        **{"remote_storage_plugin.kvstore.meta.save_chunk_meta": True})
    base = env.allocated()
    assert meta2.get_blocking(key(2, "meta")) is None
    assert env.allocated() == base
    for g in got:
        g.ref_count_down()


@check
def legacy_remote_url(env: Env):
    # remote_url: kvstore://host:port (no address in extra_config)
    b = env.backend("legacy", legacy=True, address=False, remote_url=f"kvstore://{env.address}")
    k = key(0, "legacy")
    o = env.obj(seed=50)
    env.put(b, [k], [o], "legacy")
    g = b.get_blocking(k)
    assert same(g, o)
    g.ref_count_down()


@check
def kvstore_url_alone_is_reported_with_the_fix(env: Env):
    """``remote_url: kvstore://...`` without the plugin entries: LMCache finds no adapter
    (it logs one line and stores nothing). check_config says so and prints the lines
    to add; with those lines the plugin loads and stores."""
    url = f"kvstore://{env.address}"
    cfg = LMCacheEngineConfig.from_dict({"chunk_size": CHUNK, "max_local_cpu_size": 0.02,
                                        "remote_serde": "naive", "remote_url": url})
    b = RemoteBackend(cfg, METADATA, env.loop, env.cpu, dst_device="cpu")
    env.backends.append(b)
    assert b.connection is None, "LMCache found an adapter for kvstore:// by itself"
    problems = plugin.check_config(cfg)
    assert len(problems) == 1 and "No adapter found" in problems[0], problems
    fix = problems[0].split("remote_url:\n", 1)[1]
    import yaml
    fixed = yaml.safe_load(fix)
    fixed["extra_config"]["remote_storage_plugin.kvstore.namespace"] = "url-fix"
    cfg2 = LMCacheEngineConfig.from_dict({"chunk_size": CHUNK, "max_local_cpu_size": 0.02,
                                         "remote_serde": "naive", **fixed})
    assert plugin.check_config(cfg2) == []
    b2 = RemoteBackend(cfg2, METADATA, env.loop, env.cpu, dst_device="cpu", plugin_name="kvstore")
    env.backends.append(b2)
    assert env.connector(b2).options.address == env.address
    k, o = key(0, "url-fix"), env.obj(seed=55)
    env.put(b2, [k], [o], "url-fix")
    g = b2.get_blocking(k)
    assert same(g, o)
    g.ref_count_down()
    # the other mistakes it reports
    half = LMCacheEngineConfig.from_dict({"chunk_size": CHUNK, "max_local_cpu_size": 0,
                                         "remote_storage_plugins": ["kvstore"], "remote_url": "plugin://kvstore"})
    text = "\n".join(plugin.check_config(half))
    assert "module_path" in text and "two remote backends" in text and "max_local_cpu_size" in text, text


@check
def placeholder_url_uses_extra_config(env: Env):
    # what basic_check does: remote_url is LMCache's placeholder, the endpoint is in extra_config
    b = env.backend("placeholder", legacy=True, remote_url="plugin://kvstore")
    conn = env.connector(b)
    assert conn.options.address == env.address, conn.options.address
    assert conn.options.namespace == "placeholder"


@check
def generic_loader_with_connector_class(env: Env):
    # class_name may name the RemoteConnector itself: LMCache's DynamicConnectorAdapter
    b = env.backend("dyn", class_name="KVStoreConnector")
    conn = env.connector(b)
    assert conn.plugin_name == "kvstore"
    k = key(0, "dyn")
    o = env.obj(seed=60)
    env.put(b, [k], [o], "dyn")
    g = b.get_blocking(k)
    assert same(g, o)
    g.ref_count_down()


@check
def remove_and_ping(env: Env):
    b = env.backend("rm")
    k = key(0, "rm")
    env.put(b, [k], [env.obj(seed=70)], "rm")
    assert b.remove(k) is True and b.contains(k) is False
    conn = env.connector(b)
    assert env.run(conn.ping()) == 0


@check
def unreachable_daemon(env: Env):
    b = env.backend("dead", address=env.dead)
    conn = env.connector(b)
    t = time.monotonic()
    assert env.run(conn.ping()) != 0
    base = env.allocated()
    assert b.batched_get_blocking([key(0, "dead")]) == [None]
    assert env.allocated() == base, "buffers leaked on an unreachable daemon"
    assert b.batched_contains([key(0, "dead")]) == 0
    assert time.monotonic() - t < 1.0, f"{time.monotonic() - t:.2f}s against a refused port"


@check
def dead_daemon_costs_a_step_milliseconds(env: Env):
    """A real kvstored, killed under LMCache's RemoteBackend: lookups find nothing, gets
    return None, puts are dropped, nothing raises (LMCache counts put tasks that
    raised) and no buffer leaks; after the first failure the breaker answers without
    asking the dead store."""
    from checkmain import kill_victim, step_figures

    b = env.backend("kill", address=env.args.victim_address)
    keys = [key(i, "kill") for i in range(4)]
    objs = [env.obj(seed=80 + i) for i in range(4)]
    b.batched_submit_put_task(keys, objs)
    okeys = [plugin.object_key(k) for k in keys]
    with kvstore.Client(env.args.victim_address, namespace="kill", timeout=5) as c:
        deadline = time.monotonic() + 10
        while not all(c.exists(okeys)):
            assert time.monotonic() < deadline, "puts did not reach kvstored"
            time.sleep(0.01)
    assert b.batched_contains(keys) == 4
    kill_victim(env.args)
    base = env.allocated()
    times = []
    for step in range(40):
        fresh = [key(i, f"kill-{step}") for i in range(2)]
        t = time.monotonic()
        assert b.batched_contains(keys) == 0
        assert b.batched_get_blocking(keys) == [None] * 4
        b.batched_submit_put_task(fresh, [env.obj(seed=90), env.obj(seed=91)])  # asynchronous
        times.append(time.monotonic() - t)
    step_figures("lmcache, dead kvstored", times)
    conn = env.connector(b)
    for _ in range(conn.workers * 2):  # the puts queued before these have run
        env.run(conn._run(lambda: None))
    time.sleep(0.1)  # their done-callbacks
    assert times[0] < 1.0, f"first step after the death took {times[0]:.3f}s"
    assert max(times[1:]) < 0.25, f"a later step took {max(times[1:]):.3f}s"
    assert b._put_failed_count == 0, f"{b._put_failed_count} put task(s) raised"
    env.release()
    assert env.allocated() <= base, "buffers leaked on a dead daemon"
    assert env.connector(b).breaker.skipped > 0


@check
def options_are_checked(env: Env):
    records = []

    class Grab(logging.Handler):
        def emit(self, r):
            records.append(r.getMessage())

    h = Grab()
    logging.getLogger("kvstore.integrations.lmcache").addHandler(h)
    try:
        env.backend("opts", **{"remote_storage_plugin.kvstore.adress": "typo:1"})
    finally:
        logging.getLogger("kvstore.integrations.lmcache").removeHandler(h)
    assert any("adress" in m and "not a kvstore setting" in m for m in records), records
    try:
        plugin.ClientOptions.from_mapping({"p.timeout": "-1"}, prefix="p.")
    except kvstore.InvalidArgument:
        pass
    else:
        raise AssertionError("a negative timeout was accepted")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--address", required=True)
    ap.add_argument("--dead-address", default="127.0.0.1:1")
    ap.add_argument("--victim-address", default=None)
    ap.add_argument("--victim-pid", type=int, default=None)
    ap.add_argument("--only", action="append")
    a = ap.parse_args()
    env = Env(a.address, a.dead_address, a)
    results = {}
    try:
        for name, fn in CHECKS.items():
            if a.only and name not in a.only:
                continue
            try:
                fn(env)
                results[name] = "ok"
            except Exception as e:  # report every check, not just the first failure
                traceback.print_exc()
                results[name] = f"{type(e).__name__}: {e}"
            env.release()
    finally:
        env.close()
    print(json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
