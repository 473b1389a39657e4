"""Repair decisions (kvstored/cluster/repair/decide.py) without sockets: every branch of
verify / rebuild / move, and the small pure helpers around it (assign, throttle, group,
rebuild)."""
from __future__ import annotations

import os

import pytest

from kvstore.layout import (FRAG_HEADER, FRAG_MAGIC, FRAG_VERSION, KIND_FRAGMENT, KIND_REPLICA,
                            Policy, lap_key)
from kvstore.placement import Member
from kvstored.cluster.repair import decide as d
from kvstored.cluster.repair.agent import group
from kvstored.cluster.repair.throttle import Throttle
from fakes import Head as H

ME = "me"
T_WRITE = 1000.0  # when this node's records were written (unix s)


def mem(name: str) -> Member:
    return Member(name, f"127.0.0.1:{1000 + len(name)}")


def ec_head(index: int, k: int = 3, m: int = 2, olen: int = 900, ocsum: int = 7,
            kind: int = KIND_FRAGMENT) -> bytes:
    return FRAG_HEADER.pack(FRAG_MAGIC, FRAG_VERSION, kind, index, k, m, 0, 0, olen, ocsum, 99)


def kinds(acts) -> list[str]:
    return [type(a).__name__ for a in acts]


def peers(settled=None, started=None, draining=()) -> d.Peers:
    return d.Peers(ME, settled or {}, started or {}, list(draining))


# ------------------------------------------------------------------ replicated objects
def rep_obj(slot_names, csum=5, unverified=False, at=T_WRITE) -> d.Obj:
    o = d.Obj(b"ns", b"key", Policy.parse("replicas:%d" % len(slot_names)), False)
    o.mine[0] = d.Local(b"key", 10, csum, unverified, b"", at)
    o.slots = [(mem(n), 0) for n in slot_names]
    return o


def test_replicated_leader_copies_to_the_slot_that_lacks_it():
    o = rep_obj([ME, "a", "b"])
    acts = d.decide(o, {("a", 0): H(True, checksum=5), ("b", 0): H(False)}, peers())
    assert acts == [d.Copy(b"key", 2, b"key", False)]
    assert d.finished(acts)


def test_replicated_copy_of_an_older_version_counts_as_lacking():
    o = rep_obj([ME, "a"])
    acts = d.decide(o, {("a", 0): H(True, checksum=6)}, peers())
    assert acts == [d.Copy(b"key", 1, b"key", False)]


def test_replicated_not_leader_does_nothing():
    o = rep_obj(["a", ME, "b"])
    acts = d.decide(o, {("a", 0): H(True, checksum=5), ("b", 0): H(False)}, peers())
    assert acts == [] and d.finished(acts)


def test_replicated_whole_is_finished():
    o = rep_obj([ME, "a"])
    assert d.decide(o, {("a", 0): H(True, checksum=5)}, peers()) == []


def test_replicated_unanswered_slot_stays_pending():
    o = rep_obj([ME, "a", "b"])
    acts = d.decide(o, {("a", 0): None, ("b", 0): H(False)}, peers())
    assert kinds(acts) == ["Copy", "Pending"]  # writes what it can, looks again later
    acts = d.decide(o, {("a", 0): None, ("b", 0): H(True, checksum=5)}, peers())
    assert kinds(acts) == ["Pending"]


def test_replicated_unverified_peer_copy_is_not_a_copy():
    o = rep_obj([ME, "a"])
    acts = d.decide(o, {("a", 0): H(True, unverified=True, checksum=5)}, peers())
    assert acts == [d.Copy(b"key", 1, b"key", False)]


def test_replicated_moved_away_hands_over_to_missing_homes():
    o = rep_obj(["a", "b"])
    acts = d.decide(o, {("a", 0): H(True, checksum=5), ("b", 0): H(False)}, peers())
    assert acts == [d.HandOver(b"key", (1,), b"key", False)]


def test_replicated_moved_away_deletes_when_homes_hold_it():
    o = rep_obj(["a", "b"])
    acts = d.decide(o, {("a", 0): H(True, checksum=5), ("b", 0): H(True, checksum=5)}, peers())
    assert acts == [d.DeleteLocal(b"key")]


def test_replicated_moved_away_stale_copy_is_deleted_not_handed_over():
    o = rep_obj(["a", "b"])
    acts = d.decide(o, {("a", 0): H(True, checksum=9), ("b", 0): H(False)}, peers())
    assert acts == [d.DeleteLocal(b"key")]


def test_replicated_moved_away_waits_for_every_home_to_answer():
    o = rep_obj(["a", "b"])
    acts = d.decide(o, {("a", 0): H(True, checksum=5), ("b", 0): None}, peers())
    assert kinds(acts) == ["Pending"]


# ------------------------------------------------------------------ held (recovered) records
def test_held_record_kept_when_a_verified_peer_has_the_same_version():
    o = rep_obj(["a", ME], unverified=True)
    acts = d.decide(o, {("a", 0): H(True, checksum=5)}, peers())
    assert acts == [d.Verify(b"key")]


def test_held_record_dropped_when_verified_peers_hold_another_version():
    o = rep_obj([ME, "a"], unverified=True)
    acts = d.decide(o, {("a", 0): H(True, checksum=6)}, peers(settled={"a": True}))
    assert acts == [d.Drop(b"key", 5)]


