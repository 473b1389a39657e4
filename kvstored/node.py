"""One kvstored node: wires the Store to the data and control servers and runs them.

Only the entry point (``kvstored/__main__.py``) imports this module. Each component is
given the narrow things it uses: the ``NodeStatus`` (id, ports, state), the ``EpochGate``
(written by membership, read by both planes), the ``ControlStats`` (the control plane's
counters), the store and the config values; none of them gets the node.

Over 500 lines on purpose: this is the one place that builds the components and orders
their life cycle (start, warm, maintain, stop, reload), and each of those steps touches
several of them; splitting it would hand the node to another module again.
"""
from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import signal
import socket
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import grpc

from kvstored import __version__, descriptors, logs, sdnotify
from kvstored.auth import Auth, TokensError
from kvstored.config import HOST_DERIVED, Config, ConfigError, explicit_fields, load_config
from kvstored.control.service import ControlService, add_to_server
from kvstored.control.stats import ControlStats
from kvstored.dataplane.policy import EpochGate
from kvstored.dataplane.tcp import DataServer
from kvstored.engine import Store
from kvstored.metrics import Metrics
from kvstored.settings import RELOADABLE, SETTINGS
from kvstored.status import NodeStatus
from kvstored.tls import ServerTLS

log = logging.getLogger("kvstored")

MAINTENANCE_INTERVAL = 0.5  # seconds between reaping abandoned reservations
WARM_POLL = 0.05  # seconds between checks of the arena prefault while warming
WARM_REPORT = 1.0  # seconds between warming progress reports to systemd
# A prefault that makes no progress this long (an overcommitted host, a hung madvise) stops
# holding readiness back: the node says so and reports ready; pages then fault in on use.
WARM_STALL_TIMEOUT = 60.0
TIER_LOG_INTERVAL = 60.0  # seconds between per-tier stats lines in the log
SHUTDOWN_FLUSH_TIMEOUT = 60.0  # seconds SIGTERM may spend writing DRAM-only objects to NVMe
# seconds a control connection may take to set up (TCP, TLS, HTTP/2 settings): a silent
# one held a descriptor for gRPC's default 120 s
CONTROL_HANDSHAKE_TIMEOUT = 10.0
# seconds a control connection's calls in progress get to finish once the connection is
# server.control_connection_max_age old (every control call's own bounds are shorter; a
# max age under it is the grace too)
CONTROL_AGE_GRACE = 60.0


def _open_nvme(config: Config):
    """The NVMe tier the config asks for, or None. Raises NvmeError (exit 2) on a bad device."""
    if not config.nvme_path:
        return None
    from kvstored.engine.nvme import NvmeDevice, NvmeTier

    dev = NvmeDevice(config.nvme_path, config.nvme_size, config.nvme_region_size,
                     config.nvme_io_backend, config.nvme_queue_depth)
    try:
        return NvmeTier(dev, admission=config.nvme_admission,
                        write_budget_per_hour=config.nvme_write_budget_per_hour,
                        queue_depth=config.nvme_queue_depth, sync=config.nvme_sync,
                        sync_interval=config.nvme_sync_interval)
    except BaseException:
        dev.close()
        raise


def _bind_hint(e: OSError, host_setting: str, port_setting: str) -> str:
    """Which setting to change after a failed bind: the address when it does not resolve
    or is not this host's, else the port (in use, or privileged)."""
    if isinstance(e, socket.gaierror) or e.errno == errno.EADDRNOTAVAIL:
        return f"set {host_setting} to an address of this host"
    return f"set {port_setting}"


