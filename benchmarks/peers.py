"""Reference peers for the TCP benchmarks: congestion control, iperf3, Redis.

Everything here is shared by every system a benchmark compares, so that they
are started under the same TCP congestion control and timed by the exact same
code (``measure``):

* ``congestion_control(name)`` sets ``net.ipv4.tcp_congestion_control`` for
  the duration of a run (needs root) and restores it afterwards;
* ``iperf3_loopback(seconds)`` is the kernel's single-stream loopback ceiling;
* ``RedisServer`` / ``redis_rows`` are the Redis 7 + redis-py/hiredis peer;
* ``measure`` / ``measure_async`` time a sync callable or a coroutine
  function, per operation, bounded by time *and* by operation count;
* ``format_table`` / ``render_markdown`` print the comparison.

Loopback TCP throughput moves 2-3x with the congestion control algorithm on
this machine (bbr vs cubic), so every figure carries the algorithm it was
measured with, and kvstored is compared against iperf3 under the same one.
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterator

CC_SYSCTL = "/proc/sys/net/ipv4/tcp_congestion_control"
CC_AVAILABLE = "/proc/sys/net/ipv4/tcp_available_congestion_control"

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

# A working set of distinct keys: at least this many bytes, and at least MIN_KEYS keys.
WORKING_SET_BYTES = 64 * MiB
MIN_KEYS = 16


class BenchError(RuntimeError):
    """A benchmark prerequisite is missing or a peer failed; the message says which."""


# --------------------------------------------------------------------------- utilities

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_MULT = {"": 1, "b": 1, "k": KiB, "kib": KiB, "ki": KiB, "kb": 1000, "m": MiB, "mib": MiB,
              "mi": MiB, "mb": 1000 ** 2, "g": GiB, "gib": GiB, "gi": GiB, "gb": 1000 ** 3}


def parse_size(text: str) -> int:
    """'64KiB' -> 65536. KiB/MiB/GiB and K/M/G are binary, KB/MB/GB decimal, B or none = bytes."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (try 64KiB, 1MiB, 4MiB)")
    return int(float(m.group(1)) * _SIZE_MULT[(m.group(2) or "").lower()])


def proc_status(field: str) -> int:
    """A size from /proc/self/status in bytes, e.g. ``RssAnon`` (the Python heap and
    the native index: memfd arenas are RssShmem) or ``VmHWM`` (the peak RSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def rss_anon() -> int:
    return proc_status("RssAnon")


def peak_rss() -> int:
    """VmHWM: the process's peak resident set (reset by reset_peak_rss)."""
    return proc_status("VmHWM")