def test_held_record_kept_when_a_settled_peer_running_at_write_time_only_lacks_it():
    # it may not have been one of the object's homes when it was written (a node out of
    # the list then, restarting in a roll): only a delete it saw drops the record
    # (tests/cluster/test_chaos_rejoin.py has the delete cases)
    o = rep_obj([ME, "a"], unverified=True)
    acts = d.decide(o, {("a", 0): H(False)}, peers(settled={"a": True}, started={"a": T_WRITE - 50}))
    assert acts[0] == d.Verify(b"key")


def test_held_record_kept_when_the_lacking_peer_restarted_since():
    o = rep_obj([ME, "a"], unverified=True)
    acts = d.decide(o, {("a", 0): H(False)}, peers(settled={"a": True}, started={"a": T_WRITE + 50}))
    assert acts[0] == d.Verify(b"key")
    assert acts[1:] == [d.Copy(b"key", 1, b"key", False)]  # and, verified, it leads the copy


def test_held_record_kept_when_the_lacking_peer_is_not_settled():
    o = rep_obj([ME, "a"], unverified=True)
    acts = d.decide(o, {("a", 0): H(False)}, peers(settled={"a": False}, started={"a": 0.0}))
    assert acts[0] == d.Verify(b"key")


def test_held_record_undecided_when_no_peer_answered():
    o = rep_obj([ME, "a"], unverified=True)
    acts = d.decide(o, {("a", 0): None}, peers())
    assert kinds(acts) == ["Pending"]


def test_held_record_on_its_only_home_is_kept():
    o = rep_obj([ME], unverified=True)
    assert d.decide(o, {}, peers()) == [d.Verify(b"key")]


def test_unverified_peer_answers_do_not_verify():
    o = rep_obj([ME, "a"], unverified=True)
    acts = d.decide(o, {("a", 0): H(True, unverified=True, checksum=5)}, peers())
    assert acts[0] == d.Verify(b"key")  # every peer restarted too: nothing says it is stale


# ------------------------------------------------------------------ erasure coding
def ec_obj(slot_names, mine: dict, k=3, m=2, unverified=False) -> d.Obj:
    """``slot_names``: one name per slot (repeats wrap to laps 1, 2...); ``mine``: lap ->
    head of this node's record."""
    o = d.Obj(b"ns", b"obj#ec", Policy.parse(f"ec:{k}+{m}"), True)
    laps: dict[str, int] = {}
    for n in slot_names:
        o.slots.append((mem(n), laps.get(n, 0)))
        laps[n] = laps.get(n, 0) + 1
    for lap, head in mine.items():
        o.mine[lap] = d.Local(lap_key(o.base, lap), 100, 1, unverified, head, T_WRITE)
    return o


def ec_got(o: d.Obj, held: dict) -> dict:
    """Heads for every peer slot: ``held``: slot -> head bytes, None (no answer) or absent."""
    got = {}
    for j, (member, lap) in enumerate(o.slots):
        if member.node_id == ME:
            continue
        x = held.get(j, b"")
        got[(member.node_id, lap)] = None if x is None else (H(True, head=x) if x else H(False))
    return got


def test_ec_leader_reconstructs_the_missing_index_on_its_own_slot():
    o = ec_obj([ME, "a", "b", "c", "e"], {0: ec_head(0)})
    got = ec_got(o, {1: ec_head(1), 2: ec_head(2), 4: ec_head(4)})  # slot 3 lost
    acts = d.decide(o, got, peers())
    assert acts == [d.Reconstruct(KIND_FRAGMENT, (900, 7, 3, 2), ((3, 3, False),), (0, 1, 2, 4))]
    assert d.finished(acts)


def test_ec_sources_local_first_then_by_index():
    o = ec_obj(["a", "b", ME, "c", "e"], {0: ec_head(2)})
    got = ec_got(o, {0: ec_head(0), 1: ec_head(1), 3: ec_head(3)})
    acts = d.decide(o, got, peers())
    assert acts == []  # the leader is slot 0 ("a"), not this node
    o = ec_obj([ME, "a", "b", "c", "e"], {0: ec_head(0)})
    got = ec_got(o, {2: ec_head(2), 3: ec_head(3), 4: ec_head(4)})
    (r,) = d.decide(o, got, peers())
    assert r.sources == (0, 2, 3, 4) and r.targets == ((1, 1, False),)


def test_ec_wrong_version_on_a_slot_is_overwritten():
    o = ec_obj([ME, "a", "b", "c", "e"], {0: ec_head(0)})
    got = ec_got(o, {1: ec_head(1), 2: ec_head(2), 3: ec_head(3), 4: ec_head(4, ocsum=8)})
    (r,) = d.decide(o, got, peers())
    assert r.targets == ((4, 4, True),)  # replaced version: overwrite


def test_ec_duplicate_index_counts_once():
    o = ec_obj([ME, "a", "b", "c", "e"], {0: ec_head(0)})
    got = ec_got(o, {1: ec_head(1), 2: ec_head(1), 3: ec_head(3), 4: ec_head(4)})
    (r,) = d.decide(o, got, peers())
    assert r.targets == ((2, 2, True),)


