"""kvstore.torch (tensors and paged KV blocks) against a real kvstored.

Everything here runs on CPU tensors; the CUDA paths have their own tests, which skip
(with the reason) on a host without a GPU.
"""
from __future__ import annotations

import asyncio
import inspect
import time

import pytest

torch = pytest.importorskip("torch")

import kvstore  # noqa: E402
import kvstore.torch as kt  # noqa: E402
from kvstore import errors  # noqa: E402

KiB = 1 << 10
MiB = 1 << 20
CUDA = torch.cuda.is_available()
NO_CUDA = "CUDA not available: torch.cuda.is_available() is False on this host (CPU-only torch or no GPU)"

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.int8]


def rand(shape, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        t = torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)
    elif dtype == torch.bool:
        t = torch.randint(0, 2, shape, generator=g).bool()
    else:
        info = torch.iinfo(dtype)
        t = torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)
    return t.to(device)


def raw(t):
    """The bytes a tensor's object must hold: its elements in row-major order."""
    c = t.detach().contiguous().cpu()
    return bytes(c.reshape(-1).view(torch.uint8).tolist()) if c.numel() else b""


def _has_shm_param() -> bool:
    return "shm" in inspect.signature(kvstore.Client.__init__).parameters


@pytest.fixture
def daemon(shared_daemon):
    """The module's tests share one kvstored, emptied before each (conftest.shared_daemon)."""
    return shared_daemon


@pytest.fixture(params=["tcp", "shm"])
def tclient(request, daemon):
    """A Client on each data path: TCP, and the same-host shared-memory path."""
    kw = {}
    if _has_shm_param():
        kw["shm"] = request.param == "shm"
    elif request.param == "shm":
        pytest.skip("this kvstore.Client has no shm data path")
    with kvstore.Client(daemon.control, namespace="torch", timeout=10.0, **kw) as c:
        if request.param == "shm" and not getattr(c.info(), "shm_socket", ""):
            pytest.skip("kvstored offers no shm socket here")
        if hasattr(type(c), "transport"):
            assert c.transport == request.param
        yield c


# ================================================================ tensors

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_tensor_roundtrip(tclient, dtype):
    t = rand((3, 5, 7), dtype, seed=1)
    assert kt.put_tensor(tclient, b"t", t) is True
    assert kt.put_tensor(tclient, b"t", t.clone()) is False  # same bytes: dedup
    assert tclient.get(b"t") == raw(t)  # the object is the raw elements, nothing else
    got = kt.get_tensor(tclient, b"t", dtype=dtype, shape=(3, 5, 7))
    assert got.dtype == dtype and got.shape == (3, 5, 7) and torch.equal(got, t)
    into = torch.zeros(3, 5, 7, dtype=dtype)
    assert kt.get_tensor_into(tclient, b"t", into) is None
    assert torch.equal(into, t)
    # any shape with the same byte size reads the same bytes
    assert torch.equal(kt.get_tensor(tclient, b"t", dtype=dtype, shape=[105]), t.reshape(-1))


def test_tensor_edge_shapes_and_dtypes(tclient):
    cases = {
        b"scalar": torch.tensor(3.25, dtype=torch.float64),
        b"empty": torch.empty(0, 4, dtype=torch.float16),
        b"bool": rand((17,), torch.bool, 2),
        b"int64": rand((4, 4), torch.int64, 3),
        b"uint8": rand((1000,), torch.uint8, 4),
        b"complex": torch.randn(6, dtype=torch.complex64),
        b"grad": torch.randn(5, requires_grad=True),
    }
    assert kt.batch_put_tensors(tclient, cases.items()) == [True] * len(cases)
    for k, t in cases.items():
        got = kt.get_tensor(tclient, k, dtype=t.dtype, shape=t.shape)
        assert torch.equal(got, t.detach()), k
    assert tclient.get(b"empty") == b""


def test_non_contiguous_tensors_are_copied_in_row_major_order(tclient):
    base = rand((8, 6), torch.float32, 5)
    views = {b"transpose": base.t(), b"slice": base[:, 1:5], b"step": base[::2, ::3],
             b"expand": torch.arange(4.0).expand(3, 4)}
    for k, v in views.items():
        assert not v.is_contiguous()
        assert kt.put_tensor(tclient, k, v) is True
        assert tclient.get(k) == raw(v), k  # == v.contiguous()'s bytes
    # a non-contiguous destination: only the viewed elements are written
    big = torch.full((6, 16), -1.0)
    dst = big[:, ::2]  # 6 x 8 view of every other column
    kt.get_tensor_into(tclient, b"transpose", dst)
    assert torch.equal(dst, base.t())
    assert torch.equal(big[:, 1::2], torch.full((6, 8), -1.0))