def reset_peak_rss() -> None:
    """Start VmHWM again from the current RSS (Linux >= 4.0: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then the peak is the process's so far: an upper bound


def human_size(n: int) -> str:
    for unit, mult in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return f"{n}B"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the usual small race; callers retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def kill_process(proc: subprocess.Popen | None, *, term_timeout: float = 5.0) -> None:
    """SIGTERM, wait (bounded), then SIGKILL. Never raises for an already-dead process."""
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=term_timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5.0)


def working_set_keys(prefix: str, size: int) -> list[bytes]:
    n = max(MIN_KEYS, math.ceil(WORKING_SET_BYTES / size))
    return [f"{prefix}-{size}-{i}".encode() for i in range(n)]


def tail(path: str, n: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


# --------------------------------------------------------------------------- congestion control

def current_congestion_control() -> str:
    with open(CC_SYSCTL) as f:
        return f.read().strip()


def available_congestion_controls() -> list[str]:
    try:
        with open(CC_AVAILABLE) as f:
            return f.read().split()
    except OSError:
        return []


def _write_cc(name: str) -> None:
    try:
        with open(CC_SYSCTL, "w") as f:
            f.write(name + "\n")
    except PermissionError as e:
        raise BenchError(
            f"cannot set {CC_SYSCTL} to {name!r}: permission denied (needs root / CAP_NET_ADMIN "
            f"in the init network namespace); run as root or pass --cc system") from e
    except OSError as e:
        raise BenchError(
            f"cannot set {CC_SYSCTL} to {name!r}: {e} (available: "
            f"{' '.join(available_congestion_controls()) or 'unknown'}; a missing one may need "
            f"`modprobe tcp_{name}`)") from e


@contextlib.contextmanager
def congestion_control(name: str | None) -> Iterator[str]:
    """Use TCP congestion control ``name`` machine-wide for the duration; yield the effective name.

    ``None`` (or the name already in effect) changes nothing. Sockets created
    inside the block (listeners, accepted and client sockets) pick the
    algorithm up, so start every peer inside it. The previous value is
    restored on exit, also on exceptions and KeyboardInterrupt/SystemExit.
    """
    before = current_congestion_control()
    if not name or name == before:
        yield before
        return
    avail = available_congestion_controls()
    if avail and name not in avail:
        raise BenchError(f"congestion control {name!r} is not available here "
                         f"(available: {' '.join(avail)})")
    _write_cc(name)
    try:
        now = current_congestion_control()
        if now != name:
            raise BenchError(f"set {CC_SYSCTL} to {name!r} but it reads back {now!r}")
        yield now
    finally:
        try:
            _write_cc(before)
        except BenchError as e:  # pragma: no cover - we could set it, so we can restore it
            print(f"WARNING: could not restore congestion control to {before!r}: {e}")


# --------------------------------------------------------------------------- iperf3

def iperf3_loopback(seconds: float = 3, *, host: str = "127.0.0.1") -> float:
    """Single-stream loopback throughput in bytes/s measured by iperf3 (receiver side)."""
    return iperf3_loopback_detail(seconds, host=host)["bytes_s"]


def iperf3_loopback_detail(seconds: float = 3, *, host: str = "127.0.0.1") -> dict:
    """iperf3 -s -1 on a free port + iperf3 -c ... -J; returns bytes_s, retransmits, congestion.

    The server is started in one-off mode (-1), so readiness is taken from its
    "Server listening" line, never from a probe connection (that would use up
    its single test). The server is always killed; every wait is bounded.
    """
    exe = shutil.which("iperf3")
    if exe is None:
        raise BenchError("iperf3 is not installed (apt-get install iperf3)")
    secs = max(1, int(round(seconds)))
    last_err = ""
    for _attempt in range(3):  # a free port can be taken between probe and bind
        port = free_port(host)
        server = subprocess.Popen([exe, "-s", "-1", "-B", host, "-p", str(port), "--forceflush"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            if not _wait_for_line(server, b"Server listening", timeout=5.0):
                last_err = "iperf3 server did not report 'Server listening' within 5s"
                continue
            try:
                out = subprocess.run([exe, "-c", host, "-p", str(port), "-t", str(secs), "-J"],
                                     capture_output=True, timeout=secs + 20)
            except subprocess.TimeoutExpired:
                last_err = f"iperf3 client did not finish within {secs + 20}s"
                continue
            try:
                doc = json.loads(out.stdout)
            except json.JSONDecodeError:
                last_err = f"iperf3 client: no JSON (rc={out.returncode}) {out.stderr.decode()[-500:]}"
                continue
            if "error" in doc:
                last_err = f"iperf3 error: {doc['error']}"
                continue
            end = doc["end"]
            return {"bytes_s": float(end["sum_received"]["bits_per_second"]) / 8.0,
                    "retransmits": end.get("sum_sent", {}).get("retransmits"),
                    "congestion": end.get("sender_tcp_congestion"),
                    "seconds": secs}
        finally:
            kill_process(server, term_timeout=2.0)
            if server.stdout:
                server.stdout.close()
    raise BenchError(f"iperf3 loopback measurement failed: {last_err}")


def _wait_for_line(proc: subprocess.Popen, needle: bytes, *, timeout: float) -> bool:
    """Read proc.stdout (non-blocking, bounded) until a line contains ``needle``."""
    import select
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while needle not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        r, _, _ = select.select([fd], [], [], min(left, 0.2))
        if r:
            chunk = os.read(fd, 4096)
            if not chunk:  # EOF: the server exited
                return needle in buf
            buf += chunk
        elif proc.poll() is not None:
            return False
    return True


# --------------------------------------------------------------------------- measurement

@dataclass
class Stats:
    """Per-operation latencies (ns) and the wall time of one measurement."""

    ops: int
    seconds: float
    lat_ns: list[int] = field(repr=False)
    concurrency: int = 1

    @property
    def ops_s(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0

    def percentile_us(self, q: float) -> float:
        if not self.lat_ns:
            return float("nan")
        s = sorted(self.lat_ns)
        # nearest-rank percentile
        k = min(len(s) - 1, max(0, math.ceil(q / 100.0 * len(s)) - 1))
        return s[k] / 1000.0

    def row(self, system: str, op: str, size: int, **extra: Any) -> dict:
        r = {"system": system, "op": op, "size": size, "concurrency": self.concurrency,
             "ops_s": self.ops_s, "bytes_s": self.ops_s * size,
             "p50_us": self.percentile_us(50), "p99_us": self.percentile_us(99),
             "ops": self.ops, "seconds": self.seconds}
        r.update(extra)
        return r


def measure_sync(fn: Callable[[int, int], Any], duration: float, max_ops: int, *,
                 warmup: float = 0.2) -> Stats:
    """Call ``fn(worker=0, i)`` back to back for ~``duration`` s or ``max_ops`` calls.

    ``i`` counts 0, 1, 2 ... (use it to pick a key). A short untimed warm-up
    (bounded by ``warmup`` seconds and by max_ops // 10 calls) comes first.
    """
    perf = time.perf_counter_ns
    if warmup > 0:
        end = perf() + int(warmup * 1e9)
        for i in range(max(1, max_ops // 10)):
            fn(0, i)
            if perf() >= end:
                break
    lat: list[int] = []
    append = lat.append
    deadline = perf() + int(duration * 1e9)
    start = perf()
    for i in range(max_ops):
        t0 = perf()
        fn(0, i)
        t1 = perf()
        append(t1 - t0)
        if t1 >= deadline:
            break
    return Stats(len(lat), (perf() - start) / 1e9, lat, 1)


async def measure_async(fn: Callable[[int, int], Awaitable[Any]], duration: float, max_ops: int,
                        concurrency: int, *, warmup: float = 0.2) -> Stats:
    """Run ``concurrency`` tasks, each awaiting ``fn(worker, i)`` back to back.

    ``worker`` is the task number (0..concurrency-1, e.g. to pick a per-task
    buffer) and ``i`` a global operation counter shared by all tasks, so the
    total is bounded by ``max_ops`` and by ``duration``. Must be awaited in
    the event loop that owns the client ``fn`` uses.
    """
    perf = time.perf_counter_ns

    async def run(limit: int, seconds: float, lat: list[int] | None) -> None:
        counter = 0
        deadline = perf() + int(seconds * 1e9)

        async def worker(w: int) -> None:
            nonlocal counter
            while counter < limit and perf() < deadline:
                i = counter
                counter += 1
                t0 = perf()
                await fn(w, i)
                if lat is not None:
                    lat.append(perf() - t0)

        tasks = [asyncio.ensure_future(worker(w)) for w in range(concurrency)]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    if warmup > 0:
        await run(max(concurrency, max_ops // 10), warmup, None)
    lat: list[int] = []
    start = perf()
    await run(max_ops, duration, lat)
    return Stats(len(lat), (perf() - start) / 1e9, lat, concurrency)


def measure(fn, duration: float, max_ops: int, concurrency: int = 1, *, warmup: float = 0.2):
    """One entry point for both kinds of callable.

    * a plain function ``fn(worker, i)`` -> returns ``Stats`` (concurrency must be 1);
    * a coroutine function ``async fn(worker, i)`` -> returns a coroutine
      producing ``Stats``; await it inside the loop that owns the client.
    """
    if inspect.iscoroutinefunction(fn):
        return measure_async(fn, duration, max_ops, concurrency, warmup=warmup)
    if concurrency != 1:
        raise ValueError("a sync callable is measured at concurrency 1; pass a coroutine function")
    return measure_sync(fn, duration, max_ops, warmup=warmup)


class MeasurementTimeout(BenchError):
    """A measurement overran its hard bound (a hung peer); the row is reported as an error."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Hard wall-clock bound for blocking (sync) code in the main thread, via SIGALRM.

    The handler raises, so a socket call blocked in the kernel is interrupted
    (PEP 475 retries only when the handler returns normally).
    """
    def on_alarm(signum, frame):
        raise MeasurementTimeout(f"operation did not finish within {seconds:.0f}s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def hard_bound(duration: float, warmup: float) -> float:
    """The hard limit put around one measurement whose soft limit is ``duration``."""
    return duration + warmup + 60.0


def run_measurement(fn, duration: float, max_ops: int, concurrency: int = 1, *,
                    warmup: float = 0.2, loop: asyncio.AbstractEventLoop | None = None) -> Stats:
    """``measure`` plus a hard time bound; async callables run to completion on ``loop``."""
    limit = hard_bound(duration, warmup)
    if inspect.iscoroutinefunction(fn):
        if loop is None:
            raise ValueError("an async callable needs the event loop that owns its client")
        coro = measure(fn, duration, max_ops, concurrency, warmup=warmup)
        try:
            return loop.run_until_complete(asyncio.wait_for(coro, limit))
        except asyncio.TimeoutError:
            raise MeasurementTimeout(f"measurement did not finish within {limit:.0f}s") from None
    with time_limit(limit):
        return measure(fn, duration, max_ops, 1, warmup=warmup)


def new_event_loop(kind: str = "auto") -> tuple[asyncio.AbstractEventLoop, str]:
    """('auto' | 'uvloop' | 'asyncio') -> (loop, name). The same loop kind serves every system."""
    loop, name = None, "asyncio"
    if kind in ("auto", "uvloop"):
        try:
            import uvloop  # type: ignore
            loop, name = uvloop.new_event_loop(), "uvloop"
        except ImportError:
            if kind == "uvloop":
                raise BenchError("uvloop requested but not installed")
    if loop is None:
        loop = asyncio.new_event_loop()

    def quiet_on_exit(lp, ctx):
        # SIGTERM/Ctrl-C unwinds through a running measurement; don't report its tasks
        if not isinstance(ctx.get("exception"), (SystemExit, KeyboardInterrupt)):
            lp.default_exception_handler(ctx)

    loop.set_exception_handler(quiet_on_exit)
    return loop, name


def error_row(system: str, op: str, size: int, concurrency: int, err: BaseException | str) -> dict:
    return {"system": system, "op": op, "size": size, "concurrency": concurrency,
            "ops_s": None, "bytes_s": None, "p50_us": None, "p99_us": None,
            "error": str(err) if isinstance(err, str) else f"{type(err).__name__}: {err}"}


# --------------------------------------------------------------------------- Redis

class RedisServer:
    """A throwaway redis-server on 127.0.0.1:<free port>, no persistence, in a temp dir."""

    def __init__(self, host: str = "127.0.0.1", start_timeout: float = 10.0,
                 extra_args: list[str] | None = None):
        self.host = host
        self.port = 0
        self.start_timeout = start_timeout
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen | None = None
        self.dir: tempfile.TemporaryDirectory | None = None
        self.version = ""

    def __enter__(self) -> "RedisServer":
        exe = shutil.which("redis-server")
        if exe is None:
            raise BenchError("redis-server is not installed (apt-get install redis-server)")
        import redis  # noqa: F401  (fail early and clearly)
        self.dir = tempfile.TemporaryDirectory(prefix="bench-redis-")
        try:
            last = ""
            for _attempt in range(3):
                self.port = free_port(self.host)
                log = os.path.join(self.dir.name, "redis.log")
                self.proc = subprocess.Popen(
                    [exe, "--port", str(self.port), "--bind", self.host, "--save", "",
                     "--appendonly", "no", "--protected-mode", "yes", "--dir", self.dir.name,
                     "--logfile", log, "--daemonize", "no", *self.extra_args],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.dir.name)
                try:
                    self._wait_ping()
                    return self
                except BenchError as e:
                    last = f"{e}; log: {tail(log, 800)}"
                    kill_process(self.proc)
                    self.proc = None
            raise BenchError(f"redis-server did not start: {last}")
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def _wait_ping(self) -> None:
        import redis
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise BenchError(f"redis-server exited (rc={self.proc.returncode})")
            try:
                r = redis.Redis(host=self.host, port=self.port, socket_timeout=1,
                                socket_connect_timeout=0.5)
                try:
                    if r.ping():
                        self.version = str(r.info("server").get("redis_version", ""))
                        return
                finally:
                    r.close()
            except redis.RedisError:
                time.sleep(0.05)
        raise BenchError(f"redis-server on port {self.port} did not answer PING in "
                         f"{self.start_timeout}s")

    def __exit__(self, *exc) -> None:
        kill_process(self.proc)
        self.proc = None
        if self.dir is not None:
            self.dir.cleanup()
            self.dir = None


def redis_rows(port: int, sizes: list[int], concurrencies: list[int], duration: float, *,
               host: str = "127.0.0.1", max_ops: int = 200_000, warmup: float = 0.2,
               loop_kind: str = "auto", log: Callable[[str], None] = print) -> list[dict]:
    """SET (put) and GET (get) rows for every size x concurrency.

    concurrency 1: a plain loop on a sync ``redis.Redis``; c > 1: c tasks in
    this one process sharing ``redis.asyncio.Redis(max_connections=c)``.
    Keys cycle over a working set (>= 64 MiB or >= 16 keys) of one random value.
    """
    import redis
    import redis.asyncio as aredis

    rows: list[dict] = []
    loop, loop_name = new_event_loop(loop_kind)
    try:
        for size in sizes:
            value = os.urandom(size)
            keys = working_set_keys("redis", size)
            nkeys = len(keys)
            sync = redis.Redis(host=host, port=port, socket_timeout=30, socket_connect_timeout=5)
            try:
                # preload so GET always hits, then check that one value round-trips
                with time_limit(120):
                    for start in range(0, nkeys, 64):
                        pipe = sync.pipeline(transaction=False)
                        for k in keys[start:start + 64]:
                            pipe.set(k, value)
                        pipe.execute()
                    if sync.get(keys[-1]) != value:
                        raise BenchError("redis returned a different value than was stored")
                for conc in concurrencies:
                    for op in ("put", "get"):
                        try:
                            if conc == 1:
                                st = run_measurement(_redis_sync_fn(sync, op, keys, value),
                                                     duration, max_ops, 1, warmup=warmup)
                            else:
                                client = aredis.Redis(host=host, port=port, max_connections=conc,
                                                      socket_timeout=30, socket_connect_timeout=5)
                                try:
                                    st = run_measurement(_redis_async_fn(client, op, keys, value),
                                                         duration, max_ops, conc, warmup=warmup,
                                                         loop=loop)
                                finally:
                                    with contextlib.suppress(Exception):
                                        loop.run_until_complete(
                                            asyncio.wait_for(client.aclose(), 10))
                            row = st.row("redis", op, size, loop=loop_name if conc > 1 else "sync",
                                         working_set_keys=nkeys)
                        except Exception as e:  # keep going with the other rows
                            row = error_row("redis", op, size, conc, e)
                        rows.append(row)
                        log(_progress(row))
            finally:
                with contextlib.suppress(Exception), time_limit(30):
                    sync.flushdb()
                sync.close()
    finally:
        loop.close()
    return rows


def _redis_sync_fn(client, op: str, keys: list[bytes], value: bytes):
    nkeys = len(keys)
    if op == "put":
        set_ = client.set

        def fn(w, i):
            set_(keys[i % nkeys], value)
    else:
        get = client.get

        def fn(w, i):
            if get(keys[i % nkeys]) is None:
                raise BenchError("redis GET missed")
    return fn


def _redis_async_fn(client, op: str, keys: list[bytes], value: bytes):
    nkeys = len(keys)
    if op == "put":
        async def fn(w, i):
            await client.set(keys[i % nkeys], value)
    else:
        async def fn(w, i):
            if await client.get(keys[i % nkeys]) is None:
                raise BenchError("redis GET missed")
    return fn


def _progress(row: dict) -> str:
    head = f"  {row['system']:<8} {human_size(row['size']):>7} c={row['concurrency']:<3} {row['op']:<8}"
    if row.get("error"):
        return f"{head} ERROR {row['error']}"
    return (f"{head} {row['bytes_s'] / 1e9:6.2f} GB/s  {row['ops_s']:9.0f} op/s  "
            f"p50 {row['p50_us']:8.1f} us  p99 {row['p99_us']:8.1f} us  ({row['ops']} ops)")


# --------------------------------------------------------------------------- tables

OP_ORDER = {"put": 0, "put_dedup": 1, "get": 2, "get_into": 3}
# row labels; bench_tcp.py holds the last KEEP_GETS (16) get() results
OP_LABELS = {"put": "put (new bytes)", "put_dedup": "put (dedup)", "get": "get (16 kept)",
             "get_into": "get_into"}
HEADERS = ["size", "conc", "op", "transport", "kvstored GB/s", "p50 us", "p99 us",
           "redis GB/s", "lmcache GB/s", "vs redis", "vs lmcache", "vs iperf3"]
# the peer row a kvstored row is compared with (None: no comparable peer operation)
PEER_OP = {"put": "put", "put_dedup": None, "get": "get", "get_into": "get"}


def _fmt(v: float | None, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return format(v, spec)


def _ok(r: dict | None) -> bool:
    return r is not None and not r.get("error") and bool(r.get("bytes_s"))


def table_cells(rows: list[dict], iperf3_bytes_s: float | None) -> list[list[str]]:
    """One line per (size, concurrency, op) of kvstored; Redis and LMCache's server beside it
    (their GET for get and get_into; no peer for dedup, whose ratio column is its time over
    get_into's for the same objects)."""
    by = {(r["system"], r["op"], r["size"], r["concurrency"]): r for r in rows}
    keys = sorted({(r["size"], r["concurrency"], r["op"]) for r in rows if r["system"] == "kvstored"},
                  key=lambda k: (k[0], k[1], OP_ORDER.get(k[2], 9), k[2]))
    out = []
    for size, conc, op in keys:
        kv = by.get(("kvstored", op, size, conc))
        peer_op = PEER_OP.get(op, op)
        rd = by.get(("redis", peer_op, size, conc)) if peer_op else None
        lm = by.get(("lmcache", peer_op, size, conc)) if peer_op else None
        if kv is None or kv.get("error"):
            kvc = ["ERR" if kv else "—", "—", "—"]
        else:
            kvc = [_fmt(kv["bytes_s"] / 1e9, ".2f"), _fmt(kv["p50_us"], ".0f"), _fmt(kv["p99_us"], ".0f")]
        gb = lambda r: _fmt(r["bytes_s"] / 1e9, ".2f") if _ok(r) else ("ERR" if r else "—")  # noqa: E731
        ratio = lambda r: _fmt(kv["bytes_s"] / r["bytes_s"], ".2f") + "x" if _ok(kv) and _ok(r) else "—"  # noqa: E731
        r_iperf = _fmt(kv["bytes_s"] / iperf3_bytes_s, ".2f") if _ok(kv) and iperf3_bytes_s else "—"
        vs_lm = ratio(lm)
        if op == "put_dedup":
            gi = by.get(("kvstored", "get_into", size, conc))
            vs_lm = (f"time {gi['bytes_s'] / kv['bytes_s']:.2f}x get_into's"
                     if _ok(kv) and _ok(gi) else "—")
        out.append([human_size(size), str(conc), OP_LABELS.get(op, op),
                    (kv or {}).get("transport", "?"), *kvc, gb(rd), gb(lm), ratio(rd), vs_lm, r_iperf])
    return out


def format_table(rows: list[dict], iperf3_bytes_s: float | None, cc: str | None = None) -> str:
    """Plain-text table for the terminal (GB/s = 1e9 bytes/s, latencies in microseconds)."""
    cells = table_cells(rows, iperf3_bytes_s)
    widths = [len(h) for h in HEADERS]
    for line in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, line)]
    sep = " | "
    lines = []
    title = f"TCP loopback, congestion control: {cc or '?'}; iperf3 1 stream: " + (
        f"{iperf3_bytes_s / 1e9:.2f} GB/s" if iperf3_bytes_s else "n/a")
    lines.append(title)
    lines.append(sep.join(h.rjust(w) for h, w in zip(HEADERS, widths)))
    lines.append("-+-".join("-" * w for w in widths))
    for line in cells:
        lines.append(sep.join(c.rjust(w) for c, w in zip(line, widths)))
    # Redis against iperf3 as a sanity line (the ratio column is kvstored's)
    if iperf3_bytes_s:
        ref = [r for r in rows if r["system"] == "redis" and not r.get("error") and r.get("bytes_s")]
        if ref:
            best = max(ref, key=lambda r: r["bytes_s"])
            lines.append(f"(best redis row: {best['op']} {human_size(best['size'])} c={best['concurrency']} "
                         f"= {best['bytes_s'] / iperf3_bytes_s:.2f} of iperf3)")
    errs = [r for r in rows if r.get("error")]
    for r in errs:
        lines.append(f"ERR {r['system']} {r['op']} {human_size(r['size'])} c={r['concurrency']}: {r['error']}")
    return "\n".join(lines)