def test_ec_wrap_laps_leader_fills_its_second_lap():
    # ec:3+2 on 3 members: slots 0..4 on me, a, b, me (lap 1), a (lap 1)
    o = ec_obj([ME, "a", "b", ME, "a"], {0: ec_head(0)})
    got = ec_got(o, {1: ec_head(1), 2: ec_head(2), 4: ec_head(4)})
    (r,) = d.decide(o, got, peers())
    assert r.targets == ((3, 3, False),)
    assert o.slots[3] == (mem(ME), 1)


def test_ec_unanswered_slot_rebuilds_the_rest_and_stays_pending():
    o = ec_obj([ME, "a", "b", "c", "e"], {0: ec_head(0)})
    got = ec_got(o, {1: ec_head(1), 2: ec_head(2), 3: None})  # slot 4 lost, 3 silent
    acts = d.decide(o, got, peers())
    assert kinds(acts) == ["Reconstruct", "Pending"]
    assert acts[0].targets == ((4, 4, False),)  # index 3 waits: its slot did not answer


def test_ec_index_held_by_a_draining_node_is_left_to_it():
    o = ec_obj([ME, "a", "b", "c", "e"], {0: ec_head(0)})
    got = ec_got(o, {1: ec_head(1), 2: ec_head(2), 4: ec_head(4)})
    got[("old", 0)] = H(True, head=ec_head(3))
    acts = d.decide(o, got, peers(draining=[mem("old")]))
    assert kinds(acts) == ["Pending"]  # not rebuilt: "old" writes index 3 itself


def test_ec_draining_index_keeps_its_slot_free():
    o = ec_obj([ME, "a", "b", "c", "e"], {0: ec_head(0)})
    got = ec_got(o, {1: ec_head(1), 4: ec_head(4)})  # slots 2 and 3 empty
    got[("old", 0)] = H(True, head=ec_head(3))
    (r,) = d.decide(o, got, peers(draining=[mem("old")]))
    assert r.targets == ((2, 2, False),)  # slot 3 stays free for index 3; done here


def test_ec_not_leader_does_nothing():
    o = ec_obj(["a", ME, "b", "c", "e"], {0: ec_head(1)})
    got = ec_got(o, {0: ec_head(0), 2: ec_head(2), 4: ec_head(4)})
    assert d.decide(o, got, peers()) == []


def test_ec_small_object_copies_are_reindexed():
    head = lambda i: ec_head(i, kind=KIND_REPLICA)  # noqa: E731
    o = ec_obj([ME, "a", "b", "c", "e"], {0: head(0)})
    got = ec_got(o, {1: head(1)})  # M+1 = 3 copies wanted on slots 0..2
    (r,) = d.decide(o, got, peers())
    assert r.kind == KIND_REPLICA and r.targets == ((2, 2, False),)


def test_ec_nothing_current_anywhere_is_pending():
    o = ec_obj([ME, "a"], {0: b"garbage" * 10}, k=1, m=1)
    acts = d.decide(o, ec_got(o, {}), peers())
    assert kinds(acts) == ["Pending"]


def test_ec_hand_over_to_the_slot_of_its_index():
    o = ec_obj(["a", "b", "c", "e", "f"], {0: ec_head(2)})  # this node is no slot
    got = ec_got(o, {0: ec_head(0), 1: ec_head(1), 3: ec_head(3), 4: ec_head(4)})
    acts = d.decide(o, got, peers())
    assert acts == [d.HandOver(b"obj#ec", (2,), lap_key(b"obj#ec", 0), False)]
    assert d.finished(acts)


def test_ec_hand_over_to_a_wrapped_lap_key():
    o = ec_obj(["a", "b", "a", "b", "c"], {0: ec_head(2)})
    got = ec_got(o, {0: ec_head(0), 1: ec_head(1), 3: ec_head(3), 4: ec_head(4)})
    (a,) = d.decide(o, got, peers())
    assert a.slots == (2,) and a.dst == lap_key(b"obj#ec", 1)


def test_ec_hand_over_surplus_index_is_deleted():
    o = ec_obj(["a", "b", "c", "e", "f"], {0: ec_head(2)})
    got = ec_got(o, {j: ec_head(j) for j in range(5)})
    assert d.decide(o, got, peers()) == [d.DeleteLocal(b"obj#ec")]


def test_ec_hand_over_of_a_replaced_version_is_deleted_when_readable():
    o = ec_obj(["a", "b", "c", "e", "f"], {0: ec_head(2, ocsum=1)})
    got = ec_got(o, {j: ec_head(j) for j in (0, 1, 3)})
    assert d.decide(o, got, peers()) == [d.DeleteLocal(b"obj#ec")]


def test_ec_hand_over_of_a_replaced_version_is_kept_while_unreadable():
    o = ec_obj(["a", "b", "c", "e", "f"], {0: ec_head(2, ocsum=1)})
    got = ec_got(o, {0: ec_head(0), 1: ec_head(1)})  # 2 < K current: keep the old one
    assert d.decide(o, got, peers()) == []


def test_ec_hand_over_waits_for_every_slot():
    o = ec_obj(["a", "b", "c", "e", "f"], {0: ec_head(2)})
    got = ec_got(o, {0: ec_head(0), 1: None})
    assert kinds(d.decide(o, got, peers())) == ["Pending"]


