"""Daemon configuration: defaults < TOML file < command-line flags.

Every setting is declared once, as a row of the table ``SETTINGS`` below: its
TOML name (``section.key``), its flat field on :class:`Config`, type, default,
help, the check of its value, whether SIGHUP applies it and its flag. The
Config dataclass, loading, type checking, ``to_toml`` (``--print-config``), the
command-line flags and reloadability are derived from the table. All problems surface
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
from dataclasses import dataclass, make_dataclass
from dataclasses import field as dataclass_field
from decimal import Decimal
from typing import Any, Callable, NoReturn

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


def _port(v) -> str | None:
    return None if 0 <= v <= 65535 else f"{v} is out of range (allowed 0..65535; 0 picks a free port)"


def _not_blank(v) -> str | None:
    return None if v.strip() else "must not be empty (e.g. 127.0.0.1 or 0.0.0.0)"


def _within(lo, hi, unit: str, note: str = "") -> Callable[[Any], str | None]:
    return lambda v: None if lo <= v <= hi else f"{v} is outside {lo}..{hi} {unit}{note}"


def _one_of(*allowed: str) -> Callable[[Any], str | None]:
    return lambda v: None if v in allowed else f"{v!r} is not one of {', '.join(allowed)}"


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
    _s("server", "max_connections_per_client", INT, 256, "data connections from one peer IP",
       check=_positive, reload="data.max_per_client"),
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
       "a data connection with no traffic this long is closed", check=_seconds),
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
    # [nvme] (off while nvme.path is empty; its values are checked only when it is on)
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
)
SECTIONS = tuple(dict.fromkeys(s.section for s in SETTINGS))
_BY_NAME = {s.name: s for s in SETTINGS}
_BY_FIELD = {s.field: s for s in SETTINGS}
RELOADABLE = {s.field: s.reload for s in SETTINGS if s.reload is not None}


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

class _ConfigRules:
    """What a Config does beyond holding values (the fields come from SETTINGS): the
    checks that relate several settings, derived values, TOML output."""

    def validate(self) -> Config:
        """Normalise field types, fill auto values, then check ranges; returns self.

        Raises ConfigError on the first problem found.
        """
        for s in SETTINGS:
            setattr(self, s.field, _coerce(s, getattr(self, s.field)))
        for s in SETTINGS:  # each value alone (the row's check); then what relates them
            v = getattr(self, s.field)
            problem = s.check(v) if s.check is not None and v is not None else None
            if problem:
                raise ConfigError(f"{s.name}: {problem}")

        if self.tcp_congestion:
            known = available_congestion_controls()
            # unreadable list (not Linux, no /proc): let the socket option report it later
            if known is not None and self.tcp_congestion not in known:
                raise ConfigError(f"server.tcp_congestion: {self.tcp_congestion!r} is not "
                                  f"available on this host (available: {', '.join(known)})")

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
        self._validate_security()
        low, high = self.low_watermark, self.high_watermark
        if not 0 < low <= high <= 1:  # also false for NaN
            raise ConfigError(f"dram.low_watermark ({low}) and dram.high_watermark ({high}) "
                              "must satisfy 0 < low_watermark <= high_watermark <= 1")
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
        """[events] beyond each value's own check."""
        if self.events_endpoint and self.events_endpoint == self.events_replay_endpoint:
            raise ConfigError("events.replay_endpoint: must differ from events.endpoint")

    def events_replay(self) -> str:
        """The replay endpoint in effect ("" = none)."""
        if self.events_replay_endpoint == "off" or not self.events_endpoint:
            return ""
        if self.events_replay_endpoint:
            return self.events_replay_endpoint
        from kvstored.events import default_replay_endpoint  # lazy: keep config importable alone
        return default_replay_endpoint(self.events_endpoint)

    def _validate_cluster(self) -> None:
        """[cluster]: address lists and policies parse; etcd mode has its client library."""
        self.cluster_endpoints()
        self.cluster_peers()
        self.cluster_policy_table()
        if bool(self.cluster_etcd_username) != bool(self.cluster_etcd_password_file):
            raise ConfigError("cluster.etcd_username and cluster.etcd_password_file: set both "
                              "(etcd authentication) or neither")
        if self.cluster_etcd_password_file:
            self.cluster_etcd_password()
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


# The dataclass itself: one field per row of SETTINGS, with the row's default.
Config = make_dataclass(
    "Config", [(s.field, _PY_TYPE[s.kind], dataclass_field(default=s.default)) for s in SETTINGS],
    bases=(_ConfigRules,), namespace={"__module__": __name__, "__doc__": (
        "The daemon's settings as flat fields (see SETTINGS); validate() checks them.")})


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

# flag dest -> Config field, from the rows that have a flag
_FLAG_FIELDS = {s.flag.option[2:].replace("-", "_"): s.field for s in SETTINGS if s.flag}


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _dram_size_arg(text: str) -> str | int:
    return "auto" if text.strip().lower() == "auto" else _size_arg(text)


_FLAG_TYPE = {INT: {"type": int}, SIZE: {"type": _size_arg}, AUTO_SIZE: {"type": _dram_size_arg},
              CHOICE: {"type": str.lower}}


def _flag_help(s: Setting) -> str:
    shown = format_size(s.default) if s.kind == SIZE else s.default
    return s.flag.help.format(default=shown)


def _flag_choices(s: Setting) -> dict[str, Any]:
    return {"choices": s.choices} if s.choices else {}


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvstored", description="KV-block storage daemon.",
        epilog="Flags override the config file, which overrides built-in defaults. "
               "Sizes take binary units: 64KiB, 512MiB, 2GiB (K/KB/M/MB/G/GB are 1024-based too).")
    p.add_argument("--config", metavar="FILE", help="TOML config file")
    for s in SETTINGS:  # one flag per row that has one
        if s.flag is not None:
            p.add_argument(s.flag.option, metavar=s.flag.metavar, help=_flag_help(s),
                           **_FLAG_TYPE.get(s.kind, {}), **_flag_choices(s))
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


__all__ = ["Config", "ConfigError", "RELOADABLE", "SETTINGS", "Setting", "build_arg_parser", "config_from_args",
           "explicit_fields", "fail", "flag_overrides", "format_size", "load_config", "parse_size"]
