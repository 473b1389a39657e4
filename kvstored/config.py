"""Daemon configuration: defaults < TOML file < command-line flags.

Every setting has one TOML name (``section.key``) and one flat field on
:class:`Config`; the table ``SETTINGS`` below ties the two together and drives
loading, type checking, error messages and ``to_toml``. All problems surface
as a :class:`ConfigError` whose message is a single line naming the setting,
the bad value and what is allowed, so the daemon can print it and exit 2.

Sizes are always binary: ``K``/``KB``/``KiB`` all mean 1024 bytes (and so on
for M, G, T). Nobody sizes a DRAM arena in powers of ten, and silently
accepting ``1GB`` as 10**9 would give slab-misaligned arenas.
"""
from __future__ import annotations

import argparse
import difflib
import math
import os
import re
import socket
import sys
import tomllib
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, NoReturn

from kvstored import __version__

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("kv", "json")  # key=value (logfmt) or one JSON object per line
SLAB_ALIGN = 4096  # the arena's slot alignment; slabs must be cut into whole pages

# Auto-sized arena: a quarter of available memory, within these bounds.
AUTO_DRAM_FRACTION = 4
AUTO_DRAM_MAX = 4 * GiB
AUTO_DRAM_MIN = 64 * MiB

MEMINFO_PATH = "/proc/meminfo"
TCP_CC_PATH = "/proc/sys/net/ipv4/tcp_available_congestion_control"

_SIZE_HINT = "use e.g. 2GiB, 512MiB, 1073741824"


class ConfigError(Exception):
    """A bad setting; ``str(err)`` is one line fit for ``kvstored: error: ...``."""


# ---------------------------------------------------------------- sizes

_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")
_UNIT_SHIFT = {"": 0, "b": 0,
               "k": 10, "kb": 10, "kib": 10,
               "m": 20, "mb": 20, "mib": 20,
               "g": 30, "gb": 30, "gib": 30,
               "t": 40, "tb": 40, "tib": 40}


def parse_size(value: Any, setting: str = "") -> int:
    """Bytes from an int or a string such as ``"2GiB"``, ``"64 KiB"``, ``"1G"``, ``"4096"``.

    Units are case-insensitive and all binary (K = KB = KiB = 1024). Fractions
    are fine when they come out to whole bytes (``"1.5GiB"``); negative values,
    non-whole byte counts and garbage raise ConfigError, prefixed with
    ``setting`` when given.
    """
    where = f"{setting}: " if setting else ""
    if isinstance(value, bool):  # bool is an int subclass; True is not a size
        raise ConfigError(f"{where}expected a size, got {value!r} (boolean) ({_SIZE_HINT})")
    if isinstance(value, int):
        amount = Decimal(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"{where}cannot parse {value!r} as a size ({_SIZE_HINT})")
        amount = Decimal(value)
    elif isinstance(value, str):
        text = value.strip()
        negative = text.startswith("-")
        m = _SIZE_RE.fullmatch(text[1:] if negative else text)
        if not m or m.group(2).lower() not in _UNIT_SHIFT:
            raise ConfigError(f"{where}cannot parse {value!r} as a size ({_SIZE_HINT})")
        amount = Decimal(m.group(1)) * (1 << _UNIT_SHIFT[m.group(2).lower()])
        if negative:
            amount = -amount
    else:
        raise ConfigError(f"{where}expected a size, got {value!r} ({_type_name(value)}) "
                          f"({_SIZE_HINT})")
    if amount < 0:
        raise ConfigError(f"{where}size must not be negative, got {value!r}")
    if amount != amount.to_integral_value():
        raise ConfigError(f"{where}{value!r} is not a whole number of bytes ({_SIZE_HINT})")
    return int(amount)


def format_size(n: int) -> str | int:
    """``2147483648 -> "2GiB"`` when a binary unit divides exactly, else the plain int."""
    for unit, mult in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n and n % mult == 0:
            return f"{n // mult}{unit}"
    return n


# ---------------------------------------------------------------- settings table

@dataclass(frozen=True)
class Setting:
    section: str
    key: str
    field: str
    kind: str  # str | int | size | auto_size | float | bool | log_level

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"