def test_ec_hand_over_overwrites_a_slot_holding_another_version():
    o = ec_obj(["a", "b", "c", "e", "f"], {0: ec_head(2)})
    got = ec_got(o, {0: ec_head(0), 1: ec_head(1), 2: ec_head(2, ocsum=3), 3: ec_head(3),
                     4: ec_head(4)})
    assert d.decide(o, got, peers()) == [d.HandOver(b"obj#ec", (2,), b"obj#ec", True)]


def test_ec_leader_with_an_extra_lap_hands_it_over_then_rebuilds_the_rest():
    # this node holds lap 0 (slot 0) and an old lap 1 record outside its slots
    o = ec_obj([ME, "a", "b", "c", "e"], {0: ec_head(0), 1: ec_head(3)})
    got = ec_got(o, {1: ec_head(1), 2: ec_head(2)})  # slots 3, 4 empty
    acts = d.decide(o, got, peers())
    assert acts[0] == d.HandOver(lap_key(b"obj#ec", 1), (3,), lap_key(b"obj#ec", 0), False)
    assert acts[1].targets == ((4, 4, False),)  # index 3 counted as handed over
    assert d.finished(acts)


def test_ec_held_records_verified_by_peer_versions():
    o = ec_obj([ME, "a", "b", "c", "e"], {0: ec_head(0)}, unverified=True)
    got = ec_got(o, {j: ec_head(j) for j in range(1, 5)})
    assert d.decide(o, got, peers()) == [d.Verify(b"obj#ec")]
    got = ec_got(o, {j: ec_head(j, ocsum=3) for j in range(1, 5)})
    acts = d.decide(o, got, peers())
    assert acts[0] == d.Drop(b"obj#ec", 1)
    assert len(acts) == 1


# ------------------------------------------------------------------ helpers
def test_assign_keeps_indices_on_their_own_positions():
    assert d.assign([3], [1, 3]) == [(3, 3)]
    assert d.assign([4, 0], [1, 0]) == [(0, 0), (4, 1)]
    assert d.assign([1, 2], [0]) == [(1, 0)]
    assert d.assign([], [1]) == []


def test_version_of_a_bad_head_is_none():
    assert d.version(True, b"short") is None
    assert d.version(True, ec_head(1)) == (900, 7, 3, 2)
    assert d.version(False, 42) == 42


def test_throttle_waits_for_debt_and_bounds_the_wait():
    now = [0.0]
    slept = []
    t = Throttle(100.0, clock=lambda: now[0], sleep=slept.append)
    assert t.take(50) == pytest.approx(0.5)
    now[0] = 10.0  # refilled to the burst (one second's worth) only
    assert t.take(100) == 0.0
    assert t.take(10_000) == 5.0  # bounded
    with pytest.raises(ValueError):
        Throttle(0)


def test_group_builds_objects_by_lap_zero_key():
    pol = {"ns": Policy.parse("ec:2+1"), "r": Policy.parse("replicas:2")}
    rows = [(b"ns", b"x#ec", 5, 1, False, False, False, 0, 1.0),
            (b"ns", b"x#ec\x01", 5, 2, False, False, False, 0, 1.0),
            (b"r", b"y", 5, 3, True, False, False, 0, 1.0),
            (b"free", b"z", 5, 4, False, False, False, 0, 1.0)]
    objs = group(rows, pol, draining=False)
    assert [(o.ns, o.base, sorted(o.mine)) for o in objs] == [(b"ns", b"x#ec", [0, 1]),
                                                              (b"r", b"y", [0])]
    assert objs[1].mine[0].unverified
    drained = group(rows, pol, draining=True)  # no policy: goes to its "none" home
    assert drained[-1].base == b"z" and drained[-1].policy == Policy("none", 1)


def test_rebuild_from_sources():
    pytest.importorskip("pyeclib")
    from kvstore.layout import encode_records
    from kvstored.cluster.repair import rebuild as rb
    p = Policy.parse("ec:3+2")
    value = bytes(range(256)) * 4000
    recs = encode_records(p, value, 1)
    ver = d.version(True, recs[0][:FRAG_HEADER.size])
    usable = rb.usable([None, b"junk", recs[1], recs[1], recs[2], recs[4]], ver)
    assert [r[0][3] for r in usable] == [1, 2, 4]  # invalid and duplicate sources skipped
    built = rb.rebuild(p, KIND_FRAGMENT, usable, [0, 3])
    assert {i: h + bytes(f) for i, (h, f) in built.items()} == {0: recs[0], 3: recs[3]}
    assert rb.rebuild(p, KIND_FRAGMENT, usable[:2], [0]) is None  # fewer than K
    assert rb.rebuild(p, KIND_FRAGMENT, [], [0]) is None
    assert rb.usable([recs[0]], (1, 2, 3, 2)) == []  # another version
    # repair reads sources without the wire checksum: a header whose index is not the
    # fragment's own (liberasurecode's, under the payload checksum) is not a source
    relabelled = bytearray(recs[1])
    relabelled[6] = 0  # FRAG_HEADER's index byte (after magic, version, kind): claims fragment 0
    assert [r[0][3] for r in rb.usable([relabelled], ver)] == [0]  # no policy: not checked
    assert rb.usable([relabelled], ver, None, p) == []
    assert [r[0][3] for r in rb.usable([bytearray(r) for r in recs[1:4]], ver, None, p)] == [1, 2, 3]
    flipped = bytearray(recs[2])
    flipped[-100] ^= 0x40  # payload corrupt: the payload checksum refuses it
    assert rb.usable([flipped], ver, None, p) == []


