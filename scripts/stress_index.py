"""Random stress of the packed index (kvstored._index: Table, Entry views, Lru, Ghost),
for runs under the sanitizers (scripts/sanitize.sh) and plain ones.

Interleaves what the Store does with an object (put: insert, place, policy insert;
evict: victim, unlink, remove or demote to NVMe-only and shed its key; promote: restore
the key, place, insert_loaded; delete; touches by entry and by key; present/prefix;
pins, readers, held-back flags) with calls the Store never makes and that must fail
with a typed error, not crash (shed or insert an entry twice, touch a removed one, a
wrong key, a detached entry). Views are held and dropped in random order, fingerprints
are narrowed to force collisions, namespaces and key lengths vary. Each round checks
the index against a model; the ghost is also driven at its limit against a Python model.
A third part (Reentry) makes index and policy calls from inside other index calls: a gc
callback at a low threshold and hostile Python hooks (size class, Location, pin count,
a finalizer in a cycle through a detached entry); the sanitizers catch what goes wrong.

    python scripts/stress_index.py --seconds 60 [--seed N]

Exits non-zero on the first mismatch (a sanitizer aborts the process on its own).
"""
from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from collections import OrderedDict

from kvstored import _index
from kvstored.engine.arena import SizeClass
from kvstored.engine.eviction import DictGhost, NativePolicy, Policy
from kvstored.engine.nvmedevice import Location
from kvstored.engine.packedindex import PackedIndex

# errors a misuse may get: anything typed; a crash or a wrong answer is the failure
TYPED = (KeyError, ValueError, TypeError, LookupError, RuntimeError, OverflowError)


class Mismatch(AssertionError):
    pass


def check(cond, what):
    if not cond:
        raise Mismatch(what)