SETTINGS: tuple[Setting, ...] = (
    Setting("server", "host", "host", "str"),
    Setting("server", "control_port", "control_port", "int"),
    Setting("server", "data_port", "data_port", "int"),
    Setting("server", "tcp_congestion", "tcp_congestion", "str"),
    Setting("server", "max_connections", "max_connections", "int"),
    Setting("server", "max_inflight_bytes", "max_inflight_bytes", "size"),
    Setting("server", "max_batch_keys", "max_batch_keys", "int"),
    Setting("server", "max_control_value_size", "max_control_value_size", "size"),
    Setting("server", "drain_timeout", "drain_timeout", "float"),
    Setting("server", "max_connections_per_client", "max_connections_per_client", "int"),
    Setting("server", "max_pipelined_requests", "max_pipelined_requests", "int"),
    Setting("server", "max_queued_response_bytes", "max_queued_response_bytes", "size"),
    Setting("server", "max_queued_responses", "max_queued_responses", "int"),
    Setting("server", "write_stall_timeout", "write_stall_timeout", "float"),
    Setting("server", "idle_timeout", "idle_timeout", "float"),
    Setting("server", "max_reserved_bytes_per_connection", "max_reserved_bytes_per_connection", "size"),
    Setting("server", "max_reserved_bytes_per_client", "max_reserved_bytes_per_client", "size"),
    Setting("server", "put_stall_timeout", "put_stall_timeout", "float"),
    Setting("server", "min_put_rate", "min_put_rate", "size"),
    Setting("server", "handshake_timeout", "handshake_timeout", "float"),
    Setting("server", "max_handshakes_per_client", "max_handshakes_per_client", "int"),
    Setting("dram", "size", "dram_size", "auto_size"),
    Setting("dram", "slab_size", "slab_size", "size"),
    Setting("dram", "max_value_size", "max_value_size", "size"),
    Setting("dram", "high_watermark", "high_watermark", "float"),
    Setting("dram", "low_watermark", "low_watermark", "float"),
    Setting("dram", "hugepages", "hugepages", "bool"),
    Setting("dram", "prefault", "prefault", "bool"),
    Setting("nvme", "path", "nvme_path", "str"),
    Setting("nvme", "size", "nvme_size", "size"),
    Setting("nvme", "region_size", "nvme_region_size", "size"),
    Setting("nvme", "admission", "nvme_admission", "str"),
    Setting("nvme", "write_budget_per_hour", "nvme_write_budget_per_hour", "size"),
    Setting("nvme", "io_backend", "nvme_io_backend", "str"),
    Setting("nvme", "queue_depth", "nvme_queue_depth", "int"),
    Setting("nvme", "flush_on_shutdown", "nvme_flush_on_shutdown", "bool"),
    Setting("nvme", "sync", "nvme_sync", "str"),
    Setting("nvme", "sync_interval", "nvme_sync_interval", "float"),
    Setting("shm", "enabled", "shm_enabled", "bool"),
    Setting("shm", "socket_path", "shm_socket_path", "str"),
    Setting("shm", "allowed_uids", "shm_allowed_uids", "str"),
    Setting("shm", "lease_ttl", "shm_lease_ttl", "float"),
    Setting("engine", "reservation_timeout", "reservation_timeout", "float"),
    Setting("engine", "put_wait_timeout", "put_wait_timeout", "float"),
    Setting("engine", "max_pin_ttl", "max_pin_ttl", "float"),
    Setting("log", "level", "log_level", "log_level"),
    Setting("log", "format", "log_format", "str"),
    Setting("metrics", "enabled", "metrics_enabled", "bool"),
    Setting("metrics", "host", "metrics_host", "str"),
    Setting("metrics", "port", "metrics_port", "int"),
    Setting("tls", "cert_file", "tls_cert_file", "str"),
    Setting("tls", "key_file", "tls_key_file", "str"),
    Setting("tls", "client_ca_file", "tls_client_ca_file", "str"),
    Setting("tls", "min_version", "tls_min_version", "str"),
    Setting("auth", "enabled", "auth_enabled", "bool"),
    Setting("auth", "tokens_file", "auth_tokens_file", "str"),
    Setting("node", "id", "node_id", "str"),
    Setting("cluster", "enabled", "cluster_enabled", "bool"),
    Setting("cluster", "name", "cluster_name", "str"),
    Setting("cluster", "etcd_endpoints", "cluster_etcd_endpoints", "str"),
    Setting("cluster", "lease_ttl", "cluster_lease_ttl", "int"),
    Setting("cluster", "failure_domain", "cluster_failure_domain", "str"),
    Setting("cluster", "static_peers", "cluster_static_peers", "str"),
    Setting("cluster", "policies", "cluster_policies", "str"),
    Setting("cluster", "repair", "cluster_repair", "bool"),
    Setting("cluster", "repair_delay", "cluster_repair_delay", "float"),
    Setting("cluster", "repair_interval", "cluster_repair_interval", "float"),
    Setting("cluster", "repair_rate", "cluster_repair_rate", "size"),
    Setting("cluster", "token", "cluster_token", "str"),
    Setting("cluster", "etcd_username", "cluster_etcd_username", "str"),
    Setting("cluster", "etcd_password_file", "cluster_etcd_password_file", "str"),
    Setting("events", "endpoint", "events_endpoint", "str"),
    Setting("events", "replay_endpoint", "events_replay_endpoint", "str"),
    Setting("events", "replay_buffer", "events_replay_buffer", "int"),
    Setting("events", "topic", "events_topic", "str"),
    Setting("events", "medium", "events_medium", "str"),
    Setting("events", "block_size", "events_block_size", "int"),
)
SECTIONS = tuple(dict.fromkeys(s.section for s in SETTINGS))
_BY_NAME = {s.name: s for s in SETTINGS}
_BY_FIELD = {s.field: s for s in SETTINGS}


def _type_name(v: Any) -> str:
    for t, name in ((bool, "boolean"), (int, "integer"), (float, "float"), (str, "string"),
                    (dict, "table"), (list, "array")):
        if isinstance(v, t):
            return name
    return type(v).__name__