def test_batch_tensors_mixed(tclient):
    ts = [rand((64, 32), torch.float16, 10), rand((5,), torch.int8, 11),
          rand((16, 16), torch.bfloat16, 12).t(), rand((3, 300), torch.float32, 13)[:, ::3],
          torch.empty(0)]
    keys = [f"m{i}" for i in range(len(ts))]
    assert kt.batch_put_tensors(tclient, zip(keys, ts)) == [True] * len(ts)
    dests = [torch.zeros_like(t) for t in ts]
    dests[1] = torch.zeros(10, dtype=torch.int8)[::2]  # non-contiguous destination
    kt.batch_get_tensors_into(tclient, keys, dests)
    for t, d in zip(ts, dests):
        assert torch.equal(t, d)
    assert kt.batch_put_tensors(tclient, []) == []
    kt.batch_get_tensors_into(tclient, [], [])


def test_tensor_batch_spanning_many_chunks(tclient):
    """Staged tensors (non-contiguous) in more chunks than one, and more than one window."""
    pool = kt.StagingPool(8 * MiB, chunk_bytes=20 * KiB)
    ts = [rand((40, 70), torch.float32, i).t() for i in range(40)]  # 11.2 KB each: 1 per chunk
    keys = [f"c{i}" for i in range(40)]
    assert kt.batch_put_tensors(tclient, zip(keys, ts), pool=pool) == [True] * 40
    dests = [torch.zeros(140, 40)[::2] for _ in ts]
    kt.batch_get_tensors_into(tclient, keys, dests, pool=pool)
    assert all(torch.equal(t, d) for t, d in zip(ts, dests))
    assert pool.stats()["in_use_bytes"] == 0


def test_get_size_mismatch_is_invalid_argument(tclient):
    t = rand((10,), torch.float32, 20)
    kt.put_tensor(tclient, b"f32", t)
    # object larger than the tensor: refused before its bytes are received
    small = torch.full((10,), 7, dtype=torch.float16)
    with pytest.raises(errors.InvalidArgument):
        kt.get_tensor_into(tclient, b"f32", small)
    assert torch.equal(small, torch.full((10,), 7, dtype=torch.float16))
    # object shorter than the tensor
    with pytest.raises(errors.InvalidArgument, match="needs exactly 44"):
        kt.get_tensor(tclient, b"f32", dtype=torch.float32, shape=(11,))
    # staged (non-contiguous) destination: untouched on a mismatch
    big = torch.full((12, 2), 5.0)
    with pytest.raises(errors.InvalidArgument, match="needs exactly 48"):
        kt.get_tensor_into(tclient, b"f32", big[:, 0])
    assert torch.equal(big, torch.full((12, 2), 5.0))
    # the connection is still in step
    assert torch.equal(kt.get_tensor(tclient, b"f32", dtype=torch.float32, shape=(10,)), t)
    # same byte size, other dtype: indistinguishable (raw objects), by design
    assert kt.get_tensor(tclient, b"f32", dtype=torch.int32, shape=(10,)).shape == (10,)


def test_get_tensor_not_found(client):
    with pytest.raises(errors.NotFound):
        kt.get_tensor(client, b"nope", dtype=torch.float16, shape=(4,))
    with pytest.raises(errors.NotFound):
        kt.batch_get_tensors_into(client, [b"nope", b"nope2"], [torch.zeros(2), torch.zeros(3)])


def test_bad_tensor_input_stores_nothing(client):
    good = rand((16,), torch.float16, 30)
    bad_inputs = [
        "not a tensor",
        torch.empty(4, device="meta"),  # a device other than cpu/cuda
        torch.eye(3).to_sparse(),  # not dense
        torch.zeros(5 * MiB, dtype=torch.uint8),  # over the daemon's 4 MiB max_value_size
    ]
    for bad in bad_inputs:
        with pytest.raises(errors.InvalidArgument):
            kt.batch_put_tensors(client, [(b"good", good), (b"bad", bad)])
        assert client.exists([b"good", b"bad"]) == [False, False]
    with pytest.raises(errors.InvalidArgument):
        kt.put_tensor(client, b"", good)  # bad key
    with pytest.raises(errors.InvalidArgument):
        kt.put_tensor(client, b"k" * 129, good)
    assert client.exists([b"good"]) == [False]


def test_bad_get_input_checked_before_the_network(client):
    # none of these keys exist: InvalidArgument (not NotFound) proves nothing was asked
    with pytest.raises(errors.InvalidArgument, match="device meta"):
        kt.get_tensor_into(client, b"absent", torch.empty(4, device="meta"))
    with pytest.raises(errors.InvalidArgument, match="2 keys but 1 tensors"):
        kt.batch_get_tensors_into(client, [b"absent", b"absent2"], [torch.zeros(2)])
    with pytest.raises(errors.InvalidArgument, match="dtype"):
        kt.get_tensor(client, b"absent", dtype="float16", shape=(2,))
    with pytest.raises(errors.InvalidArgument, match="shape"):
        kt.get_tensor(client, b"absent", dtype=torch.float16, shape=(2, -1))
    with pytest.raises(errors.InvalidArgument):
        kt.get_tensor(client, b"absent", dtype=torch.float16, shape=(2,), device="meta")
    with pytest.raises(errors.InvalidArgument, match="single key"):
        kt.batch_get_tensors_into(client, b"absent", [torch.zeros(2)])
    with pytest.raises(errors.InvalidArgument, match="expanded"):
        kt.get_tensor_into(client, b"absent", torch.zeros(1).expand(4))


