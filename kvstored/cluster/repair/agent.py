"""The repair loop: when to run a pass, which objects it looks at, and what their slots
hold (execute.py carries out what decide.py makes of it).

Runs in its own thread (it makes blocking SDK calls to peers) and touches the store only
through LocalStore (local.py), which hops onto the daemon's event loop. A pass starts
``cluster.repair_delay`` seconds after a placement or policy change (so a flapping node is
not rebuilt at once), after a drain starts, and every ``cluster.repair_interval``
seconds; it skips while etcd is unreachable (the member list may be stale). It walks this
node's objects in repair order (records not yet verified first, then pinned or recently
read, then read at least once, then the rest), a chunk of the index at a time
(LocalStore.walk), and acts on them in batches of BATCH objects before walking further,
so a pass holds a chunk, not a row per object. Per batch:

one Heads call per peer (and per namespace), all peers at once (an object another node
leads is asked of its first slot only, see ``_ask``), then ``decide()`` per object (pure,
no I/O) and the actions carried out in bulk (execute.py), throttled to
``cluster.repair_rate`` bytes/s, and yielding to this node's clients while they wait
(pace.py: ``cluster.repair_yield_lag``, ``cluster.repair_min_pace``).

Writes and deletes are idempotent (immutable objects, deterministic reconstruction), so
two nodes acting on the same object at once, or a pass interrupted by a crash, cannot
corrupt anything.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor, wait

from kvstore import errors
from kvstore.layout import FRAG_HEADER, MAX_LAPS, Policy, lap_key, parse_head, slots, split_lap
from kvstore.placement import Member
from kvstore.wire import FLAG_COMMIT_AGE

from .decide import Head, Local, Obj, Peers, follower, led_by_first
from .execute import Executor
from .local import LocalStore
from .peers import PeerIO
from .pace import NodeLoad, Pace
from .steps import Steps, thread_clock
from .throttle import Throttle

log = logging.getLogger("kvstored.repair")

# objects per batch (one Heads call per peer per batch): 1024 took 12-21 % less survivors'
# CPU per rebuilt record than 256 in paired runs (fewer Heads round trips and loop hops,
# fuller chunks; RESULTS.md, issue 13 H3 session 6)
BATCH = 1024
HEADS_PER_CALL = 4096  # keys per Heads call (the server's max_batch_keys is larger)
PEER_THREADS = 8  # peers talked to at once (PARALLEL_PEERS)
MAX_PENDING_KEYS = 100_000  # unfinished objects remembered for the next pass
HEAD = FRAG_HEADER.size
YOUNG_S = 2.0  # records younger than this (or repair_delay) wait for a later pass
RATE_WINDOW_S = 10.0  # the write rate (for the ETA) is measured over this long
# ... and shown once it spans this long: over less, the throttle's burst (a second's worth,
# written as soon as a pass starts) says more than the rate
RATE_MIN_S = 1.0


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# Peers are called at once (one thread each) only where the node has the cores to run
# them: on 2 shared cores the threads only contend for the GIL and the cores; one call
# after another (each batched and pipelined) took 2-21 % less CPU per rebuilt byte there,
# wall time within the noise (RESULTS.md, issue 13 H3 session 5). With more cores the
# overlap hides the peers' round trips.
PARALLEL_PEERS = _cores() >= 4


class RepairSettings:
    """The config values the agent uses."""

    def __init__(self, delay: float, interval: float, rate: int, token: str | None = None,
                 tls=None, yield_lag: float = 0.0, min_pace: float = 1.0,
                 hold_requests: bool = False):
        self.delay, self.interval, self.rate, self.token, self.tls = delay, interval, rate, token, tls
        self.yield_lag, self.min_pace = yield_lag, min_pace  # pace.py
        self.hold_requests = hold_requests  # pace.py: peers' repair requests wait their turn here

    @classmethod
    def from_config(cls, c) -> "RepairSettings":
        tls = None
        if c.tls_cert_file:  # the node's own certificate, checked against its CA
            from kvstore import TLSConfig
            tls = TLSConfig(ca_file=c.tls_client_ca_file or None, cert_file=c.tls_cert_file,
                            key_file=c.tls_key_file)
        return cls(c.cluster_repair_delay, c.cluster_repair_interval, c.cluster_repair_rate,
                   c.cluster_token or None, tls, c.cluster_repair_yield_lag,
                   c.cluster_repair_min_pace, c.cluster_repair_hold_requests)


class RepairAgent:
    def __init__(self, node_id: str, store: LocalStore, membership, settings: RepairSettings,
                 load: NodeLoad | None = None):
        """``membership``: the node's Membership (epoch, degraded, draining, policies,
        view(), placement_members()); ``store``: LocalStore; ``load``: what the node's
        clients see (pace.NodeLoad; None: repair never yields to them)."""
        self.node_id = node_id
        self.store = store
        self.membership = membership
        self.delay, self.interval = settings.delay, settings.interval
        self._wake = threading.Event()
        self._now = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.throttle = Throttle(settings.rate)
        # its work: the thread's CPU and its hops onto the event loop (LocalStore)
        self.pace = Pace(settings.yield_lag, settings.min_pace, load,
                         hold_requests=settings.hold_requests,
                         work=lambda: time.thread_time() + getattr(store, "hop_s", 0.0))
        self.peers = PeerIO(settings.token, settings.tls, self._count)
        self.steps = Steps()  # where the current (or last) pass spends its time
        self._loop_cpu = None  # the event loop thread's CPU clock (once known)
        self.executor = Executor(store, self.peers, self.throttle, self._count, self._per_peer,
                                 lambda: self._stop, self.steps, self.pace)
        self._pool: ThreadPoolExecutor | None = None
        self._started: dict[str, float] = {}  # node_id -> process start (unix s), per pass
        self._peer_epochs: dict[str, int] = {}  # node_id -> epoch of its last Heads answer
        self._skipped_young = 0
        self._young_pending = 0  # young records the last pass left for a later one
        # what the last pass saw, so that a pass after a membership change looks only at
        # the objects the change can have touched (a full pass every repair_interval)
        self._prev_members: list | None = None
        self._prev_started: dict[str, float] = {}
        self._last_full = 0.0
        self._force_full = False
        self._recheck_young = False
        self._pending_keys: set | None = set()  # None: too many to track, next pass is full
        self._pass_t0 = 0.0
        self._pass_objects = 0  # objects the current pass looks at
        self._rate_marks: list[tuple[float, int]] = []  # (t, bytes_written) for the rate
        self.st = {"state": "idle", "passes": 0, "scanned": 0, "total": 0, "records_written": 0,
                   "bytes_written": 0, "verified": 0, "dropped": 0, "removed": 0, "failures": 0,
                   "last_pass_seconds": 0.0, "pending": 0}
        # counters beyond RepairStatus (metrics only): writes refused by a peer's delete
        # fence, writes dropped as sent too late for the fences (fence.MAX_WRITE_AGE_S),
        # objects decided again from fresh Heads (a slow batch, execute.REFRESH_S),
        # objects found below K fragments with every slot answering (reported once each)
        self.more = {"fenced": 0, "late_writes": 0, "redecided": 0, "unrecoverable": 0}
        self._settling = False  # a change woke the loop: its pass is due (repair_delay)
        if hasattr(membership, "on_dropped"):
            membership.on_dropped.append(self.hold_back)
        self._led_elsewhere = 0  # objects of the current pass settled by their first slot's Head

    # ------------------------------------------------------------ life cycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kvstored-repair", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self.executor.close()
        self.peers.close()

    def hold_back(self, hold: bool = True) -> None:
        """This node was dropped from the cluster and is rejoining (membership, on the
        loop): deletes may have missed it, so the next pass is a full one (its leftovers
        of deletes are deleted, decide._drop_leftovers), and with ``hold`` every record
        it holds is held back until checked, as at a restart."""
        if hold:
            n = self.store.hold_all_now()
            log.warning("repair: holding back %d record(s) until checked against the peers", n)
        self._force_full = True
        self.wake()

    def wake(self, now: bool = False) -> None:
        """A placement/policy change (after repair_delay) or ``now`` (drain)."""
        self._now = self._now or now
        self._wake.set()

    def status(self) -> dict:
        """Members().repair (RepairStatus in control.proto): the counters, and for the
        pass in progress how long it has run, the write rate (bytes/s over the last
        RATE_WINDOW_S; 0 until it spans RATE_MIN_S) and an ETA from the share of its objects
        scanned (0 when idle); its pace and the seconds it waited for clients (pace.py)."""
        with self._lock:
            st = dict(self.st)
            marks = list(self._rate_marks)
        st.update(pass_seconds=0.0, rate=0.0, eta_seconds=0.0, pace=round(self.pace.pace, 3),
                  yield_seconds=round(self.pace.yielded_s, 3))
        if st["state"] != "scanning":
            return st
        now = time.monotonic()
        elapsed = now - self._pass_t0
        marks.append((now, st["bytes_written"]))
        if now - marks[0][0] >= RATE_MIN_S:
            st["rate"] = round((marks[-1][1] - marks[0][1]) / (now - marks[0][0]), 1)
        todo = self._pass_objects  # a pass after a membership change looks at fewer than total
        if st["scanned"] and todo > st["scanned"]:
            st["eta_seconds"] = round(elapsed * (todo - st["scanned"]) / st["scanned"], 3)
        st["pass_seconds"] = round(elapsed, 3)
        return st

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:  # peer threads count too
            if name in self.st:
                self.st[name] += n
            else:
                self.more[name] += n

    def _mark_rate(self) -> None:
        with self._lock:
            now = time.monotonic()
            self._rate_marks.append((now, self.st["bytes_written"]))
            while len(self._rate_marks) > 2 and now - self._rate_marks[0][0] > RATE_WINDOW_S:
                self._rate_marks.pop(0)

    def _workers(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(PEER_THREADS, thread_name_prefix="kvstored-repair")
        return self._pool

    def _per_peer(self, fn, jobs: dict) -> dict:
        """``fn(job)`` for every job (one per peer), at once with PARALLEL_PEERS;
        {name: result}."""
        if len(jobs) <= 1 or not PARALLEL_PEERS:
            return {name: fn(job) for name, job in jobs.items()}
        futs = {name: self._workers().submit(fn, job) for name, job in jobs.items()}
        # every job ends before an outcome or error is taken: a job may send views of this
        # node's DRAM slots (repair's in-place sources), whose read references the caller
        # gives back once this returns or raises
        wait(futs.values())
        try:
            return {name: f.result() for name, f in futs.items()}
        except CancelledError:  # stop() cancelled the pool's work: end the pass like any error
            raise RuntimeError("repair stopped") from None

    # ------------------------------------------------------------ the loop
    def _run(self) -> None:
        m = self.membership
        due = time.monotonic() + self.delay
        retry = 0.0  # the current back-off after passes that left work pending
        while not self._stop:
            timeout = max(0.0, due - time.monotonic())
            if self._wake.wait(timeout):
                self._wake.clear()
                if self._stop:
                    return
                # settle: a change starts a pass repair_delay later; further changes
                # within that time join the same pass (never postpone it)
                retry = 0.0  # something changed: unfinished work may be doable now
                if self._now:
                    due = time.monotonic()
                elif not self._settling:
                    due = min(due, time.monotonic() + self.delay)
                self._now = False
                self._settling = True
                self.st["state"] = "waiting"
                continue
            if m.degraded:
                self._settling = True
                self.st["state"] = "waiting"
                due = time.monotonic() + 1.0
                continue
            t0 = time.monotonic()
            self._young_pending = 0
            try:
                pending = self._pass()
            except Exception:
                if self._stop:
                    return  # shutting down: clients closed under the pass
                log.exception("repair pass failed")
                self._count("failures")
                pending = 1
            self._passed(pending, time.monotonic() - t0)
            # unfinished work (peers down, fragments missing): try again soon, backing off
            # while it stays unfinished (an object that lost more than M fragments never
            # will be) up to the interval
            if pending:
                retry = min(retry * 2, self.interval) if retry else max(self.delay, 1.0)
                due = time.monotonic() + retry
            else:
                retry = 0.0
                due = time.monotonic() + self.interval
                if (m.draining and self._skipped_young) or self._recheck_young:
                    # a drain waits for nothing; records written around a membership
                    # change are looked at as soon as they are old enough
                    self._recheck_young = False
                    due = time.monotonic() + max(YOUNG_S, self.delay)

    def _passed(self, pending: int, seconds: float) -> None:
        """The status once a pass ended with ``pending`` objects unfinished. Pending also
        counts the records it skipped as young that a pass must look at once they are
        old enough (written around a membership change): a pass is then due for them,
        so the state is "waiting", not "idle"."""
        self.st["last_pass_seconds"] = round(seconds, 3)
        self.st["passes"] += 1
        self.st["pending"] = pending + self._young_pending
        self._settling = False
        self.st["state"] = "waiting" if self._young_pending else "idle"

    def _pass(self) -> int:
        """One pass; logs where it spent its time when it did anything."""
        steps = self.steps
        steps.reset()
        if self._loop_cpu is None:
            self._loop_cpu = thread_clock(self.store.loop_thread()) or (lambda: 0.0)
        c0, l0, w0 = time.thread_time(), self._loop_cpu(), time.monotonic()
        y0 = self.pace.yielded_s
        written0 = self.st["records_written"]
        self._led_elsewhere = 0
        objects = 0
        try:
            pending, objects = self._pass_body(steps)
            return pending
        finally:
            written = self.st["records_written"] - written0
            if written or objects:
                log.info("repair pass done", extra={
                    "objects": objects, "young": self._skipped_young,
                    "young_pending": self._young_pending, "led_elsewhere": self._led_elsewhere,
                    "records_written": written,
                    "seconds": round(time.monotonic() - w0, 3),
                    "cpu_ms": round((time.thread_time() - c0) * 1e3),
                    "loop_cpu_ms": round((self._loop_cpu() - l0) * 1e3),
                    "yielded_ms": round((self.pace.yielded_s - y0) * 1e3),
                    "steps_cpu_wall_ms": steps.summary()})

    def _pass_body(self, steps: Steps) -> tuple[int, int]:
        """(objects left pending, objects looked at). The index is walked a chunk at a
        time (LocalStore.walk, in repair order), each chunk's rows grouped into objects
        and selected, and the selected ones decided and acted on BATCH at a time: a pass
        holds one chunk of rows and at most a batch or two of objects, not a row and an
        ``Obj`` per object of the node (docs/scale.md, "Where it stops")."""
        m = self.membership
        me = self.node_id
        members, policies, draining, self._started = self._view()
        if not members:
            return 0, 0
        # a record younger than this may belong to a put still in flight (its other
        # records not written yet): leave it to a later pass. Not counted as pending: a
        # node taking writes always has young records, and a finished put is complete.
        begun = time.time()
        young = begun - max(YOUNG_S, self.delay)
        full = self._full_due(m)
        # id(obj) -> the policy its slots were computed for (by _affected), for the
        # objects selected and not yet done (pruned per batch: ids are reused)
        self._slots_of: dict[int, Policy] = {}
        changed = self._prev_members is not None and (
            [x.node_id for x in self._prev_members] != [x.node_id for x in members])
        carried = self._pending_keys or set()
        self._pass_t0 = time.monotonic()
        self._pass_objects = 0
        self._skipped_young = 0
        with self._lock:
            self._rate_marks = [(self._pass_t0, self.st["bytes_written"])]
        self.st.update(state="scanning", scanned=0, total=0)
        pending = selected = total = 0
        unfinished: set[tuple[bytes, bytes]] = set()
        young_keys: set[tuple[bytes, bytes]] = set()
        epoch = m.epoch
        self.peers.new_pass()  # peers that do not answer are not asked again this pass
        inflight = None  # (batch, todo, outcome future) of the batch being written
        self.pace.begin()

        def account(batch, todo, outcome) -> None:
            nonlocal pending
            for o, ok in zip(todo, outcome.result()):
                if not ok:
                    pending += 1
                    unfinished.add((o.ns, o.base))
            self.st["scanned"] += len(batch)
            self._mark_rate()

        walk = self.store.walk(siblings_of(policies, len(members)))
        buf: list[Obj] = []  # selected objects not yet in a batch
        walked = False
        try:
            while True:
                if self._stop or (walked and not buf):
                    break
                if m.epoch != epoch:  # the member list changed under us: start over soon
                    pending += max(len(buf), self._pass_objects - self.st["scanned"], 1)
                    self._force_full = True
                    break
                if len(buf) < BATCH and not walked:
                    got = steps.timed("walk", next, walk, None)
                    if got is None:
                        walked = True
                        self._pass_objects, self.st["total"] = selected, total
                    else:
                        c0, w0 = time.thread_time(), time.perf_counter()
                        rows, share = got
                        objs = group(self._old_rows(rows, young, begun, changed, carried,
                                                    unfinished, young_keys), policies, m.draining)
                        total += len(objs)
                        if not full:
                            objs = self._affected(objs, members)
                        selected += len(objs)
                        buf += objs
                        # what the whole pass will look at, from the share walked so far
                        self._pass_objects = max(selected, round(selected / share) if share else 0)
                        self.st["total"] = max(total, round(total / share) if share else 0)
                        steps.add("select", time.thread_time() - c0, time.perf_counter() - w0)
                    continue
                if not self.st["scanned"] and inflight is None:  # the first batch
                    log.info("repair pass", extra={"full": full, "members": len(members),
                                                   "epoch": f"{m.epoch:08x}"})
                batch, buf = buf[:BATCH], buf[BATCH:]
                self.pace.step()  # (the previous batch's last writes, this pass's select)
                steps.timed("own_heads", self._read_my_heads, batch)
                c0, w0 = time.thread_time(), time.perf_counter()
                for o in batch:
                    if self._slots_of.pop(id(o), None) != o.policy or not o.policy:
                        o.slots = slots(o.base, members, o.policy, o.ns) if o.policy else []
                todo = [o for o in batch if o.slots]
                steps.add("slots", time.thread_time() - c0, time.perf_counter() - w0)
                asked = time.monotonic()  # what is written is decided from these Heads
                asked_wall = time.time()  # (held records' commit times are wall clock)
                heads, settled, led = steps.timed("heads", self._ask, todo, me, draining)
                if led:  # finished as far as this node is concerned
                    todo = [o for o in todo if id(o) not in led]
                view = Peers(me, settled, self._started, draining, asked_wall,
                             dict(self._peer_epochs), m.epoch)
                # with execute.PIPELINED this batch is read and rebuilt while the previous
                # one is written; otherwise it is all done when start() returns
                started = (batch, todo, self.executor.start(
                    todo, heads, view, lambda objs: self._heads_all(objs, me, draining), asked))
                if inflight is not None:
                    account(*inflight)
                inflight = started
        except BaseException:
            if inflight is not None:  # let the batch being written finish (its errors: this one's)
                try:
                    inflight[2].result()
                except Exception:
                    pass
            raise
        finally:
            walk.close()  # a pass cut short leaves the rest of the walk
        if inflight is not None:
            account(*inflight)
        self._young_pending = len(young_keys)
        self._prev_members, self._prev_started = members, dict(self._started)
        if full:
            self._last_full = time.monotonic()
        self._pending_keys = unfinished if len(unfinished) <= MAX_PENDING_KEYS else None
        return pending, selected

    def _old_rows(self, rows: list, young: float, begun: float, changed: bool, carried: set,
                  unfinished: set, young_keys: set) -> list:
        """The rows committed before ``young``. The others are left to a later pass;
        those written around a membership change (or carried over as such) are looked at
        again once they are old enough (added to ``unfinished`` and ``young_keys``). Not
        those committed after the pass began (``begun``, wall clock), which the walk
        meets too: written with this member list (a client on an older one is
        redirected), many by this pass's own writes, they would only hold a pass due."""
        old = []
        for r in rows:
            if r[8] <= young:
                old.append(r)
                continue
            self._skipped_young += 1
            if r[8] > begun:
                continue
            split = split_lap(r[1])
            key = (r[0], split[0] if split else r[1])
            if changed or key in carried:
                unfinished.add(key)
                young_keys.add(key)
                self._recheck_young = True
        return old

    def _full_due(self, m) -> bool:
        """A full pass looks at every object; otherwise only at those a membership change
        can have touched (see _affected)."""
        force, self._force_full = self._force_full, False
        return (force or self._prev_members is None or self._pending_keys is None or m.draining
                or self.store.unverified > 0
                or time.monotonic() - self._last_full >= self.interval)

    def _affected(self, objs: list[Obj], members: list) -> list[Obj]:
        """The objects whose slots differ between the previous pass's member list and this
        one, or sit on a node that restarted since (its records may be gone), or that the
        last pass left unfinished. Objects of unknown policy are always looked at."""
        prev = self._prev_members
        restarted = {nid for nid, at in self._started.items()
                     if nid in self._prev_started and self._prev_started[nid] != at}
        out = []
        for o in objs:
            if o.policy is None or (o.ns, o.base) in self._pending_keys:
                out.append(o)
                continue
            sl = slots(o.base, members, o.policy, o.ns)
            now_slots = [(x.node_id, lap) for x, lap in sl]
            # placed on fewer (or more) positions than before (members below K+M or the
            # copy count): the slots differ, no need to place it on the old list too
            if (min(o.policy.n, len(prev)) != min(o.policy.n, len(members))
                    or now_slots != [(x.node_id, lap) for x, lap in slots(o.base, prev, o.policy, o.ns)]
                    or any(nid in restarted for nid, _ in now_slots)):
                o.slots = sl  # reused by the batch loop unless the policy changes there
                self._slots_of[id(o)] = o.policy
                out.append(o)
        return out

    def _view(self):
        m = self.membership
        pols = {}
        for ns, text in m.policies.items():
            try:
                pols[ns] = Policy.parse(text)
            except errors.InvalidArgument:
                log.warning("ignoring a malformed policy", extra={"namespace": ns, "policy": text})
        rows = m.view()
        # draining members still answer (they hand their records over): asked beside the slots
        draining = [Member(i.node_id, i.control_address, i.failure_domain)
                    for i, h, _a, _me in rows if i.draining and h in ("alive", "stale")]
        started = {i.node_id: i.started_at for i, _h, _a, _me in rows}
        return m.placement_members(), pols, draining, started

    def _read_my_heads(self, batch: list[Obj]) -> None:
        """Fill in the EC header of this node's records of the batch (one loop hop); an
        object none of whose records has a valid header is not an EC object after all."""
        want = [(o, lap) for o in batch if o.ec for lap in o.mine]
        got = self.store.read_heads([(o.ns, o.mine[lap].key) for o, lap in want], HEAD)
        for (o, lap), head in zip(want, got):
            if head is None:
                del o.mine[lap]
            else:
                o.mine[lap] = o.mine[lap]._replace(head=head)
        for o in batch:
            if not o.ec:
                continue
            h = next((parse_head(v.head) for v in o.mine.values() if parse_head(v.head)), None)
            if h is None:
                o.ec = False  # not an EC record after all (no valid header)
                if o.policy is None or o.policy.kind == "ec":
                    o.policy = None  # no slots: left alone
            else:
                o.policy = Policy("ec", h[4] + h[5], h[4], h[5])

    def _ask(self, batch: list[Obj], me: str, draining: list) -> tuple[dict, dict, set]:
        """Heads of every slot (and draining node) of the batch's objects, one call per
        peer and namespace, all peers at once: ({id(obj): {(node_id, lap): Head or None
        (no answer)}}, {node_id: settled}, {id(obj) of objects left to their leader}).

        An object this node only follows (decide.follower: another node is its first
        slot, this node's records verified and on its own slots) is first asked of its
        first slot alone; when that Head shows the same version (decide.led_by_first),
        another node leads it and decide() would give this node nothing to do, so it is
        left out. The others are asked of the remaining slots in a second round. While a
        node drains, every object is asked of every slot (its records are handed over)."""
        first: dict[int, tuple] = {}  # id(obj) -> (version, kind) of this node's records
        if not draining:
            for o in batch:
                f = follower(o, me)
                if f is not None:
                    first[id(o)] = f
        wants = []
        for o in batch:
            if id(o) in first:
                wants.append((o, [o.slots[0]]))
            else:
                wants.append((o, [(m, lap) for m, lap in list(o.slots) + [(d, 0) for d in draining]
                                  if m.node_id != me]))
        heads, settled = self._heads(wants)
        led, again = set(), []
        for o in batch:
            if id(o) not in first:
                continue
            m0, lap0 = o.slots[0]
            if led_by_first(first[id(o)], heads.get(id(o), {}).get((m0.node_id, lap0))):
                led.add(id(o))
            else:
                again.append((o, [(m, lap) for m, lap in o.slots[1:] if m.node_id != me]))
        if again:
            more, s2 = self._heads(again)
            for k, v in more.items():
                heads.setdefault(k, {}).update(v)
            for nid, s in s2.items():
                settled[nid] = settled.get(nid, True) and s
        self._led_elsewhere += len(led)
        return heads, settled, led

    def _heads_all(self, objs: list[Obj], me: str, draining: list) -> dict:
        """Heads of every slot (and draining node) of ``objs`` (as ``_ask``'s first
        result, without its first-slot shortcut): for objects decided again."""
        return self._heads([(o, [(m, lap) for m, lap in list(o.slots) + [(d, 0) for d in draining]
                                 if m.node_id != me]) for o in objs])[0]

    def _heads(self, wants: list) -> tuple[dict, dict]:
        """Heads of ``wants`` ([(obj, [(member, lap)])]), one call per peer and namespace
        (HEADS_PER_CALL keys at most), all peers at once: ({id(obj): {(node_id, lap): Head
        or None}}, {node_id: settled})."""
        per_peer: dict[str, tuple[object, dict]] = {}
        for o, targets in wants:
            for member, lap in targets:
                key = lap_key(o.base, lap) if o.ec else o.base
                per_peer.setdefault(member.node_id, (member, {}))[1].setdefault(o.ns, []).append(
                    (o, lap, key))

        def ask(job):
            member, by_ns = job
            out, settled = [], None
            for ns, its in by_ns.items():
                for c in range(0, len(its), HEADS_PER_CALL):
                    chunk = its[c:c + HEADS_PER_CALL]
                    r = self.peers.heads(member, ns, [k for _o, _l, k in chunk], HEAD)
                    if r is None:
                        out += [(o, lap, None) for o, lap, _k in chunk]
                        continue
                    settled = r.unverified_objects == 0
                    self._peer_epochs[member.node_id] = r.epoch
                    at, aged = time.time(), bool(r.put_flags & FLAG_COMMIT_AGE)
                    # (decide.answered, inline: one Head per key of every peer)
                    out += [(o, lap, Head(p, u, c, hd, d, at - ca if aged and p else None))
                            for (o, lap, _k), (p, u, _s, c, hd, d, ca) in zip(chunk, r.heads)]
            return out, settled

        heads: dict[int, dict] = {}
        settled: dict[str, bool] = {}
        for nid, (got, s) in self._per_peer(ask, per_peer).items():
            if s is not None:
                settled[nid] = s
            for o, lap, h in got:
                heads.setdefault(id(o), {})[(nid, lap)] = h
        return heads, settled

