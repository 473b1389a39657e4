"""AsyncClient sends the requests of one loop iteration together (one writev) when others
are in flight (issue 11: 64 KiB at concurrency 8). Answers must still reach the right
caller, in any mix of puts and gets, with callers cancelled in the middle."""
from __future__ import annotations

import asyncio

import pytest

import kvstore

KiB = 1 << 10


def _val(i: int, n: int) -> bytes:
    return (i.to_bytes(4, "little") * (n // 4 + 1))[:n]


@pytest.fixture
def daemon(shared_daemon):
    """The module's tests share one kvstored, emptied before each (conftest.shared_daemon)."""
    return shared_daemon


def test_concurrent_mixed_requests_each_get_their_answer(daemon):
    async def main():
        async with kvstore.AsyncClient(daemon.control, namespace="co", timeout=10.0) as c:
            vals = {f"k{i}": _val(i, 64 * KiB + i) for i in range(32)}
            assert await asyncio.gather(*(c.put(k, v) for k, v in vals.items())) == [True] * 32
            for _ in range(3):  # gets, dedup puts and get_intos interleaved in one iteration
                bufs = {k: bytearray(len(v)) for k, v in vals.items()}
                coros = []
                for k, v in vals.items():
                    coros += [c.get(k), c.put(k, v), c.get_into(k, bufs[k])]
                got = await asyncio.gather(*coros)
                for j, (k, v) in enumerate(vals.items()):
                    assert got[3 * j] == v and got[3 * j + 1] is False
                    assert got[3 * j + 2] == len(v) and bufs[k] == v

    asyncio.run(main())


def test_cancelled_callers_leave_the_others_intact(daemon):
    async def main():
        async with kvstore.AsyncClient(daemon.control, namespace="co", timeout=10.0) as c:
            v = _val(7, 256 * KiB)
            await c.put("x", v)
            tasks = [asyncio.ensure_future(c.get("x")) for _ in range(16)]
            await asyncio.sleep(0)
            for t in tasks[::2]:  # half of them give up before or while their answer comes
                t.cancel()
            done = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(isinstance(d, asyncio.CancelledError) for d in done[::2])
            assert all(d == v for d in done[1::2])
            assert await c.get("x") == v  # the stream is still in step
            assert await c.ping() >= 0

    asyncio.run(main())
