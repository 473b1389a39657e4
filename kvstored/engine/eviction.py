"""DRAM eviction and admission: a segmented LRU per size class with a ghost of evicted keys.

Chosen by replaying the Mooncake conversation trace offline (benchmarks/trace_sim.py,
numbers in benchmarks/RESULTS.md). What the trace taught:

  * a new block is usually read again only at the next turn of its conversation,
    tens of seconds later: it must survive as long as plain LRU keeps it (SIEVE's
    hand, which drops unread new blocks first, lost a third of LRU's hits);
  * a block read once is read again far more often than a new one (42 % vs 24 %):
    read blocks go to a *protected* segment, evicted only once they are older
    than the oldest unread block by ``age_bonus`` x the resident count, so a
    protected block that stopped being read still ages out (the plain segmented
    LRU kept stale ones and lost to LRU at large capacities);
  * the best ``age_bonus`` depends on the cache size (about 2-4 at 2-5 % of the
    working set, about 1 at 10-20 %), so it *adapts* the way ARC sizes its lists:
    the ghost remembers which list an evicted key left; a key put again after
    leaving the protected list says protected entries age out too early (bonus
    up), one that left probation says the opposite (bonus down); each step is
    weighted by the ratio of the two ghosts' sizes as in ARC and scaled by
    1/resident, so a cache's worth of such hits moves the bonus by ``adapt_rate``;
  * a key put again soon after it was evicted (found in the *ghost*) was evicted
    too early: it comes back protected;
  * the last block of a looked-up chain is almost never reused (it is the partial
    block, which the next turn extends under a new key): when a lookup names a
    missing last key, its put enters a *cold* FIFO that is evicted first;
  * a prefix hit needs every earlier block, so a chain should leave from its tail:
    a lookup touches its hits deepest first (the head ends most recent), the gets
    that follow it do not undo that order (an entry the last lookup just touched
    keeps its place), and a new block whose parent the lookup named is linked just
    behind that parent when the parent was the previous insertion (the batch put
    of a chain's missing blocks), so the chain's first new block is evicted last;
  * the ghost holds as many keys as the cache (ARC's size): a larger one (it was
    4096 keys at least; now 64) protected too much in small caches and lost to LRU at 2 %
    on Mooncake's synthetic trace. It keeps 64-bit digests, not keys, in native code
    (``kvstored._index.Ghost``: ~17 B per evicted key instead of 76-90 B in a dict;
    docs/scale.md), or in a dict when the extension is not built (same decisions).

Every operation is O(1) (amortised where unevictable entries are skipped). Entries
are linked through their own ``newer``/``older`` fields; ``seg`` says which list.
Pinned, referenced and reserved slots are never chosen: the caller's ``evictable``
test decides (``victim_at(sc, now)``: not read and not pinned at ``now``), and a
skipped entry moves to the head of its list so the next search does not meet it again.

Two implementations make the same decisions (tests/engine/test_policy_native.py
replays the Mooncake trace and a synthetic workload with pins, readers and deletes
through both): ``Policy`` here, over any entries (the dict index's, tests' own), and
``NativePolicy`` for the packed index, whose lists, clock and age bonus live in C
(``kvstored._index.Lru``, native/index.c) and link the records' own fields, so a touch
or an eviction is one C call and builds no view of a neighbour (``make_policy``
picks it when the index is the packed one).

An entry's age (clock - stamp) counts at most ``STAMP_AGE_CAP`` ticks (2**27: 134 M
accesses) in both: the packed index keeps a stamp's low 28 bits (its 51-byte record,
issue 13) and sweeps older stamps up to the cap, so a stamp older than that compares as
exactly that old (``_eff``). Below the cap, decisions are those of exact stamps.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

PROBATION, PROTECTED, COLD = 0, 1, 2
NONE = -1  # not in any list (NVMe-only, or not committed)
STAMP_AGE_CAP = 1 << 27  # = kvstored._index.STAMP_AGE_CAP (tests/engine/test_policy_native.py)

# entries.INDEX_ENV (entries imports this module): tests set it to "dict" to run the
# engine without native structures, the ghost's included
_INDEX_ENV = "KVSTORED_INDEX"


class DictGhost:
    """The ghost without the native extension: digest -> origin in a dict whose order
    is the age (76-90 B per key: the int, the dict entry and index), and the digests in
    a list, oldest first, that ``trim`` walks. The same calls and results as
    ``kvstored._index.Ghost``, which keeps the digests masked to 64 bits (``hash()``
    values fit, so both tell the same digests apart).

    Why the list: a dict keeps a deleted entry's place until it is resized, and
    ``next(iter(d))`` steps over every such place before the oldest live key, so a
    ghost at its limit (one key in, the oldest out per eviction) spent up to ~100 us
    per eviction at 500 k keys. The list's entries for keys popped or added again
    are counted in ``_stale`` and stepped over once; the list is rebuilt from the
    dict when such entries outnumber the live ones."""

    __slots__ = ("_d", "_n", "_ring", "_head", "_stale")

    def __init__(self):
        self._d: dict = {}
        self._n = [0, 0, 0]
        self._ring: list = []  # digests, oldest first from _head
        self._head = 0
        self._stale: dict = {}  # digest -> its entries in _ring that are not live

    def add(self, digest: int, origin: int) -> None:
        """The newest digest; an existing one moves to the newest end."""
        d, n = self._d, self._n
        old = d.pop(digest, None)
        if old is not None:
            n[old] -= 1
            self._stale[digest] = self._stale.get(digest, 0) + 1
        d[digest] = origin
        n[origin] += 1
        ring = self._ring
        ring.append(digest)
        if len(ring) - self._head > 2 * len(d) + 1024:  # mostly stale: rebuild
            self._ring, self._head, self._stale = list(d), 0, {}

    def pop(self, digest: int) -> int | None:
        origin = self._d.pop(digest, None)
        if origin is not None:
            self._n[origin] -= 1
            self._stale[digest] = self._stale.get(digest, 0) + 1
        return origin

    def get(self, digest: int) -> int | None:
        return self._d.get(digest)

    def trim(self, limit: int) -> int:
        """Drop the oldest digests down to ``limit``; how many went."""
        if limit < 0:
            raise ValueError("trim(limit): limit must be >= 0")
        d, n, ring, stale = self._d, self._n, self._ring, self._stale
        head = self._head
        dropped = 0
        while len(d) > limit:
            h = ring[head]
            head += 1
            k = stale.get(h)
            if k:  # popped or added again since this entry
                if k == 1:
                    del stale[h]
                else:
                    stale[h] = k - 1
                continue
            n[d.pop(h)] -= 1
            dropped += 1
        if head > 1024 and head * 8 > len(ring):  # the entries it passed hold their ints
            del ring[:head]
            head = 0
        self._head = head
        return dropped

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, digest: int) -> bool:
        if not isinstance(digest, int):  # as the native one: a key is not a digest
            raise TypeError(f"a ghost digest is an int, not {type(digest).__name__}")
        return digest in self._d

    def items(self) -> list:
        """(digest, origin), oldest first."""
        return list(self._d.items())

    @property
    def counts(self) -> tuple:
        return tuple(self._n)

    @property
    def nbytes(self) -> int:
        # the dicts, the list, and the int objects it holds (hash() values: 32 B each)
        return (sys.getsizeof(self._d) + sys.getsizeof(self._ring) + sys.getsizeof(self._stale)
                + 32 * (len(self._ring) - self._head))


def make_ghost(kind: str = "auto"):
    """The ghost: ``native`` (kvstored._index.Ghost), ``dict`` (DictGhost) or ``auto``
    (native when the extension is built; ``KVSTORED_INDEX=dict`` in the environment, as
    tests set it, makes it the dict one)."""
    if kind not in ("auto", "native", "dict"):
        raise ValueError(f"ghost must be auto, native or dict, not {kind!r}")
    if kind == "auto" and os.environ.get(_INDEX_ENV) == "dict":
        kind = "dict"
    if kind != "dict":
        try:
            from kvstored._index import Ghost
        except ImportError:
            if kind == "native":
                raise
        else:
            return Ghost()
    return DictGhost()


class _List:
    """Doubly linked list through the entries' ``newer``/``older`` fields; head = newest."""

    __slots__ = ("head", "tail", "count")

    def __init__(self):
        self.head = None
        self.tail = None
        self.count = 0

    def push_head(self, e) -> None:
        e.older = self.head
        e.newer = None
        if self.head is not None:
            self.head.newer = e
        self.head = e
        if self.tail is None:
            self.tail = e
        self.count += 1

    # Each link is read once: with the packed index a read builds a view of the record.
    def insert_behind(self, ref, e) -> None:
        """Link ``e`` just older than ``ref`` (which is in this list)."""
        older = ref.older
        e.newer = ref
        e.older = older
        if older is not None:
            older.newer = e
        else:
            self.tail = e
        ref.older = e
        self.count += 1

    def remove(self, e) -> None:
        newer, older = e.newer, e.older
        if newer is not None:
            newer.older = older
        else:
            self.head = older
        if older is not None:
            older.newer = newer
        else:
            self.tail = newer
        e.newer = e.older = None
        self.count -= 1


