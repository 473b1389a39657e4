"""Daemon configuration: defaults < TOML file < command-line flags.

The settings themselves (names, types, defaults, the check of each value, reload
hooks, flags) are the rows of ``kvstored.settings.SETTINGS``; this module derives
from them the :class:`Config` dataclass, loading (TOML file, flag overrides), the
checks that relate several settings, ``to_toml`` (``--print-config``) and the
command line. All problems surface as a :class:`ConfigError` whose message is a
single line naming the setting, the bad value and what is allowed, so the daemon
can print it and exit 2.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import tomllib
from dataclasses import field as dataclass_field
from dataclasses import fields, make_dataclass
from typing import Any, NoReturn

from kvstored import __version__
from kvstored.settings import (_BY_FIELD, _BY_NAME, _PY_TYPE, AUTO_SIZE, CHOICE,  # noqa: F401
                               INDEX_KINDS, INT, LOG_FORMATS, LOG_LEVELS, RELOADABLE, SECTIONS,
                               SETTINGS, SIZE, ConfigError, GiB, KiB, MiB, Setting, TiB, _coerce,
                               _toml_value, _type_name, _unknown, format_size, parse_size)

SLAB_ALIGN = 4096  # the arena's slot alignment; slabs must be cut into whole pages
# Fields whose default is worked out on this host (auto-sized arena, host name): a reload
# that only re-derives them changes nothing, and --print-config keeps them unresolved
HOST_DERIVED = ("dram_size", "node_id")

# Auto-sized arena: a quarter of available memory, within these bounds.
AUTO_DRAM_FRACTION = 4
AUTO_DRAM_MAX = 4 * GiB
AUTO_DRAM_MIN = 64 * MiB

MEMINFO_PATH = "/proc/meminfo"
CGROUP_MEMORY_MAX = "/sys/fs/cgroup/memory.max"  # cgroup v2: this process's memory limit
TCP_CC_PATH = "/proc/sys/net/ipv4/tcp_available_congestion_control"


# ---------------------------------------------------------------- host probes

def _meminfo(field: str) -> int | None:
    """A /proc/meminfo field in bytes, or None where it is unreadable."""
    try:
        with open(MEMINFO_PATH) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * KiB  # the kernel reports kB (= KiB)
    except (OSError, ValueError, IndexError):
        pass
    return None


def mem_available() -> int | None:
    """MemAvailable in bytes, or the cgroup's memory.max when lower (in a container
    /proc/meminfo is the host's); None where neither can be read."""
    found = [n for n in (_meminfo("MemAvailable"), _cgroup_memory_max()) if n]
    return min(found) if found else None


def mem_limit() -> int | None:
    """The most memory this process can ever have: MemTotal, or the cgroup's memory.max
    (a container's limit) when lower; None where neither can be read."""
    limits = [n for n in (_meminfo("MemTotal"), _cgroup_memory_max()) if n]
    return min(limits) if limits else None


