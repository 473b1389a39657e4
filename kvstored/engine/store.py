"""Store: the engine's facade, the one object the servers, control plane and repair use.

It keeps the operations' rules and counters and delegates each job to one module:

  * kvstored/engine/entries.py: Entry, Reservation and the Index ((ns, key) -> Entry,
    per-namespace counts, DRAM slot -> entry, pins) -- the seam for a packed index;
  * kvstored/engine/dram.py: the DRAM tier (arena, eviction policy, slot allocation,
    slab reclaim, watermarks);
  * kvstored/engine/tiering.py: movement between DRAM and NVMe (demotion, promotion,
    tombstones, recovery at start, the shutdown flush, region reclaim hooks);
  * kvstored/engine/repairhooks.py: what the cluster repair agent calls (held records,
    the repair snapshot, reading an object's head), inherited by Store.

Everything here runs on the daemon's event loop thread, so there are no locks;
the only coroutines wait (bounded) for space or for an NVMe read.

Invariants kept here (see docs/architecture.md):
  * put is reserve -> fill -> commit (``put_bytes``: the same steps in one call, for
    bytes at hand); only committed, verified entries are in the index;
  * an entry with a reader reference, a live pin or no commit is never evicted,
    and its slot is only freed once the last reference is released;
  * a second put of the same key and checksum stores nothing but refreshes the entry's
    commit time (``_same``); a different checksum is a Conflict unless overwrite is asked.
"""
from __future__ import annotations

import asyncio
import logging
import time
import weakref
from itertools import islice
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, NamedTuple

from kvstore.errors import ChecksumMismatch, Conflict, InvalidArgument, NoSpace, NotFound, NotVerified
from kvstore.wire import checksum as payload_checksum

from .dram import DramTier
from .entries import COMMITTED, DEAD, Entry, Index, Reservation, make_index
from .fence import DeleteFence
from .limits import StoreLimits
from .repairhooks import RepairHooks
from .tiering import Tiering

if TYPE_CHECKING:
    from .nvme import NvmeTier

__all__ = ["COMMITTED", "DEAD", "DeleteAllResult", "Entry", "Index", "NotResident", "Reservation",
           "Store", "StoreLimits"]

log = logging.getLogger("kvstored.store")

LOAD_ATTEMPTS = 4  # promotions of one get evicted before it read them: then NoSpace
# Admin walks (delete_all, keys_async, sample_keys) go this many entries at a time and let
# the loop serve between steps: one step's CPU (unlinks, a region summary parsed for the
# keyless keys) stays in the tens of ms at 2048 (benchmarks/bench_delete_all.py).
WALK_CHUNK = 2048
UNLINK_STEP = 256  # delete_all unlinks this many, then waits for their tombstones
BATCH_STEP = 128  # keys of a batch query (exists, lookup, pin, unpin, delete) per step (~0.3 ms)
TOMBSTONE_WAIT = 30.0  # s: delete_all waits this long at most for a step's tombstones


def run_steps(steps: Iterator[None]):
    """Run a generator of steps (Store's ``*_steps``) to its end; what it returns."""
    try:
        while True:
            next(steps)
    except StopIteration as done:
        return done.value


def checksum_mismatch() -> ChecksumMismatch:
    """The error of a put whose bytes do not match its declared checksum (commit,
    put_bytes, and the data plane's put in C: native/frame.c put_run)."""
    return ChecksumMismatch("payload checksum does not match the declared checksum; "
                            "nothing was stored")


class DeleteAllResult(NamedTuple):
    deleted: int  # objects removed from the index (unreadable ones included)
    unreadable: int  # keyless objects whose key could not be read: removed, no tombstone
    kept_newer: int  # objects committed after the walk began: kept


class NotResident(Exception):
    """The object is stored but not in DRAM: ``await Store.load(entry)`` first."""

    def __init__(self, entry: "Entry"):
        super().__init__("object is on NVMe")
        self.entry = entry