def _coerce(s: Setting, v: Any) -> Any:
    """Check one value's type for setting ``s`` and bring it to the field's type."""
    def wrong(expected: str) -> ConfigError:
        return ConfigError(f"{s.name}: expected {expected}, got {v!r} ({_type_name(v)})")

    if s.kind in ("str", "log_level"):
        if not isinstance(v, str):
            raise wrong("a string")
        # log levels are case-insensitive because Python's logging names are upper case
        return v.lower() if s.kind == "log_level" else v
    if s.kind == "int":
        if isinstance(v, bool) or not isinstance(v, int):
            raise wrong("an integer")
        return v
    if s.kind == "float":
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise wrong("a number")
        return float(v)
    if s.kind == "bool":
        if not isinstance(v, bool):
            raise wrong("true or false")
        return v
    if s.kind == "auto_size" and (v is None or (isinstance(v, str) and v.strip().lower() == "auto")):
        return None  # None = auto, resolved by validate()
    return parse_size(v, s.name)


def _unknown(name: str, candidates: list[str], what: str = "setting") -> ConfigError:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    if not close:
        # right key, wrong section (e.g. 'engine.slab_size'): match on the last part
        last = name.rsplit(".", 1)[-1]
        close = [c for c in candidates if c.rsplit(".", 1)[-1] == last][:1]
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown {what} '{name}'{hint}")


# ---------------------------------------------------------------- host probes

def mem_available() -> int | None:
    """MemAvailable in bytes, or None where /proc/meminfo is unreadable."""
    try:
        with open(MEMINFO_PATH) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * KiB  # the kernel reports kB (= KiB)
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_congestion_controls() -> list[str] | None:
    """The kernel's TCP congestion algorithms, or None where that can't be read."""
    try:
        with open(TCP_CC_PATH) as f:
            return f.read().split()
    except OSError:
        return None


