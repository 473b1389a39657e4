"""The repair agent: brings every record this node holds to where the layout wants it.

Runs in its own thread (it makes blocking SDK calls to peers) and touches the store only
through the daemon's event loop. A pass starts ``cluster.repair_delay`` seconds after a
placement or policy change (so a flapping node is not rebuilt at once), after a drain
starts, and every ``cluster.repair_interval`` seconds; it skips while etcd is unreachable
(the member list may be stale). It walks this node's objects in repair order (records
not yet verified first, then pinned, then recently read, then most read) in batches,
asks the nodes of each object's slots what they hold (one Heads call per peer per batch)
and then, per object:

* **verify** a record recovered at restart (it may have been deleted or replaced while
  the node was away): kept when a verified peer holds the same version; dropped when
  verified peers hold only another version, or when none holds it and a settled peer (no
  records held back itself) that was already running when the record was written says
  it is not there; left for the next pass when no peer answered. Otherwise (every peer
  restarted too, or only peers that joined later answered) it is kept.
* **rebuild** (the *leader*, the first slot holding a verified current record): slots that
  lack a record get one: replicas are copied; missing EC fragments are reconstructed
  from K others (pyeclib) and written; whole-object EC records are re-indexed copies.
  Indices a draining node still holds are left to it.
* **move** (this node is not a slot: it is draining or placement moved away): the record
  is written to a slot that lacks its index (or copy), then deleted here; a record whose
  index a slot already holds is surplus and deleted.

Namespaces repair by the cluster's policy (``kvstore-cli policy set`` / cluster.policies).
EC records are self-describing, so they are repaired in namespaces without a policy too;
replicated records in such namespaces are left alone (their copy count is not known).

Writes are throttled to ``cluster.repair_rate`` bytes/s. Writes and deletes are
idempotent (immutable objects, deterministic reconstruction), so two nodes acting on the
same object at once, or a pass interrupted by a crash, cannot corrupt anything.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from kvstore import errors
from kvstore.layout import (FRAG_HEADER, KIND_FRAGMENT, KIND_REPLICA, Policy, codec, fragment_record,
                            lap_key, parse_head, parse_record, slots, split_lap)
from kvstore.placement import Member

if TYPE_CHECKING:
    from kvstored.node import Node

log = logging.getLogger("kvstored.repair")

BATCH = 64  # objects per batch (one Heads call per peer per batch)
WORKERS = 4  # objects of a batch repaired at once
MAX_PENDING_KEYS = 100_000  # unfinished objects remembered for the next pass
HEAD = FRAG_HEADER.size
CALL_TIMEOUT = 10.0  # waiting on the event loop
PEER_TIMEOUT = 3.0  # one call to a peer: a dead one (still listed) must not stall the pass
YOUNG_S = 2.0  # records younger than this (or repair_delay) wait for a later pass


class _Obj:
    """One object this node holds a record (or records) of."""

    __slots__ = ("ns", "base", "policy", "mine", "slots", "ec")

    def __init__(self, ns: bytes, base: bytes, policy: Policy | None, ec: bool):
        self.ns, self.base, self.policy, self.ec = ns, base, policy, ec
        # lap -> (key, size, checksum, unverified, head, committed_at)
        self.mine: dict[int, tuple] = {}
        self.slots: list = []


class RepairAgent:
    def __init__(self, node: "Node", loop: asyncio.AbstractEventLoop):
        self.node = node
        self.loop = loop
        c = node.config
        self.delay = c.cluster_repair_delay
        self.interval = c.cluster_repair_interval
        self.rate = c.cluster_repair_rate
        self.token = c.cluster_token or None
        self._wake = threading.Event()
        self._now = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self._clients: dict[str, object] = {}
        self._budget_t = time.monotonic()
        self._budget = 0.0
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._started: dict[str, float] = {}  # node_id -> process start (unix s), per pass
        self._unreachable: set[str] = set()
        self._skipped_young = 0
        # what the last pass saw, so that a pass after a membership change looks only at
        # the objects the change can have touched (a full pass every repair_interval)
        self._prev_members: list | None = None
        self._prev_started: dict[str, float] = {}
        self._last_full = 0.0
        self._force_full = False
        self._recheck_young = False
        self._pending_keys: set | None = set()  # None: too many to track, next pass is full
        self.st = {"state": "idle", "passes": 0, "scanned": 0, "total": 0, "records_written": 0,
                   "bytes_written": 0, "verified": 0, "dropped": 0, "removed": 0, "failures": 0,
                   "last_pass_seconds": 0.0, "pending": 0}

    # ------------------------------------------------------------ life cycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kvstored-repair", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        for c in list(self._clients.values()):
            try:
                c.close()
            except Exception:
                pass

    def wake(self, now: bool = False) -> None:
        """A placement/policy change (after repair_delay) or ``now`` (drain)."""
        self._now = self._now or now
        self._wake.set()

    def status(self) -> dict:
        return dict(self.st)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:  # objects are repaired by several worker threads at once
            self.st[name] += n

    # ------------------------------------------------------------ loop plumbing
    def _on_loop(self, fn, *args):
        """Run ``fn(*args)`` (or await it, for a coroutine function) on the event loop."""
        async def call():
            r = fn(*args)
            if asyncio.iscoroutine(r):
                r = await r
            return r
        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(CALL_TIMEOUT)

    def _client(self, member):
        """The cached Client of a peer (workers share it; it is thread-safe), replaced when
        the peer comes back on another address."""
        with self._lock:
            c = self._clients.get(member.node_id)
            if c is not None and c.address == member.address:
                return c
            old, c = c, self._new_client(member.address)
            self._clients[member.node_id] = c
        if old is not None:
            old.close()
        return c

    def _new_client(self, address: str):
        from kvstore.client import Client
        cfg = self.node.config
        tls = None
        if cfg.tls_cert_file:  # the node's own certificate, checked against its CA
            from kvstore import TLSConfig
            tls = TLSConfig(ca_file=cfg.tls_client_ca_file or None, cert_file=cfg.tls_cert_file,
                            key_file=cfg.tls_key_file)
        return Client(address, timeout=PEER_TIMEOUT, shm=False, token=self.token, tls=tls,
                      ride_out_restarts=False)

    def _throttle(self, nbytes: int) -> None:
        """Token bucket over written bytes (burst: one second's worth), shared by the workers."""
        with self._lock:
            now = time.monotonic()
            self._budget = min(self.rate, self._budget + (now - self._budget_t) * self.rate) - nbytes
            self._budget_t = now
            wait = -self._budget / self.rate if self._budget < 0 else 0.0
        if wait:
            time.sleep(min(wait, 5.0))

    # ------------------------------------------------------------ the loop
    def _run(self) -> None:
        m = self.node.membership
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
                elif self.st["state"] != "waiting":
                    due = min(due, time.monotonic() + self.delay)
                self._now = False
                self.st["state"] = "waiting"
                continue
            if m.degraded:
                self.st["state"] = "waiting"
                due = time.monotonic() + 1.0
                continue
            t0 = time.monotonic()
            try:
                pending = self._pass()
            except Exception:
                if self._stop:
                    return  # shutting down: clients closed under the pass
                log.exception("repair pass failed")
                self._count("failures")
                pending = 1
            self.st["last_pass_seconds"] = round(time.monotonic() - t0, 3)
            self.st["passes"] += 1
            self.st["pending"] = pending
            self.st["state"] = "idle"
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

    def _pass(self) -> int:
        m = self.node.membership
        me = self.node.node_id
        members, policies, draining, self._started = self._on_loop(self._view)
        if not members:
            return 0
        rows = self._on_loop(self.node.store.repair_snapshot)
        # a record younger than this may belong to a put still in flight (its other
        # records not written yet): leave it to a later pass. Not counted as pending: a
        # node taking writes always has young records, and a finished put is complete.
        young = time.time() - max(YOUNG_S, self.delay)
        fresh = [r for r in rows if r[8] > young]
        rows = [r for r in rows if r[8] <= young]
        self._skipped_young = len(fresh)
        objs = self._group(rows, policies, m.draining)
        total = len(objs)
        full = self._full_due(m)
        if not full:
            objs = self._affected(objs, members)
        self.st.update(state="scanning", scanned=0, total=total)
        if objs:
            log.info("repair pass", extra={"objects": len(objs), "members": len(members),
                                           "epoch": f"{m.epoch:08x}"})
        pending = 0
        unfinished: set[tuple[bytes, bytes]] = set()
        epoch = m.epoch
        self._unreachable = set()  # peers that did not answer: not asked again this pass
        for i in range(0, len(objs), BATCH):
            if self._stop:
                break
            if m.epoch != epoch:  # the member list changed under us: start over soon
                pending += len(objs) - i
                self._force_full = True
                break
            batch = objs[i:i + BATCH]
            self._read_my_heads(batch)
            for o in batch:
                if o.ec:
                    h = next((parse_head(v[4]) for v in o.mine.values() if parse_head(v[4])), None)
                    if h is None:
                        o.ec = False  # not an EC record after all (no valid header)
                        if o.policy is None or o.policy.kind == "ec":
                            o.slots = []
                            continue
                    else:
                        o.policy = Policy("ec", h[4] + h[5], h[4], h[5])
                pkey = o.base
                o.slots = slots(pkey, members, o.policy, o.ns) if o.policy else []
            heads, settled = self._ask(batch, me, draining)

            def one(o: _Obj) -> bool:
                try:
                    return self._object(o, me, heads, settled, draining)
                except errors.KVStoreError as e:
                    self._count("failures")
                    log.info("repair of one object failed: %s", e, extra={
                        "namespace": o.ns.decode(errors="replace"), "key": o.base[:48].hex()})
                    return False
                except Exception:  # a bug on one object must not stop the pass for all others
                    if self._stop:
                        raise
                    self._count("failures")
                    log.exception("repair of one object failed", extra={
                        "namespace": o.ns.decode(errors="replace"), "key": o.base[:48].hex()})
                    return False

            # objects are independent: a few at once hide the per-object round trips
            todo = [o for o in batch if o.slots]
            for o, ok in zip(todo, self._workers().map(one, todo)):
                if not ok:
                    pending += 1
                    unfinished.add((o.ns, o.base))
            self.st["scanned"] += len(batch)
        changed = self._prev_members is not None and (
            [x.node_id for x in self._prev_members] != [x.node_id for x in members])
        carried = self._pending_keys or set()
        for r in fresh:
            # written around the change (or carried over as such): look at them again
            # once they are old enough
            split = split_lap(r[1])
            key = (r[0], split[0] if split else r[1])
            if changed or key in carried:
                unfinished.add(key)
                self._recheck_young = True
        self._prev_members, self._prev_started = members, dict(self._started)
        if full:
            self._last_full = time.monotonic()
        self._pending_keys = unfinished if len(unfinished) <= MAX_PENDING_KEYS else None
        return pending

    def _full_due(self, m) -> bool:
        """A full pass looks at every object; otherwise only at those a membership change
        can have touched (see _affected)."""
        force, self._force_full = self._force_full, False
        return (force or self._prev_members is None or self._pending_keys is None or m.draining
                or self.node.store.unverified > 0
                or time.monotonic() - self._last_full >= self.interval)

    def _affected(self, objs: list[_Obj], members: list) -> list[_Obj]:
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
            now_slots = [(x.node_id, lap) for x, lap in slots(o.base, members, o.policy, o.ns)]
            if (now_slots != [(x.node_id, lap) for x, lap in slots(o.base, prev, o.policy, o.ns)]
                    or any(nid in restarted for nid, _ in now_slots)):
                out.append(o)
        return out

    def _workers(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="kvstored-repair")
        return self._pool

    def _view(self):
        m = self.node.membership
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

    def _group(self, rows, policies: dict, draining: bool) -> list[_Obj]:
        objs: dict[tuple[bytes, bytes], _Obj] = {}
        for ns, key, size, csum, unverified, _pinned, _visited, _reads, at in rows:
            p = policies.get(ns.decode(errors="replace")) or policies.get("*")
            split = split_lap(key)
            if split is not None and (p is None or p.kind == "ec"):
                base, lap = split
                o = objs.get((ns, base))
                if o is None:
                    o = objs[(ns, base)] = _Obj(ns, base, p, True)
                o.mine[lap] = (key, size, csum, unverified, b"", at)
            elif p is not None and p.kind != "ec" or (p is None and draining):
                # draining: objects of namespaces without a policy go to their "none" home
                o = objs[(ns, key)] = _Obj(ns, key, p or Policy("none", 1), False)
                o.mine[0] = (key, size, csum, unverified, b"", at)
        return list(objs.values())  # dict order keeps the snapshot's repair order

    def _read_my_heads(self, batch: list[_Obj]) -> None:
        async def read():
            for o in batch:
                if not o.ec:
                    continue
                for lap, v in list(o.mine.items()):
                    try:
                        got = await self.node.store.read_head(o.ns, v[0], HEAD)
                    except errors.NotFound:
                        got = None
                    if got is None:
                        del o.mine[lap]
                    else:
                        o.mine[lap] = v[:4] + (got[1],) + v[5:]
        asyncio.run_coroutine_threadsafe(read(), self.loop).result(CALL_TIMEOUT * 3)

    def _ask(self, batch: list[_Obj], me: str, draining: list) -> tuple[dict, dict]:
        """Heads of every slot (and draining node) of the batch's objects, one call per
        peer: {(node_id, lap): Head or None (no answer)}, {node_id: settled}."""
        per_peer: dict[str, tuple[object, list]] = {}
        for o in batch:
            if not o.slots:
                continue
            wanted = list(o.slots) + [(d, 0) for d in draining]
            for member, lap in wanted:
                if member.node_id == me:
                    continue
                key = lap_key(o.base, lap) if o.ec else o.base
                per_peer.setdefault(member.node_id, (member, []))[1].append((o, lap, key))
        heads: dict[tuple, dict] = {}
        settled: dict[str, bool] = {}
        for nid, (member, items) in per_peer.items():
            by_ns: dict[bytes, list] = {}
            for o, lap, key in items:
                by_ns.setdefault(o.ns, []).append((o, lap, key))
            for ns, its in by_ns.items():
                try:
                    if nid in self._unreachable:
                        raise errors.Unavailable("did not answer earlier in this pass")
                    r = self._client(member).heads([k for _o, _l, k in its], head_bytes=HEAD,
                                                   namespace=ns.decode())
                except errors.KVStoreError as e:
                    log.debug("repair: %s did not answer Heads: %s", nid, e)
                    if isinstance(e, errors.Unavailable):
                        self._unreachable.add(nid)
                    for o, lap, _k in its:
                        heads.setdefault(id(o), {})[(nid, lap)] = None
                    continue
                settled[nid] = r.unverified_objects == 0
                for (o, lap, _k), h in zip(its, r.heads):
                    heads.setdefault(id(o), {})[(nid, lap)] = h
        return heads, settled

    # ------------------------------------------------------------ one object
    def _object(self, o: _Obj, me: str, heads: dict, settled: dict, draining: list) -> bool:
        """Act on one object; True when it needs nothing more from this node."""
        got = heads.get(id(o), {})
        if o.ec:
            return self._ec(o, me, got, settled, draining)
        return self._replicated(o, me, got, settled)

    def _version(self, o: _Obj, head_or_mine) -> tuple | None:
        """The version a record holds: (olen, ocsum, K, M) for EC, the checksum otherwise."""
        if o.ec:
            h = parse_head(head_or_mine)
            return None if h is None else (h[8], h[9], h[4], h[5])
        return head_or_mine

    def _verify_mine(self, o: _Obj, me: str, got: dict, settled: dict) -> bool | None:
        """Settle this node's unverified records of ``o`` (kept ones are verified, stale
        ones dropped from the store and from ``o.mine``). None: undecided (no peer
        answered), else True."""
        unverified = {lap: v for lap, v in o.mine.items() if v[3]}
        if not unverified:
            return True
        mine_v = {lap: self._version(o, v[4] if o.ec else v[2]) for lap, v in unverified.items()}
        verified_versions, unverified_versions, answered, lacking_since = set(), set(), False, []
        for (nid, _lap), h in got.items():
            if h is None:
                continue
            answered = True
            if not h.present:
                if settled.get(nid, False):  # a peer with nothing held back says "not here"
                    lacking_since.append(self._started.get(nid, float("inf")))
                continue
            v = self._version(o, h.head if o.ec else h.checksum)
            (unverified_versions if h.unverified else verified_versions).add(v)
        for lap, v in o.mine.items():  # this node's own verified records count too
            if not v[3]:
                verified_versions.add(self._version(o, v[4] if o.ec else v[2]))
        peers = {m.node_id for m, _ in o.slots} - {me}
        for lap, (key, _size, csum, _u, _h, at) in unverified.items():
            if verified_versions:
                keep = mine_v[lap] in verified_versions
            elif any(started < at for started in lacking_since):
                # a peer that was running when this record was written does not hold it:
                # deleted while this node was away (a peer that restarted empty since, or
                # joined later, proves nothing)
                keep = False
            elif not peers:
                keep = True  # the only home: nothing to compare with
            elif not answered:
                return None
            else:
                keep = True  # every peer restarted too: nothing says it is stale
            if keep:
                self._on_loop(self._verify_entry, o.ns, key)
                self._count("verified")
                o.mine[lap] = o.mine[lap][:3] + (False,) + o.mine[lap][4:]
            else:
                if self._on_loop(self.node.store.drop_unverified, o.ns, key, csum):
                    self._count("dropped")
                    log.info("dropped a stale record recovered at restart", extra={
                        "namespace": o.ns.decode(errors="replace"), "key": key[:48].hex()})
                del o.mine[lap]
        return True

    def _verify_entry(self, ns: bytes, key: bytes) -> None:
        e = self.node.store.index.get((ns, key))
        if e is not None:
            self.node.store.verify(e)

    # ---- replicas / none
    def _replicated(self, o: _Obj, me: str, got: dict, settled: dict) -> bool:
        v = self._verify_mine(o, me, got, settled)
        if v is None:
            return False
        if not o.mine:
            return True
        key, size, csum = o.mine[0][:3]
        slot_ids = [m.node_id for m, _ in o.slots]
        have = {}  # node_id -> holds the current version (verified)
        for nid in slot_ids:
            if nid == me:
                have[nid] = True
                continue
            h = got.get((nid, 0))
            have[nid] = None if h is None else (h.present and not h.unverified and h.checksum == csum)
        if me in slot_ids:
            leader = next((nid for nid in slot_ids if have[nid]), None)
            if leader != me:
                return True
            targets = [nid for nid in slot_ids if have[nid] is False]
            if not targets:
                return all(have[n] for n in slot_ids)
            data = self._read_local(o.ns, key)
            if data is None:
                return False
            ok = True
            for nid in targets:
                ok = self._push(next(m for m, _ in o.slots if m.node_id == nid), o.ns, key, data) and ok
            return ok and all(have[n] is not None for n in slot_ids)
        # not a home of this object any more: hand it over, then let go
        missing = [nid for nid in slot_ids if have[nid] is False]
        if any(have[n] is None for n in slot_ids):
            return False
        others = [got.get((nid, 0)) for nid in slot_ids]
        if not any(have.values()) and any(h is not None and h.present and not h.unverified
                                           for h in others):
            self._delete_local(o.ns, key)  # the homes hold a newer version: this one is stale
            return True
        if missing:
            data = self._read_local(o.ns, key)
            if data is None:
                return False
            for nid in missing:
                if not self._push(next(m for m, _ in o.slots if m.node_id == nid), o.ns, key, data):
                    return False
        self._delete_local(o.ns, key)
        return True

    # ---- erasure coding
    def _ec(self, o: _Obj, me: str, got: dict, settled: dict, draining: list) -> bool:
        v = self._verify_mine(o, me, got, settled)
        if v is None:
            return False
        if not o.mine:
            return True
        p = o.policy
        # what every slot holds: (index, kind, version) of a verified record, False, None
        held: list = []
        for member, lap in o.slots:
            if member.node_id == me:
                mv = o.mine.get(lap)
                h = parse_head(mv[4]) if mv is not None and not mv[3] else None
                held.append((h[3], h[2], self._version(o, mv[4])) if h else False)
                continue
            h = got.get((member.node_id, lap))
            if h is None:
                held.append(None)
            elif not h.present or h.unverified or parse_head(h.head) is None:
                held.append(False)
            else:
                hh = parse_head(h.head)
                held.append((hh[3], hh[2], self._version(o, h.head)))
        versions: dict = {}
        for x in held:
            if x:
                versions[x[2]] = versions.get(x[2], 0) + 1
        my_versions = {self._version(o, mv[4]) for mv in o.mine.values() if not mv[3]}
        if not versions and not my_versions:
            return False
        current = max(versions.items(), key=lambda kv: kv[1])[0] if versions else next(iter(my_versions))
        kind = next((x[1] for x in held if x and x[2] == current), None)
        if kind is None:
            kind = next(parse_head(mv[4])[2] for mv in o.mine.values() if not mv[3])
        want = list(range(p.n)) if kind == KIND_FRAGMENT else list(range(p.m + 1))
        nslots = len(want)
        # slot j is right when it holds a current record with an index nobody before it holds
        seen: set[int] = set()
        right = []
        for x in held[:nslots]:
            ok = bool(x) and x[2] == current and x[0] in want and x[0] not in seen
            if ok:
                seen.add(x[0])
            right.append(ok if x is not None else None)
        missing = [i for i in want if i not in seen]
        my_laps = {lap for member, lap in o.slots[:nslots] if member.node_id == me}
        # draining nodes hand over their own records: leave their indices to them
        drained = set()
        for d in draining:
            if d.node_id == me:
                continue
            h = got.get((d.node_id, 0))
            if h is not None and h.present and not h.unverified:
                hh = parse_head(h.head)
                if hh is not None and self._version(o, h.head) == current:
                    drained.add(hh[3])
        done = self._hand_over(o, me, my_laps, current, held, right, seen)
        if not my_laps:
            return done
        leader = next((j for j, ok in enumerate(right) if ok), None)
        if leader is None or o.slots[leader][0].node_id != me:
            return done
        missing = [i for i in want if i not in seen]
        # indices a draining holder still has are left to it (it writes them itself)
        todo = [i for i in missing if i not in drained]
        if not todo:
            return done and not missing and None not in right
        free = [j for j, ok in enumerate(right) if ok is False]
        for i in missing:  # keep the drained indices' own slots for them
            if i in drained and i in free:
                free.remove(i)
        plan = _assign(todo, free)
        if not plan:
            return False
        records = self._rebuild(o, kind, current, [i for i, _j in plan], held, me)
        if records is None:
            return False
        ok = True
        for i, j in plan:
            member, lap = o.slots[j]
            ok = self._push(member, o.ns, lap_key(o.base, lap), records[i],
                            overwrite=held[j] not in (False, None)) and ok
        return done and ok and len(plan) == len(todo) and None not in right

    def _hand_over(self, o: _Obj, me: str, my_laps: set, current, held: list, right: list,
                   seen: set) -> bool:
        """Records of mine outside my slots (draining, placement moved, an old lap): write
        each to a slot lacking a record (its own position first) and delete it here, or
        delete it when a slot holds its index already. True when none is left."""
        extra = {lap: mv for lap, mv in o.mine.items() if lap not in my_laps and not mv[3]}
        if not extra:
            return True
        if None in right:
            return False  # a slot did not answer: its state is unknown
        done = True
        readable = sum(1 for ok in right if ok) >= (o.policy.k if o.policy else 1)
        for lap, mv in extra.items():
            h = parse_head(mv[4])
            if h is None:
                continue
            if self._version(o, mv[4]) != current:
                if readable:  # an older version, replaced while this record sat here
                    self._delete_local(o.ns, mv[0])
                continue
            idx = h[3]
            if idx in seen:
                self._delete_local(o.ns, mv[0])
                continue
            plan = _assign([idx], [j for j, ok in enumerate(right) if ok is False])
            data = self._read_local(o.ns, mv[0]) if plan else None
            if data is None:
                done = False
                continue
            j = plan[0][1]
            member, tlap = o.slots[j]
            if self._push(member, o.ns, lap_key(o.base, tlap), data, overwrite=held[j] not in (False, None)):
                right[j] = True
                seen.add(idx)
                self._delete_local(o.ns, mv[0])
            else:
                done = False
        return done

    def _rebuild(self, o: _Obj, kind: int, current, todo: list[int], held: list,
                 me: str) -> dict[int, bytes] | None:
        """Records for indices ``todo``: re-indexed copies of a whole-object record, or
        fragments reconstructed from K current ones."""
        p = o.policy
        sources = [(j, x) for j, x in enumerate(held) if x and x[2] == current]
        sources.sort(key=lambda jx: (o.slots[jx[0]][0].node_id != me, jx[1][0]))  # local first
        recs = []
        have: set[int] = set()
        for j, x in sources:
            if x[0] in have:  # the same index on two slots: one is enough (K distinct needed)
                continue
            member, lap = o.slots[j]
            key = lap_key(o.base, lap)
            buf = self._read_local(o.ns, key) if member.node_id == me else self._read_peer(member, o.ns, key)
            r = parse_record(buf) if buf is not None else None
            if r is None or r[0][3] in have or self._version(o, bytes(buf[:HEAD])) != current:
                continue
            have.add(r[0][3])
            recs.append(r)
            if kind == KIND_REPLICA or len(recs) >= p.k:
                break
        if not recs:
            return None
        h, payload = recs[0]
        if kind == KIND_REPLICA:
            return {i: FRAG_HEADER.pack(*h[:3], i, *h[4:]) + bytes(payload) for i in todo}
        if len(recs) < p.k:
            log.warning("repair: only %d of the %d fragments needed to rebuild", len(recs), p.k,
                        extra={"namespace": o.ns.decode(errors="replace"), "key": o.base[:48].hex()})
            return None
        c = codec(p)
        want = sorted(todo)
        try:
            frags = c.reconstruct([r[1] for r in recs], want)
        except c.errors as e:  # inconsistent sources: leave it pending, do not stop the pass
            log.warning("repair: reconstruct failed: %s", e, extra={
                "namespace": o.ns.decode(errors="replace"), "key": o.base[:48].hex()})
            return None
        olen, ocsum = h[8], h[9]
        return {i: fragment_record(p, i, f, olen, ocsum) for i, f in zip(want, frags)}

    # ------------------------------------------------------------ I/O
    def _read_local(self, ns: bytes, key: bytes) -> bytes | None:
        async def read():
            try:
                e = await self.node.store.acquire_async(ns, key)
            except errors.NotFound:
                return None
            try:
                return bytes(self.node.store.view(e))
            finally:
                self.node.store.release(e)
        return asyncio.run_coroutine_threadsafe(read(), self.loop).result(CALL_TIMEOUT)

    def _read_peer(self, member, ns: bytes, key: bytes) -> bytes | None:
        if member.node_id in self._unreachable:
            return None
        try:
            return bytes(self._client(member).get(key, namespace=ns.decode()))
        except errors.Unavailable:
            self._unreachable.add(member.node_id)
            return None
        except errors.KVStoreError:
            return None

    def _push(self, member, ns: bytes, key: bytes, data: bytes, overwrite: bool = False) -> bool:
        if member.node_id in self._unreachable:
            return False
        self._throttle(len(data))
        try:
            stored = self._client(member).put(key, data, namespace=ns.decode(), overwrite=overwrite)
        except errors.Conflict:
            return False  # something else is there now; the next pass looks again
        except errors.KVStoreError as e:
            self._count("failures")
            if isinstance(e, errors.Unavailable):
                self._unreachable.add(member.node_id)
            log.info("repair: could not write to %s: %s", member.node_id, e)
            return False
        if stored:
            self._count("records_written")
            self._count("bytes_written", len(data))
        return True

    def _delete_local(self, ns: bytes, key: bytes) -> None:
        if self._on_loop(self.node.store.delete, ns, [key]):
            self._count("removed")


def _assign(indices: list[int], free: list[int]) -> list[tuple[int, int]]:
    """(index, slot) pairs: each index on its own position when that slot is free (so
    slot j holds fragment j and reads concatenate), the rest on the remaining free slots
    in order."""
    free = list(free)
    plan, rest = [], []
    for i in indices:
        if i in free:
            free.remove(i)
            plan.append((i, i))
        else:
            rest.append(i)
    plan += list(zip(rest, free))
    return plan

