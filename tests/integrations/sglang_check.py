"""The SGLang HiCache backend against SGLang's published interface and a real kvstored.

Run by tests/integrations/test_sglang.py in the engines environment, with the
``sglang`` package (0.5.23, installed --no-deps: no GPU kernels) on the path:

    sglang_check.py --address HOST:PORT [--dead-address HOST:PORT]

What is SGLang's own code here: the ``HiCacheStorage`` ABC the backend
subclasses, ``HiCacheStorageConfig`` / ``HiCacheStorageExtraInfo``, and
``StorageBackendFactory``, which loads the backend exactly as
``--hicache-storage-backend dynamic`` does. What is a stand-in: the host memory
pool (``HostPool`` below). SGLang's real ``MHATokenToKVPoolHost`` needs a device KV
pool to mirror; the stand-in holds a CPU buffer in SGLang's ``page_first`` /
``layer_first`` layouts and answers ``get_page_buffer_meta`` with pointers into it,
the one call the zero-copy path makes. The last stdout line is a JSON object
{check name: "ok" or the failure}.
"""
from __future__ import annotations

import hashlib
import sys
import time

import torch
from sglang.srt.mem_cache.hicache_storage import (HiCacheStorage, HiCacheStorageConfig,
                                                  HiCacheStorageExtraInfo)
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

import kvstore
from kvstore.integrations.sglang import KVStoreHiCacheStorage

CHECKS = {}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


class HostPool:
    """Stand-in for SGLang's host KV pool: ``size`` token slots, pages of ``page_size``.

    MHA ``page_first``: K and V planes ``[size, layers, heads, dim]``; a page's K (and
    its V) is one contiguous run, so 2 buffers per page. MHA ``layer_first``: planes
    ``[layers, size, heads, dim]``, 2 buffers per layer per page. MLA ``page_first``:
    one plane ``[size, layers, 1, dim]``, 1 buffer per page.
    """

    def __init__(self, *, layout="page_first", mla=False, size=64, page_size=4, layers=3, heads=2,
                 dim=8, dtype=torch.bfloat16, seed=None):
        self.layout, self.mla, self.size, self.page_size = layout, mla, size, page_size
        self.layer_num, self.head_num, self.head_dim, self.dtype = layers, heads, dim, dtype
        planes = 1 if mla else 2
        heads = 1 if mla else heads
        shape = (planes, size, layers, heads, dim) if layout == "page_first" else (planes, layers, size, heads, dim)
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        self.kv_buffer = (torch.randn(shape, generator=g) if g else torch.zeros(shape)).to(dtype)

    def get_page_buffer_meta(self, indices):
        idx = indices.tolist()
        assert len(idx) % self.page_size == 0
        ptrs, sizes = [], []
        for start in idx[::self.page_size]:
            if self.layout == "page_first":
                bufs = [self.kv_buffer[p, start:start + self.page_size] for p in range(self.kv_buffer.shape[0])]
            else:
                bufs = [self.kv_buffer[p, layer, start:start + self.page_size]
                        for layer in range(self.layer_num) for p in range(self.kv_buffer.shape[0])]
            for b in bufs:
                assert b.is_contiguous()
                ptrs.append(b.data_ptr())
                sizes.append(b.numel() * b.element_size())
        return ptrs, sizes

    def page(self, index: int) -> torch.Tensor:
        """Every byte of the page starting at slot ``index`` (for comparisons)."""
        if self.layout == "page_first":
            return self.kv_buffer[:, index:index + self.page_size].clone()
        return self.kv_buffer[:, :, index:index + self.page_size].clone()

    def get_dummy_flat_data_page(self) -> torch.Tensor:
        return torch.zeros(self.page(0).numel(), dtype=self.dtype)


def config(namespace: str, address: str, *, model="kvstore-test/model", tp_rank=0, tp_size=1, mla=False,
           **extra) -> HiCacheStorageConfig:
    ec = {"backend_name": "kvstore", "module_path": "kvstore.integrations.sglang",
          "class_name": "KVStoreHiCacheStorage", "interface_v1": 1, "address": address,
          "namespace": namespace, "timeout": 5}
    ec.update(extra)
    return HiCacheStorageConfig(tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0,
                                attn_cp_size=1, is_mla_model=mla, enable_storage_metrics=False,
                                is_page_first_layout=True, model_name=model, extra_config=ec)


