"""``kvstore-cli``: inspect and poke a kvstored from the shell.

    kvstore-cli -a 127.0.0.1:7070 status
    kvstore-cli put ./block.bin --key blk0
    kvstore-cli get blk0 -o - | xxd | head
    kvstore-cli bench --size 1MiB --count 64 --op both
    kvstore-cli nodes                      # members, flags, per-node repair, policies, epoch
    kvstore-cli drain node-b --wait        # empty node-b, then say it is safe to stop
    kvstore-cli policy set llama ec:4+2    # also: policy ls, policy rm NAMESPACE

Every command is a thin wrapper over the blocking :class:`kvstore.Client`, so what
the CLI sees is what an application sees. Output is aligned text for people, or
one JSON document on stdout with ``--json`` for scripts. Long commands (bench,
drain --wait) show a progress line on stderr when it is a terminal (``--progress``
forces it, ``--no-progress`` drops it); stdout only ever carries the result.

Data commands use TCP unless ``--shm`` is given: the same-host shared-memory path
maps and prefaults the daemon's whole arena when it connects (~0.2 s per GiB), which
a one-shot command never wins back. put, get and bench say which one they used.

Exit codes: 0 ok; 1 the store (or a local file) reported an error; 2 usage error;
3 the daemon is unreachable (connection refused is reported at once, not after
--timeout), did not answer in time, or offers no shm path to ``--shm``. ``exists``
and ``lookup`` exit 0 whatever they find: their answer is data, not success or failure.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import secrets
import shutil
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

from . import __version__, errors
from ._common import TLSConfig
from .client import Client
from .wire import key_bytes

PROG = "kvstore-cli"
DEFAULT_ADDRESS = "127.0.0.1:7070"
DEFAULT_NAMESPACE = "default"

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2  # argparse's own convention
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130

# Prefix of the keys `bench` writes; a random run id below it keeps concurrent runs
# (and real data) apart, so the clean-up deletes only what this run wrote.
BENCH_PREFIX = "kvstore-cli-bench"

# `nodes` asks every member for its own repair progress: an unreachable member costs at
# most this long (the members are asked in parallel)
PROBE_TIMEOUT = 3.0
# `drain --wait`: how often the draining node is polled, and how long by default
DRAIN_POLL_SECONDS = 0.5
DRAIN_WAIT_TIMEOUT = 600.0


# ---------------------------------------------------------------- formatting

def human_size(n: float) -> str:
    """``1536 -> "1.5 KiB"``: binary units, like the daemon's configuration."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    """Short spans (latencies) with a unit that keeps 2-3 significant digits."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"  # ASCII "us": stdout may not be UTF-8
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def human_age(seconds: float) -> str:
    """Long spans (uptime, object age): the two largest units are enough."""
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    s = int(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if s >= size or parts:
            parts.append(f"{s // size}{unit}")
            s %= size
    return " ".join(parts[:2])


_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(?:i?b)?\s*", re.IGNORECASE)
_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}


def parse_size(text: str) -> int:
    """``"64KiB"``, ``"1M"``, ``"4096"`` -> bytes. All units binary (K = KB = KiB),
    matching kvstored's own size settings so the same strings mean the same sizes."""
    m = _SIZE_RE.fullmatch(text)
    if not m:
        raise argparse.ArgumentTypeError(f"cannot parse {text!r} as a size (e.g. 4096, 64KiB, 1MiB)")
    n = float(m.group(1)) * (1 << _SHIFT[m.group(2).lower()])
    if n < 1 or n != int(n):
        raise argparse.ArgumentTypeError(f"size {text!r} must be a whole number of bytes >= 1")
    return int(n)


