"""Cluster membership: etcd leases (or a static peer list), watched into a local member list.

etcd mode: the node puts ``/kvstored/<cluster>/members/<node_id>`` (a JSON document, see
:meth:`Membership.self_info`) under a lease of ``cluster.lease_ttl`` seconds that it keeps
alive, and watches the prefix. A node that dies stops renewing; etcd deletes its key when
the lease runs out and every watcher drops it. No consensus of our own: etcd is the truth.

etcd down (at start or later) never stops the node: it keeps serving its local data,
reports ``degraded`` (Health status, Members), keeps the last member list it saw (health
"stale") and retries with exponential back-off (BACKOFF_MIN .. BACKOFF_MAX seconds),
trying the configured endpoints in turn. When etcd answers again it registers under a
fresh lease, re-reads the list and watches again.

One node per id: the node claims its key in an etcd transaction (put only if the key
is as it was read). A key held by another node (another control address, under a lease
that is not this process's) is not taken: this node stays unregistered and degraded,
says so at error level and in Health / Members, and tries again every BACKOFF_MAX
seconds, so it joins once that node's lease has run out (a replaced host reusing the
id) and never while both run (two nodes under one id would share one place in the
member list while holding different data). A key at this node's own address is its
previous run's (a restart within the lease) and is taken over.

static mode (``cluster.static_peers``): no etcd; the peers are probed with Info/Health
every lease_ttl seconds so their ids, data addresses and liveness are known.

A lease that may have lapsed unseen: etcd drops a node whose renewals stop for the TTL;
when this process itself was stopped (SIGSTOP, a paused VM, a loop blocked for seconds)
it wakes still registered in its own view, and its sockets hold requests it would run
before any timer or renewal of membership's noticed. So membership keeps a deadline on the
gate: the send time of the last answered renewal plus the TTL less LEASE_SLACK of it. The
first keyed request past it (data or control plane) has the node treat itself as dropped
before it is answered (redirect, records held back until checked, a fresh registration).
etcd out of reach is not a stall: a renewal still unanswered LEASE_SLACK of the TTL before
the deadline disarms it (the loop ran, etcd did not answer: the node serves on, degraded,
as above) until a renewal is answered again.

Placement set: the members that take new records (etcd mode: registered and not
draining; static mode: every configured peer). Its epoch (``kvstore.layout.member_epoch``)
is written to the node's ``EpochGate``, which both planes consult (a keyed request sent
with another epoch is redirected); membership is the gate's only writer. Every change
wakes the repair agent. Namespace policies live under
``/kvstored/<cluster>/policies/<namespace>`` (etcd) over ``cluster.policies`` (config).
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import kvstored

if TYPE_CHECKING:
    from kvstored.config import Config
    from kvstored.dataplane.policy import EpochGate
    from kvstored.status import NodeStatus

log = logging.getLogger("kvstored.cluster")

KEY_ROOT = "/kvstored"
BACKOFF_MIN = 0.25  # seconds before the first retry after etcd fails
BACKOFF_MAX = 5.0  # the back-off doubles up to this
ETCD_CALL_TIMEOUT = 2.0  # seconds for one etcd call (grant, put, get, keep-alive)
DROPPED_EPOCH = 0xFFFFFFFF  # the gate's epoch while a dropped node is not registered again
# share of the TTL kept in hand: the gate's deadline is this much before the lease can run
# out, and a renewal unanswered this much before the deadline means etcd is late, not
# that this process stalled (the module doc)
LEASE_SLACK = 0.1


class LeaseLapsed(ConnectionError):
    """The gate's lease deadline passed: this node treats itself as dropped and registers
    again under a fresh lease."""


@dataclass
class MemberInfo:
    """What a node registers about itself (the JSON value of its etcd key)."""

    node_id: str
    control_address: str
    data_address: str
    shm_socket: str = ""
    dram_capacity_bytes: int = 0
    nvme_capacity_bytes: int = 0
    failure_domain: str = ""
    version: str = ""
    started_at: float = 0.0
    draining: bool = False

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "MemberInfo":
        doc = json.loads(raw)
        known = {k: doc[k] for k in cls.__dataclass_fields__ if k in doc}  # newer nodes may add keys
        return cls(**known)


class NodeIdInUse(Exception):
    """Another live node is registered under this node's id."""


