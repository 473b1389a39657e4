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


def wrapped_slots(rng: random.Random, placed: list) -> list:
    """P.n slots over ``placed``: each member once, the extra positions on members placed
    anywhere (as place_positions does after a loss: the lost position goes to any
    survivor), laps counted in slot order."""
    order = list(placed) + [rng.choice(placed) for _ in range(P.n - len(placed))]
    order = order[:1] + rng.sample(order[1:], len(order) - 1) if rng.random() < 0.5 else \
        rng.sample(order, len(order))
    laps: dict = {}
    out = []
    for m in order:
        out.append((m, laps.get(m.node_id, 0)))
        laps[m.node_id] = laps.get(m.node_id, 0) + 1
    return out


def random_case(rng: random.Random, kinds=(KIND_FRAGMENT,)):
    """An object placed over 4 or 5 members (me among them), this node's records on
    some of its laps (or a stray lap), and random Heads from the other slots."""
    names = [ME] + [f"n{i}" for i in range(rng.choice((3, 4)))]
    rng.shuffle(names)
    placed = [Member(n, f"127.0.0.1:{1000 + i}") for i, n in enumerate(names)]
    o = d.Obj(b"ns", b"obj", P, True)
    o.slots = wrapped_slots(rng, placed)
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


def cluster_state(rng: random.Random) -> tuple[list, dict]:
    """One object over 4 or 5 nodes: (its slots, what each (node, lap) holds: (unverified,
    head)): mostly its own index of the current version, sometimes nothing, another
    index or version, an unverified record, a stray lap."""
    names = [f"n{i}" for i in range(rng.choice((4, 5)))]
    placed = [Member(n, f"127.0.0.1:{1000 + i}") for i, n in enumerate(names)]
    slots = wrapped_slots(rng, placed)
    held = {}
    for j, (m, lap) in enumerate(slots):
        r = rng.random()
        if r < 0.25:
            continue  # lost
        idx = j if r < 0.85 else rng.randrange(P.n)
        held[(m.node_id, lap)] = (rng.random() < 0.05, head(idx, rng.random() < 0.1))
    if rng.random() < 0.1:  # a record on a lap outside its node's slots
        held[(rng.choice(names), 2)] = (False, head(rng.randrange(P.n), 0))
    return slots, held


def cluster_views(slots: list, held: dict, draining: tuple = ()) -> list:
    """The state seen from every node that holds a record of the object (a node without
    one never walks it): [(node, Obj, Heads of the others)]. ``draining``: node ids off
    the slots whose lap 0 is asked too (Peers.draining)."""
    views = []
    for me in dict.fromkeys([m.node_id for m, _lap in slots] + list(draining)):
        o = d.Obj(b"ns", b"obj", P, True)
        o.slots = list(slots)
        for (n, lap), (unv, h) in held.items():
            if n == me:
                o.mine[lap] = d.Local(lap_key(b"obj", lap), 100, 1, unv, h, 0.0)
        if not o.mine:
            continue
        got = {}
        for m, lap in slots:
            if m.node_id != me:
                x = held.get((m.node_id, lap))
                got[(m.node_id, lap)] = H(False) if x is None else H(True, x[0], 0, x[1])
        for n in draining:
            if n != me:
                x = held.get((n, 0))
                got[(n, 0)] = H(False) if x is None else H(True, x[0], 0, x[1])
        views.append((me, o, got))
    return views


