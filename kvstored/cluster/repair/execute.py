"""Carrying out the actions decide.py returns, for a batch of objects at once.

Per batch: held records verified or dropped in one hop onto the event loop; the records
to copy read locally in one hop; rebuild sources read with one batch_get per peer, every
peer at once (another round for objects whose first sources were missing or stale); the
missing records rebuilt; written with one batch_put per peer (PUT_CHUNK records a call),
every peer at once, through the throttle; then surplus records deleted (a handed-over
record only once every copy of it was written). A batch is carried out in chunks of at
most MAX_BATCH_BYTES of records.

With ``PIPELINED``, a chunk's writes and deletes run on a writer thread while the next
chunk (of this batch or the next one, see ``start``) is read and rebuilt, so reading,
rebuilding and writing overlap; at most one chunk is being written while one more is
built, so at most two chunks' records are held. Off by default: on 2 shared cores with
every node on them it made passes ~20 % slower (the threads contend for the GIL and the
cores; nothing waits on a network), see RESULTS.md, issue 13 session 4; where peers are
other hosts the overlap hides their round trips.

Between its steps (each round of reads, a chunk's rebuild, each write call) repair
yields to this node's clients while they wait (pace.py): it waits in proportion to its
work, and its chunks and write calls shrink with the pace. Rebuilt records are (header, fragment)
pairs, sent gathered: the fragment pyeclib returned is not copied behind its header.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

from kvstore.layout import lap_key

from kvstored.engine.fence import MAX_WRITE_AGE_S

from . import pause
from . import rebuild as rb
from .pace import Pace
from .local import Held
from .decide import (UNRECOVERABLE, Copy, DeleteLocal, Drop, HandOver, Obj, Peers, Pending, Reconstruct,
                     Verify, decide)
from .peers import FENCED
from .steps import Steps

log = logging.getLogger("kvstored.repair")

# records one chunk holds (two chunks when PIPELINED): 16 MiB (~12 rebuilds of 341 KiB
# records) took less CPU than 64 MiB in paired runs (4.02-4.35 against 4.26-4.48 CPU-s for
# 3072 records, system time 1.26-1.43 against 1.88-1.90 s: sources and rebuilt fragments
# are reused while cached, fewer fresh pages), more write hops notwithstanding (RESULTS.md,
# issue 13 H3 session 6)
MAX_BATCH_BYTES = 16 << 20
PUT_CHUNK = 32  # records per batch_put (the SDK's pipelining window)
WRITE_S = 0.25  # one write call carries at most this long of cluster.repair_rate's bytes
PIPELINED = False  # write a chunk on a writer thread while the next is built (see above)
MAX_SOURCE_ROUNDS = 8  # bounded: each round consumes at least one source per object
MAX_REPORTED = 10_000  # unrecoverable objects remembered as reported (then forgotten at once)
# A batch's later chunks are decided again from fresh Heads once the batch's are this old,
# and a chunk holds at most this long of cluster.repair_rate's bytes: so a write goes out
# well within MAX_WRITE_AGE_S of the Heads it was decided from, even under a slow throttle
REFRESH_S = MAX_WRITE_AGE_S / 4


def size(data) -> int:
    """The size of a record to write: one buffer or a (header, payload) pair."""
    return len(data[0]) + len(data[1]) if isinstance(data, tuple) else len(data)


def _chunks(sizes: list[int], most: int, cap: float):
    """(start, end) of consecutive runs of at most ``most`` items and ``cap`` bytes (at
    least one item each): a throttled repair writes (and shows progress) in steps of a
    fraction of a second, not in one 11 MiB call that waits for seconds first."""
    start, n = 0, 0
    for i, b in enumerate(sizes):
        if i > start and (i - start >= most or n + b > cap):
            yield start, i
            start, n = i, 0
        n += b
    if start < len(sizes):
        yield start, len(sizes)


def _alone(o: Obj, got: dict, me: str) -> bool:
    """True when every slot of ``o`` answered and none holds any record of it (any version,
    verified or not), and this node holds it on none of its own slots: this node's
    records are all that is left of it."""
    if any(lap in o.mine for m, lap in o.slots if m.node_id == me):
        return False
    for m, lap in o.slots:
        if m.node_id != me:
            h = got.get((m.node_id, lap))
            if h is None or h.present:
                return False
    return True


def _local_time(o: Obj, key: bytes) -> float | None:
    """The commit time of this node's record ``key`` of ``o`` (as the walk read it)."""
    return next((v.committed_at for v in o.mine.values() if v.key == key), None)


