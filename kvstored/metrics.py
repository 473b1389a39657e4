"""Prometheus metrics: every family the daemon exports, on a private registry.

Two kinds of numbers, two mechanisms:

* **State and engine counters** (capacity, use, objects, pins, hits, misses,
  evictions, connections, errors...) already live in ``Store.stats()``, the
  data server's counters and the control plane's (``ControlStats``).
  :class:`NodeCollector` reads them *at scrape time*, so they cost nothing per
  request. :class:`Metrics` is given those owners (store, data server, control
  stats, node status, TLS), not the node; the repair agent and the KV events
  publisher, which start later, are set on it when they exist.
* **Per-op latency** is recorded on the hot path by :class:`LatencyHistogram`,
  a plain list of bucket counts (the event loop is single-threaded, so no
  lock), exported as a Prometheus histogram at scrape time. Measured on the
  project's 2-core machine, 100k calls each: ``prometheus_client``
  ``Histogram.observe`` 0.85-0.95 us (``.labels(op).observe`` 1.9 us),
  ``Counter.inc`` 0.42 us, this class's ``observe`` 0.16 us, plus 0.07 us per
  ``time.perf_counter()``. A 64 KiB put over loopback TCP takes tens of
  microseconds, so a ~0.3 us timing per request (<1 %) needs neither sampling
  nor batching; the operation counters are the histograms' counts.

Per-tier families iterate over ``Store.tier_stats()`` (one dict per tier:
name, capacity, used, objects, hits, misses, evictions, evicted_bytes,
bytes_read, bytes_written, checksum_failures; a missing key leaves that
tier's series out), so a new tier shows up by reporting itself there.

The endpoint (``/metrics``, ``/healthz``, ``/readyz``) is kvstored/metrics_http.py,
a small asyncio server on the daemon's event loop.
"""
from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)
from prometheus_client.registry import Collector

import kvstored
from kvstore import errors

from kvstored.latency import BUCKETS, LatencyHistogram
from kvstored.looplag import LoopLag
from kvstored.metrics_http import MetricsServer

if TYPE_CHECKING:
    from kvstored.control.stats import ControlStats
    from kvstored.engine import Store
    from kvstored.status import NodeStatus
    from kvstored.tls import ServerTLS

# every error type, so the series exist (at 0) before the first error
ERROR_TYPES = tuple(sorted({c.name for c in (errors.NotFound, errors.NoSpace, errors.Conflict,
                                             errors.ChecksumMismatch, errors.InvalidArgument,
                                             errors.PermissionDenied, errors.Unavailable,
                                             errors.ProtocolError, errors.Timeout, errors.Redirect,
                                             errors.Deleted, errors.NotVerified, errors.KVStoreError)}))


# names the engine's tier dicts use -> the names the families below read
_TIER_ALIASES = {"capacity": "capacity_bytes", "used": "used_bytes",
                 "bytes_read": "read_bytes", "bytes_written": "written_bytes"}


