"""kvstore.layout: slots and laps, record keys, epochs, write floors, assembly (no daemons)."""
from __future__ import annotations

import os

import pytest

pytest.importorskip("pyeclib")

from kvstore import errors
from kvstore.layout import (Policy, assemble, encode_records, fragment_key, lap_key, member_epoch,
                            parse_record, slots, split_lap)
from kvstore.placement import Member

MS = [Member(f"n{i}", f"127.0.0.1:{7000 + i}") for i in range(6)]


def test_slots_wrap_when_fewer_members_than_fragments():
    p = Policy.parse("ec:3+2")
    full = slots(b"k#ec", MS[:5], p, "ns")
    assert [lap for _, lap in full] == [0] * 5 and len({m.node_id for m, _ in full}) == 5
    three = slots(b"k#ec", MS[:3], p, "ns")
    assert [lap for _, lap in three] == [0, 0, 0, 1, 1]
    assert [m for m, _ in three[:3]] == [m for m, _ in three[3:]] + [three[2][0]]


def test_losing_a_member_moves_only_its_positions():
    """EC positions come from a greedy matching: with members to spare, a lost member's
    position is usually the only one that changes (fragment j stays on position j)."""
    p = Policy.parse("ec:3+2")
    moved = 0
    for i in range(200):
        key = b"obj-%d#ec" % i
        before = slots(key, MS, p, "ns")
        gone = before[i % 5][0]
        after = slots(key, [m for m in MS if m != gone], p, "ns")
        changed = [j for j in range(5) if before[j] != after[j]]
        assert i % 5 in changed
        moved += changed == [i % 5]
    assert moved >= 200 * 0.6  # one spare member: ~68 % keep every other position
    assert slots(b"k", [], p, "ns") == []
    rep = slots(b"k", MS[:1], Policy.parse("replicas:3"), "ns")
    assert rep == [(rep[0][0], 0)]


def test_write_floor_survives_one_more_node_loss():
    assert Policy.parse("ec:3+2").min_live() == 3  # ceil(5/3) = 2 <= M
    assert Policy.parse("ec:4+2").min_live() == 3
    assert Policy.parse("ec:10+1").min_live() == 11
    assert Policy.parse("replicas:3").min_live() == 2
    assert Policy.parse("none").min_live() == 1
    with pytest.raises(errors.InvalidArgument, match="needs 6 nodes for its 4\\+2 fragments"):
        Policy.parse("ec:4+2").check_cluster(5)
    for bad in ("ec:3", "ec:0+1", "replicas:0", "replicas:x", "raid5", "ec:30+3"):
        with pytest.raises(errors.InvalidArgument, match="invalid redundancy policy"):
            Policy.parse(bad)


def test_record_keys_and_laps_round_trip():
    for key in (b"k", b"x" * 124, b"x" * 125, b"y" * 128):
        fk = fragment_key(key)
        assert len(fk) + 1 <= 128
        assert split_lap(fk) == (fk, 0)
        for lap in (1, 2, 31):
            assert split_lap(lap_key(fk, lap)) == (fk, lap)
    assert split_lap(b"plain") is None and split_lap(b"a#ec\x40") is None


def test_epoch_is_order_free_and_nonzero():
    a = member_epoch(["n1", "n2", "n3"])
    assert a == member_epoch(["n3", "n1", "n2"]) and a != member_epoch(["n1", "n2"]) and a


def test_assemble_from_any_k_fragments_and_rejects_mixed_versions():
    p = Policy.parse("ec:3+2")
    v = os.urandom((1 << 20) + 17)
    recs = encode_records(p, v, 256 << 10)
    assert [parse_record(r)[0][3] for r in recs] == [0, 1, 2, 3, 4]
    assert assemble(p, recs[:3]) == v  # data fragments: concatenated
    assert assemble(p, [recs[4], recs[1], recs[3]]) == v  # any 3: decoded
    assert assemble(p, recs[3:]) is None  # two are not enough
    other = encode_records(p, os.urandom(len(v)), 256 << 10)
    assert assemble(p, [recs[0], other[1], recs[2], other[3]]) is None  # no 3 agree
    bad = bytearray(recs[0])
    bad[-1] ^= 1
    assert assemble(p, [bytes(bad), recs[1], recs[2], recs[4]]) == v  # corrupt one skipped
    small = encode_records(p, b"tiny", 256 << 10)
    assert len(small) == 3 and assemble(p, small[2:]) == b"tiny"


def test_encode_takes_bytes_without_a_copy_and_other_buffers_alike():
    p = Policy.parse("ec:3+2")
    v = os.urandom((1 << 20) + 5)
    recs = encode_records(p, memoryview(v), 256 << 10)
    assert encode_records(p, v, 256 << 10) == recs
    assert encode_records(p, bytearray(v), 256 << 10) == recs
    assert encode_records(p, memoryview(bytearray(v))[:], 256 << 10) == recs
    part = memoryview(b"x" + v)[1:]  # a view of part of a bytes object: copied, same records
    assert encode_records(p, part, 256 << 10) == recs
    small = encode_records(p, memoryview(b"tiny"), 256 << 10)
    assert all(isinstance(r, bytes) for r in small) and assemble(p, small[:1]) == b"tiny"


def test_assemble_into_the_callers_buffer():
    p = Policy.parse("ec:3+2")
    v = os.urandom((1 << 20) + 17)
    recs = encode_records(p, v, 256 << 10)
    out = bytearray(len(v) + 100)
    assert assemble(p, recs[:3], out) == len(v) and out[:len(v)] == v  # concatenated in place
    out2 = bytearray(len(v))
    assert assemble(p, [recs[4], recs[1], recs[3]], memoryview(out2)) == len(v) and out2 == v
    small = encode_records(p, b"tiny", 256 << 10)
    out3 = bytearray(8)
    assert assemble(p, small[1:], out3) == 4 and out3[:4] == b"tiny"
    with pytest.raises(errors.InvalidArgument, match="does not fit"):
        assemble(p, recs[:3], bytearray(len(v) - 1))  # too small: a clear error, nothing written
    with pytest.raises(errors.InvalidArgument, match="does not fit"):
        assemble(p, small[1:], bytearray(3))
    with pytest.raises(errors.InvalidArgument, match="read-only"):
        assemble(p, recs[:3], bytes(len(v)))
    assert assemble(p, recs[3:], bytearray(len(v))) is None  # not enough fragments