def _source_time(o: Obj, node_id: str, lap: int, heads: dict, me: str) -> float | None:
    """The commit time, on this node's clock, of the record of ``o`` on lap ``lap`` of
    ``node_id`` (a rebuild source): this node's own, or the peer's Heads answer (None: a
    peer of an earlier version, which does not say)."""
    if node_id == me:
        v = o.mine.get(lap)
        return None if v is None else v.committed_at
    h = heads.get(id(o), {}).get((node_id, lap))
    return None if h is None else h.committed_at


def _oldest(times: list) -> float | None:
    """The commit time a record rebuilt from sources committed at ``times`` keeps: the
    oldest known one. It holds bytes of every source, so it is no newer than any of them;
    a newer time would let a source a client re-put (or a copy written before copies
    kept their time) carry the rest past a delete made after the others were written.
    (Sources of one version are one put's fragments, so the times differ only by
    re-puts and copies.) None when no source's time is known: the write's own."""
    known = [t for t in times if t is not None]
    return min(known) if known else None


def _held(o: Obj, acts: list) -> int:
    """Bytes of records carrying out ``acts`` holds at once: a rebuild's sources and the
    records it builds, a copy's record and what is written of it; nothing for an object
    with nothing to move."""
    size = max((v.size for v in o.mine.values()), default=0)
    n = 0
    for a in acts:
        if isinstance(a, Reconstruct):
            n += (rb.needed(o.policy, a.kind) + len(a.targets)) * size
        elif isinstance(a, (Copy, HandOver)):
            n += 2 * size
    return n