def _positive(kind: type) -> Callable[[str], float]:
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        if not (v > 0 and math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
        return v
    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def _address(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return text


def table(header: Sequence[str], rows: Sequence[Sequence], right: Sequence[int] = ()) -> str:
    """Columns padded to their widest cell; numeric columns (``right``) right-aligned."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for r in cells:
        line = "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(r, widths)))
        lines.append(line.rstrip())
    return "\n".join(lines)


def fields(pairs: Sequence[tuple[str, object]]) -> str:
    """``label  value`` lines with the values lined up."""
    w = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in pairs)


def emit_json(doc) -> None:
    json.dump(doc, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams (tests, daemons)
        return False


class Progress:
    """The progress line of a long command (bench, drain --wait), always on stderr so
    that stdout keeps only the result (--json: one document).

    On a terminal the line is rewritten in place, at most every TTY_INTERVAL seconds,
    and erased by ``done()``. Forced on elsewhere (--progress into a pipe or a log) it
    prints whole lines instead: a changed text at most every LINE_INTERVAL seconds, an
    unchanged one every LINE_REPEAT seconds, so a log stays short but shows it is alive.
    """

    TTY_INTERVAL = 0.1
    LINE_INTERVAL = 1.0
    LINE_REPEAT = 10.0

    def __init__(self, mode: bool | None, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _isatty(self.stream)
        self.enabled = self.tty if mode is None else mode
        self._last_time = -math.inf
        self._last_text = ""
        self._width = 0  # characters on the terminal line now (to erase)

    def update(self, text: str) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            if now - self._last_time < self.TTY_INTERVAL:
                return
            # one terminal line: a wrapped line could not be rewritten by "\r"
            cols = shutil.get_terminal_size((80, 24)).columns
            text = text[:max(10, cols - 1)]
            pad = " " * max(0, self._width - len(text))
            self.stream.write(f"\r{text}{pad}")
            self._width = len(text)
        else:
            since = now - self._last_time
            if since < (self.LINE_INTERVAL if text != self._last_text else self.LINE_REPEAT):
                return
            self.stream.write(text + "\n")
        self.stream.flush()
        self._last_time, self._last_text = now, text

    def done(self) -> None:
        """Erase the terminal line (the result follows on stdout)."""
        if self.enabled and self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


# ---------------------------------------------------------------- keys

def parse_key(text: str, hex_mode: bool) -> bytes:
    """A key from the command line, validated here so a bad one never reaches the daemon."""
    if hex_mode:
        try:
            k = bytes.fromhex(text)
        except ValueError as e:
            raise errors.InvalidArgument(f"invalid hex key {text[:80]!r}: {e}") from None
    else:
        # surrogateescape: argv bytes that were not UTF-8 come back exactly as typed
        k = text.encode("utf-8", "surrogateescape")
    try:
        return key_bytes(k)
    except errors.InvalidArgument as e:
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise errors.InvalidArgument(f"key {shown!r}: {e.message}") from None


def show_key(k: bytes, hex_mode: bool) -> str:
    """Text when the key is printable UTF-8 (the common case), else ``0x``-prefixed hex."""
    if hex_mode:
        return k.hex()
    try:
        s = k.decode("utf-8")
    except UnicodeDecodeError:
        return "0x" + k.hex()
    return s if s.isprintable() else "0x" + k.hex()


def key_doc(k: bytes) -> dict:
    """JSON form of a key: the exact bytes as hex, plus text when it decodes."""
    try:
        text = k.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    return {"key": text, "key_hex": k.hex()}


def _keys(args) -> list[bytes]:
    return [parse_key(k, args.hex) for k in args.keys]


# ---------------------------------------------------------------- commands

def cmd_status(c: Client, args) -> int:
    info = c.info(refresh=True)
    h = c.health()
    doc = {
        "node_id": info.node_id, "version": info.version,
        "control_address": args.address, "data_address": f"{info.data_host}:{info.data_port}",
        "live": h.live, "ready": h.ready, "status": h.status, "uptime_seconds": h.uptime_seconds,
        "wire_version": info.wire_version, "checksum_algorithm": info.checksum_algorithm,
        "shm_socket": info.shm_socket or None, "shm_reachable": _shm_reachable(info.shm_socket),
        "cli_transport": "shm" if args.shm else "tcp",
        "limits": {"max_value_size": info.max_value_size,
                   "max_control_value_size": info.max_control_value_size,
                   "max_key_length": info.max_key_length, "max_batch_keys": info.max_batch_keys},
    }
    if args.json:
        emit_json(doc)
        return EXIT_OK
    state = ", ".join(("live" if h.live else "not live", "ready" if h.ready else "not ready"))
    print(fields([
        ("node", info.node_id),
        ("version", info.version),
        ("control", args.address),
        ("data", f"{info.data_host}:{info.data_port} (wire v{info.wire_version}, "
                 f"{info.checksum_algorithm} checksums)"),
        ("shm", _shm_text(info.shm_socket, args.shm)),
        ("health", f"{h.status} ({state})"),
        ("uptime", human_age(h.uptime_seconds)),
        ("max value", f"{human_size(info.max_value_size)} data path, "
                      f"{human_size(info.max_control_value_size)} control path"),
        ("max key", f"{info.max_key_length} bytes"),
        ("max batch", f"{info.max_batch_keys} keys"),
    ]))
    return EXIT_OK


def _shm_reachable(path: str) -> bool:
    return bool(path) and os.path.exists(path)


def _shm_text(path: str, used: bool) -> str:
    """What `status` says of the same-host shared-memory path and which one the CLI takes."""
    if not path:
        return "not offered by the daemon (data commands use TCP)"
    if not _shm_reachable(path):
        return f"{path} (not reachable from here; data commands use TCP)"
    return f"{path} (reachable; data commands use {'it: --shm' if used else 'TCP unless --shm'})"


def _is_bytes_counter(name: str) -> bool:
    return name.endswith("_bytes") or name in ("dram_capacity", "dram_used", "slab_size")


def cmd_stats(c: Client, args) -> int:
    s = c.stats()
    tiers = [{"name": t.name, "capacity_bytes": t.capacity_bytes, "used_bytes": t.used_bytes,
              "objects": t.objects, "counters": dict(sorted(t.counters.items()))} for t in s.tiers]
    doc = {"uptime_seconds": s.uptime_seconds, "connections": s.connections,
           "counters": dict(sorted(s.counters.items())),
           "namespaces": dict(sorted(s.namespaces.items())), "tiers": tiers}
    if args.json:
        emit_json(doc)
        return EXIT_OK
    print(fields([("uptime", human_age(s.uptime_seconds)), ("connections", s.connections)]))
    print()
    rows = []
    for t in tiers:
        tc = t["counters"]
        pct = 100.0 * t["used_bytes"] / t["capacity_bytes"] if t["capacity_bytes"] else 0.0
        # demotions/promotions/bytes written exist for lower tiers; "-" where a tier has none
        rows.append([t["name"], human_size(t["capacity_bytes"]), human_size(t["used_bytes"]),
                     f"{pct:.1f}%", t["objects"], tc.get("hits", 0), tc.get("misses", 0),
                     tc.get("evictions", tc.get("regions_reclaimed", 0)),
                     tc.get("demotions", "-"), tc.get("promotions", "-"),
                     human_size(tc["bytes_written"]) if "bytes_written" in tc else "-",
                     tc.get("checksum_failures", 0)])
    print(table(["TIER", "CAPACITY", "USED", "USED%", "OBJECTS", "HITS", "MISSES", "EVICTIONS",
                 "DEMOTED", "PROMOTED", "WRITTEN", "CSUM_FAIL"], rows, right=range(1, 12)))
    print()
    if doc["namespaces"]:
        print(table(["NAMESPACE", "OBJECTS"], list(doc["namespaces"].items()), right=[1]))
    else:
        print("no namespaces (the store is empty)")
    print()
    print(table(["COUNTER", "VALUE"],
                [[k, human_size(v) if _is_bytes_counter(k) else v] for k, v in doc["counters"].items()],
                right=[1]))
    return EXIT_OK


def cmd_put(c: Client, args, parser: argparse.ArgumentParser) -> int:
    if args.file == "-":
        if args.key is None:
            parser.error("put: --key is required when FILE is - (stdin)")
        data = sys.stdin.buffer.read()
        key = parse_key(args.key, args.hex)
    else:
        # the default key is the file's name as text, even with --hex: a hex file name is rare
        key = parse_key(args.key, args.hex) if args.key is not None else parse_key(
            os.path.basename(args.file), False)
        with open(args.file, "rb") as f:
            # refuse before reading: a multi-GiB file should not be slurped just to be rejected
            size, limit = os.fstat(f.fileno()).st_size, c.info().max_value_size
            if size > limit:
                raise errors.InvalidArgument(
                    f"{args.file} is {human_size(size)} ({size} bytes); the daemon's "
                    f"max_value_size is {human_size(limit)}")
            data = f.read()
    shown = show_key(key, args.hex)
    t0 = time.perf_counter()
    try:
        stored = c.put(key, data, overwrite=args.overwrite)
    except errors.Conflict as e:
        raise errors.Conflict(f"{shown!r}: {e.message} (pass --overwrite to replace it)") from None
    elapsed = time.perf_counter() - t0
    transport = c.transport  # the connection the put used: no new connection here
    if args.json:
        emit_json({**key_doc(key), "namespace": c.namespace, "size": len(data), "stored": stored,
                   "deduplicated": not stored, "elapsed_seconds": elapsed, "transport": transport})
    elif stored:
        print(f"stored {shown!r} ({human_size(len(data))}) in namespace {c.namespace!r} over "
              f"{transport}, {human_duration(elapsed)}")
    else:
        print(f"already stored {shown!r} ({human_size(len(data))}, identical bytes) in namespace "
              f"{c.namespace!r} over {transport}, {human_duration(elapsed)}")
    return EXIT_OK


def cmd_get(c: Client, args, parser: argparse.ArgumentParser) -> int:
    if args.output == "-" and args.json:
        parser.error("get: --json cannot share stdout with -o - (the object's bytes)")
    key = parse_key(args.key, args.hex)
    shown = show_key(key, args.hex)
    t0 = time.perf_counter()
    try:
        data = c.get(key)
    except errors.NotFound as e:
        # the daemon's "no such key" does not say which key; the user may have asked for several
        raise errors.NotFound(f"{e.message}: {shown!r} in namespace {c.namespace!r}") from None
    elapsed = time.perf_counter() - t0
    if args.output == "-":
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return EXIT_OK
    # written only after the whole object arrived: a failed get never leaves a partial file
    with open(args.output, "wb") as f:
        f.write(data)
    transport = c.transport
    if args.json:
        emit_json({**key_doc(key), "namespace": c.namespace, "size": len(data), "file": args.output,
                   "elapsed_seconds": elapsed, "transport": transport})
    else:
        print(f"wrote {shown!r} ({human_size(len(data))}) to {args.output} over {transport} in "
              f"{human_duration(elapsed)}")
    return EXIT_OK


def cmd_exists(c: Client, args) -> int:
    keys = _keys(args)
    found = c.exists(keys)
    if args.json:
        emit_json({"namespace": c.namespace, "found": sum(found), "total": len(keys),
                   "results": [{**key_doc(k), "exists": e} for k, e in zip(keys, found)]})
    else:
        print(table(["EXISTS", "KEY"], [["yes" if e else "no", show_key(k, args.hex)]
                                         for k, e in zip(keys, found)]))
        print(f"{sum(found)}/{len(keys)} exist in namespace {c.namespace!r}")
    return EXIT_OK


def cmd_lookup(c: Client, args) -> int:
    keys = _keys(args)
    hit = c.lookup(keys)
    missing = keys[hit] if hit < len(keys) else None
    if args.json:
        emit_json({"namespace": c.namespace, "hit": hit, "total": len(keys),
                   "first_missing": key_doc(missing) if missing is not None else None})
    else:
        tail = f"; first missing: {show_key(missing, args.hex)!r}" if missing is not None else ""
        print(f"prefix hit {hit}/{len(keys)} in namespace {c.namespace!r}{tail}")
    return EXIT_OK


def _count_cmd(verb: str, call: Callable[[Client, list[bytes], argparse.Namespace], int]):
    """pin / unpin / rm: a count of the keys affected; keys that are absent are not an error,
    because the end state the user asked for (not pinned, not stored...) already holds."""
    def run(c: Client, args) -> int:
        keys = _keys(args)
        n = call(c, keys, args)
        if args.json:
            doc = {"namespace": c.namespace, verb: n, "total": len(keys)}
            if verb == "pinned":
                doc["ttl_seconds"] = args.ttl
            emit_json(doc)
        else:
            extra = f" for {args.ttl:g}s" if verb == "pinned" else ""
            print(f"{verb} {n}/{len(keys)} keys in namespace {c.namespace!r}{extra}")
        return EXIT_OK
    return run


cmd_pin = _count_cmd("pinned", lambda c, keys, args: c.pin(keys, ttl=args.ttl))
cmd_unpin = _count_cmd("unpinned", lambda c, keys, args: c.unpin(keys))
cmd_rm = _count_cmd("deleted", lambda c, keys, args: c.delete(keys))


def cmd_delete_all(c: Client, args, parser: argparse.ArgumentParser) -> int:
    if not args.yes:
        parser.error("delete-all deletes every object of the namespace: add --yes")
    ns = "" if args.all_namespaces else c.namespace
    n = c.delete_all(namespace=ns)
    where = "all namespaces" if args.all_namespaces else f"namespace {c.namespace!r}"
    if args.json:
        emit_json({"namespace": None if args.all_namespaces else c.namespace, "deleted": n})
    else:
        print(f"deleted {n} objects in {where}")
    return EXIT_OK


def _member_client(args, address: str, timeout: float) -> Client:
    """A client for another member's control address, with this invocation's token and TLS."""
    return Client(address, namespace=args.namespace, timeout=timeout, tls=_tls_config(args),
                  token=args.token)


def _repair_doc(r) -> dict:
    return {"state": r.state, "passes": r.passes, "scanned": r.scanned, "total": r.total,
            "records_written": r.records_written, "bytes_written": r.bytes_written,
            "verified": r.verified, "dropped": r.dropped, "removed": r.removed,
            "failures": r.failures, "last_pass_seconds": r.last_pass_seconds,
            "pending": r.pending}


def _probe_member(c: Client, args, member) -> dict:
    """Repair progress and unverified count from the member itself (its own Members and
    Stats), or {"reachable": False, "error": ...}."""
    own = None
    try:
        if member.self:
            own = c  # the address the user gave: the advertised one may not be reachable here
        else:
            own = _member_client(args, member.control_address, min(args.timeout, PROBE_TIMEOUT))
        r = own.members()
        counters = own.stats().counters
        return {"reachable": True, "error": None, "repair": _repair_doc(r.repair),
                "unverified": counters.get("unverified", 0), "objects": counters.get("objects")}
    except errors.Unavailable as e:
        return {"reachable": False, "error": f"unreachable ({_one_line(e.message)})",
                "repair": None, "unverified": None, "objects": None}
    except errors.KVStoreError as e:
        return {"reachable": False, "error": f"{e.name}: {_one_line(e.message)}",
                "repair": None, "unverified": None, "objects": None}
    finally:
        if own is not None and own is not c:
            own.close()


def repair_line(rep: dict, unverified: int | None = None) -> str:
    """``idle, pass 3, 120/500 scanned, 12 written (48.0 MiB), 0 pending, 2 dropped stale,
    0 failures``; just ``off`` on a node without a repair loop."""
    if rep["state"] == "off":
        text = "off"
    else:
        text = (f"{rep['state']}, pass {rep['passes']}, {rep['scanned']}/{rep['total']} scanned, "
                f"{rep['records_written']} written ({human_size(rep['bytes_written'])}), "
                f"{rep['pending']} pending, {rep['dropped']} dropped stale, "
                f"{rep['failures']} failures")
    if unverified:
        text += f", {unverified} unverified"
    return text


def _policies_text(policies: dict) -> str:
    if not policies:
        return "none set"
    items = sorted(policies.items(), key=lambda kv: (kv[0] != "*", kv[0]))
    return ", ".join(f"{'* (default)' if ns == '*' else ns}={p}" for ns, p in items)


def cmd_nodes(c: Client, args) -> int:
    r = c.members()
    # each member's repair loop is its own: ask every member, in parallel, briefly
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(r.members)))) as pool:
        probes = list(pool.map(lambda m: _probe_member(c, args, m), r.members))
    nodes = [{"node_id": m.node_id, "self": m.self, "control_address": m.control_address,
              "data_address": m.data_address, "shm_socket": m.shm_socket,
              "dram_capacity_bytes": m.dram_capacity_bytes,
              "nvme_capacity_bytes": m.nvme_capacity_bytes, "failure_domain": m.failure_domain,
              "version": m.version, "started_at": m.started_at, "health": m.health,
              "last_seen_seconds_ago": m.last_seen_seconds_ago,
              "draining": m.draining, "placement": m.placement,
              "reachable": p["reachable"], "probe_error": p["error"], "repair": p["repair"],
              "unverified": p["unverified"], "objects": p["objects"]}
             for m, p in zip(r.members, probes)]
    doc = {"source": r.source, "cluster": r.cluster, "node_id": r.node_id,
           "degraded": r.degraded, "detail": r.detail, "epoch": r.epoch,
           "epoch_hex": f"0x{r.epoch:08x}", "policies": dict(sorted(r.policies.items())),
           "nodes": nodes}
    if args.json:
        emit_json(doc)
        return EXIT_OK
    view = f"{r.source} membership" + (f", cluster {r.cluster!r}" if r.cluster else "")
    if r.degraded:
        view += f", DEGRADED ({r.detail or 'not registered'})"
    print(f"{len(nodes)} node(s) as seen by {r.node_id} ({view})")
    rows = [[("* " if n["self"] else "  ") + n["node_id"], n["control_address"],
             n["data_address"] or "-", n["failure_domain"] or "-",
             human_size(n["dram_capacity_bytes"]) if n["dram_capacity_bytes"] else "-",
             human_size(n["nvme_capacity_bytes"]) if n["nvme_capacity_bytes"] else "-",
             n["health"], "-" if n["self"] else human_age(n["last_seen_seconds_ago"]),
             ",".join(f for f, on in (("draining", n["draining"]), ("placement", n["placement"]))
                      if on) or "-"]
            for n in nodes]
    print(table(["NODE", "CONTROL", "DATA", "DOMAIN", "DRAM", "NVME", "HEALTH", "SEEN", "FLAGS"],
                rows, right=[4, 5]))
    print()
    print(fields([("epoch", doc["epoch_hex"]), ("policies", _policies_text(doc["policies"]))]))
    if nodes:
        print()
        w = max(len(n["node_id"]) for n in nodes)
        for n in nodes:
            state = repair_line(n["repair"], n["unverified"]) if n["reachable"] else n["probe_error"]
            print(f"{n['node_id']:<{w}}  repair: {state}")
    return EXIT_OK


def _find_member(c: Client, name: str, parser: argparse.ArgumentParser):
    """NODE (a node id or control address, as `nodes` lists them) in the member list of the
    node we are connected to; a usage error naming the known ids when there is none."""
    r = c.members()
    for m in r.members:
        if name in (m.node_id, m.control_address):
            return m
    known = ", ".join(m.node_id for m in r.members) or "(none)"
    parser.error(f"drain: unknown node {name!r}; known nodes (as seen by {r.node_id}): {known}")


def cmd_drain(c: Client, args, parser: argparse.ArgumentParser) -> int:
    if args.cancel and args.wait:
        parser.error("drain: --wait waits for a drain to finish; it makes no sense with --cancel")
    m = _find_member(c, args.node, parser)
    target = c if m.self else _member_client(args, m.control_address, args.timeout)
    log = sys.stderr if args.json else sys.stdout  # --json: stdout carries one document only
    try:
        r = target.drain(cancel=args.cancel)
        doc = {"node_id": m.node_id, "control_address": m.control_address,
               "draining": r.draining, "objects_left": r.objects_left, "detail": r.detail,
               "waited": False, "objects": r.objects_left, "safe_to_stop": False}
        if args.cancel:
            if args.json:
                emit_json(doc)
            else:
                print(f"{m.node_id}: drain cancelled; the node takes new placements again "
                      f"({r.objects_left} objects on it)")
            return EXIT_OK
        print(f"{m.node_id}: draining, {r.objects_left} objects left; its records move to their "
              "new homes", file=log)
        objects = r.objects_left
        if args.wait and objects:
            doc["waited"] = True
            start = time.monotonic()
            deadline = start + args.wait_timeout
            progress = Progress(args.progress)
            try:
                while True:
                    counters = target.stats().counters
                    objects = counters.get("objects", 0)
                    if objects == 0:
                        break
                    rep = repair_line(_repair_doc(target.members().repair),
                                      counters.get("unverified"))
                    now = time.monotonic()
                    progress.update(f"{m.node_id}: {objects} objects left after "
                                    f"{now - start:.0f}s; repair: {rep}")
                    if now >= deadline:
                        progress.done()
                        doc["objects"] = objects
                        if args.json:
                            emit_json(doc)
                        print(f"{PROG}: drain: {m.node_id} still holds {objects} objects after "
                              f"{args.wait_timeout:g}s; the drain goes on (re-run with --wait to "
                              "keep waiting); do not stop the node yet", file=sys.stderr)
                        return EXIT_ERROR
                    time.sleep(DRAIN_POLL_SECONDS)
            finally:
                progress.done()
        doc["objects"] = objects
        doc["safe_to_stop"] = objects == 0
        if args.json:
            emit_json(doc)
        elif objects == 0:
            print(f"{m.node_id} holds no objects: it is safe to stop the node now")
        else:
            print(f"not safe to stop {m.node_id} yet: wait until it holds no objects "
                  f"(kvstore-cli drain {m.node_id} --wait)")
        return EXIT_OK
    finally:
        if target is not c:
            target.close()


def cmd_policy_set(c: Client, args) -> int:
    from .layout import Policy
    policy = str(Policy.parse(args.policy))  # a malformed policy never reaches the daemon
    return _policy_change(c, args, policy, f"{_ns_shown(args.policy_namespace)}: {policy}")


def cmd_policy_rm(c: Client, args) -> int:
    return _policy_change(c, args, "", f"{_ns_shown(args.policy_namespace)}: policy removed")


def _ns_shown(ns: str) -> str:
    return "* (default)" if ns == "*" else repr(ns)


def _policy_change(c: Client, args, policy: str, what: str) -> int:
    policies = c.set_policy(args.policy_namespace, policy)
    if args.json:
        emit_json({"namespace": args.policy_namespace, "policy": policy or None,
                   "policies": dict(sorted(policies.items()))})
    else:
        print(what)
        print(f"policies in force: {_policies_text(policies)}")
    return EXIT_OK


def cmd_policy_ls(c: Client, args) -> int:
    r = c.members()
    policies = dict(sorted(r.policies.items(), key=lambda kv: (kv[0] != "*", kv[0])))
    if args.json:
        emit_json({"cluster": r.cluster, "source": r.source, "policies": policies})
        return EXIT_OK
    if not policies:
        where = "this node is not in a cluster" if r.source == "standalone" else f"cluster {r.cluster!r}"
        print(f"no redundancy policies set ({where})")
        return EXIT_OK
    print(table(["NAMESPACE", "POLICY"], [[_ns_shown(ns).strip("'"), p] for ns, p in policies.items()]))
    return EXIT_OK


def cmd_reload(c: Client, args) -> int:
    changed = c.reload()
    if args.json:
        emit_json({"changed": changed})
    else:
        print("\n".join(changed) if changed else "reloaded: nothing changed")
    return EXIT_OK


def cmd_ls(c: Client, args) -> int:
    # Client.list: "" means every namespace; pass ours explicitly otherwise
    r = c.list(namespace="" if args.all_namespaces else c.namespace, limit=args.limit)
    where = "all namespaces" if args.all_namespaces else f"namespace {c.namespace!r}"
    if args.json:
        emit_json({"namespace": None if args.all_namespaces else c.namespace, "total": r.total,
                   "entries": [{"namespace": e.namespace, **key_doc(e.key), "size": e.size,
                                "checksum": e.checksum, "pinned": e.pinned, "tier": e.tier,
                                "age_seconds": e.age_seconds} for e in r.entries]})
        return EXIT_OK
    if not r.entries:
        print(f"no objects in {where}")
        return EXIT_OK
    header = ["KEY", "SIZE", "PINNED", "TIER", "AGE"]
    rows = [[show_key(e.key, args.hex), human_size(e.size), "yes" if e.pinned else "no",
             e.tier, human_age(e.age_seconds)] for e in r.entries]
    right = [1, 4]
    if args.all_namespaces:
        header = ["NAMESPACE"] + header
        rows = [[e.namespace] + row for e, row in zip(r.entries, rows)]
        right = [2, 5]
    print(table(header, rows, right=right))
    # the daemon samples: say so, so nobody mistakes this for a complete listing
    print(f"{len(r.entries)} shown of {r.total} objects in {where} (a sample, not a snapshot)")
    return EXIT_OK


def _percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile: an observed latency, never an interpolation."""
    if not sorted_values:
        return 0.0
    return sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)]


