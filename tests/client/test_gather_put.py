"""A put's value given as several buffers (e.g. an erasure-code header and its fragment):
sent gathered on TCP, stored as their concatenation on every transport, checksummed
as if joined. Real daemons on 127.0.0.1; RDMA through the verbs twin."""
from __future__ import annotations

import asyncio
import os
import random

import pytest

import kvstore
from kvstore import errors
from kvstore.wire import checksum, checksum_parts
from threadutil import run_threads

KiB, MiB = 1 << 10, 1 << 20


def parts_of(seed: int, *sizes: int) -> list[bytes]:
    rnd = random.Random(seed)
    return [rnd.randbytes(n) for n in sizes]


def test_checksum_parts_equals_checksum_of_concatenation():
    for sizes in [(0,), (1,), (40, 0, 300 * KiB), (0, 0), (17, 1, 2, 3, 64 * KiB)]:
        ps = parts_of(len(sizes), *sizes)
        assert checksum_parts(ps) == checksum(b"".join(ps))
        assert checksum_parts([memoryview(p) for p in ps]) == checksum(b"".join(ps))


@pytest.fixture(params=["tcp", "shm", "rdma"])
def any_client(request, module_daemons, monkeypatch):
    """A client on each transport, beside a plain TCP one; the daemons are the module's
    (emptied before each test: conftest.module_daemons)."""
    if request.param == "rdma":
        monkeypatch.setenv("KVSTORE_RDMA_VERBS", "twin")
        monkeypatch.delenv("KVSTORE_TWIN_LINK_BPS", raising=False)
        d = module_daemons("twin", env={"KVSTORE_RDMA_VERBS": "twin"})
    else:
        d = module_daemons()
    with kvstore.Client(d.control, namespace="gather", timeout=10.0, transport=request.param) as c:
        assert c.transport == request.param
        with kvstore.Client(d.control, namespace="gather", timeout=10.0, transport="tcp") as plain:
            yield c, plain


@pytest.mark.parametrize("sizes", [(64, 1 * MiB), (0, 5), (7, 0), (16, 100 * KiB, 3), (0, 0)])
def test_put_of_parts_stores_the_concatenation(any_client, sizes):
    c, plain = any_client
    ps = parts_of(sum(sizes), *sizes)
    whole = b"".join(ps)
    key = f"g{sizes}"
    assert c.put(key, tuple(ps)) is True
    assert plain.get(key) == whole
    assert c.get(key) == whole
    # the same bytes in one buffer are the same object: deduplicated, not a Conflict
    assert c.put(key, whole) is False
    assert plain.put(key, list(ps)) is False
    # a different split of different bytes is a Conflict like any other value
    with pytest.raises(errors.Conflict):
        c.put(key, (b"x", whole))


def test_batch_put_mixes_single_buffers_and_parts(any_client):
    c, plain = any_client
    items, expect = [], {}
    for i in range(70):  # more than one window (WINDOW = 32)
        if i % 3 == 0:
            ps = parts_of(i, 40, 4 * KiB + i)
            items.append((f"b{i}", tuple(ps)))
            expect[f"b{i}"] = b"".join(ps)
        else:
            v = os.urandom(i * 100)
            items.append((f"b{i}", memoryview(v)))
            expect[f"b{i}"] = v
    assert c.batch_put(items) == [True] * 70
    keys = list(expect)
    assert plain.batch_get(keys) == [expect[k] for k in keys]


def test_parts_are_not_joined_or_changed(module_daemons):
    d = module_daemons()
    with kvstore.Client(d.control, namespace="gather", timeout=10.0, transport="tcp") as c:
        head = bytearray(b"H" * 48)
        frag = memoryview(bytearray(os.urandom(2 * MiB)))
        before = bytes(frag)
        assert c.put("big", (head, frag)) is True
        assert bytes(frag) == before and head == b"H" * 48
        out = bytearray(2 * MiB + 48)
        assert c.get_into("big", out) == 2 * MiB + 48
        assert out == b"H" * 48 + before


def test_bad_parts_are_typed_errors(module_daemons):
    d = module_daemons()
    with kvstore.Client(d.control, namespace="gather", timeout=10.0, transport="tcp") as c:
        with pytest.raises(errors.InvalidArgument, match="buffer protocol"):
            c.put("k", (b"ok", 12))
        with pytest.raises(errors.InvalidArgument, match="buffer protocol"):
            c.put("k", [1, 2, 3])
        # the limit applies to the total, not to each part
        with pytest.raises(errors.InvalidArgument, match="max_value_size"):
            c.put("k", (bytes(3 * MiB), bytes(2 * MiB)))
        with pytest.raises(errors.NotFound):
            c.get("k")


def test_concurrent_gathered_puts_from_threads(module_daemons):
    d = module_daemons()
    with kvstore.Client(d.control, namespace="gather", timeout=10.0, transport="tcp") as c:
        def work(t: int) -> None:
            for i in range(20):
                ps = parts_of(t * 100 + i, 32, 20 * KiB)
                c.put(f"t{t}-{i}", ps)
                assert c.get(f"t{t}-{i}") == b"".join(ps)

        run_threads(work, range(4), timeout=60)


def test_async_client_puts_parts(module_daemons):
    d = module_daemons()

    async def main():
        async with kvstore.AsyncClient(d.control, namespace="gather", timeout=10.0) as ac:
            ps = parts_of(9, 24, 300 * KiB)
            assert await ac.put("a", tuple(ps)) is True
            assert await ac.batch_put([("b", ps), ("c", b"plain")]) == [True, True]
            assert await ac.get("a") == b"".join(ps)
            assert await ac.get("b") == b"".join(ps)
            with pytest.raises(errors.InvalidArgument):
                await ac.put("d", (b"x", object()))

    asyncio.run(main())