def siblings_of(policies: dict, n_members: int):
    """The ``siblings(ns, key, unverified)`` of a repair walk (store.repair_walk): the
    other lap keys of an EC record's object, which this node may hold too, so that the
    walk gives them in the same rows and ``group`` sees all of an object's records at
    once (decide() needs them all: a lap outside this node's slots is handed over to a
    slot the others leave free). Asked of every lap > 0 record and every held one, and
    of lap-0 records only while the object has fewer members than slots (laps wrap onto
    the same nodes); otherwise a lap-0 record seldom has siblings (leftovers of such a
    time), and they bring it along when the walk reaches them (the object is then looked
    at twice in that pass, which is harmless). Lap keys go up to the policy's K+M, or
    to MAX_LAPS for a namespace without one. Runs on the event loop, per row."""
    kinds: dict[bytes, Policy | None | bool] = {}  # ns -> its policy; False: not EC

    def siblings(ns: bytes, key: bytes, unverified: bool):
        p = kinds.get(ns, True)
        if p is True:
            p = policies.get(ns.decode(errors="replace")) or policies.get("*")
            p = kinds[ns] = False if p is not None and p.kind != "ec" else p
        if p is False:
            return ()
        split = split_lap(key)
        if split is None:
            return ()
        base, lap = split
        n = p.n if p is not None else MAX_LAPS
        if lap == 0:
            if not unverified and (p is None or n_members >= n):
                return ()
            return [base + x for x in _LAP_SUFFIX[1:n]]  # lap_key(base, 1..n-1)
        return [base] + [base + x for i, x in enumerate(_LAP_SUFFIX[1:n], 1) if i != lap]
    return siblings