# ------------------------------------------------------------------ progress
def test_status_reports_rate_and_eta_of_the_pass_in_progress():
    import time

    from kvstore.cli import repair_line
    from kvstored.cluster.repair.agent import RepairAgent, RepairSettings
    a = RepairAgent("me", None, None, RepairSettings(1.0, 60.0, 1 << 20))
    idle = a.status()
    assert idle["state"] == "idle" and idle["eta_seconds"] == idle["rate"] == 0.0
    now = time.monotonic()
    a.st.update(state="scanning", scanned=25, total=400, bytes_written=30 << 20)
    a._pass_t0, a._pass_objects = now - 2.0, 100
    a._rate_marks = [(now - 2.0, 10 << 20)]
    st = a.status()
    assert st["pass_seconds"] == pytest.approx(2.0, abs=0.5)
    assert st["eta_seconds"] == pytest.approx(6.0, abs=1.5)  # 75 objects left at 12.5/s
    assert st["rate"] == pytest.approx((20 << 20) / 2.0, rel=0.25)
    line = repair_line(st)
    assert "MiB/s for 2s" in line and ", ETA 6s" in line
    a.st.update(scanned=100)
    assert a.status()["eta_seconds"] == 0.0  # nothing left to estimate


def test_per_peer_returns_only_once_every_job_ended(monkeypatch):
    """One peer's job raising ends the call only once the others ended too: their
    records may be views of this node's DRAM slots, whose read references the caller
    gives back as soon as this returns (a job still sending would read freed slots)."""
    import threading
    from kvstored.cluster.repair import agent
    from kvstored.cluster.repair.agent import RepairAgent, RepairSettings
    monkeypatch.setattr(agent, "PARALLEL_PEERS", True)
    a = RepairAgent("me", None, None, RepairSettings(1.0, 60.0, 1 << 20))
    started, go, ended = threading.Event(), threading.Event(), threading.Event()

    def job(name):
        if name == "bad":
            assert started.wait(10)
            raise RuntimeError("peer write failed")
        started.set()
        go.wait(0.5)  # set only after the call returned: a job still running then is a bug
        ended.set()
        return 1
    try:
        with pytest.raises(RuntimeError, match="peer write failed"):
            a._per_peer(job, {"bad": "bad", "slow": "slow"})
        assert ended.is_set()
    finally:
        go.set()
        a._pool.shutdown(wait=True)


# ------------------------------------------------------------------ bulk execution (fakes, no sockets)
class FakeStore:
    """LocalStore's calls over a dict {(ns, key): bytes}; ``refs``: read references
    read_many keeps (payloads given as views, with ``held``) and release gives back."""

    def __init__(self, data):
        self.data = dict(data)
        self.hops = 0
        self.refs = 0

    def read_many(self, items, split=0, held=None):
        self.hops += 1
        got = [self.data.get(k) for k in items]
        n = FRAG_HEADER.size  # the first ``split`` as (header, payload), as LocalStore does
        if held is not None:
            held.asked = True
            kept = [k for i, (k, b) in enumerate(zip(items, got)) if i < split and b is not None]
            held.entries += kept
            self.refs += len(kept)
        return [(bytes(b[:n]), memoryview(b)[n:] if held is not None else bytes(b[n:]))
                if i < split and b is not None else b for i, b in enumerate(got)]

    def release(self, held):
        held.closed = True
        self.refs -= len(held.entries)
        held.entries = []

    def settle(self, verify, drop):
        self.hops += 1
        for ns, key, _c in drop:
            self.data.pop((ns, key), None)
        return len(verify), [(ns, key) for ns, key, _c in drop]

    def delete(self, items):
        self.hops += 1
        return sum(self.data.pop(k, None) is not None for k in items)


class FakePeers:
    """PeerIO's calls over {node_id: {(ns, key): bytes}}; ``refuse``: node ids whose
    writes fail."""

    def __init__(self, data, refuse=()):
        self.data, self.refuse = data, set(refuse)
        self.calls = []
        self.committed = {}  # (node_id, ns, key) -> the commit time a write carried

    def get_many(self, member, ns, keys, verify=True):
        self.calls.append(("get", member.node_id, len(keys)))
        return [self.data.get(member.node_id, {}).get((ns, k)) for k in keys]

    def put_many(self, member, ns, items, overwrite, committed=None):
        self.calls.append(("put", member.node_id, len(items)))
        if member.node_id in self.refuse:
            return [None] * len(items)
        for (k, _v), at in zip(items, committed or [None] * len(items)):
            self.committed[(member.node_id, ns, k)] = at
        for k, v in items:  # a record: one buffer, or (header, payload) sent gathered
            self.data.setdefault(member.node_id, {})[(ns, k)] = (
                bytes(v[0]) + bytes(v[1]) if isinstance(v, tuple) else bytes(v))
        return [True] * len(items)