def default_shm_path(control_port: int) -> str:
    """Where the shm socket goes when shm.socket_path is empty: systemd's RuntimeDirectory=
    ($RUNTIME_DIRECTORY, visible to local clients; PrivateTmp hides /tmp), else the tmpdir."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    base = runtime if runtime and os.path.isdir(runtime) else tempfile.gettempdir()
    return os.path.join(base, f"kvstored-{control_port}.sock")


@dataclass
class ConfigSource:
    """Where the running config came from, so SIGHUP can read it again (file < flags)."""

    path: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def load(self) -> Config:
        return load_config(self.path, self.overrides)

    def explicit(self) -> set[str]:
        return explicit_fields(self.path, self.overrides)


def _set_inflight(node: "Node", v: int) -> None:
    from kvstored.dataplane.tcp import TLS_MAX_INFLIGHT

    node.data_server.max_inflight_bytes = v
    burst = min(v, TLS_MAX_INFLIGHT) if node.data_server.tls is not None else v
    for c in list(node.data_server.connections):  # existing connections too
        if c.transport is not None and not c.closed:
            c.burst = burst
            c.transport.set_write_buffer_limits(high=burst, low=burst // 2)


def _set_pipelined(node: "Node", v: int) -> None:
    node.data_server.max_pipelined = v
    for c in list(node.data_server.connections):
        c.max_pipelined = v


def _set_max_connections(node: "Node", v: int) -> None:
    # the start-up descriptor split again (descriptors.resplit): clamped, with a warning
    # naming the settings, when RLIMIT_NOFILE leaves too few descriptors for ``v``
    if node.fds is not None:
        v = descriptors.resplit(node.fds, v, node.config.max_control_connections).data
    node.data_server.max_connections = v


def _set_tokens_file(node: "Node", v: str) -> None:
    if node.auth is not None:  # turning auth on or off needs a restart
        node.auth.path = v  # read by reload_security(), which runs after the settings


def _set_tls_file(node: "Node", field: str, v: str) -> None:
    if node.tls is not None and v:  # turning TLS on or off needs a restart
        setattr(node.tls, field[len("tls_"):], v)


# How SIGHUP applies a setting: the row's ``reload`` (kvstored/settings.py SETTINGS) names
# one of these, called with (node, config field, new value); the new value is also
# stored on node.config. A row without one is reported as "needs a restart".
RELOAD_HOOKS: dict[str, Callable[["Node", str, Any], None]] = {
    "live": lambda node, f, v: None,  # the servers read node.config on every use
    "store": lambda node, f, v: setattr(node.store.limits, f, v),  # new reservations on
    "log_level": lambda node, f, v: logs.set_level(v),
    "log_format": lambda node, f, v: logs.set_format(v),
    "data.max_connections": lambda node, f, v: _set_max_connections(node, v),
    "data.max_per_client": lambda node, f, v: setattr(node.data_server, "max_per_client", v),
    "inflight": lambda node, f, v: _set_inflight(node, v),
    "pipelined": lambda node, f, v: _set_pipelined(node, v),
    "tokens_file": lambda node, f, v: _set_tokens_file(node, v),
    "tls_file": _set_tls_file,
}
assert set(RELOADABLE.values()) <= set(RELOAD_HOOKS), "a setting names an unknown reload hook"
# Fields whose value is derived when not set (auto-sized arena, "<host>:<port>" id): a
# difference is only real when the file or a flag names them.
_DERIVED = HOST_DERIVED
_SETTING_NAME = {s.field: s.name for s in SETTINGS}


def _shown(field: str, value: Any) -> str:
    name = _SETTING_NAME.get(field, field)
    return f"{name}={logs.REDACTED if logs.is_sensitive(name) else value}"


class Node:
    def __init__(self, config: Config):
        self.config = config
        # a cluster node holds what it recovers at restart until peers confirm it is current
        self.store = Store(config.engine_limits(), nvme=_open_nvme(config),
                           hold_recovered=config.cluster_enabled)
        if config.cluster_enabled:  # deletes remembered past the fence's window (fence.py)
            from kvstored.cluster.history import open_history
            self.store.fence.history = open_history(config)
        # id, ports and life-cycle state: read by the control plane, membership, /readyz
        self.status = NodeStatus(config.node_id, config.host, arena=self.store.arena)
        self.gate = EpochGate()  # membership writes the epoch; both planes check requests
        # security: None = plaintext / no tokens (config.validate already checked the files)
        self.auth = Auth(config.auth_tokens_file) if config.auth_enabled else None
        self.tls = (ServerTLS(config.tls_cert_file, config.tls_key_file,
                              config.tls_client_ca_file, config.tls_min_version)
                    if config.tls_cert_file else None)
        self.data_server = DataServer(self.store, max_connections=config.max_connections, config=config,
                                      max_inflight_bytes=config.max_inflight_bytes,
                                      tcp_congestion=config.tcp_congestion,
                                      max_connections_per_client=config.max_connections_per_client,
                                      max_pipelined_requests=config.max_pipelined_requests,
                                      auth=self.auth, tls=self.tls, gate=self.gate)
        self.control_stats = ControlStats()
        self.control: ControlService | None = None
        self.grpc_server: grpc.aio.Server | None = None
        self._maintenance: asyncio.Task | None = None
        self.shm = None  # ShmServer when shm.enabled
        self.rdma = None  # dataplane.rdma.RdmaServer when a device is usable
        self.rdma_status = "off"
        self.metrics = Metrics(self.store, self.data_server, self.control_stats, self.status,
                               tls=self.tls)
        self.metrics_port: int | None = None
        # per-namespace metrics and (once started) KV events see every index change
        self.store.observer = self.metrics.usage
        # /config on the metrics port: the settings in effect now (SIGHUP applies some live)
        self.metrics.config_text = lambda: (
            "# the running configuration (credentials redacted)\n" + self.config.to_toml(redact=True))
        self.events = None  # kvstored.events.EventPublisher when events.endpoint is set
        self.source: ConfigSource | None = None  # set by serve(); SIGHUP re-reads it
        self._explicit: set[str] = set()
        self._watchdog = sdnotify.watchdog_interval()
        self._watchdog_sent = 0.0
        self.membership = None  # kvstored.cluster.Membership when cluster.enabled
        self.repair = None  # kvstored.cluster.repair.RepairAgent when cluster.repair
        self._history_saves: asyncio.Task | None = None  # cluster: cluster/history.keep_saving
        self.fd_watch: descriptors.Watch | None = None  # at the descriptor limit? (started)
        self.fds: descriptors.Budget | None = None  # the start-up descriptor split

    async def warm(self, stop: asyncio.Event | None = None) -> None:
        """Wait until the arena is prefaulted, then report ready ("serving").

        The planes already serve meanwhile (first writes to a page are just slower);
        this only holds back what promises full speed: /readyz, Health.ready, sd_notify
        READY=1 and the ready file. Progress goes to systemd, which also gets its start
        timeout extended, so a large arena never trips TimeoutStartSec=.
        """
        a, st = self.store.arena, self.status
        t0 = last_report = last_move = time.monotonic()
        seen = a.prefaulted
        while st.state == "warming" and a.prefaulting and not (stop and stop.is_set()):
            now = time.monotonic()
            if a.prefaulted != seen:
                seen, last_move = a.prefaulted, now
            elif now - last_move > WARM_STALL_TIMEOUT:
                log.warning("arena prefault made no progress for %.0fs; reporting ready "
                            "anyway (pages fault in on first use)", WARM_STALL_TIMEOUT,
                            extra={"prefaulted": a.prefaulted, "dram": a.size})
                break
            if now - last_report >= WARM_REPORT:
                last_report = now
                sdnotify.notify(f"STATUS={st.readiness()}",
                                f"EXTEND_TIMEOUT_USEC={int(3 * WARM_REPORT * 1e6)}")
            await asyncio.sleep(WARM_POLL)
        if st.state == "warming" and not (stop and stop.is_set()):
            st.state = "serving"
            st.ready = True
            log.info("kvstored ready", extra={**self.listen_fields(),
                                              "warm_s": round(time.monotonic() - t0, 3),
                                              "prefaulted": a.prefaulted})

    async def start(self) -> None:
        """Listen on every plane; on failure, close what was opened (sockets, socket files)."""
        try:
            await self._start()
        except BaseException:
            await self._abort_start()
            raise

    async def _abort_start(self) -> None:
        """Undo a partial start, so a failed start leaves no socket file and no gRPC server
        for the garbage collector to stop after the event loop is gone (a traceback)."""
        self.status.state = "stopped"
        if self.events is not None:
            self.events.close()
        if self.repair is not None:
            self.repair.stop()
        if self.membership is not None:
            await self.membership.stop()
        if self.shm is not None:
            self.shm.close()  # unlinks its socket file
        self.data_server.stop_accepting()
        if self.grpc_server is not None:
            await self.grpc_server.stop(0)
            self.grpc_server = None
        if self._maintenance is not None:
            self._maintenance.cancel()
        self.metrics.loop_lag.stop()
        await self.metrics.close()
        if self.rdma is not None:
            self.rdma.close()
            self.rdma = None
        self.store.close()

    async def _start(self) -> None:
        c, st = self.config, self.status
        if c.events_endpoint:  # first: a bad endpoint fails the start before anything listens
            from kvstored.events import EventPublisher
            self.events = EventPublisher(c.events_endpoint, replay_endpoint=c.events_replay(),
                                         replay_buffer=c.events_replay_buffer, topic=c.events_topic,
                                         medium=c.events_medium, block_size=c.events_block_size,
                                         max_subscribers=c.events_max_subscribers,
                                         max_per_client=c.events_per_client(),
                                         max_replays=c.events_max_replays,
                                         max_replays_per_client=c.events_max_replays_per_client,
                                         replay_min_rate=c.events_replay_min_rate,
                                         replay_rate_window=c.events_replay_rate_window)
            self.events.start()
            self.metrics.usage.events = self.metrics.events = self.events
        from kvstored.dataplane.rdma import enable as enable_rdma  # before any connection
        self.rdma, self.rdma_status = enable_rdma(self.data_server, tls=self.tls is not None)
        # refuses to start when RLIMIT_NOFILE leaves too few descriptors to serve
        events_fds = 0 if self.events is None else (c.events_max_subscribers + 1) * (
            2 if self.events.replay_endpoint else 1)  # each endpoint's places, + 1 refusing
        self.fds = fds = descriptors.plan(c.max_connections, c.max_control_connections,
                                          reserved=events_fds)
        self.data_server.max_connections = fds.data
        self.data_server.max_handshakes = fds.handshakes
        self.fd_watch = descriptors.Watch(self.data_server.counters)
        try:
            st.data_port = await self.data_server.start(c.host, c.data_port)
        except OSError as e:
            hint = _bind_hint(e, "server.host / --host", "server.data_port / --data-port")
            raise OSError(f"cannot listen on {c.host}:{c.data_port} for the data plane "
                          f"({e.strerror or e}); {hint}") from None
        # room for the largest control-plane value plus the message around it
        msg_limit = c.max_control_value_size + (1 << 20)
        # calls at once: each holds its message (up to msg_limit, a few copies of it) while
        # it runs; unbounded, 300 Puts of 4 MiB waiting for space grew the daemon by 2 GiB
        self.grpc_server = grpc.aio.server(maximum_concurrent_rpcs=c.max_control_rpcs, options=[
            ("grpc.max_receive_message_length", msg_limit),
            ("grpc.max_send_message_length", msg_limit),
            ("grpc.so_reuseport", 0),
            # per-client bounds gRPC has: connections at once (more are closed on accept),
            # a deadline for a connection's set-up, idle ones closed like data connections
            ("grpc.max_allowed_incoming_connections", fds.control),
            # calls at once on one connection (HTTP/2 streams; gRPC refuses more): unbounded,
            # one connection could take every place of max_control_rpcs
            ("grpc.max_concurrent_streams", c.control_streams()),
            ("grpc.server_handshake_timeout_ms", int(CONTROL_HANDSHAKE_TIMEOUT * 1000)),
            ("grpc.max_connection_idle_ms", int(c.idle_timeout * 1000)),
            # a connection ends after its age (GOAWAY; a client opens a new one by itself),
            # its calls in progress getting a grace period more: the one bound on what a
            # client that never takes its answers holds (a call's place and its answer until
            # HTTP/2 flow control lets it out, which gRPC cannot cancel from here)
            ("grpc.max_connection_age_ms", int(c.control_connection_max_age * 1000)),
            ("grpc.max_connection_age_grace_ms",
             int(min(CONTROL_AGE_GRACE, c.control_connection_max_age) * 1000)),
        ])
        self.control = ControlService(
            self.store, c, st, data=self.data_server, stats=self.control_stats, gate=self.gate,
            auth=self.auth, tls=self.tls, reload_security=self.reload_security,
            reload=self._reload_checked if self.source is not None else None)
        add_to_server(self.grpc_server, self.control)
        try:  # a bind failure: 0 from older gRPC versions, RuntimeError from newer ones
            if self.tls is not None:
                st.control_port = self.grpc_server.add_secure_port(
                    f"{c.host}:{c.control_port}", self.tls.grpc_credentials())
            else:
                st.control_port = self.grpc_server.add_insecure_port(
                    f"{c.host}:{c.control_port}")
        except RuntimeError:
            st.control_port = 0
        if st.control_port == 0:
            raise OSError(f"cannot listen on {c.host}:{c.control_port} for the control plane "
                          "(address already in use, or not an address of this host); "
                          "set server.control_port / --port")
        if self.auth is not None and self.tls is None:
            log.warning("auth is on without TLS: tokens cross the network in clear text")
        if self.tls is not None:
            self.tls.warn_expiry()
        await self.grpc_server.start()
        if c.control_port == 0 and st.node_id.endswith(":0"):  # default id names the real port
            st.node_id = f"{st.node_id[:-2]}:{st.control_port}"
        if c.shm_enabled:
            from kvstored.dataplane.shm import ShmServer
            path = c.shm_socket_path or default_shm_path(st.control_port)
            shm = ShmServer(self.data_server, path, allowed_uids=c.shm_allowed_uid_set(),
                            lease_ttl=c.shm_lease_ttl)
            try:
                st.shm_path = await shm.start()
            except OSError as e:
                raise OSError(f"cannot listen on the shm socket {path} ({e.strerror or e}); "
                              "set shm.socket_path to another path (in a directory this user "
                              "can write) or shm.enabled = false") from None
            self.shm = shm
            if c.shm_allowed_uid_set():
                # the listed uids must be able to connect() at all (a DynamicUser daemon
                # shares no group with them); who is served is still decided per peer
                # (SO_PEERCRED), so others are refused with PermissionDenied
                os.chmod(st.shm_path, 0o666)
        if c.metrics_enabled:
            try:
                self.metrics_port = await self.metrics.start(c.metrics_host, c.metrics_port)
            except OSError as e:
                raise OSError(f"cannot listen on {c.metrics_host}:{c.metrics_port} for metrics "
                              f"({e.strerror or e}); {_bind_hint(e, 'metrics.host', 'metrics.port')}"
                              " or metrics.enabled") from None
        self._maintenance = asyncio.get_running_loop().create_task(self._maintain())
        self.metrics.loop_lag.start()
        if c.cluster_enabled:  # registers in the background; etcd down never blocks start
            from kvstored.cluster.history import keep_saving
            self._history_saves = asyncio.get_running_loop().create_task(
                keep_saving(self.store.fence.history))
            from kvstored.cluster import Membership
            m = self.membership = Membership(c, st, self.gate, dram_capacity=self.store.arena.size,
                                             tls=self.tls is not None)
            st.degraded = lambda: m.degraded
            self.control.membership = m
            if c.cluster_repair:
                from kvstored.cluster.repair import LocalStore, NodeLoad, RepairAgent, RepairSettings
                self.repair = RepairAgent(st.node_id,
                                          LocalStore(self.store, asyncio.get_running_loop()), m,
                                          RepairSettings.from_config(c),
                                          NodeLoad(self.metrics.loop_lag, self.data_server))
                self.control.repair = self.metrics.repair = self.repair
                m.on_change.append(self.repair.wake)
                self.repair.start()
            m.start()
        st.state = "warming" if self.store.arena.prefaulting else "serving"
        st.ready = st.state == "serving"
        log.info("kvstored listening" if st.state == "warming" else "kvstored ready",
                 extra=self.listen_fields())

    def listen_fields(self) -> dict[str, Any]:
        """Where the node listens, for its "listening" and "ready" log lines."""
        c, st = self.config, self.status
        nvme = self.store.nvme
        return {
            "version": __version__,
            "node": st.node_id, "control": f"{c.host}:{st.control_port}",
            "data": f"{c.host}:{st.data_port}", "shm": st.shm_path or "off",
            "rdma": self.rdma_status,
            "metrics": f"{c.metrics_host}:{self.metrics_port}" if c.metrics_enabled else "off",
            "kv_events": (self.events.bound()[0] or c.events_endpoint) if self.events else "off",
            "dram": self.store.arena.size, "hugepages": self.store.arena.hugepages,
            # the tiers and what guards the planes, so one line says what is running
            "nvme": (f"{c.nvme_path} ({nvme.dev.nregions * nvme.dev.region_size} bytes, "
                     f"{nvme.io_backend})" if nvme is not None else "off"),
            "tls": ("mutual" if c.tls_client_ca_file else "on") if self.tls is not None else "off",
            "auth": "on" if self.auth is not None else "off",
            "cluster": c.cluster_name if c.cluster_enabled else "off"}

    async def _maintain(self) -> None:
        last_tier_log = time.monotonic()
        while True:
            await asyncio.sleep(MAINTENANCE_INTERVAL)
            try:
                self.store.reap()
                self.store.maybe_evict()
                if self.fd_watch is not None:
                    self.fd_watch.check()
                if self.shm is not None:
                    self.shm.expire_leases()
                logs.report_suppressed()  # the counts of storms that stopped
                if time.monotonic() - last_tier_log >= TIER_LOG_INTERVAL:
                    last_tier_log = time.monotonic()
                    self._log_tiers()
            except Exception:  # keep maintaining; a bug here must not stop the daemon
                log.exception("maintenance pass failed")
            if self._watchdog and time.monotonic() - self._watchdog_sent >= self._watchdog:
                # the loop is turning: tell systemd (WatchdogSec=) we are not wedged
                sdnotify.notify("WATCHDOG=1")
                self._watchdog_sent = time.monotonic()

    def _log_tiers(self) -> None:
        """One line per tier: capacity, use and the counters an operator watches."""
        keys = ("objects", "hits", "misses", "evictions", "demotions", "promotions",
                "bytes_written", "checksum_failures", "write_errors", "read_errors")
        for t in self.store.tier_stats():
            log.info("tier stats", extra={"tier": t["name"], "capacity": t["capacity"],
                                          "used": t["used"],
                                          **{k: t[k] for k in keys if k in t}})

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish (bounded), then close.

        Both planes drain at once under one deadline (``server.drain_timeout``): gRPC
        refuses new calls and waits for running ones; each data connection finishes the
        request it is receiving and the responses it has queued, answers nothing more
        and is closed (see DataServer.drain).
        """
        grace = self.config.drain_timeout if grace is None else grace
        self.status.ready = False
        self.status.state = "draining"
        self.data_server.stop_accepting()
        if self.shm is not None:
            self.shm.close()
        waits = [self.data_server.drain(grace)]
        if self.repair is not None:
            self.repair.stop()
        if self.membership is not None:  # leave first: peers stop counting on us
            waits.append(self.membership.stop())
        if self.grpc_server is not None:
            waits.append(self.grpc_server.stop(grace))
        await asyncio.gather(*waits)
        if self._maintenance is not None:
            self._maintenance.cancel()
        self.metrics.loop_lag.stop()
        if self.events is not None:  # nothing changes the index any more: publish the rest
            self.events.close()
        if self.store.nvme is not None:
            if self.config.nvme_flush_on_shutdown:
                n = await self.store.flush_to_nvme(SHUTDOWN_FLUSH_TIMEOUT)
                log.info("shutdown: wrote %d DRAM-only objects to NVMe; %d could not be kept",
                         n, self.store.flush_not_kept)
            await self.store.drain_tasks(grace)
        if self.rdma is not None:
            self.rdma.close()
            self.rdma = None
        if self.store.fence.history is not None:  # nothing deletes any more (cluster/history.py)
            from kvstored.cluster.history import save_history
            if self._history_saves is not None:
                self._history_saves.cancel()
            save_history(self.store.fence.history)
        self.store.close()
        self.status.state = "stopped"
        await self.metrics.close()

    def _reload_checked(self) -> tuple[list[str], list[str]]:
        """The Reload call: like SIGHUP, but a config file that does not load is raised
        (ConfigError) to tell the caller, instead of only logged."""
        self.source.load()
        return self.reload()

    def reload(self) -> tuple[list[str], list[str]]:
        """SIGHUP: re-read the config; apply what can change live, report the rest.

        Returns (applied, needs_restart) as ``setting=value`` strings (credentials
        shown as [REDACTED]). A config that does not load changes nothing.
        """
        if self.source is None:
            log.warning("reload: no config source; nothing to reload")
            return [], []
        try:
            new = self.source.load()
            explicit = self.source.explicit()
        except ConfigError as e:
            self.metrics.reloads["failed"] += 1
            log.error("reload failed, keeping the running configuration: %s", e,
                      extra={"config": self.source.path})
            return [], []
        applied, restart = [], []
        for s in SETTINGS:
            f = s.field
            old, value = getattr(self.config, f), getattr(new, f)
            if old == value or (f in _DERIVED and f not in explicit and f not in self._explicit):
                continue
            hook = RELOADABLE.get(f)
            if hook is None:
                restart.append(_shown(f, value))
                continue
            RELOAD_HOOKS[hook](self, f, value)
            setattr(self.config, f, value)
            applied.append(_shown(f, value))
        self._explicit = explicit
        applied += self.reload_security()
        self.metrics.reloads["ok"] += 1
        pinned = sorted(_SETTING_NAME[f] for f, v in self.source.overrides.items()
                        if v is not None and f in _SETTING_NAME)
        log.info("reloaded %s", self.source.path or "(no config file: flags and defaults only)",
                 extra={"applied": ",".join(applied) or "none",
                        "needs_restart": ",".join(restart) or "none",
                        "set_by_flags": ",".join(pinned) or "none"})
        return applied, restart


    def reload_security(self) -> list[str]:
        """Re-read the tokens file and the TLS certificate files (SIGHUP, Reload RPC).

        Returns what changed, as lines like ``tokens: added ci-bot``. A file that does
        not load leaves the running tokens or certificates in place (logged, counted).
        """
        changed: list[str] = []
        if self.auth is not None:
            try:
                r = self.auth.reload()
            except TokensError as e:
                self.metrics.reloads["failed"] += 1
                log.error("tokens reload failed, keeping the loaded tokens: %s", e)
                changed.append(f"tokens: reload failed ({e})")
            else:
                changed += [f"tokens: {what} {', '.join(r[what])}"
                            for what in ("added", "removed", "changed") if r[what]]
        if self.tls is not None:
            try:
                if self.tls.reload():
                    changed.append("tls: certificates reloaded")
            except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
                self.metrics.reloads["failed"] += 1
                log.error("TLS reload failed, keeping the loaded certificates: %s", e)
                changed.append(f"tls: reload failed ({e})")
        return changed