class Store(RepairHooks):
    def __init__(self, limits: StoreLimits, clock: Callable[[], float] = time.monotonic,
                 nvme: "NvmeTier | None" = None, hold_recovered: bool = False):
        if limits.max_value_size > limits.slab_size:
            raise ValueError("max_value_size must not exceed slab_size")
        if not 0 < limits.low_watermark <= limits.high_watermark <= 1:
            raise ValueError("watermarks must satisfy 0 < low <= high <= 1")
        self.limits = limits
        self.clock = clock
        self.counters = dict.fromkeys(
            ("puts", "put_bytes", "dedups", "conflicts", "gets", "get_bytes", "hits", "misses",
             "evictions", "evicted_bytes", "checksum_failures", "reservations_expired",
             "deletes", "no_space", "pins", "unpins"), 0)
        self.index = make_index(limits.index, limits.slab_size)
        log.debug("index: %s (dram.index = %s)", self.index.kind, limits.index)
        self.dram = DramTier(limits, clock, self.index, self.counters)
        self.tiering = Tiering(nvme, self.index, self.dram, limits, clock, self._unlink,
                               self.release)
        self.dram.evict = self.tiering.evict
        # A keyless entry (packed index) has its key in its DRAM slot's key record, or on
        # its NVMe record's header: a walk, event or admin call that asks for it reads it
        # there (bulk walks read NVMe summaries instead: _keys_of)
        self.index.set_key_loader(self._key_of)
        self.arena = self.dram.arena  # the servers map and address it directly
        self.policy = self.dram.policy
        self.nvme = nvme
        self.reservations: set[Reservation] = set()
        self.reserved_bytes = 0
        # Told of index changes and lookups (KV events, per-namespace metrics): an object
        # with stored(entry), removed(entry), looked_up(ns, asked, hits, hit_bytes); None = off.
        self.observer = None
        # keys clients deleted lately: a cluster repair write of one is refused (fence.py)
        self.fence = DeleteFence()
        # the repair agent's walks under way (RepairWalk): a record a repair writes
        # meanwhile is left out of them (_publish)
        self.repair_walks: weakref.WeakSet = weakref.WeakSet()
        if nvme is not None:
            self.tiering.recover(hold_recovered)

    # Figures kept by the parts, read here by stats and the tests.
    @property
    def objects_bytes(self) -> int:
        return self.index.object_bytes

    @property
    def unverified(self) -> int:
        """Entries hidden from clients until verified (a cluster node's recovered records)."""
        return self.index.unverified

    @property
    def dram_objects(self) -> int:
        return self.dram.objects

    @property
    def demoting_bytes(self) -> int:
        return self.dram.demoting_bytes

    @property
    def flush_not_kept(self) -> int:
        """DRAM-only objects the last shutdown flush could not write."""
        return self.tiering.flush_not_kept

    # ------------------------------------------------------------------ put
    def reserve(self, ns: bytes, key: bytes, size: int, checksum: int | None,
                overwrite: bool = False, recommit: bool = True) -> Reservation | None:
        """Reserve a slot for ``size`` bytes, or None when the same object is already stored.

        Raises Conflict (different checksum, no overwrite), InvalidArgument (too
        large) or NoSpace (nothing evictable right now; see ``reserve_wait``).
        ``checksum=None``: the writer fills the slot in place (shm) and ``commit``
        computes the checksum; dedup and conflicts are then decided at commit.
        ``recommit=False``: a cluster repair's write, which never refreshes a stored
        object's commit time (``_same``).
        """
        slot = self._slot(ns, key, size, checksum, overwrite, recommit)
        if slot is None:
            return None
        off, sc, overwrite = slot
        res = Reservation(ns, key, off, size, checksum, sc, overwrite,
                          self.clock() + self.limits.reservation_timeout,
                          self.arena.view[off:off + size])
        if not recommit:
            res.recommit = False
        self.reservations.add(res)
        self.reserved_bytes += size
        return res

    def _slot(self, ns: bytes, key: bytes, size: int, checksum: int | None,
              overwrite: bool, recommit: bool = True) -> tuple | None:
        """``reserve``'s checks and allocation, shared with ``put_bytes``: (offset, size
        class, overwrite) of a free slot, or None when the same object is stored already."""
        if size > self.limits.max_value_size:
            raise InvalidArgument(
                f"value of {size} bytes exceeds max_value_size {self.limits.max_value_size}")
        old = self.index.get(ns, key)  # one lookup serves dedup and the conflict check
        if old is not None:
            if self._same(old, size, checksum, recommit):
                return None
            if old.unverified:
                overwrite = True  # a fresh write beats a record not yet verified
            if not overwrite and checksum is not None:
                self.counters["conflicts"] += 1
                raise Conflict(f"key exists with a different checksum (size {old.size}); "
                               "objects are immutable unless overwrite is asked")
        arena = self.arena
        sc = arena.class_by_size.get(size) or arena.class_for(size)  # (its usual hit, inlined)
        off = self.dram.alloc(sc)
        if off is None:
            self.counters["no_space"] += 1
            raise NoSpace(f"no space for {size} bytes: every candidate is pinned, referenced "
                          "or being written")
        return off, sc, overwrite

    def dedup(self, ns: bytes, key: bytes, size: int, checksum: int | None,
              recommit: bool = True) -> bool:
        """True when exactly these bytes (size and checksum) are stored under the key: the
        put is answered from the index alone, overwrite or not, before any slot is taken
        (re-puts, e.g. a cluster client's, otherwise reserve, copy and free a slot)."""
        old = self.index.get(ns, key)
        return old is not None and self._same(old, size, checksum, recommit)

    def _same(self, old: Entry, size: int, checksum: int | None, recommit: bool = True) -> bool:
        """``dedup`` for the entry found under the key.

        The put commits the object again: its ``committed_at`` becomes now, on every path
        (put_bytes, reserve, commit's race in ``_replace``; DRAM or NVMe-only entries). A
        cluster's repair drops a record written before a delete a peer reports
        (repair/decide.py), and a client's re-put after that delete must not look older
        than it. In memory only: an NVMe record's header and summary keep the time it was
        written (a refresh is not worth a 4 KiB write per dedup), so a restart forgets
        the refreshes of records with an NVMe copy; DRAM-only ones are flushed at a clean
        stop with the new time. Why that is safe: docs/cluster.md, "Deletes and repair".

        Not a cluster repair's write (``recommit=False``: FLAG_REPAIR puts, the agent's
        own store writes): a copy is not a client's commit. Refreshed by it, a node that
        missed a client's delete (away, or on another member list) and then got a peer's
        copy written before the delete would hold a record newer than the delete, which
        repair keeps and copies back (test_chaos, seed 485279573)."""
        if checksum is None or old.checksum != checksum or old.size != size:
            return False
        if old.unverified:
            self.verify(old)  # a writer vouches for exactly these bytes
        self.policy.touch(old)  # a put of what is stored is an access
        if recommit:
            old.committed_at = time.time()  # ... and a client's is a commit (see above)
        self.counters["dedups"] += 1
        return True

    async def reserve_wait(self, ns: bytes, key: bytes, size: int, checksum: int,
                           overwrite: bool = False, timeout: float | None = None,
                           recommit: bool = True) -> Reservation | None:
        """``reserve``, waiting up to ``put_wait_timeout`` for space to be freed."""
        deadline = self.clock() + (self.limits.put_wait_timeout if timeout is None else timeout)
        while True:
            try:
                return self.reserve(ns, key, size, checksum, overwrite, recommit)
            except NoSpace:
                left = deadline - self.clock()
                if left <= 0:
                    raise
                await self.dram.wait_for_space(left)  # re-checks: pin leases lapse meanwhile

    def commit(self, res: Reservation) -> bool:
        """Verify the checksum and publish. True if stored, False if it deduplicated.
        ``res.committed_at`` (a cluster repair's write: the commit time of the record it
        copies) becomes the new entry's commit time; None: now."""
        actual = payload_checksum(res.view)
        cs = res.checksum
        if cs is None:
            res.checksum = cs = actual
        self._finish(res)
        if actual != cs:
            self.counters["checksum_failures"] += 1
            self.dram.free_slot(res.offset)
            raise checksum_mismatch()
        return self._publish(res.ns, res.key, res.offset, res.size, cs, res.sc, res.overwrite,
                             res.recommit, res.committed_at)

    def _publish(self, ns: bytes, key: bytes, off: int, size: int, cs: int, sc,
                 overwrite: bool, recommit: bool = True, committed_at: float | None = None) -> bool:
        """Index the verified object in the slot at ``off`` (``commit``, ``put_bytes``).
        True if stored, False if the key holds these bytes already (the slot is freed)."""
        index = self.index
        dram = self.dram
        arena_keys = sc.key_base  # its class keeps keys in the arena (arena.py)
        e = index.Entry(ns, key, off, size, cs, sc)
        if committed_at is not None:
            e.committed_at = committed_at
        # A put without overwrite is almost always of a new key, which needs no lookup:
        # insert refuses (KeyError, nothing changed) a key that is taken, and only then is
        # the stored entry looked up -- it may have been committed, deleted or evicted
        # since reserve looked. An overwrite usually finds its key taken: look first.
        taken = overwrite
        if not taken:
            try:
                index.insert(e)
            except KeyError:
                taken = True
            except BaseException:  # e.g. the packed index's IndexFull (a NoSpace): no leak
                dram.free_slot(off)
                raise
        if taken and not self._replace(e, ns, key, off, size, cs, overwrite, recommit):
            return False
        dram.link(e)
        if not recommit and self.repair_walks:
            for w in self.repair_walks:
                w.written(e)
        counters = self.counters
        counters["puts"] += 1
        counters["put_bytes"] += size
        if self.observer is not None:
            self.observer.stored(e)
        if arena_keys:  # (DramTier.keep_key_in_arena, inlined: every put; one C call)
            index.keep_key_in_area(e)
        if self.nvme is not None:  # maybe_evict has nothing to do without NVMe: no call
            self.maybe_evict()
        return True

    def _replace(self, e: Entry, ns: bytes, key: bytes, off: int, size: int, cs: int,
                 overwrite: bool, recommit: bool = True) -> bool:
        """``_publish`` for a key found taken (or an overwrite): False (slot freed) when the
        stored object is these bytes, Conflict unless overwrite, else ``e`` replaces the
        old entry (or is inserted, the key being free)."""
        free_slot = self.dram.free_slot
        old = self.index.get(ns, key)
        if old is not None and old.unverified:
            self._unlink(old, tombstone=True, key=key)
            old = None
        if old is not None:
            if old.checksum == cs and old.size == size:
                free_slot(off)  # a concurrent identical put won the race
                if recommit:
                    old.committed_at = time.time()  # this put commits it too (_same)
                self.counters["dedups"] += 1
                return False
            if not overwrite:
                free_slot(off)
                self.counters["conflicts"] += 1
                raise Conflict("key exists with different bytes; objects are immutable unless "
                               "overwrite is asked")
            self._unlink(old, tombstone=True, key=key)
        try:
            self.index.insert(e)
        except BaseException:
            free_slot(off)
            raise
        return True

    def abort(self, res: Reservation) -> None:
        """Drop a reservation (failed or abandoned write); nothing becomes visible."""
        if not res.done:
            self._finish(res)
            self.dram.free_slot(res.offset)

    def put_bytes(self, ns: bytes, key: bytes, data, checksum: int | None = None,
                  overwrite: bool = False) -> bool:
        """One-shot put from a buffer (bytes or a byte memoryview): a control-plane object,
        or a TCP put whose payload is all buffered already. The rules of reserve -> fill ->
        commit without a Reservation (nothing can see the slot between the steps): the
        bytes are copied into a free slot, the slot's checksum is verified, and only then
        is it indexed. ``checksum=None``: the checksum of ``data``. True if stored, False
        if the same object was stored already."""
        size = len(data)
        if checksum is None:
            checksum = payload_checksum(data)
        slot = self._slot(ns, key, size, checksum, overwrite)
        if slot is None:
            return False
        off, sc, overwrite = slot
        view = self.arena.view[off:off + size]
        try:
            view[:] = data
        except BaseException:  # (e.g. a buffer of another length): the slot is not kept
            self.dram.free_slot(off)
            raise
        if payload_checksum(view) != checksum:  # the slot's bytes: what a get will serve
            self.counters["checksum_failures"] += 1
            self.dram.free_slot(off)
            raise checksum_mismatch()
        return self._publish(ns, key, off, size, checksum, sc, overwrite)

    def _finish(self, res: Reservation) -> None:
        res.done = True
        res.view.release()
        self.reservations.discard(res)
        self.reserved_bytes -= res.size

    # ------------------------------------------------------------------ get
    def acquire(self, ns: bytes, key: bytes) -> Entry:
        """Take a read reference on a committed object (release it when done). NotFound, or
        NotVerified for a record held back until repair checks it (the data plane answers
        NotFound in its place to older clients)."""
        # get_read: a keyless DRAM entry (found by its 64-bit fingerprint) only if its
        # slot's key record holds ``key``: another key of that fingerprint, or a record a
        # local client rewrote, misses here instead of serving another object's bytes (an
        # NVMe-only one is compared on its record's header by the load)
        e = self.index.get_read(ns, key)
        if e is None or e.unverified:
            self.counters["gets"] += 1
            self.counters["misses"] += 1
            if e is not None:
                raise NotVerified(f"key {_show(key)} in namespace {ns.decode(errors='replace')} "
                                  "is held back until this node's repair has verified it: retry shortly")
            raise NotFound(f"no key {_show(key)} in namespace {ns.decode(errors='replace')}")
        off = e.offset
        if off < 0:
            raise NotResident(e)  # the get is counted when the loaded entry is acquired
        self.counters["gets"] += 1
        self.counters["hits"] += 1
        self.counters["get_bytes"] += e.size
        self.policy.touch(e)
        e.reads += 1
        e.refs += 1
        return e

    async def acquire_async(self, ns: bytes, key: bytes) -> Entry:
        """``acquire``, promoting the object from NVMe into DRAM when needed.

        A promoted copy is not yet held when the load returns: under DRAM pressure other
        tasks may evict it before this one runs again, so the load is retried a few
        times, then NoSpace (the DRAM tier cannot keep a copy long enough to read it)."""
        for _ in range(LOAD_ATTEMPTS):
            try:
                return self.acquire(ns, key)
            except NotResident as nr:
                await self.load(nr.entry, key)
        try:
            return self.acquire(ns, key)
        except NotResident:
            self.counters["no_space"] += 1
            raise NoSpace(f"object promoted from NVMe {LOAD_ATTEMPTS} times was evicted again "
                          "before it could be read: DRAM is under pressure") from None

    async def load(self, e: Entry, key: bytes) -> None:
        """Promote an NVMe-only entry, asked for as ``key``, into DRAM: its record's header
        must hold ``key`` (a keyless entry was found by fingerprint) and its payload its
        checksum; else NotFound."""
        await self.tiering.load(e, key)

    def _key_of(self, e: Entry) -> bytes | None:
        """The index's key loader: the key of a keyless entry, from its DRAM slot's key
        record, else from its NVMe record's header; None when neither has it. The index
        checks what this returns against the record's length and fingerprint; here a key
        record is checked only when an NVMe copy could answer instead (a client may have
        rewritten it: the header is then asked)."""
        off = e.offset
        if off >= 0:
            k = self.arena.read_key(off, e.sc)
            if k is not None and (e.nvme is None or self.index.get(e.ns, k) is e):
                return k
        return self._nvme_key(e)

    def _key_in_dram(self, e: Entry) -> bytes | None:
        """``e``'s key without I/O: in RAM, or in its DRAM slot's key record if that still
        names it (the lookup by it finds ``e``: its length and fingerprint); else None."""
        if e.key_in_ram:
            return e.key
        off = e.offset
        if off >= 0:
            k = self.arena.read_key(off, e.sc)
            if k is not None and self.index.get(e.ns, k) is e:
                return k
        return None

    def _nvme_key(self, e: Entry) -> bytes | None:
        """The key of a keyless (NVMe-only) entry, read from its record's header; None
        when the record is gone or its header does not verify."""
        loc = e.nvme
        got = None if loc is None or self.nvme is None else self.nvme.key_at(loc)
        if got is None or got[0] != e.ns:
            return None
        return got[1]

    def view(self, e: Entry) -> memoryview:
        return self.arena.view[e.offset:e.offset + e.size]

    def release(self, e: Entry) -> None:
        e.refs -= 1
        if e.refs == 0 and e.state == DEAD and e.offset >= 0:
            self.dram.free_slot(e.offset)

    # ------------------------------------------------------- batch queries
    # Each is a generator of steps (``*_steps``) that yields after every BATCH_STEP keys:
    # the control plane runs them giving the event loop back between steps
    # (kvstored/looplag.run_sliced; a call of 65,536 keys held the loop 120-320 ms), the
    # plain methods run them to the end at once (run_steps). An entry is a view that a
    # step's end may leave stale (evicted, deleted, its record reused): entries are kept
    # only within a step, keys across steps.
    def exists(self, ns: bytes, keys: Iterable[bytes]) -> list[bool]:
        """Which of ``keys`` are stored. Counts as an access of those found (prefix
        lookups are made with it too), the first key most recent."""
        return run_steps(self.exists_steps(ns, keys))

    def exists_steps(self, ns: bytes, keys: Iterable[bytes]) -> Iterator[None]:
        keys = keys if isinstance(keys, list) else list(keys)
        present = self.index.present
        out: list[bool] = []
        parts = []  # per step: its keys (the policy touches those stored, by key)
        for s in range(0, len(keys), BATCH_STEP):
            if s:
                yield
            part = keys[s:s + BATCH_STEP]
            out += present(ns, part)
            parts.append(part)
        yield from self._touch_chain_steps(ns, parts)
        return out

    def lookup(self, ns: bytes, keys: Iterable[bytes]) -> int:
        """How many of ``keys`` exist, counting from the first (a prefix hit length).

        The hits count as accesses, and a missing last key is noted as a chain tail
        (eviction.Policy.note_chain)."""
        return run_steps(self.lookup_steps(ns, keys))

    def lookup_steps(self, ns: bytes, keys: Iterable[bytes]) -> Iterator[None]:
        keys = keys if isinstance(keys, list) else list(keys)
        prefix = self.index.prefix  # records held back after a restart count as absent
        parts = []
        n = hit_bytes = 0
        for s in range(0, len(keys), BATCH_STEP):
            if s:
                yield
            part = keys[s:s + BATCH_STEP]
            hit, nbytes = prefix(ns, part)
            parts.append(part[:hit])
            n += hit
            hit_bytes += nbytes
            if hit < len(part):
                break
        yield from self._touch_chain_steps(ns, parts)
        self.policy.note_chain(ns, keys, n)
        if self.observer is not None:
            self.observer.looked_up(ns, len(keys), n, hit_bytes)
        return n

    def _touch_chain_steps(self, ns: bytes, parts: list) -> Iterator[None]:
        """policy.touch_chain of the objects stored under the keys of ``parts`` (one list
        per step, in key order), deepest step first; each step's keys are looked up as it
        is touched (policy.touch_keys: keys gone meanwhile, or never stored, are left out)."""
        pol = self.policy
        start = pol.chain_begin()
        for i in range(len(parts) - 1, -1, -1):
            if i != len(parts) - 1:
                yield
            pol.touch_keys(self.index, ns, parts[i])
        pol.chain_end(start)

    def pin(self, ns: bytes, keys: Iterable[bytes], ttl: float) -> int:
        """Protect objects from eviction for ``ttl`` seconds (or until unpinned)."""
        return run_steps(self.pin_steps(ns, keys, ttl))

    def pin_steps(self, ns: bytes, keys: Iterable[bytes], ttl: float) -> Iterator[None]:
        if not 0 < ttl <= self.limits.max_pin_ttl:
            raise InvalidArgument(f"pin ttl {ttl} outside (0, {self.limits.max_pin_ttl}] seconds")
        keys = keys if isinstance(keys, list) else list(keys)
        n = 0
        for s in range(0, len(keys), BATCH_STEP):
            if s:
                yield
            now = self.clock()
            until = now + ttl
            for k in keys[s:s + BATCH_STEP]:
                e = self.index.get(ns, k)
                if e is None or e.unverified:
                    continue
                if e.pin_until <= now:
                    e.pins = 0  # the old lease lapsed: start afresh
                e.pins += 1
                e.pin_until = max(e.pin_until, until)
                self.index.note_pin(e)
                n += 1
        self.counters["pins"] += n
        return n

    def unpin(self, ns: bytes, keys: Iterable[bytes]) -> int:
        return run_steps(self.unpin_steps(ns, keys))

    def unpin_steps(self, ns: bytes, keys: Iterable[bytes]) -> Iterator[None]:
        keys = keys if isinstance(keys, list) else list(keys)
        n = 0
        for s in range(0, len(keys), BATCH_STEP):
            if s:
                yield
            for k in keys[s:s + BATCH_STEP]:
                e = self.index.get(ns, k)
                if e is None or e.pins == 0:
                    continue
                e.pins -= 1
                if e.pins == 0:
                    e.pin_until = 0.0
                    self.index.drop_pin(e)
                n += 1
        self.counters["unpins"] += n
        if n:
            self.dram.signal_space()
        return n

    def delete(self, ns: bytes, keys: Iterable[bytes], fence: bool = True) -> int:
        """Delete ``keys``; how many were here (``delete_each``)."""
        return sum(self.delete_each(ns, keys, fence))

    def delete_each(self, ns: bytes, keys: Iterable[bytes], fence: bool = True) -> list[bool]:
        """Delete ``keys``; for each, whether it was here. ``fence``: a client's delete,
        so every key is fenced against repair writes (fence.py), held here or not;
        repair's own deletes (a record handed over, a surplus copy) are not."""
        return run_steps(self.delete_each_steps(ns, keys, fence))

    def delete_each_steps(self, ns: bytes, keys: Iterable[bytes], fence: bool = True
                          ) -> Iterator[None]:
        # a step's keys are fenced just before it deletes them: a repair write of a later
        # step's key that lands meanwhile is deleted by that step, and fenced from then on
        keys = keys if isinstance(keys, list) else list(keys)
        hits: list[bool] = []
        for s in range(0, len(keys), BATCH_STEP):
            if s:
                yield
            part = keys[s:s + BATCH_STEP]
            if fence:
                self.fence.record(ns, part)
            for k in part:
                e = self.index.get(ns, k)
                if e is not None:
                    self._unlink(e, tombstone=True, key=k)
                hits.append(e is not None)
        self.counters["deletes"] += sum(hits)
        return hits

    async def delete_all(self, ns: bytes | None = None) -> DeleteAllResult:
        """Delete every object of namespace ``ns`` (None: of every namespace), pinned and
        held (unverified) ones too, without stalling the loop: the index is walked
        ``WALK_CHUNK`` entries at a time, the keys of a step's keyless (NVMe-only) entries
        are read in bulk (``NvmeTier.keys_at``: a region's summary once, not one header
        read each), and every ``UNLINK_STEP`` unlinks wait (bounded) for their tombstones
        to be written before the next, so deletes of millions of objects queue neither
        tasks nor memory.

        Deletes stay deleted across a restart: each one writes the usual tombstone.

        Objects put while it runs: an object committed after the call began (a new key,
        an overwrite, which is a new entry, or an identical re-put, which refreshes the
        commit time) is kept and counted in ``kept_newer``; one
        committed before is deleted even if read or pinned meanwhile. The cut is the
        entry's commit time (wall clock), so a clock stepped back during the walk may
        delete objects put meanwhile.

        A keyless entry whose key cannot be read (its header and its region's summary
        no longer verify) is still removed from the index, counted in ``unreadable`` and
        logged once per call; it gets no tombstone (none can name it), which is safe
        because recovery cannot index a record it cannot read either (a read the device
        failed is the exception: that object may come back at a restart, as may any
        delete whose tombstone write fails)."""
        start = time.time()
        self.fence.record_namespace(ns)
        deleted = unreadable = newer = 0
        for chunk in self._walk_chunks(ns):
            todo = []
            for e in chunk:
                if e.committed_at > start:
                    newer += 1
                else:
                    todo.append(e)
            keys = await self._keys_of(todo)
            for j in range(0, len(todo), UNLINK_STEP):
                n, bad = await self._delete_step(todo[j:j + UNLINK_STEP], keys[j:j + UNLINK_STEP])
                deleted += n
                unreadable += bad
        if unreadable:
            log.warning("delete_all: %d NVMe-only objects removed without a tombstone: their "
                        "record headers and region summaries no longer verify", unreadable)
        return DeleteAllResult(deleted, unreadable, newer)

    async def _delete_step(self, entries: list[Entry], keys: list) -> tuple[int, int]:
        """Unlink ``entries`` (``keys``: theirs, None where unreadable) that are still the
        ones indexed, then wait (bounded) for the tombstones they started: (deleted,
        unreadable)."""
        before = self.tiering.tasks_in_flight()
        n = bad = 0
        for e, k in zip(entries, keys):
            if e.state == DEAD:  # deleted or replaced during an await
                continue
            if k is None:  # promoted during the await: its key is in DRAM now
                k = self._key_in_dram(e)
            if k is None:
                bad += 1
                self._unlink(e, tombstone=True)
            elif self.index.get(e.ns, k) is e:
                self._unlink(e, tombstone=True, key=k)
            else:
                continue
            n += 1
        self.counters["deletes"] += n
        # Backpressure: these tombstones are written before more are made, so a few hundred
        # at most are in flight: their tasks' steps and their writes' completions then share
        # a loop round with few others (a round of thousands was a stall of ~0.1-0.4 s), and
        # no more buffers are held than that. Not demotions begun elsewhere: one waiting for
        # space would hold every step.
        stones = self.tiering.tasks_in_flight() - before
        if stones:
            await asyncio.wait(stones, timeout=TOMBSTONE_WAIT)
        else:
            await asyncio.sleep(0)  # the loop serves others even when none were needed
        return n, bad

    async def keys_async(self, ns: bytes | None = None) -> list[tuple[bytes, bytes]]:
        """``keys`` without a synchronous header read per NVMe-only object: walked in steps,
        keyless keys read in bulk per region. Objects changed during the walk may or may not
        be listed; unreadable ones are left out (logged)."""
        out = []
        unreadable = 0
        for chunk in self._walk_chunks(ns):
            for e, k in zip(chunk, await self._keys_of(chunk)):
                if k is None:
                    unreadable += 1
                else:
                    out.append((e.ns, k))
            await asyncio.sleep(0)
        if unreadable:
            log.warning("%d objects left out of a key listing: their keys are no longer "
                        "readable (NVMe headers, or arena key records, that do not verify)",
                        unreadable)
        return out

    async def sample_keys(self, ns: bytes | None, limit: int) -> list[tuple[Entry, bytes]]:
        """``sample`` with each entry's key: a keyless (NVMe-only) entry's is read in bulk
        (``NvmeTier.keys_at``) rather than one synchronous header read each; one whose key
        cannot be read, or that was deleted during the read, is left out."""
        entries = self.sample(ns, limit)
        keys = await self._keys_of(entries)
        return [(e, k) for e, k in zip(entries, keys) if k is not None and e.state != DEAD]

    def _walk_chunks(self, ns: bytes | None) -> Iterator[list[Entry]]:
        """The entries of ``ns`` (None: all) in lists of ``WALK_CHUNK``; the index may change
        between lists. The packed index's walk is a cursor over record numbers that reads
        the record count at each step (a record removed is skipped; an entry keeps its
        record while held, and a record reused behind the cursor is a newer object); the
        dict index's is snapshotted first (a list of references: cheap, and every key is
        in RAM)."""
        it = self.index.iterate(ns)
        if self.index.kind != "packed":
            it = iter(list(it))
        while True:
            chunk = list(islice(it, WALK_CHUNK))
            if not chunk:
                return
            if ns is not None:  # a namespace id freed and reused by another during the walk
                chunk = [e for e in chunk if e.ns == ns]
            yield chunk

    async def _keys_of(self, entries: list[Entry]) -> list[bytes | None]:
        """The key of each of ``entries``: from RAM or its DRAM slot's key record, else
        (NVMe-only, keyless) from NVMe in one bulk ``keys_at``; None where it cannot be read."""
        out: list[bytes | None] = [None] * len(entries)
        keyless = []
        for i, e in enumerate(entries):
            k = e.key if e.key_in_ram else self._key_in_dram(e)
            if k is not None:
                out[i] = k
            elif e.nvme is not None:
                keyless.append(i)
        if keyless and self.nvme is not None:
            got = await self.nvme.keys_at([entries[i].nvme for i in keyless])
            for i, g in zip(keyless, got):
                e = entries[i]
                if g is not None and g[0] == e.ns:
                    out[i] = g[1]
                else:  # promoted meanwhile?
                    out[i] = self._key_in_dram(e)
        return out

    def sample(self, ns: bytes | None, limit: int) -> list[Entry]:
        """Up to ``limit`` committed entries (dict order), optionally of one namespace
        (reading ``key`` of a keyless one costs a header read: see ``sample_keys``)."""
        out = []
        for e in self.index.iterate(ns):
            if not e.unverified:
                out.append(e)
                if len(out) >= limit:
                    break
        return out

    # The index as admin calls, metrics and repair see it (they never read self.index):
    def object_count(self) -> int:
        """Objects in the index, held (unverified) records included."""
        return len(self.index)

    def keys(self, ns: bytes | None = None) -> list[tuple[bytes, bytes]]:
        """A snapshot of (namespace, key) of every object, optionally of one namespace.
        For tests and small stores: on a big NVMe tier use ``keys_async``.

        An NVMe-only object's key is read from its record header (one synchronous read
        each); one
        whose header no longer verifies is left out and counted in the log (a restart's
        scan skips that record too)."""
        out = []
        unreadable = 0
        for e in self.index.iterate(ns):
            try:
                out.append((e.ns, e.key))
            except LookupError:
                unreadable += 1
        if unreadable:
            log.warning("%d objects left out of a key listing: their keys are no longer "
                        "readable (NVMe headers, or arena key records, that do not verify)",
                        unreadable)
        return out

    def peek(self, ns: bytes, key: bytes) -> Entry | None:
        """The entry of (ns, key) without counting an access (cluster Heads), or None."""
        return self.index.get(ns, key)

    def namespace_usage(self) -> dict[bytes, tuple[int, int]]:
        """namespace -> (objects, bytes), held records included (kept as the index changes,
        so this is O(namespaces))."""
        return self.index.namespaces()

    def pinned_entries(self) -> list[Entry]:
        """Entries under a live pin lease (lapsed leases are forgotten here)."""
        return self.index.live_pins(self.clock())

    # ------------------------------------------------------------ eviction
    def maybe_evict(self) -> int:
        """With an NVMe tier, demote down to the low watermark once use passes the high one
        (DramTier.evict_down says why only then)."""
        if self.nvme is None:
            return 0
        return self.dram.evict_down()

    def _unlink(self, e: Entry, tombstone: bool = False, evicted: bool = False,
                key: bytes | None = None) -> None:
        """Remove from the index; free the slot now or when the last reader releases.

        ``tombstone``: the removal is a user's delete/overwrite, so an NVMe copy must
        not come back at restart. ``evicted``: the store dropped it for space (its key
        goes to the eviction ghost). ``key``: the key the caller found ``e`` under; a
        keyless entry takes it back, so that the tombstone, the NVMe tier and the KV
        events need no read of its header.
        """
        if key is not None and not e.key_in_ram:
            self.index.restore_key(e, key)
        self.index.remove(e)
        if self.observer is not None:
            try:
                self.observer.removed(e)
            except LookupError:  # a keyless entry whose key is unreadable: no KV event names it
                log.warning("removed an object whose key is unreadable (its NVMe header, or its "
                            "arena key record, no longer verifies): no KV event sent for it")
        e.state = DEAD
        tiering = self.tiering
        if tiering.nvme is not None:  # (removed has nothing to do without NVMe: no call)
            tiering.removed(e, tombstone)
        if e.offset >= 0:
            self.dram.unlink(e, evicted)

    # --------------------------------------------------------------- NVMe tier
    async def flush_to_nvme(self, timeout: float) -> int:
        """Demote every DRAM-only object (shutdown); returns how many were written
        (Tiering.flush_to_nvme; ``flush_not_kept`` counts those that could not be)."""
        return await self.tiering.flush_to_nvme(timeout)

    async def drain_tasks(self, timeout: float) -> None:
        """Let demotions and tombstones in flight finish (bounded)."""
        await self.tiering.drain_tasks(timeout)

    # --------------------------------------------------------- maintenance
    def reap(self) -> int:
        """Reclaim reservations past their deadline (writer died or stalled)."""
        now = self.clock()
        expired = [r for r in self.reservations if r.deadline <= now]
        for r in expired:
            if r.on_expire is not None:
                r.on_expire(r)
            self.abort(r)
            self.counters["reservations_expired"] += 1
            log.warning("reclaimed an abandoned reservation: ns=%s key=%s size=%d",
                        r.ns.decode(errors="replace"), r.key.hex()[:32], r.size)
        return len(expired)

    def tier_stats(self) -> list[dict]:
        a = self.arena
        c = self.counters
        dram = {"name": "dram", "capacity": a.size, "used": a.used_bytes, "objects": self.dram.objects,
                "hits": c["hits"], "misses": c["misses"],
                "evictions": c["evictions"], "evicted_bytes": c["evicted_bytes"],
                "checksum_failures": c["checksum_failures"]}
        nvme = self.tiering.stats()
        return [dram] if nvme is None else [dram, nvme]

    def stats(self) -> dict:
        index = self.index
        return {
            **self.dram.stats(),
            "objects": len(index),
            "unverified": index.unverified,
            "object_bytes": index.object_bytes,
            "reservations": len(self.reservations),
            "reserved_bytes": self.reserved_bytes,
            "pinned": len(index.live_pins(self.clock())),
            "namespaces": {ns.decode(errors="replace"): n for ns, (n, _b) in index.namespaces().items()},
            **self.counters,
            # every tier's failures (the DRAM tier's own are self.counters'; see tier_stats)
            "checksum_failures": self.counters["checksum_failures"]
            + (self.nvme.counters["checksum_failures"] if self.nvme is not None else 0),
        }

    def close(self) -> None:
        if self.nvme is not None:
            self.nvme.close()
        self.dram.close()


def _show(key: bytes) -> str:
    """A key for messages: text when printable, else hex; truncated."""
    try:
        text = key.decode()
        if text.isprintable():
            return repr(text[:64])
    except UnicodeDecodeError:
        pass
    return "0x" + key[:32].hex()