def writes(views) -> tuple[dict, dict, dict, int, int]:
    """What the holders do to the object's slots, each deciding as the agent does (the
    follower shortcut first, then a full decision): ({slot: how many nodes write it (a
    rebuild or a hand-over)}, {slot: how many rebuild it}, {slot: (node, lap) of a record
    its node keeps (Verify)},
    records rebuilt, of which into the rebuilding node's own slots)."""
    count: dict = {}
    rebuilds: dict = {}
    kept, rebuilt, local = {}, 0, 0
    for me, o, got in views:
        f = d.follower(o, me)
        m0, lap0 = o.slots[0]
        if f is not None and d.led_by_first(f, got.get((m0.node_id, lap0))):
            continue
        for a in d.decide(o, got, d.Peers(me, {}, {}, [])):
            if isinstance(a, d.Reconstruct):
                for _i, j, _w in a.targets:
                    count[j] = count.get(j, 0) + 1
                    rebuilds[j] = rebuilds.get(j, 0) + 1
                    rebuilt += 1
                    local += o.slots[j][0].node_id == me
            elif isinstance(a, d.HandOver):
                for j in a.slots:
                    count[j] = count.get(j, 0) + 1
            elif isinstance(a, d.Verify):
                for j, (m, lap) in enumerate(o.slots):
                    if m.node_id == me and o.mine.get(lap) and o.mine[lap].key == a.key:
                        kept[j] = (me, lap)
    return count, rebuilds, kept, rebuilt, local


def test_every_slot_the_first_holder_would_fill_is_filled_once(monkeypatch):
    """Over random states of one object seen from every holder (lost, misplaced, stray,
    unverified and stale records): with decide.leader, every slot that the rule before it
    (the first holder rebuilds) filled is filled or kept (or a pass later, once a record
    held back is verified), no slot is rebuilt by more nodes than wrote it before (or
    one), and where the node that gets a missing index holds a current record it
    rebuilds it itself (a local write), often."""
    rng = random.Random(29)
    first_rule = lambda o, me, plan, right_all, right, held, current, need: o.slots[  # noqa: E731
        next(j for j, ok in enumerate(right) if ok)][0].node_id  # noqa: E731
    states = rebuilt = local = local_before = 0
    for _ in range(6000):
        slots, held = cluster_state(rng)
        views = cluster_views(slots, held)
        now, rebuilds, kept, r, lo = writes(views)
        with monkeypatch.context() as mp:
            mp.setattr(d, "leader", first_rule)
            before, _rb, _kb, _r, lo_before = writes(views)
        if not set(before) <= set(now) | set(kept):
            # a node counts a record of its own it verifies in this pass (held back as
            # walked) where its peers do not yet: the rest is rebuilt a pass later, once
            # the record is verified (its peers see it then)
            assert kept, (views, before, now)
            for node, lap in kept.values():
                held[(node, lap)] = (False, held[(node, lap)][1])
            later = writes(cluster_views(slots, held))[0]
            assert set(before) <= set(now) | set(kept) | set(later), (views, before, now, later)
        # (a slot a node fills by handing over a record off its slots, which only it
        # knows of, may also be rebuilt by the leader: the same bytes, written twice)
        for j, n in rebuilds.items():
            assert n <= max(1, before.get(j, 0)), (views, before, rebuilds)
        states += bool(before)
        rebuilt, local, local_before = rebuilt + r, local + lo, local_before + lo_before
    assert states > 1000, states
    assert local > 2 * local_before, (rebuilt, local, local_before)


