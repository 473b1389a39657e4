"""How repair's executor writes, without sockets: an EC object fewer than K of whose
fragments are left (decide.UNRECOVERABLE: pending without reading sources, reported once,
records kept, and only when every slot answered); writes decided from Heads too old for
the nodes' delete fence (decided again from fresh Heads, or not sent); a fenced write
keeps a handed-over record."""
from __future__ import annotations

import logging
import time

from kvstore.layout import FRAG_HEADER, FRAG_MAGIC, FRAG_VERSION, KIND_FRAGMENT, Policy, lap_key
from kvstore.placement import Member
from kvstored.cluster.repair import decide as d
from kvstored.cluster.repair.execute import REFRESH_S, Executor
from kvstored.cluster.repair.peers import FENCED
from kvstored.engine.fence import MAX_WRITE_AGE_S
from fakes import Head as H

ME = "me"


def head(index: int) -> bytes:
    return FRAG_HEADER.pack(FRAG_MAGIC, FRAG_VERSION, KIND_FRAGMENT, index, 3, 2, 0, 0, 900, 7, 99)


def obj(slot_names, mine: dict) -> d.Obj:
    o = d.Obj(b"ns", b"obj#ec", Policy.parse("ec:3+2"), True)
    o.slots = [(Member(n, "127.0.0.1:1"), 0) for n in slot_names]
    for lap, h in mine.items():
        o.mine[lap] = d.Local(lap_key(o.base, lap), 100, 1, False, h, 1000.0)
    return o


def got_of(o: d.Obj, held: dict) -> dict:
    return {(m.node_id, lap): (None if held.get(j, b"") is None else
                               H(True, head=held[j]) if held.get(j) else H(False))
            for j, (m, lap) in enumerate(o.slots) if m.node_id != ME}


def peers() -> d.Peers:
    return d.Peers(ME, {}, {}, [])


def test_two_of_three_needed_fragments_left_every_slot_answering_is_unrecoverable():
    o = obj([ME, "a", "b", "c", "e"], {0: head(0)})
    acts = d.decide(o, got_of(o, {1: head(1)}), peers())  # slots 2, 3, 4 answered "absent"
    assert len(acts) == 1 and isinstance(acts[0], d.Pending)
    assert acts[0].reason.startswith(d.UNRECOVERABLE) and "2 of the 3" in acts[0].reason
    assert not any(isinstance(a, (d.Reconstruct, d.DeleteLocal, d.Drop)) for a in acts)  # kept


def test_a_silent_slot_may_hold_the_missing_fragment_so_it_is_only_pending():
    o = obj([ME, "a", "b", "c", "e"], {0: head(0)})
    acts = d.decide(o, got_of(o, {1: head(1), 3: None}), peers())
    assert len(acts) == 1 and isinstance(acts[0], d.Pending)  # no source read for nothing
    assert not acts[0].reason.startswith(d.UNRECOVERABLE)


def test_k_fragments_left_are_rebuilt_as_before():
    o = obj([ME, "a", "b", "c", "e"], {0: head(0)})
    acts = d.decide(o, got_of(o, {1: head(1), 4: head(4)}), peers())
    assert isinstance(acts[0], d.Reconstruct) and acts[0].sources == (0, 1, 4)


class _Store:
    def settle(self, verify, drop):
        return 0, []


def test_an_unrecoverable_object_is_reported_once_over_passes(caplog):
    counts: dict = {}

    def count(name, n=1):
        counts[name] = counts.get(name, 0) + n
    ex = Executor(_Store(), None, None, count, lambda fn, jobs: {}, lambda: False)
    o = obj([ME, "a", "b", "c", "e"], {0: head(0)})
    got = got_of(o, {1: head(1)})
    with caplog.at_level(logging.WARNING, logger="kvstored.repair"):
        for _pass in range(3):
            assert ex.run([o], {id(o): got}, peers()) == [False]  # pending every pass
    warned = [r for r in caplog.records if "cannot rebuild" in r.getMessage()]
    assert len(warned) == 1 and counts == {"unrecoverable": 1}


# ------------------------------------------------------------------ writes and their age
class _Throttle:
    rate = 1 << 20  # 1 MiB/s: a chunk holds REFRESH_S of it (5 MiB)

    def take(self, n):
        return 0.0