def _check(protected_share, age_bonus, adapt_rate, bonus_max, ghost_min) -> None:
    if not 0 < protected_share < 1:
        raise ValueError("protected_share must be in (0, 1)")
    if not 0 <= age_bonus <= bonus_max:
        raise ValueError("age_bonus must be in [0, bonus_max]")
    if adapt_rate < 0:
        raise ValueError("adapt_rate must be >= 0")
    if ghost_min < 0:
        raise ValueError("ghost_min must be >= 0")


class ClassQueues:
    """The three lists of one size class."""

    __slots__ = ("lists",)

    def __init__(self):
        self.lists = (_List(), _List(), _List())  # PROBATION, PROTECTED, COLD

    @property
    def count(self) -> int:
        return sum(lst.count for lst in self.lists)


class Policy:
    """Per size class queues plus the store-wide ghost, stamps and chain hints.

    ``protected_share``: at most this share of a class's entries is protected;
    beyond it the least recent protected entry goes back to probation.
    ``age_bonus``: a protected entry is evicted before the oldest probation one
    only when its last access is older by more than ``age_bonus`` x (resident
    entries) accesses. It is the starting value; it then adapts on ghost hits by
    ``adapt_rate`` (0: fixed) within [0, ``bonus_max``]. Share and rate were picked
    on the trace's first half and checked on its second half and on a synthetic
    trace (RESULTS.md); rates from 2 to 32 give nearly the same hit ratios.
    ``ghost``: ``auto``, ``native`` or ``dict`` (``make_ghost``); either makes the same
    decisions.
    """

    def __init__(self, nclasses: int, *, protected_share: float = 0.5, age_bonus: float = 1.0,
                 ghost_min: int = 64, hint_limit: int = 4096,
                 parent_limit: int = 16384, adapt_rate: float = 8.0,
                 bonus_max: float = 8.0, ghost: str = "auto"):
        _check(protected_share, age_bonus, adapt_rate, bonus_max, ghost_min)
        self.queues = [ClassQueues() for _ in range(nclasses)]
        self.protected_share = protected_share
        self.age_bonus = age_bonus
        self.ghost_min = ghost_min
        self.hint_limit = hint_limit
        self.clock = 0  # one tick per access or insertion
        self.resident = 0
        self.adapt_rate = adapt_rate
        self.bonus_max = bonus_max
        # hash((ns, key)) of evicted entries, oldest first -> the list it left (COLD also
        # stands for "no list": such a ghost hit protects but does not adapt; NativePolicy
        # digests the record's fingerprint instead: same decisions). A digest,
        # not the key (~186 B with the key bytes and the tuple): a rare collision only
        # admits one object as protected. make_ghost: native, or a dict.
        self.ghost = make_ghost(ghost)
        self.tail_hints: dict = {}  # (ns, key) of missing chain tails named by a lookup
        # (ns, key) of a missing block named by a lookup -> (ns, key) of the block before it
        self.parents: dict = {}
        self.parent_limit = parent_limit
        self._last_insert = None  # the entry inserted last (a chain's previous block?)
        self._lookup_clock = (0, 0)  # (from, to]: the stamps the last lookup's hits got
        self.counters = {"ghost_hits": 0, "cold_inserts": 0}

    # ------------------------------------------------------------ membership
    def insert(self, e) -> None:
        """A newly committed entry."""
        k = (e.ns, e.key)
        origin = self.ghost.pop(hash(k))
        if origin is not None:
            self._ghost_hit(origin)
            self.tail_hints.pop(k, None)
            self.counters["ghost_hits"] += 1
            self._push(e, PROTECTED)
            self._balance(e.sc.index)
        elif k in self.tail_hints:
            del self.tail_hints[k]
            self.counters["cold_inserts"] += 1
            self._push(e, COLD)
        else:
            self._push_probation(e, k)
        self._last_insert = e

    def insert_loaded(self, e) -> None:
        """An entry promoted from NVMe: it was read, so it is protected."""
        self._push(e, PROTECTED)
        self._balance(e.sc.index)

    def touch(self, e) -> None:
        """An access (get, lookup, exists, dedup put): move to the protected head."""
        if e.seg == NONE:
            return
        lo, hi = self._lookup_clock
        if lo < self._eff(e.stamp) <= hi:
            return  # the get of a hit the last lookup just ordered: keep the chain's order
        lst = self.queues[e.sc.index].lists
        lst[e.seg].remove(e)
        self.clock += 1
        e.stamp = self.clock
        e.seg = PROTECTED
        lst[PROTECTED].push_head(e)
        self._balance(e.sc.index)

    def touch_chain(self, entries: list) -> None:
        """A prefix lookup's hits: deepest first, so the chain's head ends most recent and
        a chain is evicted from its tail (a prefix hit needs every earlier block)."""
        start = self.chain_begin()
        self.touch_run(entries)
        self.chain_end(start)

    # touch_chain in parts, for a chain touched a part at a time (Store's *_steps, which
    # give the event loop back between parts): begin, the parts deepest first, end
    def chain_begin(self) -> int:
        self._lookup_clock = (0, 0)
        return self.clock

    def touch_run(self, entries: list) -> None:
        for e in reversed(entries):
            self.touch(e)

    def chain_end(self, start: int) -> None:
        self._lookup_clock = (start, self.clock)

    def touch_keys(self, index, ns: bytes, keys: list) -> None:
        """``touch_run`` of the entries ``index`` holds under ``keys`` (a batch call's
        earlier steps: their entries may have gone stale while the loop ran); missing and
        unverified ones are left out."""
        get = index.get
        fe = []
        for k in keys:
            e = get(ns, k)
            if e is not None and not e.unverified:
                fe.append(e)
        self.touch_run(fe)

    def remove(self, e, evicted: bool = False) -> None:
        """Unlink ``e`` (it leaves DRAM); ``evicted``: it also left the store by eviction,
        so remember its key in the ghost."""
        seg = e.seg
        if seg != NONE:
            self.queues[e.sc.index].lists[seg].remove(e)
            e.seg = NONE
            self.resident -= 1
        if evicted:
            g = self.ghost
            g.add(hash((e.ns, e.key)), COLD if seg == NONE else seg)
            g.trim(max(self.ghost_min, self.resident))

    def in_ghost(self, ns: bytes, key: bytes) -> int | None:
        """The list an evicted key left (PROBATION, PROTECTED or COLD), or None."""
        return self.ghost.get(hash((ns, key)))

    def note_chain(self, ns: bytes, keys: list, hit: int) -> None:
        """A prefix lookup found ``hit`` of ``keys``: a missing last key is a chain tail."""
        if hit < len(keys) and len(keys) > 1:
            h = self.tail_hints
            h[(ns, keys[-1])] = None
            while len(h) > self.hint_limit:
                del h[next(iter(h))]
            if self.parent_limit:
                par = self.parents
                prev = keys[hit]
                for k in keys[hit + 1:]:
                    par[(ns, k)] = (ns, prev)
                    prev = k
                while len(par) > self.parent_limit:
                    del par[next(iter(par))]

    # --------------------------------------------------------------- victims
    def victim_at(self, sc_index: int, now: float):
        """``victim`` of the entries neither read (refs) nor pinned at ``now``."""
        return self.victim(sc_index, lambda e: e.refs == 0 and not e.pinned(now))

    def victim(self, sc_index: int, evictable: Callable[[object], bool]):
        """The next entry of class ``sc_index`` to evict, or None if none is evictable."""
        lists = self.queues[sc_index].lists
        tail = self._tail
        if lists[COLD].count:  # (an empty list is skipped without the call: once per eviction)
            cold = tail(lists[COLD], evictable)
            if cold is not None:
                return cold
        prob = tail(lists[PROBATION], evictable) if lists[PROBATION].count else None
        prot = tail(lists[PROTECTED], evictable) if lists[PROTECTED].count else None
        if prob is None:
            return prot
        if prot is None:
            return prob
        sp, sb = self._eff(prot.stamp), self._eff(prob.stamp)
        if sp + self.age_bonus * max(self.resident, 1) < sb:
            return prot
        # a protected tail whose age reached the cap goes before a probation tail whose age
        # did not: with ages capped, a bonus term past the cap (bonus x resident >= 2**27:
        # ~16-90 M resident objects) would keep it for ever, where exact stamps let it age
        # out (as the native policy does)
        floor = self.clock - STAMP_AGE_CAP
        return prot if sp <= floor < sb else prob

    def count(self, sc_index: int) -> int:
        return self.queues[sc_index].count

    @property
    def ghost_n(self) -> tuple:
        """Ghost keys by the list they left (PROBATION, PROTECTED, COLD)."""
        return self.ghost.counts

    # --------------------------------------------------------------- helpers
    def _eff(self, stamp: int) -> int:
        """The stamp compared: an age past STAMP_AGE_CAP counts as the cap (as the native
        policy's stamp_eff, whose stamps keep 28 bits)."""
        floor = self.clock - STAMP_AGE_CAP
        return stamp if stamp > floor else floor

    def _ghost_hit(self, origin: int) -> None:
        """``origin``: the list a key put again had left (the ghost has let it go)."""
        if not self.adapt_rate or origin == COLD:
            return
        n = self.ghost.counts
        step = self.adapt_rate / max(self.resident, 1)
        prob, prot = n[PROBATION] + 1, n[PROTECTED] + 1
        if origin == PROTECTED:
            self.age_bonus = min(self.bonus_max, self.age_bonus + step * max(1.0, prob / prot))
        else:
            self.age_bonus = max(0.0, self.age_bonus - step * max(1.0, prot / prob))

    def _push(self, e, seg: int) -> None:
        self.clock += 1
        e.stamp = self.clock
        e.seg = seg
        self.queues[e.sc.index].lists[seg].push_head(e)
        self.resident += 1

    def _push_probation(self, e, k) -> None:
        """A new entry: at the probation head, or just behind its chain parent when the
        parent was inserted just before it (same stamp: as old as its parent)."""
        parent = self.parents.pop(k, None) if self.parents else None
        last = self._last_insert
        if (parent is not None and last is not None and last.seg == PROBATION
                and last.sc.index == e.sc.index and (last.ns, last.key) == parent):
            self.clock += 1  # an insertion ticks the clock wherever it is linked
            e.stamp = last.stamp
            e.seg = PROBATION
            self.queues[e.sc.index].lists[PROBATION].insert_behind(last, e)
            self.resident += 1
            return
        self._push(e, PROBATION)

    def _balance(self, sc_index: int) -> None:
        lists = self.queues[sc_index].lists
        prot = lists[PROTECTED]
        total = prot.count + lists[PROBATION].count + lists[COLD].count
        if prot.count > 1 and prot.count > self.protected_share * total:
            e = prot.tail
            prot.remove(e)
            e.seg = PROBATION  # keeps its stamp: it is as old as its last access
            lists[PROBATION].push_head(e)

    @staticmethod
    def _tail(lst: _List, evictable):
        """The oldest evictable entry of ``lst``; unevictable ones met on the way move to
        the head (bounded: each entry is looked at once per call)."""
        for _ in range(lst.count):
            e = lst.tail
            if evictable(e):
                return e
            if lst.count == 1:
                return None
            lst.remove(e)
            lst.push_head(e)
        return None


