"""Limits against abuse on the data path: connections per client, unanswered requests
per connection, and bytes queued per connection (also over TLS, where queued responses
are encrypted copies rather than views of the arena)."""
from __future__ import annotations

import asyncio
import socket
import time

import kvstore
from kvstore import errors
from kvstore.wire import OP_GET, OP_PING, encode_request

from secutil import client_tls, counters, response, token

KiB, MiB = 1 << 10, 1 << 20


def test_connections_per_client(secure_daemon):
    d = secure_daemon(tls=False, auth=False, server={"max_connections_per_client": 3})
    socks = [socket.create_connection(("127.0.0.1", d.data_port), timeout=10) for _ in range(3)]
    try:
        for i, s in enumerate(socks):
            s.sendall(encode_request(OP_PING, i + 1, b"", b""))
            assert response(s)[:2] == (i + 1, 0)
        with socket.create_connection(("127.0.0.1", d.data_port), timeout=10) as extra:
            rid, status, msg = response(extra)
            assert status == errors.Unavailable.code and b"max 3 per client" in msg
        socks.pop().close()
        deadline = time.monotonic() + 10  # the daemon notices the close asynchronously
        while True:
            s = socket.create_connection(("127.0.0.1", d.data_port), timeout=10)
            s.sendall(encode_request(OP_PING, 9, b"", b""))
            rid, status, _ = response(s)
            if status == 0:
                socks.append(s)
                break
            s.close()
            assert time.monotonic() < deadline, "a freed connection slot was never reused"
            time.sleep(0.05)
    finally:
        for s in socks:
            s.close()
    assert counters(d, tls=False)["rejected_connections_per_client"] >= 1


def test_pipelined_requests_are_bounded_not_refused(secure_daemon):
    # 4 unanswered requests and 1 MiB of queued responses per connection at most: a client
    # pipelining far more is slowed down (the daemon stops reading), never refused or stuck
    d = secure_daemon(tls=False, auth=False,
                      server={"max_pipelined_requests": 4, "max_inflight_bytes": '"1MiB"'})
    value = bytes(range(256)) * (256 * KiB // 256)
    with kvstore.Client(d.control, namespace="t", timeout=10) as c:
        c.put(b"v", value)
    with socket.create_connection(("127.0.0.1", d.data_port), timeout=20) as s:
        n = 300  # 300 x 256 KiB = 75 MiB of answers to one burst of requests
        s.sendall(b"".join(encode_request(OP_GET, i + 1, b"t", b"v") for i in range(n)))
        seen = set()
        for _ in range(n):
            rid, status, body = response(s)
            assert status == 0 and body == value
            seen.add(rid)
        assert seen == set(range(1, n + 1))

    async def run():
        async with kvstore.AsyncClient(d.control, namespace="t", timeout=20) as c:
            got = await c.batch_get([b"v"] * 200)
            assert all(bytes(g) == value for g in got)

    asyncio.run(asyncio.wait_for(run(), 60))
    assert counters(d, tls=False)["pipeline_limit_pauses"] >= 1


def test_large_pipelined_gets_over_tls(secure_daemon, certs):
    # more than the per-connection TLS queue (8 MiB) in one burst of requests
    d = secure_daemon()
    objs = {f"o{i}": bytes([i]) * MiB for i in range(24)}

    async def run():
        async with kvstore.AsyncClient(d.control, namespace="team-a", timeout=30,
                                       tls=client_tls(certs), token=token("rw")) as c:
            await c.batch_put(list(objs.items()))
            for _ in range(2):
                got = await c.batch_get(list(objs) * 2)
                assert [bytes(g) for g in got] == list(objs.values()) * 2

    asyncio.run(asyncio.wait_for(run(), 120))