def auto_dram_size(slab_size: int) -> int:
    """25% of MemAvailable, within [64 MiB, 4 GiB], rounded down to whole slabs (>= 1)."""
    avail = mem_available()
    size = AUTO_DRAM_MIN if avail is None else avail // AUTO_DRAM_FRACTION
    size = max(AUTO_DRAM_MIN, min(size, AUTO_DRAM_MAX))
    return max(slab_size, size // slab_size * slab_size)


# ---------------------------------------------------------------- Config

@dataclass
class Config:
    # [server]
    host: str = "127.0.0.1"
    control_port: int = 7070
    data_port: int = 7071
    tcp_congestion: str = ""  # empty = kernel default
    max_connections: int = 1024
    max_inflight_bytes: int = 256 * MiB  # per connection
    max_batch_keys: int = 65536
    max_control_value_size: int = 4 * MiB
    drain_timeout: float = 10.0  # seconds SIGTERM waits for in-flight requests before closing
    max_connections_per_client: int = 256  # data connections from one peer IP address
    max_pipelined_requests: int = 1024  # unanswered requests per data connection before it stops reading
    # Hostile and careless clients (issue 17): what one connection or one client may hold.
    max_queued_response_bytes: int = 1 * MiB  # copied (non-arena) response bytes unsent per connection
    max_queued_responses: int = 16384  # response frames unsent per connection
    write_stall_timeout: float = 30.0  # a connection that takes none of its responses this long is closed
    idle_timeout: float = 600.0  # a data connection with no traffic this long is closed
    max_reserved_bytes_per_connection: int = 1 * GiB  # unfinished puts of one connection
    max_reserved_bytes_per_client: int = 4 * GiB  # of one client (peer IP, or uid on shm); <= dram.size / 2
    put_stall_timeout: float = 2.0  # a put's payload may pause this long (and no byte arrived yet)
    min_put_rate: int = 1 * MiB  # bytes/s: a put must finish within put_stall_timeout + size / rate
    handshake_timeout: float = 3.0  # TLS data port: seconds to complete the handshake
    max_handshakes_per_client: int = 32  # TLS data port: handshakes in progress per peer IP
    # [dram]
    dram_size: int | None = None  # None = auto (see auto_dram_size); concrete after validate()
    slab_size: int = 64 * MiB
    max_value_size: int = 64 * MiB
    high_watermark: float = 0.95
    low_watermark: float = 0.90
    hugepages: bool = True
    # same-host shared-memory channel (a Unix socket)
    shm_enabled: bool = True
    shm_socket_path: str = ""  # empty: $RUNTIME_DIRECTORY or <tmpdir>, kvstored-<control port>.sock
    shm_allowed_uids: str = ""  # comma-separated uids besides the daemon's own and root
    shm_lease_ttl: float = 30.0  # seconds a get's view stays protected unless released
    # NVMe tier (off while nvme_path is empty)
    nvme_path: str = ""
    nvme_size: int = 0
    nvme_region_size: int = 128 * MiB  # must hold the largest object plus 20 KiB
    nvme_admission: str = "all"  # all | read (only objects read at least once)
    nvme_write_budget_per_hour: int = 0  # bytes demoted per hour; 0 = unlimited
    nvme_io_backend: str = "auto"  # auto | io_uring | threads
    nvme_queue_depth: int = 32
    nvme_flush_on_shutdown: bool = True  # SIGTERM writes DRAM-only objects to NVMe
    nvme_sync: str = "interval"  # none | interval | always: fdatasync for power-loss durability
    nvme_sync_interval: float = 1.0  # seconds between fdatasyncs with nvme.sync = interval
    prefault: bool = True  # fault the arena in at start (background) so first puts are not 14x slower
    # [engine] (seconds)
    reservation_timeout: float = 30.0
    put_wait_timeout: float = 2.0
    max_pin_ttl: float = 86400.0
    # [log]
    log_level: str = "info"
    log_format: str = "kv"  # kv (key=value) | json
    # [metrics] Prometheus endpoint (/metrics, /healthz, /readyz)
    metrics_enabled: bool = True
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9090  # 0 = any free port
    # [tls] both planes; empty cert_file = plaintext. client_ca_file set = mutual TLS required
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    tls_min_version: str = "1.2"  # 1.2 | 1.3 (data path; gRPC accepts 1.2 and 1.3)
    # [auth] per-namespace tokens (see kvstored/auth.py for the file format)
    auth_enabled: bool = False
    auth_tokens_file: str = ""
    # [node]
    node_id: str = ""  # empty = "<hostname>:<control_port>", filled by validate()
    # [cluster] membership (kvstored/cluster/membership.py); off = standalone node
    cluster_enabled: bool = False
    cluster_name: str = "default"  # etcd keys live under /kvstored/<name>/members/
    cluster_etcd_endpoints: str = "127.0.0.1:2379"  # comma-separated host:port, tried in turn
    cluster_lease_ttl: int = 5  # seconds a dead node stays listed (etcd lease TTL)
    cluster_failure_domain: str = ""  # e.g. a rack or zone name; "" = none
    cluster_static_peers: str = ""  # comma-separated control host:port; set = no etcd
    # namespace=policy pairs ("*" = default), e.g. "*=none, llama=ec:4+2"; etcd entries
    # set with `kvstore-cli policy set` override them
    cluster_policies: str = ""
    cluster_repair: bool = True  # run the repair agent (rebuild, move, verify records)
    cluster_repair_delay: float = 10.0  # seconds a membership change settles before repair
    cluster_repair_interval: float = 300.0  # a full pass at least this often (seconds)
    cluster_repair_rate: int = 256 << 20  # bytes/s of records repair may write (throttle)
    cluster_token: str = ""  # token the repair agent presents to peers when auth is on
    # etcd with authentication on: a user with read/write on /kvstored/<name>/, and a file
    # holding its password (not the password itself: config files get shared)
    cluster_etcd_username: str = ""
    cluster_etcd_password_file: str = ""
    # [events] KV events for routers in vLLM's format (kvstored/events.py); "" = off
    events_endpoint: str = ""  # ZMQ PUB address the node binds, e.g. tcp://127.0.0.1:5557
    events_replay_endpoint: str = ""  # ROUTER for late subscribers; "" = endpoint port + 1, "off"
    events_replay_buffer: int = 10000  # batches kept for replay
    events_topic: str = ""  # first frame of every message (vLLM's default: empty)
    events_medium: str = "EXTERNAL"  # BlockStored/BlockRemoved medium ("" = None)
    events_block_size: int = 0  # tokens per block announced in BlockStored (0 = unknown)

    def validate(self) -> Config:
        """Normalise field types, fill auto values, then check ranges; returns self.

        Raises ConfigError on the first problem found.
        """
        for s in SETTINGS:
            setattr(self, s.field, _coerce(s, getattr(self, s.field)))

        for s in (_BY_FIELD["control_port"], _BY_FIELD["data_port"]):
            port = getattr(self, s.field)
            if not 0 <= port <= 65535:
                raise ConfigError(f"{s.name}: {port} is out of range "
                                  "(allowed 0..65535; 0 picks a free port)")
        if not self.host.strip():
            raise ConfigError("server.host: must not be empty (e.g. 127.0.0.1 or 0.0.0.0)")
        if self.tcp_congestion:
            known = available_congestion_controls()
            # unreadable list (not Linux, no /proc): let the socket option report it later
            if known is not None and self.tcp_congestion not in known:
                raise ConfigError(f"server.tcp_congestion: {self.tcp_congestion!r} is not "
                                  f"available on this host (available: {', '.join(known)})")

        for f in ("max_connections", "max_inflight_bytes", "max_batch_keys",
                  "max_control_value_size", "slab_size", "max_value_size",
                  "max_connections_per_client", "max_pipelined_requests",
                  "max_queued_response_bytes", "max_queued_responses",
                  "max_reserved_bytes_per_connection", "max_reserved_bytes_per_client",
                  "min_put_rate", "max_handshakes_per_client"):
            if getattr(self, f) <= 0:
                raise ConfigError(f"{_BY_FIELD[f].name}: must be positive, got {getattr(self, f)}")
        if self.slab_size % SLAB_ALIGN:
            raise ConfigError(f"dram.slab_size: {self.slab_size} is not a multiple of "
                              f"{SLAB_ALIGN} (use e.g. 64MiB)")
        if self.slab_size < self.max_value_size:
            raise ConfigError(
                f"dram.slab_size ({format_size(self.slab_size)}) must be >= "
                f"dram.max_value_size ({format_size(self.max_value_size)}): "
                "every value is stored whole inside one slab")
        if self.dram_size is None:
            self.dram_size = auto_dram_size(self.slab_size)
        if self.dram_size <= 0:
            raise ConfigError(f"dram.size: must be positive, got {self.dram_size}")
        if self.dram_size < self.slab_size:
            raise ConfigError(f"dram.size ({format_size(self.dram_size)}) must hold at least "
                              f"one slab (dram.slab_size = {format_size(self.slab_size)})")

        self._validate_nvme()
        self.shm_allowed_uid_set()
        if not (math.isfinite(self.shm_lease_ttl) and self.shm_lease_ttl > 0):
            raise ConfigError(f"shm.lease_ttl: must be a positive number of seconds, got {self.shm_lease_ttl}")
        self._validate_security()
        low, high = self.low_watermark, self.high_watermark
        if not 0 < low <= high <= 1:  # also false for NaN
            raise ConfigError(f"dram.low_watermark ({low}) and dram.high_watermark ({high}) "
                              "must satisfy 0 < low_watermark <= high_watermark <= 1")
        for f in ("reservation_timeout", "put_wait_timeout", "max_pin_ttl", "drain_timeout",
                  "write_stall_timeout", "idle_timeout", "put_stall_timeout", "handshake_timeout"):
            v = getattr(self, f)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{_BY_FIELD[f].name}: must be a positive number of "
                                  f"seconds, got {v}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log.level: {self.log_level!r} is not one of "
                              f"{', '.join(LOG_LEVELS)}")
        self.log_format = self.log_format.lower()
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"log.format: {self.log_format!r} is not one of "
                              f"{', '.join(LOG_FORMATS)}")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics.port: {self.metrics_port} is out of range "
                              "(allowed 0..65535; 0 picks a free port)")
        if self.metrics_enabled and not self.metrics_host.strip():
            raise ConfigError("metrics.host: must not be empty (e.g. 127.0.0.1 or 0.0.0.0)")
        if self.metrics_enabled and self.metrics_port and self.metrics_port in (
                self.control_port, self.data_port):
            raise ConfigError(f"metrics.port: {self.metrics_port} is also the control or data "
                              "port; pick another (or 0 for any free port)")
        if not self.node_id:
            self.node_id = f"{socket.gethostname()}:{self.control_port}"
        self._validate_cluster()
        self._validate_events()
        return self

    def _validate_events(self) -> None:
        hint = "use e.g. tcp://127.0.0.1:5557, tcp://*:5557 or ipc:///run/kvstored/events"
        for f in ("events_endpoint", "events_replay_endpoint"):
            v = getattr(self, f)
            if f == "events_replay_endpoint" and v in ("", "off"):
                continue
            if v and (not v.startswith(("tcp://", "ipc://")) or len(v) > 256
                      or any(ord(ch) <= 0x20 for ch in v)):
                raise ConfigError(f"{_BY_FIELD[f].name}: {v!r} is not a tcp:// or ipc:// "
                                  f"endpoint ({hint})")
            if v.startswith("tcp://"):
                host, sep, port = v[6:].rpartition(":")
                if not (sep and host and (port == "*" or port.isdigit() and 1 <= int(port) <= 65535)):
                    raise ConfigError(f"{_BY_FIELD[f].name}: {v!r} needs host:port with a port "
                                      f"in 1..65535 ({hint})")
        if self.events_endpoint and self.events_endpoint == self.events_replay_endpoint:
            raise ConfigError("events.replay_endpoint: must differ from events.endpoint")
        if not 1 <= self.events_replay_buffer <= 1_000_000:
            raise ConfigError(f"events.replay_buffer: {self.events_replay_buffer} is outside "
                              "1..1000000 batches")
        if not 0 <= self.events_block_size <= 1 << 20:
            raise ConfigError(f"events.block_size: {self.events_block_size} is outside 0..1048576 "
                              "tokens")
        for f, limit in (("events_topic", 256), ("events_medium", 32)):
            if len(getattr(self, f)) > limit:
                raise ConfigError(f"{_BY_FIELD[f].name}: longer than {limit} characters")

    def events_replay(self) -> str:
        """The replay endpoint in effect ("" = none)."""
        if self.events_replay_endpoint == "off" or not self.events_endpoint:
            return ""
        if self.events_replay_endpoint:
            return self.events_replay_endpoint
        from kvstored.events import default_replay_endpoint  # lazy: keep config importable alone
        return default_replay_endpoint(self.events_endpoint)

    def _validate_cluster(self) -> None:
        """[cluster]: names and address lists parse; etcd mode has its client library."""
        if not _CLUSTER_NAME_RE.fullmatch(self.cluster_name):
            raise ConfigError(f"cluster.name: {self.cluster_name!r} must be 1-64 characters of "
                              "letters, digits, '.', '_' or '-'")
        if not 2 <= self.cluster_lease_ttl <= 3600:
            raise ConfigError(f"cluster.lease_ttl: {self.cluster_lease_ttl} is outside 2..3600 "
                              "seconds (etcd's minimum lease is about 2s)")
        if len(self.cluster_failure_domain) > 128 or any(
                ord(ch) < 0x20 for ch in self.cluster_failure_domain):
            raise ConfigError(f"cluster.failure_domain: {self.cluster_failure_domain!r} must be "
                              "at most 128 printable characters")
        self.cluster_endpoints()
        self.cluster_peers()
        self.cluster_policy_table()
        if not 0 <= self.cluster_repair_delay <= 86400:
            raise ConfigError(f"cluster.repair_delay: {self.cluster_repair_delay} is outside 0..86400 seconds")
        if not 1 <= self.cluster_repair_interval <= 86400:
            raise ConfigError(f"cluster.repair_interval: {self.cluster_repair_interval} is outside "
                              "1..86400 seconds")
        if bool(self.cluster_etcd_username) != bool(self.cluster_etcd_password_file):
            raise ConfigError("cluster.etcd_username and cluster.etcd_password_file: set both "
                              "(etcd authentication) or neither")
        if self.cluster_etcd_password_file:
            self.cluster_etcd_password()
        if self.cluster_repair_rate < 1 << 20:
            raise ConfigError(f"cluster.repair_rate: {self.cluster_repair_rate} bytes/s is below 1MiB/s "
                              "(repair would never finish)")
        if self.cluster_enabled:
            if "/" in self.node_id:
                raise ConfigError(f"node.id: {self.node_id!r} must not contain '/' when "
                                  "cluster.enabled = true (it is an etcd key part)")
            if not self.cluster_static_peers:
                import importlib.util
                if importlib.util.find_spec("aetcd") is None:
                    raise ConfigError("cluster.etcd_endpoints: etcd membership needs the 'aetcd' "
                                      "package (pip install 'kvstored[server]'), or set "
                                      "cluster.static_peers")

    def cluster_endpoints(self) -> list[tuple[str, int]]:
        """``cluster.etcd_endpoints`` as (host, port) pairs; ConfigError when malformed."""
        return _host_ports("cluster.etcd_endpoints", self.cluster_etcd_endpoints,
                           allow_empty=not self.cluster_enabled or bool(self.cluster_static_peers),
                           schemes=("http://",))

    def cluster_etcd_password(self) -> str:
        """The etcd password from ``cluster.etcd_password_file`` (first line, stripped)."""
        path = self.cluster_etcd_password_file
        try:
            with open(path, encoding="utf-8") as f:
                pw = f.readline().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cluster.etcd_password_file: cannot read {path!r}: "
                              f"{getattr(e, 'strerror', None) or e}") from None
        if not pw:
            raise ConfigError(f"cluster.etcd_password_file: {path!r} is empty")
        return pw

    def cluster_policy_table(self) -> dict[str, str]:
        """``cluster.policies`` as {namespace: policy}; ConfigError when malformed."""
        from kvstore.errors import InvalidArgument
        from kvstore.layout import Policy
        from kvstore.wire import namespace_bytes
        out: dict[str, str] = {}
        for part in (p.strip() for p in self.cluster_policies.split(",")):
            if not part:
                continue
            ns, eq, pol = part.partition("=")
            ns = ns.strip()
            try:
                if not eq:
                    raise InvalidArgument("expected namespace=policy")
                if ns != "*":
                    namespace_bytes(ns)
                out[ns] = str(Policy.parse(pol))
            except InvalidArgument as e:
                raise ConfigError(f"cluster.policies: {part!r}: {e.message}") from None
        return out

    def cluster_peers(self) -> list[tuple[str, int]]:
        """``cluster.static_peers`` as (host, port) pairs; ConfigError when malformed."""
        return _host_ports("cluster.static_peers", self.cluster_static_peers, allow_empty=True)

    def _validate_security(self) -> None:
        """[tls] and [auth]: files exist and parse, so a bad one fails at start (exit 2)."""
        if self.tls_min_version not in ("1.2", "1.3"):
            raise ConfigError(f"tls.min_version: {self.tls_min_version!r} is not '1.2' or '1.3'")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigError("tls.cert_file and tls.key_file: set both (TLS on) or neither")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ConfigError("tls.client_ca_file: mutual TLS needs tls.cert_file and tls.key_file too")
        if self.tls_cert_file:
            for f in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
                path = getattr(self, f)
                if path and not os.access(path, os.R_OK):
                    raise ConfigError(f"{_BY_FIELD[f].name}: cannot read {path!r}")
            import ssl

            from kvstored.tls import ServerTLS  # lazy: keep config importable alone
            try:
                ServerTLS(self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file,
                          self.tls_min_version)
            except (OSError, ssl.SSLError, ValueError) as e:
                raise ConfigError(f"tls: cannot load certificate {self.tls_cert_file!r}, key "
                                  f"{self.tls_key_file!r} or CA {self.tls_client_ca_file!r}: {e}") from None
        if self.auth_enabled:
            if not self.auth_tokens_file:
                raise ConfigError("auth.tokens_file: set it when auth.enabled = true")
            from kvstored.auth import TokensError, load_tokens  # lazy
            try:
                load_tokens(self.auth_tokens_file, warn=False)
            except TokensError as e:
                raise ConfigError(f"auth.tokens_file: {e}") from None

    def shm_allowed_uid_set(self) -> set[int]:
        try:
            return {int(u) for u in self.shm_allowed_uids.replace(" ", "").split(",") if u}
        except ValueError:
            raise ConfigError(f"shm.allowed_uids: {self.shm_allowed_uids!r} is not a comma-separated "
                              "list of numeric uids (e.g. \"1000,1001\")") from None

    def _validate_nvme(self) -> None:
        if not self.nvme_path:
            return
        if self.nvme_size <= 0:
            raise ConfigError("nvme.size: set a size for the NVMe tier (e.g. 64GiB) when nvme.path is set")
        if self.nvme_size % 4096:
            raise ConfigError(f"nvme.size: {self.nvme_size} is not a multiple of 4096 (O_DIRECT alignment)")
        if self.nvme_region_size % 4096 or not 16 * MiB <= self.nvme_region_size <= 256 * MiB:
            raise ConfigError(f"nvme.region_size: {format_size(self.nvme_region_size)} must be a "
                              "multiple of 4KiB between 16MiB and 256MiB")
        if self.nvme_size < self.nvme_region_size + MiB:
            raise ConfigError(f"nvme.size ({format_size(self.nvme_size)}) is below one region "
                              f"({format_size(self.nvme_region_size)}) plus the 1MiB header area")
        if self.nvme_region_size < self.max_value_size + 20 * KiB:  # engine.nvme.REGION_OVERHEAD
            raise ConfigError(f"nvme.region_size ({format_size(self.nvme_region_size)}) must hold "
                              f"the largest object (dram.max_value_size = {format_size(self.max_value_size)}) "
                              "plus 20KiB of headers and summary")
        if self.nvme_admission not in ("all", "read"):
            raise ConfigError(f"nvme.admission: {self.nvme_admission!r} is not 'all' or 'read'")
        if self.nvme_io_backend not in ("auto", "io_uring", "threads"):
            raise ConfigError(f"nvme.io_backend: {self.nvme_io_backend!r} is not auto, io_uring or threads")
        if not 1 <= self.nvme_queue_depth <= 4096:
            raise ConfigError(f"nvme.queue_depth: {self.nvme_queue_depth} is outside 1..4096")
        if self.nvme_sync not in ("none", "interval", "always"):
            raise ConfigError(f"nvme.sync: {self.nvme_sync!r} is not none, interval or always")
        if not 0.001 <= self.nvme_sync_interval <= 3600:
            raise ConfigError(f"nvme.sync_interval: {self.nvme_sync_interval} is outside "
                              "0.001..3600 seconds")
        parent = os.path.dirname(os.path.abspath(self.nvme_path))
        target = self.nvme_path if os.path.exists(self.nvme_path) else parent
        if not os.path.exists(target):
            raise ConfigError(f"nvme.path: directory {parent} does not exist")
        if not os.access(target, os.W_OK):
            raise ConfigError(f"nvme.path: {target} is not writable by this user")

    def to_toml(self) -> str:
        """The config as TOML, in the file layout; ``load_config`` reads it back equal."""
        lines = ["# kvstored configuration (sizes are binary: 1GiB = 1024MiB)"]
        for section in SECTIONS:
            lines += ["", f"[{section}]"]
            for s in SETTINGS:
                if s.section == section:
                    lines.append(f"{s.key} = {_toml_value(s, getattr(self, s.field))}")
        return "\n".join(lines) + "\n"

    def engine_limits(self):
        """The engine's StoreLimits for this config (auto dram size resolved if still unset)."""
        from kvstored.engine.store import StoreLimits  # lazy: keep config importable alone

        dram = self.dram_size if self.dram_size is not None else auto_dram_size(self.slab_size)
        return StoreLimits(
            dram_size=dram, slab_size=self.slab_size, max_value_size=self.max_value_size,
            high_watermark=self.high_watermark, low_watermark=self.low_watermark,
            reservation_timeout=self.reservation_timeout,
            put_wait_timeout=self.put_wait_timeout, max_pin_ttl=self.max_pin_ttl,
            hugepages=self.hugepages, prefault=self.prefault)