# ================================================================ paged KV layouts

L, NB, BS, H, D = 4, 64, 16, 2, 32  # small geometry: 16 KiB blocks in fp16


def vllm_caches(dtype=torch.float16, seed=0, kv_first=True):
    shape = (2, NB, BS, H, D) if kv_first else (NB, 2, BS, H, D)
    return [rand(shape, dtype, seed + i) for i in range(L)]


def vllm_block(caches, b, kv_first=True):
    """Block b in object order: for each layer, K then V."""
    return torch.stack([c[kv, b] if kv_first else c[b, kv] for c in caches for kv in (0, 1)])


def sglang_buffers(dtype=torch.float16, seed=0, page=4, pages=NB, extra=3):
    ks = [rand((page * pages + extra, H, D), dtype, seed + 2 * i) for i in range(L)]
    vs = [rand((page * pages + extra, H, D), dtype, seed + 2 * i + 1) for i in range(L)]
    return ks, vs


def sglang_page(ks, vs, p, page=4):
    sl = slice(p * page, (p + 1) * page)
    return torch.stack([x[sl] for k, v in zip(ks, vs) for x in (k, v)])


def test_layout_geometry():
    lay = kt.KVLayout.vllm(vllm_caches())
    assert (lay.num_layers, lay.num_blocks, lay.block_shape) == (L, NB, (BS, H, D))
    assert lay.block_nbytes == L * 2 * BS * H * D * 2 == 16 * KiB
    assert lay.dtype == torch.float16 and lay.device == torch.device("cpu")
    ks, vs = sglang_buffers(page=BS)
    sg = kt.KVLayout.sglang(ks, vs, page_size=BS)
    assert (sg.num_layers, sg.num_blocks, sg.block_nbytes) == (L, NB, lay.block_nbytes)
    assert sg.signature == lay.signature  # same object layout
    assert kt.KVLayout.vllm(vllm_caches(torch.float32)).signature != lay.signature
    assert kt.KVLayout.vllm({f"layer.{i}": c for i, c in enumerate(vllm_caches())}).num_layers == L
    assert "block_nbytes=16384" in repr(lay)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_vllm_blocks_roundtrip(tclient, dtype):
    caches = vllm_caches(dtype, seed=100)
    lay = kt.KVLayout.vllm(caches)
    src = [3, 7, 8, 20, 63, 0]
    keys = [f"v{b}".encode() for b in src]
    expect = [vllm_block(caches, b).clone() for b in src]
    assert kt.put_blocks(tclient, lay, keys, src) == [True] * len(src)
    assert kt.put_blocks(tclient, lay, keys, src) == [False] * len(src)  # dedup
    assert tclient.get(keys[0]) == raw(expect[0])  # the documented object layout
    for c in caches:
        c.zero_()
    dst = [1, 2, 40, 50, 9, 63]
    kt.get_blocks(tclient, lay, keys, dst)
    for b, e in zip(dst, expect):
        assert torch.equal(vllm_block(caches, b), e), b
    untouched = [b for b in range(NB) if b not in dst]
    assert all(not c[:, untouched].any() for c in caches)


def test_vllm_flashinfer_layout(tclient):
    caches = vllm_caches(seed=200, kv_first=False)
    lay = kt.KVLayout.vllm(caches, kv_first=False)
    expect = vllm_block(caches, 5, kv_first=False).clone()
    kt.put_blocks(tclient, lay, [b"fi"], [5])
    assert tclient.get(b"fi") == raw(expect)
    for c in caches:
        c.zero_()
    kt.get_blocks(tclient, lay, [b"fi"], [11])
    assert torch.equal(vllm_block(caches, 11, kv_first=False), expect)


def test_vllm_strided_layers(tclient):
    """Layer tensors that are permuted views (an HND physical layout) still produce the
    logical [token][head][dim] object order."""
    phys = [rand((2, NB, H, BS, D), torch.float16, 300 + i) for i in range(L)]
    caches = [p.permute(0, 1, 3, 2, 4) for p in phys]  # logical [2, NB, BS, H, D]
    lay = kt.KVLayout.vllm(caches)
    expect = vllm_block(caches, 4).clone()
    kt.put_blocks(tclient, lay, [b"hnd"], [4])
    assert tclient.get(b"hnd") == raw(expect)
    for p in phys:
        p.zero_()
    kt.get_blocks(tclient, lay, [b"hnd"], [30])
    assert torch.equal(vllm_block(caches, 30), expect)