def render_markdown(rows: list[dict], iperf3_bytes_s: float | None, meta: dict | None = None) -> str:
    """Markdown version of ``format_table`` plus the run's settings, for RESULTS.md."""
    meta = meta or {}
    md = []
    cc = meta.get("congestion_control", "?")
    md.append(f"### TCP loopback, congestion control `{cc}`")
    md.append("")
    ip = "n/a"
    if iperf3_bytes_s:
        ip = f"{iperf3_bytes_s / 1e9:.2f} GB/s"
        runs = meta.get("iperf3_runs") or []
        if len(runs) > 1:
            ip += " (median of " + ", ".join(f"{r['when']} {r['bytes_s'] / 1e9:.2f}" for r in runs) + ")"
    facts = [("iperf3, 1 stream", ip), ("congestion control", cc)]
    for k in ("duration_s", "max_ops", "event_loop", "client_env", "kvstored_transport", "machine",
              "kernel", "python", "redis_server", "redis_py", "hiredis", "lmcache", "kvstored",
              "date", "load", "load_after"):
        if k in meta and meta[k] not in (None, ""):
            facts.append((k.replace("_", " "), str(meta[k])))
    md.append(" · ".join(f"{k}: {v}" for k, v in facts))
    md.append("")
    md.append("| " + " | ".join(HEADERS) + " |")
    md.append("|" + "|".join(["---"] * 4 + ["---:"] * (len(HEADERS) - 4)) + "|")
    for line in table_cells(rows, iperf3_bytes_s):
        md.append("| " + " | ".join(line) + " |")
    md.append("")
    md.append("GB/s = 10^9 bytes/s of payload; p50/p99 = per-operation latency in µs "
              "(at concurrency > 1 it includes time queued behind the other in-flight requests); "
              "vs iperf3 = kvstored throughput / iperf3 single-stream loopback throughput "
              "under the same congestion control; vs redis / vs lmcache = kvstored throughput / "
              "the peer's for the same operation (get_into against the peer's get). LMCache's "
              "server is measured at concurrency 1 only.")
    errs = [r for r in rows if r.get("error")]
    if errs:
        md.append("")
        for r in errs:
            md.append(f"- ERR {r['system']} {r['op']} {human_size(r['size'])} c={r['concurrency']}: "
                      f"{r['error']}")
    md.append("")
    return "\n".join(md)


def machine_facts() -> dict:
    facts = {"machine": f"{os.cpu_count()} cores, {platform.machine()}",
             "kernel": platform.release(), "python": platform.python_version(),
             "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    with contextlib.suppress(Exception):
        import redis
        facts["redis_py"] = redis.__version__
    with contextlib.suppress(Exception):
        import hiredis
        facts["hiredis"] = hiredis.__version__
    return facts
