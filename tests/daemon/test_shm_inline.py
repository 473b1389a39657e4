"""Small gets on the shm socket travel inside the frames (issue 11: shm never slower
than TCP at 64 KiB): a get_into of one object up to SHM_INLINE_MAX uses OP_GET over
the Unix socket; larger ones and batches use the arena, and puts of every size go
through the arena (one SHM_PUT per put once the connection holds a credit)."""
from __future__ import annotations

import threading

import pytest

import kvstore
from kvstore.client import SHM_INLINE_MAX
from kvstore.errors import Conflict, InvalidArgument, NotFound


def _val(i: int, n: int) -> bytes:
    return (i.to_bytes(4, "little") * (n // 4 + 1))[:n]


@pytest.fixture
def daemon(shared_daemon):
    """The module's tests share one kvstored, emptied before each (conftest.shared_daemon)."""
    return shared_daemon


@pytest.fixture
def pair(daemon):
    shm = kvstore.Client(daemon.control, namespace="inl", timeout=10.0, transport="shm")
    tcp = kvstore.Client(daemon.control, namespace="inl", timeout=10.0, transport="tcp")
    yield shm, tcp
    shm.close()
    tcp.close()


@pytest.mark.parametrize("size", [0, 1, 4096, 64 << 10, SHM_INLINE_MAX, SHM_INLINE_MAX + 1, 1 << 20])
def test_round_trip_every_size(pair, size):
    shm, tcp = pair
    v = _val(size, size)
    assert shm.put(f"k{size}", v) is True
    assert shm.transport == "shm"
    assert tcp.get(f"k{size}") == v
    buf = bytearray(max(size, 1))
    assert shm.get_into(f"k{size}", buf) == size and buf[:size] == v
    assert shm.put(f"k{size}", v) is False  # dedup answered on the inline path too
    with pytest.raises(Conflict):
        shm.put(f"k{size}", _val(size + 1, size) if size else b"x")


def test_batches_mixed_and_errors(pair):
    shm, tcp = pair
    small = [(f"s{i}", _val(i, 64 << 10)) for i in range(40)]  # two windows: 32 + 8
    assert shm.batch_put(small) == [True] * 40
    bufs = [bytearray(64 << 10) for _ in small]
    assert shm.batch_get_into([k for k, _ in small], bufs) == [64 << 10] * 40
    assert [bytes(b) for b in bufs] == [v for _, v in small]
    # a missing key and a too-small buffer in a small batch: typed errors, stream in step
    with pytest.raises(NotFound):
        shm.batch_get_into(["s0", "nope", "s1"], [bytearray(64 << 10)] * 3)
    with pytest.raises(InvalidArgument):
        shm.batch_get_into(["s0"], [bytearray(100)])
    assert shm.get_into("s2", bufs[0]) == 64 << 10 and bytes(bufs[0]) == small[2][1]
    assert tcp.get("s3") == small[3][1]


def test_concurrent_threads_share_nothing(pair, daemon):
    errors: list = []

    def worker(j: int) -> None:
        try:
            with kvstore.Client(daemon.control, namespace="inl", timeout=10.0, transport="shm") as c:
                buf = bytearray(64 << 10)
                for r in range(20):
                    v = _val(j * 1000 + r, 64 << 10)
                    c.put(f"t{j}-{r}", v)
                    assert c.get_into(f"t{j}-{r}", buf) == len(v) and buf == v
        except Exception as e:  # reported below
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(j,)) for j in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors, errors