def test_sglang_pages_roundtrip(tclient):
    page = 4
    ks, vs = sglang_buffers(torch.bfloat16, seed=400, page=page)
    lay = kt.KVLayout.sglang(ks, vs, page_size=page)
    assert lay.num_blocks == NB and lay.block_shape == (page, H, D)
    src = [0, 5, 6, 62, 63]
    keys = [f"s{p}".encode() for p in src]
    expect = [sglang_page(ks, vs, p, page).clone() for p in src]
    tails = [x[NB * page:].clone() for x in ks + vs]  # slots past the last full page
    assert kt.put_blocks(tclient, lay, keys, torch.tensor(src, dtype=torch.int32)) == [True] * 5
    assert tclient.get(keys[1]) == raw(expect[1])
    for x in ks + vs:
        x[:NB * page].zero_()
    dst = [10, 11, 1, 63, 30]
    kt.get_blocks(tclient, lay, keys, dst)
    for p, e in zip(dst, expect):
        assert torch.equal(sglang_page(ks, vs, p, page), e), p
    assert all(torch.equal(x[NB * page:], t) for x, t in zip(ks + vs, tails))
    assert sum(int(x[:NB * page].count_nonzero()) for x in ks) == len(dst) * page * H * D * L


def test_custom_planes_layout(tclient):
    """KVLayout(planes) for other layouts, e.g. MLA's one latent cache per layer
    [num_blocks, block_size, head_dim]: the object is the planes' blocks in order."""
    planes = [rand((NB, BS, 576), torch.bfloat16, 1800 + i) for i in range(3)]
    lay = kt.KVLayout(planes)
    assert lay.num_layers == 3 and lay.block_nbytes == 3 * BS * 576 * 2
    expect = torch.stack([p[6] for p in planes]).clone()
    kt.put_blocks(tclient, lay, [b"mla"], [6])
    assert tclient.get(b"mla") == raw(expect)
    for p in planes:
        p.zero_()
    kt.get_blocks(tclient, lay, [b"mla"], [60])
    assert torch.equal(torch.stack([p[60] for p in planes]), expect)


def test_vllm_blocks_read_into_sglang(tclient):
    """Same geometry, same bytes: a block written from vLLM's cache fills an SGLang page."""
    caches = vllm_caches(seed=500)
    kt.put_blocks(tclient, kt.KVLayout.vllm(caches), [b"x0", b"x1"], [12, 13])
    ks, vs = sglang_buffers(seed=600, page=BS, pages=8, extra=0)
    kt.get_blocks(tclient, kt.KVLayout.sglang(ks, vs, page_size=BS), [b"x0", b"x1"], [7, 2])
    assert torch.equal(sglang_page(ks, vs, 7, BS), vllm_block(caches, 12))
    assert torch.equal(sglang_page(ks, vs, 2, BS), vllm_block(caches, 13))


def test_blocks_in_many_chunks(tclient):
    """More blocks than one chunk and than one pipelined window (32)."""
    pool = kt.StagingPool(8 * MiB, chunk_bytes=3 * 16 * KiB)  # 3 blocks per chunk
    caches = vllm_caches(seed=700)
    lay = kt.KVLayout.vllm(caches)
    src = list(range(0, 40))
    keys = [f"w{b}".encode() for b in src]
    expect = [vllm_block(caches, b).clone() for b in src]
    assert kt.put_blocks(tclient, lay, keys, src, pool=pool) == [True] * 40
    for c in caches:
        c.zero_()
    dst = list(range(63, 23, -1))
    kt.get_blocks(tclient, lay, keys, dst, pool=pool)
    assert all(torch.equal(vllm_block(caches, b), e) for b, e in zip(dst, expect))


def test_cache_made_in_inference_mode(tclient):
    with torch.inference_mode():
        caches = vllm_caches(seed=800)
    lay = kt.KVLayout.vllm(caches)
    expect = vllm_block(caches, 3).clone()
    kt.put_blocks(tclient, lay, [b"inf"], [3])
    kt.get_blocks(tclient, lay, [b"inf"], [4])
    assert torch.equal(vllm_block(caches, 4), expect)


