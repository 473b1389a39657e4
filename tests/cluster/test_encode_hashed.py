"""layout.encode_hashed: encode_parts' records plus the checksum of each whole record
(what ClusterClient's fanned-out put sends as the PUT frame's checksum without hashing the
record again). Same headers and payloads as encode_parts, and checksums equal to hashing
header + payload, on the ISA-L path and without it (liberasurecode / pyeclib), for
fragments and for the whole copies of objects under min_ec_size, for every buffer kind;
threads at once. Pure layout (no daemon)."""
from __future__ import annotations

import array
import os

import pytest
from threadutil import run_threads

pytest.importorskip("pyeclib")

from kvstore import layout  # noqa: E402
from kvstore.layout import Policy, encode_hashed, encode_parts  # noqa: E402
from kvstore.wire import checksum  # noqa: E402

POLICIES = ["ec:4+2", "ec:3+2", "ec:8+4", "ec:2+5", "ec:1+1"]
MIN_EC = 256 << 10


def sizes_for(k: int) -> list[int]:
    return sorted({1, k - 1 or 1, k, k + 1, 4095, MIN_EC - 1, MIN_EC, MIN_EC + 3, (1 << 20) + 7})


def check(p: Policy, value, min_ec: int = MIN_EC) -> list:
    got = encode_hashed(p, value, min_ec)
    want = encode_parts(p, value, min_ec)
    assert len(got) == len(want) == (p.n if len(value) >= min_ec else p.m + 1)
    for (h, b, c), (h2, b2) in zip(got, want):
        assert h == h2 and bytes(b) == bytes(b2)
        assert c == checksum(h + bytes(b))
    return got


@pytest.mark.parametrize("policy", POLICIES)
def test_checksums_of_the_records_encode_parts_makes(policy):
    p = Policy.parse(policy)
    for n in sizes_for(p.k):
        check(p, memoryview(os.urandom(n)))


@pytest.mark.parametrize("policy", ["ec:4+2", "ec:8+4"])
def test_without_isal_the_same(policy, monkeypatch):
    """The path that does not reach ISA-L (pyeclib's fragments) gives the same records and
    checksums as the ISA-L one (split elsewhere: there the liberasurecode header is the
    payload's start, here the header's end)."""
    p = Policy.parse(policy)
    values = [os.urandom(n) for n in sizes_for(p.k)]
    with_isal = [encode_hashed(p, memoryview(v), MIN_EC) for v in values]
    monkeypatch.setattr(layout.codec(p), "isal", None)
    for v, before in zip(values, with_isal):
        after = check(p, memoryview(v))
        assert [(h + bytes(b), c) for h, b, c in after] == [(h + bytes(b), c) for h, b, c in before]


def test_every_buffer_kind():
    """bytes, bytearray, a read-only view, a view of another item size, an offset slice."""
    p = Policy.parse("ec:4+2")
    raw = os.urandom(MIN_EC + 4099)
    base = check(p, memoryview(raw))
    arr = array.array("I", raw[:(len(raw) // 4) * 4])
    for v in (raw, bytearray(raw), memoryview(raw).toreadonly(), memoryview(bytearray(raw))):
        got = check(p, v)
        assert [c for *_x, c in got] == [c for *_x, c in base]
    check(p, memoryview(arr))
    check(p, memoryview(raw)[3:])


def test_empty_and_tiny_objects_are_whole_copies():
    p = Policy.parse("ec:4+2")
    for v in (b"", b"x", os.urandom(1000)):
        got = check(p, memoryview(v))
        assert all(bytes(b) == v for _h, b, _c in got)


def test_threads_at_once():
    """Eight threads hashing different objects through the one shared codec."""
    p = Policy.parse("ec:4+2")

    def run(seed: int) -> None:
        for i in range(6):
            check(p, memoryview(os.urandom(MIN_EC + seed * 1000 + i)))
    run_threads(run, range(8))