class _Local:
    """LocalStore: this node's copies (read for Copy / HandOver), deletes recorded."""

    def __init__(self, size: int):
        self.size = size
        self.deleted: list = []

    def settle(self, verify, drop):
        return 0, []

    def read_many(self, items, split=0):
        return [b"v" * self.size for _ in items]

    def delete(self, items):
        self.deleted += items
        return len(items)


class _Peers:
    """PeerIO: what each put_many call wrote; answers ``answer`` per record."""

    def __init__(self, answer=True):
        self.answer = answer
        self.writes: list = []

    def put_many(self, member, ns, items, overwrite, committed=None):
        self.writes += [(member.node_id, k) for k, _v in items]
        return [self.answer] * len(items)


def _rep(name: bytes, slots) -> d.Obj:
    o = d.Obj(b"ns", name, Policy.parse(f"replicas:{len(slots)}"), False)
    o.mine[0] = d.Local(name, 2 << 20, 5, False, b"", 1000.0)
    o.slots = [(Member(n, "127.0.0.1:1"), 0) for n in slots]
    return o


def _executor(peers, local, counts):
    def count(name, n=1):
        counts[name] = counts.get(name, 0) + n
    return Executor(local, peers, _Throttle(), count, lambda fn, jobs: {k: fn(j) for k, j in jobs.items()},
                    lambda: False)


def test_a_slow_batchs_later_chunks_are_decided_again_from_fresh_heads():
    objs = [_rep(b"k%d" % i, [ME, "a"]) for i in range(3)]  # one 2 MiB copy to "a" each
    heads = {id(o): {("a", 0): H(False)} for o in objs}
    peers, counts, asked_again = _Peers(), {}, []

    def refresh(rest):  # "a" holds them now (another node copied them meanwhile)
        asked_again.append([o.base for o in rest])
        return {id(o): {("a", 0): H(True, checksum=5)} for o in rest}
    ex = _executor(peers, _Local(2 << 20), counts)
    old = time.monotonic() - REFRESH_S - 1  # the batch's Heads are older than REFRESH_S
    assert ex.run(objs, heads, peers_view(), refresh, old) == [True, True, True]
    assert peers.writes == [("a", b"k0")]  # the first chunk, decided from the batch's Heads
    assert asked_again == [[b"k1", b"k2"]] and counts["redecided"] == 2


def test_a_write_decided_longer_ago_than_the_fence_covers_is_not_sent():
    o = _rep(b"k", [ME, "a"])
    peers, counts = _Peers(), {}
    ex = _executor(peers, _Local(2 << 20), counts)
    stale = time.monotonic() - MAX_WRITE_AGE_S - 1
    assert ex.run([o], {id(o): {("a", 0): H(False)}}, peers_view(), None, stale) == [False]
    assert peers.writes == [] and counts["late_writes"] == 1


def test_a_fenced_hand_over_keeps_the_record_and_leaves_the_object_pending():
    o = _rep(b"k", ["a", "b"])  # this node is no home of it any more: hand it over
    peers, local, counts = _Peers(answer=FENCED), _Local(1000), {}
    ex = _executor(peers, local, counts)
    got = {("a", 0): H(True, checksum=5), ("b", 0): H(False)}
    assert ex.run([o], {id(o): got}, peers_view()) == [False]
    assert peers.writes == [("b", b"k")] and local.deleted == []  # kept: the delete fenced it
    assert "records_written" not in counts
    peers.answer = True  # not fenced: written, then deleted here
    assert ex.run([o], {id(o): got}, peers_view()) == [True]
    assert local.deleted == [(b"ns", b"k")] and counts["records_written"] == 1


def test_a_fenced_hand_over_of_an_object_no_slot_holds_drops_the_record():
    # deleted on every slot (the fence says so), and this node missed the delete (a
    # draining node, which clients no longer ask): its record is all that is left
    o = _rep(b"k", ["a", "b"])
    peers, local, counts = _Peers(answer=FENCED), _Local(1000), {}
    ex = _executor(peers, local, counts)
    got = {("a", 0): H(False), ("b", 0): H(False)}
    assert ex.run([o], {id(o): got}, peers_view()) == [False]
    assert sorted(peers.writes) == [("a", b"k"), ("b", b"k")] and local.deleted == [(b"ns", b"k")]
    # not fenced (a refusal that proves no delete, or any other failure): kept
    local.deleted.clear()
    peers.answer = None
    assert ex.run([o], {id(o): got}, peers_view()) == [False] and local.deleted == []


def peers_view() -> d.Peers:
    return d.Peers(ME, {}, {}, [])
