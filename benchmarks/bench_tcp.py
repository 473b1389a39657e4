#!/usr/bin/env python3
"""TCP data-path benchmark: kvstored vs Redis vs LMCache's server vs the iperf3 ceiling.

    python benchmarks/bench_tcp.py [--cc cubic|bbr|system] [--sizes 64KiB,256KiB,1MiB,4MiB]
                                   [--concurrency 1,8] [--duration 2] [--repeat 1]
                                   [--markdown out.md] [--json out.json]

One run = one TCP congestion control (set machine-wide for the run, restored
afterwards), under which it measures, in this order (``--repeat N``: N rounds,
the order of 2-4 reversed in every second round, each row reporting its median
round):

1. iperf3, one stream over 127.0.0.1 (the kernel's ceiling for one connection);
2. Redis (redis-server + redis-py/hiredis): SET and GET per size x concurrency;
3. LMCache's own server (``lmcache_server``) through LMCache's own client
   (``LMCServerConnector``), put and get at concurrency 1, in a subprocess of the
   engines venv (benchmarks/lmcache_peer.py; skipped with a note if it is absent);
4. kvstored (python -m kvstored + the kvstore SDK, ``transport="tcp"``: every kvstored
   row here is TCP, never the same-host shm path): per size x concurrency
   * put (new bytes): every put carries a per-put stamp in its first 16 bytes, so it
     stores bytes not stored before (overwriting a key of a bounded working set);
   * put (dedup): a put of the exact bytes a key holds (answered without storing),
     beside the get of the same objects;
   * get (16 kept): ``get()`` with the last 16 results held, as a retrieval holds its
     blocks until copied out (a result dropped at once flatters any allocator);
   * get_into: into a preallocated buffer.

Every system is timed by the same code (peers.measure): concurrency 1 is a plain
loop on the sync client, concurrency c > 1 is c asyncio tasks in this one process
sharing one async client. The client process runs as a user's would: no malloc
environment tuning (MALLOC_* variables in the environment are reported in the
header). If kvstored cannot be started, its part fails with a clear message and
the rest is still reported.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import inspect
import itertools
import json
import os
import signal
import socket
import struct
import subprocess
import statistics
import sys
import tempfile
import time
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for _i, _p in enumerate((HERE, os.path.join(REPO, "client"), REPO)):
    if _p not in sys.path:
        sys.path.insert(_i, _p)

import peers  # noqa: E402
from peers import (BenchError, MiB, error_row, human_size, kill_process,  # noqa: E402
                   new_event_loop, run_measurement, tail, working_set_keys)

DEFAULT_SIZES = "64KiB,256KiB,1MiB,4MiB"
KEEP_GETS = 16  # get() results held at once (a retrieval keeps its blocks until copied out)


class KvstoredUnavailable(BenchError):
    """kvstored (daemon or SDK) cannot be benchmarked in this checkout; the message says why."""


# --------------------------------------------------------------------------- daemon

class KvstoredDaemon:
    """``python -m kvstored`` on 127.0.0.1 with OS-chosen ports; ready when it writes --ready-file."""

    def __init__(self, cc: str, *, dram_size: str = "2GiB", max_value_size: int = 8 * MiB,
                 slab_size: int = 8 * MiB, extra_args: list[str] | None = None,
                 start_timeout: float = 20.0, python: str = sys.executable):
        self.cc = cc
        self.dram_size = dram_size
        self.max_value_size = max_value_size
        self.slab_size = slab_size
        self.extra_args = extra_args or []
        self.start_timeout = start_timeout
        self.python = python
        self.proc: subprocess.Popen | None = None
        self.dir: tempfile.TemporaryDirectory | None = None
        self.log_path = ""
        self.info: dict = {}

    @property
    def control_port(self) -> int:
        return int(self.info["control_port"])

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.control_port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 1500) -> str:
        return tail(self.log_path, n).strip()

    def __enter__(self) -> "KvstoredDaemon":
        self.dir = tempfile.TemporaryDirectory(prefix="bench-kvstored-")
        try:
            ready = os.path.join(self.dir.name, "ready.json")
            self.log_path = os.path.join(self.dir.name, "kvstored.log")
            cmd = [self.python, "-m", "kvstored", "--host", "127.0.0.1", "--port", "0",
                   "--data-port", "0", "--dram-size", self.dram_size,
                   "--max-value-size", human_size(self.max_value_size),
                   "--slab-size", human_size(self.slab_size),
                   "--tcp-congestion", self.cc, "--metrics-port", "0",  # never clash with a running node
                   "--ready-file", ready, *self.extra_args]
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(
                [REPO, os.path.join(REPO, "client")] +
                ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
            with open(self.log_path, "wb") as logf:
                self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                             stdout=logf, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + self.start_timeout
            while True:
                if self.proc.poll() is not None:
                    raise KvstoredUnavailable(
                        f"kvstored exited during start-up (rc={self.proc.returncode}); "
                        f"command: {' '.join(cmd)}\n--- log tail ---\n{self.log_tail()}")
                if os.path.exists(ready):
                    try:
                        with open(ready) as f:
                            info = json.load(f)
                        if "control_port" in info and "data_port" in info:
                            self.info = info
                            return self
                    except (OSError, ValueError):
                        pass  # partially written; poll again
                if time.monotonic() > deadline:
                    raise KvstoredUnavailable(
                        f"kvstored did not write its ready file within {self.start_timeout:.0f}s; "
                        f"command: {' '.join(cmd)}\n--- log tail ---\n{self.log_tail()}")
                time.sleep(0.05)
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def __exit__(self, *exc) -> None:
        kill_process(self.proc, term_timeout=10.0)
        self.proc = None
        if self.dir is not None:
            self.dir.cleanup()
            self.dir = None


# --------------------------------------------------------------------------- SDK

def import_sdk():
    """The kvstore SDK module, or KvstoredUnavailable saying what is missing."""
    try:
        import kvstore  # type: ignore
    except Exception as e:
        raise KvstoredUnavailable(f"cannot import the kvstore SDK from {REPO}/client: "
                                  f"{type(e).__name__}: {e}") from e
    missing = [n for n in ("Client", "AsyncClient") if not hasattr(kvstore, n)]
    if missing:
        raise KvstoredUnavailable(
            f"the kvstore SDK ({getattr(kvstore, '__file__', None) or '?'}) has no "
            f"{' / '.join(missing)} yet (the SDK is still being written)")
    return kvstore


def _accepts(method, name: str) -> bool:
    try:
        return name in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False


OPS = ["put", "put_dedup", "get", "get_into"]


def kvstored_rows(sizes: list[int], concurrencies: list[int], duration: float, *,
                  cc: str, max_ops: int = 200_000, warmup: float = 0.2, loop_kind: str = "auto",
                  namespace: str = "bench", dram_size: str = "2GiB",
                  daemon_args: list[str] | None = None,
                  log: Callable[[str], None] = print) -> tuple[list[dict], dict]:
    """put (new bytes) / put (dedup) / get / get_into rows for every size x concurrency,
    all over TCP, and facts about the daemon.

    Raises KvstoredUnavailable when the SDK or the daemon is missing or does
    not start; errors of single measurements become error rows.
    """
    kvstore = import_sdk()
    max_size = max(sizes)
    rows: list[dict] = []
    facts: dict = {}
    with KvstoredDaemon(cc, dram_size=dram_size, max_value_size=max(8 * MiB, max_size),
                        slab_size=max(8 * MiB, max_size), extra_args=daemon_args) as daemon:
        facts["kvstored"] = (f"--dram-size {daemon.dram_size} --slab-size {human_size(daemon.slab_size)} "
                             f"--max-value-size {human_size(daemon.max_value_size)} "
                             f"--tcp-congestion {cc}")
        log(f"kvstored up: pid {daemon.info.get('pid')}, control :{daemon.control_port}, "
            f"data :{daemon.info.get('data_port')} ({facts['kvstored']})")
        loop, loop_name = new_event_loop(loop_kind)
        client = kvstore.Client(daemon.address, transport="tcp", **client_kwargs(kvstore.Client, cc))
        try:
            client.ping()
            if client.transport != "tcp":
                raise KvstoredUnavailable(f"asked for TCP, the client uses {client.transport}")
            facts["kvstored_transport"] = "tcp (Client(transport='tcp'); AsyncClient is TCP only)"
            for run_id, size in enumerate(sizes):
                if not daemon.alive():
                    raise KvstoredUnavailable(f"kvstored died (rc={daemon.proc.returncode if daemon.proc else '?'})"
                                              f"\n--- log tail ---\n{daemon.log_tail()}")
                value = os.urandom(size)
                keys = working_set_keys("kv", size)
                try:
                    with peers.time_limit(120):
                        _preload(client, keys, value, namespace)
                except Exception as e:
                    for conc in concurrencies:
                        for op in OPS:
                            rows.append(error_row("kvstored", op, size, conc, f"preload failed: {e}"))
                            log(peers._progress(rows[-1]))
                    continue
                for conc in concurrencies:
                    for op in OPS:
                        if not daemon.alive():
                            row = error_row("kvstored", op, size, conc, "daemon is not running")
                        else:
                            try:
                                st = _kv_measure(kvstore, daemon.address, loop, op, size,
                                                 conc, keys, value, namespace,
                                                 f"r{run_id}c{conc}", duration, max_ops, warmup, cc)
                                row = st.row("kvstored", op, size, transport="tcp",
                                             loop=loop_name if conc > 1 else "sync",
                                             working_set_keys=len(keys))
                            except Exception as e:
                                row = error_row("kvstored", op, size, conc, e)
                        rows.append(row)
                        log(peers._progress(row))
                _cleanup(client, keys, namespace)
        finally:
            with contextlib.suppress(Exception), peers.time_limit(10):
                client.close()
            loop.close()
        if not daemon.alive():
            log(f"WARNING: kvstored exited during the run\n{daemon.log_tail()}")
    return rows, facts


def _preload(client, keys: list[bytes], value: bytes, ns: str) -> None:
    for k in keys:
        client.put(k, value, namespace=ns)
    got = client.get(keys[-1], namespace=ns)
    if bytes(got) != value:
        raise BenchError(f"kvstored returned a different value than was stored "
                         f"({len(got)} bytes vs {len(value)})")
    buf = bytearray(len(value))
    n = client.get_into(keys[0], buf, namespace=ns)
    if n != len(value) or buf != value:
        raise BenchError(f"kvstored get_into returned {n} bytes / different content")


def _cleanup(client, keys: list[bytes], ns: str) -> None:
    """Best effort: drop the working set so sizes do not compete for DRAM (eviction would anyway)."""
    with contextlib.suppress(Exception), peers.time_limit(30):
        for start in range(0, len(keys), 256):
            client.delete(keys[start:start + 256], namespace=ns)


def client_kwargs(cls, cc: str) -> dict:
    """Pin the SDK's data sockets to the run's algorithm too, where the SDK lets us."""
    return {"tcp_congestion": cc} if _accepts(cls, "tcp_congestion") else {}


_NONCE = int.from_bytes(os.urandom(8), "little")
_STAMPS = itertools.count(1)


def _stamper(value: bytes, n: int):
    """``n`` private copies of ``value`` and ``stamp(w)``: new bytes in copy ``w`` for the
    next put (a per-process nonce and a counter in its first 16 bytes). One copy per
    in-flight put: a buffer is never changed while a put may still be sending it."""
    bufs = [bytearray(value) for _ in range(n)]
    heads = [memoryview(b)[:min(16, len(b))] for b in bufs]

    def stamp(w: int) -> bytearray:
        h = heads[w]
        h[:] = struct.pack("<QQ", _NONCE, next(_STAMPS))[:len(h)]
        return bufs[w]
    return stamp


def _kv_measure(kvstore, address, loop, op, size, conc, keys, value, ns,
                tag, duration, max_ops, warmup, cc) -> peers.Stats:
    nkeys = len(keys)
    # new-bytes puts go to their own keys (cycling, overwrite): the read keys keep `value`
    put_keys = [f"put-{tag}-{size}-{j}".encode() for j in range(nkeys)]
    stamp = _stamper(value, conc)
    held: collections.deque = collections.deque(maxlen=KEEP_GETS)
    if conc == 1:
        client = kvstore.Client(address, transport="tcp", **client_kwargs(kvstore.Client, cc))
        try:
            if op == "put":
                put = client.put

                def fn(w, i):
                    put(put_keys[i % nkeys], stamp(0), namespace=ns, overwrite=True)
            elif op == "put_dedup":
                put = client.put

                def fn(w, i):
                    if put(keys[i % nkeys], value, namespace=ns, overwrite=True):
                        raise BenchError("a dedup put stored bytes (they were not there)")
            elif op == "get":
                get = client.get

                def fn(w, i):
                    held.append(get(keys[i % nkeys], namespace=ns))
            else:
                get_into = client.get_into
                buf = bytearray(size)

                def fn(w, i):
                    n = get_into(keys[i % nkeys], buf, namespace=ns)
                    if n != size:
                        raise BenchError(f"get_into returned {n} bytes, expected {size}")
            st = run_measurement(fn, duration, max_ops, 1, warmup=warmup)
            if client.transport != "tcp":
                raise BenchError(f"the client used {client.transport}, not tcp")
            return st
        finally:
            held.clear()
            client.close()

    async def open_client():
        c = kvstore.AsyncClient(address, **client_kwargs(kvstore.AsyncClient, cc))
        await c.connect()
        # these rows are TCP's: should AsyncClient ever take the same-host shm path, say so
        proto = getattr(c, "_proto", None)
        sock = proto.transport.get_extra_info("socket") if proto is not None else None
        if sock is not None and sock.family not in (socket.AF_INET, socket.AF_INET6):
            await c.close()
            raise BenchError(f"AsyncClient's data connection is not TCP ({sock.family!r})")
        return c

    ac = loop.run_until_complete(asyncio_wait_for(open_client(), 20))
    try:
        if op == "put":
            async def fn(w, i):
                await ac.put(put_keys[i % nkeys], stamp(w), namespace=ns, overwrite=True)
        elif op == "put_dedup":
            async def fn(w, i):
                if await ac.put(keys[i % nkeys], value, namespace=ns, overwrite=True):
                    raise BenchError("a dedup put stored bytes (they were not there)")
        elif op == "get":
            async def fn(w, i):
                held.append(await ac.get(keys[i % nkeys], namespace=ns))
        else:
            bufs = [bytearray(size) for _ in range(conc)]

            async def fn(w, i):
                n = await ac.get_into(keys[i % nkeys], bufs[w], namespace=ns)
                if n != size:
                    raise BenchError(f"get_into returned {n} bytes, expected {size}")
        return run_measurement(fn, duration, max_ops, conc, warmup=warmup, loop=loop)
    finally:
        held.clear()
        with contextlib.suppress(Exception):
            loop.run_until_complete(asyncio_wait_for(ac.close(), 10))


# --------------------------------------------------------------------------- LMCache

def lmcache_rows(sizes: list[int], duration: float, *, max_ops: int, cc: str,
                 log: Callable[[str], None] = print) -> tuple[list[dict], dict]:
    """put / get rows of ``lmcache_server`` through LMCache's client (concurrency 1), run
    with the engines venv's Python (benchmarks/lmcache_peer.py). BenchError if absent."""
    py = os.path.join(REPO, ".venv", "engines", "bin", "python")
    server = os.path.join(REPO, ".venv", "engines", "bin", "lmcache_server")
    if not (os.path.exists(py) and os.path.exists(server)):
        raise BenchError("no LMCache here: `make engines-env` installs it into .venv/engines")
    port = peers.free_port()
    with tempfile.TemporaryFile() as logf:
        proc = subprocess.Popen([server, "127.0.0.1", str(port)], stdout=logf,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60  # it imports torch: slow on a loaded machine
            while True:
                if proc.poll() is not None:
                    logf.seek(0)
                    raise BenchError(f"lmcache_server exited (rc={proc.returncode}): "
                                     f"{logf.read()[-800:].decode(errors='replace')}")
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                    break
                if time.monotonic() > deadline:
                    raise BenchError("lmcache_server did not listen within 60 s")
                time.sleep(0.2)
            cmd = [py, os.path.join(HERE, "lmcache_peer.py"), "--port", str(port),
                   "--sizes", ",".join(str(s) for s in sizes), "--duration", str(duration),
                   "--keep", str(KEEP_GETS), "--max-ops", str(max_ops)]
            out = subprocess.run(cmd, capture_output=True, text=True,
                                 timeout=120 + 4 * duration * len(sizes))
            if out.returncode != 0:
                raise BenchError(f"lmcache_peer.py failed (rc={out.returncode}): {out.stderr[-800:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
        finally:
            kill_process(proc)
    rows = []
    for r in res["rows"]:
        ops_s = r["ops"] / r["seconds"]
        row = {"system": "lmcache", "op": r["op"], "size": r["size"], "concurrency": 1,
               "ops_s": ops_s, "bytes_s": r["bytes_s"], "p50_us": r["p50_us"],
               "p99_us": r["p99_us"], "ops": r["ops"], "seconds": r["seconds"], "transport": "tcp"}
        rows.append(row)
        log(peers._progress(row))
    return rows, {"lmcache": f"lmcache_server {res.get('lmcache', '?')} (LMCServerConnector, "
                             f"get keeps {KEEP_GETS})"}


def asyncio_wait_for(coro, seconds: float):
    import asyncio
    return asyncio.wait_for(coro, seconds)


# --------------------------------------------------------------------------- CLI

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cc", default="system",
                    help="TCP congestion control for the whole run: cubic, bbr, ... or 'system' "
                         "(leave the machine's setting; default)")
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help=f"value sizes (default {DEFAULT_SIZES})")
    ap.add_argument("--concurrency", default="1,8",
                    help="outstanding requests from one client process (default 1,8)")
    ap.add_argument("--duration", type=float, default=2.0, help="seconds per measurement (default 2)")
    ap.add_argument("--warmup", type=float, default=0.2, help="untimed seconds before each (default 0.2)")
    ap.add_argument("--max-ops", type=int, default=200_000,
                    help="operation cap per measurement (default 200000)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds of the whole sequence (iperf3, Redis, LMCache, kvstored, iperf3); "
                         "each row reports its median round, iperf3 the median of all its runs "
                         "(default 1). On a shared machine the load drifts within a run: rounds "
                         "spread each system's measurements over the same span")
    ap.add_argument("--iperf-seconds", type=float, default=3.0, help="iperf3 run length (default 3)")
    ap.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto",
                    help="event loop for concurrency > 1, same for every system (default: uvloop "
                         "if installed)")
    ap.add_argument("--namespace", default="bench", help="kvstored namespace (default bench)")
    ap.add_argument("--dram-size", default="2GiB", help="kvstored --dram-size (default 2GiB)")
    ap.add_argument("--daemon-arg", action="append", default=[],
                    help="extra argument for python -m kvstored (repeatable)")
    ap.add_argument("--skip-iperf3", action="store_true")
    ap.add_argument("--skip-redis", action="store_true")
    ap.add_argument("--skip-kvstored", action="store_true")
    ap.add_argument("--skip-lmcache", action="store_true")
    ap.add_argument("--markdown", metavar="FILE", help="also write the table as markdown")
    ap.add_argument("--json", metavar="FILE", help="also write meta + rows as JSON")
    args = ap.parse_args(argv)
    try:
        args.size_list = [peers.parse_size(s) for s in args.sizes.split(",") if s.strip()]
        args.conc_list = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError as e:
        ap.error(str(e))
    if not args.size_list or not args.conc_list or min(args.conc_list) < 1 or min(args.size_list) < 1:
        ap.error("need at least one size >= 1 byte and one concurrency >= 1")
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    if args.duration <= 0 or args.max_ops < 1:
        ap.error("--duration must be > 0 and --max-ops >= 1")
    return args