def _lost_at_exit(node: Node) -> int:
    """Objects whose only copy is in DRAM as the process ends: all of them without an
    NVMe tier (not_kept counts only what the shutdown flush tried and failed to write)."""
    st = node.store
    if st.nvme is None:
        return st.object_count()
    if node.config.nvme_flush_on_shutdown:
        return st.flush_not_kept
    from kvstored.engine.entries import DEAD
    return sum(1 for x in st.index.iterate() if x.nvme is None and x.offset >= 0 and x.state != DEAD)


async def serve(config: Config, ready_file: str | None = None,
                source: ConfigSource | None = None,
                on_ready: Callable[[], None] | None = None) -> int:
    """Run one node until SIGTERM/SIGINT. ``on_ready`` is called once it is ready (after
    the ready file and READY=1): errors before that are start-up errors (exit 2)."""
    loop = asyncio.get_running_loop()
    # A SIGHUP before the node is ready (NVMe recovery, prefault: minutes on a large node)
    # is remembered and applied once ready; its default action would end the process
    # without draining or flushing what was already put (main() ignores it until here).
    early_hups: list[bool] = []
    loop.add_signal_handler(signal.SIGHUP, lambda: early_hups.append(True))
    node = Node(config)
    node.source = source
    if source is not None:
        node._explicit = source.explicit()
    stop = asyncio.Event()
    # before start(): a SIGTERM once anything listens drains and cleans up (shm socket file)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await node.start()
    # ready = the arena is prefaulted too: the ready file and READY=1 wait for it
    await node.warm(stop)
    if ready_file and not stop.is_set():
        try:
            tmp = ready_file + ".tmp"
            st = node.status
            # the KV events endpoints as bound (a tcp port 0 replaced by the port taken): ""
            # when off, so a test or a supervisor never picks a port and races for it
            ev = node.events.bound() if node.events is not None else ("", "")
            with open(tmp, "w") as f:
                json.dump({"pid": os.getpid(), "node_id": st.node_id, "host": config.host,
                           "control_port": st.control_port, "data_port": st.data_port,
                           "metrics_port": node.metrics_port, "events_endpoint": ev[0],
                           "events_replay_endpoint": ev[1]}, f)
            os.replace(tmp, ready_file)  # atomic: readers never see half a file
        except OSError as e:
            await node.stop(0)
            raise OSError(f"cannot write the ready file {ready_file} ({e.strerror or e})") from None

    def on_hup() -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        sdnotify.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")
        try:
            node.reload()
        except Exception:  # a reload bug must not take the daemon down
            node.metrics.reloads["failed"] += 1
            log.exception("reload failed")
        sdnotify.notify("READY=1", "STATUS=serving")

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    if early_hups and not stop.is_set():
        log.info("SIGHUP arrived during start-up: reloading now")
        on_hup()
    if not stop.is_set():  # a SIGTERM while warming: never ready, straight to STOPPING
        sdnotify.notify("READY=1", f"STATUS=serving control={config.host}:{node.status.control_port} "
                        f"data={config.host}:{node.status.data_port} metrics="
                        f"{f'{config.metrics_host}:{node.metrics_port}' if node.metrics_port else 'off'}",
                        f"MAINPID={os.getpid()}")
    if on_ready is not None:
        on_ready()
    await stop.wait()
    loop.remove_signal_handler(signal.SIGHUP)
    sdnotify.notify("STOPPING=1", "STATUS=draining in-flight requests")
    log.info("shutting down: draining in-flight requests",
             extra={"connections": len(node.data_server.connections),
                    "deadline_s": config.drain_timeout})
    t0 = time.monotonic()
    await node.stop()
    s = node.store.counters
    log.info("stopped", extra={"drain_s": round(time.monotonic() - t0, 3), "puts": s["puts"],
                               "gets": s["gets"], "objects": node.store.object_count(),
                               "not_kept": node.store.flush_not_kept,
                               "lost_at_exit": _lost_at_exit(node)})
    return 0
