"""Rendezvous placement: deterministic, stable under membership change, failure-domain aware."""
from __future__ import annotations

import collections

import pytest
from kvstore.errors import InvalidArgument
from kvstore.placement import Member, place, preference, score

KEYS = [f"key-{i}".encode() for i in range(2000)]


def nodes(n, domains=None):
    return [Member(f"node-{i}", f"127.0.0.1:{7000 + i}", domains[i] if domains else "") for i in range(n)]


def test_deterministic_and_not_python_hash():
    ms = nodes(5)
    # fixed value: xxh3-64 of length-prefixed (node_id, ns, key); the same in every process
    assert score("node-0", "default", b"k") == score("node-0", "default", b"k")
    assert score("node-0", "default", b"k") != score("node-0", "other", b"k")
    assert [m.node_id for m in preference(b"k", ms)] == [m.node_id for m in preference(b"k", list(reversed(ms)))]
    assert place(b"k", ms, 3) == place(b"k", list(reversed(ms)), 3)


def test_balance():
    ms = nodes(5)
    c = collections.Counter(place(k, ms, 1)[0].node_id for k in KEYS)
    assert set(c) == {m.node_id for m in ms}
    assert min(c.values()) > len(KEYS) / 5 * 0.75, c


def test_removing_a_node_moves_only_its_keys():
    ms = nodes(6)
    before = {k: place(k, ms, 1)[0].node_id for k in KEYS}
    gone = ms[2]
    after = {k: place(k, [m for m in ms if m is not gone], 1)[0].node_id for k in KEYS}
    moved = [k for k in KEYS if before[k] != after[k]]
    assert moved and all(before[k] == gone.node_id for k in moved)
    assert all(after[k] == before[k] for k in KEYS if before[k] != gone.node_id)
    # preference lists keep their relative order: the n-node sets lose only the removed node
    for k in KEYS[:200]:
        old = [m.node_id for m in preference(k, ms)]
        new = [m.node_id for m in preference(k, [m for m in ms if m is not gone])]
        assert new == [x for x in old if x != gone.node_id]


def test_adding_a_node_only_takes_keys_onto_it():
    ms = nodes(5)
    before = {k: place(k, ms, 1)[0].node_id for k in KEYS}
    new = Member("node-new", "127.0.0.1:9999")
    after = {k: place(k, ms + [new], 1)[0].node_id for k in KEYS}
    assert all(after[k] in (before[k], "node-new") for k in KEYS)
    assert 0 < sum(after[k] == "node-new" for k in KEYS) < len(KEYS) / 3


def test_failure_domains_spread_first():
    ms = nodes(6, ["rack-a", "rack-a", "rack-b", "rack-b", "rack-c", "rack-c"])
    dom = {m.node_id: m.failure_domain for m in ms}
    for k in KEYS[:300]:
        p3 = place(k, ms, 3)
        assert len({dom[m.node_id] for m in p3}) == 3
        p5 = place(k, ms, 5)  # fewer domains than n: fill from any domain
        assert len({m.node_id for m in p5}) == 5 and len({dom[m.node_id] for m in p5}) == 3
        assert p5[:3] == p3


def test_too_few_nodes_and_duplicates():
    with pytest.raises(InvalidArgument, match="needs 4 nodes"):
        place(b"k", nodes(3), 4)
    with pytest.raises(InvalidArgument):
        place(b"k", nodes(2) + nodes(1), 1)
