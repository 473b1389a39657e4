"""layout.assemble's healthy path: data fragments 0..K-1 concatenated and checked once,
by the object checksum, without hashing each record first; anything that does not check
out (a corrupt, truncated or foreign record, two versions, a whole copy) goes through the
path that verifies every record. Pure layout: no daemon is involved."""
from __future__ import annotations

import os

import pytest

pytest.importorskip("pyeclib")

from kvstore import errors, layout
from kvstore.layout import FRAG_HEADER, Policy, assemble, encode_records

P = Policy.parse("ec:4+2")
MIB = 1 << 20


@pytest.fixture
def obj():
    v = os.urandom(MIB + 13)
    return v, encode_records(P, v, 256 << 10)


def counting_checksum(monkeypatch) -> list[int]:
    """Count layout's checksum calls (the bytes each hashed)."""
    seen: list[int] = []
    real = layout.checksum

    def counted(buf):
        seen.append(len(buf))
        return real(buf)
    monkeypatch.setattr(layout, "checksum", counted)
    return seen


def test_healthy_read_hashes_the_object_once(obj, monkeypatch):
    v, recs = obj
    seen = counting_checksum(monkeypatch)
    assert assemble(P, recs[:4]) == v
    assert seen == [len(v)]  # the object checksum only, no per-record pass
    seen.clear()
    out = bytearray(len(v) + 5)
    assert assemble(P, [recs[3], recs[1], recs[0], recs[2]], out) == len(v) and out[:len(v)] == v
    assert seen == [len(v)]


def test_corrupt_data_fragment_falls_back_and_is_never_served(obj, monkeypatch):
    """A record with a valid header and one payload byte flipped (stored under its own
    node checksum, so the wire check passed): the object check fails, every record is
    verified, the bad one is dropped and the object decoded from parity."""
    v, recs = obj
    bad = bytearray(recs[1])
    bad[FRAG_HEADER.size + 80 + 1000] ^= 0x20  # inside the object's bytes
    calls = []
    c = layout.codec(P)
    if c.isal is not None:  # ISA-L decodes into the buffer (test_ec_isal.py); else pyeclib
        real_isal = c.isal.decode_into
        monkeypatch.setattr(c.isal, "decode_into",
                            lambda frags, n, t: calls.append(len(frags)) or real_isal(frags, n, t))
        want_calls = [5]  # every valid fragment offered; K of them used
    else:
        real = c.decode
        monkeypatch.setattr(c, "decode", lambda frags: calls.append(len(frags)) or real(frags))
        want_calls = [4]
    got = [recs[0], bytes(bad), recs[2], recs[3], recs[4], recs[5]]
    assert assemble(P, got) == v and calls == want_calls
    out = bytearray(len(v))
    assert assemble(P, got, out) == len(v) and out == v
    # without parity to replace it: no object at all, never the corrupt bytes
    assert assemble(P, got[:4]) is None


def test_truncated_foreign_and_malformed_records(obj):
    v, recs = obj
    short = recs[2][:len(recs[2]) // 2]  # valid header, payload cut in half
    assert assemble(P, [recs[0], recs[1], short, recs[3], recs[4]]) == v  # decoded without it
    other = encode_records(Policy.parse("ec:3+2"), v, 256 << 10)  # another policy's records
    assert assemble(P, other[:3] + recs[:4]) == v
    junk = [None, b"", b"KVEC", b"\x00" * FRAG_HEADER.size, errors.NotFound("gone"), 42]
    assert assemble(P, junk + recs[:4]) == v
    assert assemble(P, junk) is None
    assert assemble(P, []) is None


def test_two_versions_are_voted_on_by_the_verified_path(obj):
    v, recs = obj
    w = os.urandom(len(v))
    newer = encode_records(P, w, 256 << 10)
    # data fragments of two versions mixed: not concatenated; v has 4 agreeing fragments
    mixed = [recs[0], newer[1], recs[2], recs[3], recs[4]]
    assert assemble(P, mixed) == v
    assert assemble(P, [recs[0], newer[1], newer[2], recs[3]]) is None  # no 4 agree


def test_whole_copy_and_buffer_errors(obj):
    v, recs = obj
    small = encode_records(P, b"tiny", 256 << 10)
    assert assemble(P, small[2:]) == b"tiny"  # a whole copy, verified
    with pytest.raises(errors.InvalidArgument, match="does not fit"):
        assemble(P, recs[:4], bytearray(len(v) - 1))
    with pytest.raises(errors.InvalidArgument, match="read-only"):
        assemble(P, recs[:4], bytes(len(v)))
    out = bytearray(len(v))
    assert assemble(P, recs[:4], memoryview(out)) == len(v) and out == v
