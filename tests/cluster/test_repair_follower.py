"""Repair's shortcut for objects another node leads (decide.follower / led_by_first): an
object left out after one Head of its first slot must be one for which decide(), given
every slot's Head, has nothing for this node to do. Checked against decide() itself over
random slot states (pure: no sockets)."""
from __future__ import annotations

import random

from kvstore.layout import FRAG_HEADER, FRAG_MAGIC, FRAG_VERSION, KIND_FRAGMENT, KIND_REPLICA, Policy, lap_key
from kvstore.placement import Member
from kvstored.cluster.repair import decide as d
from fakes import Head as H

ME = "me"
P = Policy.parse("ec:3+2")
VERSIONS = [(900, 7), (1200, 8)]  # (olen, ocsum) of two versions of one object


def head(index: int, ver: int, kind: int = KIND_FRAGMENT) -> bytes:
    olen, ocsum = VERSIONS[ver]
    return FRAG_HEADER.pack(FRAG_MAGIC, FRAG_VERSION, kind, index, P.k, P.m, 0, 0, olen, ocsum, 99)


def random_case(rng: random.Random, kinds=(KIND_FRAGMENT,)):
    """An object placed over 4 or 5 members (me among them), this node's records on
    some of its laps (or a stray lap), and random Heads from the other slots."""
    names = [ME] + [f"n{i}" for i in range(rng.choice((3, 4)))]
    rng.shuffle(names)
    placed = [Member(n, f"127.0.0.1:{1000 + i}") for i, n in enumerate(names)]
    o = d.Obj(b"ns", b"obj", P, True)
    o.slots = [(placed[j % len(placed)], j // len(placed)) for j in range(P.n)]
    my_laps = [lap for m, lap in o.slots if m.node_id == ME]
    laps = my_laps + ([rng.choice((1, 2))] if rng.random() < 0.1 else [])  # a stray lap now and then
    for lap in laps:
        if rng.random() < 0.8:
            o.mine[lap] = d.Local(lap_key(b"obj", lap), 100, 1, rng.random() < 0.1,
                                  head(rng.randrange(P.n), rng.random() < 0.2, rng.choice(kinds)), 0.0)
    got = {}
    for m, lap in o.slots:
        if m.node_id == ME:
            continue
        r = rng.random()
        if r < 0.05:
            got[(m.node_id, lap)] = None  # no answer
        elif r < 0.15:
            got[(m.node_id, lap)] = H(False)
        else:
            got[(m.node_id, lap)] = H(True, rng.random() < 0.1, 0,
                                      head(rng.randrange(P.n), rng.random() < 0.3, rng.choice(kinds)))
    return o, got


def test_an_object_led_by_its_first_slot_needs_nothing_from_this_node():
    rng = random.Random(13)
    shortcut = full = 0
    for n in range(20000):
        # fragments only, or mixed with whole-copy records (small objects) of other writers
        o, got = random_case(rng, (KIND_FRAGMENT,) if n % 2 else (KIND_FRAGMENT, KIND_REPLICA))
        f = d.follower(o, ME)
        m0, lap0 = o.slots[0]
        if f is not None and d.led_by_first(f, got.get((m0.node_id, lap0))):
            shortcut += 1
            acts = d.decide(o, got, d.Peers(ME, {}, {}, []))
            assert acts == [], (o, got, acts)
        else:
            full += 1
    # both paths taken often enough for the check to mean something
    assert shortcut > 2000 and full > 2000, (shortcut, full)


def test_follower_refuses_what_only_a_full_decision_settles():
    o = d.Obj(b"ns", b"obj", P, True)
    a, b, c = (Member(n, "127.0.0.1:1") for n in ("a", "b", "c"))
    me = Member(ME, "127.0.0.1:2")
    o.slots = [(a, 0), (me, 0), (b, 0), (c, 0), (a, 1)]
    o.mine[0] = d.Local(lap_key(b"obj", 0), 100, 1, False, head(1, 0), 0.0)
    f = d.follower(o, ME)
    assert f == ((900, 7, 3, 2), KIND_FRAGMENT)
    assert d.led_by_first(f, H(True, head=head(0, 0)))
    assert not d.led_by_first(f, H(True, head=head(0, 1)))  # another version
    assert not d.led_by_first(f, H(True, head=head(0, 0, KIND_REPLICA)))  # another kind
    assert not d.led_by_first(f, H(True, unverified=True, head=head(0, 0)))
    assert not d.led_by_first(f, H(False))
    assert not d.led_by_first(f, None)  # no answer
    assert not d.led_by_first(f, H(True, head=b"short"))  # malformed head
    # this node first: it may lead
    o.slots = [(me, 0), (a, 0), (b, 0), (c, 0), (me, 1)]
    assert d.follower(o, ME) is None
    # a record outside this node's slots: it is handed over by a full decision
    o.slots = [(a, 0), (b, 0), (c, 0), (me, 1), (a, 1)]
    assert d.follower(o, ME) is None
    # a record recovered at restart: verified by a full decision
    o.slots = [(a, 0), (me, 0), (b, 0), (c, 0), (a, 1)]
    o.mine[0] = o.mine[0]._replace(unverified=True)
    assert d.follower(o, ME) is None
    # two records of different versions
    o.slots = [(a, 0), (me, 0), (b, 0), (me, 1), (c, 0)]
    o.mine[0] = o.mine[0]._replace(unverified=False)
    o.mine[1] = d.Local(lap_key(b"obj", 1), 100, 1, False, head(3, 1), 0.0)
    assert d.follower(o, ME) is None
    # a replicated object is never settled this way
    r = d.Obj(b"ns", b"obj", Policy.parse("replicas:3"), False)
    r.mine[0] = d.Local(b"obj", 10, 5, False, b"", 0.0)
    r.slots = [(a, 0), (me, 0), (b, 0)]
    assert d.follower(r, ME) is None


def test_a_local_source_split_into_header_and_payload_is_checked_like_a_record():
    """LocalStore.read_many hands rebuild sources over as (header, payload) pairs (one copy,
    no second one for pyeclib): usable() checks them exactly as whole records."""
    import pytest
    pytest.importorskip("pyeclib")
    from kvstore.layout import encode_records
    from kvstored.cluster.repair import rebuild as rb
    value = bytes(range(256)) * 4000
    recs = encode_records(P, value, 1)
    n = FRAG_HEADER.size
    ver = d.version(True, recs[0][:n])
    pairs = [(bytes(r[:n]), bytes(r[n:])) for r in recs]
    got = rb.usable([pairs[1], recs[2], pairs[4]], ver, None, P)
    assert [r[0][3] for r in got] == [1, 2, 4]
    assert isinstance(got[0][1], bytes)  # the payload itself: pyeclib takes it as it is
    built = rb.rebuild(P, KIND_FRAGMENT, got, [0, 3])
    assert {i: h + bytes(f) for i, (h, f) in built.items()} == {0: recs[0], 3: recs[3]}
    flipped = bytearray(pairs[2][1])
    flipped[-100] ^= 0x40  # a corrupt payload: refused
    assert rb.usable([(pairs[2][0], bytes(flipped))], ver, None, P) == []
    relabelled = bytearray(pairs[1][0])
    relabelled[6] = 0  # the header claims fragment 0: liberasurecode's inner index says 1
    assert rb.usable([(bytes(relabelled), pairs[1][1])], ver, None, P) == []
    assert rb.usable([(pairs[1][0][:-1], pairs[1][1])], ver, None, P) == []  # short header
    assert rb.usable([(b"junk" * 9, pairs[1][1])], ver, None, P) == []  # not a header
    assert rb.usable([pairs[1]], (1, 2, 3, 2), None, P) == []  # another version


def test_writes_are_cut_to_a_fraction_of_a_second_of_the_throttle():
    """execute._chunks: at most ``most`` records and ``cap`` bytes a write call, one record
    at least (a record larger than the cap goes alone), every record once, in order."""
    from kvstored.cluster.repair.execute import _chunks
    assert list(_chunks([10] * 10, 4, 1e9)) == [(0, 4), (4, 8), (8, 10)]
    assert list(_chunks([10] * 5, 32, 25)) == [(0, 2), (2, 4), (4, 5)]
    assert list(_chunks([100, 1, 1], 32, 50)) == [(0, 1), (1, 3)]
    assert list(_chunks([], 3, 5)) == []
    rng = random.Random(5)
    for _ in range(200):
        sizes = [rng.randrange(1, 1000) for _ in range(rng.randrange(0, 60))]
        most, cap = rng.randrange(1, 10), rng.randrange(1, 3000)
        runs = list(_chunks(sizes, most, cap))
        assert [i for s, e in runs for i in range(s, e)] == list(range(len(sizes)))
        for s, e in runs:
            assert 1 <= e - s <= most and (e - s == 1 or sum(sizes[s:e]) <= cap)
