"""Placement: where an object lives, computed from the member list alone (no master).

Rendezvous (highest random weight) hashing: every node gets a score
``xxh3_64(node_id || ns || key)`` per object and the object's preference list is the
nodes by descending score. Removing a node only moves the objects it held (every
other node keeps its score, so their relative order is unchanged); adding a node only
takes objects onto that node. Never Python's ``hash()``: it is salted per process and
every client and node must agree.

``place(key, members, n)`` picks ``n`` nodes in distinct failure domains first, in
preference order, then fills from any domain when there are fewer domains than ``n``.
"""
from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import xxhash

from .errors import InvalidArgument

_LEN = struct.Struct("<H")


@dataclass(frozen=True)
class Member:
    """A node of the cluster. ``failure_domain`` "" = a domain of its own (its node_id)."""

    node_id: str
    address: str = ""
    failure_domain: str = ""

    @property
    def domain(self) -> str:
        return self.failure_domain or self.node_id


def _b(x) -> bytes:
    if isinstance(x, str):
        return x.encode()
    return bytes(x)


def score(node_id: str, ns, key) -> int:
    """The rendezvous weight of ``node_id`` for (ns, key); fields are length-prefixed, so
    no two (node, ns, key) triples hash the same input."""
    n, s, k = _b(node_id), _b(ns), _b(key)
    return xxhash.xxh3_64_intdigest(b"".join((_LEN.pack(len(n)), n, _LEN.pack(len(s)), s, k)))


def preference(key, members: Iterable, ns="default") -> list:
    """Every member, by descending weight for (ns, key) (ties broken by node_id)."""
    return sorted(members, key=lambda m: (score(m.node_id, ns, key), m.node_id), reverse=True)


def _domain(m) -> str:
    return getattr(m, "failure_domain", "") or m.node_id


def place(key, members: Sequence, n: int, ns="default") -> list:
    """``n`` members for (ns, key): distinct failure domains first, in preference order,
    then the best remaining members of any domain. Raises InvalidArgument when there are
    fewer than ``n`` members."""
    if n < 1:
        raise InvalidArgument(f"cannot place on {n} nodes")
    ids = [m.node_id for m in members]
    if len(set(ids)) != len(ids):
        raise InvalidArgument("duplicate node_id in the member list")
    if n > len(members):
        raise InvalidArgument(f"placement needs {n} nodes but the cluster has {len(members)}")
    pref = preference(key, members, ns)
    chosen, seen, rest = [], set(), []
    for m in pref:
        d = _domain(m)
        if d in seen:
            rest.append(m)
        else:
            seen.add(d)
            chosen.append(m)
    return (chosen + rest)[:n]


__all__ = ["Member", "place", "preference", "score"]
