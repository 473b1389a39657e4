"""Hostile and broken clients, round 2: what a client can still hold once it is gone or
once the process runs short of descriptors. Each test starts a real kvstored and is
bounded in time (waits on conditions, never on fixed sleeps)."""
from __future__ import annotations

import os
import socket
import time

import pytest

import kvstore
from kvstore import errors
from kvstore.shm import ShmConnection
from kvstore.wire import OP_PUT, OP_SHM_RESERVE, encode_request

from test_hostile import GoodClient, connect_from, hostile_daemon, stats, wait_for  # noqa: F401

KiB, MiB = 1 << 10, 1 << 20


def _fill_and_pin(d, n: int, size: int) -> list[bytes]:
    """Put ``n`` objects of ``size`` bytes (the tests' arena holds 16 of 4 MiB) and pin
    them all: nothing is evictable, so the next put finds no space and waits."""
    keys = [b"full-%d" % i for i in range(n)]
    with kvstore.Client(d.control, namespace="full", timeout=10, shm=False, transport="tcp") as c:
        for k in keys:
            c.put(k, os.urandom(size))
        kept = [k for k in keys if c.exists([k])[0]]
        assert c.pin(kept, ttl=120) == len(kept)
    return kept


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_put_waiting_for_space_ends_when_its_client_disconnects(hostile_daemon, transport):
    # A full node (every object pinned), a put that waits for space (put_wait_timeout
    # 30 s here: the wait can only end early by noticing the close), its client closes.
    # The wait ends within a few polls, nothing is reserved for it, and once space frees
    # no object is evicted for the dead put; other clients are served meanwhile.
    d = hostile_daemon({"engine": {"put_wait_timeout": 30}})
    kept = _fill_and_pin(d, 16, 4 * MiB)
    before = stats(d)
    assert before.get("reservations", 0) == 0
    good = kvstore.Client(d.control, namespace="full", timeout=10, shm=False, transport="tcp")
    try:
        if transport == "tcp":
            s = connect_from("127.0.0.2", d.data_port)
            # the header and part of the payload: the rest is never sent
            s.sendall(encode_request(OP_PUT, 1, b"dead", b"waits", 4 * MiB, 0) + bytes(64 * KiB))
        else:
            s = ShmConnection(d.shm_path, 10)
            s.send([encode_request(OP_SHM_RESERVE, s.next_id(), b"dead", b"waits", 4 * MiB, 0, 0, 0)])
        wait_for(lambda: stats(d).get("no_space", 0) > before.get("no_space", 0), 10,
                 "the put found no space (it waits)")
        assert good.get(kept[0]) is not None  # a get is served beside the waiting put
        t0 = time.monotonic()
        s.close()
        wait_for(lambda: stats(d).get("put_waits_ended_by_disconnect", 0) == 1, 15,
                 "the waiting put ended when its client closed")
        assert time.monotonic() - t0 < 25, "ended by put_wait_timeout, not by the close"
        after = stats(d)
        assert after.get("reservations", 0) == 0 and after.get("reserved_bytes", 0) == 0
        # space frees: a put that still waited would now evict a pinned-no-more object
        assert good.unpin(kept) == len(kept)
        # a good put needs one eviction: exactly one (none for the dead put)
        good.put(b"after", os.urandom(4 * MiB))
        end = stats(d)
        assert end.get("evictions", 0) - after.get("evictions", 0) <= 1
        assert end.get("objects", 0) == len(kept)  # one evicted, one added
        assert end.get("reservations", 0) == 0
        with kvstore.Client(d.control, namespace="dead", timeout=10, shm=False, transport="tcp") as c:
            with pytest.raises(errors.NotFound):
                c.get(b"waits")
        assert "client disconnected while its put waited for space" in d.log()
    finally:
        good.close()
    assert d.alive()