def backend(cfg: HiCacheStorageConfig, pool: HostPool) -> KVStoreHiCacheStorage:
    """As SGLang's cache controller does it: the factory, then register the host pool."""
    b = StorageBackendFactory.create_backend("dynamic", cfg, pool)
    assert isinstance(b, KVStoreHiCacheStorage), type(b)
    b.register_mem_pool_host(pool)
    return b


def hashes(n: int, tag: str) -> list[str]:
    """Page keys as SGLang makes them: a sha256 hex chain."""
    out, prev = [], tag
    for i in range(n):
        prev = hashlib.sha256(f"{prev}|{i}".encode()).hexdigest()
        out.append(prev)
    return out


def slots(pool: HostPool, pages: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(p * pool.page_size, (p + 1) * pool.page_size) for p in pages])


def stats(address: str, namespace: str):
    with kvstore.Client(address, timeout=5) as c:
        s = c.stats()
        return dict(s.counters), s.namespaces.get(namespace, 0)


@check
def factory_loads_dynamic_backend(a):
    cfg = config("sg-factory", a.address)
    b = backend(cfg, HostPool())
    assert isinstance(b, HiCacheStorage)
    assert b.options.address == a.address and b.options.namespace == "sg-factory"
    b.close()


@check
def v1_roundtrip_page_first(a):
    src, dst = HostPool(seed=1), HostPool()
    writer = backend(config("sg-rt", a.address), src)
    reader = backend(config("sg-rt", a.address), dst)
    keys = hashes(5, "rt")
    info = HiCacheStorageExtraInfo(prefix_keys=None)
    assert writer.batch_set_v1(keys, slots(src, [0, 1, 2, 3, 4]), info) == [True] * 5
    _, objects = stats(a.address, "sg-rt")
    assert objects == 10, f"page_first MHA: K and V per page, {objects} objects"
    assert reader.batch_exists(keys, info) == 5
    # into other slots of another pool, as a prefetch does
    assert reader.batch_get_v1(keys, slots(dst, [9, 3, 7, 1, 12]), info) == [True] * 5
    for s, d in zip([0, 1, 2, 3, 4], [9, 3, 7, 1, 12]):
        assert torch.equal(src.page(s * src.page_size), dst.page(d * dst.page_size)), f"page {s}"


@check
def v1_roundtrip_layer_first(a):
    src, dst = HostPool(layout="layer_first", seed=2), HostPool(layout="layer_first")
    w = backend(config("sg-lf", a.address), src)
    r = backend(config("sg-lf", a.address), dst)
    keys = hashes(3, "lf")
    assert w.batch_set_v1(keys, slots(src, [2, 4, 6])) == [True] * 3
    _, objects = stats(a.address, "sg-lf")
    assert objects == 3 * 2 * src.layer_num, objects
    assert r.batch_get_v1(keys, slots(dst, [0, 1, 2])) == [True] * 3
    for s, d in zip([2, 4, 6], [0, 1, 2]):
        assert torch.equal(src.page(s * 4), dst.page(d * 4))


@check
def exists_is_a_prefix_of_whole_pages(a):
    pool = HostPool(seed=3)
    b = backend(config("sg-px", a.address), pool)
    keys = hashes(4, "px")
    assert b.batch_set_v1([keys[0], keys[1], keys[3]], slots(pool, [0, 1, 3])) == [True] * 3
    assert b.batch_exists(keys) == 2
    assert b.batch_exists(keys[2:]) == 0
    assert b.exists(keys[0]) and not b.exists(keys[2])
    # a page with only one of its buffers stored is not a hit
    b.client.delete([f"{keys[1]}/{b._ident_v1}/1".encode()])
    assert b.batch_exists(keys) == 1


