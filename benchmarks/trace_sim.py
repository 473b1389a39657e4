"""Offline cache simulator for KV-cache prefix traces (Mooncake trace format).

Each trace request is a chain of block ids (``hash_ids``). Replayed the way an
inference engine uses a KV store: look up the chain (prefix hit = how many
leading blocks are stored), get the hit blocks, put the missing ones (blocks
after the first miss; one already stored is a dedup, which counts as a touch).
The prefix hit ratio is hit blocks / block requests.

Capacity is in blocks (a share of the trace's unique blocks). Policies:

  lru, fifo, belady   references (belady: evict the block used farthest in the
                      future, and do not admit a block whose next use is farther
                      than every cached one: the offline optimum per block)
  sieve               kvstored before issue 12 (visited bit set by a get only)
  sieve-vi            SIEVE with the visited bit set on insert and on lookup
  s3fifo              S3-FIFO: 10 % small FIFO, main FIFO, ghost of main's size
  2q                  2Q / LRU-2 flavour: A1in FIFO 25 %, A1out ghost 50 %, Am LRU
  lru-2nd             LRU, admitting a block only the second time it is put
                      (a ghost of capacity keys remembers first sightings)
  arc                 ARC (adaptive recency/frequency split, two ghosts)
  slru                segmented LRU, 20 % protected, no ghost
  lru-chain           LRU where a request's chain is ordered head-most-recent:
                      the deepest blocks of a chain go first, since a prefix hit
                      needs every earlier block
  kvstored            the engine's policy itself (kvstored.engine.eviction.Policy)
                      driven the way the daemon drives it: segmented LRU with a
                      ghost of the cache's size, aging of protected entries (age
                      bonus adapted on ghost hits), lookups as accesses, chain tails
                      named by a lookup entering a cold FIFO, chains leaving from
                      their tail (gets keep a lookup's order, new blocks linked
                      behind their parent)
  kvstored-fixed      the same with the age bonus fixed at 1 (no adaptation)
  wtinylfu            W-TinyLFU: 1 % window LRU, main SLRU (80 % protected); a block
                      leaving the window enters main only if it was seen more often
                      than main's victim. Counts are exact and halved every 10 x
                      capacity accesses (an upper bound on what a count-min sketch
                      with a doorkeeper would estimate)
  classes-*           online-learned reuse classes: each block has a class from what
                      the store sees when it is put or read (-hits: read blocks by
                      hit count 1/2/3+, all new blocks one class; -np: new blocks
                      also by log2 of the request's new-block count and of their
                      position among them; -gap: new blocks of a request that hit
                      its history, by log2 of that history's age / resident); each
                      class learns its reuse rate online (reused / left, ghost hits
                      count as late reuses, halved every capacity evictions) and
                      keeps its blocks for a lifetime proportional to that rate:
                      the victim is the class tail furthest past its lifetime

    python benchmarks/trace_sim.py [--trace F] [--caps 2,5,10,20] [--policies ...|all]
                                   [--split] [--markdown]

Default policies: lru, fifo, belady, kvstored (``all`` adds the other candidates;
about 5 s per policy and capacity on this machine).

``--split`` also runs the first and second half of the trace separately
(capacities relative to each half's own unique blocks), to check that a
policy's lead is not an artefact of one stretch of the trace.
"""
from __future__ import annotations

import argparse
import heapq
import json
import os
import sys
import time

DEFAULT_TRACE = os.environ.get(
    "KVSTORE_TRACE", "/work/shared/traces/mooncake_conversation_trace.jsonl")


