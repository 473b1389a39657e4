"""This node's store as repair sees it: the few store calls it makes, each run on the
daemon's event loop (the store is not thread-safe) and batched, one loop hop per batch.
A batch gives the loop back every few milliseconds (looplag.Slices): it shares the loop
with clients' requests, which waited behind whole batches of up to 16 MiB of records
copied and hashed while a node rebuilt a lost peer (bench_tail.py --phases repair)."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Iterator

from kvstore import errors
from kvstore.layout import FRAG_HEADER

from kvstored.engine.fence import DELETED
from kvstored.engine.repairhooks import WALK_ROWS
from kvstored.looplag import Slices

from .peers import FENCED

log = logging.getLogger("kvstored.repair")

HEAD = FRAG_HEADER.size  # an EC record's header
HEAD_SLICE = 64  # read_heads looks at the loop's slice clock once per this many keys
CALL_TIMEOUT = 10.0  # one hop onto the event loop (a batch gets this per object, bounded)


class Held:
    """Read references on DRAM slots that LocalStore.read_many kept for repair's views of
    them, given back together by LocalStore.release (touched on the event loop only)."""

    __slots__ = ("entries", "closed", "asked")

    def __init__(self):
        self.entries: list = []
        self.closed = False
        self.asked = False  # read_many was given it (set on the caller's thread)


class LocalStore:
    def __init__(self, store, loop: asyncio.AbstractEventLoop):
        self._store = store
        self._loop = loop
        self.hop_s = 0.0  # seconds repair's threads waited on hops, all told (pace.py's work)

    def _run(self, fn, timeout: float = CALL_TIMEOUT, cancel_late: bool = False):
        """Run coroutine function ``fn()`` on the loop and wait for it. ``cancel_late``: a
        call past ``timeout`` is cancelled on the loop (at its next await), not left to run."""
        t0 = time.perf_counter()
        fut = asyncio.run_coroutine_threadsafe(fn(), self._loop)
        try:
            return fut.result(timeout)
        except FutureTimeout:
            if cancel_late:
                fut.cancel()
            raise
        finally:
            self.hop_s += time.perf_counter() - t0  # (threads adding at once may lose a bit)

    def loop_thread(self) -> int:
        """The thread id of the event loop (for its CPU clock, steps.thread_clock)."""
        async def call():
            return threading.get_ident()
        return self._run(call)

    def hold_all_now(self) -> int:
        """store.hold_all(), called on the event loop itself (membership's drop hook)."""
        return self._store.hold_all()

    @property
    def unverified(self) -> int:
        return self._store.unverified

    def walk(self, siblings=None) -> Iterator[tuple[list[tuple], float]]:
        """store.repair_walk(siblings) a hop at a time: (rows, share of the walk done)
        per ~``WALK_ROWS`` rows (or per ``WALK_STEP_MAX`` entries walked: fewer rows,
        even none); rows are (ns, key, size, checksum, unverified, pinned, protected,
        reads, committed_at), in repair order. ``siblings`` runs on the loop."""
        async def begin():
            return self._store.repair_walk(siblings, skip_repair_writes=True)
        w = self._run(begin)

        async def step():
            return await w.next(WALK_ROWS), w.share
        while True:
            rows, share = self._run(step)
            if rows is None:
                return
            yield rows, share

    def read_heads(self, items: list[tuple[bytes, bytes]], n: int) -> list[bytes | None]:
        """The first ``n`` bytes of each (ns, key), unverified records included."""
        s = self._store

        async def call():
            out = []
            slices = Slices()  # a batch gives the loop back (kvstored/looplag.py)
            peek, view = s.peek, s.arena.view
            for i, (ns, key) in enumerate(items):
                if not i % HEAD_SLICE:
                    await slices.turn()
                # a record in DRAM (the common case) is read here, as Heads reads it, without
                # a coroutine per key; one on NVMe is loaded by read_head
                e = peek(ns, key)
                if e is None or e.offset >= 0:
                    out.append(None if e is None else bytes(view[e.offset:e.offset + min(n, e.size)]))
                    continue
                try:
                    got = await s.read_head(ns, key, n)
                except errors.NotFound:
                    got = None
                out.append(None if got is None else got[1])
            return out
        return self._run(call, CALL_TIMEOUT * max(1, min(len(items), 30)))

    def read_many(self, items: list[tuple[bytes, bytes]], split: int = 0,
                  held: "Held | None" = None) -> list:
        """The bytes of each (ns, key) (None when absent); one loop hop for all. The first
        ``split`` items come as (first HEAD bytes, the rest) pairs, each its own bytes: a
        rebuild source's payload then goes to pyeclib (which takes only bytes) without a
        second copy. With ``held``, their payloads are read-only views of the records'
        DRAM slots instead (ISA-L and the checks read them in place): each slot's read
        reference is kept in ``held`` until ``release(held)``, so the slot is neither
        freed nor reused while repair reads it (the copy out of the arena was ~4 % of a
        rebuilding node's loop, RESULTS.md session 17)."""
        s = self._store
        if held is not None:
            held.asked = True

        async def call():
            out = []
            slices = Slices()  # a batch gives the loop back (kvstored/looplag.py)
            for n, (ns, key) in enumerate(items):
                await slices.turn()
                try:
                    e = await s.acquire_async(ns, key)
                except (errors.NotFound, errors.NotVerified):  # held records are no source
                    out.append(None)
                    continue
                try:
                    v = s.view(e)
                    if n >= split:
                        out.append(bytes(v))
                    elif held is None or held.closed:  # (closed: the caller gave up on this hop)
                        out.append((bytes(v[:HEAD]), bytes(v[HEAD:])))
                    else:
                        out.append((bytes(v[:HEAD]), v[HEAD:].toreadonly()))
                        held.entries.append(e)
                        e = None  # released by release(held)
                finally:
                    if e is not None:
                        s.release(e)
            return out
        return self._run(call, CALL_TIMEOUT * max(1, min(len(items), 30)))

    def release(self, held: "Held") -> None:
        """Give back the read references read_many kept in ``held``; the views it gave
        of those slots must not be used after this. Queued onto the loop, not waited for:
        the loop runs it after the hops queued before it, and a hop of ``held`` that
        timed out and runs later keeps no reference (``held`` is closed by then)."""
        release = self._store.release

        def give_back():
            held.closed = True
            entries, held.entries = held.entries, []
            for e in entries:
                release(e)
        try:
            self._loop.call_soon_threadsafe(give_back)
        except RuntimeError:  # the loop is closed: the store is gone with it
            pass

    def put_many(self, ns: bytes, items: list[tuple[bytes, object]], overwrite: bool,
                 committed: list | None = None) -> list[bool | None]:
        """Store each (key, record) here, one loop hop for all (a record: bytes, or a
        (header, payload) pair copied into its slot back to back): True stored, False
        already there (identical), FENCED refused (the key was deleted here lately,
        kvstored/engine/fence.py), None failed (a Conflict, no space in time, or the fence
        over its bound; the next pass looks again). The same outcomes as a peer's repair write (PeerIO.put_many),
        without the loopback round trip: repair mostly rebuilds the records its own slots
        lack (with one node lost, the leader of an object is the slot that gets the extra
        lap). ``committed``: per record, the commit time of the record it copies or was
        rebuilt from (None: unknown, the write's own), kept as the new record's."""
        s = self._store
        times = committed if committed is not None else [None] * len(items)

        async def call():
            out: list = []
            slices = Slices()  # a batch gives the loop back (kvstored/looplag.py)
            for (key, data), commit_time in zip(items, times):
                await slices.turn()
                why = s.fence.refusal(ns, key)  # (again below, after any wait for space)
                if why is not None:
                    out.append(FENCED if why == DELETED else None)
                    continue
                parts = data if isinstance(data, tuple) else (data,)
                n = sum(len(x) for x in parts)
                try:
                    # checksum None: commit computes it once over the slot, and decides
                    # dedup and conflicts then (what a shm put does)
                    # (recommit=False: a copy keeps the commit time it has here: Store._same)
                    res = await s.reserve_wait(ns, key, n, None, overwrite, recommit=False)
                except errors.KVStoreError as e:  # too large, no space in time
                    log.info("repair: could not store a record here: %s", e)
                    out.append(None)
                    continue
                if res is None:  # not reached with checksum None; kept for the contract
                    out.append(False)
                    continue
                try:
                    at = 0
                    for x in parts:
                        res.view[at:at + len(x)] = x
                        at += len(x)
                except BaseException:
                    s.abort(res)
                    raise
                why = s.fence.refusal(ns, key)  # deleted while reserve_wait waited for space?
                if why is not None:
                    s.abort(res)
                    out.append(FENCED if why == DELETED else None)
                    continue
                res.committed_at = commit_time  # the source's (Store.commit)
                try:
                    out.append(s.commit(res))
                except errors.KVStoreError:
                    out.append(None)
            return out
        # cancelled once the caller gave up: a record may be a view of a DRAM slot (read
        # in place, read_many's ``held``), given back once this raised
        return self._run(call, CALL_TIMEOUT * max(1, min(len(items), 30)), cancel_late=True)

    def settle(self, verify: list[tuple[bytes, bytes]],
               drop: list[tuple[bytes, bytes, int]]) -> tuple[int, list[tuple[bytes, bytes]]]:
        """Serve the recovered records of ``verify``; delete those of ``drop`` (ns, key,
        checksum) if still unverified with that checksum. (verified, dropped keys)."""
        s = self._store

        async def call():
            n = 0
            for ns, key in verify:
                if s.verify_key(ns, key):
                    n += 1
            dropped = [(ns, key) for ns, key, csum in drop if s.drop_unverified(ns, key, csum)]
            return n, dropped
        return self._run(call)

    def delete(self, items: list[tuple[bytes, bytes]]) -> int:
        """Delete each (ns, key); how many were there. Not fenced: these are repair's own
        deletes (a record handed over, a surplus one), not a client's."""
        by_ns: dict[bytes, list[bytes]] = {}
        for ns, key in items:
            by_ns.setdefault(ns, []).append(key)

        async def call():
            return sum(self._store.delete(ns, keys, fence=False) for ns, keys in by_ns.items())
        return self._run(call)