@check
def get_v1_reports_each_page(a):
    src, dst = HostPool(seed=4), HostPool()
    w = backend(config("sg-miss", a.address), src)
    r = backend(config("sg-miss", a.address), dst)
    keys = hashes(3, "miss")
    w.batch_set_v1([keys[0], keys[2]], slots(src, [0, 2]))
    assert r.batch_get_v1(keys, slots(dst, [5, 6, 7])) == [True, False, True]
    assert torch.equal(src.page(0), dst.page(5 * 4)) and torch.equal(src.page(8), dst.page(7 * 4))


@check
def set_v1_skips_stored_pages(a):
    pool = HostPool(seed=5)
    b = backend(config("sg-skip", a.address), pool)
    keys = hashes(4, "skip")
    b.batch_set_v1(keys, slots(pool, [0, 1, 2, 3]))
    before, _ = stats(a.address, "sg-skip")
    assert b.batch_set_v1(keys, slots(pool, [0, 1, 2, 3])) == [True] * 4
    after, _ = stats(a.address, "sg-skip")
    assert after["puts"] == before["puts"], "stored pages were sent again"


@check
def shards_and_models_are_separate(a):
    pool = HostPool(seed=6)
    keys = hashes(2, "shard")
    tp0 = backend(config("sg-shard", a.address, tp_rank=0, tp_size=2), pool)
    tp1 = backend(config("sg-shard", a.address, tp_rank=1, tp_size=2), HostPool())
    other = backend(config("sg-shard", a.address, model="other/model", tp_rank=0, tp_size=2), HostPool())
    tp0.batch_set_v1(keys, slots(pool, [0, 1]))
    assert tp0.batch_exists(keys) == 2
    assert tp1.batch_exists(keys) == 0, "MHA: another TP rank holds other heads"
    assert other.batch_exists(keys) == 0, "another model must not see these pages"


@check
def mla_pages_are_shared_and_written_once(a):
    src = HostPool(mla=True, seed=7)
    keys = hashes(2, "mla")
    rank1 = backend(config("sg-mla", a.address, tp_rank=1, tp_size=2, mla=True), src)
    assert rank1.batch_set_v1(keys, slots(src, [0, 1])) == [True, True]
    assert stats(a.address, "sg-mla")[1] == 0, "a non-writer MLA rank wrote"
    rank0 = backend(config("sg-mla", a.address, tp_rank=0, tp_size=2, mla=True), src)
    assert rank0.batch_set_v1(keys, slots(src, [0, 1])) == [True, True]
    assert stats(a.address, "sg-mla")[1] == 2, "MLA: one buffer per page"
    dst = HostPool(mla=True)
    reader = backend(config("sg-mla", a.address, tp_rank=1, tp_size=2, mla=True), dst)
    assert reader.batch_exists(keys) == 2
    assert reader.batch_get_v1(keys, slots(dst, [3, 4])) == [True, True]
    assert torch.equal(src.page(0), dst.page(12)) and torch.equal(src.page(4), dst.page(16))


@check
def per_key_interface(a):
    pool = HostPool(seed=8)
    cfg = config("sg-flat", a.address)
    cfg.extra_config.pop("interface_v1")
    b = backend(cfg, pool)
    keys = hashes(3, "flat")
    pages = [torch.randn(pool.page(0).numel()).to(torch.bfloat16) for _ in keys]
    assert b.batch_set(keys, pages) is True
    assert b.set("single", pages[0]) is True
    outs = [pool.get_dummy_flat_data_page() for _ in keys]
    got = b.batch_get(keys + ["absent"], outs + [pool.get_dummy_flat_data_page()])
    assert got[3] is None
    assert all(torch.equal(g, p) for g, p in zip(got[:3], pages))
    assert torch.equal(b.get("single", pool.get_dummy_flat_data_page()), pages[0])
    assert b.get("absent", pool.get_dummy_flat_data_page()) is None