def tier_stats(store: Any, stats: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{tier: {capacity_bytes, used_bytes, objects, hits, ...}}`` for every tier.

    Reads ``store.tier_stats()`` (a list of ``{"name": ..., "capacity": ..., "used": ...,
    counters...}``) when the engine has it, else the DRAM-only keys of ``stats``. The DRAM
    tier's read/written bytes are the store's get/put bytes (every get is served from, and
    every put lands in, DRAM).
    """
    raw = store.tier_stats() if hasattr(store, "tier_stats") else None
    tiers: dict[str, dict[str, Any]] = {}
    for t in raw or ():
        if isinstance(t, dict) and "name" in t:
            tiers[str(t["name"])] = {_TIER_ALIASES.get(k, k): v for k, v in t.items()}
    dram = tiers.setdefault("dram", {})
    for key, value in (("capacity_bytes", stats.get("dram_capacity", 0)),
                       ("used_bytes", stats.get("dram_used", 0)),
                       ("objects", stats.get("objects", 0)),
                       ("hits", stats.get("hits", 0)), ("misses", stats.get("misses", 0)),
                       ("evictions", stats.get("evictions", 0)),
                       ("evicted_bytes", stats.get("evicted_bytes", 0)),
                       ("read_bytes", stats.get("get_bytes", 0)),
                       ("written_bytes", stats.get("put_bytes", 0)),
                       ("checksum_failures", stats.get("checksum_failures", 0))):
        dram.setdefault(key, value)
    for t in tiers.values():  # NVMe drops whole regions: its evictions are the objects dropped
        if "evictions" not in t and "objects_dropped" in t:
            t["evictions"] = t["objects_dropped"]
        if "read_errors" in t or "write_errors" in t:
            t["io_errors"] = t.get("read_errors", 0) + t.get("write_errors", 0)
    return tiers


# (family, help, key in the tier dict, type)
_TIER_FAMILIES = (
    ("kvstored_tier_capacity_bytes", "Capacity of the tier in bytes.", "capacity_bytes", "gauge"),
    ("kvstored_tier_used_bytes", "Bytes of the tier in use (allocated slots or regions).",
     "used_bytes", "gauge"),
    ("kvstored_tier_objects", "Objects held by the tier.", "objects", "gauge"),
    ("kvstored_tier_hits", "Gets answered from the tier.", "hits", "counter"),
    ("kvstored_tier_misses", "Gets that found nothing in the tier.", "misses", "counter"),
    ("kvstored_tier_evictions", "Objects evicted from the tier.", "evictions", "counter"),
    ("kvstored_tier_evicted_bytes", "Bytes evicted from the tier.", "evicted_bytes", "counter"),
    ("kvstored_tier_read_bytes", "Object bytes read from the tier (served gets).",
     "read_bytes", "counter"),
    ("kvstored_tier_written_bytes", "Object bytes written to the tier (committed puts).",
     "written_bytes", "counter"),
    ("kvstored_checksum_failures", "Payloads whose checksum did not match, by tier; the bad "
     "copy is dropped, never served.", "checksum_failures", "counter"),
    # lower tiers only (the NVMe tier): absent keys export no series for DRAM
    ("kvstored_tier_demotions", "Objects written to the tier when evicted from DRAM.",
     "demotions", "counter"),
    ("kvstored_tier_promotions", "Objects read from the tier back into DRAM for a get.",
     "promotions", "counter"),
    ("kvstored_tier_io_errors", "Failed reads and writes on the tier's device.", "io_errors",
     "counter"),
    ("kvstored_tier_demotion_failures", "Objects lost because their demotion write failed, or "
     "could not start with the index out of memory (dropped from DRAM without an NVMe copy; "
     "the failed writes are in io_errors).",
     "demotion_failures", "counter"),
    ("kvstored_tier_unindexed_records", "NVMe records written whose location the index could "
     "not store (out of memory): tombstoned, the object kept in DRAM (in the shutdown flush's "
     "last walk: not kept, counted in the stop summary).",
     "unindexed_records", "counter"),
    ("kvstored_tier_not_admitted", "Evicted objects not demoted (admission policy or write "
     "budget).", "not_admitted", "counter"),
    ("kvstored_tier_key_mismatches", "Reads of an NVMe-only object whose record held another "
     "key (the index keeps only a fingerprint of such keys): a miss, never served.",
     "key_mismatches", "counter"),
    ("kvstored_tier_header_waits", "NVMe reads and writes that waited for one of the tier's "
     "header blocks (the bound on its I/O in flight): a burst larger than that bound.",
     "header_waits", "counter"),
    ("kvstored_tier_bounce_waits", "Demotions and promotions of sub-page objects that waited "
     "for one of the shared aligned bounce pages.", "bounce_waits", "counter"),
    ("kvstored_tier_regions_free", "Regions of the tier not holding data.", "regions_free", "gauge"),
    ("kvstored_tier_io_backend_fallback", "1 when the tier runs on pread/pwrite threads because "
     "io_uring was refused.", "io_backend_fallback", "gauge"),
)

# Store counters exported one-to-one: (family, help, counter)
_STORE_COUNTERS = (
    ("kvstored_pins", "Pin leases taken (one per key pinned).", "pins"),
    ("kvstored_unpins", "Pins released by unpin.", "unpins"),
    ("kvstored_dedups", "Puts of an object already stored (no-ops).", "dedups"),
    ("kvstored_conflicts", "Puts refused because the key holds different bytes.", "conflicts"),
    ("kvstored_no_space", "Reservations that found no evictable space (a put may then wait).",
     "no_space"),
    ("kvstored_reservations_expired", "Reservations reclaimed after reservation_timeout.",
     "reservations_expired"),
    ("kvstored_deletes", "Objects deleted.", "deletes"),
)


# RepairAgent.more's counters: key (the metric is kvstored_repair_<key>_total), help
_REPAIR_MORE = (
    ("fenced", "Repair writes refused because their key was deleted on the target node "
               "lately (a delete raced the pass)."),
    ("late_writes", "Repair writes not sent: decided longer ago than the nodes' delete "
                    "fence covers (retried next pass)."),
    ("redecided", "Objects decided again from fresh Heads because their batch's had grown "
                  "old (a slow, throttled batch)."),
    ("unrecoverable", "EC objects found with fewer than K fragments left, every slot "
                      "answering (each reported once)."),
)


def _counter(name: str, doc: str, value: float, labels: dict[str, str] | None = None):
    f = CounterMetricFamily(name, doc, labels=list(labels or ()))
    f.add_metric(list((labels or {}).values()), value)
    return f


def _gauge(name: str, doc: str, value: float, labels: dict[str, str] | None = None):
    f = GaugeMetricFamily(name, doc, labels=list(labels or ()))
    f.add_metric(list((labels or {}).values()), value)
    return f


class NodeCollector(Collector):
    """Reads the node's state at scrape time. Runs on the event loop (see MetricsServer)."""

    def __init__(self, m: "Metrics"):
        self.m = m

    def collect(self) -> Iterable:
        m = self.m
        status = m.status
        stats = m.store.stats()
        srv = m.data
        counters = srv.counters
        control = m.control.counters

        info = GaugeMetricFamily("kvstored_build_info", "Always 1; labels name the build and node.",
                                 labels=["version", "node_id"])
        info.add_metric([kvstored.__version__, status.node_id], 1)
        yield info
        yield _gauge("kvstored_ready", "1 while serving; 0 while starting, warming or draining "
                     "(liveness is the endpoint answering at all).", 1 if status.ready else 0)
        yield _gauge("kvstored_uptime_seconds", "Seconds since the daemon started.", status.uptime())

        # ---- operations and latency
        ops = CounterMetricFamily("kvstored_operations", "Requests answered, by plane and op "
                                  "(errors included; see kvstored_errors_total).",
                                  labels=["plane", "op"])
        lat = HistogramMetricFamily(
            "kvstored_request_duration_seconds",
            "Server-side time per request. data/put: header parsed to response queued (the "
            "payload's arrival included); data/get: header parsed to the payload handed to the "
            "kernel; control: the gRPC handler.", labels=["plane", "op"])
        for plane, hists in (("data", srv.latency_by_name()), ("control", m.control.latency)):
            for op, h in sorted(hists.items()):
                ops.add_metric([plane, op], h.count)
                lat.add_metric([plane, op], h.buckets(), h.sum)
        yield ops
        yield lat
        lag = HistogramMetricFamily(
            "kvstored_event_loop_lag_seconds",
            "How late the event loop woke a timer due every 25 ms: what every request on the "
            "node waited behind (a long callback, a thread holding the GIL, no CPU) at that "
            "moment (kvstored/looplag.py).")
        lag.add_metric([], m.loop_lag.hist.buckets(), m.loop_lag.hist.sum)
        yield lag

        errs = CounterMetricFamily("kvstored_errors", "Typed errors answered, by plane and type.",
                                   labels=["plane", "type"])
        for plane, prefix, cs in (("data", "errors_", counters),
                                  ("control", "control_errors_", control)):
            names = set(ERROR_TYPES) | {k[len(prefix):] for k in cs if k.startswith(prefix)}
            for name in sorted(names):
                errs.add_metric([plane, name], cs.get(prefix + name, 0))
        yield errs

        net = CounterMetricFamily("kvstored_network_bytes", "Bytes received from and queued to "
                                  "data-path sockets (headers and payloads).",
                                  labels=["plane", "direction"])
        rx, tx = srv.traffic()
        net.add_metric(["data", "received"], rx)
        net.add_metric(["data", "sent"], tx)
        yield net

        # ---- tiers
        tiers = tier_stats(m.store, stats)
        for name, doc, key, kind in _TIER_FAMILIES:
            fam = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(
                name, doc, labels=["tier"])
            for tier, t in tiers.items():
                if key in t:
                    fam.add_metric([tier], float(t[key]))
            yield fam

        # ---- objects, reservations, pins
        yield _gauge("kvstored_objects", "Committed objects (all tiers).", stats["objects"])
        yield _gauge("kvstored_object_bytes", "Bytes of committed objects.", stats["object_bytes"])
        yield _gauge("kvstored_reservations", "Puts reserved and not yet committed.",
                     stats["reservations"])
        yield _gauge("kvstored_reserved_bytes", "Bytes held by uncommitted reservations.",
                     stats["reserved_bytes"])
        yield _gauge("kvstored_pinned_objects", "Objects under a live pin lease.", stats["pinned"])
        for name, doc, key in _STORE_COUNTERS:
            yield _counter(name, doc, stats.get(key, 0))
        yield _counter("kvstored_stalled_puts", "Data connections closed because a put stalled "
                       "past reservation_timeout.", counters.get("stalled_puts", 0))
        yield _counter("kvstored_put_waits_ended_by_disconnect", "Puts waiting for space "
                       "whose client closed the connection (the wait ended, nothing reserved).",
                       counters.get("put_waits_ended_by_disconnect", 0))
        yield _counter("kvstored_repair_requests_held", "Peers' repair reads and writes "
                       "(wire.FLAG_REPAIR) that waited their turn behind this node's clients "
                       "(kvstored/dataplane/plane.py RepairQueue).",
                       counters.get("repair_requests_held", 0))
        yield _counter("kvstored_repair_held_seconds", "Seconds peers' repair requests waited "
                       "behind this node's clients, in all.", counters.get("repair_held_us", 0) / 1e6)
        # ---- RDMA (kvstored/dataplane/rdma.py keeps these in the data server's counters)
        rdma = CounterMetricFamily("kvstored_rdma_events", "RDMA data path events by kind: "
                                   "connections, puts, gets, bytes, doorbells, work requests, "
                                   "completion errors, failures.", labels=["event"])
        for k, v in sorted(list(counters.items())):
            if k.startswith("rdma_") and k not in ("rdma_registered_bytes", "rdma_unavailable"):
                rdma.add_metric([k[5:]], v)
        yield rdma
        yield _gauge("kvstored_rdma_registered_bytes", "Arena bytes registered with the RDMA "
                     "device (0: RDMA off).", counters.get("rdma_registered_bytes", 0))

        # ---- connections
        yield _gauge("kvstored_connections", "Open connections.", len(srv.connections),
                     {"plane": "data"})
        yield _counter("kvstored_connections_accepted", "Connections accepted.",
                       counters.get("connections_total", 0), {"plane": "data"})
        yield _counter("kvstored_connections_rejected", "Connections refused at "
                       "server.max_connections.", counters.get("rejected_connections", 0),
                       {"plane": "data"})
        # ---- file descriptors (kvstored/descriptors.py; the process collector exports
        # process_open_fds and process_max_fds): at the limit, accepts fail
        yield _counter("kvstored_descriptor_limit_reached", "Maintenance passes (every 0.5 s) "
                       "that found the daemon out of file descriptors: new connections fail.",
                       counters.get("descriptor_limit_reached", 0))
        yield _counter("kvstored_accept_failures", "Accepts that failed (EMFILE and the like) "
                       "on the TLS data port, the shm socket and the KV event endpoints.",
                       counters.get("accept_failed", 0) + (
                           m.events.counters["accept_failed"] if m.events is not None else 0))
        yield _counter("kvstored_metrics_requests_refused", "Metrics-port connections closed "
                       "at 64 open, and scrapes answered 503 after 5 s waiting for a turn (5 a second).",
                       m.server.refused if m.server is not None else 0)
        yield _gauge("kvstored_control_calls", "gRPC calls in progress (at most "
                     "server.max_control_rpcs), each from its start: one waiting for its "
                     "request message holds a place too.", m.control.running)
        yield _counter("kvstored_control_rpc_limit_reached", "Times the gRPC calls in progress "
                       "reached server.max_control_rpcs (calls over it get RESOURCE_EXHAUSTED).",
                       control.get("control_rpc_limit_reached", 0))
        yield _counter("kvstored_control_client_calls_refused", "gRPC calls refused at once "
                       "(RESOURCE_EXHAUSTED) because their client address had "
                       "server.control_rpcs_per_client calls in progress.",
                       control.get("control_client_calls_refused", 0))

        # ---- security (kvstored/auth.py, kvstored/tls.py): counters kept by the servers
        yield from _security_families(m.tls, counters, control)

        # ---- lifecycle
        reloads = CounterMetricFamily("kvstored_config_reloads", "SIGHUP reloads, by result.",
                                      labels=["result"])
        for result in ("ok", "failed"):
            reloads.add_metric([result], m.reloads[result])
        yield reloads

        # ---- cluster repair (kvstored/cluster/repair.py); zeros on a standalone node
        rep = m.repair.status() if m.repair is not None else {}
        yield _gauge("kvstored_repair_pending_objects", "Objects the last repair pass could not "
                     "bring to full redundancy (peers down, too few fragments); retried soon.",
                     rep.get("pending", 0))
        yield _gauge("kvstored_repair_unverified_objects", "Records recovered at restart that "
                     "clients do not see until peers confirm them.", m.store.unverified)
        yield _counter("kvstored_repair_objects", "Records written by repair (rebuilt or moved).",
                       rep.get("records_written", 0))
        yield _counter("kvstored_repair_bytes", "Bytes written by repair.", rep.get("bytes_written", 0))
        yield _counter("kvstored_repair_passes", "Completed repair passes.", rep.get("passes", 0))
        yield _counter("kvstored_repair_failures", "Repair writes or passes that failed.",
                       rep.get("failures", 0))
        yield _counter("kvstored_repair_dropped_stale", "Recovered records dropped as stale "
                       "(deleted or replaced while this node was away).", rep.get("dropped", 0))
        yield _counter("kvstored_repair_removed", "Surplus records deleted after their homes "
                       "held them (drain, placement change).", rep.get("removed", 0))
        more = m.repair.more if m.repair is not None else {}
        for key, text in _REPAIR_MORE:
            yield _counter(f"kvstored_repair_{key}", text, more.get(key, 0))
        pace = m.repair.pace if m.repair is not None else None  # (cluster/repair/pace.py)
        yield _gauge("kvstored_repair_pace", "The share of its time repair works: 1 = full "
                     "speed; less while this node's clients wait (cluster.repair_yield_lag).",
                     pace.pace if pace is not None else 1.0)
        yield _counter("kvstored_repair_yield_seconds", "Seconds repair waited for this node's "
                       "clients.", pace.yielded_s if pace is not None else 0.0)
        # ---- the delete fence (kvstored/engine/fence.py): keys deleted lately, which no
        # repair write brings back
        fence = m.store.fence.stats() if getattr(m.store, "fence", None) is not None else {}
        yield _gauge("kvstored_delete_fence_keys", "Keys deleted lately that repair writes "
                     "may not bring back (bounded in count and age).", fence.get("keys", 0))
        yield _counter("kvstored_delete_fence_refused", "Repair writes this node refused: "
                       "their key was deleted here lately.", fence.get("refused", 0))
        yield _counter("kvstored_delete_fence_overflowed", "Fenced keys forgotten before "
                       "their time (over the count bound): every repair write is refused "
                       "until they would have expired.", fence.get("overflowed", 0))
        # the delete history (cluster nodes): deletes remembered for cluster.delete_horizon
        yield _gauge("kvstored_delete_history_keys", "Deleted keys this node remembers "
                     "(cluster.delete_horizon, at most cluster.delete_history_keys).",
                     fence.get("history_keys", 0))
        yield _gauge("kvstored_delete_history_bytes", "Memory of the delete history's "
                     "tables.", fence.get("history_bytes", 0))
        yield _counter("kvstored_delete_history_overflowed", "Deleted keys forgotten before "
                       "cluster.delete_horizon (over delete_history_keys).",
                       fence.get("history_overflowed", 0))


AUTH_REASONS = ("no_token", "bad_token", "namespace", "scope", "revoked")
# the data port's TLS handshake failure reasons (kvstored/tls.py), exported at 0 from the start
TLS_REASONS = ("plaintext", "cert_expired", "cert_untrusted", "cert_invalid", "no_cert",
               "protocol", "timeout", "other")


def _security_families(tls_ctl: "ServerTLS | None", counters, control) -> Iterable:
    auth = CounterMetricFamily(
        "kvstored_auth_rejected", "Requests refused for their token, by plane and reason "
        "(no_token, bad_token, namespace, scope, revoked).", labels=["plane", "reason"])
    for plane, prefix, cs in (("data", "auth_rejected_", counters),
                              ("control", "control_auth_rejected_", control)):
        reasons = set(AUTH_REASONS) | {k[len(prefix):] for k in cs if k.startswith(prefix)}
        for reason in sorted(reasons):
            auth.add_metric([plane, reason], cs.get(prefix + reason, 0))
    yield auth
    prefix = "tls_handshake_failed_"
    tls = CounterMetricFamily(
        "kvstored_tls_handshake_failures", "Failed TLS handshakes on the data port, by reason "
        "(plaintext, cert_expired, cert_untrusted, cert_invalid, no_cert, protocol, timeout, "
        "other).", labels=["plane", "reason"])
    for reason in sorted(set(TLS_REASONS) | {k[len(prefix):] for k in counters
                                             if k.startswith(prefix)}):
        tls.add_metric(["data", reason], counters.get(prefix + reason, 0))
    yield tls
    if tls_ctl is not None:
        c = tls_ctl.counters()
        yield _counter("kvstored_tls_handshakes", "TLS handshakes started on the control port "
                       "(gRPC reports no outcome; compare kvstored_tls_sessions).",
                       c["control_tls_handshakes"], {"plane": "control"})
        yield _counter("kvstored_tls_sessions", "Control-port TLS connections that made a call "
                       "(their handshake worked).", c["control_tls_connections"],
                       {"plane": "control"})
        if tls_ctl.not_after is not None:
            yield _gauge("kvstored_tls_cert_expiry_timestamp_seconds", "Unix time the serving "
                         "certificate (tls.cert_file) expires: alert on it minus time().",
                         tls_ctl.not_after)
    yield _counter("kvstored_connections_rejected_per_client", "Data connections refused at "
                   "server.max_connections_per_client.",
                   counters.get("rejected_connections_per_client", 0), {"plane": "data"})
    yield _counter("kvstored_pipeline_limit_pauses", "Times a data connection stopped being "
                   "read at server.max_pipelined_requests.",
                   counters.get("pipeline_limit_pauses", 0), {"plane": "data"})


class DataPlaneStats(Protocol):
    """What the collectors read of the data plane (``dataplane.tcp.DataServer``): named
    here so this module needs nothing from the data plane, which records into it."""

    counters: Any
    connections: Any

    def latency_by_name(self) -> dict[str, LatencyHistogram]: ...

    def traffic(self) -> tuple[int, int]: ...


class Metrics:
    """The node's private registry, the reload counts and the HTTP endpoint, over the
    owners of the numbers (see the module docstring)."""

    def __init__(self, store: "Store", data: DataPlaneStats, control: "ControlStats",
                 status: "NodeStatus", *, tls: "ServerTLS | None" = None):
        self.store = store
        self.data = data
        self.control = control
        self.status = status
        self.tls = tls
        self.repair = None  # kvstored.cluster.repair.RepairAgent, set once it runs
        self.events = None  # kvstored.events.EventPublisher, likewise
        self.registry = CollectorRegistry(auto_describe=False)
        self.reloads = {"ok": 0, "failed": 0}
        self.registry.register(NodeCollector(self))
        # the store's observer (set by the node): per-namespace use, lookups, sizes; KV events
        self.usage = StoreUsage(store)
        self.registry.register(UsageCollector(self, self.usage))
        ProcessCollector(registry=self.registry)  # process_* (rss, cpu, open fds...)
        self.loop_lag = LoopLag()  # started by the node with its other timers
        self.server: MetricsServer | None = None
        self.config_text: Callable[[], str] | None = None  # /config: the running config (node)

    async def start(self, host: str, port: int) -> int:
        self.server = MetricsServer(self.registry, self.status, self.config_text)
        return await self.server.start(host, port)

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()


# ---------------------------------------------------------------- what operators read
# Per-namespace series stop at this many namespaces; later ones are summed under "other",
# so a tenant inventing namespaces cannot blow up the scrape (bounded cardinality).
MAX_NAMESPACE_LABELS = 64
OTHER_NAMESPACE = "other"
# Object sizes (bytes) of the size histogram: 4 KiB to 64 MiB (max_value_size's default)
SIZE_BUCKETS = tuple(4096 << (2 * i) for i in range(9))
_SIZE_LE = tuple(repr(float(b)) for b in SIZE_BUCKETS) + ("+Inf",)
_NS_FIELDS = ("objects", "bytes", "lookups", "lookup_blocks", "hit_blocks", "hit_bytes")


class StoreUsage:
    """The Store's observer: per-namespace objects, bytes, lookups and prefix hits, and
    the size histogram of committed objects; forwards index changes to the KV events
    publisher (``events``) when there is one. Called on the event loop, about 0.5 us a call.
    """

    def __init__(self, store: Any = None):
        # label -> [objects, bytes, lookups, ...]; "other" always there, so dashboards and
        # rate() have a series before the first namespace overflows
        self.ns: dict[str, list] = {OTHER_NAMESPACE: [0] * len(_NS_FIELDS)}
        # namespace -> its row (the row of its label: itself, or "other"), so a put's
        # stored/removed is one dict lookup rather than two
        self.rows: dict[bytes, list] = {}
        self.sizes = [0] * (len(SIZE_BUCKETS) + 1)
        self.sizes_sum = 0
        self.events = None  # kvstored.events.EventPublisher, set by the node
        usage = store.namespace_usage() if store is not None else {}
        for ns, (objects, nbytes) in usage.items():  # recovered from NVMe
            r = self._row(ns)
            r[0] += objects
            r[1] += nbytes

    def _row(self, ns: bytes) -> list:
        r = self.rows.get(ns)
        if r is not None:
            return r
        if len(self.rows) >= MAX_NAMESPACE_LABELS:
            label = OTHER_NAMESPACE  # not remembered: memory stays bounded too
        else:
            label = ns.decode(errors="replace")
        r = self.ns.get(label)  # keyed by label: "other" is one row (a namespace named
        if r is None:           # "other" shares it)
            r = self.ns[label] = [0] * len(_NS_FIELDS)
        if label is not OTHER_NAMESPACE:
            self.rows[ns] = r
        return r

    def stored(self, e: Any) -> None:
        ns, size = e.ns, e.size  # (each a getter of a packed index's record: read once)
        r = self.rows.get(ns) or self._row(ns)  # (the usual hit inlined: a call a put)
        r[0] += 1
        r[1] += size
        self.sizes[bisect_left(SIZE_BUCKETS, size)] += 1
        self.sizes_sum += size
        if self.events is not None:
            self.events.stored(e)

    def removed(self, e: Any) -> None:
        r = self.rows.get(e.ns) or self._row(e.ns)
        r[0] -= 1
        r[1] -= e.size
        if self.events is not None:
            self.events.removed(e)

    def looked_up(self, ns: bytes, asked: int, hits: int, hit_bytes: int) -> None:
        r = self._row(ns)
        r[2] += 1
        r[3] += asked
        r[4] += hits
        r[5] += hit_bytes

    def size_buckets(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for le, n in zip(_SIZE_LE, self.sizes):
            total += n
            out.append((le, total))
        return out


# (family, help, index in a StoreUsage row, kind)
_NS_FAMILIES = (
    ("kvstored_lookups", "Prefix lookups (Lookup calls), by namespace.", 2, "counter"),
    ("kvstored_lookup_blocks", "Blocks (keys) asked about by prefix lookups, by namespace.", 3,
     "counter"),
    ("kvstored_prefix_hit_blocks", "Blocks found by prefix lookups (the leading run that is "
     "stored), by namespace; divided by kvstored_lookup_blocks_total it is the prefix hit "
     "ratio.", 4, "counter"),
    ("kvstored_prefix_hit_bytes", "Bytes of the blocks found by prefix lookups, by namespace.",
     5, "counter"),
    ("kvstored_namespace_objects", "Committed objects, by namespace (all tiers).", 0, "gauge"),
    ("kvstored_namespace_bytes", "Bytes of committed objects, by namespace (all tiers).", 1,
     "gauge"),
)


class UsageCollector(Collector):
    """Families for operators: per-namespace use and prefix hits (at most
    MAX_NAMESPACE_LABELS namespaces, the rest as "other"), object sizes, pinned bytes,
    data-plane ops by transport, KV events."""

    def __init__(self, m: Metrics, usage: StoreUsage):
        self.m = m
        self.usage = usage

    def collect(self) -> Iterable:
        m, usage = self.m, self.usage
        for name, doc, i, kind in _NS_FAMILIES:
            fam = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(
                name, doc, labels=["namespace"])
            for label, row in sorted(usage.ns.items()):
                fam.add_metric([label], row[i])
            yield fam
        sizes = HistogramMetricFamily("kvstored_object_size_bytes", "Sizes of committed objects "
                                      "(each put that stored an object).")
        sizes.add_metric([], usage.size_buckets(), usage.sizes_sum)
        yield sizes
        store = m.store
        yield _gauge("kvstored_pinned_bytes", "Bytes of objects under a live pin lease.",
                     sum(e.size for e in store.pinned_entries()))
        ops = CounterMetricFamily(
            "kvstored_data_operations", "Data-plane requests by transport (tcp, tls, shm) and "
            "op; shm is the shm_* ops, the other ops count under the TCP port's transport.",
            labels=["transport", "op"])
        tcp = "tls" if m.tls is not None else "tcp"
        for op, h in sorted(m.data.latency_by_name().items()):
            ops.add_metric(["shm" if op.startswith("shm_") else tcp, op], h.count)
        yield ops
        ev = m.events.counters if m.events is not None else {}
        yield _counter("kvstored_kv_events_published", "KV events published for routers "
                       "(BlockStored, BlockRemoved, AllBlocksCleared).", ev.get("events", 0))
        yield _counter("kvstored_kv_events_dropped", "KV events dropped before publishing (queue "
                       "full); routers are then sent AllBlocksCleared.", ev.get("dropped", 0))
        yield _counter("kvstored_kv_event_replays", "Replay requests served to late or lagging "
                       "subscribers.", ev.get("replays", 0))
        yield _counter("kvstored_kv_event_replays_refused", "Replay requests answered with "
                       "the end marker alone: 16 replays in progress, 4 of them from the "
                       "requester's source, or 4 requests queued behind its replay already.",
                       ev.get("replays_refused", 0))
        yield _gauge("kvstored_kv_event_subscribers", "Connections to the KV events endpoint "
                     "now (at most events.max_subscribers).",
                     m.events.subscribers() if m.events is not None else 0)
        yield _counter("kvstored_kv_event_subscribers_refused", "Connections to the KV events "
                       "or replay endpoint closed on accept: events.max_subscribers were open, "
                       "or events.max_subscribers_per_client from its source.",
                       ev.get("subscribers_refused", 0))
        yield _counter("kvstored_kv_event_subscribers_refused_per_client", "Connections to the "
                       "KV events or replay endpoint closed on accept because "
                       "events.max_subscribers_per_client were open from their source address "
                       "(unix socket: uid); also in kvstored_kv_event_subscribers_refused.",
                       ev.get("subscribers_refused_per_client", 0))
        yield _counter("kvstored_kv_event_subscriber_drops", "Batches not sent to a subscriber "
                       "that had 4 MiB queued (it did not read; it sees a gap and can replay).",
                       ev.get("subscriber_drops", 0))
        yield _counter("kvstored_kv_event_handshakes_failed", "Connections to the KV events or "
                       "replay endpoint closed before ZMTP's handshake ended (10 s at most, or "
                       "not ZMTP 3 with NULL security, or a socket type that does not fit).",
                       ev.get("handshakes_failed", 0))
        yield _counter("kvstored_kv_event_replays_stalled", "Replay connections closed for "
                       "taking fewer than events.replay_min_rate bytes/s over an "
                       "events.replay_rate_window while a replay waited for them.",
                       ev.get("replays_stalled", 0))


__all__ = ["BUCKETS", "DataPlaneStats", "LatencyHistogram", "Metrics", "MetricsServer", "NodeCollector",
           "StoreUsage", "UsageCollector", "tier_stats"]