class Executor:
    def __init__(self, store, peers, throttle, count, per_peer, stopping, steps=None,
                 pace: Pace | None = None):
        """``store``: LocalStore; ``peers``: PeerIO; ``throttle``: Throttle; ``count(name,
        n)``: the agent's counters; ``per_peer(fn, jobs)``: run one job per peer at once;
        ``stopping()``: True once the agent is stopping; ``steps``: steps.Steps (where
        the time goes); ``pace``: pace.Pace (None: never yields)."""
        self.store, self.peers, self.throttle = store, peers, throttle
        self.count, self.per_peer, self.stopping = count, per_peer, stopping
        self.steps = steps if steps is not None else Steps()
        self.pace = pace if pace is not None else Pace(0.0, 1.0)
        self._writer: ThreadPoolExecutor | None = None
        self._inflight: Future | None = None  # the chunk being written
        self.pause = pause.point()  # a test's pause point (None outside such tests)
        self._reported: set = set()  # (ns, base, reason) of unrecoverable objects logged

    def close(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=False, cancel_futures=True)

    def run(self, objs: list[Obj], heads: dict, view: Peers, refresh=None,
            asked: float | None = None) -> list[bool]:
        """``start`` and wait for the outcome."""
        return self.start(objs, heads, view, refresh, asked).result()

    def _decide(self, o: Obj, heads: dict, view: Peers) -> list:
        try:
            return decide(o, heads.get(id(o), {}), view)
        except Exception:  # a bug on one object must not stop the pass for all others
            self.count("failures")
            log.exception("repair decision failed", extra={
                "namespace": o.ns.decode(errors="replace"), "key": o.base[:48].hex()})
            return [Pending("decision failed")]

    def start(self, objs: list[Obj], heads: dict, view: Peers, refresh=None,
              asked: float | None = None) -> Future:
        """Decide for every object and carry the actions out in bulk. Returns when the
        last chunk's records are rebuilt and handed to the writer thread: a Future of the
        outcome (per object, True when it needs nothing more from this node), done once
        those are written. Call ``start`` again meanwhile: the next batch is read and
        rebuilt while this one is written (writes stay in order).

        The batch's Heads were asked at ``asked`` (time.monotonic(); None: now): what is
        written is decided from them, and the nodes' delete fence covers a write for
        MAX_WRITE_AGE_S after them
        (fence.py). Once they are REFRESH_S old, the objects of the chunks still to build
        are asked again (``refresh(objs)``: their Heads, as the agent's ``heads`` argument)
        and decided again; a write that would still go out later than MAX_WRITE_AGE_S is
        dropped for this pass (the object stays pending)."""
        decided = time.monotonic() if asked is None else asked
        c0, w0 = time.thread_time(), time.perf_counter()
        plans = [self._decide(o, heads, view) for o in objs]
        ok = [not any(isinstance(a, Pending) for a in acts) for acts in plans]
        for o, acts, done in zip(objs, plans, ok):
            if not done:
                self._report(o, acts)
        self.steps.add("decide", time.thread_time() - c0, time.perf_counter() - w0)
        self.steps.timed("settle", self._settle, objs, plans, ok)
        # execute in chunks whose records fit MAX_BATCH_BYTES (and REFRESH_S of the
        # throttle), less while yielding to clients (the pace)
        most = MAX_BATCH_BYTES
        if self.throttle is not None:
            most = max(1, min(most, int(self.throttle.rate * REFRESH_S)))
        start, size = 0, 0
        for i, o in enumerate(objs):
            est = _held(o, plans[i])
            if i > start and size + est > self.pace.scale(most):
                self._move(objs[start:i], plans[start:i], ok, start, view.me, decided, heads)
                start, size = i, 0
                if refresh is not None and time.monotonic() - decided > REFRESH_S:
                    decided = time.monotonic()  # (before the Heads are asked: conservative)
                    heads = refresh(objs[i:])
                    self._redecide(objs, plans, ok, i, heads, view)
                    est = _held(o, plans[i])
            size += est
        if start < len(objs):
            self._move(objs[start:], plans[start:], ok, start, view.me, decided, heads)
        last = self._inflight
        done: Future = Future()
        if last is None:
            done.set_result(ok)
            return done

        def finished(f: Future) -> None:
            # the writer runs chunks in order: once this batch's last chunk is written,
            # all of the batch is
            if f.cancelled():  # close(): the agent is stopping
                done.set_exception(RuntimeError("repair stopped"))
                return
            e = f.exception()
            if e is not None:
                done.set_exception(e)
            else:
                done.set_result(ok)
        last.add_done_callback(finished)
        return done

    def _redecide(self, objs: list[Obj], plans: list, ok: list, i: int, heads: dict,
                  view: Peers) -> None:
        """Decide objs[i:] again from fresh ``heads``; their held records were settled
        already (Verify / Drop are not carried out twice)."""
        self.count("redecided", len(objs) - i)
        for j in range(i, len(objs)):
            acts = [a for a in self._decide(objs[j], heads, view) if not isinstance(a, (Verify, Drop))]
            plans[j] = acts
            ok[j] = not any(isinstance(a, Pending) for a in acts)
            if not ok[j]:
                self._report(objs[j], acts)

    def _report(self, o: Obj, acts: list) -> None:
        """An object nothing can rebuild (decide.UNRECOVERABLE) is logged once as a
        warning, not every pass (it stays pending; passes back off to repair_interval)."""
        for a in acts:
            if isinstance(a, Pending) and a.reason.startswith(UNRECOVERABLE):
                what = (o.ns, o.base, a.reason)
                if what in self._reported:
                    return
                if len(self._reported) >= MAX_REPORTED:
                    self._reported.clear()
                self._reported.add(what)
                self.count("unrecoverable")
                log.warning("repair: cannot rebuild an object: %s (reported once; its records "
                            "are kept)", a.reason, extra={
                                "namespace": o.ns.decode(errors="replace"), "key": o.base[:48].hex()})
                return

    def _submit_write(self, fn, cleanup=None) -> None:
        """Run ``fn``: now, or with PIPELINED on the writer thread once the chunk in
        flight is written (so at most one chunk waits while another is written); then
        ``cleanup()``, once, whatever happened (also when ``fn`` never runs)."""
        def run():
            try:
                fn()
            finally:
                if cleanup is not None:
                    cleanup()
        prev, self._inflight = self._inflight, None
        try:
            if prev is not None:
                prev.result()  # a failed write ends the pass like any error (and is forgotten)
            if PIPELINED and self._writer is None:
                self._writer = ThreadPoolExecutor(1, thread_name_prefix="kvstored-repair-write")
        except BaseException:
            if cleanup is not None:
                cleanup()
            raise
        if not PIPELINED:
            run()
            return
        try:
            fut = self._writer.submit(run)
        except BaseException:  # the writer was shut down (the agent stops)
            if cleanup is not None:
                cleanup()
            raise
        if cleanup is not None:  # cancelled by close(): run() never runs
            fut.add_done_callback(lambda f: cleanup() if f.cancelled() else None)
        self._inflight = fut

    def _settle(self, objs: list[Obj], plans: list, ok: list) -> None:
        """Verify / Drop actions: one loop hop for the batch."""
        verify, drop = [], []
        for o, acts in zip(objs, plans):
            for a in acts:
                if isinstance(a, Verify):
                    verify.append((o.ns, a.key))
                elif isinstance(a, Drop):
                    drop.append((o.ns, a.key, a.checksum))
        if not verify and not drop:
            return
        n, dropped = self.store.settle(verify, drop)
        self.count("verified", n)
        self.count("dropped", len(dropped))
        for ns, key in dropped:
            log.info("dropped a stale record recovered at restart", extra={
                "namespace": ns.decode(errors="replace"), "key": key[:48].hex()})

    def _move(self, objs: list[Obj], plans: list, ok: list, base: int, me: str,
              decided: float, heads: dict) -> None:
        """Copy, HandOver, Reconstruct and DeleteLocal actions of ``objs`` (ok[base + i]
        is object i's outcome, cleared on any failure; ``decided``: when the Heads they
        were decided from were asked, time.monotonic()).

        A write refused by the fence (FENCED: the object was deleted on its target while
        this pass looked at it) fails like any other: the object stays pending, and the
        next pass decides again from fresh Heads, which then show the delete. A
        handed-over record is kept, unless no slot held any record of the object (``heads``:
        the Heads it was decided from): then the delete missed only this node (a draining
        one, which clients no longer ask), and its record goes too."""
        # 1. local records to send
        local_keys: dict[tuple[bytes, bytes], bytes | None] = {}
        for o, acts in zip(objs, plans):
            for a in acts:
                if isinstance(a, (Copy, HandOver)):
                    local_keys[(o.ns, a.src)] = None
        # 2.-3. rebuild sources read and records rebuilt. This node's sources are read in
        # place (views of their DRAM slots), their read references held until the chunk is
        # written (a re-indexed whole record is written with its source's payload)
        steps = self.steps
        held = Held()
        try:
            writes, tags = self._build(objs, plans, ok, base, me, heads, local_keys, held)
        except BaseException:
            self._release(held)
            raise

        def finish() -> None:
            if self.pause is not None:
                self.pause.before_write([(ns, key) for _m, items in writes.values()
                                         for ns, _o, key, _d, _t, _at in items])
            results = steps.timed("write", self._write, writes, me, decided)
            for tag, r in results.items():
                tags[tag] += r
            # 4. deletes: handed-over records once every copy was written
            deletes = []
            for i, (o, acts) in enumerate(zip(objs, plans)):
                for n, a in enumerate(acts):
                    written = tags.get((i, n), [])
                    landed = all(r is not None and r is not FENCED for r in written)
                    if not landed:
                        ok[base + i] = False
                    if isinstance(a, DeleteLocal) or (isinstance(a, HandOver) and written and landed):
                        deletes.append((o.ns, a.key if isinstance(a, DeleteLocal) else a.src))
                    elif (isinstance(a, HandOver) and any(r is FENCED for r in written)
                          and _alone(o, heads.get(id(o), {}), me)):
                        deletes.append((o.ns, a.src))
                        log.info("repair: dropped a record of an object deleted while it was "
                                 "handed over", extra={"namespace": o.ns.decode(errors="replace"),
                                                       "key": a.src[:48].hex()})
            if deletes:
                self.count("removed", steps.timed("delete", self.store.delete, deletes))
        self._submit_write(finish, lambda: self._release(held))

    def _release(self, held: Held) -> None:
        """Give back the read references of this node's sources read in place (if any)."""
        if held.asked:
            self.store.release(held)

    def _build(self, objs: list[Obj], plans: list, ok: list, base: int, me: str, heads: dict,
               local_keys: dict, held: Held) -> tuple[dict, dict]:
        """_move's reads and rebuilds: (the records to write per peer, the results of each
        action's writes, by tag), this node's sources' read references kept in ``held``."""
        # 2. rebuild sources, read local first, then one batch_get per peer
        recs: dict[int, list] = {}  # i -> usable source records
        times: dict[int, list] = {}  # i -> their commit times (this node's clock; None: unknown)
        have: dict[int, set] = {}
        tried: dict[int, int] = {}  # i -> sources consumed
        rebuilds = [(i, o, a) for i, (o, acts) in enumerate(zip(objs, plans))
                    for a in acts if isinstance(a, Reconstruct)]
        for i, _o, _a in rebuilds:
            recs[i], times[i], have[i], tried[i] = [], [], set(), 0
        steps = self.steps
        if local_keys:  # the records to copy, in one loop hop
            steps.timed("read", self._read, [], me, local_keys)
        for _round in range(MAX_SOURCE_ROUNDS):
            wants = []  # (i, o, a, member, key)
            when = []  # the commit time of each source asked for
            for i, o, a in rebuilds:
                need = rb.needed(o.policy, a.kind) - len(recs[i])
                if need <= 0 or tried[i] >= len(a.sources):
                    continue
                for j in a.sources[tried[i]:tried[i] + need]:
                    member, lap = o.slots[j]
                    wants.append((i, o, a, member, lap_key(o.base, lap)))
                    when.append(_source_time(o, member.node_id, lap, heads, me))
                tried[i] += need
            if not wants:
                break
            got = steps.timed("read", self._read, wants, me, {}, held)
            self.pace.step()
            c0, w0 = time.thread_time(), time.perf_counter()
            for (i, o, a, _m, _k), buf, at in zip(wants, got, when):
                took = rb.usable([buf], a.version, have[i], o.policy, a.kind)
                recs[i] += took
                times[i] += [at] * len(took)
            steps.add("check", time.thread_time() - c0, time.perf_counter() - w0)
        # 3. records to write, per peer, each with the commit time it keeps there (the
        # source's: a copy is no client's commit, docs/cluster.md "Deletes and repair")
        writes: dict[str, tuple] = {}  # node_id -> (member, [(ns, overwrite, key, data, tag, at)])
        tags: dict[tuple, list] = {}  # (i, action index) -> results of its writes

        def write(member, ns, overwrite, key, data, tag, at):
            writes.setdefault(member.node_id, (member, []))[1].append((ns, overwrite, key, data, tag, at))
            tags.setdefault(tag, [])

        c0, w0 = time.thread_time(), time.perf_counter()
        for i, (o, acts) in enumerate(zip(objs, plans)):
            for n, a in enumerate(acts):
                if isinstance(a, (Copy, HandOver)):
                    data = local_keys.get((o.ns, a.src))
                    if data is None:
                        ok[base + i] = False
                        tags[(i, n)] = [None]
                        continue
                    at = _local_time(o, a.src)
                    for j in ((a.slot,) if isinstance(a, Copy) else a.slots):
                        write(o.slots[j][0], o.ns, a.overwrite, a.dst, data, (i, n), at)
                elif isinstance(a, Reconstruct):
                    what = f"{o.ns.decode(errors='replace')}/{o.base[:48].hex()}"
                    built = rb.rebuild(o.policy, a.kind, recs.get(i, []), [t[0] for t in a.targets], what)
                    if built is None:
                        ok[base + i] = False
                        continue
                    at = _oldest(times[i][:rb.needed(o.policy, a.kind)])  # the sources rebuild() used
                    for idx, j, overwrite in a.targets:
                        member, lap = o.slots[j]
                        write(member, o.ns, overwrite, lap_key(o.base, lap), built[idx], (i, n), at)
        steps.add("rebuild", time.thread_time() - c0, time.perf_counter() - w0)
        self.pace.step()
        return writes, tags

    def _read(self, wants: list, me: str, local_keys: dict, held: Held | None = None) -> list:
        """The records of ``wants`` ((i, o, a, member, key)) and of ``local_keys`` (filled
        in place): this node's in one loop hop, each peer's with one batch_get, at once.
        With ``held``, this node's rebuild sources are views of its slots, their read
        references kept in ``held`` (LocalStore.read_many)."""
        local = [(o.ns, key) for _i, o, _a, member, key in wants if member.node_id == me]
        lk = list(local_keys)
        # rebuild sources split into (header, payload): see LocalStore.read_many
        if local and held is not None:
            got_local = self.store.read_many(local + lk, len(local), held=held)
        else:
            got_local = self.store.read_many(local + lk, len(local)) if local or lk else []
        for k, buf in zip(lk, got_local[len(local):]):
            local_keys[k] = buf
        per_peer: dict[str, tuple] = {}
        for n, (_i, o, _a, member, key) in enumerate(wants):
            if member.node_id != me:
                per_peer.setdefault(member.node_id, (member, {}))[1].setdefault(o.ns, []).append((n, key))

        # Peers' records here are rebuild sources, which rb.usable checks end to end; for
        # a policy whose records it checks whole (rb.sound_alone) the transfer checksum,
        # a second hash of every byte, is not asked for
        alone: dict[bytes, bool] = {}
        for _i, o, _a, member, _k in wants:
            if member.node_id != me:
                alone[o.ns] = alone.get(o.ns, True) and rb.sound_alone(o.policy)

        def read(job):
            member, by_ns = job
            out = []
            for ns, its in by_ns.items():
                bufs = self.peers.get_many(member, ns, [k for _n, k in its], verify=not alone[ns])
                out += [(n, b) for (n, _k), b in zip(its, bufs)]
            return out

        result: list = [None] * len(wants)
        li = iter(got_local[:len(local)])
        for n, (_i, _o, _a, member, _k) in enumerate(wants):
            if member.node_id == me:
                result[n] = next(li)
        for got in self.per_peer(read, per_peer).values():
            for n, b in got:
                result[n] = b
        return result

    def _write(self, writes: dict, me: str, decided: float) -> dict:
        """Repair writes per peer (grouped by namespace and overwrite flag), all peers at
        once, throttled; this node's own records straight into its store
        (LocalStore.put_many: no loopback round trip, no serving on the other end);
        {tag: [True stored | False identical | FENCED refused | None failed, ...]}. A
        chunk not sent within MAX_WRITE_AGE_S of ``decided`` is not sent (None)."""
        pace = self.pace

        def put(job):
            pace.begin()  # (a thread of its own with several peers at once)
            member, items = job
            put_many = (self.store.put_many if member.node_id == me
                        else lambda ns, its, overwrite, ats: self.peers.put_many(member, ns, its, overwrite, ats))
            groups: dict[tuple, list] = {}
            for ns, overwrite, key, data, tag, at in items:
                groups.setdefault((ns, overwrite), []).append((key, data, tag, at))
            out = []
            for (ns, overwrite), its in groups.items():
                for c, e in _chunks([size(d) for _k, d, _t, _a in its],
                                    max(1, int(pace.scale(PUT_CHUNK))), self.throttle.rate * WRITE_S):
                    if self.stopping():
                        out += [(tag, None) for _k, _d, tag, _a in its[c:]]
                        break
                    chunk = its[c:e]
                    pace.step()
                    self.throttle.take(sum(size(d) for _k, d, _t, _a in chunk))
                    if time.monotonic() - decided > MAX_WRITE_AGE_S:  # past what fences cover
                        self.count("late_writes", len(its) - c)
                        out += [(tag, None) for _k, _d, tag, _a in its[c:]]
                        break
                    rs = put_many(ns, [(k, d) for k, d, _t, _a in chunk], overwrite,
                                  [at for _k, _d, _t, at in chunk])
                    for (_k, d, tag, _a), r in zip(chunk, rs):
                        if r is FENCED:
                            self.count("fenced")
                        elif r:
                            self.count("records_written")
                            self.count("bytes_written", size(d))
                        out.append((tag, r))
            return out

        results: dict = {}
        for got in self.per_peer(put, writes).values():
            for tag, r in got:
                results.setdefault(tag, []).append(r)
        return results