def wide_state(rng: random.Random) -> tuple[list, dict, tuple]:
    """One object in states cluster_state leaves out: 2 to 6 nodes (up to 3 laps a node;
    laps as layout.slots numbers them, or wrapped anywhere), whole-copy records (KIND_REPLICA:
    M+1 slots), two versions, unverified and lost records, strays, and now and then a
    draining node off the slots holding one: (slots, what each (node, lap) holds, the
    draining node ids)."""
    names = [f"n{i}" for i in range(rng.choice((2, 3, 3, 4, 5, 6)))]
    placed = [Member(n, "127.0.0.1:1") for n in names]
    if rng.random() < 0.5:
        k = min(P.n, len(placed))
        slots = [(placed[j % k], j // k) for j in range(P.n)]
    else:
        slots = wrapped_slots(rng, placed[:P.n])
    kind = KIND_REPLICA if rng.random() < 0.25 else KIND_FRAGMENT
    nidx = P.n if kind == KIND_FRAGMENT else P.m + 1
    held = {}
    for j, (m, lap) in enumerate(slots):
        r = rng.random()
        if r < 0.25:
            continue  # lost
        idx = j if r < 0.8 and j < nidx else rng.randrange(nidx)
        held[(m.node_id, lap)] = (rng.random() < 0.08, head(idx, rng.random() < 0.1, kind))
    if rng.random() < 0.15:  # a record on a lap outside its node's slots
        held[(rng.choice(names), rng.choice((2, 3, 4)))] = (False, head(rng.randrange(nidx), 0, kind))
    draining: tuple = ()
    if rng.random() < 0.2:
        held[("gone", 0)] = (False, head(rng.randrange(nidx), 0, kind))
        draining = ("gone",)
    return slots, held, draining


def test_every_holder_names_the_same_leader(monkeypatch):
    """Where the slots as every holder sees them hold enough to rebuild from and one of them
    is right, every holder that decides in full names the same node to rebuild, and that
    node is one of them (it names itself). A holder's own records it verifies in this pass
    (or drops) are seen by its peers as their Heads show them: it must choose as they do,
    or the object waits a pass (it named another node while they named it) or is rebuilt
    twice (a held-back record made another version current here)."""
    rng = random.Random(41)
    real = d.leader
    named: list = []

    def recording(o, me, plan, right_all, right, held, current, need):
        got = real(o, me, plan, right_all, right, held, current, need)
        if len({x[0] for x in held if x and x[2] == current}) >= need and any(right_all):
            named.append((me, got))
        return got

    monkeypatch.setattr(d, "leader", recording)
    agreed = 0
    for _ in range(3000):
        slots, held, draining = wide_state(rng)
        named.clear()
        for me, o, got in cluster_views(slots, held, draining):
            f = d.follower(o, me)
            m0, lap0 = o.slots[0]
            if f is not None and d.led_by_first(f, got.get((m0.node_id, lap0))):
                continue
            d.decide(o, got, d.Peers(me, {}, {}, [Member(n, "") for n in draining]))
        choices = {c for _me, c in named}
        assert len(choices) <= 1, (slots, held, draining, named)
        if choices:
            assert choices <= {me for me, _c in named}, (slots, held, draining, named)
            agreed += 1
    assert agreed > 1000, agreed


def test_a_node_verifying_its_own_record_leads_as_its_peers_expect():
    """ec:3+2 on 4 nodes, index 3 lost; "a" holds index 1 and, on its second lap, index 4
    recovered at restart (unverified: its peers' Heads hold it back). Every peer names "a"
    (it gets a missing index and holds a current record); "a" must too, and rebuild index 3
    in this pass (it verifies index 4 at once)."""
    a, b, c, x = (Member(n, "127.0.0.1:1") for n in ("a", "b", "c", "x"))
    slots = [(b, 0), (a, 0), (c, 0), (x, 0), (a, 1)]
    held = {("b", 0): (False, head(0, 0)), ("a", 0): (False, head(1, 0)), ("c", 0): (False, head(2, 0)),
            ("a", 1): (True, head(4, 0))}
    rebuilt = {}
    for me, o, got in cluster_views(slots, held):
        rebuilt[me] = [a for a in d.decide(o, got, d.Peers(me, {}, {}, [])) if isinstance(a, d.Reconstruct)]
    assert rebuilt["b"] == rebuilt["c"] == []
    (r,) = rebuilt["a"]
    assert r.targets == ((3, 3, False),)


def test_after_a_node_loss_each_object_is_rebuilt_once_by_the_node_that_gets_it():
    """ec:3+2 placed by the real placement over 5 nodes, one lost: over 4 nodes one
    survivor gets a second slot, empty, and holds a fragment already. For every object
    exactly one node rebuilds the lost index, and it is that survivor (the rebuilt
    record is written into its own store); the first holder was it for a fifth or so."""
    from kvstore.layout import placement_key, slots as place
    nodes = [Member(f"n{i}", f"127.0.0.1:{1000 + i}") for i in range(5)]
    rng = random.Random(3)
    own = before = 0
    for n in range(300):
        key = rng.randbytes(32)
        pk = placement_key(key, P)
        lost = nodes[n % 5]
        s5 = place(pk, nodes, P, "ns")
        held = {(m.node_id, 0): (False, head(j, 0)) for j, (m, _lap) in enumerate(s5) if m != lost}
        s4 = place(pk, [m for m in nodes if m != lost], P, "ns")
        j_lost = next(j for j, (m, _lap) in enumerate(s5) if m == lost)
        (empty,) = [j for j, (m, lap) in enumerate(s4) if (m.node_id, lap) not in held]
        gets = s4[empty][0].node_id  # (laps renumber: not always the lost position)
        acts = {me: [a for a in d.decide(o, got, d.Peers(me, {}, {}, [])) if isinstance(a, d.Reconstruct)]
                for me, o, got in cluster_views(s4, held)
                if not (d.follower(o, me) and d.led_by_first(d.follower(o, me), got.get(
                    (o.slots[0][0].node_id, o.slots[0][1]))))}
        acts = {me: a for me, a in acts.items() if a}
        assert list(acts) == [gets], (s5, s4, acts)
        ((r,),) = acts.values()
        assert [i for i, _j, _w in r.targets] == [j_lost]  # the lost index
        assert {s4[j][0].node_id for _i, j, _w in r.targets} == {gets}  # into its own slot
        own += 1
        before += s4[next(j for j, (m, lap) in enumerate(s4) if (m.node_id, lap) in held)][0].node_id == gets
    assert own == 300 and before == 300, (own, before)


def test_the_node_that_gets_a_lost_index_and_holds_another_rebuilds_it():
    """ec:3+2 on 4 nodes after a loss: the lost position went to "t", which holds index 2
    on its first lap; "t" rebuilds index 4 into its second lap (a local write), and the
    first slot's node, which led before, leaves it."""
    a, b, c, t = (Member(n, "127.0.0.1:1") for n in ("a", "b", "c", "t"))
    slots = [(a, 0), (b, 0), (t, 0), (c, 0), (t, 1)]
    on = {("a", 0): head(0, 0), ("b", 0): head(1, 0), ("t", 0): head(2, 0), ("c", 0): head(3, 0)}

    def view(me):
        o = d.Obj(b"ns", b"obj", P, True)
        o.slots = list(slots)
        for (n, lap), h in on.items():
            if n == me:
                o.mine[lap] = d.Local(lap_key(b"obj", lap), 100, 1, False, h, 0.0)
        got = {(m.node_id, lap): (H(True, head=on[(m.node_id, lap)]) if (m.node_id, lap) in on else H(False))
               for m, lap in slots if m.node_id != me}
        return o, got

    o, got = view("t")
    assert d.follower(o, "t") is None  # its second lap lacks a record: a full decision
    assert d.decide(o, got, d.Peers("t", {}, {}, [])) == [
        d.Reconstruct(KIND_FRAGMENT, (900, 7, 3, 2), ((4, 4, False),), (2, 0, 1, 3))]  # local source first
    for me in ("a", "b", "c"):
        o, got = view(me)
        assert d.decide(o, got, d.Peers(me, {}, {}, [])) == []
    # its second lap holds a current record with an index another slot holds (index 0):
    # "t" may take the follower shortcut, so the first slot's node leads and rewrites it
    on[("t", 1)] = head(0, 0)
    o, got = view("t")
    assert d.follower(o, "t") is not None and d.led_by_first(d.follower(o, "t"), got[("a", 0)])
    o, got = view("a")
    (r,) = d.decide(o, got, d.Peers("a", {}, {}, []))
    assert r.targets == ((4, 4, True),) and r.sources[0] == 0
    # "t" without a record of the object: the first holder leads, as before
    del on[("t", 0)], on[("t", 1)]
    o, got = view("a")
    (r,) = d.decide(o, got, d.Peers("a", {}, {}, []))
    assert {i for i, _j, _w in r.targets} == {2, 4}


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
    # a slot of this node without its record: it may be the node that rebuilds it
    o.slots = [(a, 0), (me, 0), (b, 0), (c, 0), (me, 1)]
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