def _timed(op: Callable[[int, int], None], count: int, duration: float | None,
           before: Callable[[int, int], None] | None = None,
           tick: Callable[[int, float], None] | None = None) -> list[float]:
    """Latencies of ``op(round, index)`` over the key set: one pass, or passes until
    ``duration`` elapses. ``before`` runs untimed ahead of each op (the payload stamp);
    ``tick(ops done, seconds)`` after each (the progress line)."""
    lat: list[float] = []
    clock = time.perf_counter
    start = clock()
    deadline = start + duration if duration else None
    for rnd in range(sys.maxsize):
        for i in range(count):
            if before is not None:
                before(rnd, i)
            t = clock()
            op(rnd, i)
            end = clock()
            lat.append(end - t)
            if tick is not None:
                tick(len(lat), end - start)
            if deadline is not None and end >= deadline:
                return lat
        if deadline is None:
            return lat
    return lat


def _phase_doc(lat: list[float], size: int, transport: str) -> dict:
    total = sum(lat)
    s = sorted(lat)
    return {"transport": transport, "size": size, "ops": len(lat), "bytes": len(lat) * size,
            "seconds": total,
            "ops_per_second": len(lat) / total if total else 0.0,
            "bytes_per_second": len(lat) * size / total if total else 0.0,
            "p50_seconds": _percentile(s, 50), "p99_seconds": _percentile(s, 99),
            "max_seconds": s[-1] if s else 0.0}