def test_staging_is_reused_not_grown(tclient):
    pool = kt.StagingPool(64 * MiB, chunk_bytes=4 * 16 * KiB)
    caches = vllm_caches(seed=900)
    lay = kt.KVLayout.vllm(caches)
    nc = rand((64, 64), torch.float32, 901).t()

    def one_round(i):
        keys = [f"r{i}-{b}".encode() for b in range(10)]
        kt.put_blocks(tclient, lay, keys, list(range(10)), pool=pool)
        kt.get_blocks(tclient, lay, keys, list(range(20, 30)), pool=pool)
        kt.put_tensor(tclient, f"nc{i}", nc, pool=pool)
        kt.get_tensor_into(tclient, f"nc{i}", torch.zeros(64, 128)[:, ::2], pool=pool)

    one_round(0)
    first = pool.stats()
    assert first["allocations"] >= 1 and first["in_use_bytes"] == 0
    for i in range(1, 6):
        one_round(i)
    now = pool.stats()
    assert now["allocations"] == first["allocations"]
    assert now["retained_bytes"] == first["retained_bytes"] <= pool.max_bytes
    assert now["reuses"] > first["reuses"] and now["overflows"] == 0 and now["in_use_bytes"] == 0


def test_staging_pool_bound_and_overflow():
    pool = kt.StagingPool(1 * MiB, chunk_bytes=256 * KiB)
    with pool.lease(600 * KiB) as a:
        assert a.numel() == 600 * KiB and a.dtype == torch.uint8
        with pool.lease(600 * KiB) as b:  # does not fit beside a: one-off buffer
            assert b.numel() == 600 * KiB
            assert pool.stats()["overflows"] == 1
    s = pool.stats()
    assert s["retained_bytes"] <= pool.max_bytes and s["in_use_bytes"] == 0 and s["buffers"] == 1
    with pool.lease(300 * KiB):  # the idle 1 MiB buffer serves a smaller lease
        pass
    assert pool.stats()["allocations"] == 1
    with pool.lease(3 * MiB):  # larger than the bound: overflow, nothing retained
        pass
    assert pool.stats()["retained_bytes"] <= pool.max_bytes
    with pool.lease(0) as z:
        assert z.numel() == 0
    pool.clear()
    assert pool.stats()["retained_bytes"] == 0
    with pytest.raises(errors.InvalidArgument):
        kt.StagingPool(0)


def test_block_argument_errors_move_nothing(client):
    caches = vllm_caches(seed=1000)
    lay = kt.KVLayout.vllm(caches)
    snapshot = [c.clone() for c in caches]
    cases = [
        ([b"a", b"b"], [1], "2 keys but 1 block ids"),
        ([b"a"], [NB], "out of range"),
        ([b"a"], [-1], "out of range"),
        ([b"a"], [1.0], "not an int"),
        ([b"a"], [True], "not an int"),
        ([b"a"], torch.tensor([1.0]), "integer tensor"),
        ([b""], [1], "key length"),
    ]
    for keys, ids, msg in cases:
        with pytest.raises(errors.InvalidArgument, match=msg):
            kt.put_blocks(client, lay, keys, ids)
        with pytest.raises(errors.InvalidArgument, match=msg):
            kt.get_blocks(client, lay, keys, ids)
    with pytest.raises(errors.InvalidArgument, match="single key"):
        kt.put_blocks(client, lay, b"a", [1])
    with pytest.raises(errors.InvalidArgument, match="KVLayout"):
        kt.put_blocks(client, caches, [b"a"], [1])
    # a destination id twice: rejected before anything is asked (the keys do not exist)
    with pytest.raises(errors.InvalidArgument, match="block id 5 appears twice"):
        kt.get_blocks(client, lay, [b"a", b"b", b"c"], [5, 6, 5])
    # a source id twice is fine: the same block under two keys
    assert kt.put_blocks(client, lay, [b"d1", b"d2"], [5, 5]) == [True, True]
    assert client.get(b"d1") == client.get(b"d2")
    assert client.exists([b"a", b"b", b"c"]) == [False] * 3
    # blocks over the daemon's max_value_size (4 MiB): refused before sending
    huge = kt.KVLayout.vllm([torch.zeros(2, 2, 16, 8, 128, dtype=torch.float32) for _ in range(33)])
    assert huge.block_nbytes > 4 * MiB
    with pytest.raises(errors.InvalidArgument, match="max_value_size"):
        kt.put_blocks(client, huge, [b"h"], [0])
    assert client.exists([b"h"]) == [False]
    assert kt.put_blocks(client, lay, [], []) == [] and kt.get_blocks(client, lay, [], []) is None
    assert all(torch.equal(c, s) for c, s in zip(caches, snapshot))


