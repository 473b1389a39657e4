"""get()'s receive pool (issue 11): a result is never refilled while anything holds it,
a dropped one is reused (no new allocation and page faults per object), the pool's bound
holds, and get_into stays zero-copy into the caller's buffer."""
from __future__ import annotations

import asyncio
import ctypes
import gc
import threading

import pytest

import kvstore
from kvstore.recvpool import MIN_POOLED, ReceivePool
from threadutil import run_threads

MiB = 1 << 20


def _val(i: int, n: int) -> bytes:
    return (i.to_bytes(4, "little") * (n // 4 + 1))[:n]


# ---------------------------------------------------------------- the pool alone

def test_held_buffers_are_never_handed_out_again():
    p = ReceivePool(64 * MiB)
    a = p.take(MiB)
    b = p.take(MiB)
    assert a is not b
    view = memoryview(a)[10:20]  # a view of a result holds it too
    del a
    c = p.take(MiB)
    assert c is not b and c is not view.obj
    arr = (ctypes.c_char * MiB).from_buffer(b)  # so does a foreign object exporting it
    bid = id(b)
    del b
    d = p.take(MiB)
    assert id(d) != bid and d is not view.obj
    del view, arr, c, d
    gc.collect()
    e = p.take(MiB)  # everything dropped: a buffer already faulted in comes back
    assert p.reused >= 1 and len(e) == MiB


def test_small_objects_and_zero_pool_are_plain_bytearrays():
    p = ReceivePool(64 * MiB)
    small = p.take(MIN_POOLED - 1)
    assert isinstance(small, bytearray) and p.held == 0
    off = ReceivePool(0)
    x = off.take(MiB)
    del x
    off.take(MiB)
    assert off.held == 0 and off.reused == 0
    with pytest.raises(ValueError):
        ReceivePool(-1)


def test_bound_holds_when_results_are_kept():
    p = ReceivePool(4 * MiB)
    kept = [p.take(MiB) for _ in range(10)]  # more than the pool may keep
    assert p.held == 4 * MiB
    assert all(len(k) == MiB for k in kept) and len({id(k) for k in kept}) == 10


def test_resized_result_is_dropped_not_reused():
    p = ReceivePool(8 * MiB)
    a = p.take(MiB)
    del a[100:]  # its owner shrank it, then dropped it
    del a
    b = p.take(MiB)
    assert len(b) == MiB and p.held == MiB


def test_concurrent_takes_never_share_a_buffer():
    p = ReceivePool(64 * MiB)
    seen: list = []
    lock = threading.Lock()

    def worker(_: int) -> None:
        for _ in range(50):
            b = p.take(MIN_POOLED)
            with lock:
                assert all(b is not x for x in seen)  # no held buffer is handed out twice
                seen.append(b)
            with lock:
                seen.remove(b)

    run_threads(worker, range(4), timeout=30)  # an assert inside a worker fails the test


# ---------------------------------------------------------------- through a real daemon

@pytest.fixture
def daemon(shared_daemon):
    """The module's tests share one kvstored, emptied before each (conftest.shared_daemon)."""
    return shared_daemon


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_get_results_kept_and_dropped(daemon, transport):
    with kvstore.Client(daemon.control, namespace="pool", timeout=10.0, transport=transport) as c:
        vals = [_val(i, MiB) for i in range(6)]
        c.batch_put([(f"k{i}", v) for i, v in enumerate(vals)])
        kept = [c.get(f"k{i}") for i in range(6)]  # all held: six distinct buffers
        assert [bytes(k) for k in kept] == vals
        assert len({id(k) for k in kept}) == 6
        first = kept[0]
        del kept
        r0 = c._pool.reused
        for _ in range(20):  # each result dropped before the next: the pool serves them all
            g = c.get("k1")
            assert g == vals[1]
        assert c._pool.reused - r0 >= 19
        assert first == vals[0]  # a result still held was never refilled
        got = c.batch_get(["k2", "k3"])
        assert got == [vals[2], vals[3]] and got[0] is not got[1]
        buf = bytearray(MiB)
        assert c.get_into("k4", buf) == MiB and buf == vals[4]  # into the caller's buffer


def test_async_get_uses_the_pool(daemon):
    async def main():
        async with kvstore.AsyncClient(daemon.control, namespace="pool", timeout=10.0) as c:
            await c.put("a", _val(7, MiB))
            held = await c.get("a")
            for _ in range(5):
                assert await c.get("a") == _val(7, MiB)
            assert held == _val(7, MiB)
            got = await asyncio.gather(*(c.get("a") for _ in range(4)))
            assert len({id(g) for g in got}) == 4
            return c._pool.reused
    assert asyncio.run(main()) >= 3
