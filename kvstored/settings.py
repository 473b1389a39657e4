"""The daemon's settings, one row each, and how a value of each is read and written.

``SETTINGS`` is the single declaration of every setting: its TOML name
(``section.key``), its flat field on ``kvstored.config.Config``, type, default,
one-line help, the check of its value alone, how SIGHUP applies it (a hook of
``kvstored/node.py``; none = needs a restart) and its command-line flag. Everything
else is derived from it (kvstored/config.py: the Config dataclass, loading,
``--print-config``, the flags). Add a setting by adding a row here (and its README
row, which tests/ops/test_readme.py holds against ``--print-config``).

Sizes are always binary: ``K``/``KB``/``KiB`` all mean 1024 bytes (and so on
for M, G, T). Nobody sizes a DRAM arena in powers of ten, and silently
accepting ``1GB`` as 10**9 would give slab-misaligned arenas.
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Callable

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

LOG_LEVELS = ("debug", "info", "warning", "error")
INDEX_KINDS = ("auto", "packed", "dict")  # dram.index (kvstored/engine/entries.py make_index)
LOG_FORMATS = ("kv", "json")  # key=value (logfmt) or one JSON object per line

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
#
# ONE row per setting, the only place it is declared: its TOML name, the Config field,
# the type, the default, a one-line help, the check of its value alone, how SIGHUP
# applies it (None: needs a restart) and its command-line flag, if any. The Config
# dataclass, TOML parsing, to_toml (--print-config), the flags and reloadability are
# all derived from it. Checks that relate several settings stay in Config.validate.

STR, INT, FLOAT, BOOL, SIZE, AUTO_SIZE, CHOICE = (
    "str", "int", "float", "bool", "size", "auto_size", "choice")
_PY_TYPE = {STR: str, INT: int, FLOAT: float, BOOL: bool, SIZE: int, AUTO_SIZE: int | None,
            CHOICE: str}
# Sections whose fields are the bare key (server.host -> host); the others are
# <section>_<key> (nvme.path -> nvme_path).
_BARE_SECTIONS = ("server", "dram", "engine")


@dataclass(frozen=True)
class Flag:
    """A setting's command-line flag. ``help`` may name ``{default}`` (the row's)."""

    option: str
    metavar: str
    help: str


@dataclass(frozen=True)
class Setting:
    section: str
    key: str
    field: str
    kind: str  # STR | INT | FLOAT | BOOL | SIZE | AUTO_SIZE (None = auto) | CHOICE
    default: Any
    help: str
    # the value alone -> None if fine, else the problem (after "<section.key>: ")
    check: Callable[[Any], str | None] | None = None
    choices: tuple[str, ...] = ()  # CHOICE: the allowed values (lower case)
    # how SIGHUP applies a new value (a hook of kvstored/node.py's RELOAD_HOOKS:
    # "live" = read from the config at each use); None = needs a restart
    reload: str | None = None
    flag: Flag | None = None

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"


def _s(section: str, key: str, kind: str, default: Any, help: str, **kw) -> Setting:
    field = kw.pop("field", None) or (key if section in _BARE_SECTIONS else f"{section}_{key}")
    return Setting(section, key, field, kind, default, help, **kw)


# ---- checks of one value (the messages are the daemon's exit-2 lines)

def _positive(v) -> str | None:
    return None if v > 0 else f"must be positive, got {v}"


def _seconds(v) -> str | None:  # also refuses NaN and inf
    return None if math.isfinite(v) and v > 0 else f"must be a positive number of seconds, got {v}"


# gRPC takes its time options as a C int of milliseconds (~24.8 days at most): a larger
# value failed the start with a bare OverflowError
GRPC_MAX_SECONDS = (2**31 - 1) // 1000


def _grpc_seconds(v) -> str | None:
    return _seconds(v) or (None if v <= GRPC_MAX_SECONDS else
                           f"must be at most {GRPC_MAX_SECONDS} s (gRPC's limit), got {v}")


def _port(v) -> str | None:
    return None if 0 <= v <= 65535 else f"{v} is out of range (allowed 0..65535; 0 picks a free port)"


def _not_blank(v) -> str | None:
    return None if v.strip() else "must not be empty (e.g. 127.0.0.1 or 0.0.0.0)"


def _within(lo, hi, unit: str, note: str = "") -> Callable[[Any], str | None]:
    return lambda v: None if lo <= v <= hi else f"{v} is outside {lo}..{hi} {unit}{note}"


def _one_of(*allowed: str) -> Callable[[Any], str | None]:
    return lambda v: None if v in allowed else f"{v!r} is not one of {', '.join(allowed)}"


def _key_area_bytes(v) -> str | None:
    from kvstored.engine.arena import key_width_problem  # (one rule: the arena's)
    return key_width_problem(v)


def _at_most_chars(n: int) -> Callable[[Any], str | None]:
    return lambda v: None if len(v) <= n else f"longer than {n} characters"


_CLUSTER_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_EVENTS_HINT = "use e.g. tcp://127.0.0.1:5557, tcp://*:5557 or ipc:///run/kvstored/events"


def _cluster_name(v) -> str | None:
    if _CLUSTER_NAME_RE.fullmatch(v):
        return None
    return f"{v!r} must be 1-64 characters of letters, digits, '.', '_' or '-'"


def _failure_domain(v) -> str | None:
    if len(v) <= 128 and not any(ord(ch) < 0x20 for ch in v):
        return None
    return f"{v!r} must be at most 128 printable characters"


def _repair_rate(v) -> str | None:
    return None if v >= 1 << 20 else f"{v} bytes/s is below 1MiB/s (repair would never finish)"


def _tls_version(v) -> str | None:
    return None if v in ("1.2", "1.3") else f"{v!r} is not '1.2' or '1.3'"


def _zmq_endpoint(v) -> str | None:
    """"" (off), or a tcp:// (host:port) or ipc:// endpoint."""
    if not v:
        return None
    if not v.startswith(("tcp://", "ipc://")) or len(v) > 256 or any(ord(ch) <= 0x20 for ch in v):
        return f"{v!r} is not a tcp:// or ipc:// endpoint ({_EVENTS_HINT})"
    if v.startswith("tcp://"):
        host, sep, port = v[6:].rpartition(":")
        if not (sep and host and (port == "*" or port.isdigit() and 1 <= int(port) <= 65535)):
            return f"{v!r} needs host:port with a port in 1..65535 ({_EVENTS_HINT})"
    return None