def test_get_blocks_errors(tclient):
    caches = vllm_caches(seed=1100)
    lay = kt.KVLayout.vllm(caches)
    kt.put_blocks(tclient, lay, [b"ok"], [1])
    tclient.put(b"short", b"x" * 100)
    tclient.put(b"long", b"x" * (lay.block_nbytes + 8))
    snapshot = [c.clone() for c in caches]
    # the failing object's chunk is never scattered; with it first, nothing is written
    for bad, err in ((b"missing", errors.NotFound), (b"short", errors.InvalidArgument),
                     (b"long", errors.InvalidArgument)):
        with pytest.raises(err):
            kt.get_blocks(tclient, lay, [bad, b"ok"], [3, 2])
        assert all(torch.equal(c, s) for c, s in zip(caches, snapshot)), bad
    # in a later chunk (calls of 4+ blocks come in >= 4 chunks): earlier blocks are written,
    # the failing one is not (documented: treat every destination as undefined on error)
    with pytest.raises(errors.InvalidArgument):
        kt.get_blocks(tclient, lay, [b"ok", b"ok", b"ok", b"short"], [10, 11, 12, 13])
    assert torch.equal(vllm_block(caches, 10), vllm_block(caches, 1))
    assert torch.equal(vllm_block(caches, 13), vllm_block(snapshot, 13))
    kt.get_blocks(tclient, lay, [b"ok"], [2])  # the connection is still in step
    assert torch.equal(vllm_block(caches, 2), vllm_block(caches, 1))


def test_layout_validation():
    c = vllm_caches()
    with pytest.raises(errors.InvalidArgument, match="no layers"):
        kt.KVLayout.vllm([])
    with pytest.raises(errors.InvalidArgument, match="torch.float32 but layer 0 K is torch.float16"):
        kt.KVLayout.vllm([c[0], c[1].float()])
    with pytest.raises(errors.InvalidArgument, match="is on meta but layer 0 K on cpu"):
        kt.KVLayout.vllm([c[0], torch.empty(c[1].shape, dtype=c[1].dtype, device="meta")])
    with pytest.raises(errors.InvalidArgument, match="only cpu and cuda"):
        kt.KVLayout.vllm([torch.empty(2, 4, 16, 2, 8, device="meta")])
    with pytest.raises(errors.InvalidArgument, match="has blocks"):
        kt.KVLayout.vllm([c[0], torch.zeros(2, NB, BS, H, D + 1, dtype=torch.float16)])
    with pytest.raises(errors.InvalidArgument, match="has blocks"):
        kt.KVLayout.vllm([c[0], torch.zeros(2, NB + 1, BS, H, D, dtype=torch.float16)])
    with pytest.raises(errors.InvalidArgument, match="is not"):
        kt.KVLayout.vllm([torch.zeros(3, NB, BS, H, D)])
    with pytest.raises(errors.InvalidArgument, match="is not"):
        kt.KVLayout.vllm([torch.zeros(NB, BS, H, D)])
    with pytest.raises(errors.InvalidArgument, match="torch.Tensor"):
        kt.KVLayout.vllm(["x"])
    ks, vs = sglang_buffers()
    with pytest.raises(errors.InvalidArgument, match="4 K buffers but 3 V buffers"):
        kt.KVLayout.sglang(ks, vs[:3], page_size=4)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(errors.InvalidArgument, match="page_size"):
            kt.KVLayout.sglang(ks, vs, page_size=bad)
    with pytest.raises(errors.InvalidArgument, match="no page"):
        kt.KVLayout.sglang(ks, vs, page_size=10_000)
    with pytest.raises(errors.InvalidArgument, match="heads, head_size"):
        kt.KVLayout.sglang([k[None] for k in ks], vs, page_size=4)
    with pytest.raises(errors.InvalidArgument, match="dtype|is torch"):
        kt.KVLayout.sglang(ks, [v.float() for v in vs], page_size=4)


# ================================================================ async

def test_async_variants(daemon):
    async def main():
        async with kvstore.AsyncClient(daemon.control, namespace="torch", timeout=10.0) as ac:
            t = rand((32, 8), torch.bfloat16, 1200)
            assert await kt.aput_tensor(ac, b"at", t) is True
            got = await kt.aget_tensor(ac, b"at", dtype=torch.bfloat16, shape=(32, 8))
            assert torch.equal(got, t)
            nc = torch.zeros(8, 64, dtype=torch.bfloat16)[:, ::2]
            await kt.aget_tensor_into(ac, b"at", nc.t())
            assert torch.equal(nc.t(), t)
            ts = [rand((100,), torch.float16, i) for i in range(5)] + [rand((10, 10), torch.int8, 9).t()]
            keys = [f"ab{i}" for i in range(len(ts))]
            assert await kt.abatch_put_tensors(ac, list(zip(keys, ts))) == [True] * len(ts)
            dests = [torch.empty_like(x) for x in ts]
            await kt.abatch_get_tensors_into(ac, keys, dests)
            assert all(torch.equal(a, b) for a, b in zip(ts, dests))
            with pytest.raises(errors.InvalidArgument):
                await kt.aget_tensor_into(ac, b"at", torch.zeros(3))

            caches = vllm_caches(seed=1300)
            lay = kt.KVLayout.vllm(caches)
            pool = kt.StagingPool(8 * MiB, chunk_bytes=2 * lay.block_nbytes)
            src = [1, 2, 3, 4, 5]
            keys = [f"ak{b}" for b in src]
            expect = [vllm_block(caches, b).clone() for b in src]
            assert await kt.aput_blocks(ac, lay, keys, src, pool=pool) == [True] * 5
            for c in caches:
                c.zero_()
            dst = [60, 61, 62, 63, 0]
            await kt.aget_blocks(ac, lay, keys, dst, pool=pool)
            assert all(torch.equal(vllm_block(caches, b), e) for b, e in zip(dst, expect))
            with pytest.raises(errors.InvalidArgument, match="twice"):
                await kt.aget_blocks(ac, lay, keys[:2], [7, 7])
            with pytest.raises(errors.NotFound):
                await kt.aget_blocks(ac, lay, [b"missing"], [7])

    asyncio.run(main())


