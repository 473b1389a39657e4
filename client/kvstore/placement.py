"""Placement: where an object lives, computed from the member list alone (no master).

Rendezvous (highest random weight) hashing: every node gets a score
``xxh3_64(node_id || ns || key)`` per object and the object's preference list is the
nodes by descending score. Removing a node only moves the objects it held (every
other node keeps its score, so their relative order is unchanged); adding a node only
takes objects onto that node. Never Python's ``hash()``: it is salted per process and
every client and node must agree.

``place(key, members, n)`` picks ``n`` nodes in distinct failure domains first, in
preference order, then fills from any domain when there are fewer domains than ``n``
(replicas: copies are interchangeable). ``place_positions`` picks per position, so a
member's loss moves only its own position (erasure-coded fragments keep their index on
their position).

Speed (the answers are those of the plain forms kept below as ``_*_any``, which odd
member lists still take; tests/cluster/test_placement_equivalence.py compares them with a
frozen copy): what depends only on (members, ns) is cached, scores stay plain ints with
ties sent to the plain forms, and the matching takes maxima over a masked score list.
The per-key work (hashing, ordering, matching) runs in C when ``kvstore._placement``
(native/placement.c, linked to the system libxxhash) is built, and it finds the entry
of a list of the same Member objects by identity: layout.slots for ec:3+2 costs ~2.4 us
a key on 5 members instead of ~12, ~6 instead of ~44 on 50 (benchmarks/bench_placement.py).
KVSTORE_NATIVE_PLACEMENT=0 keeps it all in Python; the C path breaks ties itself, in the
plain forms' order, so its answers are the same.
"""
from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import xxhash

from .errors import InvalidArgument

try:
    from . import _placement as _C  # native/placement.c (setup.py: built when libxxhash is)
except ImportError:  # a build without it: the Python path below
    _C = None

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
    return _h(b"".join((_LEN.pack(len(n)), n, _LEN.pack(len(s)), s, k)))


def preference(key, members: Iterable, ns="default") -> list:
    """Every member, by descending weight for (ns, key) (ties broken by node_id)."""
    ms = members if isinstance(members, (list, tuple)) else list(members)
    e = _entry(ms, ns)
    if e is None or e.dup:  # odd member lists (see _entry): the plain form
        return _preference_any(key, ms, ns)
    if _NATIVE and _h is _XXH3:
        return [ms[i] for i in _C.order(e.table, _b(key))]
    return [ms[i] for i in _order(e, _b(key))]


def _preference_any(key, members: Iterable, ns) -> list:
    return sorted(members, key=lambda m: (score(m.node_id, ns, key), m.node_id), reverse=True)


def _domain(m) -> str:
    return getattr(m, "failure_domain", "") or m.node_id


class _Entry:
    """What placement needs of one (members, ns), kept between calls: each member's
    hash prefix ``len(node) node len(ns) ns``, its rank by node_id (ties in a sort
    key made of one int) and its failure domain as a small int; ``table``: the same for
    the C path."""

    __slots__ = ("heads", "ranked", "by_rank", "dom", "dmembers", "dup", "distinct", "table")

    def __init__(self, ids, fds, ns_part):
        self.heads = [_LEN.pack(len(nb)) + nb + ns_part for nb in (i.encode() for i in ids)]
        order = sorted(range(len(ids)), key=ids.__getitem__)
        rank = [0] * len(ids)
        for r, i in enumerate(order):
            rank[i] = r
        self.by_rank = order
        self.dup = len(set(ids)) != len(ids)
        doms: dict = {}
        self.dom = [doms.setdefault(fd or i, len(doms)) for i, fd in zip(ids, fds)]
        self.distinct = len(doms) == len(ids)
        self.dmembers = [[] for _ in doms]  # domain -> its member indexes
        for i, d in enumerate(self.dom):
            self.dmembers[d].append(i)
        self.ranked = list(zip(self.heads, rank))  # (prefix, rank) in member order
        self.table = _C.Table(self.heads, rank, self.dom) if _C is not None and not self.dup else None


_CACHE: dict = {}
_CACHE_MAX = 256  # distinct (members, ns) kept; the whole cache is dropped when full
_RB = 16  # bits of a node_id rank in a sort key: lists of 2**16 members or more take the plain form


def _entry(members, ns):
    """The cached _Entry for (members, ns), or None for lists the fast form does not
    cover (node ids that are not str, 2**16 members or more). The C path finds a list of
    the same Member objects again by identity first (native/placement.c: cached)."""
    if _NATIVE:
        e = _C.cached(members, ns)
        if e is not None:
            return e
    ids = tuple([m.node_id for m in members])
    fds = tuple([getattr(m, "failure_domain", "") for m in members])
    s = _b(ns)
    ck = (s, ids, fds)  # every input of the entry, so a reused key is always right
    e = _CACHE.get(ck)
    if e is None:
        if len(ids) >= 1 << _RB or not all(type(i) is str for i in ids):
            return None
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.clear()
        e = _CACHE[ck] = _Entry(ids, fds, _LEN.pack(len(s)) + s)
    if _NATIVE:
        _C.remember(members, s, e, Member)
    return e