def _on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds the with-blocks: peers stopped, sysctl restored


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)

    meta = peers.machine_facts()
    meta.update(duration_s=args.duration, max_ops=args.max_ops,
                sizes=[human_size(s) for s in args.size_list], concurrency=args.conc_list,
                client_env=" ".join(f"{k}={v}" for k, v in sorted(os.environ.items())
                                    if k.startswith("MALLOC_")) or "untuned (glibc default)",
                load=_loadavg())
    rows: list[dict] = []
    iperf3_bps = None
    kv_error = None
    want = None if args.cc == "system" else args.cc
    try:
        with peers.congestion_control(want) as cc:
            meta["congestion_control"] = cc
            _, meta["event_loop"] = _loop_name(args.loop)
            print(f"congestion control: {cc}" + (" (system setting)" if want is None else
                                                 " (set for this run)"), flush=True)
            iperf3_runs: list[dict] = []
            loads: list[str] = []
            for rnd in range(args.repeat):
                if args.repeat > 1:
                    loads.append(_loadavg())
                    print(f"--- round {rnd + 1} of {args.repeat} (load {loads[-1]})", flush=True)
                if not args.skip_iperf3:
                    _iperf3(args, cc, f"before{_rnd(rnd, args)}", iperf3_runs)
                # odd rounds run the peers first, even rounds kvstored first: a load that
                # drifts during a round then favours neither side
                phases = ["redis", "lmcache", "kvstored"]
                for phase in (phases if rnd % 2 == 0 else phases[::-1]):
                    got, err = _phase(phase, args, cc, meta)
                    rows += _tag(rnd, got)
                    kv_error = err or kv_error
                if not args.skip_iperf3:
                    _iperf3(args, cc, f"after{_rnd(rnd, args)}", iperf3_runs)
            meta["load_after"] = _loadavg()
            if loads:
                meta["load_per_round"] = loads
            if iperf3_runs:
                # the ceiling drifts on a shared 2-core VM: measure it on both sides (of every
                # round), use the median
                iperf3_bps = statistics.median(r["bytes_s"] for r in iperf3_runs)
                meta["iperf3_runs"] = iperf3_runs
            if args.repeat > 1:
                meta["rounds"] = args.repeat
                rows = median_rows(rows)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

    if kv_error:
        meta["kvstored_error"] = kv_error.splitlines()[0]
    print()
    print(peers.format_table(rows, iperf3_bps, meta.get("congestion_control")))
    if kv_error:
        print(f"\nkvstored columns are empty: {kv_error.splitlines()[0]}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(peers.render_markdown(rows, iperf3_bps, meta))
        print(f"wrote {args.markdown}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "iperf3_bytes_s": iperf3_bps, "rows": rows}, f, indent=1,
                      default=str)
            f.write("\n")
        print(f"wrote {args.json}")
    return 0


def _phase(name: str, args, cc: str, meta: dict) -> tuple[list[dict], str | None]:
    """One system's rows for every size x concurrency (and kvstored's error, if it could not
    run); a peer that cannot run is reported and skipped."""
    if name == "redis" and not args.skip_redis:
        try:
            with peers.RedisServer() as rs:
                meta["redis_server"] = rs.version
                print(f"redis-server {rs.version} on port {rs.port}", flush=True)
                return peers.redis_rows(rs.port, args.size_list, args.conc_list, args.duration,
                                        max_ops=args.max_ops, warmup=args.warmup,
                                        loop_kind=args.loop, log=_log), None
        except BenchError as e:
            print(f"redis: FAILED: {e}", flush=True)
    elif name == "lmcache" and not args.skip_lmcache:
        try:
            lm, facts = lmcache_rows(args.size_list, args.duration, max_ops=args.max_ops, cc=cc,
                                     log=_log)
            meta.update(facts)
            return lm, None
        except (BenchError, subprocess.TimeoutExpired, ValueError) as e:
            print(f"lmcache: SKIPPED: {e}", flush=True)
    elif name == "kvstored" and not args.skip_kvstored:
        try:
            kv, facts = kvstored_rows(args.size_list, args.conc_list, args.duration, cc=cc,
                                      max_ops=args.max_ops, warmup=args.warmup,
                                      loop_kind=args.loop, namespace=args.namespace,
                                      dram_size=args.dram_size, daemon_args=args.daemon_arg,
                                      log=_log)
            meta.update(facts)
            return kv, None
        except BenchError as e:
            print(f"kvstored: SKIPPED: {e}", flush=True)
            return [], str(e)
    return [], None


def _rnd(rnd: int, args) -> str:
    return f" {rnd + 1}" if args.repeat > 1 else ""


def _tag(rnd: int, rows: list[dict]) -> list[dict]:
    for r in rows:
        r["round"] = rnd + 1
    return rows


def median_rows(rows: list[dict]) -> list[dict]:
    """One row per (system, op, size, concurrency): the round with the median rate (the
    lower of the two middle ones for an even count), its figures kept together; the
    rates of every round are in ``rounds_bytes_s``. Errors count only if every round
    failed."""
    groups: dict = collections.defaultdict(list)
    for r in rows:
        groups[(r["system"], r["op"], r["size"], r["concurrency"])].append(r)
    out = []
    for g in groups.values():
        ok = [r for r in g if not r.get("error") and r.get("bytes_s")]
        if not ok:
            out.append(g[0])
            continue
        ok.sort(key=lambda r: r["bytes_s"])
        pick = dict(ok[(len(ok) - 1) // 2])
        pick["rounds_bytes_s"] = [r["bytes_s"] for r in sorted(ok, key=lambda r: r["round"])]
        out.append(pick)
    return out


def _iperf3(args, cc: str, when: str, runs: list[dict]) -> None:
    try:
        ip = peers.iperf3_loopback_detail(args.iperf_seconds)
    except BenchError as e:
        print(f"iperf3 ({when}): FAILED: {e}", flush=True)
        return
    ip["when"] = when
    runs.append(ip)
    print(f"iperf3 loopback ({when}), 1 stream, {ip['seconds']}s: {ip['bytes_s'] / 1e9:.2f} GB/s "
          f"(sender congestion control {ip['congestion']}, {ip['retransmits']} retransmits)",
          flush=True)
    if ip["congestion"] and ip["congestion"] != cc:
        print(f"WARNING: iperf3 reports congestion control {ip['congestion']!r}, expected {cc!r}",
              flush=True)


def _loop_name(kind: str):
    loop, name = new_event_loop(kind)
    loop.close()
    return None, name


def _loadavg() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    return "?"


def _log(msg: str) -> None:
    print(msg, flush=True)


if __name__ == "__main__":
    sys.exit(main())