# ================================================================ host memory registration

def test_register_host_memory_without_cuda():
    if CUDA:
        pytest.skip("this host has CUDA: test_cuda_register_host_memory covers it")
    buf = bytearray(64 * KiB)
    assert kt.register_host_memory(buf) is False  # documented no-op on CPU-only hosts
    assert kt.unregister_host_memory(buf) is False
    assert kt.register_host_memory(torch.zeros(16)) is False
    # bad arguments are reported even where registration would be a no-op
    with pytest.raises(errors.InvalidArgument):
        kt.register_host_memory(b"read-only bytes")
    with pytest.raises(errors.InvalidArgument):
        kt.register_host_memory(12345)  # an address needs nbytes
    with pytest.raises(errors.InvalidArgument):
        kt.register_host_memory("not a buffer")


# ================================================================ CUDA (skipped without a GPU)

cuda_only = pytest.mark.skipif(not CUDA, reason=NO_CUDA)


@cuda_only
def test_cuda_tensor_roundtrip(tclient):
    for dtype in DTYPES:
        t = rand((33, 65), dtype, 1400, device="cuda")
        assert kt.put_tensor(tclient, f"cu-{dtype}", t) is True
        assert tclient.get(f"cu-{dtype}") == raw(t)
        got = kt.get_tensor(tclient, f"cu-{dtype}", dtype=dtype, shape=(33, 65), device="cuda")
        assert got.is_cuda and torch.equal(got, t)
        nc = torch.zeros(65, 66, dtype=dtype, device="cuda")[:, ::2]
        kt.get_tensor_into(tclient, f"cu-{dtype}", nc.t())
        assert torch.equal(nc.t(), t)


@cuda_only
def test_cuda_batch_pipeline_and_pinned_pool(tclient):
    pool = kt.StagingPool(64 * MiB, chunk_bytes=64 * KiB)  # many chunks: the double-buffered path
    assert pool.pin_memory
    ts = [rand((128, 64), torch.float16, i, device="cuda") for i in range(24)]  # 16 KiB each
    keys = [f"cb{i}" for i in range(len(ts))]
    assert kt.batch_put_tensors(tclient, zip(keys, ts), pool=pool) == [True] * len(ts)
    dests = [torch.empty_like(t) for t in ts]
    kt.batch_get_tensors_into(tclient, keys, dests, pool=pool)
    assert all(torch.equal(a, b) for a, b in zip(ts, dests))
    with pool.lease(1 * MiB) as host:
        assert host.is_pinned()


@cuda_only
def test_cuda_vllm_blocks(tclient):
    caches = [c.cuda() for c in vllm_caches(seed=1500)]
    lay = kt.KVLayout.vllm(caches)
    pool = kt.StagingPool(64 * MiB, chunk_bytes=2 * lay.block_nbytes)
    src = list(range(0, 12))
    keys = [f"cv{b}" for b in src]
    expect = [vllm_block(caches, b).clone() for b in src]
    assert kt.put_blocks(tclient, lay, keys, src, pool=pool) == [True] * len(src)
    assert tclient.get(keys[3]) == raw(expect[3])
    for c in caches:
        c.zero_()
    dst = list(range(63, 51, -1))
    kt.get_blocks(tclient, lay, keys, dst, pool=pool)
    assert all(torch.equal(vllm_block(caches, b), e) for b, e in zip(dst, expect))
    # CPU cache <-> GPU cache interchange: same bytes
    cpu = vllm_caches(seed=1)
    kt.get_blocks(tclient, kt.KVLayout.vllm(cpu), keys[:1], [0])
    assert torch.equal(vllm_block(cpu, 0), expect[0].cpu())


@cuda_only
def test_cuda_sglang_pages(tclient):
    ks, vs = sglang_buffers(torch.bfloat16, seed=1600, page=4)
    ks, vs = [k.cuda() for k in ks], [v.cuda() for v in vs]
    lay = kt.KVLayout.sglang(ks, vs, page_size=4)
    expect = sglang_page(ks, vs, 9, 4).clone()
    kt.put_blocks(tclient, lay, [b"cs"], [9])
    for x in ks + vs:
        x.zero_()
    kt.get_blocks(tclient, lay, [b"cs"], [17])
    assert torch.equal(sglang_page(ks, vs, 17, 4), expect)