# Each put's payload starts with (round, index): every put stores bytes the daemon has not
# seen under that key, so no put is a dedup no-op and no pass re-sends the previous one.
_STAMP = struct.Struct("<QQ")


def cmd_bench(c: Client, args) -> int:
    size, count = args.size, args.count
    info = c.info(refresh=True)
    if size > info.max_value_size:
        raise errors.InvalidArgument(f"--size {human_size(size)} is over the daemon's max_value_size "
                                     f"{human_size(info.max_value_size)}")
    if args.op != "put":
        # reads of objects the same run evicted would fail with NotFound: keep the set well
        # inside the store (half its capacity leaves room for the daemon's other data)
        capacity = sum(t.capacity_bytes for t in c.stats().tiers)
        if capacity and size * count > capacity // 2:
            raise errors.InvalidArgument(
                f"{count} x {human_size(size)} = {human_size(size * count)} would not stay resident "
                f"in the daemon's {human_size(capacity)}; use a smaller --count or --size "
                "(at most half the capacity) or --op put")
    prefix = f"{BENCH_PREFIX}/{secrets.token_hex(4)}/"
    keys = [f"{prefix}{i}".encode() for i in range(count)]
    # random bytes: a real KV block does not compress, so neither should the payload
    payload = bytearray(os.urandom(size))
    stamp_len = min(_STAMP.size, size)
    dedups = 0  # puts the daemon answered "already stored" (possible only below 16 bytes)
    results: dict[str, dict] = {}
    progress = Progress(args.progress)

    def stamp(rnd: int, i: int) -> None:
        payload[:stamp_len] = _STAMP.pack(rnd, i)[:stamp_len]

    def put(rnd: int, i: int) -> None:
        nonlocal dedups
        # overwrite after the first pass: the key holds the previous pass's bytes
        if not c.put(keys[i], payload, overwrite=rnd > 0):
            dedups += 1

    buf = bytearray(size)

    def get(rnd: int, i: int) -> None:
        c.get_into(keys[i], buf)  # into one reused buffer: time the transfer, not the allocator

    def ticker(op: str) -> Callable[[int, float], None] | None:
        if not progress.enabled:
            return None  # no per-op call at all when nobody sees the line
        goal = f"{args.duration:g}s" if args.duration else f"{count} ops"
        return lambda n, t: progress.update(f"bench {op} over {transport}: {n} ops in {t:.1f}s "
                                            f"(of {goal})")

    deleted = 0
    try:
        c.ping()  # connect the data path first, so the first timed op is not a TCP handshake
        transport = c.transport
        if args.op in ("put", "both"):
            lat = _timed(put, count, args.duration, before=stamp, tick=ticker("put"))
            results["put"] = {**_phase_doc(lat, size, transport), "dedups": dedups}
        else:
            for i in range(count):  # untimed fill for --op get, each object its own bytes
                stamp(0, i)
                c.put(keys[i], payload, overwrite=True)
                progress.update(f"bench: storing {i + 1}/{count} objects to read back")
        if args.op in ("get", "both"):
            results["get"] = _phase_doc(_timed(get, count, args.duration, tick=ticker("get")),
                                        size, transport)
    finally:
        progress.update("bench: deleting the bench keys")
        progress.done()
        # clean up even after an error or ^C; a clean-up failure must not hide the first error
        try:
            for i in range(0, len(keys), max(1, info.max_batch_keys)):
                deleted += c.delete(keys[i:i + info.max_batch_keys])
        except errors.KVStoreError as e:
            print(f"{PROG}: warning: could not delete the bench keys under {prefix!r}: {e.message}",
                  file=sys.stderr)
    if args.json:
        emit_json({"namespace": c.namespace, "transport": transport, "size": size, "count": count,
                   "prefix": prefix, "duration": args.duration, "results": results,
                   "deleted": deleted})
        return EXIT_OK
    print(f"bench: {count} x {human_size(size)} objects over {transport} in namespace "
          f"{c.namespace!r}, keys under {prefix!r}")
    if "put" in results:
        print("every put stored new bytes" if not dedups else
              f"{dedups} puts were dedups: the daemon already held those bytes under the key")
    rows = [[op, r["transport"], human_size(r["size"]), r["ops"], human_size(r["bytes"]),
             human_duration(r["seconds"]), f"{r['ops_per_second']:.0f}",
             human_size(r["bytes_per_second"]) + "/s", human_duration(r["p50_seconds"]),
             human_duration(r["p99_seconds"]), human_duration(r["max_seconds"]),
             r.get("dedups", "-")] for op, r in results.items()]
    print(table(["OP", "TRANSPORT", "SIZE", "OPS", "BYTES", "TIME", "OPS/S", "THROUGHPUT", "P50",
                 "P99", "MAX", "DEDUP"], rows, right=range(2, 12)))
    gone = f" (the other {count - deleted} were already evicted)" if deleted < count else ""
    print(f"deleted {deleted} bench keys{gone}")
    return EXIT_OK


