"""AsyncClient times its calls out with one timer per connection, armed at the earliest
deadline of the calls in flight (issue 11, H4: a timer per call cost ~3 us per request).
Every call must still fail at its own deadline, also one made later with a shorter timeout,
and a call whose answer was cut off in its payload must fail at once, not at its deadline.

The daemon is real: it is stopped (SIGSTOP) to keep answers from coming, and a relay
between the SDK and its data port cuts a connection mid-payload (a faulty network)."""
from __future__ import annotations

import asyncio
import signal
import time

import kvstore
from kvstore import errors
from test_verify_stream import PAYLOAD_AT, Relay

KiB = 1 << 10
MiB = 1 << 20


def _val(seed: int, n: int) -> bytes:
    return (seed.to_bytes(4, "little") * (n // 4 + 1))[:n]


async def _timed(coro) -> tuple[object, float]:
    t0 = time.monotonic()
    try:
        res = await coro
    except errors.KVStoreError as e:
        res = e
    return res, time.monotonic() - t0


def test_each_call_times_out_at_its_own_deadline(daemon):
    async def main():
        async with kvstore.AsyncClient(daemon.control, namespace="pt", timeout=6.0) as c:
            v = _val(1, 64 * KiB)
            assert await c.put("k", v) is True
            daemon.proc.send_signal(signal.SIGSTOP)
            try:
                # deadline in 6 s: far enough from the later calls' 0.5 s that a loaded
                # machine cannot blur the two
                slow = asyncio.ensure_future(_timed(c.get("k")))
                await asyncio.sleep(0.05)
                c.timeout = 0.5  # later calls: an earlier deadline than the one armed
                late_buf = bytearray(64 * KiB)
                fast = await asyncio.gather(_timed(c.get_into("k", late_buf)),
                                            _timed(c.put("k2", v)), _timed(c.get("k")))
                for res, took in fast:
                    assert isinstance(res, errors.Timeout), res
                    assert 0.4 <= took < 5.0, took
                assert not slow.done()  # its own, later deadline still stands
                res, took = await asyncio.wait_for(slow, 14)
                assert isinstance(res, errors.Timeout) and 5.5 <= took < 12, (res, took)
            finally:
                daemon.proc.send_signal(signal.SIGCONT)
            c.timeout = 10.0
            # the late answers are dropped: a timed-out get_into's buffer is never written,
            # and the same connection (or a fresh one) answers the next calls correctly
            assert await c.get("k") == v
            assert late_buf == bytes(64 * KiB)
            assert await asyncio.gather(*(c.get("k") for _ in range(16))) == [v] * 16
            assert await c.put("k3", v) is True and await c.get("k3") == v

    asyncio.run(main())


def test_many_calls_in_flight_all_time_out(daemon):
    """Concurrent callers behind one stopped daemon: each gets Timeout, none waits longer."""
    async def main():
        async with kvstore.AsyncClient(daemon.control, namespace="pt", timeout=0.6) as c:
            await c.put("k", b"x" * 100)
            daemon.proc.send_signal(signal.SIGSTOP)
            try:
                got = await asyncio.wait_for(asyncio.gather(*(_timed(c.get("k")) for _ in range(64))), 10)
            finally:
                daemon.proc.send_signal(signal.SIGCONT)
            assert all(isinstance(r, errors.Timeout) and t < 3.0 for r, t in got), got[:3]
            c.timeout = 10.0
            assert await c.get("k") == b"x" * 100

    asyncio.run(main())


def test_answer_cut_in_its_payload_fails_at_once(daemon):
    """The connection ends while a get's payload arrives: the call fails with a typed
    Unavailable well before its deadline (the waiter had already left the table of calls
    in flight, so only the timer would have ended it), and the client recovers."""
    relay = Relay(("127.0.0.1", daemon.data_port))
    try:
        relay.cut = PAYLOAD_AT + 1000  # after the PING's answer, the get's header, 1000 bytes
        v = _val(3, 1 * MiB)

        async def main():
            async with kvstore.AsyncClient(daemon.control, namespace="pt", timeout=20.0,
                                           data_address=f"127.0.0.1:{relay.port}") as c:
                with kvstore.Client(daemon.control, namespace="pt", transport="tcp") as sc:
                    sc.put("big", v)  # stored around the relay
                buf = bytearray(1 * MiB)
                for call in (c.get("big"), c.get_into("big", buf)):
                    res, took = await _timed(call)
                    assert isinstance(res, errors.Unavailable) and took < 10, (res, took)
                relay.cut = None  # the network heals: new connections pass everything
                assert await c.get("big") == v
                assert await c.get_into("big", buf) == len(v) and buf == v

        asyncio.run(main())
    finally:
        relay.close()


def test_answers_of_mixed_sizes_after_large_ones_stay_in_step(daemon):
    """After a large answer the client reads headers a few KiB at a time (aio._WINDOW):
    answers of every size around that window and the large-payload threshold, errors and
    put acknowledgements, interleaved at concurrency, still reach the right callers whole."""
    from kvstore import aio

    sizes = [1, 39, 40, 41, aio._WINDOW - 40, aio._WINDOW, aio._WINDOW + 1, aio._LARGE - 1,
             aio._LARGE, 64 * KiB, 1 * MiB + 3]

    async def main():
        async with kvstore.AsyncClient(daemon.control, namespace="pw", timeout=20.0) as c:
            vals = {f"s{n}": _val(n, n) for n in sizes}
            assert await asyncio.gather(*(c.put(k, v) for k, v in vals.items())) == [True] * len(vals)
            for rnd in range(3):
                order = list(vals.items())[rnd::1] + list(vals.items())[:rnd]
                bufs = {k: bytearray(len(v)) for k, v in order}
                coros = []
                for k, v in order:
                    coros += [c.get(k), c.get_into(k, bufs[k]), c.get("missing-" + k), c.put(k, v)]
                got = await asyncio.gather(*coros, return_exceptions=True)
                for j, (k, v) in enumerate(order):
                    g, n, miss, dup = got[4 * j:4 * j + 4]
                    assert g == v and n == len(v) and bufs[k] == v, k
                    assert isinstance(miss, errors.NotFound), miss
                    assert dup is False  # stored already: deduplicated
            # many small answers in one batch right after a large one
            big = await c.get(f"s{1 * MiB + 3}")
            assert big == vals[f"s{1 * MiB + 3}"]
            small = await c.batch_get(["s1", "s39", "s40", "s41"] * 50)
            assert small == [vals[k] for k in ["s1", "s39", "s40", "s41"] * 50]

    asyncio.run(main())