class Round:
    def __init__(self, rng: random.Random):
        self.rng = rng
        self.slab = rng.choice([1 << 16, 1 << 20])
        self.ix = PackedIndex(self.slab)
        if rng.random() < 0.5:
            self.ix.set_fingerprint_bits(rng.choice([1, 2, 4, 8, 16]))  # collisions
        self.geom = rng.random() < 0.5
        if self.geom:
            self.ix.use_nvme_geometry(1 << 20, 1 << 24)
        self.classes = [SizeClass(i, 4096 << i, self.slab) for i in range(rng.randint(1, 3))]
        ghost = _index.Ghost() if rng.random() < 0.7 else DictGhost()
        self.native = rng.random() < 0.85
        kw = dict(protected_share=rng.choice([0.2, 0.5, 0.8]), ghost_min=rng.choice([0, 1, 4]),
                  hint_limit=8, parent_limit=rng.choice([0, 8]), adapt_rate=rng.choice([0.0, 8.0]))
        if self.native:
            self.pol = NativePolicy(len(self.classes), self.ix, ghost="native", **kw)
            self.pol.ghost = ghost
        else:
            self.pol = Policy(len(self.classes), **kw)
        self.spaces = [bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 3, 8, 17])))
                       for _ in range(rng.randint(1, 40))]
        # (ns, key) -> state: "dram" | "dram-keyless" (its key shed: the arena's key area) |
        # "nvme" (keyed) | "keyless" | "removed"
        self.keys = {}
        self.held = []  # views held by "readers"
        self.slots = {}  # offset -> (ns, key)
        self.next_slot = {sc.index: 0 for sc in self.classes}
        self.free_slots = {sc.index: [] for sc in self.classes}
        self.keyless_keys = {}  # record -> key (the key loader's NVMe header)
        self.ix.set_key_loader(self.load_key)
        self.nvme_off = 0

    # ------------------------------------------------------------ helpers
    def load_key(self, e):
        return self.keyless_keys.get(e.record)

    def new_key(self):
        rng = self.rng
        n = rng.choice([0, 1, 7, 8, 9, 16, 31, 64, 100, 255, rng.randrange(256)])
        return rng.choice(self.spaces), bytes(rng.randrange(4) for _ in range(n))

    def some_key(self):
        if self.keys and self.rng.random() < 0.8:
            return self.rng.choice(list(self.keys))
        return self.new_key()

    def slot(self, sc):
        free = self.free_slots[sc.index]
        if free and self.rng.random() < 0.7:
            return free.pop(self.rng.randrange(len(free)))
        i = self.next_slot[sc.index]
        self.next_slot[sc.index] += 1
        per = self.slab // sc.slot_size
        # each class its own slabs: class c uses slabs c, c + n, c + 2n, ...
        return ((i // per) * len(self.classes) + sc.index) * self.slab + (i % per) * sc.slot_size

    def location(self, e):
        self.nvme_off += 4096
        base = (1 << 20) if self.geom else 0
        region = self.rng.randrange(4)
        off = base + region * (1 << 24) + self.nvme_off % (1 << 24) if self.geom else self.nvme_off
        if self.rng.random() < 0.05:
            off += 1  # unaligned: kept whole in the side dict
        return Location(region, off, e.size, e.checksum, self.rng.randrange(1 << 33))

    def hold(self, e):
        if e is not None and self.rng.random() < 0.3:
            self.held.append(e)

    def hold_all(self):
        """A walk that holds every view (the shutdown flush does): the view map grows,
        and shrinks as they go in random order."""
        self.held.extend(self.ix.iterate())
        self.rng.shuffle(self.held)

    def drop_views(self):
        rng = self.rng
        for _ in range(rng.randint(0, len(self.held))):
            self.held.pop(rng.randrange(len(self.held)))

    # ---------------------------------------------------------- Store-like
    def put(self):
        ns, key = self.new_key() if self.rng.random() < 0.8 else self.some_key()
        sc = self.rng.choice(self.classes)
        size = self.rng.randrange(sc.slot_size + 1)
        off = self.slot(sc)
        e = self.ix.Entry(ns, key, off, size, self.rng.getrandbits(64), sc)
        if self.rng.random() < 0.05:
            e.seg = 0  # a detached entry's stale field: insert must not trust it
        try:
            self.ix.insert(e)
        except KeyError:
            check((ns, key) in self.keys and self.keys[(ns, key)] != "removed" or
                  self.ix.get(ns, key) is not None, "insert refused a free key")
            self.free_slots[sc.index].append(off)
            return
        check(self.keys.get((ns, key), "removed") == "removed" or self.keys[(ns, key)] == "keyless",
              f"insert took a held key {self.keys.get((ns, key))}")
        self.keys[(ns, key)] = "dram"
        self.ix.place(e)
        self.slots[off] = (ns, key)
        if self.rng.random() < 0.3:
            self.pol.note_chain(ns, [key, self.new_key()[1], self.new_key()[1]], 1)
        e.seg = -1  # as a Store entry is
        self.pol.insert(e)
        self.hold(e)

    def evict(self):
        sc = self.rng.choice(self.classes)
        now = time.time()
        r = self.rng.random()
        if r < 0.5 or not self.native:
            v = self.pol.victim_at(sc.index, now)  # native: refs and pins tested in C
        else:
            def evictable(e):
                if r > 0.9 and self.held:  # a callable that touches: lists change under victim
                    h = self.rng.choice(self.held)
                    if h.seg >= 0:
                        self.pol.touch(h)
                return e.refs == 0 and not e.pinned(now)
            try:
                v = self.pol.victim(sc.index, evictable)
            except RuntimeError:
                return
        if v is None:
            return
        k = (v.ns, v.key)
        check(self.keys.get(k) in ("dram", "dram-keyless"), f"victim {k} is {self.keys.get(k)}")
        off = v.offset
        self.pol.remove(v, evicted=True) if self.native else self.pol.remove(v, True)
        self.ix.displace(v)
        self.slots.pop(off, None)
        self.free_slots[sc.index].append(off)
        if self.rng.random() < 0.5:
            self.keyless_keys.pop(v.record, None)
            self.ix.remove(v)
            self.keys[k] = "removed"
        else:  # demoted: NVMe-only, its key shed
            v.offset = -1
            v.nvme = self.location(v)
            self.ix.shed_key(v)
            self.keys[k] = "nvme" if v.key_in_ram else "keyless"
            if not v.key_in_ram:
                self.keyless_keys[v.record] = k[1]
        self.hold(v)

    def demote_out_of_order(self):
        """The DRAM copy dropped and the key shed before the policy unlinks the entry:
        shed_key must refuse a linked entry (its list links live in its DRAM part)."""
        dram = [k for k, s in self.keys.items() if s == "dram"]
        if not dram:
            return
        k = self.rng.choice(dram)
        e = self.ix.get(*k)
        if e.refs:
            return
        off = e.offset
        self.ix.displace(e)
        e.offset = -1
        e.nvme = self.location(e)
        try:
            self.ix.shed_key(e)
        except ValueError:
            pass
        check(e.key_in_ram, "shed_key took the key of a linked entry")
        self.pol.remove(e)
        self.slots.pop(off, None)
        self.free_slots[e.sc.index].append(off)
        self.ix.shed_key(e)
        self.keys[k] = "nvme" if e.key_in_ram else "keyless"
        if not e.key_in_ram:
            self.keyless_keys[e.record] = k[1]
        self.hold(e)

    def shed_dram(self):
        """A DRAM-resident, linked entry's key goes to the arena's key area (H2's Store):
        shed_key(e, dram=True); sometimes with an NVMe copy too (a demotion landed)."""
        dram = [k for k, s in self.keys.items() if s == "dram"]
        if not dram:
            return
        k = self.rng.choice(dram)
        e = self.ix.get(*k)
        if e.nvme is None and self.rng.random() < 0.3:
            e.nvme = self.location(e)
        self.ix.shed_key(e, dram=True)
        if not e.key_in_ram:
            self.keyless_keys[e.record] = k[1]
            self.keys[k] = "dram-keyless"
        self.hold(e)

    def clock_jump(self):
        """Past the age cap: every stamp is swept to it (the 28 bits a record keeps)."""
        from kvstored.engine.eviction import STAMP_AGE_CAP
        to = self.pol.clock + STAMP_AGE_CAP + self.rng.randrange(1 << 20)
        if self.native:
            self.pol.lru.clock = to
        else:
            self.pol.clock = to

    def reinsert(self):
        """A removed entry (held view) inserted again: NVMe-only, its key free."""
        cand = [e for e in self.held if e.key_in_ram and e.offset == -1 and e.nvme is not None
                and self.keys.get((e.ns, e.key)) == "removed"]
        if not cand:
            return
        e = self.rng.choice(cand)
        if self.ix.get(e.ns, e.key) is not None:
            return  # a keyless record of its fingerprint: refused, as checked in put
        self.ix.insert(e)
        self.keys[(e.ns, e.key)] = "nvme"

    def promote(self):
        cand = [k for k, s in self.keys.items() if s in ("nvme", "keyless")]
        if not cand:
            return
        ns, key = self.rng.choice(cand)
        e = self.ix.get(ns, key)
        check(e is not None and e.offset == -1, f"NVMe-only {key!r} lost")
        rec = e.record
        self.ix.restore_key(e, key)
        self.keyless_keys.pop(rec, None)
        sc = e.sc
        off = self.slot(sc)
        e.offset = off
        self.ix.place(e)
        self.slots[off] = (ns, key)
        self.pol.insert_loaded(e)
        self.keys[(ns, key)] = "dram"
        self.hold(e)

    def delete(self):
        k = self.some_key()
        e = self.ix.get(*k)
        if e is not None and not e.key_in_ram and e.key != k[1]:
            e = None  # another key's keyless record of the same fingerprint
        if e is None:
            check(self.keys.get(k, "removed") == "removed", f"{k} missing")
            return
        if e.offset >= 0:
            off = e.offset
            self.pol.remove(e)
            self.ix.displace(e)
            self.slots.pop(off, None)
            self.free_slots[e.sc.index].append(off)
        self.keyless_keys.pop(e.record, None)
        self.ix.remove(e)
        self.keys[k] = "removed"
        self.hold(e)

    def touch(self):
        rng = self.rng
        r = rng.random()
        ns = rng.choice(self.spaces)
        keys = [k for (n, k), s in self.keys.items() if n == ns]
        keys = [rng.choice(keys) if keys and rng.random() < 0.8 else self.new_key()[1]
                for _ in range(rng.randint(0, 6))]
        if r < 0.3:
            self.pol.touch_keys(self.ix, ns, keys)
            return
        es = [e for e in (self.ix.get(ns, k) for k in keys) if e is not None and e.offset >= 0]
        if r < 0.5:
            for e in es:
                self.pol.touch(e)
        elif r < 0.7:
            self.pol.touch_run(es)
        elif r < 0.9:
            self.pol.touch_chain(es)
        else:
            start = self.pol.chain_begin()
            self.pol.touch_run(es)
            self.pol.chain_end(start)
        for e in es:
            self.hold(e)

    def query(self):
        rng = self.rng
        ns = rng.choice(self.spaces)
        keys = [k for (n, k), s in self.keys.items() if n == ns]
        keys = [rng.choice(keys) if keys and rng.random() < 0.7 else self.new_key()[1]
                for _ in range(rng.randint(0, 8))]
        if rng.random() < 0.05:
            keys.append(b"x" * 300)  # longer than a key can be: absent
        got = self.ix.present(ns, keys)
        want = [(e := self.ix.get(ns, k)) is not None and not e.unverified for k in keys]
        check(got == want, f"present {got} != get {want}")
        n, nbytes = self.ix.prefix(ns, keys)
        check(n == (want + [False]).index(False), "prefix count")
        check(nbytes == sum(self.ix.get(ns, k).size for k in keys[:n]), "prefix bytes")

    def flags(self):
        k = self.some_key()
        e = self.ix.get(*k)
        if e is None:
            return
        r = self.rng.random()
        if r < 0.3:
            self.ix.mark_unverified(e)
        elif r < 0.6:
            self.ix.verify(e)
        elif r < 0.63:
            self.ix.mark_all_unverified()
        elif r < 0.8:
            e.pins = self.rng.randint(0, 2)
            e.pin_until = time.time() + self.rng.choice([-1, 60])
            if e.pins:
                self.ix.note_pin(e)
        else:
            e.refs = max(0, e.refs + self.rng.choice([-1, 1]))
            e.reads = e.reads + 1
        self.hold(e)

    def misuse(self):
        rng = self.rng
        k = self.some_key()
        e = self.ix.get(*k)
        if e is None or (not e.key_in_ram and e.key != k[1]):
            return
        ops = [
            lambda: self.ix.shed_key(e) if e.offset >= 0 else None,
            lambda: self.ix.insert(e),
            lambda: self.ix.restore_key(e, k[1] + b"?"),
            lambda: self.pol.touch(self.ix.Entry(b"n", b"k", 0, 1, 1, self.classes[0])),
            lambda: self.pol.touch_keys(self.ix, k[0], [k[1], 5]),
            lambda: self.ix.present(k[0], [k[1], None]),
            lambda: self.ix.at(rng.randrange(-2, 4 * self.slab)),
            lambda: e.key,
            lambda: repr(e),
            lambda: list(self.ix.iterate(k[0]))[:3],
        ]
        if self.native:
            ops += [lambda: self.pol.insert(e) if e.seg >= 0 else None,
                    lambda: self.pol.insert_loaded(e) if e.seg >= 0 else None,
                    lambda: self.pol.victim(rng.randrange(-1, len(self.classes) + 1), "x"),
                    lambda: self.pol.lru.order(0, rng.randrange(-1, 4))]
        try:
            rng.choice(ops)()
        except TYPED:
            pass

    # ---------------------------------------------------------------- model
    def verify(self):
        ix = self.ix
        live = {k: s for k, s in self.keys.items() if s != "removed"}
        check(len(ix) == len(live), f"len {len(ix)} != {len(live)}")
        for (ns, key), s in live.items():
            e = ix.get(ns, key)
            check(e is not None, f"{(ns, key)} ({s}) lost")
            indram = s in ("dram", "dram-keyless")
            check((e.offset >= 0) == indram, f"{key!r} offset {e.offset} as {s}")
            check(e.key_in_ram == (s not in ("keyless", "dram-keyless")), f"{key!r} key_in_ram as {s}")
            check(e.key == key, "key")
            if indram:
                check(ix.at(e.offset) is e, "slot map")
                check(e.seg >= 0, f"DRAM entry {key!r} not linked")
            else:
                check(e.nvme is not None and e.seg < 0, "NVMe-only")
        if self.native:
            total = 0
            for sc in self.classes:
                n = 0
                for seg in range(3):
                    lst = self.pol.order(sc.index, seg)
                    for e in lst:
                        check(e.seg == seg and e.sc is sc, "list membership")
                    n += len(lst)
                check(n == self.pol.count(sc.index), "list counts")
                total += n
            check(total == self.pol.resident, "resident")
            check(total == sum(1 for s in live.values() if s in ("dram", "dram-keyless")),
                  "resident vs model")
        ix.probes()
        ix.footprint()

    def run(self, steps):
        rng = self.rng
        ops = [(self.put, rng.choice([20, 30, 60])), (self.evict, 15), (self.promote, 8),
               (self.delete, 8), (self.touch, 15), (self.query, 8), (self.flags, 6),
               (self.misuse, 6), (self.demote_out_of_order, 2), (self.reinsert, 2),
               (self.drop_views, 4), (self.hold_all, 0.3), (self.shed_dram, 6),
               (self.clock_jump, 0.2)]
        funcs, weights = zip(*ops)
        for i in range(steps):
            rng.choices(funcs, weights)[0]()
            if i % 97 == 0:
                self.verify()
            if i % 500 == 0:
                gc.collect()
        self.verify()
        # teardown in a random order: views, the policy and the index go in any order
        parts = [self.held, self.ix, self.pol]
        rng.shuffle(parts)
        self.held = self.ix = self.pol = None
        del parts
        gc.collect()


def ghost_stress(rng: random.Random, steps: int) -> None:
    """The native ghost at its limit against an OrderedDict (add moves a key to the newest end)."""
    g, model = _index.Ghost(), OrderedDict()
    limit = rng.choice([0, 1, 5, 64, 300])
    pool = [rng.getrandbits(64) - (1 << 63) for _ in range(limit * 2 + 10)]
    for i in range(steps):
        r = rng.random()
        d = rng.choice(pool)
        if r < 0.6:
            o = rng.randrange(3)
            g.add(d, o)
            model.pop(d & (2**64 - 1), None)
            model[d & (2**64 - 1)] = o
            dropped = g.trim(limit)
            want = max(0, len(model) - limit)
            check(dropped == want, f"trim dropped {dropped} != {want}")
            for _ in range(want):
                model.popitem(last=False)
        elif r < 0.8:
            check(g.pop(d) == model.pop(d & (2**64 - 1), None), "pop")
        elif r < 0.9:
            check(g.get(d) == model.get(d & (2**64 - 1)), "get")
        elif r < 0.95:
            limit = rng.choice([0, 1, 5, 64, 300])
            g.trim(limit)
            while len(model) > limit:
                model.popitem(last=False)
        else:
            check(g.items() == list(model.items()), "items order")
        check(len(g) == len(model), "ghost length")
    counts = [0, 0, 0]
    for o in model.values():
        counts[o] += 1
    check(tuple(counts) == g.counts, "counts")


class Reentry:
    """Index calls made from inside other index calls: a gc callback (the threshold at 1:
    every few allocations a C call makes, a collection runs) and hostile objects' Python
    hooks (a size class's slot_size, a Location's fields, a pin count's __bool__ and
    __del__, a finalizer in a cycle through a detached entry) make random calls on the
    same index and policy. No model: calls may fail with a typed error; memory errors are
    the sanitizers' to catch, and at the end the index's own counts must agree."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.ix = PackedIndex(1 << 16)
        self.classes = [SizeClass(i, 4096 << i, 1 << 16) for i in range(2)]
        self.pol = NativePolicy(2, self.ix, ghost="native", parent_limit=8, hint_limit=8)
        self.held: list = []
        self.depth = 0
        self.offs = iter(range(0, 1 << 40, 4096 << 1))

    def key(self):
        return self.rng.choice([b"a", b"b", b"c"]), b"%d" % self.rng.randrange(40)

    def hostile_sc(self):
        outer = self

        class SC:
            index = 0

            @property
            def slot_size(self):
                outer.nested()
                return 4096

        return SC()

    def hostile_loc(self, e):
        outer = self
        size, checksum = e.size, e.checksum

        class Loc:
            offset, length, generation = 4096 * 3 + outer.rng.choice([0, 1]), size, 1

            @property
            def region(self):
                outer.nested()
                return 2

            @property
            def checksum(self):
                return checksum

            def __del__(self):
                outer.nested()

        return Loc()

    def hostile_count(self, n):
        outer = self

        class Count(int):
            def __bool__(self):
                outer.nested()
                return int(self) != 0

            def __del__(self):
                outer.nested()

        return Count(n)

    def nested(self):
        """A few random calls from inside another; not deeper than two."""
        if self.depth >= 2 or self.ix is None:  # (finalizers run after the round too)
            return
        self.depth += 1
        try:
            for _ in range(self.rng.randint(0, 2)):
                self.step()
        finally:
            self.depth -= 1

    def on_gc(self, phase, info):
        if phase == "start" and self.rng.random() < 0.3:
            self.nested()

    def some(self):
        return self.rng.choice(self.held) if self.held else None

    def step(self):
        rng, ix, pol = self.rng, self.ix, self.pol
        r = rng.random()
        try:
            if r < 0.22:
                ns, key = self.key()
                sc = self.hostile_sc() if rng.random() < 0.1 else rng.choice(self.classes)
                e = ix.Entry(ns, key, next(self.offs) if rng.random() < 0.7 else -1,
                             rng.randrange(100), rng.getrandbits(64), sc)
                if rng.random() < 0.1:
                    e.nvme = self.hostile_loc(e)
                if rng.random() < 0.05:  # a cycle through the detached entry, with a finalizer
                    holder = _Cycle(self)
                    holder.e, e.nvme = e, holder
                ix.insert(e)
                if e.offset >= 0 and rng.random() < 0.8:
                    ix.place(e)
                    pol.insert(e)
                self.held.append(e)
            elif r < 0.32:
                e = self.some()
                if e is not None:
                    if e.seg >= 0:
                        pol.remove(e, evicted=rng.random() < 0.5)
                    if e.offset >= 0:
                        ix.displace(e)
                    ix.remove(e)
            elif r < 0.42:
                self.held = [x for x in self.held if rng.random() < 0.7]
            elif r < 0.52:
                e = self.some()
                if e is not None:
                    pol.touch_run([e, self.some() or e]) if rng.random() < 0.5 else pol.touch(e)
            elif r < 0.58:
                ns, _ = self.key()
                pol.touch_keys(ix, ns, [self.key()[1] for _ in range(3)])
            elif r < 0.66:
                v = pol.victim(rng.randrange(2), time.time())
                if v is not None and rng.random() < 0.5:
                    pol.remove(v, evicted=True)
                    ix.displace(v)
                    ix.remove(v)
            elif r < 0.74:
                e = self.some()
                if e is not None:
                    if rng.random() < 0.5:
                        e.pins = self.hostile_count(rng.randrange(2))
                    else:
                        e.pin_until = time.time() + rng.random()
            elif r < 0.8:
                e = self.some()
                if e is not None:
                    e.nvme = self.hostile_loc(e) if rng.random() < 0.5 else None
            elif r < 0.86:
                ns, key = self.key()
                self.held.extend(x for x in [ix.get(ns, key)] if x is not None)
                ix.present(ns, [self.key()[1] for _ in range(4)])
            elif r < 0.9:
                ix.namespaces()
                pol.ghost.items()
            elif r < 0.95:
                for i, x in enumerate(ix.iterate()):
                    if i > 5:
                        break
                    self.held.append(x)
            else:
                pol.order(rng.randrange(2), rng.randrange(3))
        except TYPED:
            pass

    def run(self, steps):
        gc.collect()
        threshold = gc.get_threshold()
        gc.callbacks.append(self.on_gc)
        gc.set_threshold(self.rng.choice([1, 3, 10]))
        try:
            for _ in range(steps):
                self.step()
        finally:
            gc.set_threshold(*threshold)
            gc.callbacks.remove(self.on_gc)
        ix, pol = self.ix, self.pol
        entries = list(ix.iterate())
        check(len(entries) == len(ix), f"iterate {len(entries)} != len {len(ix)}")
        check(len({(e.ns, e.key) for e in entries}) == len(entries), "a key indexed twice")
        spaces = ix.namespaces()
        check(sum(n for n, _ in spaces.values()) == len(ix), "namespace counts")
        linked = sum(len(pol.order(c, s)) for c in range(2) for s in range(3))
        check(linked == pol.resident, f"lists hold {linked}, resident {pol.resident}")
        self.held.clear()
        self.ix = self.pol = None
        gc.collect()


class _Cycle:
    """A detached entry's nvme holding the entry: its finalizer calls into the index."""

    def __init__(self, outer):
        self.outer = outer

    def __del__(self):
        self.outer.nested()


def reentry_stress(rng: random.Random, steps: int) -> None:
    Reentry(rng).run(steps)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--steps", type=int, default=4000, help="operations per round")
    a = ap.parse_args()
    seed = a.seed if a.seed is not None else random.randrange(1 << 32)
    end = time.monotonic() + a.seconds
    rounds = 0
    while True:
        rseed = seed + rounds
        rng = random.Random(rseed)
        try:
            Round(rng).run(a.steps)
            ghost_stress(rng, a.steps)
            reentry_stress(rng, a.steps // 4)
        except Mismatch as e:
            print(f"stress_index: round seed {rseed}: {e}", file=sys.stderr)
            return 1
        rounds += 1
        if time.monotonic() >= end:
            break
    print(f"stress_index: {rounds} rounds of {a.steps} operations, "
          f"seeds {seed}..{seed + rounds - 1}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