_CLUSTER_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _host_ports(name: str, text: str, allow_empty: bool,
                schemes: tuple[str, ...] = ()) -> list[tuple[str, int]]:
    """``"a:2379, b:2379"`` -> [("a", 2379), ("b", 2379)]; one-line ConfigError otherwise."""
    out = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        for scheme in schemes:
            if item.lower().startswith(scheme):
                item = item[len(scheme):].rstrip("/")
        if "://" in item:
            raise ConfigError(f"{name}: {item!r}: only plain host:port is supported "
                              "(no TLS to etcd yet)")
        host, sep, port = item.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ConfigError(f"{name}: {item!r} is not host:port (e.g. 10.0.0.5:2379; "
                              "separate several with commas)")
        out.append((host, int(port)))
    if not out and not allow_empty:
        raise ConfigError(f"{name}: empty; list at least one host:port")
    return out


def _toml_str(text: str) -> str:
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in "\b\t\n\f\r":
            out.append({"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:  # TOML forbids raw control characters
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_value(s: Setting, v: Any) -> str:
    if s.kind in ("size", "auto_size"):
        if v is None:
            return '"auto"'
        human = format_size(v)
        return _toml_str(human) if isinstance(human, str) else str(human)
    if s.kind == "bool":
        return "true" if v else "false"
    if s.kind == "float":
        return repr(float(v))  # repr round-trips exactly and is valid TOML for finite floats
    if s.kind == "int":
        return str(v)
    return _toml_str(v)


# ---------------------------------------------------------------- loading

def _read_toml(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file '{path}': {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file '{path}' is not valid TOML: {e}") from None


def _file_values(doc: dict[str, Any]) -> dict[str, Any]:
    """Flat ``{field: raw value}`` from a parsed TOML document; rejects unknown names."""
    out: dict[str, Any] = {}
    for section, table in doc.items():
        if section not in SECTIONS:
            if not isinstance(table, dict):  # a top-level key, e.g. `host = ...`
                raise _unknown(section, list(_BY_NAME))
            raise _unknown(section, list(SECTIONS), "section")
        if not isinstance(table, dict):
            raise ConfigError(f"{section}: expected a table [{section}], got {table!r} "
                              f"({_type_name(table)})")
        for key, value in table.items():
            s = _BY_NAME.get(f"{section}.{key}")
            if s is None:
                raise _unknown(f"{section}.{key}", list(_BY_NAME))
            out[s.field] = _coerce(s, value)
    return out


def load_config(path: str | os.PathLike | None = None,
                overrides: dict[str, Any] | None = None) -> Config:
    """Defaults < TOML file at ``path`` (if any) < ``overrides`` (flat field names).

    ``None`` override values are ignored, so unset command-line flags can be passed
    straight through. Returns a validated Config with auto values filled in.
    """
    cfg = Config()
    values = _file_values(_read_toml(path)) if path else {}
    for field, value in (overrides or {}).items():
        if field not in _BY_FIELD:
            raise _unknown(field, list(_BY_FIELD), "override")
        if value is not None:
            values[field] = _coerce(_BY_FIELD[field], value)
    for field, value in values.items():
        setattr(cfg, field, value)
    return cfg.validate()


# ---------------------------------------------------------------- command line

# flag dest -> Config field
_FLAG_FIELDS = {"host": "host", "port": "control_port", "data_port": "data_port",
                "dram_size": "dram_size", "slab_size": "slab_size",
                "max_value_size": "max_value_size", "tcp_congestion": "tcp_congestion",
                "log_level": "log_level", "nvme_path": "nvme_path", "nvme_size": "nvme_size",
                "nvme_region_size": "nvme_region_size"}
_FLAG_FIELDS.update({"log_format": "log_format", "metrics_port": "metrics_port",
                     "kv_events": "events_endpoint"})


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _dram_size_arg(text: str) -> str | int:
    return "auto" if text.strip().lower() == "auto" else _size_arg(text)


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvstored", description="KV-block storage daemon.",
        epilog="Flags override the config file, which overrides built-in defaults. "
               "Sizes take binary units: 64KiB, 512MiB, 2GiB (K/KB/M/MB/G/GB are 1024-based too).")
    p.add_argument("--config", metavar="FILE", help="TOML config file")
    p.add_argument("--host", metavar="H", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", metavar="P", type=int, help="control port (default 7070; 0 = any free)")
    p.add_argument("--data-port", metavar="D", type=int, help="data port (default 7071; 0 = any free)")
    p.add_argument("--dram-size", metavar="SIZE", type=_dram_size_arg,
                   help="DRAM arena size, or 'auto' (25%% of available memory, at most 4GiB)")
    p.add_argument("--slab-size", metavar="SIZE", type=_size_arg, help="slab size (default 64MiB)")
    p.add_argument("--max-value-size", metavar="SIZE", type=_size_arg,
                   help="largest value accepted (default 64MiB; <= slab size)")
    p.add_argument("--tcp-congestion", metavar="NAME",
                   help="TCP congestion control for data connections, e.g. cubic or bbr")
    p.add_argument("--nvme-path", metavar="PATH", help="file or block device of the NVMe tier")
    p.add_argument("--nvme-size", metavar="SIZE", type=_size_arg, help="size of the NVMe tier")
    p.add_argument("--nvme-region-size", metavar="SIZE", type=_size_arg,
                   help="NVMe region size, 16MiB-256MiB (default 128MiB)")
    p.add_argument("--log-level", metavar="L", type=str.lower, choices=LOG_LEVELS,
                   help=f"one of {', '.join(LOG_LEVELS)} (default info)")
    p.add_argument("--log-format", metavar="F", type=str.lower, choices=LOG_FORMATS,
                   help="kv (key=value, default) or json")
    p.add_argument("--metrics-port", metavar="P", type=int,
                   help="Prometheus /metrics port (default 9090; 0 = any free)")
    p.add_argument("--kv-events", metavar="ENDPOINT",
                   help="publish KV events for routers (vLLM's format) on this ZMQ endpoint, "
                        "e.g. tcp://127.0.0.1:5557 (default off)")
    p.add_argument("--ready-file", metavar="PATH",
                   help="file written once the daemon is listening (for supervisors and tests)")
    p.add_argument("--print-config", action="store_true",
                   help="print the effective config as TOML and exit")
    p.add_argument("--version", action="version", version=f"kvstored {__version__}")
    return p


def config_from_args(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    """Parse the daemon's flags and load the config they point at.

    argparse problems exit 2 by themselves; a ConfigError is raised for the
    caller to pass to :func:`fail`.
    """
    args = build_arg_parser().parse_args(argv)
    return load_config(args.config, flag_overrides(args)), args


def flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``{field: value}`` of the flags given (None for those not given), for load_config."""
    return {field: getattr(args, dest, None) for dest, field in _FLAG_FIELDS.items()}


def explicit_fields(path: str | os.PathLike | None, overrides: dict[str, Any] | None) -> set[str]:
    """Fields the file or the flags set (the rest are defaults or auto-sized)."""
    fields = set(_file_values(_read_toml(path))) if path else set()
    return fields | {f for f, v in (overrides or {}).items() if v is not None}


def fail(msg: str) -> NoReturn:
    """Print ``kvstored: error: <msg>`` to stderr and exit 2, like argparse does."""
    print(f"kvstored: error: {msg}", file=sys.stderr)
    sys.exit(2)


__all__ = ["Config", "ConfigError", "SETTINGS", "build_arg_parser", "config_from_args",
           "explicit_fields", "fail", "flag_overrides", "format_size", "load_config", "parse_size"]