def _order(e, k: bytes) -> list:
    """Member indexes by descending (score, node_id): one int per member, score above rank."""
    h = _h
    vals = [h(hd + k) << _RB | r for hd, r in e.ranked]
    vals.sort(reverse=True)
    by_rank = e.by_rank
    return [by_rank[v & _MASK] for v in vals]


def place(key, members: Sequence, n: int, ns="default") -> list:
    """``n`` members for (ns, key): distinct failure domains first, in preference order,
    then the best remaining members of any domain. Raises InvalidArgument when there are
    fewer than ``n`` members."""
    if n < 1:
        raise InvalidArgument(f"cannot place on {n} nodes")
    e = _entry(members, ns)
    if e is None:
        return _place_any(key, members, n, ns)
    if e.dup:
        raise InvalidArgument("duplicate node_id in the member list")
    if n > len(members):
        raise InvalidArgument(f"placement needs {n} nodes but the cluster has {len(members)}")
    if _NATIVE and _h is _XXH3:
        return _C.place(e.table, _b(key), members, n)
    dom = e.dom
    chosen, seen, rest = [], set(), []
    for i in _order(e, _b(key)):
        d = dom[i]
        if d in seen:
            rest.append(i)
        else:
            seen.add(d)
            chosen.append(i)
            if len(chosen) == n:
                break  # the rest can only come after these
    return [members[i] for i in (chosen + rest)[:n]]


def _place_any(key, members: Sequence, n: int, ns) -> list:
    ids = [m.node_id for m in members]
    if len(set(ids)) != len(ids):
        raise InvalidArgument("duplicate node_id in the member list")
    if n > len(members):
        raise InvalidArgument(f"placement needs {n} nodes but the cluster has {len(members)}")
    pref = _preference_any(key, members, ns)
    chosen, seen, rest = [], set(), []
    for m in pref:
        d = _domain(m)
        if d in seen:
            rest.append(m)
        else:
            seen.add(d)
            chosen.append(m)
    return (chosen + rest)[:n]


def place_positions(key, members: Sequence, n: int, ns="default") -> list:
    """``n`` members for (ns, key), one per position, by a greedy matching: every
    (position j, member) pair is weighted ``score(member, ns, key || j)`` and pairs are
    taken best first while both are free (distinct failure domains in a first round).
    Unlike ``place``, losing a member usually moves only the position it held (68 % of
    losses with one spare member over 5 positions, 89 % with 7 spares; no scheme can
    always manage it), so an erasure-coded object mostly keeps fragment j on position j
    through repairs and healthy reads keep concatenating."""
    if n < 1:
        raise InvalidArgument(f"cannot place on {n} nodes")
    if n > len(members):
        raise InvalidArgument(f"placement needs {n} nodes but the cluster has {len(members)}")
    e = _entry(members, ns)
    if e is None:
        return _place_positions_any(key, members, n, ns)
    if e.dup:
        raise InvalidArgument("duplicate node_id in the member list")
    if _NATIVE and _h is _XXH3:
        return _C.place_positions(e.table, _b(key), members, n)
    k = _b(key)
    h = _h
    heads = e.heads
    nm = len(heads)
    # flat[j * nm + i]: score of (position j, member i)
    tails, try_best = _shape(n, nm)
    flat = [h(hd + t) for t in [k + x for x in tails] for hd in heads]
    if try_best:
        # Each position's best member, when those lie in distinct domains, is the answer:
        # the greedy takes exactly these (nothing ranked above a position's best can
        # block it). Tried where that is likely (see _shape).
        best = []
        for j in range(0, n * nm, nm):
            r = flat[j:j + nm]
            top = max(r)
            if r.count(top) != 1:
                break
            best.append(r.index(top))
        else:
            if len({e.dom[i] for i in best}) == n:
                return [members[i] for i in best]
    chosen = _greedy(flat, n, e)
    if chosen is None:  # equal scores decided a step: the node_id and position tie-breaks
        return _place_positions_any(key, members, n, ns)
    return [members[i] for i in chosen]