def _cgroup_memory_max() -> int | None:
    try:
        with open(CGROUP_MEMORY_MAX) as f:
            text = f.read().strip()
        return int(text) if text.isdigit() else None  # "max" = no limit
    except OSError:
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
        limit = mem_limit()
        if limit is not None and self.dram_size > limit:
            # the prefault (or the first puts) would have the kernel's OOM killer end the
            # daemon, or another process, instead of a clear refusal now
            raise ConfigError(f"dram.size ({format_size(self.dram_size)}) is more than this "
                              f"host's memory ({limit / GiB:.1f} GiB: MemTotal or the cgroup's "
                              "memory.max); use a smaller size or auto")
        if self.dram_size < self.slab_size:
            raise ConfigError(f"dram.size ({format_size(self.dram_size)}) must hold at least "
                              f"one slab (dram.slab_size = {format_size(self.slab_size)})")

        env_index = os.environ.get("KVSTORED_INDEX")  # engine/entries.py: overrides dram.index
        if env_index and env_index not in INDEX_KINDS:
            raise ConfigError(f"KVSTORED_INDEX (environment, overrides dram.index): {env_index!r} "
                              f"is not one of {', '.join(INDEX_KINDS)}")
        self._validate_nvme()
        self.shm_allowed_uid_set()
        self._validate_security()
        low, high = self.low_watermark, self.high_watermark
        if not 0 < low <= high <= 1:  # also false for NaN
            raise ConfigError(f"dram.low_watermark ({low}) and dram.high_watermark ({high}) "
                              "must satisfy 0 < low_watermark <= high_watermark <= 1")
        if self.control_port and self.control_port == self.data_port:
            raise ConfigError(f"server.data_port: {self.data_port} is also server.control_port; "
                              "the planes need two ports (or 0 for any free one)")
        if self.metrics_enabled and not self.metrics_host.strip():
            raise ConfigError("metrics.host: must not be empty (e.g. 127.0.0.1 or 0.0.0.0)")
        if self.metrics_enabled and self.metrics_port and self.metrics_port in (
                self.control_port, self.data_port):
            raise ConfigError(f"metrics.port: {self.metrics_port} is also the control or data "
                              "port; pick another (or 0 for any free port)")
        if not self.node_id:
            self.node_id = f"{socket.gethostname()}:{self.control_port}"
        if self.control_streams_per_connection > self.max_control_rpcs:
            raise ConfigError(
                f"server.control_streams_per_connection ({self.control_streams_per_connection}) "
                f"must be at most server.max_control_rpcs ({self.max_control_rpcs}): one "
                "connection could take every call's place (0 = server.control_rpcs_per_client)")
        if self.control_rpcs_per_client > self.max_control_rpcs:
            raise ConfigError(
                f"server.control_rpcs_per_client ({self.control_rpcs_per_client}) must be at "
                f"most server.max_control_rpcs ({self.max_control_rpcs}): one client could "
                "take every call's place (0 = half of it)")
        self._validate_cluster()
        self._validate_events()
        return self

    def control_streams(self) -> int:
        """Calls at once on one control connection (server.control_streams_per_connection,
        0 = what one client address may run, control_calls_per_client). Not less by
        default: an SDK client runs all its calls on one connection, and gRPC refuses
        (REFUSED_STREAM: UNAVAILABLE, "daemon unreachable" to the SDK) the calls a client
        opens at the cap as an earlier one ends (10-85 of 400 at once, with a quarter)."""
        return self.control_streams_per_connection or self.control_calls_per_client()

    def control_calls_per_client(self) -> int:
        """Calls at once from one client address (server.control_rpcs_per_client, 0 = half
        of server.max_control_rpcs)."""
        return self.control_rpcs_per_client or max(1, self.max_control_rpcs // 2)

    def events_per_client(self) -> int:
        """Connections at once from one source to each events endpoint
        (events.max_subscribers_per_client, 0 = a quarter of events.max_subscribers)."""
        return self.events_max_subscribers_per_client or max(1, self.events_max_subscribers // 4)

    def _validate_events(self) -> None:
        """[events] beyond each value's own check."""
        # (the same tcp endpoint with port "*" is two binds of a free port each: they differ)
        if (self.events_endpoint and self.events_endpoint == self.events_replay_endpoint
                and not self.events_endpoint.endswith(":*")):
            raise ConfigError("events.replay_endpoint: must differ from events.endpoint")
        if self.events_max_subscribers_per_client > self.events_max_subscribers:
            raise ConfigError(
                f"events.max_subscribers_per_client ({self.events_max_subscribers_per_client}) "
                f"must be at most events.max_subscribers ({self.events_max_subscribers}) "
                "(0 = a quarter of it)")
        if self.events_max_replays_per_client > self.events_max_replays:
            raise ConfigError(
                f"events.max_replays_per_client ({self.events_max_replays_per_client}) "
                f"must be at most events.max_replays ({self.events_max_replays})")

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
        # the tier's own values are checked with the tier off too: a typo waits for the day
        # nvme.path (or --nvme-path) turns it on otherwise
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
        if self.nvme_region_size % 4096 or not 16 * MiB <= self.nvme_region_size <= 256 * MiB:
            raise ConfigError(f"nvme.region_size: {format_size(self.nvme_region_size)} must be a "
                              "multiple of 4KiB between 16MiB and 256MiB")
        if not self.nvme_path:
            return
        if self.nvme_size <= 0:
            raise ConfigError("nvme.size: set a size for the NVMe tier (e.g. 64GiB) when nvme.path is set")
        if self.nvme_size % 4096:
            raise ConfigError(f"nvme.size: {self.nvme_size} is not a multiple of 4096 (O_DIRECT alignment)")
        if self.nvme_size < self.nvme_region_size + MiB:
            raise ConfigError(f"nvme.size ({format_size(self.nvme_size)}) is below one region "
                              f"({format_size(self.nvme_region_size)}) plus the 1MiB header area")
        if self.nvme_region_size < self.max_value_size + 20 * KiB:  # engine.nvme.REGION_OVERHEAD
            raise ConfigError(f"nvme.region_size ({format_size(self.nvme_region_size)}) must hold "
                              f"the largest object (dram.max_value_size = {format_size(self.max_value_size)}) "
                              "plus 20KiB of headers and summary")
        parent = os.path.dirname(os.path.abspath(self.nvme_path))
        target = self.nvme_path if os.path.exists(self.nvme_path) else parent
        if not os.path.exists(target):
            raise ConfigError(f"nvme.path: directory {parent} does not exist")
        if not os.access(target, os.W_OK):
            try:
                read_only = bool(os.statvfs(target).f_flag & os.ST_RDONLY)
            except OSError:
                read_only = False
            raise ConfigError(f"nvme.path: {target} is " + (
                "on a read-only file system" if read_only else "not writable by this user"))

    def to_toml(self, redact: bool = False, unresolved: set[str] = frozenset()) -> str:
        """The config as TOML, in the file layout; ``load_config`` reads it back equal.
        ``redact``: credentials (``cluster.token``) as ``[REDACTED]`` (the /config page).
        ``unresolved``: fields of HOST_DERIVED written as their default ("auto", "") with
        this host's value in a comment, so the file means the same on another host."""
        from kvstored.logs import REDACTED, is_sensitive  # lazy: keep config importable alone
        lines = ["# kvstored configuration (sizes are binary: 1GiB = 1024MiB)"]
        for section in SECTIONS:
            lines += ["", f"[{section}]"]
            for s in SETTINGS:
                if s.section == section:
                    v = getattr(self, s.field)
                    shown = (f'"{REDACTED}"' if redact and v and is_sensitive(s.name)
                             else _toml_value(s, v))
                    if s.field in unresolved:
                        shown = f"{_toml_value(s, s.default)}  # on this host: {shown}"
                    lines.append(f"{s.key} = {shown}")
        return "\n".join(lines) + "\n"

    def engine_limits(self):
        """The engine's StoreLimits for this config (auto dram size resolved if still unset)."""
        from kvstored.engine.store import StoreLimits  # lazy: keep config importable alone

        # Every StoreLimits field is a setting of the same name: a field added there is
        # passed through here without another list to keep in step.
        values = {f.name: getattr(self, f.name) for f in fields(StoreLimits) if f.name != "dram_size"}
        dram = self.dram_size if self.dram_size is not None else auto_dram_size(self.slab_size)
        return StoreLimits(dram_size=dram, **values)


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


class _ArgParser(argparse.ArgumentParser):
    """A bad flag is a start-up failure like any other: one line, ``kvstored: error: ...``,
    exit 2 (argparse wrote its six-line usage first, which a journal shows as noise)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists the flags)\n")


def build_arg_parser() -> argparse.ArgumentParser:
    p = _ArgParser(
        prog="kvstored", description="KV-block storage daemon.",
        epilog="Flags override the config file, which overrides built-in defaults. "
               "Sizes take binary units: 64KiB, 512MiB, 2GiB (K/KB/M/MB/G/GB are 1024-based too).")
    p.add_argument("--config", metavar="FILE", help="TOML config file")
    for s in SETTINGS:  # one flag per row that has one
        if s.flag is not None:
            p.add_argument(s.flag.option, metavar=s.flag.metavar, help=_flag_help(s),
                           **_FLAG_TYPE.get(s.kind, {}), **_flag_choices(s))
    p.add_argument("--ready-file", metavar="PATH",
                   help="file written (atomically: pid, node id, ports) once the daemon is ready: "
                        "listening, arena prefaulted (for supervisors and tests)")
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


def unresolved_fields(path: str | os.PathLike | None, overrides: dict[str, Any] | None) -> set[str]:
    """Fields of HOST_DERIVED that the file and the flags leave to this host (unset, or
    set to their default: ``size = "auto"``, ``id = ""``)."""
    values = _file_values(_read_toml(path)) if path else {}
    values.update({f: _coerce(_BY_FIELD[f], v) for f, v in (overrides or {}).items()
                   if v is not None and f in _BY_FIELD})
    return {f for f in HOST_DERIVED if values.get(f, _BY_FIELD[f].default) == _BY_FIELD[f].default}


def fail(msg: str) -> NoReturn:
    """Print ``kvstored: error: <msg>`` to stderr and exit 2, like argparse does."""
    print(f"kvstored: error: {msg}", file=sys.stderr)
    sys.exit(2)


# SETTINGS, Setting, RELOADABLE, ConfigError, parse_size and format_size live in
# kvstored/settings.py and are named here too, for the callers of this module.
__all__ = ["Config", "ConfigError", "LOG_FORMATS", "LOG_LEVELS", "RELOADABLE", "SETTINGS", "Setting",
           "build_arg_parser", "config_from_args", "explicit_fields", "fail", "flag_overrides",
           "format_size", "load_config", "parse_size", "unresolved_fields"]