def load_trace(path: str, limit: int | None = None) -> list[list[int]]:
    """The block chains of a trace file, one list of block ids per request."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
                ids = rec["hash_ids"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not a trace record with hash_ids ({e})") from None
            if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
                raise ValueError(f"{path}:{n}: hash_ids must be a list of integers")
            out.append(ids)
            if limit is not None and len(out) >= limit:
                break
    return out


def synthetic_trace(n: int = 12000, seed: int = 7) -> list[list[int]]:
    """A tool-agent-shaped trace, to check a policy off the conversation trace: 300
    shared prompts of 4-40 blocks (Zipf popularity); 60 % of requests continue one of
    the 200 latest sessions with 1-6 new blocks, the others open a session on a
    prompt with 1-10 blocks of their own; each ends with a never-reused partial block."""
    import random

    rnd = random.Random(seed)
    ids = iter(range(1, 1 << 62))
    prompts = [[next(ids) for _ in range(rnd.randint(4, 40))] for _ in range(300)]
    weights = [1 / (i + 1) ** 0.9 for i in range(300)]
    sessions: list[list[int]] = []
    out = []
    for _ in range(n):
        if sessions and rnd.random() < 0.6:
            s = rnd.choice(sessions[-200:])
            s.extend(next(ids) for _ in range(rnd.randint(1, 6)))
        else:
            s = list(rnd.choices(prompts, weights)[0]) + [next(ids) for _ in range(rnd.randint(1, 10))]
            sessions.append(s)
        out.append(list(s) + [next(ids)])
    return out


def unique_blocks(reqs: list[list[int]]) -> int:
    return len({b for r in reqs for b in r})


# --------------------------------------------------------------------- policies
class _Node:
    __slots__ = ("key", "prev", "next", "bit", "q")

    def __init__(self, key):
        self.key = key
        self.prev = self.next = None
        self.bit = 0
        self.q = 0


class _DList:
    """Doubly linked list; head = most recent."""

    __slots__ = ("head", "tail", "n")

    def __init__(self):
        self.head = self.tail = None
        self.n = 0

    def push_head(self, x: _Node) -> None:
        x.prev, x.next = None, self.head
        if self.head is not None:
            self.head.prev = x
        self.head = x
        if self.tail is None:
            self.tail = x
        self.n += 1

    def insert_after(self, ref: _Node, x: _Node) -> None:
        """Put x just older than ref."""
        x.prev, x.next = ref, ref.next
        if ref.next is not None:
            ref.next.prev = x
        else:
            self.tail = x
        ref.next = x
        self.n += 1

    def remove(self, x: _Node) -> None:
        if x.prev is not None:
            x.prev.next = x.next
        else:
            self.head = x.next
        if x.next is not None:
            x.next.prev = x.prev
        else:
            self.tail = x.prev
        x.prev = x.next = None
        self.n -= 1


class Policy:
    """contains / touch (lookup or get hit, dedup put) / insert (put of a missing block).

    ``request`` replays one chain; subclasses may override it for chain order.
    """

    def __init__(self, cap: int):
        self.cap = max(1, cap)

    def contains(self, k) -> bool:
        raise NotImplementedError

    def touch(self, k) -> None:
        pass

    def insert(self, k) -> None:
        raise NotImplementedError

    def request(self, chain: list) -> int:
        h = 0
        for k in chain:
            if not self.contains(k):
                break
            h += 1
        for k in chain[:h]:  # the lookup, then the get of the hit prefix
            self.touch(k)
        for k in chain[h:]:
            if self.contains(k):
                self.touch(k)
            else:
                self.insert(k)
        return h


class LRU(Policy):
    def __init__(self, cap):
        super().__init__(cap)
        self.m: dict = {}

    def contains(self, k):
        return k in self.m

    def touch(self, k):
        m = self.m
        m[k] = m.pop(k)

    def insert(self, k):
        if len(self.m) >= self.cap:
            del self.m[next(iter(self.m))]
        self.m[k] = None


class FIFO(LRU):
    def touch(self, k):
        pass


class LRU2nd(LRU):
    """Admit on second sight: the first put of a key only records it in a ghost."""

    def __init__(self, cap):
        super().__init__(cap)
        self.ghost: dict = {}

    def insert(self, k):
        if k not in self.ghost:
            self.ghost[k] = None
            if len(self.ghost) > self.cap:
                del self.ghost[next(iter(self.ghost))]
            return
        del self.ghost[k]
        super().insert(k)


class Sieve(Policy):
    """``visit_insert``: new entries start visited; ``lookup_visits``: a lookup sets the bit."""

    def __init__(self, cap, visit_insert=False, lookup_visits=False):
        super().__init__(cap)
        self.m: dict = {}
        self.q = _DList()
        self.hand = None
        self.vi = visit_insert
        self.lv = lookup_visits

    def contains(self, k):
        return k in self.m

    def touch(self, k):
        self.m[k].bit = 1

    def request(self, chain):
        # old kvstored: lookup does not count; the get of each hit does
        return Policy.request(self, chain)

    def _evict(self):
        x = self.hand or self.q.tail
        while True:
            if x is None:
                x = self.q.tail
            if x.bit:
                x.bit = 0
                x = x.prev
            else:
                self.hand = x.prev
                self.q.remove(x)
                del self.m[x.key]
                return

    def insert(self, k):
        if len(self.m) >= self.cap:
            self._evict()
        x = _Node(k)
        x.bit = 1 if self.vi else 0
        self.m[k] = x
        self.q.push_head(x)


class S3FIFO(Policy):
    def __init__(self, cap, small=0.1):
        super().__init__(cap)
        self.s: dict = {}  # key -> freq, FIFO order
        self.mq: dict = {}
        self.ghost: dict = {}
        self.scap = max(1, int(cap * small))
        self.mcap = self.cap - self.scap

    def contains(self, k):
        return k in self.s or k in self.mq

    def touch(self, k):
        if k in self.s:
            self.s[k] = min(self.s[k] + 1, 3)
        else:
            self.mq[k] = min(self.mq[k] + 1, 3)

    def _evict_main(self):
        mq = self.mq
        while True:
            k = next(iter(mq))
            f = mq.pop(k)
            if f > 0:
                mq[k] = f - 1
            else:
                return

    def _evict(self):
        if len(self.s) >= self.scap or not self.mq:
            while self.s:
                k = next(iter(self.s))
                f = self.s.pop(k)
                if f > 0:
                    if len(self.mq) >= self.mcap:
                        self._evict_main()
                    self.mq[k] = 0
                else:
                    self.ghost[k] = None
                    if len(self.ghost) > self.mcap:
                        del self.ghost[next(iter(self.ghost))]
                    return
        self._evict_main()

    def insert(self, k):
        while len(self.s) + len(self.mq) >= self.cap:
            self._evict()
        if k in self.ghost:
            del self.ghost[k]
            self.mq[k] = 0
        else:
            self.s[k] = 0


class TwoQ(Policy):
    def __init__(self, cap):
        super().__init__(cap)
        self.a1: dict = {}
        self.am: dict = {}
        self.out: dict = {}
        self.kin = max(1, cap // 4)
        self.kout = max(1, cap // 2)

    def contains(self, k):
        return k in self.a1 or k in self.am

    def touch(self, k):
        if k in self.am:
            self.am[k] = self.am.pop(k)

    def insert(self, k):
        if len(self.a1) + len(self.am) >= self.cap:
            if len(self.a1) > self.kin or not self.am:
                v = next(iter(self.a1))
                del self.a1[v]
                self.out[v] = None
                if len(self.out) > self.kout:
                    del self.out[next(iter(self.out))]
            else:
                del self.am[next(iter(self.am))]
        if k in self.out:
            del self.out[k]
            self.am[k] = None
        else:
            self.a1[k] = None


class LRUChain(Policy):
    """LRU whose order inside one chain puts the head most recent: hits are touched
    deepest first and a new block is linked just behind its parent, so a chain is
    evicted from its tail and a prefix stays hittable."""

    def __init__(self, cap):
        super().__init__(cap)
        self.m: dict = {}
        self.q = _DList()

    def contains(self, k):
        return k in self.m

    def request(self, chain):
        m, q = self.m, self.q
        h = 0
        for k in chain:
            if k not in m:
                break
            h += 1
        for k in reversed(chain[:h]):
            q.remove(m[k])
            q.push_head(m[k])
        parent = m[chain[h - 1]] if h else None
        for k in chain[h:]:
            x = m.get(k)
            if x is not None:
                q.remove(x)
                q.push_head(x)
                parent = x
                continue
            if len(m) >= self.cap:
                v = q.tail
                q.remove(v)
                del m[v.key]
                if v is parent:
                    parent = None
            x = _Node(k)
            m[k] = x
            if parent is not None:
                q.insert_after(parent, x)
            else:
                q.push_head(x)
            parent = x
        return h


class SLRU(Policy):
    """Segmented LRU: a hit moves a block to the protected segment (``share`` of
    capacity); protected overflow goes back to probation; probation is evicted first."""

    def __init__(self, cap, share=0.2):
        super().__init__(cap)
        self.pr: dict = {}
        self.pt: dict = {}
        self.pcap = int(cap * share)

    def contains(self, k):
        return k in self.pr or k in self.pt

    def touch(self, k):
        if k in self.pt:
            self.pt[k] = self.pt.pop(k)
            return
        del self.pr[k]
        self.pt[k] = None
        if len(self.pt) > self.pcap:
            v = next(iter(self.pt))
            del self.pt[v]
            self.pr[v] = None

    def insert(self, k):
        if len(self.pr) + len(self.pt) >= self.cap:
            d = self.pr if self.pr else self.pt
            del d[next(iter(d))]
        self.pr[k] = None


class ARC(Policy):
    """Adaptive Replacement Cache (Megiddo and Modha), block granularity."""

    def __init__(self, cap):
        super().__init__(cap)
        self.t1: dict = {}
        self.t2: dict = {}
        self.b1: dict = {}
        self.b2: dict = {}
        self.p = 0

    def contains(self, k):
        return k in self.t1 or k in self.t2

    def touch(self, k):
        if k in self.t1:
            del self.t1[k]
        else:
            del self.t2[k]
        self.t2[k] = None

    def _replace(self, in_b2):
        if self.t1 and (len(self.t1) > self.p or (in_b2 and len(self.t1) == self.p)):
            v = next(iter(self.t1))
            del self.t1[v]
            self.b1[v] = None
        else:
            v = next(iter(self.t2))
            del self.t2[v]
            self.b2[v] = None

    def insert(self, k):
        c = self.cap
        if k in self.b1:
            self.p = min(c, self.p + max(1, len(self.b2) // max(1, len(self.b1))))
            self._replace(False)
            del self.b1[k]
            self.t2[k] = None
            return
        if k in self.b2:
            self.p = max(0, self.p - max(1, len(self.b1) // max(1, len(self.b2))))
            self._replace(True)
            del self.b2[k]
            self.t2[k] = None
            return
        l1 = len(self.t1) + len(self.b1)
        if l1 == c:
            if len(self.t1) < c:
                del self.b1[next(iter(self.b1))]
                self._replace(False)
            else:
                del self.t1[next(iter(self.t1))]
        elif l1 < c and l1 + len(self.t2) + len(self.b2) >= c:
            if l1 + len(self.t2) + len(self.b2) >= 2 * c:
                del self.b2[next(iter(self.b2))]
            self._replace(False)
        self.t1[k] = None


class _Class:
    index = 0


class _Block:
    """Stands in for a store Entry (the fields eviction.Policy uses)."""

    __slots__ = ("ns", "key", "sc", "seg", "stamp", "newer", "older")
    sc_one = _Class()

    def __init__(self, key):
        self.ns = b""
        self.key = key
        self.sc = self.sc_one
        self.seg = -1
        self.stamp = 0
        self.newer = self.older = None


class Kvstored(Policy):
    """kvstored.engine.eviction.Policy, driven as Store drives it for a client that
    looks a chain up, gets the hit prefix and puts the rest (one size class)."""

    def __init__(self, cap):
        super().__init__(cap)
        from kvstored.engine.eviction import Policy as EnginePolicy
        self.p = EnginePolicy(1)
        self.m: dict = {}

    def contains(self, k):
        return k in self.m

    def request(self, chain):
        m, p = self.m, self.p
        hits = []
        for k in chain:  # Store.lookup
            e = m.get(k)
            if e is None:
                break
            hits.append(e)
        p.touch_chain(hits)
        p.note_chain(b"", chain, len(hits))
        for e in hits:  # the gets (Store.acquire)
            p.touch(e)
        for k in chain[len(hits):]:  # the puts: a dedup is an access (Store.reserve)
            e = m.get(k)
            if e is not None:
                p.touch(e)
                continue
            if len(m) >= self.cap:
                v = p.victim(0, lambda e: True)
                p.remove(v, evicted=True)
                del m[v.key]
            e = _Block(k)
            m[k] = e
            p.insert(e)  # Store.commit
        return len(hits)


class KvstoredFixed(Kvstored):
    """The engine policy with adaptation off (the issue-12 first version)."""

    def __init__(self, cap):
        super().__init__(cap)
        from kvstored.engine.eviction import Policy as EnginePolicy
        self.p = EnginePolicy(1, adapt_rate=0.0)


class WTinyLFU(Policy):
    def __init__(self, cap, window=0.01, sample=10):
        super().__init__(cap)
        self.wcap = max(1, int(cap * window))
        self.mcap = max(1, self.cap - self.wcap)
        self.pcap = int(self.mcap * 0.8)
        self.w: dict = {}
        self.pr: dict = {}
        self.pt: dict = {}
        self.f: dict = {}
        self.n = 0
        self.reset_at = sample * cap

    def contains(self, k):
        return k in self.w or k in self.pr or k in self.pt

    def _count(self, k):
        self.f[k] = self.f.get(k, 0) + 1
        self.n += 1
        if self.n >= self.reset_at:  # aging: halve every count
            self.n //= 2
            self.f = {a: c // 2 for a, c in self.f.items() if c > 1}

    def touch(self, k):
        self._count(k)
        if k in self.w:
            self.w[k] = self.w.pop(k)
        elif k in self.pt:
            self.pt[k] = self.pt.pop(k)
        else:
            del self.pr[k]
            self.pt[k] = None
            if len(self.pt) > self.pcap:
                v = next(iter(self.pt))
                del self.pt[v]
                self.pr[v] = None

    def insert(self, k):
        self._count(k)
        self.w[k] = None
        if len(self.w) <= self.wcap:
            return
        c = next(iter(self.w))
        del self.w[c]
        if len(self.pr) + len(self.pt) < self.mcap:
            self.pr[c] = None
            return
        d = self.pr if self.pr else self.pt
        v = next(iter(d))
        if self.f.get(c, 0) > self.f.get(v, 0):
            del d[v]
            self.pr[c] = None


class LearnedClasses(Policy):
    """See the module docstring (classes-*). One LRU-ordered dict per class."""

    def __init__(self, cap, feat="hits"):
        super().__init__(cap)
        self.feat = feat
        self.lists: dict = {}  # class -> {key: stamp}, oldest first
        self.where: dict = {}  # key -> (class, hits)
        self.stat: dict = {}  # class -> [reused, left] (decayed)
        self.ghost: dict = {}  # key -> class it was evicted from
        self.clock = self.evictions = 0
        self.mult: dict = {}

    def contains(self, k):
        return k in self.where

    def _st(self, c):
        s = self.stat.get(c)
        if s is None:
            s = self.stat[c] = [1.0, 4.0]  # a weak prior: 25 %
        return s

    def _push(self, k, c, hits):
        self.clock += 1
        self.lists.setdefault(c, {})[k] = self.clock
        self.where[k] = (c, hits)

    def touch(self, k):
        c, hits = self.where[k]
        del self.lists[c][k]
        s = self._st(c)
        s[0] += 1
        s[1] += 1
        self._push(k, ("read", min(hits + 1, 3)), hits + 1)

    def _evict(self):
        if self.evictions % 256 == 0:  # lifetimes relative to a new block's
            new = [s for c, s in self.stat.items() if c[0] == "new"] or [self._st(("new",))]
            base = sum(s[0] for s in new) / sum(s[1] for s in new)  # all new blocks
            self.mult = {c: min(max((s[0] / s[1]) / base, 0.125), 8.0) for c, s in self.stat.items()}
        best = None
        for c, d in self.lists.items():
            if d:
                k = next(iter(d))
                score = (self.clock - d[k]) / self.mult.get(c, 1.0)
                if best is None or score > best[0]:
                    best = (score, c, k)
        _, c, k = best
        del self.lists[c][k]
        del self.where[k]
        self._st(c)[1] += 1
        self.ghost[k] = c
        while len(self.ghost) > max(len(self.where), 4096):
            del self.ghost[next(iter(self.ghost))]
        self.evictions += 1
        if self.evictions % self.cap == 0:
            for s in self.stat.values():
                s[0] *= 0.5
                s[1] *= 0.5

    def request(self, chain):
        where = self.where
        h = 0
        for k in chain:
            if k not in where:
                break
            h += 1
        gap = 0
        if h:
            c0 = where[chain[h - 1]][0]
            gap = self.clock - self.lists[c0][chain[h - 1]]
        for k in reversed(chain[:h]):  # lookup (deepest first), then the gets
            self.touch(k)
        for k in chain[:h]:
            self.touch(k)
        n = len(chain)
        for j in range(h, n):
            k = chain[j]
            if k in where:
                self.touch(k)
                continue
            while len(where) >= self.cap:
                self._evict()
            g = self.ghost.pop(k, None)
            if g is not None:  # evicted too early: a late reuse of its class
                self._st(g)[0] += 1
                self._push(k, ("read", 1), 1)
                continue
            if j == n - 1 and n > 1:
                c = ("tail",)
            elif self.feat == "np":
                c = ("new", min((n - h).bit_length(), 5), min((j - h).bit_length(), 4))
            elif self.feat == "gap" and h > 1:
                c = ("new", min((4 * gap // max(len(where), 1)).bit_length(), 4))
            else:
                c = ("new",)
            self._push(k, c, 0)
        return h


class Belady(Policy):
    """Offline optimum per block, with bypass; needs the whole sequence up front."""

    def __init__(self, cap, reqs):
        super().__init__(cap)
        inf = float("inf")
        # next use of each block request, by position in the flattened sequence
        seq = [k for r in reqs for k in r]
        nxt = [inf] * len(seq)
        last: dict = {}
        for i in range(len(seq) - 1, -1, -1):
            nxt[i] = last.get(seq[i], inf)
            last[seq[i]] = i
        self.nxt = nxt
        self.pos = 0
        self.cur: dict = {}  # key -> its next use
        self.heap: list = []

    def contains(self, k):
        return k in self.cur

    def request(self, chain):
        cur = self.cur
        h = 0
        for k in chain:
            if k not in cur:
                break
            h += 1
        for i, k in enumerate(chain):
            nu = self.nxt[self.pos + i]
            if k in cur:
                cur[k] = nu
                heapq.heappush(self.heap, (-nu, k))
                continue
            if nu == float("inf"):
                continue  # never used again: bypass
            while len(cur) >= self.cap:
                negnu, v = heapq.heappop(self.heap)
                if cur.get(v) != -negnu:
                    continue  # stale heap entry
                if -negnu <= nu:  # the new block is the farthest: do not admit it
                    heapq.heappush(self.heap, (negnu, v))
                    break
                del cur[v]
            if len(cur) < self.cap:
                cur[k] = nu
                heapq.heappush(self.heap, (-nu, k))
        self.pos += len(chain)
        return h


POLICIES = {
    "lru": LRU,
    "fifo": FIFO,
    "belady": None,  # built with the trace
    "sieve": lambda c: Sieve(c),
    "sieve-vi": lambda c: Sieve(c, visit_insert=True),
    "s3fifo": S3FIFO,
    "2q": TwoQ,
    "lru-2nd": LRU2nd,
    "arc": ARC,
    "slru": SLRU,
    "lru-chain": LRUChain,
    "kvstored": Kvstored,
    "kvstored-fixed": KvstoredFixed,
    "wtinylfu": WTinyLFU,
    "classes-hits": LearnedClasses,
    "classes-np": lambda c: LearnedClasses(c, "np"),
    "classes-gap": lambda c: LearnedClasses(c, "gap"),
}
DEFAULT_POLICIES = "lru,fifo,belady,kvstored"


def make(name: str, cap: int, reqs) -> Policy:
    if name == "belady":
        return Belady(cap, reqs)
    try:
        return POLICIES[name](cap)
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; one of {', '.join(POLICIES)}") from None


def run(name: str, cap: int, reqs) -> float:
    """Prefix hit ratio of one policy at ``cap`` blocks."""
    p = make(name, cap, reqs)
    hits = total = 0
    for chain in reqs:
        hits += p.request(chain)
        total += len(chain)
    return hits / total if total else 0.0


def table(reqs, caps_pct, policies) -> list[tuple]:
    uniq = unique_blocks(reqs)
    rows = []
    for pct in caps_pct:
        cap = max(1, int(uniq * pct / 100))
        rows.append((pct, cap, {p: run(p, cap, reqs) for p in policies}))
    return rows


def _print(title, rows, policies, markdown):
    print(f"\n{title}")
    if markdown:
        print("| capacity | blocks | " + " | ".join(policies) + " |")
        print("|---|---|" + "---|" * len(policies))
        for pct, cap, r in rows:
            print(f"| {pct:g} % | {cap} | " + " | ".join(f"{r[p]:.3f}" for p in policies) + " |")
    else:
        print(f"{'cap':>6} {'blocks':>7} " + " ".join(f"{p:>10}" for p in policies))
        for pct, cap, r in rows:
            print(f"{pct:>5g}% {cap:>7} " + " ".join(f"{r[p]:>10.3f}" for p in policies))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default=DEFAULT_TRACE)
    ap.add_argument("--caps", default="2,5,10,20", help="capacities, %% of unique blocks")
    ap.add_argument("--policies", default=DEFAULT_POLICIES, help="comma list, or 'all'")
    ap.add_argument("--split", action="store_true", help="also each half of the trace")
    ap.add_argument("--synthetic", action="store_true",
                    help="replay synthetic_trace() instead of --trace (a tool-agent shape)")
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args(argv)
    caps = [float(x) for x in a.caps.split(",") if x]
    pols = list(POLICIES) if a.policies == "all" else [p for p in a.policies.split(",") if p]
    for p in pols:
        if p not in POLICIES:
            ap.error(f"unknown policy {p!r}")
    reqs = synthetic_trace() if a.synthetic else load_trace(a.trace)
    t = time.perf_counter()
    parts = [("whole trace", reqs)]
    if a.split:
        half = len(reqs) // 2
        parts += [("first half", reqs[:half]), ("second half", reqs[half:])]
    for title, part in parts:
        n = sum(len(r) for r in part)
        rows = table(part, caps, pols)
        _print(f"{title}: {len(part)} requests, {n} block requests, {unique_blocks(part)} unique blocks",
               rows, pols, a.markdown)
    print(f"\n({time.perf_counter() - t:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