def _greedy(flat: list, n: int, e: _Entry):
    """The matching of place_positions on its score matrix, as member indexes per position;
    None when two scores are equal (the caller then runs the plain form, which breaks
    ties by node_id and position).

    The plain form scans all pairs best first and takes a pair while its position and its
    member (and, in a first round, its failure domain) are free: since pairs only ever lose
    eligibility, that is taking the best eligible pair over and over. Here ineligible pairs
    are set to -1 (below every score) by slice assignments, and max() finds the next one."""
    if len(set(flat)) != len(flat):
        return None
    nm = len(e.dom)
    dom, dm = e.dom, e.dmembers
    chosen: list = [None] * n
    used = [False] * nm
    negrow, negcol = [-1] * nm, [-1] * n
    work = flat[:]
    left = n
    for spread in (True, False):  # distinct failure domains first, then any member
        if not spread:
            if not left:
                break
            work = flat[:]  # second round: every free position x unused member again
            for j in range(n):
                if chosen[j] is not None:
                    work[j * nm:(j + 1) * nm] = negrow
            for i in range(nm):
                if used[i]:
                    work[i::nm] = negcol
        while left:
            if left == 1 and n == nm and e.distinct:
                # one position and one member left, in a domain of its own: the scan's pick
                chosen[chosen.index(None)] = used.index(False)
                return chosen
            top = max(work)
            if top < 0:
                break  # no eligible pair left in this round
            j, i = divmod(work.index(top), nm)
            chosen[j] = i
            used[i] = True
            left -= 1
            work[j * nm:(j + 1) * nm] = negrow
            for x in (dm[dom[i]] if spread else (i,)):
                work[x::nm] = negcol
    return chosen


_SHAPES: dict = {}


def _shape(n: int, nm: int) -> tuple:
    """Per (positions, members): the suffixes ``_POS || j`` of the hashed keys, and whether
    to try each position's best member first: worth it when n independent picks among
    nm members are likely all distinct (>= 30 %; 4 % for 5 of 5, 52 % for 5 of 16)."""
    t = _SHAPES.get((n, nm))
    if t is None:
        if len(_SHAPES) >= _CACHE_MAX:
            _SHAPES.clear()
        p = 1.0
        for x in range(n):
            p *= (nm - x) / nm
        t = _SHAPES[(n, nm)] = ([_POS + _LEN.pack(j) for j in range(n)], p >= 0.3)
    return t


def _place_positions_any(key, members: Sequence, n: int, ns) -> list:
    ids = [m.node_id for m in members]
    if len(set(ids)) != len(ids):
        raise InvalidArgument("duplicate node_id in the member list")
    k = _b(key)
    s = _b(ns)
    ns_part = _LEN.pack(len(s)) + s
    h = _h
    # score(node, ns, key || _POS || j), with each node's prefix built once
    heads = [(_LEN.pack(len(nb)) + nb + ns_part, m)
             for m in members for nb in (m.node_id.encode(),)]
    pairs = []
    for j in range(n):
        tail = b"".join((k, _POS, _LEN.pack(j)))
        pairs += [(h(head + tail), m.node_id, -j, m) for head, m in heads]
    pairs.sort(reverse=True)
    chosen: list = [None] * n
    used: set[str] = set()
    for spread in (True, False):  # distinct failure domains first, then any member
        if None not in chosen:
            break  # every position placed in the first round (the common case)
        domains = {_domain(m) for m in chosen if m is not None}
        for _s, nid, neg_j, m in pairs:
            j = -neg_j
            if chosen[j] is not None or nid in used or (spread and _domain(m) in domains):
                continue
            chosen[j] = m
            used.add(nid)
            domains.add(_domain(m))
    return chosen


_POS = b"\x00pos"  # keeps per-position keys apart from plain keys
_XXH3 = xxhash.xxh3_64_intdigest
_h = _XXH3  # a module global: tests swap in a coarse hash to force ties (the C path is off then)


def _hashes_agree(c) -> bool:
    """True when ``c.xxh3_64`` (the system libxxhash this process loaded) is the xxhash
    package's xxh3_64 on inputs of every length XXH3 treats apart (0, 1-3, 4-8, 9-16,
    17-128, 129-240, longer, past a block). A library whose XXH3 predates its final form
    (before 0.8.0), or one a wheel meets at run time other than the one it was built
    against (the soname is the same), would place keys elsewhere than nodes hashing in
    Python: data written where no reader looks."""
    data = bytes(range(256)) * 24
    try:
        return all(c.xxh3_64(data[:n]) == _XXH3(data[:n])
                   for n in (0, 1, 3, 4, 8, 9, 16, 17, 100, 128, 129, 240, 241, 1024, 1025, 6000))
    except Exception:  # noqa: BLE001 - any failure of the probe: not usable
        return False


if _C is not None and not _hashes_agree(_C):
    logging.getLogger("kvstore").warning(
        "kvstore._placement: the linked libxxhash's xxh3_64 differs from the xxhash "
        "package's; placement hashes in Python")
    _C = None
# the C path: on when built, unless KVSTORE_NATIVE_PLACEMENT=0 (tests flip this to run both)
_NATIVE = _C is not None and os.environ.get("KVSTORE_NATIVE_PLACEMENT", "1").strip().lower() \
    not in ("0", "no", "false", "off")
_MASK = (1 << _RB) - 1
_SH = 2 * _RB


__all__ = ["Member", "place", "place_positions", "preference", "score"]