SETTINGS: tuple[Setting, ...] = (
    # [server]
    _s("server", "host", STR, "127.0.0.1", "listen address of both planes", check=_not_blank,
       flag=Flag("--host", "H", "listen address (default {default})")),
    _s("server", "control_port", INT, 7070, "gRPC control port (0 = any free port)",
       check=_port, flag=Flag("--port", "P", "control port (default {default}; 0 = any free)")),
    _s("server", "data_port", INT, 7071, "TCP data port (0 = any free port)", check=_port,
       flag=Flag("--data-port", "D", "data port (default {default}; 0 = any free)")),
    _s("server", "tcp_congestion", STR, "", "congestion control of data sockets ('' = kernel's)",
       flag=Flag("--tcp-congestion", "NAME",
                 "TCP congestion control for data connections, e.g. cubic or bbr")),
    _s("server", "max_connections", INT, 1024, "data connections; the next one gets Unavailable",
       check=_positive, reload="data.max_connections"),
    _s("server", "max_inflight_bytes", SIZE, 256 * MiB,
       "queued response bytes per connection before it stops reading", check=_positive,
       reload="inflight"),
    _s("server", "max_batch_keys", INT, 65536, "keys in one control call", check=_positive,
       reload="live"),
    _s("server", "max_control_value_size", SIZE, 4 * MiB, "largest value over gRPC Put/Get",
       check=_positive),
    _s("server", "drain_timeout", FLOAT, 10.0,
       "seconds SIGTERM waits for in-flight requests before closing", check=_seconds,
       reload="live"),
    _s("server", "max_connections_per_client", INT, 256,
       "data connections from one peer IP (shm: one uid)",
       check=_positive, reload="data.max_per_client"),
    _s("server", "max_control_connections", INT, 1024,
       "gRPC control connections at once; more are closed on accept", check=_positive),
    _s("server", "max_control_rpcs", INT, 1024,
       "gRPC calls served at once (each may hold a max_control_value_size message); more "
       "get RESOURCE_EXHAUSTED (NoSpace)", check=_positive),
    _s("server", "control_streams_per_connection", INT, 0,
       "gRPC calls at once on one control connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS; "
       "more are refused by gRPC); 0 = control_rpcs_per_client's value",
       check=_within(0, 2**31 - 1, "calls")),
    _s("server", "control_rpcs_per_client", INT, 0,
       "gRPC calls at once from one client address, over all its connections; more get "
       "RESOURCE_EXHAUSTED (NoSpace); 0 = half of max_control_rpcs (at least 1)",
       check=_within(0, 2**31 - 1, "calls")),
    _s("server", "control_request_timeout", FLOAT, 30.0,
       "a gRPC call whose request message has not arrived this long after the call opened "
       "is answered DEADLINE_EXCEEDED (it held one of max_control_rpcs)", check=_seconds),
    _s("server", "control_connection_max_age", FLOAT, 300.0,
       "a gRPC control connection is closed this long after it opened (GOAWAY: clients "
       "reconnect by themselves), its calls in progress given 60 s more (or this, if less)",
       check=_grpc_seconds),
    _s("server", "max_pipelined_requests", INT, 1024,
       "unanswered requests per data connection before it stops being read", check=_positive,
       reload="pipelined"),
    # hostile and careless clients (issue 17): what one connection or one client may hold
    _s("server", "max_queued_response_bytes", SIZE, 1 * MiB,
       "copied (non-arena) response bytes unsent per connection", check=_positive),
    _s("server", "max_queued_responses", INT, 16384, "response frames unsent per connection",
       check=_positive),
    _s("server", "write_stall_timeout", FLOAT, 30.0,
       "a connection that takes none of its responses this long is closed", check=_seconds),
    _s("server", "idle_timeout", FLOAT, 600.0,
       "a data connection with no traffic this long is closed", check=_grpc_seconds),
    _s("server", "max_reserved_bytes_per_connection", SIZE, 1 * GiB,
       "unfinished puts of one connection", check=_positive),
    _s("server", "max_reserved_bytes_per_client", SIZE, 4 * GiB,
       "unfinished puts of one client (peer IP, or uid on shm); <= dram.size / 2",
       check=_positive),
    _s("server", "put_stall_timeout", FLOAT, 2.0,
       "a put's payload may pause this long (and no byte arrived yet)", check=_seconds),
    _s("server", "min_put_rate", SIZE, 1 * MiB,
       "bytes/s: a put must finish within put_stall_timeout + size / rate", check=_positive),
    _s("server", "handshake_timeout", FLOAT, 3.0,
       "TLS data port: seconds to complete the handshake", check=_seconds),
    _s("server", "max_handshakes_per_client", INT, 32,
       "TLS data port: handshakes in progress per peer IP", check=_positive),
    # [dram]
    _s("dram", "size", AUTO_SIZE, None,
       "arena size; auto = 25 % of available memory, 64 MiB - 4 GiB", field="dram_size",
       flag=Flag("--dram-size", "SIZE",
                 "DRAM arena size, or 'auto' (25%% of available memory, at most 4GiB)")),
    _s("dram", "slab_size", SIZE, 64 * MiB, "allocation unit of a size class; >= max_value_size",
       check=_positive, flag=Flag("--slab-size", "SIZE", "slab size (default {default})")),
    _s("dram", "max_value_size", SIZE, 64 * MiB, "largest object", check=_positive,
       flag=Flag("--max-value-size", "SIZE",
                 "largest value accepted (default {default}; <= slab size)")),
    _s("dram", "high_watermark", FLOAT, 0.95,
       "with an NVMe tier, demotion starts above this fraction of the arena",
       reload="store"),
    _s("dram", "low_watermark", FLOAT, 0.90, "... and demotes down to this one", reload="store"),
    _s("dram", "hugepages", BOOL, True, "use reserved hugetlb pages when enough are free"),
    _s("dram", "prefault", BOOL, True,
       "fault the arena in at start (background) so first puts are not 14x slower"),
    _s("dram", "index", CHOICE, "auto",
       "auto | packed | dict: the Store's index (packed: native records, ~3.7x fewer bytes "
       "per DRAM-resident object, ~7.5x per NVMe-only one, whose key stays on NVMe; "
       "auto = packed when kvstored._index is built)",
       choices=INDEX_KINDS, check=_one_of(*INDEX_KINDS)),
    _s("dram", "key_area_bytes", INT, 40,
       "bytes per arena slot for its object's key (a length byte + the key), kept there "
       "instead of in daemon RAM by the packed index; longer keys stay in RAM; 0 = none",
       check=_key_area_bytes),
    # [nvme] (off while nvme.path is empty; size and paths are checked only when it is on)
    _s("nvme", "path", STR, "", "file or block device of the NVMe tier",
       flag=Flag("--nvme-path", "PATH", "file or block device of the NVMe tier")),
    _s("nvme", "size", SIZE, 0, "bytes of it to use; a multiple of 4 KiB",
       flag=Flag("--nvme-size", "SIZE", "size of the NVMe tier")),
    _s("nvme", "region_size", SIZE, 128 * MiB,
       "unit of allocation and reclaim, 16-256 MiB; holds the largest object plus 20 KiB",
       flag=Flag("--nvme-region-size", "SIZE",
                 "NVMe region size, 16MiB-256MiB (default {default})")),
    _s("nvme", "admission", STR, "all", "which evicted objects are demoted: all | read"),
    _s("nvme", "write_budget_per_hour", SIZE, 0, "bytes demoted per hour; 0 = unlimited"),
    _s("nvme", "io_backend", STR, "auto", "auto | io_uring | threads"),
    _s("nvme", "queue_depth", INT, 32, "I/Os in flight on the device"),
    _s("nvme", "flush_on_shutdown", BOOL, True, "SIGTERM writes DRAM-only objects to NVMe"),
    _s("nvme", "sync", STR, "interval",
       "none | interval | always: fdatasync for power-loss durability"),
    _s("nvme", "sync_interval", FLOAT, 1.0, "seconds between fdatasyncs with sync = interval"),
    # [shm] same-host shared-memory channel (a Unix socket)
    _s("shm", "enabled", BOOL, True, "offer the same-host shared-memory path"),
    _s("shm", "socket_path", STR, "",
       "its Unix socket; '' = $RUNTIME_DIRECTORY or <tmpdir>, kvstored-<control port>.sock"),
    _s("shm", "allowed_uids", STR, "",
       "comma-separated uids allowed besides the daemon's own and root"),
    _s("shm", "lease_ttl", FLOAT, 30.0, "seconds a get's view stays protected unless released",
       check=_seconds),
    # [engine] (seconds)
    _s("engine", "reservation_timeout", FLOAT, 30.0,
       "seconds a put may take to deliver its payload", check=_seconds, reload="store"),
    _s("engine", "put_wait_timeout", FLOAT, 2.0, "seconds a put waits for space before NoSpace",
       check=_seconds, reload="store"),
    _s("engine", "max_pin_ttl", FLOAT, 86400.0, "longest pin lease, seconds", check=_seconds,
       reload="store"),
    # [log]
    _s("log", "level", CHOICE, "info", "debug | info | warning | error",
       choices=LOG_LEVELS, check=_one_of(*LOG_LEVELS), reload="log_level",
       flag=Flag("--log-level", "L", f"one of {', '.join(LOG_LEVELS)} (default {{default}})")),
    _s("log", "format", CHOICE, "kv", "kv (key=value, logfmt) or json (one object per line)",
       choices=LOG_FORMATS, check=_one_of(*LOG_FORMATS), reload="log_format",
       flag=Flag("--log-format", "F", "kv (key=value, default) or json")),
    # [metrics] Prometheus endpoint (/metrics, /healthz, /readyz)
    _s("metrics", "enabled", BOOL, True, "serve /metrics, /healthz, /readyz over HTTP"),
    _s("metrics", "host", STR, "127.0.0.1", "listen address of the metrics endpoint"),
    _s("metrics", "port", INT, 9090, "its port (0 = any free port)", check=_port,
       flag=Flag("--metrics-port", "P",
                 "Prometheus /metrics port (default {default}; 0 = any free)")),
    # [tls] both planes; empty cert_file = plaintext
    _s("tls", "cert_file", STR, "", "PEM certificate (chain) of both planes; TLS on when set",
       reload="tls_file"),
    _s("tls", "key_file", STR, "", "its private key", reload="tls_file"),
    _s("tls", "client_ca_file", STR, "", "CA of client certificates; set = mutual TLS",
       reload="tls_file"),
    _s("tls", "min_version", STR, "1.2", "1.2 or 1.3 (data path; gRPC accepts both)",
       check=_tls_version),
    # [auth] per-namespace tokens (kvstored/auth.py has the file format)
    _s("auth", "enabled", BOOL, False, "require a token on both planes"),
    _s("auth", "tokens_file", STR, "", "TOML file of [[token]] entries", reload="tokens_file"),
    # [node]
    _s("node", "id", STR, "", "node name; '' = <hostname>:<control_port>"),
    # [cluster] membership (kvstored/cluster/membership.py); off = standalone node
    _s("cluster", "enabled", BOOL, False, "join a cluster; off = standalone"),
    _s("cluster", "name", STR, "default", "etcd keys live under /kvstored/<name>/",
       check=_cluster_name),
    _s("cluster", "etcd_endpoints", STR, "127.0.0.1:2379",
       "comma-separated etcd host:port list, tried in turn"),
    _s("cluster", "lease_ttl", INT, 5, "seconds a dead node stays listed (etcd lease TTL)",
       check=_within(2, 3600, "seconds", " (etcd's minimum lease is about 2s)")),
    _s("cluster", "failure_domain", STR, "", "rack or zone label; '' = none",
       check=_failure_domain),
    _s("cluster", "static_peers", STR, "", "comma-separated control host:port; set = no etcd"),
    _s("cluster", "policies", STR, "",
       "namespace=policy pairs ('*' = default), e.g. '*=none, llama=ec:4+2'"),
    _s("cluster", "repair", BOOL, True, "run the repair agent (verify, rebuild, move records)"),
    _s("cluster", "repair_delay", FLOAT, 10.0, "seconds a membership change settles before repair",
       check=_within(0, 86400, "seconds")),
    _s("cluster", "repair_interval", FLOAT, 300.0, "a full pass at least this often (seconds)",
       check=_within(1, 86400, "seconds")),
    _s("cluster", "repair_rate", SIZE, 256 << 20, "bytes/s of records repair may write",
       check=_repair_rate),
    _s("cluster", "repair_yield_lag", FLOAT, 0.002,
       "repair yields while clients wait and the event loop lags over this (seconds; 0 = never)",
       check=_within(0, 1, "seconds")),
    _s("cluster", "repair_min_pace", FLOAT, 0.5,
       "the least share of its time repair works while yielding (its floor)",
       check=_within(0.05, 1, "of its time")),
    # off by default: measured at load 2-37 it made repair with a reader ~1.5x as long for
    # no clear gain in the reader's p99 (benchmarks/RESULTS.md, session 15)
    _s("cluster", "repair_hold_requests", BOOL, False,
       "while clients wait, peers' repair requests here start one per 5 ms (each waits <= 0.25 s)"),
    _s("cluster", "delete_horizon", FLOAT, 86400.0,
       "seconds a node remembers the keys deleted on it (kvstored/engine/fence.py)",
       check=_within(60, 30 * 86400, "seconds")),
    _s("cluster", "delete_history_keys", INT, 2_000_000,
       "at most this many remembered deletes (about 25-50 bytes each)",
       check=_within(1000, 200_000_000, "keys")),
    _s("cluster", "delete_history_file", STR, "",
       "where the delete history is kept across restarts and crashes (its journals beside it); "
       "'' = <nvme.path>.deletes, else $STATE_DIRECTORY/kvstored-<control port>.deletes, else "
       "memory only; 'off' = not kept"),
    _s("cluster", "token", STR, "", "token the repair agent presents to peers when auth is on"),
    _s("cluster", "etcd_username", STR, "", "etcd user when etcd authentication is on"),
    _s("cluster", "etcd_password_file", STR, "",
       "file holding its password (not the password: config files get shared)"),
    # [events] KV events for routers in vLLM's format (kvstored/events.py); "" = off
    _s("events", "endpoint", STR, "", "ZMQ PUB address the node binds, e.g. tcp://127.0.0.1:5557",
       check=_zmq_endpoint,
       flag=Flag("--kv-events", "ENDPOINT", "publish KV events for routers (vLLM's format) on "
                 "this ZMQ endpoint, e.g. tcp://127.0.0.1:5557 (default off)")),
    _s("events", "replay_endpoint", STR, "",
       "ROUTER for late subscribers; '' = endpoint port + 1, 'off' = none",
       check=lambda v: None if v == "off" else _zmq_endpoint(v)),
    _s("events", "replay_buffer", INT, 10000, "batches kept for replay",
       check=_within(1, 1_000_000, "batches")),
    _s("events", "topic", STR, "", "first frame of every message (vLLM's default: empty)",
       check=_at_most_chars(256)),
    _s("events", "medium", STR, "EXTERNAL", "BlockStored/BlockRemoved medium ('' = None)",
       check=_at_most_chars(32)),
    _s("events", "block_size", INT, 0, "tokens per block announced in BlockStored (0 = unknown)",
       check=_within(0, 1 << 20, "tokens")),
    _s("events", "max_subscribers", INT, 64,
       "connections at once to the events endpoint (and as many to the replay endpoint); "
       "more are closed on accept", check=_within(1, 65536, "connections")),
    _s("events", "max_subscribers_per_client", INT, 0,
       "connections at once from one source address (ipc: one uid) to each endpoint; more are "
       "closed on accept; 0 = a quarter of max_subscribers (at least 1)",
       check=_within(0, 65536, "connections")),
    _s("events", "max_replays", INT, 16,
       "replays in progress at once (each holds up to 1 MiB queued); more requests get the "
       "end marker alone", check=_within(1, 1024, "replays")),
    _s("events", "max_replays_per_client", INT, 4,
       "replays in progress at once for one source address (ipc: one uid); more get the end "
       "marker alone; at most max_replays", check=_within(1, 1024, "replays")),
    _s("events", "replay_min_rate", SIZE, 64 * KiB,
       "bytes per second a replay connection must take, over each replay_rate_window, while "
       "bytes wait for it; one that takes fewer is closed (0: only one taking none)",
       check=_within(0, 1 << 30, "bytes per second")),
    _s("events", "replay_rate_window", FLOAT, 30.0,
       "seconds over which a replay connection's rate is measured",
       check=_within(0.1, 3600, "seconds")),
)
SECTIONS = tuple(dict.fromkeys(s.section for s in SETTINGS))
_BY_NAME = {s.name: s for s in SETTINGS}
_BY_FIELD = {s.field: s for s in SETTINGS}
RELOADABLE = {s.field: s.reload for s in SETTINGS if s.reload is not None}


def default(field: str) -> Any:
    """The default of the setting whose Config field is ``field``: what the engine's
    StoreLimits and the data plane's DataLimits fall back to without a config, so each
    default is declared once, in its row. This module imports nothing of kvstored, so
    any layer may read it."""
    try:
        return _BY_FIELD[field].default
    except KeyError:
        raise KeyError(f"no setting has the field {field!r}") from None


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

    if s.kind in (STR, CHOICE):
        if not isinstance(v, str):
            raise wrong("a string")
        # choices are case-insensitive (Python's logging names its levels in upper case)
        return v.lower() if s.kind == CHOICE else v
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
    if s.kind in (SIZE, AUTO_SIZE):
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