# ---------------------------------------------------------------- parser

GLOBAL_GROUP = "global options (also accepted before the command)"


def _add_global_options(p, defaults: bool, timeout: bool = True) -> None:
    """The global options, on the main parser (with defaults) and again on every
    subcommand (default SUPPRESS, so they only override when given): both
    ``kvstore-cli --json stats`` and ``kvstore-cli stats --json`` work. ``p`` is a parser
    or an argument group (a subcommand's own group, listed after its own options)."""
    env = os.environ

    def d(value):
        return value if defaults else argparse.SUPPRESS

    p.add_argument("-a", "--address", type=_address,
                   default=d(env.get("KVSTORE_ADDRESS") or DEFAULT_ADDRESS),
                   help="control (gRPC) address HOST:PORT (env KVSTORE_ADDRESS; default %s)"
                        % DEFAULT_ADDRESS)
    p.add_argument("-n", "--namespace", default=d(env.get("KVSTORE_NAMESPACE") or DEFAULT_NAMESPACE),
                   help="namespace (env KVSTORE_NAMESPACE; default %s)" % DEFAULT_NAMESPACE)
    if timeout:
        p.add_argument("--timeout", type=_positive(float), default=d(10.0), metavar="SECONDS",
                       help="give up on an unreachable or silent daemon after this long "
                            "(default 10)")
    p.add_argument("--data-address", default=d(None), type=_address, metavar="HOST:PORT",
                   help="data-path address, when the one the daemon advertises is not reachable "
                        "from here (e.g. it listens on 0.0.0.0)")
    p.add_argument("--json", action="store_true", default=d(False),
                   help="print one JSON document on stdout")
    p.add_argument("--hex", action="store_true", default=d(False),
                   help="keys are given and shown as hex instead of UTF-8 text")
    # TCP by default: the shm path maps and prefaults the daemon's whole arena at connect
    # (~0.2 s per GiB), far more than one short command gains from it
    p.add_argument("--shm", action="store_true", default=d(False),
                   help="data commands use the same-host shared-memory path (required: exit 3 "
                        "if the daemon offers none here); it maps the daemon's whole arena at "
                        "connect, so it pays off only for large transfers (default: TCP)")
    p.add_argument("--no-shm", dest="shm", action="store_false", default=d(False),
                   help="data commands use TCP (the default)")
    p.add_argument("--progress", action="store_true", default=d(None),
                   help="progress line on stderr for long commands (bench, drain --wait) "
                        "even when stderr is not a terminal (default: only on a terminal)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=d(None),
                   help="no progress line, even on a terminal")
    p.add_argument("--token", default=d(env.get("KVSTORE_TOKEN") or None), metavar="TOKEN",
                   help="auth token (env KVSTORE_TOKEN, which keeps it out of the process list)")
    p.add_argument("--tls", action="store_true", default=d(False),
                   help="talk TLS, trusting the system CAs (implied by --tls-ca/--tls-cert)")
    p.add_argument("--tls-ca", default=d(env.get("KVSTORE_TLS_CA") or None), metavar="FILE",
                   help="CA certificate that signed kvstored's certificate (env KVSTORE_TLS_CA)")
    p.add_argument("--tls-cert", default=d(env.get("KVSTORE_TLS_CERT") or None), metavar="FILE",
                   help="client certificate, for mutual TLS (env KVSTORE_TLS_CERT)")
    p.add_argument("--tls-key", default=d(env.get("KVSTORE_TLS_KEY") or None), metavar="FILE",
                   help="client private key (env KVSTORE_TLS_KEY; default: in --tls-cert)")
    p.add_argument("--tls-server-name", default=d(None), metavar="NAME",
                   help="name to verify in kvstored's certificate, when not the address's host")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Inspect and use a kvstored KV-block store.",
        epilog="data commands use TCP unless --shm is given. exit codes: 0 ok, 1 error "
               "reported by the store, 2 usage, 3 daemon unreachable (or no shm path for --shm)")
    _add_global_options(parser, defaults=True)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # every subcommand gets the global options too, added last (below) so that its help
    # and usage show the command's own options first
    commands: list[argparse.ArgumentParser] = []

    def command(name: str, fn, help: str, needs_parser: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=(lambda c, a: fn(c, a, parser)) if needs_parser else fn)
        commands.append(p)
        return p

    command("status", cmd_status, "node identity, addresses, health, uptime and limits")
    command("stats", cmd_stats, "counters, per-tier usage and per-namespace object counts")
    command("nodes", cmd_nodes, "cluster members as this daemon sees them (etcd, static or "
                                "standalone): draining/placement flags, each member's own repair "
                                "progress (asked of it, %gs timeout), the policies and the epoch"
                                % PROBE_TIMEOUT)

    p = command("drain", cmd_drain, "admin: take a node out of placement and move its records "
                                    "to the other members (or --cancel); --wait until it is "
                                    "empty and safe to stop", needs_parser=True)
    p.add_argument("node", metavar="NODE",
                   help="node id or control address, as `nodes` lists them (looked up in the "
                        "member list of the node at --address)")
    p.add_argument("--cancel", action="store_true",
                   help="stop draining: the node takes new placements again")
    p.add_argument("--wait", action="store_true",
                   help="poll the node every %gs, printing progress, until it holds no objects"
                        % DRAIN_POLL_SECONDS)
    p.add_argument("--timeout", dest="wait_timeout", type=_positive(float),
                   default=DRAIN_WAIT_TIMEOUT, metavar="SECONDS",
                   help="with --wait: give up (exit 1) when the node still holds objects after "
                        "this long (default %g; the drain itself goes on)" % DRAIN_WAIT_TIMEOUT)

    pol = sub.add_parser("policy", help="admin: cluster-wide redundancy policies per namespace "
                                        "(ls, set, rm)",
                         description="Cluster-wide redundancy policies per namespace, kept in "
                                     "etcd. POLICY is none, replicas:N (N copies) or ec:K+M "
                                     "(erasure coding: K data + M parity fragments); NAMESPACE * "
                                     "is the default for namespaces without their own policy.")
    polsub = pol.add_subparsers(dest="policy_command", metavar="ACTION", required=True)

    def policy_action(name: str, fn, help: str) -> argparse.ArgumentParser:
        q = polsub.add_parser(name, help=help, description=help)
        q.set_defaults(func=fn)
        commands.append(q)
        return q

    policy_action("ls", cmd_policy_ls, "the policies in force (namespace -> policy)")
    q = policy_action("set", cmd_policy_set, "set a namespace's policy; the daemon refuses one "
                                             "the cluster has too few members for")
    q.add_argument("policy_namespace", metavar="NAMESPACE", help='namespace; "*" = the default')
    q.add_argument("policy", metavar="POLICY", help="none | replicas:N | ec:K+M")
    q = policy_action("rm", cmd_policy_rm, "remove a namespace's own policy (it falls back to "
                                           "the default, \"*\")")
    q.add_argument("policy_namespace", metavar="NAMESPACE", help='namespace; "*" = the default')

    p = command("put", cmd_put, "store a file (or stdin) under a key", needs_parser=True)
    p.add_argument("file", metavar="FILE", help="file to store; - reads stdin (then --key is required)")
    p.add_argument("--key", "-k", help="key (default: the file's base name)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the object if the key holds different bytes (else: Conflict)")

    p = command("get", cmd_get, "fetch an object into a file (or stdout)", needs_parser=True)
    p.add_argument("key", metavar="KEY")
    p.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="where to write the bytes; - writes them to stdout")

    for name, fn, help in (
            ("exists", cmd_exists, "which of the keys are stored (exit 0 either way)"),
            ("lookup", cmd_lookup, "how many leading keys are stored: the prefix hit N/M"),
            ("pin", cmd_pin, "protect objects from eviction for --ttl seconds"),
            ("unpin", cmd_unpin, "release pins"),
            ("rm", cmd_rm, "delete objects (absent keys are not an error)")):
        p = command(name, fn, help)
        p.add_argument("keys", nargs="+", metavar="KEY")
        if name == "pin":
            p.add_argument("--ttl", type=_positive(float), default=60.0, metavar="SECONDS",
                           help="pin lease in seconds (default 60; the daemon caps it)")

    p = command("ls", cmd_ls, "a sample of stored objects and the total count")
    p.add_argument("--limit", type=_positive(int), default=50, metavar="N",
                   help="at most N entries (default 50; the daemon caps at 10000)")
    p.add_argument("--all-namespaces", "-A", action="store_true", help="list every namespace")

    p = command("delete-all", cmd_delete_all, "admin: delete every object of the namespace",
                needs_parser=True)
    p.add_argument("--all-namespaces", "-A", action="store_true", help="of every namespace")
    p.add_argument("--yes", action="store_true", help="really delete (required)")
    command("reload", cmd_reload, "admin: re-read config, tokens and certificates (like SIGHUP)")

    p = command("bench", cmd_bench, "throughput and latency of data-path put/get; "
                                    "deletes its keys afterwards")
    p.add_argument("--size", type=parse_size, default=1 << 20, metavar="SIZE",
                   help="object size, e.g. 64KiB, 1MiB (default 1MiB)")
    p.add_argument("--count", type=_positive(int), default=32, metavar="N",
                   help="distinct objects (default 32)")
    p.add_argument("--duration", type=_positive(float), default=None, metavar="SECONDS",
                   help="repeat passes over the objects for this long per op (default: one pass)")
    p.add_argument("--op", choices=("put", "get", "both"), default="both")

    for p in commands:
        _add_globals_last(p)
        p.set_defaults(command_parser=p)
    return parser


