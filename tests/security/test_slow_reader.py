"""A client that asks for large objects and never reads its socket (issue 11).

A get's payload is queued as a view of the arena, not a copy, and the objects stay
referenced until their bytes leave; so a reader that never drains must cost the
daemon neither memory nor other clients' service, and is closed after
``write_stall_timeout`` (which releases its references). Real kvstored, real sockets.
"""
from __future__ import annotations

import os
import socket
import time

import kvstore
from kvstore.wire import OP_GET, encode_request

from test_hostile import GoodClient, rss, stats, wait_for

KiB, MiB = 1 << 10, 1 << 20


def test_reader_that_never_drains_large_gets(start_daemon, tmp_path):
    cfg = tmp_path / "slow-reader.toml"
    cfg.write_text("[server]\nwrite_stall_timeout = 2\n")
    d = start_daemon("--config", str(cfg))  # 64 MiB arena, 4 MiB values
    pid = d.info["pid"]
    value = os.urandom(4 * MiB)
    with kvstore.Client(d.control, namespace="big", shm=False, transport="tcp") as c:
        c.put(b"obj", value)
    good = GoodClient(d)
    base = good.baseline()
    rss0 = rss(pid)
    # 4 connections each pipeline 64 gets of the 4 MiB object (1 GiB of answers asked
    # for) and read nothing; small receive buffers so the kernel holds little of it
    socks = []
    for _ in range(4):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KiB)
        s.bind(("127.0.0.2", 0))
        s.settimeout(5)
        s.connect(("127.0.0.1", d.data_port))
        s.sendall(b"".join(encode_request(OP_GET, i + 1, b"big", b"obj") for i in range(64)))
        socks.append(s)
    peak = rss0
    t0 = time.monotonic()
    try:
        good.start()
        end = time.monotonic() + 3.0
        while time.monotonic() < end:  # sample the daemon's memory while they stall
            peak = max(peak, rss(pid))
            time.sleep(0.02)
        closed = wait_for(lambda: stats(d).get("closed_write_stalled", 0) >= 4, 8,
                          "the stalled readers were closed")
        assert closed and time.monotonic() - t0 < 10
        good.beside()
    finally:
        good.stop()
        for s in socks:
            s.close()
    assert d.alive()
    good.check(base)
    good.readable()
    grew = peak - rss0
    print(f"\n4 readers x 64 pipelined 4 MiB gets, never read: daemon RSS {rss0 / MiB:.0f} -> "
          f"peak {peak / MiB:.0f} MiB (+{grew / MiB:.1f}); good client worst "
          f"{max(good.lat) * 1e3:.1f} ms (usual {base * 1e3:.1f} ms)")
    # queued answers are arena views: no copy of the 1 GiB asked for is ever made
    assert grew < 24 * MiB, f"daemon grew by {grew / MiB:.0f} MiB"
    # their read references were released: a delete frees the object's slot at once
    # (a slot still referenced is freed only when the last reference goes)
    with kvstore.Client(d.control, namespace="big", shm=False, transport="tcp") as c:
        assert c.get(b"obj") == value
        used = dram_used(c)
        assert c.delete([b"obj"]) == 1
        assert used - dram_used(c) >= 4 * MiB
    good.close()


def dram_used(c) -> int:
    (dram,) = [t for t in c.stats().tiers if t.name == "dram"]
    return dram.used_bytes