def executor(store, peers):
    from kvstored.cluster.repair.execute import Executor
    counts = {}

    def count(name, n=1):
        counts[name] = counts.get(name, 0) + n
    ex = Executor(store, peers, Throttle(1 << 40), count,
                  lambda fn, jobs: {n: fn(j) for n, j in jobs.items()}, lambda: False)
    return ex, counts


def test_executor_rebuilds_many_objects_with_one_read_and_one_write_call_per_peer():
    pytest.importorskip("pyeclib")
    from kvstore.layout import encode_records
    p = Policy.parse("ec:3+2")
    names = [ME, "a", "b", "c", "e"]
    objs, local, remote, want = [], {}, {}, {}
    for n in range(10):
        base = b"obj%d#ec" % n
        recs = encode_records(p, os.urandom(300_000), 1)
        o = ec_obj(names, {0: recs[0][:FRAG_HEADER.size]})
        o.base, o.mine[0] = base, o.mine[0]._replace(key=base)
        objs.append(o)
        local[(b"ns", base)] = recs[0]
        for j in (1, 2, 4):  # slot 3 ("c") lost everything
            remote.setdefault(names[j], {})[(b"ns", base)] = recs[j]
        want[(b"ns", base)] = recs[3]
    heads = {id(o): {(names[j], 0): H(True, head=remote[names[j]][(b"ns", o.base)][:FRAG_HEADER.size])
                     for j in (1, 2, 4)} | {("c", 0): H(False)} for o in objs}
    store, peers = FakeStore(local), FakePeers(remote)
    ex, counts = executor(store, peers)
    assert ex.run(objs, heads, peers_for_exec()) == [True] * 10
    assert peers.data["c"] == want  # index 3 rebuilt on its own slot, byte-identical
    assert sorted(c for c in peers.calls if c[0] == "get") == [("get", "a", 10), ("get", "b", 10)]
    assert [c for c in peers.calls if c[0] == "put"] == [("put", "c", 10)]
    assert counts["records_written"] == 10 and store.hops == 1  # one local read for all
    assert store.refs == 0  # the local sources' slots, read in place, were given back


@pytest.mark.parametrize("pipelined", [False, True])
def test_local_sources_read_in_place_are_given_back_when_the_write_fails(monkeypatch, pipelined):
    """This node's rebuild sources are views of its slots, their read references kept
    until the chunk is written: a write that raises (or a chunk never written) gives
    them back all the same."""
    pytest.importorskip("pyeclib")
    from kvstore.layout import encode_records
    from kvstored.cluster.repair import execute
    monkeypatch.setattr(execute, "PIPELINED", pipelined)
    p = Policy.parse("ec:2+2")
    recs = encode_records(p, os.urandom(300_000), 1)
    names = [ME, "a", "b", "c"]
    o = ec_obj(names, {0: recs[0][:FRAG_HEADER.size]}, k=2, m=2)
    heads = {("a", 0): H(True, head=recs[1][:FRAG_HEADER.size]),
             ("b", 0): H(True, head=recs[2][:FRAG_HEADER.size]), ("c", 0): H(False)}
    peers = FakePeers({"a": {(b"ns", o.base): recs[1]}, "b": {(b"ns", o.base): recs[2]}})

    def broken(member, ns, items, overwrite, committed=None):
        raise RuntimeError("write failed")
    peers.put_many = broken
    store = FakeStore({(b"ns", o.base): recs[0]})
    ex, _ = executor(store, peers)
    try:
        with pytest.raises(RuntimeError, match="write failed"):
            ex.start([o], {id(o): heads}, peers_for_exec()).result(30)
    finally:
        ex.close()
    assert store.hops == 1 and store.refs == 0


def test_executor_pipelined_writes_chunks_on_the_writer_thread(monkeypatch):
    """PIPELINED: a batch of 10 objects in 10 chunks; each chunk's writes run on the writer
    thread while the next is built; the outcome and the bytes written are the same."""
    pytest.importorskip("pyeclib")
    import threading
    from kvstore.layout import encode_records
    from kvstored.cluster.repair import execute
    monkeypatch.setattr(execute, "PIPELINED", True)
    monkeypatch.setattr(execute, "MAX_BATCH_BYTES", 1)  # one object per chunk
    p = Policy.parse("ec:3+2")
    names = [ME, "a", "b", "c", "e"]
    objs, local, remote, want = [], {}, {}, {}
    for n in range(10):
        base = b"pobj%d#ec" % n
        recs = encode_records(p, os.urandom(300_000), 1)
        o = ec_obj(names, {0: recs[0][:FRAG_HEADER.size]})
        o.base, o.mine[0] = base, o.mine[0]._replace(key=base)
        objs.append(o)
        local[(b"ns", base)] = recs[0]
        for j in (1, 2, 4):
            remote.setdefault(names[j], {})[(b"ns", base)] = recs[j]
        want[(b"ns", base)] = recs[3]
    heads = {id(o): {(names[j], 0): H(True, head=remote[names[j]][(b"ns", o.base)][:FRAG_HEADER.size])
                     for j in (1, 2, 4)} | {("c", 0): H(False)} for o in objs}
    peers = FakePeers(remote)
    writers = set()
    put = peers.put_many

    def put_many(member, ns, items, overwrite, committed=None):
        writers.add(threading.current_thread().name)
        return put(member, ns, items, overwrite)
    peers.put_many = put_many
    store = FakeStore(local)
    ex, counts = executor(store, peers)
    try:
        assert ex.start(objs, heads, peers_for_exec()).result(30) == [True] * 10
    finally:
        ex.close()
    assert peers.data["c"] == want and counts["records_written"] == 10 and store.refs == 0
    assert len([c for c in peers.calls if c[0] == "put"]) == 10  # one per chunk
    assert writers and all(n.startswith("kvstored-repair-write") for n in writers)