@cuda_only
def test_cuda_register_host_memory():
    import mmap
    m = mmap.mmap(-1, 4 * MiB)
    try:
        assert kt.register_host_memory(m) is True
        assert kt.register_host_memory(m) is True  # idempotent
        t = torch.frombuffer(m, dtype=torch.uint8)
        assert t.is_pinned()
        assert kt.unregister_host_memory(m) is True
        assert kt.unregister_host_memory(m) is False
        del t
    finally:
        m.close()


# ================================================================ throughput (reported, not asserted)

def test_blocks_throughput_cpu(start_daemon, capsys):
    """put_blocks / get_blocks of realistic 2 MiB blocks (32 layers x K,V x 16 tokens x
    8 heads x 128 dims, fp16), against raw batch_put / batch_get_into of 2 MiB buffers."""
    d = start_daemon("--dram-size", "1GiB")
    Ln, NBn = 32, 48
    caches = [torch.randn(2, NBn, 16, 8, 128, dtype=torch.float16) for _ in range(Ln)]
    lay = kt.KVLayout.vllm(caches)
    assert lay.block_nbytes == 2 * MiB
    n = 32
    gb = n * lay.block_nbytes / 1e9
    modes = ["tcp", "shm"] if _has_shm_param() else ["tcp"]
    lines = []
    for mode in modes:
        kw = {"shm": mode == "shm"} if _has_shm_param() else {}
        with kvstore.Client(d.control, namespace="bench", timeout=30.0, **kw) as c:
            if mode == "shm" and not getattr(c.info(), "shm_socket", ""):
                continue
            pool = kt.StagingPool()
            best_put = best_get = 0.0
            for it in range(3):
                keys = [f"{mode}-{it}-{i}".encode() for i in range(n)]
                t0 = time.perf_counter()
                kt.put_blocks(c, lay, keys, list(range(n)), pool=pool)
                t1 = time.perf_counter()
                kt.get_blocks(c, lay, keys, list(range(NBn - 1, NBn - 1 - n, -1)), pool=pool)
                t2 = time.perf_counter()
                best_put, best_get = max(best_put, gb / (t1 - t0)), max(best_get, gb / (t2 - t1))
            raw_bufs = [bytearray(lay.block_nbytes) for _ in range(n)]
            rk = [f"raw-{mode}-{i}".encode() for i in range(n)]
            t0 = time.perf_counter()
            c.batch_put(list(zip(rk, [memoryview(b) for b in raw_bufs])))
            t1 = time.perf_counter()
            c.batch_get_into(rk, raw_bufs)
            t2 = time.perf_counter()
            lines.append(f"{mode}: put_blocks {best_put:.2f} GB/s, get_blocks {best_get:.2f} GB/s "
                         f"(raw batch_put {gb / (t1 - t0):.2f}, batch_get_into {gb / (t2 - t1):.2f} GB/s; "
                         f"{n} x 2 MiB blocks, best of 3)")
            assert pool.stats()["allocations"] == 1  # one staging buffer for the whole run
            c.delete_all(namespace="bench")
    with capsys.disabled():
        print("\n  kvstore.torch CPU throughput: " + "\n  ".join(lines))


def test_layout_gather_scatter_methods_check_their_arguments():
    """KVLayout.gather_into / scatter_from / scatter_views copy with raw memcpy on CPU:
    ids and buffer sizes are checked first."""
    caches = vllm_caches(seed=1700)
    lay = kt.KVLayout.vllm(caches)
    bn = lay.block_nbytes
    buf = torch.empty(2 * bn, dtype=torch.uint8)
    lay.gather_into([1, 2], buf)
    assert bytes(buf[bn:].tolist()) == raw(vllm_block(caches, 2))
    for bad in ([NB], [-1], [1.5]):
        with pytest.raises(errors.InvalidArgument):
            lay.gather_into(bad, buf)
        with pytest.raises(errors.InvalidArgument):
            lay.scatter_from(bad, buf)
    with pytest.raises(errors.InvalidArgument, match="need"):
        lay.gather_into([1, 2, 3], buf)  # 3 blocks do not fit
    with pytest.raises(errors.InvalidArgument):
        lay.scatter_from([1], torch.empty(bn, dtype=torch.float16))
    with pytest.raises(errors.InvalidArgument):
        lay.scatter_views([1], [memoryview(bytes(100))])
    lay.scatter_views([5], [memoryview(bytes(buf[:bn].tolist()))])  # a read-only view
    assert torch.equal(vllm_block(caches, 5), vllm_block(caches, 1))
    lay.scatter_from([7, 8], buf)
    assert torch.equal(vllm_block(caches, 8), vllm_block(caches, 2))