_LAP_SUFFIX = [b""] + [bytes((lap,)) for lap in range(1, MAX_LAPS)]  # lap_key's, by lap


def group(rows, policies: dict, draining: bool) -> list[Obj]:
    """The objects of rows of the store's repair walk, in their order: EC records grouped
    by their lap-0 key (siblings_of brings an object's records into the same rows);
    replicated records of namespaces with a policy (or, on a draining
    node, of any namespace: they go to their "none" home)."""
    objs: dict[tuple[bytes, bytes], Obj] = {}
    for ns, key, size, csum, unverified, _pinned, _visited, _reads, at in rows:
        p = policies.get(ns.decode(errors="replace")) or policies.get("*")
        split = split_lap(key)
        if split is not None and (p is None or p.kind == "ec"):
            base, lap = split
            o = objs.get((ns, base))
            if o is None:
                o = objs[(ns, base)] = Obj(ns, base, p, True)
            o.mine[lap] = Local(key, size, csum, unverified, b"", at)
        elif p is not None and p.kind != "ec" or (p is None and draining):
            o = objs[(ns, key)] = Obj(ns, key, p or Policy("none", 1), False)
            o.mine[0] = Local(key, size, csum, unverified, b"", at)
    return list(objs.values())  # dict order keeps the walk's repair order