def peers_for_exec():
    return d.Peers(ME, {}, {}, [])


def test_rebuilt_records_keep_the_oldest_commit_time_of_the_sources_used():
    """A Reconstruct from K sources writes its records with the oldest commit time among
    the sources it decoded from (this node's own record, a peer's from its Heads answer),
    not the time of the write; a source read but found stale does not count. A peer of an
    earlier version tells no time (None): the oldest of those known; none known, none
    sent. Copies keep the local record's time."""
    pytest.importorskip("pyeclib")
    from kvstore.layout import encode_records
    p = Policy.parse("ec:2+2")
    recs = encode_records(p, os.urandom(300_000), 1)
    stale = encode_records(p, os.urandom(300_000), 1)
    names = [ME, "a", "b", "c"]

    def rebuilt(mine_at, a_at, b_at):
        o = ec_obj(names, {0: recs[0][:FRAG_HEADER.size]}, k=2, m=2)
        o.mine[0] = o.mine[0]._replace(committed_at=mine_at)
        remote = {"a": {(b"ns", o.base): stale[1]}, "b": {(b"ns", o.base): recs[2]}}
        heads = {("a", 0): H(True, head=recs[1][:FRAG_HEADER.size], committed_at=a_at),  # stale
                 ("b", 0): H(True, head=recs[2][:FRAG_HEADER.size], committed_at=b_at),
                 ("c", 0): H(False)}
        peers = FakePeers(remote)
        ex, _ = executor(FakeStore({(b"ns", o.base): recs[0]}), peers)
        assert ex.run([o], {id(o): heads}, peers_for_exec()) == [True]
        assert peers.data["c"][(b"ns", o.base)] == recs[3]
        return peers.committed[("c", b"ns", o.base)]
    assert rebuilt(T_WRITE, 10.0, T_WRITE - 50) == T_WRITE - 50  # b's is older than mine
    assert rebuilt(T_WRITE - 50, 10.0, T_WRITE) == T_WRITE - 50  # mine older; a's (stale) unused
    assert rebuilt(T_WRITE, 10.0, None) == T_WRITE  # b of an earlier version: mine alone known
    assert rebuilt(None, 10.0, None) is None  # nothing known: the write's own time
    o = rep_obj([ME, "a"], at=T_WRITE - 7)
    peers = FakePeers({})
    ex, _ = executor(FakeStore({(b"ns", b"key"): b"v" * 10}), peers)
    assert ex.run([o], {id(o): {("a", 0): H(False)}}, peers_for_exec()) == [True]
    assert peers.committed == {("a", b"ns", b"key"): T_WRITE - 7}


def test_executor_hand_over_deletes_only_after_every_copy_is_written():
    o = rep_obj(["a", "b"])
    store = FakeStore({(b"ns", b"key"): b"v" * 10})
    got = {("a", 0): H(False), ("b", 0): H(False)}
    peers = FakePeers({}, refuse={"b"})
    ex, counts = executor(store, peers)
    assert ex.run([o], {id(o): got}, peers_for_exec()) == [False]  # b refused: pending
    assert (b"ns", b"key") in store.data and peers.data["a"] == {(b"ns", b"key"): b"v" * 10}
    peers.refuse.clear()
    assert ex.run([o], {id(o): got}, peers_for_exec()) == [True]
    assert store.data == {} and counts["removed"] == 1


def test_executor_missing_local_record_leaves_the_object_pending():
    o = rep_obj([ME, "a"])
    ex, counts = executor(FakeStore({}), FakePeers({}))
    assert ex.run([o], {id(o): {("a", 0): H(False)}}, peers_for_exec()) == [False]
    assert "records_written" not in counts


def test_executor_reads_further_sources_when_the_first_are_stale():
    pytest.importorskip("pyeclib")
    from kvstore.layout import encode_records
    p = Policy.parse("ec:2+2")
    recs = encode_records(p, os.urandom(300_000), 1)
    stale = encode_records(p, os.urandom(300_000), 1)
    names = [ME, "a", "b", "c"]
    o = ec_obj(names, {0: recs[0][:FRAG_HEADER.size]}, k=2, m=2)
    remote = {"a": {(b"ns", o.base): stale[1]}, "b": {(b"ns", o.base): recs[2]}}
    heads = {("a", 0): H(True, head=recs[1][:FRAG_HEADER.size]),  # says current, holds stale
             ("b", 0): H(True, head=recs[2][:FRAG_HEADER.size]), ("c", 0): H(False)}
    peers = FakePeers(remote)
    ex, _ = executor(FakeStore({(b"ns", o.base): recs[0]}), peers)
    assert ex.run([o], {id(o): heads}, peers_for_exec()) == [True]
    assert peers.data["c"][(b"ns", o.base)] == recs[3]
    assert [c[1] for c in peers.calls if c[0] == "get"] == ["a", "b"]  # a second round