@check
def unreachable_daemon(a):
    pool = HostPool(seed=9)
    b = backend(config("sg-dead", a.dead_address), pool)
    keys = hashes(2, "dead")
    t = time.monotonic()
    assert b.batch_exists(keys) == 0
    assert b.batch_get_v1(keys, slots(pool, [0, 1])) == [False, False]
    assert b.batch_set_v1(keys, slots(pool, [0, 1])) == [False, False]
    # the legacy per-key calls too (SGLang's prefetch thread dies on an exception)
    assert b.batch_get(keys) == [None, None]
    assert b.batch_get(keys, [pool.get_dummy_flat_data_page() for _ in keys]) == [None, None]
    assert b.exists(keys[0]) is False and b.get(keys[0]) is None
    assert b.batch_set(keys, [pool.get_dummy_flat_data_page() for _ in keys]) is False
    assert time.monotonic() - t < 1.0, f"{time.monotonic() - t:.2f}s against a refused port"


@check
def tensor_views_keep_their_tensor(a):
    """A view handed to the SDK keeps the tensor it views alive: a page made contiguous
    on the fly (a temporary) must not be freed while its bytes are being sent."""
    import gc
    import weakref

    from kvstore.integrations.sglang import _tensor_view

    src = torch.arange(64, dtype=torch.float32).reshape(8, 8)
    tmp = src.t().contiguous()  # a temporary copy, as batch_set makes for a strided page
    ref = weakref.ref(tmp)
    view = _tensor_view(tmp)
    del tmp
    gc.collect()
    assert ref() is not None, "the tensor was freed under its view"
    assert bytes(view) == src.t().contiguous().numpy().tobytes()
    del view
    gc.collect()
    assert ref() is None, "the view leaks its tensor"
    # through the adapter: a non-contiguous page stored with batch_set reads back equal
    pool = HostPool(seed=12)
    cfg = config("sg-view", a.address)
    cfg.extra_config.pop("interface_v1")
    b = backend(cfg, pool)
    page = torch.randn(pool.page(0).numel() * 2).to(torch.bfloat16)[::2]  # strided
    assert not page.is_contiguous()
    assert b.batch_set(["strided"], [page]) is True
    got = b.get("strided", pool.get_dummy_flat_data_page())
    assert got is not None and torch.equal(got, page)


@check
def dead_daemon_costs_a_step_milliseconds(a):
    """A real kvstored, killed under the backend: no call raises, the first step after
    the death costs one refused connection, and the next ones are answered as misses
    by the circuit breaker without asking (SGLang's cache controller per step: a prefix
    query, a prefetch, a backup; plus the legacy per-key calls)."""
    from checkmain import kill_victim, step_figures

    pool = HostPool(seed=11)
    b = backend(config("sg-kill", a.victim_address), pool)
    keys = hashes(4, "kill")
    assert b.batch_set_v1(keys, slots(pool, [0, 1, 2, 3])) == [True] * 4
    assert b.batch_exists(keys) == 4
    kill_victim(a)
    times = []
    for step in range(40):
        fresh = hashes(2, f"kill-{step}")
        t = time.monotonic()
        assert b.batch_exists(keys) == 0
        assert b.batch_get_v1(keys, slots(pool, [4, 5, 6, 7])) == [False] * 4
        assert b.batch_set_v1(fresh, slots(pool, [8, 9])) == [False] * 2
        assert b.batch_get(keys[:2]) == [None, None]
        assert b.exists(keys[0]) is False
        times.append(time.monotonic() - t)
    step_figures("sglang, dead kvstored", times)
    assert times[0] < 1.0, f"first step after the death took {times[0]:.3f}s"
    assert max(times[1:]) < 0.25, f"a later step took {max(times[1:]):.3f}s"
    assert sum(times[1:]) / len(times[1:]) < 0.02
    assert b.breaker.skipped > 0 and not b.breaker.closed
    b.close()


@check
def clear_empties_the_namespace(a):
    pool = HostPool(seed=10)
    b = backend(config("sg-clear", a.address), pool)
    b.batch_set_v1(hashes(2, "clear"), slots(pool, [0, 1]))
    assert stats(a.address, "sg-clear")[1] == 4
    b.clear()
    assert stats(a.address, "sg-clear")[1] == 0


if __name__ == "__main__":
    from checkmain import main  # the script's own folder is on sys.path
    sys.exit(main(CHECKS))
