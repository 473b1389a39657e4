#!/usr/bin/env python3
"""Server CPU per put: kvstored (one node, TCP) beside Redis, in the same run.

    python benchmarks/bench_put_cpu.py [--sizes 4KiB,64KiB,1MiB] [--concurrency 8]
                                       [--seconds 3] [--rounds 2] [--skip-redis]
                                       [--nvme-dir DIR [--nvme-size 2GiB]] [--auth]
    python benchmarks/bench_put_cpu.py --nodes 6 --objects 32 [--sizes 1MiB]
    python benchmarks/bench_put_cpu.py --exists-keys 65536 [--exists-calls 20]
    python benchmarks/bench_put_cpu.py --in-process [--sizes 4KiB,64KiB] [--per-read 8]
                                       [--query-keys 20000]

What users compare is bytes stored per second per server core, so each row reports the
server process's CPU (utime + stime of all its threads, from /proc, over the timed
window) per put and the bytes it stored per CPU-second, beside the rate and the client's
CPU. Both servers are driven the same way: one asyncio client on uvloop in this process
with ``--concurrency`` tasks (kvstored: one ``AsyncClient``; Redis: redis.asyncio with as
many pooled connections).

* kvstored puts new bytes under new keys (a counter), as an inference engine stores new
  blocks; its arena (``--dram-size``, default 256MiB) fills within the first seconds and
  the node evicts from then on, so eviction is in the figure;
* Redis SETs new bytes over a bounded set of keys (``--keys`` per size: it has no
  eviction configured, and the bytes stored are the same per put).

``--nvme-dir DIR``: the node has an NVMe tier, a file of ``--nvme-size`` in DIR (a fleet
node always has one): past the high watermark each put's publish starts demotions, and
their writes are in the node's CPU. ``--auth``: auth is on and the client shows a token
that may write the benchmark's namespace (production nodes often run so).

``--nodes N`` instead: N nodes and one ClusterClient (``--policy``, default ``none``; TCP, no shm)
putting batches of ``--objects`` new keys, the nodes' CPU summed (what
benchmarks/cluster_put_loop.py runs, measured over an exact window).

* floor: the least a node can do per put, as a third peer: one process receives a
  stream of ``size``-byte messages (a sender process writes them back to back over one
  TCP connection) into the next slot of a memfd arena as large as kvstored's, and xxh3s
  each (the kernel's one copy and the checksum; no protocol, no index, no answers).

``--exists-keys N`` instead: the server CPU per key of a control-plane ``Exists`` of N
stored keys (every hit an eviction touch) beside Redis's ``EXISTS`` of N keys.

``--in-process``: no sockets and no second process, so the figures do not follow the
machine's load: a node's ``DataConnection`` (the node's Store, DataServer and metrics
observer, its arena full so every put evicts) fed pipelined puts of new keys as uvloop
would, ``--per-read`` frames per read, the answers taken by a fake transport. Per put:
Python bytecodes and calls (``sys.settrace``, deterministic) and the best wall time and
process CPU time of 7 runs (``--auth``: the connection authenticates first; ``--nvme-dir``:
the store has an NVMe tier and an arena that holds every put, none evicts). Then (``--query-keys``, 0 to skip) the Store's ``exists`` and ``lookup`` of stored
keys, one key a call, 64, and all in one call, per key: the index lookup and the eviction
touch of each hit.

Rounds alternate the order (kvstored first, then the peers; then the reverse); each row
is the median round. Load (``/proc/loadavg``) is printed beside every round: on a shared machine CPU
per op is steadier than the rate, which follows the scheduler.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import mmap
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for _i, _p in enumerate((HERE, os.path.join(REPO, "client"), REPO)):
    if _p not in sys.path:
        sys.path.insert(_i, _p)

import peers  # noqa: E402
from bench_tcp import KvstoredDaemon, _stamper  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) of process ``pid``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14, 15)


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


async def _drive(put, conc: int, seconds: float, seq) -> int:
    """Run ``put(w, next(seq))`` in ``conc`` tasks for ``seconds``; the puts done."""
    done = 0
    stop_at = time.monotonic() + seconds

    async def worker(w: int) -> None:
        nonlocal done
        for _ in range(10_000_000):  # bounded: the clock ends it long before
            if time.monotonic() >= stop_at:
                return
            await put(w, next(seq))
            done += 1

    await asyncio.gather(*(worker(w) for w in range(conc)))
    return done


def measure(loop, put, pid: int, conc: int, size: int, seconds: float, warmup: float) -> dict:
    """A warm-up, then one timed window: the server's and this process's CPU, puts done."""
    seq = itertools.count()  # one sequence: the timed puts never repeat a warm-up key
    loop.run_until_complete(_drive(put, conc, warmup, seq))
    s0, c0, t0 = proc_cpu(pid), time.process_time(), time.perf_counter()
    n = loop.run_until_complete(_drive(put, conc, seconds, seq))
    s1, c1, t1 = proc_cpu(pid), time.process_time(), time.perf_counter()
    wall = t1 - t0
    return {"ops": n, "wall": wall, "gbs": n * size / wall / 1e9,
            "server_us": (s1 - s0) / max(n, 1) * 1e6, "client_us": (c1 - c0) / max(n, 1) * 1e6,
            "server_cores": (s1 - s0) / wall,
            "gbs_per_core": n * size / max(s1 - s0, 1e-9) / 1e9, "load": loadavg()}


def _floor_sender(port: int, size: int, seconds: float) -> None:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = os.urandom(size)
    end = time.monotonic() + seconds
    try:
        for _ in range(10_000_000):  # bounded: the clock ends it long before
            if time.monotonic() >= end:
                break
            s.sendall(buf)
    except OSError:
        pass
    s.close()


def _floor_receiver(size: int, seconds: float, warmup: float, arena_size: int, out) -> None:
    """The least a node can do per put: receive ``size`` bytes into the next slot of a
    memfd arena (the kernel's one copy) and xxh3 them; no protocol, no index."""
    import xxhash
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    sender = multiprocessing.Process(target=_floor_sender,
                                     args=(ls.getsockname()[1], size, warmup + seconds + 1))
    sender.start()
    c, _ = ls.accept()
    fd = os.memfd_create("floor-arena")
    os.ftruncate(fd, arena_size)
    arena = memoryview(mmap.mmap(fd, arena_size))
    for i in range(0, arena_size, 4096):  # prefaulted, as the daemon's arena
        arena[i] = 0
    slots = max(arena_size // size, 1)
    n = slot = 0
    t_start = time.monotonic()
    c0 = t0 = None
    for _ in range(100_000_000):
        if c0 is None and time.monotonic() - t_start >= warmup:
            c0, t0, n = time.process_time(), time.perf_counter(), 0
        if c0 is not None and time.perf_counter() - t0 >= seconds:
            break
        dst = arena[slot * size:(slot + 1) * size]
        got = 0
        while got < size:
            k = c.recv_into(dst[got:])
            if k == 0:
                break
            got += k
        if got < size:
            break
        xxhash.xxh3_64_intdigest(dst)
        n += 1
        slot = (slot + 1) % slots
    cpu, wall = time.process_time() - (c0 or 0), time.perf_counter() - (t0 or 0)
    c.close()
    sender.join(10)
    out.send({"ops": n, "wall": wall, "gbs": n * size / wall / 1e9,
              "server_us": cpu / max(n, 1) * 1e6, "client_us": float("nan"),
              "server_cores": cpu / wall, "gbs_per_core": n * size / max(cpu, 1e-9) / 1e9,
              "load": loadavg()})


def floor_round(size: int, seconds: float, warmup: float, arena_size: int) -> dict:
    """``_floor_receiver`` in a process of its own (its CPU is the figure)."""
    mine, theirs = multiprocessing.Pipe()
    p = multiprocessing.Process(target=_floor_receiver,
                                args=(size, seconds, warmup, arena_size, theirs))
    p.start()
    if not mine.poll(warmup + seconds + 30):
        p.kill()
        raise RuntimeError("the receive-floor peer gave no result")
    m = mine.recv()
    p.join(10)
    return m


def kvstored_round(loop, kvstore, daemon: KvstoredDaemon, size: int, conc: int, seconds: float,
                   warmup: float, tag: str, token: str | None = None) -> dict:
    stamp = _stamper(os.urandom(size), conc)

    async def open_client():
        c = kvstore.AsyncClient(daemon.address, token=token)
        await c.connect()
        return c

    ac = loop.run_until_complete(open_client())
    try:
        async def put(w: int, i: int) -> None:
            await ac.put(f"{tag}-{i}".encode(), stamp(w), namespace="cpu")
        return measure(loop, put, daemon.proc.pid, conc, size, seconds, warmup)
    finally:
        loop.run_until_complete(ac.close())


def redis_round(loop, server: peers.RedisServer, size: int, conc: int, seconds: float,
                warmup: float, keys: int) -> dict:
    import redis.asyncio as aredis
    stamp = _stamper(os.urandom(size), conc)
    r = aredis.Redis(host=server.host, port=server.port, max_connections=conc)
    try:
        async def put(w: int, i: int) -> None:
            await r.set(f"cpu-{size}-{i % keys}", bytes(stamp(w)))
        return measure(loop, put, server.proc.pid, conc, size, seconds, warmup)
    finally:
        loop.run_until_complete(r.aclose())


def exists_rows(a, cc: str) -> None:
    """``--exists-keys N``: the server CPU of a control-plane ``Exists`` of N stored keys
    (each hit an eviction touch), per key, beside Redis's ``EXISTS`` of as many keys."""
    import kvstore
    n, calls = a.exists_keys, a.exists_calls
    keys = [b"x-%d" % i for i in range(n)]
    rows = []
    with KvstoredDaemon(cc, dram_size=a.dram_size, max_value_size=4 << 20, slab_size=4 << 20) as kd:
        with kvstore.Client(kd.address, namespace="ex", timeout=60) as c:
            for i in range(0, n, 1024):
                c.batch_put([(k, bytes(256)) for k in keys[i:i + 1024]])
            if sum(c.exists(keys)) != n:
                raise RuntimeError("the keys put are not all stored (is --dram-size too small?)")
            c0, t0 = proc_cpu(kd.proc.pid), time.perf_counter()
            for _ in range(calls):
                c.exists(keys)
            rows.append(("kvstored", proc_cpu(kd.proc.pid) - c0, time.perf_counter() - t0))
    if not a.skip_redis:
        import redis
        with peers.RedisServer() as rs:
            r = redis.Redis(host=rs.host, port=rs.port)
            for i in range(0, n, 1024):
                r.mset({k: bytes(256) for k in keys[i:i + 1024]})
            if r.exists(*keys) != n:
                raise RuntimeError("redis does not hold the keys put")
            c0, t0 = proc_cpu(rs.proc.pid), time.perf_counter()
            for _ in range(calls):
                r.exists(*keys)
            rows.append(("redis", proc_cpu(rs.proc.pid) - c0, time.perf_counter() - t0))
            r.close()
    print(f"Exists of {n} stored keys, {calls} calls, load {loadavg()}:")
    print("| server | server CPU us/key | wall us/key (client included) |")
    print("| --- | --- | --- |")
    for who, cpu, wall in rows:
        print(f"| {who} | {cpu / (n * calls) * 1e6:.3f} | {wall / (n * calls) * 1e6:.3f} |")


def in_process(sizes: list[int], per_read: int, dram: int, nvme_dir: str = "",
               token: str | None = None, tokens_file: str = "") -> None:
    """``--in-process`` (see the module docstring). ``nvme_dir``: the store has an NVMe
    tier there, and an arena large enough for every put (below the high watermark: no
    demotion, which would need the loop to run its writes). ``token``: auth on (the
    tokens in ``tokens_file``), the connection authenticates first."""
    from kvstore.wire import OP_AUTH, OP_PUT, checksum, encode_request
    from kvstored.auth import Auth
    from kvstored.config import Config
    from kvstored.dataplane.tcp import DataConnection, DataServer
    from kvstored.engine import Store
    from kvstored.engine.nvme import NvmeDevice, NvmeTier
    from kvstored.metrics import StoreUsage

    class Sock:  # what connection_made asks of a TCP socket
        family, type, proto = socket.AF_INET, socket.SOCK_STREAM, 0

        def setsockopt(self, *args) -> None:
            pass

    class Transport:  # takes the answers, never blocks
        def __init__(self):
            self.nbytes = 0

        def get_extra_info(self, name):
            return {"peername": ("127.0.0.1", 4242), "socket": Sock()}.get(name)

        def writelines(self, bufs) -> None:
            self.nbytes += sum(len(b) for b in bufs)

        def get_write_buffer_size(self) -> int:
            return 0

        def set_write_buffer_limits(self, high, low) -> None:
            pass

        pause_reading = resume_reading = close = abort = lambda self: None

    runs = 100 + 7 * 300 + 10  # batches delivered after the fill (see run)
    if nvme_dir:
        print(f"in-process put, {per_read} puts per read, new keys, an NVMe tier, the arena "
              "below its high watermark (no eviction)" + (", auth on" if token else "") + ":")
    else:
        print(f"in-process put, {per_read} puts per read, new keys, arena {peers.human_size(dram)} "
              "full (every put evicts)" + (", auth on" if token else "") + ":")
    # process CPU beside wall time: on a loaded machine the wall time of identical runs
    # varies 3x (the process waits for a core), its CPU much less
    print("| size | bytecodes/put | calls/put | us/put (best of 7) | CPU us/put (best of 7) |")
    print("| --- | --- | --- | --- | --- |")
    for size in sizes:
        cfg = Config()
        cfg.dram_size, cfg.slab_size, cfg.max_value_size = dram, max(size, 4 << 20), max(size, 4 << 20)
        cfg.prefault = cfg.hugepages = False
        tier = None
        if nvme_dir:
            slab = cfg.slab_size
            need = runs * per_read * size * 5 // 4  # every put stays below high_watermark
            cfg.dram_size = max(dram, -(-need // slab) * slab)
            tier = NvmeTier(NvmeDevice(os.path.join(nvme_dir, f"in-process-{size}.nvme"),
                                       (1 << 20) + 2 * (128 << 20), 128 << 20))
        store = Store(cfg.engine_limits(), nvme=tier)
        store.observer = StoreUsage(store)
        srv = DataServer(store, max_connections=16, config=cfg,
                         max_inflight_bytes=cfg.max_inflight_bytes,
                         max_pipelined_requests=cfg.max_pipelined_requests,
                         auth=Auth(tokens_file) if token else None)
        payloads = [os.urandom(size) for _ in range(16)]
        sums = [checksum(p) for p in payloads]
        seq = itertools.count()

        def batch() -> bytes:
            out = []
            for _ in range(per_read):
                i = next(seq)
                out.append(encode_request(OP_PUT, i, b"cpu", b"k-%d" % i, size, sums[i % 16])
                           + payloads[i % 16])
            return b"".join(out)

        async def run() -> tuple:
            c, t = DataConnection(srv), Transport()
            c.connection_made(t)

            def deliver(data: bytes) -> None:  # what uvloop does: reads into get_buffer
                mv, done = memoryview(data), 0
                while done < len(mv):
                    b = c.get_buffer(-1)
                    n = min(len(b), len(mv) - done)
                    b[:n] = mv[done:done + n]
                    done += n
                    c.buffer_updated(n)
                if c.flush_due:
                    c._flush()

            if token:
                deliver(encode_request(OP_AUTH, 0, b"", b"", len(token)) + token.encode())
            for _ in range(0 if nvme_dir else 1_000_000):  # until the arena is full and puts evict
                if store.counters["evictions"] >= 1000:
                    break
                deliver(batch())
            frames = [batch() for _ in range(100)]
            count = {"op": 0, "call": 0}

            def trace(frame, event, arg):
                if event == "call":
                    count["call"] += 1
                    frame.f_trace_opcodes = True
                elif event == "opcode":
                    count["op"] += 1
                return trace

            sys.settrace(trace)
            for f in frames:
                deliver(f)
            sys.settrace(None)
            best = best_cpu = float("inf")
            for _ in range(7):
                frames = [batch() for _ in range(300)]
                c0, t0 = time.process_time(), time.perf_counter()
                for f in frames:
                    deliver(f)
                best = min(best, (time.perf_counter() - t0) / (300 * per_read))
                best_cpu = min(best_cpu, (time.process_time() - c0) / (300 * per_read))
            if (t.nbytes == 0 or store.counters["checksum_failures"]
                    or store.counters["puts"] < runs * per_read * 9 // 10):
                raise RuntimeError("the puts were not answered, did not verify or not stored")
            return (count["op"] / (100 * per_read), count["call"] / (100 * per_read), best,
                    best_cpu)

        loop = asyncio.new_event_loop()
        try:
            ops_, calls, best, best_cpu = loop.run_until_complete(run())
        finally:
            loop.close()
            store.close()
        print(f"| {peers.human_size(size)} | {ops_:.0f} | {calls:.1f} | {best * 1e6:.2f} | "
              f"{best_cpu * 1e6:.2f} |", flush=True)


def in_process_queries(nkeys: int, batch: int) -> None:
    """``--in-process``: the Store's exists / lookup of stored keys (each hit is an eviction
    touch), per key: Python bytecodes (``sys.settrace``) and the best wall time of 7 runs."""
    from kvstored.config import Config
    from kvstored.engine import Store

    cfg = Config()
    cfg.dram_size, cfg.slab_size, cfg.max_value_size = 64 << 20, 4 << 20, 4 << 20
    cfg.prefault = cfg.hugepages = False
    store = Store(cfg.engine_limits())
    try:
        keys = [b"q-%d" % i for i in range(nkeys)]
        data = bytes(256)
        for k in keys:
            store.put_bytes(b"q", k, data)
        if sum(store.exists(b"q", keys)) != nkeys:
            raise RuntimeError("the keys put are not all stored")
        print(f"\nin-process queries of stored keys ({nkeys} keys of 256 B, index "
              f"{getattr(store.index, 'kind', 'dict')}, policy {type(store.policy).__name__}):")
        print("| call | keys/call | bytecodes/key | us/key (best of 7) |")
        print("| --- | --- | --- | --- |")
        for name, fn in (("exists", store.exists), ("lookup", store.lookup)):
            for per in (1, batch, nkeys):
                calls = [keys[i:i + per] for i in range(0, nkeys - per + 1, per)]
                count = [0]

                def trace(frame, event, arg):
                    if event == "call":
                        frame.f_trace_opcodes = True
                    elif event == "opcode":
                        count[0] += 1
                    return trace

                sample = calls[:max(1, 2000 // per)]
                sys.settrace(trace)
                for c in sample:
                    fn(b"q", c)
                sys.settrace(None)
                best = float("inf")
                for _ in range(7):
                    t0 = time.perf_counter()
                    for c in calls:
                        fn(b"q", c)
                    best = min(best, (time.perf_counter() - t0) / (len(calls) * per))
                print(f"| {name} | {per} | {count[0] / (len(sample) * per):.0f} | "
                      f"{best * 1e6:.3f} |", flush=True)
    finally:
        store.close()


def cluster_rounds(a, sizes: list[int], cc: str) -> dict:
    """``--nodes N``: N kvstored nodes, one ClusterClient (``--policy``, TCP, no shm)
    putting batches of ``--objects`` new keys; the nodes' CPU (all of them) per object put."""
    import contextlib

    from kvstore.cluster import ClusterClient
    from kvstore.layout import Policy
    rows: dict = {}
    with contextlib.ExitStack() as stack:
        ds = [stack.enter_context(KvstoredDaemon(cc, dram_size=a.dram_size,
                                                 max_value_size=max(sizes + [4 << 20]),
                                                 slab_size=max(sizes + [4 << 20])))
              for _ in range(a.nodes)]
        cc_ = ClusterClient([d.address for d in ds], policy=Policy.parse(a.policy), shm=False)
        stack.callback(cc_.close)
        pids = [d.proc.pid for d in ds]
        seq = itertools.count()
        for rnd in range(a.rounds):
            for size in sizes:
                payloads = [bytearray(os.urandom(size)) for _ in range(8)]

                def batch() -> int:
                    r = next(seq)
                    items = [(f"c{r}-{i}".encode(), payloads[i % 8]) for i in range(a.objects)]
                    cc_.batch_put(items, namespace="cpu")
                    return len(items)

                end = time.monotonic() + a.warmup
                while time.monotonic() < end:
                    batch()
                s0, c0, t0 = sum(map(proc_cpu, pids)), time.process_time(), time.perf_counter()
                n, end = 0, time.monotonic() + a.seconds
                for _ in range(1_000_000):  # bounded: the clock ends it long before
                    if time.monotonic() >= end:
                        break
                    n += batch()
                s1, c1, t1 = sum(map(proc_cpu, pids)), time.process_time(), time.perf_counter()
                wall = t1 - t0
                m = {"ops": n, "wall": wall, "gbs": n * size / wall / 1e9,
                     "server_us": (s1 - s0) / max(n, 1) * 1e6,
                     "client_us": (c1 - c0) / max(n, 1) * 1e6, "server_cores": (s1 - s0) / wall,
                     "gbs_per_core": n * size / max(s1 - s0, 1e-9) / 1e9, "load": loadavg()}
                rows.setdefault((f"{a.nodes} nodes", size), []).append(m)
                print(f"round {rnd} {a.nodes} nodes {a.policy} {peers.human_size(size):>6}: {m['gbs']:.3f} GB/s, "
                      f"nodes {m['server_us']:.1f} us/put ({m['server_cores'] * 100:.0f} % of a "
                      f"core, {m['gbs_per_core']:.2f} GB/s per core), client {m['client_us']:.1f} "
                      f"us/put, load {m['load']}", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="4KiB,64KiB,1MiB")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=3.0, help="timed seconds per row and round")
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--keys", type=int, default=256, help="Redis keys per size (SET cycles them)")
    ap.add_argument("--dram-size", default="256MiB", help="kvstored --dram-size")
    ap.add_argument("--skip-redis", action="store_true")
    ap.add_argument("--skip-floor", action="store_true")
    ap.add_argument("--nvme-dir", default="",
                    help="give the node an NVMe tier: a file of --nvme-size in this directory")
    ap.add_argument("--nvme-size", default="2GiB", help="the NVMe tier's size (--nvme-dir)")
    ap.add_argument("--auth", action="store_true",
                    help="auth on; the client's token may write the benchmark's namespace")
    ap.add_argument("--nodes", type=int, default=0,
                    help="N > 0: a cluster of N nodes driven by one ClusterClient (policy none, "
                         "batches of --objects), instead of one node beside Redis")
    ap.add_argument("--objects", type=int, default=32, help="objects per batch (--nodes)")
    ap.add_argument("--policy", default="none", help="the cluster's policy (--nodes): none, ec:4+2, ...")
    ap.add_argument("--in-process", action="store_true",
                    help="no sockets: a node's DataConnection fed pipelined puts in this "
                         "process; bytecodes, calls and time per put")
    ap.add_argument("--per-read", type=int, default=8, help="puts per read (--in-process)")
    ap.add_argument("--exists-keys", type=int, default=0,
                    help="instead of puts: Exists of this many stored keys, server CPU per key "
                         "beside Redis's EXISTS")
    ap.add_argument("--exists-calls", type=int, default=20, help="Exists calls (--exists-keys)")
    ap.add_argument("--query-keys", type=int, default=20000,
                    help="--in-process: stored keys that exists/lookup then query (0: skip)")
    a = ap.parse_args(argv)
    sizes = [peers.parse_size(s) for s in a.sizes.split(",")]
    if a.in_process:
        if a.per_read < 1:
            ap.error("--per-read must be >= 1")
        with tempfile.TemporaryDirectory(prefix="bench-put-cpu-", dir=a.nvme_dir or None) as d:
            _, token = _node_options(a, d)
            in_process(sizes, a.per_read, peers.parse_size(a.dram_size) // 4,
                       d if a.nvme_dir else "", token, os.path.join(d, "tokens.toml"))
        if a.query_keys:
            in_process_queries(a.query_keys, 64)
        return 0
    if a.concurrency < 1 or a.rounds < 1 or a.seconds <= 0:
        ap.error("--concurrency and --rounds must be >= 1, --seconds > 0")
    import uvloop

    import kvstore
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    with open(peers.CC_SYSCTL) as f:
        cc = f.read().strip()
    if a.exists_keys:
        if a.exists_calls < 1:
            ap.error("--exists-calls must be >= 1")
        exists_rows(a, cc)
        loop.close()
        return 0
    if a.nodes > 0:
        if a.objects < 1:
            ap.error("--objects must be >= 1")
        rows = cluster_rounds(a, sizes, cc)
        _table(a, sizes, rows, [f"{a.nodes} nodes"], "nodes")
        loop.close()
        return 0
    rows: dict[tuple[str, int], list[dict]] = {}
    redis_ctx = peers.RedisServer() if not a.skip_redis else None
    node_dir = tempfile.TemporaryDirectory(prefix="bench-put-cpu-",
                                           dir=a.nvme_dir or None)
    extra, token = _node_options(a, node_dir.name)
    with node_dir, KvstoredDaemon(cc, dram_size=a.dram_size, max_value_size=max(sizes + [4 << 20]),
                                  slab_size=max(sizes + [4 << 20]), extra_args=extra) as kd:
        if redis_ctx is not None:
            redis_ctx.__enter__()
        try:
            for rnd in range(a.rounds):
                order = ["kvstored", "redis", "floor"]
                if rnd % 2:
                    order.reverse()
                for size in sizes:
                    for who in order:
                        if (who == "redis" and redis_ctx is None) or (who == "floor" and a.skip_floor):
                            continue
                        if who == "floor":
                            m = floor_round(size, a.seconds, a.warmup, peers.parse_size(a.dram_size))
                        elif who == "kvstored":
                            m = kvstored_round(loop, kvstore, kd, size, a.concurrency, a.seconds,
                                               a.warmup, f"r{rnd}-{size}", token)
                        else:
                            m = redis_round(loop, redis_ctx, size, a.concurrency, a.seconds,
                                            a.warmup, a.keys)
                        rows.setdefault((who, size), []).append(m)
                        print(f"round {rnd} {who:8} {peers.human_size(size):>6}: "
                              f"{m['gbs']:.3f} GB/s, server {m['server_us']:.1f} us/put "
                              f"({m['server_cores'] * 100:.0f} % of a core, "
                              f"{m['gbs_per_core']:.2f} GB/s per core), client "
                              f"{m['client_us']:.1f} us/put, load {m['load']}", flush=True)
        finally:
            if redis_ctx is not None:
                redis_ctx.__exit__(None, None, None)
    _table(a, sizes, rows, ["kvstored", "redis", "floor"], "server")
    loop.close()
    return 0


def _node_options(a, where: str) -> tuple[list[str], str | None]:
    """The node's extra arguments for ``--nvme-dir`` / ``--auth`` (files in ``where``),
    and the token the client shows (None: auth off)."""
    extra: list[str] = []
    if a.nvme_dir:
        extra += ["--nvme-path", os.path.join(where, "nvme.img"), "--nvme-size", a.nvme_size]
    if not a.auth:
        return extra, None
    token = "bench-put-cpu-" + os.urandom(8).hex()
    tokens = os.path.join(where, "tokens.toml")
    with open(tokens, "w") as f:
        f.write(f'[[token]]\nname = "bench"\ntoken = "{token}"\n'
                'namespaces = ["cpu"]\nscopes = ["read", "write"]\n')
    os.chmod(tokens, 0o600)
    config = os.path.join(where, "kvstored.toml")
    with open(config, "w") as f:
        f.write(f'[auth]\nenabled = true\ntokens_file = "{tokens}"\n')
    return extra + ["--config", config], token


def _table(a, sizes: list[int], rows: dict, names: list[str], what: str) -> None:
    print(f"\nmedian of {a.rounds} rounds, {a.seconds:g} s each, "
          + (f"batches of {a.objects}" if a.nodes else f"c={a.concurrency}")
          + (", NVMe tier" if a.nvme_dir else "") + (", auth on" if a.auth else "")
          + f" ({what} CPU = utime + stime of the {what} processes):")
    print(f"| size | {what} | GB/s | {what} us/put | {what} GB/s per core | client us/put |")
    print("| --- | --- | --- | --- | --- | --- |")
    for size in sizes:
        for who in names:
            ms = rows.get((who, size))
            if not ms:
                continue
            med = {k: statistics.median(m[k] for m in ms)
                   for k in ("gbs", "server_us", "gbs_per_core", "client_us")}
            print(f"| {peers.human_size(size)} | {who} | {med['gbs']:.3f} | {med['server_us']:.1f} | "
                  f"{med['gbs_per_core']:.2f} | {med['client_us']:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