def test_sources_are_checked_whole_without_the_transfer_checksum():
    """Repair reads peers' rebuild sources without the transfer checksum where usable()
    checks every byte of a record itself (rebuild.sound_alone: an indexed codec): any
    single flipped bit of a fragment record, header or payload, makes it unusable, or
    leaves its meaning unchanged. The header's EC type and reserved fields (covered by
    neither the payload checksum nor the version) are checked for that."""
    pytest.importorskip("pyeclib")
    from kvstore.layout import codec, encode_records
    from kvstored.cluster.repair import rebuild as rb
    p = Policy.parse("ec:3+2")
    if not codec(p).indexed:
        pytest.skip("this codec's fragments carry no index of their own")
    assert rb.sound_alone(p) and not rb.sound_alone(Policy.parse("replicas:2"))
    value = bytes(range(256)) * 40
    recs = encode_records(p, value, 1)
    ver = d.version(True, recs[0][:FRAG_HEADER.size])
    rec = recs[1]
    good = rb.usable([rec], ver, None, p)
    assert [r[0][3] for r in good] == [1]
    positions = list(range(FRAG_HEADER.size + 96)) + list(range(len(rec) - 64, len(rec)))
    for pos in positions:
        for bit in (0, 7):
            bad = bytearray(rec)
            bad[pos] ^= 1 << bit
            got = rb.usable([bad], ver, None, p)
            assert got == [] or (got[0][0] == good[0][0] and bytes(got[0][1]) == bytes(good[0][1])), (
                f"a flipped bit at byte {pos} made a different usable source")
    # the two fields no checksum covers: the EC type (6) and the reserved zero (7)
    h = list(FRAG_HEADER.unpack_from(rec))
    for i in (6, 7):
        forged = list(h)
        forged[i] ^= 1
        bad = FRAG_HEADER.pack(*forged) + bytes(rec[FRAG_HEADER.size:])
        assert rb.usable([bad], ver, None, p) == [], f"header field {i} is not checked"


def test_whole_record_sources_are_checked_whole_too():
    """The same for a small object's whole records (kind REPLICA) of an EC policy, whose
    payload here starts with its record's index (as liberasurecode's fragments do): a
    flipped kind bit passed every other check, and rebuild() copied the kind FRAGMENT
    into the records it wrote. usable() given the action's kind refuses it."""
    pytest.importorskip("pyeclib")
    from kvstore.layout import encode_records
    from kvstored.cluster.repair import rebuild as rb
    p = Policy.parse("ec:3+2")
    value = bytes(4) + bytes(range(256)) * 4
    rec = encode_records(p, value, 1 << 20)[0]  # below min_ec_size: stored whole, index 0
    ver = d.version(True, rec[:FRAG_HEADER.size])
    good = rb.usable([rec], ver, None, p, KIND_REPLICA)
    assert [(r[0][2], r[0][3]) for r in good] == [(KIND_REPLICA, 0)]
    for pos in list(range(FRAG_HEADER.size + 64)) + list(range(len(rec) - 64, len(rec))):
        for bit in range(8):
            bad = bytearray(rec)
            bad[pos] ^= 1 << bit
            got = rb.usable([bad], ver, None, p, KIND_REPLICA)
            if pos == 6:  # the index: rebuild() writes each target's own
                assert [r[0][2] for r in got] in ([], [KIND_REPLICA])
                continue
            assert got == [] or (got[0][0] == good[0][0] and bytes(got[0][1]) == bytes(good[0][1])), (
                f"a flipped bit at byte {pos} made a different usable source")
    flipped = bytearray(rec)
    flipped[5] ^= 1  # kind REPLICA -> FRAGMENT
    assert rb.usable([flipped], ver, None, p, KIND_REPLICA) == []
    built = rb.rebuild(p, KIND_REPLICA, good, [2])
    assert FRAG_HEADER.unpack_from(built[2][0])[2:4] == (KIND_REPLICA, 2)


def test_fragments_of_another_k_m_are_no_sources():
    """rebuild() reconstructs with its policy's codec and writes its K and M: fragments of
    a version of another K+M (the object re-put under a new policy, this node's own record
    of the old one deciding the object's policy) would give records of that version's
    size and checksum holding another code's parity. usable() refuses them."""
    pytest.importorskip("pyeclib")
    from kvstore.layout import encode_records
    from kvstored.cluster.repair import rebuild as rb
    new, old = Policy.parse("ec:4+2"), Policy.parse("ec:3+2")
    recs = encode_records(new, bytes(range(256)) * 200, 1)
    ver = d.version(True, recs[0][:FRAG_HEADER.size])
    assert len(rb.usable(recs[:4], ver, None, new, KIND_FRAGMENT)) == 4
    assert rb.usable(recs[:4], ver, None, old, KIND_FRAGMENT) == []
    assert rb.rebuild(old, KIND_FRAGMENT, rb.usable(recs[:4], ver, None, old, KIND_FRAGMENT), [4]) is None