def _add_globals_last(p: argparse.ArgumentParser) -> None:
    """Give a subcommand the global options in a group of their own after its own options;
    its usage line names only its own options, then ``[global options]``."""
    own = p.format_usage().strip()
    if own.startswith("usage: "):
        own = own[len("usage: "):]
    p.usage = own.replace("%", "%%") + " [global options]"
    # drain has a --timeout of its own (how long --wait waits); the global one still works
    # before the command: kvstore-cli --timeout 5 drain NODE --wait --timeout 900
    has_timeout = any("--timeout" in a.option_strings for a in p._actions)
    _add_global_options(p.add_argument_group(GLOBAL_GROUP), defaults=False, timeout=not has_timeout)


# ---------------------------------------------------------------- entry point

def _tls_config(args) -> TLSConfig | None:
    if args.tls or args.tls_ca or args.tls_cert or args.tls_key or args.tls_server_name:
        return TLSConfig(ca_file=args.tls_ca, cert_file=args.tls_cert, key_file=args.tls_key,
                         server_name=args.tls_server_name)
    return None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())  # gRPC details can span lines; the contract is one line


_REFUSED = re.compile(r"connection refused|errno 111|econnrefused", re.IGNORECASE)


def _error_text(e: errors.KVStoreError, args) -> str:
    """The one line for a typed error; a refused connection says where and what to check
    instead of gRPC's or the socket's wording."""
    text = _one_line(e.message)
    if isinstance(e, errors.Unavailable) and _REFUSED.search(text):
        if args.address in text:
            return (f"cannot connect to kvstored at {args.address}: connection refused "
                    "(is kvstored running?)")
        # the control address answered, so the daemon runs: its data port is what is missing
        where = args.data_address or f"the address kvstored at {args.address} advertises"
        return (f"cannot connect to the kvstored data path at {where}: connection refused "
                "(is that port reachable from here? --data-address overrides it)")
    # the SDK's wording for what the user asked as --shm
    return text.replace("shm=True but", "--shm given but")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            # refused by the command's own parser, so the usage shown is that command's
            getattr(args, "command_parser", parser).error(
                "unrecognized arguments: " + " ".join(unknown))
        tls = _tls_config(args)
        if args.shm and (tls is not None or args.data_address):
            # the shm path is a local socket: neither TLS nor a TCP data address applies to it
            getattr(args, "command_parser", parser).error(
                "--shm cannot be combined with --data-address or TLS options")
    except SystemExit as e:  # usage error (2) or --help/--version (0): return it, don't exit
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    try:
        # shm=False unless asked (see --shm); ride_out_restarts=False: a one-shot command
        # has no restart to wait out, so a refused connection is reported at once
        with Client(args.address, namespace=args.namespace, timeout=args.timeout,
                    data_address=args.data_address, tls=tls, token=args.token,
                    shm=True if args.shm else False, ride_out_restarts=False) as c:
            return args.func(c, args)
    except SystemExit as e:  # parser.error() from inside a command
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    except errors.KVStoreError as e:
        print(f"{PROG}: {e.name}: {_error_text(e, args)}", file=sys.stderr)
        # Timeout is a subclass of Unavailable: both mean "no daemon to talk to"
        return EXIT_UNAVAILABLE if isinstance(e, errors.Unavailable) else EXIT_ERROR
    except BrokenPipeError:
        # `kvstore-cli get k -o - | head`: the reader left; stay quiet like other tools do,
        # and point stdout at /dev/null so the interpreter's final flush does not complain
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_ERROR
    except OSError as e:  # local files: put FILE, get -o FILE
        where = f"{e.filename}: " if e.filename else ""
        print(f"{PROG}: {type(e).__name__}: {where}{_one_line(e.strerror or e)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