class NativePolicy(Policy):
    """``Policy`` for the packed index with its lists in C (``kvstored._index.Lru``,
    native/index.c): the same decisions (tests/engine/test_policy_native.py replays
    workloads through both), made without a Python frame or an ``Entry`` view per
    neighbour. The lists are the records' own link fields, as with ``Policy``; the list
    heads, counts, clock, resident count, the last lookup's stamps and the age bonus are
    the ``Lru``'s. ``note_chain`` is Policy's, on the dicts the ``Lru`` shares.
    ``victim(sc, evictable)`` takes the time ``now`` (refs and pins are tested in C) or a
    callable, as Policy's.

    The ghost's digest of a key is its record's fingerprint (``Lru.digest``: a seeded
    64-bit hash of the namespace's name and the key, the same for a key while the index
    lives), not Policy's hash((ns, key)): an insert or an eviction reads no key (a DRAM
    object's is in the arena's key area, and an eviction would read and verify it).
    Other values, the same decisions: either digest collides for ~2**-64 of key pairs."""

    def __init__(self, nclasses: int, index, *, protected_share: float = 0.5,
                 age_bonus: float = 1.0, ghost_min: int = 64, hint_limit: int = 4096,
                 parent_limit: int = 16384, adapt_rate: float = 8.0,
                 bonus_max: float = 8.0, ghost: str = "auto"):
        from kvstored._index import Lru
        _check(protected_share, age_bonus, adapt_rate, bonus_max, ghost_min)
        self.protected_share = protected_share
        self.ghost_min = ghost_min
        self.hint_limit = hint_limit
        self.parent_limit = parent_limit
        self.adapt_rate = adapt_rate
        self.bonus_max = bonus_max
        self.tail_hints = {}
        self.parents = {}
        self.counters = {"ghost_hits": 0, "cold_inserts": 0}
        self.lru = lru = Lru(index, nclasses, make_ghost(ghost), self.tail_hints, self.parents,
                             self.counters, protected_share, age_bonus, adapt_rate, bonus_max,
                             ghost_min)
        # the Lru's methods themselves: no Python frame between the Store and C
        self.insert = lru.insert
        self.insert_loaded = lru.insert_loaded
        self.touch = lru.touch
        self.touch_run = lru.touch_run
        self.touch_chain = lru.touch_chain
        self.touch_keys = lru.touch_keys
        self.chain_begin = lru.chain_begin
        self.chain_end = lru.chain_end
        self.remove = lru.remove
        self.victim = lru.victim
        self.victim_at = lru.victim
        self.count = lru.count

    def in_ghost(self, ns: bytes, key: bytes) -> int | None:
        """The list an evicted key left (PROBATION, PROTECTED or COLD), or None."""
        return self.lru.ghost.get(self.lru.digest(ns, key))

    @property
    def ghost(self):
        return self.lru.ghost

    @ghost.setter
    def ghost(self, g) -> None:
        self.lru.ghost = g

    @property
    def age_bonus(self) -> float:
        return self.lru.age_bonus

    @age_bonus.setter
    def age_bonus(self, v: float) -> None:
        self.lru.age_bonus = v

    @property
    def clock(self) -> int:
        return self.lru.clock

    @property
    def resident(self) -> int:
        return self.lru.resident

    def order(self, sc_index: int, seg: int) -> list:
        """The entries of one list, newest first."""
        return self.lru.order(sc_index, seg)


def make_policy(nclasses: int, index, kind: str = "auto", **kw) -> Policy:
    """The DRAM tier's policy: ``native`` (NativePolicy: lists in C; the packed index
    only), ``python`` (Policy) or ``auto`` (native when ``index`` is the packed one)."""
    if kind not in ("auto", "native", "python"):
        raise ValueError(f"policy must be auto, native or python, not {kind!r}")
    if kind == "native" or (kind == "auto" and getattr(index, "kind", None) == "packed"):
        return NativePolicy(nclasses, index, **kw)
    return Policy(nclasses, **kw)