@dataclass
class _Entry:
    info: MemberInfo
    health: str  # alive | stale | unreachable | unknown
    seen: float  # time.monotonic() of the last confirmation (0 = never)


def _retrieve(f: asyncio.Future) -> None:
    if not f.cancelled():
        f.exception()


def _ago(t: float) -> str:
    return f"{max(0.0, time.time() - t):.0f}s ago" if t else "at an unknown time"


def _advertised_host(host: str) -> str:
    return socket.gethostname() if host in ("0.0.0.0", "::", "") else host


def member_info(config: "Config", status: "NodeStatus", dram_capacity: int,
                started_at: float, draining: bool = False) -> MemberInfo:
    """What this node registers about itself (also a standalone node's Members row)."""
    host = _advertised_host(config.host)
    return MemberInfo(
        node_id=status.node_id, control_address=f"{host}:{status.control_port}",
        data_address=f"{host}:{status.data_port}", shm_socket=status.shm_path,
        dram_capacity_bytes=dram_capacity,
        nvme_capacity_bytes=config.nvme_size if config.nvme_path else 0,
        failure_domain=config.cluster_failure_domain, version=kvstored.__version__,
        started_at=started_at, draining=draining)


class Membership:
    """One node's view of the cluster; runs on the daemon's event loop."""

    def __init__(self, config: "Config", status: "NodeStatus", gate: "EpochGate", *,
                 dram_capacity: int, tls: bool):
        """``status``: this node's id and ports (read when registering); ``gate``: the
        epoch gate both planes consult, written here; ``tls``: the node runs TLS (static
        peers are then not probed: the probe is plaintext)."""
        self.config = c = config
        self.status = status
        self.gate = gate
        self.dram_capacity = dram_capacity
        self.tls = tls
        self.cluster = c.cluster_name
        self.root = f"{KEY_ROOT}/{self.cluster}/"
        self.prefix = self.root + "members/"
        self.policy_prefix = self.root + "policies/"
        self.config_policies = c.cluster_policy_table()  # defaults; etcd entries override
        self.etcd_policies: dict[str, str] = {}
        self.draining = False
        self.epoch = 0
        self.on_change: list = []  # callables run (on the loop) when placement or policies change
        # callables run (on the loop) when this node finds the cluster dropped it: its lease
        # ran out while it was registered (the process hung, or was cut off from etcd and
        # clients). Deletes may have missed it meanwhile: repair holds its records back
        self.on_dropped: list = []
        self.drops = 0  # how many times the cluster dropped this node
        self._drop_seen = False  # this drop was handled (until registered again)
        self._renewed_at = 0.0  # perf_counter() when the last answered renewal (or the grant) was sent
        self._lapse: asyncio.Future | None = None  # done when the gate's deadline passed (this session)
        self.ttl = c.cluster_lease_ttl
        self.endpoints = c.cluster_endpoints()
        self.static_peers = c.cluster_peers()
        self.source = "static" if self.static_peers else "etcd"
        self.members: dict[str, _Entry] = {}  # node_id -> entry, other nodes only
        self.registered = False
        self.detail = "not registered yet" if self.source == "etcd" else ""
        self.started_at = time.time()
        self.registrations = 0  # how many times this node (re-)registered
        self._task: asyncio.Task | None = None
        self._etcd = None
        self._lease = None
        self._stopping = False
        if self.source == "etcd":
            gate.on_lapse = self._lapsed

    # ------------------------------------------------------------ view

    @property
    def degraded(self) -> bool:
        return self.source == "etcd" and not self.registered

    @property
    def policies(self) -> dict[str, str]:
        return {**self.config_policies, **self.etcd_policies}

    def placement_rows(self) -> list[tuple[MemberInfo, str, float, bool]]:
        """view() rows of the members placement counts (see the module doc)."""
        return [r for r in self.view() if not r[0].draining
                and (self.source == "static" or r[1] in ("alive", "stale"))]

    def placement_members(self):
        from kvstore.placement import Member
        return [Member(i.node_id, i.control_address, i.failure_domain)
                for i, _h, _a, _me in self.placement_rows()]

    def _changed(self) -> None:
        """Recompute the epoch; set it on the gate and tell the listeners."""
        from kvstore.layout import member_epoch
        epoch = member_epoch(i.node_id for i, _h, _a, _me in self.placement_rows())
        if epoch != self.epoch:
            log.info("placement members changed", extra={
                "epoch": f"{epoch:08x}", "members": len(self.placement_rows())})
        self.epoch = epoch
        # dropped and not registered again: clients stay redirected (a watch event or a
        # resync of the ending session must not open the gate again)
        self.gate.epoch = DROPPED_EPOCH if self._drop_seen else epoch
        # a member that restarted (new started_at) keeps the epoch but may have lost its
        # records: that wakes the listeners (repair) too
        seen = (epoch, tuple(sorted(self.policies.items())),
                tuple(sorted((i.node_id, i.started_at) for i, _h, _a, _me in self.placement_rows())))
        if seen == getattr(self, "_last_seen", None):
            return  # a resync that changed nothing wakes nobody
        self._last_seen = seen
        for fn in self.on_change:
            try:
                fn()
            except Exception:  # a listener's bug must not stop membership
                log.exception("membership change listener failed")

    async def set_policy(self, namespace: str, policy: str) -> dict[str, str]:
        """Set (or with "" remove) a namespace's policy in etcd; checked against the
        current placement members. Returns the policies now in force."""
        from kvstore import errors
        from kvstore.layout import Policy
        if self.source != "etcd":
            raise errors.InvalidArgument("static_peers mode: policies come from cluster.policies "
                                         "in the config file")
        if self._etcd is None or not self.registered:
            raise errors.Unavailable(f"etcd is unreachable ({self.detail}); policy not changed")
        key = (self.policy_prefix + namespace).encode()
        if policy:
            p = Policy.parse(policy)
            p.check_cluster(len(self.placement_rows()))
            await asyncio.wait_for(self._etcd.put(key, str(p).encode()), ETCD_CALL_TIMEOUT)
            self.etcd_policies[namespace] = str(p)
        else:
            await asyncio.wait_for(self._etcd.delete(key), ETCD_CALL_TIMEOUT)
            self.etcd_policies.pop(namespace, None)
        log.info("namespace policy set", extra={"namespace": namespace, "policy": policy or "(removed)"})
        self._changed()
        return self.policies

    async def set_draining(self, draining: bool) -> None:
        """Leave (or rejoin) placement while staying a member: others stop placing new
        records here and the repair agents move this node's records to their homes."""
        from kvstore import errors
        if self.source != "etcd":
            raise errors.InvalidArgument("drain needs etcd membership (static_peers lists are fixed)")
        if self._etcd is None or not self.registered or self._lease is None:
            raise errors.Unavailable(f"etcd is unreachable ({self.detail}); drain not changed")
        self.draining = draining
        key = (self.prefix + self.status.node_id).encode()
        await asyncio.wait_for(self._etcd.put(key, self.self_info().to_json(), lease=self._lease),
                               ETCD_CALL_TIMEOUT)
        log.warning("drain %s", "started" if draining else "cancelled", extra={"node": self.status.node_id})
        self._changed()

    def self_info(self) -> MemberInfo:
        return member_info(self.config, self.status, self.dram_capacity, self.started_at,
                           self.draining)

    def view(self) -> list[tuple[MemberInfo, str, float, bool]]:
        """[(info, health, seconds since last confirmed, is self)], sorted by node_id."""
        now = time.monotonic()
        rows = [(self.self_info(), "alive", 0.0, True)]
        for node_id, e in self.members.items():
            if node_id == self.status.node_id:
                continue
            health = "stale" if self.degraded and e.health == "alive" else e.health
            rows.append((e.info, health, now - e.seen if e.seen else -1.0, False))
        return sorted(rows, key=lambda r: r[0].node_id)

    # ------------------------------------------------------------ life cycle

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        run = self._run_static if self.source == "static" else self._run_etcd
        self._task = loop.create_task(run(), name="cluster-membership")
        log.info("cluster membership starting", extra={
            "cluster": self.cluster, "source": self.source, "lease_ttl": self.ttl,
            "etcd": ",".join(f"{h}:{p}" for h, p in self.endpoints) if self.source == "etcd" else "-",
            "peers": ",".join(f"{h}:{p}" for h, p in self.static_peers) or "-"})

    async def stop(self) -> None:
        """Leave: revoke the lease (others drop us at once) and close the etcd client."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._lease is not None and self._etcd is not None:
            try:
                await asyncio.wait_for(self._etcd.revoke_lease(self._lease.id), ETCD_CALL_TIMEOUT)
                log.info("left the cluster (lease revoked)", extra={"cluster": self.cluster})
            except Exception as e:  # etcd gone: the lease runs out by itself
                log.info("could not revoke the cluster lease (%s); it expires in %ss", e, self.ttl)
        await self._close_etcd()

    async def _close_etcd(self) -> None:
        if self._etcd is not None:
            try:
                await asyncio.wait_for(self._etcd.close(), ETCD_CALL_TIMEOUT)
            except Exception:
                pass
        self._etcd = None

    # ------------------------------------------------------------ etcd mode

    async def _run_etcd(self) -> None:
        backoff = BACKOFF_MIN
        attempt = 0
        while not self._stopping:
            host, port = self.endpoints[attempt % len(self.endpoints)]
            attempt += 1
            try:
                await self._session(host, port)  # returns only by raising
            except asyncio.CancelledError:
                raise
            except NodeIdInUse as e:
                self.registered = False
                self.detail = str(e)
                log.error("%s", e, extra={"cluster": self.cluster, "etcd": f"{host}:{port}"})
                await self._close_etcd()
                await asyncio.sleep(BACKOFF_MAX)
                continue
            except Exception as e:
                was = self.registered
                self.registered = False
                self.detail = f"etcd {host}:{port}: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
                if was and self._drop_seen:  # dropped (said so): register again at once
                    await self._close_etcd()
                    backoff = BACKOFF_MIN
                    attempt -= 1  # the same endpoint: it answered
                    continue
                if was:
                    backoff = BACKOFF_MIN
                    log.warning("lost etcd; serving local data, membership degraded, retrying",
                                extra={"cluster": self.cluster, "etcd": f"{host}:{port}",
                                       "error": self.detail})
                else:
                    log.warning("etcd unreachable; serving local data, membership degraded, "
                                "retrying in %.2fs", backoff,
                                extra={"cluster": self.cluster, "etcd": f"{host}:{port}",
                                       "attempt": attempt, "error": self.detail})
                await self._close_etcd()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
            else:  # pragma: no cover - _session never returns normally
                backoff = BACKOFF_MIN

    async def _session(self, host: str, port: int) -> None:
        import aetcd  # lazy: only etcd mode needs it (config checked it is installed)

        c = self.config
        creds = {}
        if c.cluster_etcd_username:  # re-read each session: a rotated password file is picked up
            creds = {"username": c.cluster_etcd_username, "password": c.cluster_etcd_password()}
        self._etcd = etcd = aetcd.Client(host=host, port=port, timeout=ETCD_CALL_TIMEOUT, **creds)
        key = (self.prefix + self.status.node_id).encode()
        old = self._lease
        sent = time.perf_counter()
        self._lease = lease = await etcd.lease(self.ttl)
        self._renewed_at = sent
        loop = asyncio.get_running_loop()
        self._lapse = lapse = loop.create_future()
        # renewed from the grant on, in a task of its own: the writes and reads below (and
        # the resyncs later) each wait for etcd's disk and, on a loaded etcd, could push a
        # renewal past the TTL: the node would drop out of its own cluster and rejoin
        renewer = loop.create_task(self._renew(etcd, lease), name="cluster-lease-renew")
        watcher = watch = None
        try:
            if old is not None and self.registrations and await etcd.get(key) is None:
                # our key went with its lease while we could not reach etcd: the others
                # dropped us for a while (a renewal that found the lease gone has already
                # said so). This node kept running and answering meanwhile (etcd down or
                # restarted: every node is here), so its records are not held back; a
                # full repair pass deletes what the delete fences say it missed
                self._dropped("its key was gone from etcd at reconnect", hold=False)
            await self._claim(etcd, key, lease, old)
            self._drop_seen = False
            if old is not None:  # our key moved to the new lease; the old one can go
                try:
                    await etcd.revoke_lease(old.id)
                except Exception:
                    pass
            revision = await self._resync(etcd)
            watch = await etcd.watch_prefix(self.root.encode(), start_revision=revision + 1)
            self.registered = True
            self.detail = ""
            self.registrations += 1
            if not renewer.done():
                self.gate.deadline = self._lease_deadline()
            log.info("registered in cluster", extra={
                "cluster": self.cluster, "etcd": f"{host}:{port}", "key": key.decode(),
                "lease_ttl": self.ttl, "members": len(self.members) + 1})
            watcher = loop.create_task(self._watch(watch))
            await self._keepalive(etcd, lease, key, watcher, renewer, lapse)
        finally:
            self._renewals_stopped()
            renewer.cancel()
            if watcher is not None:
                watcher.cancel()
            if watch is not None:
                try:
                    await watch.cancel()
                except Exception:
                    pass

    async def _claim(self, etcd, key: bytes, lease, old) -> None:
        """Put this node's key under ``lease``, unless another node holds it (NodeIdInUse):
        a key under this process's previous lease (``old``) or at this node's control
        address (its previous run) is ours. The put is a transaction on the key's revision
        as read, so two nodes starting at once under one id cannot both take it."""
        me = self.self_info()
        cur = await etcd.get(key)
        if cur is not None and not (old is not None and cur.lease == old.id):
            try:
                held = MemberInfo.from_json(cur.value)
            except (ValueError, TypeError):
                held = None  # not a member document: ours to overwrite
            if held is not None and held.control_address != me.control_address:
                raise NodeIdInUse(
                    f"node id {self.status.node_id!r} is registered by another node at "
                    f"{held.control_address} (started {_ago(held.started_at)}); two nodes "
                    "cannot share an id: set node.id (or stop the other node). This node "
                    "serves its local data unregistered and joins once that registration "
                    "expires")
        tx = etcd.transactions
        same = tx.version(key) == 0 if cur is None else tx.mod(key) == cur.mod_revision
        ok, _ = await etcd.transaction(compare=[same], success=[tx.put(key, me.to_json(), lease)],
                                       failure=[])
        if not ok:
            raise NodeIdInUse(f"node id {self.status.node_id!r} was registered by another "
                              "node while this one registered; two nodes cannot share an id")

    async def _resync(self, etcd) -> int:
        """Re-read the whole member list and the policies; returns the etcd revision."""
        got = await etcd.get_prefix(self.root.encode())
        now = time.monotonic()
        fresh: dict[str, _Entry] = {}
        policies: dict[str, str] = {}
        for kv in got:
            k = kv.key.decode(errors="replace")
            if k.startswith(self.policy_prefix):
                policies[k[len(self.policy_prefix):]] = kv.value.decode(errors="replace")
                continue
            if not k.startswith(self.prefix):
                continue
            e = self._entry(kv.key, kv.value, now)
            if e is not None:
                fresh[e.info.node_id] = e
        self.etcd_policies = policies
        gone = set(self.members) - set(fresh)
        added = set(fresh) - set(self.members)
        self.members = fresh
        for nid in sorted(added - {self.status.node_id}):
            log.info("member joined", extra={"member": nid, "cluster": self.cluster})
        for nid in sorted(gone - {self.status.node_id}):
            log.info("member left", extra={"member": nid, "cluster": self.cluster})
        self._changed()
        return got.header.revision if getattr(got, "header", None) is not None else 0

    def _entry(self, key: bytes, value: bytes, now: float) -> _Entry | None:
        try:
            info = MemberInfo.from_json(value)
        except (ValueError, TypeError) as e:
            log.warning("ignoring a malformed member entry", extra={"key": key.decode(errors="replace"),
                                                                    "error": str(e)})
            return None
        return _Entry(info, "alive", now)

    async def _watch(self, watch) -> None:
        try:
            async for ev in watch:
                k = ev.kv.key.decode(errors="replace")
                if k.startswith(self.policy_prefix):
                    ns = k[len(self.policy_prefix):]
                    if ev.kind == "PUT":
                        self.etcd_policies[ns] = ev.kv.value.decode(errors="replace")
                    else:
                        self.etcd_policies.pop(ns, None)
                    self._changed()
                    continue
                if not k.startswith(self.prefix):
                    continue
                nid = k[len(self.prefix):]
                if ev.kind == "PUT":
                    e = self._entry(ev.kv.key, ev.kv.value, time.monotonic())
                    if e is not None:
                        if e.info.node_id not in self.members and e.info.node_id != self.status.node_id:
                            log.info("member joined", extra={"member": e.info.node_id,
                                                             "cluster": self.cluster})
                        self.members[e.info.node_id] = e
                elif ev.kind == "DELETE":
                    if self.members.pop(nid, None) is not None and nid != self.status.node_id:
                        log.info("member left", extra={"member": nid, "cluster": self.cluster})
                self._changed()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the keep-alive loop notices etcd is gone and reconnects
            log.debug("member watch ended: %s", e)

    def _lease_deadline(self) -> float:
        """The gate's deadline: the last answered renewal's send time + the TTL, less slack."""
        return self._renewed_at + self.ttl * (1 - LEASE_SLACK)

    def _lapsed(self) -> None:
        """The gate's deadline passed (``gate.on_lapse``, run before the request that found
        it is answered): no renewal was answered for about the TTL while this node was
        registered and etcd was not seen failing: the process stalled, and the cluster may
        have dropped it and taken deletes that missed it. A drop now (held records,
        redirects), and this etcd session ends: the node registers again under a fresh
        lease, whether the old one ran out or not."""
        self._dropped(f"no lease renewal answered for {time.perf_counter() - self._renewed_at:.1f}s "
                      f"(lease_ttl {self.ttl}s): this process was stopped, its lease may have run out")
        if self._lapse is not None and not self._lapse.done():
            self._lapse.set_result(None)

    def _renewals_stopped(self) -> None:
        """Membership's own code found the renewals late, failed or ended: past an armed
        deadline the process stalled (a drop: _lapsed); before it, etcd is late or out of
        reach while this process runs: the deadline is disarmed and the node serves on
        (degraded once the session ends), as whenever etcd is down."""
        gate = self.gate
        if self._stopping:
            gate.deadline = math.inf
        elif time.perf_counter() >= gate.deadline:
            gate.lapse()
        else:
            gate.deadline = math.inf

    async def _renew(self, etcd, lease) -> None:
        """Renew the lease every ttl/3, counted from the start of the last renewal (a slow
        reply does not push the next one out), and keep the gate's deadline from the
        answers. Raises when etcd fails or the lease is gone."""
        interval = max(0.5, self.ttl / 3)
        slack = self.ttl * LEASE_SLACK
        while True:
            await asyncio.sleep(interval)
            started = time.perf_counter()
            if started >= self.gate.deadline:  # woke past it: stalled (no request came first)
                self.gate.lapse()
                raise LeaseLapsed(f"lease {lease.id:x} not renewed in time")
            refresh = asyncio.ensure_future(etcd.refresh_lease(lease.id))
            # a call given up may still end in an error (etcd's own deadline): not logged
            refresh.add_done_callback(_retrieve)
            try:
                # etcd unanswered shortly before the deadline: disarm it (etcd is late or
                # down; this process runs), then wait out the call's timeout
                late = self._lease_deadline() - slack - started
                done, _ = await asyncio.wait({refresh}, timeout=max(0.0, min(late, ETCD_CALL_TIMEOUT)))
                if not done:
                    self._renewals_stopped()
                    if self._drop_seen:
                        raise LeaseLapsed(f"lease {lease.id:x} not renewed in time")
                    done, _ = await asyncio.wait(
                        {refresh}, timeout=max(0.0, started + ETCD_CALL_TIMEOUT - time.perf_counter()))
                if not done:
                    raise asyncio.TimeoutError(f"lease {lease.id:x}: no renewal answer in "
                                               f"{ETCD_CALL_TIMEOUT}s")
                reply = refresh.result()
            except asyncio.CancelledError:
                raise
            except Exception:
                self._renewals_stopped()
                raise
            finally:
                refresh.cancel()
            if reply is None or reply.TTL <= 0:
                self._dropped(f"lease {lease.id:x} expired")
                raise ConnectionError(f"lease {lease.id:x} expired")
            self._renewed_at = started
            if self.registered and not self._drop_seen:
                self.gate.deadline = self._lease_deadline()  # (re-)armed
            interval = max(0.0, started + max(0.5, self.ttl / 3) - time.perf_counter())

    def _dropped(self, why: str, hold: bool = True) -> None:
        """The cluster dropped this node while it was registered (a hung process, a node
        cut off from etcd and its clients): the others re-placed its objects, and deletes
        sent meanwhile did not reach it. Until it has registered again it redirects every
        client that still routes to it, and it rejoins as a node whose data is not
        continuous: a new start time, and ``on_dropped(hold)``: repair holds its records
        back until checked (``hold``: the lease ran out while etcd answered, or the
        gate's deadline passed unseen, so this process stalled) or runs a full pass
        that deletes what it missed (etcd was out of reach: down or restarted, when
        every node drops at once)."""
        if self._drop_seen:
            return  # once per drop (the gate, the renewal and the reconnect all notice)
        self._drop_seen = True
        self.drops += 1
        self.started_at = time.time()
        # an epoch no member list has (member_epoch is an xxh32, never this sentinel in
        # practice): every keyed request that still routes here is redirected
        self.gate.epoch = DROPPED_EPOCH
        self.gate.deadline = math.inf
        log.warning("this node was dropped from the cluster (%s); %s", why,
                    "its records are held back until repair has checked them against its peers"
                    if hold else "repair checks its records against its peers' deletes",
                    extra={"cluster": self.cluster, "node": self.status.node_id})
        for fn in self.on_dropped:
            try:
                fn(hold)
            except Exception:  # a listener's bug must not stop membership
                log.exception("membership drop listener failed")

    async def _keepalive(self, etcd, lease, key: bytes, watcher: asyncio.Task,
                         renewer: asyncio.Task, lapse: asyncio.Future) -> None:
        """Re-read the list every ttl (belt and braces to the watch) while ``renewer`` keeps
        the lease. Raises when the renewals fail (etcd gone, lease expired), the watch
        ends or the gate's deadline passed (``lapse``). A resync that times out is tried
        again next time: etcd answering renewals but slow to read (a loaded disk) is no
        reason to leave and rejoin."""
        while True:
            await asyncio.wait({renewer, watcher, lapse}, timeout=self.ttl,
                               return_when=asyncio.FIRST_COMPLETED)
            if lapse.done():
                raise LeaseLapsed(f"lease {lease.id:x} may have run out while this process was stopped")
            if renewer.done():
                renewer.result()  # raises what ended the renewals
                raise ConnectionError("lease renewals stopped")  # pragma: no cover
            try:
                await asyncio.wait_for(self._resync(etcd), ETCD_CALL_TIMEOUT)
            except asyncio.TimeoutError:
                if watcher.done():
                    raise ConnectionError("member watch ended") from None
                log.debug("member resync timed out; the watch still runs, retrying in %ss", self.ttl)
                continue
            if lapse.done():  # (during the resync): not put back under the old lease
                raise LeaseLapsed(f"lease {lease.id:x} may have run out while this process was stopped")
            if self.status.node_id not in self.members:  # someone deleted our key
                await asyncio.wait_for(etcd.put(key, self.self_info().to_json(), lease=lease),
                                       ETCD_CALL_TIMEOUT)
            if watcher.done():
                raise ConnectionError("member watch ended")

    # ------------------------------------------------------------ static mode

    async def _run_static(self) -> None:
        import grpc

        from kvstore.v1 import control_pb2 as pb
        from kvstore.v1 import control_pb2_grpc as pb_grpc

        port = self.status.control_port
        mine = {f"127.0.0.1:{port}", f"{_advertised_host(self.config.host)}:{port}"}
        for host, port in self.static_peers:
            addr = f"{host}:{port}"
            if addr not in mine:
                self.members[addr] = _Entry(MemberInfo(node_id=addr, control_address=addr,
                                                       data_address=""), "unknown", 0.0)
        channels: dict[str, grpc.aio.Channel] = {}
        self._changed()
        try:
            while True:
                for addr in list(self.members):
                    e = self.members[addr]
                    ch = channels.get(addr)
                    if ch is None:
                        # plaintext probe; with TLS on the peers stay "unknown"
                        if self.tls:
                            continue
                        ch = channels[addr] = grpc.aio.insecure_channel(e.info.control_address)
                    stub = pb_grpc.KVStoreStub(ch)
                    try:
                        info = await stub.Info(pb.InfoRequest(), timeout=ETCD_CALL_TIMEOUT)
                        host = e.info.control_address.rpartition(":")[0]
                        e.info = MemberInfo(
                            node_id=info.node_id, control_address=e.info.control_address,
                            data_address=f"{host}:{info.data_port}", shm_socket=info.shm_socket,
                            version=info.version)
                        if e.health != "alive":
                            log.info("static peer answers", extra={"peer": addr, "member": info.node_id})
                        e.health, e.seen = "alive", time.monotonic()
                        self._changed()
                    except grpc.aio.AioRpcError as err:
                        if e.health == "alive":
                            log.warning("static peer unreachable", extra={"peer": addr,
                                                                          "error": err.code().name})
                        e.health = "unreachable"
                await asyncio.sleep(self.ttl)
        finally:
            for ch in channels.values():
                await ch.close()
