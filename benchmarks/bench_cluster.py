"""ClusterClient throughput across 3 and 5 local kvstored nodes, per policy and object size,
plus the EC encode / decode cost inside the client path against pyeclib's raw speed.

Starts the kvstored processes once (tests/daemonutil.Daemon, standalone, no etcd) and
gives each ClusterClient the first N of them as its member list. For every object size
(default 1 MiB and 4 MiB), node count (default 3, 5) and policy (default none,
replicas:2, ec:4+2) it measures aggregate batch_put, batch_get and batch_get_into (into
buffers allocated once; parallel fan-out, one
pipelined batch per node) in GB/s of user data, best of ``--rounds``; every batch holds
the same number of bytes (``--objects`` x 1 MiB) whatever the object size.

ec:4+2 spreads over 6 nodes. The client refuses a policy larger than the biggest member
list it has seen (``ClusterClient._slots``: ``p.nodes > self._largest``), so on a 3 or
5-node member list it is printed as n/a with the client's reason, and measured instead
(a) on 6 nodes and (b) on N live nodes after the client has seen all 6 (a callable
member source that first lists 6 nodes, then N: the documented "cluster that lost nodes"
case, where EC slots wrap around and a node holds up to 2 fragments).

The second table is the codec: pyeclib ``ECDriver(k, m, "isa_l_rs_vand")`` raw encode
and decode (all data fragments / one data fragment lost) against the client path,
``kvstore.layout.encode_parts`` (called with a memoryview, as batch_put does: header and
fragment of each record, sent gathered; through ISA-L directly where layout attached it,
with two more rows that detach it for the liberasurecode-through-ctypes path before it), ``encode_records`` (the same records joined, one
copy of each fragment: what batch_put sent before) and ``kvstore.layout.assemble`` (fast path: data fragments 0..K-1 concatenated; decode path:
data fragment 0 missing).

The client process runs untuned, as a user's would: no MALLOC_* variables are set by the
benchmark. The SDK itself raises glibc's thresholds on the first EC put or get
(``kvstore.layout.tune_malloc``: pyeclib allocates every fragment afresh, and glibc would
grow and trim the heap on each; DESIGN.md pitfalls); ``KVSTORE_TUNE_MALLOC=0`` measures
without that. The header line says which. The codec table also gives ``encode_parts``
plus the wire checksum of each record (what a put hashes before its records leave), the
whole of the client's per-object CPU before sending. All on one host: the nodes share the
client's cores, so this measures the client and the codec, not a network.

``--paired TURNS`` adds put-only turns, then batch_get / batch_get_into turns, of every
policy in alternation (CPU per batch of the client and the nodes); ``--pool-too`` adds
clients with ``fanout_puts=False, fanout_gets=False`` (each node's part on a pool thread)
to the same turns, and a "vs pool" column of per-turn time ratios for the gets;
``--compare-writes TREE`` adds each EC policy through TREE's batch put (a worktree of the
commit before: a client-side change measured in the same turns, on the same nodes); a
last table sets each paired EC put's CPU beside its floor (``ec_floors``);
``--latency TURNS`` times get_into of a single object the same way (a block read's latency).

    PYTHONPATH=client:. python benchmarks/bench_cluster.py [--objects 64] [--rounds 3]
        [--nodes 3,5] [--sizes 1MiB,4MiB] [--policies none,replicas:2,ec:4+2] [--shm]
        [--codec-only] [--paired TURNS [--pool-too] [--compare-writes TREE] [--latency TURNS]]
        [--json out.json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
KIB = 1 << 10


def rate(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def parse_size(text: str) -> int:
    t = text.strip()
    for suffix, mult in (("GiB", 1 << 30), ("MiB", MIB), ("KiB", KIB), ("B", 1)):
        if t.endswith(suffix):
            return int(float(t[:-len(suffix)]) * mult)
    return int(t)


def size_name(n: int) -> str:
    if n % MIB == 0:
        return f"{n // MIB}MiB"
    if n % KIB == 0:
        return f"{n // KIB}KiB"
    return f"{n}B"


def timed(fn, budget_s: float, min_iters: int = 3) -> float:
    """Seconds per call of ``fn`` (best of a few batches run for about ``budget_s``)."""
    fn()  # warm up
    per, iters, best = 0.0, 1, float("inf")
    t0 = time.perf_counter()
    fn()
    per = max(time.perf_counter() - t0, 1e-6)
    iters = max(1, int(budget_s / 3 / per))
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(max(iters, min_iters)):
            fn()
        best = min(best, (time.perf_counter() - t) / max(iters, min_iters))
    return best


# ------------------------------------------------------------------ codec table
def bench_codec(k: int, m: int, size: int, budget_s: float) -> list[dict]:
    from pyeclib.ec_iface import ECDriver

    from kvstore import layout
    from kvstore.wire import checksum_parts
    ec_type = "isa_l_rs_vand"
    d = ECDriver(k=k, m=m, ec_type=ec_type)
    data = os.urandom(size)
    frags = d.encode(data)
    one_lost = frags[1:k + 1]  # data fragment 0 lost, parity fragment K used instead
    assert d.decode(frags[:k]) == data and d.decode(one_lost) == data

    p = layout.Policy.parse(f"ec:{k}+{m}")
    assert p.ec_type == ec_type
    view = memoryview(data)  # batch_put hands encode_records a memoryview
    records = layout.encode_records(p, view, layout.DEFAULT_MIN_EC_SIZE)
    assert len(records) == k + m
    # records as a get receives them: bytearrays (the SDK's receive pool), not bytes
    fast = [bytearray(r) for r in records[:k]]
    slow = [bytearray(r) for r in records[1:k + 1]]
    assert layout.codec(p).offset is not None, "no fast concatenate path for this codec"
    assert bytes(layout.assemble(p, fast)) == data and bytes(layout.assemble(p, slow)) == data
    into = bytearray(size)  # get_into's destination: decoded in place, no intermediate object
    assert layout.assemble(p, fast, into) == size and into == data

    parts = layout.encode_parts(p, view, layout.DEFAULT_MIN_EC_SIZE)
    assert [h + bytes(f) for h, f in parts] == records

    def encode_and_wire_checksums():
        # what batch_put computes per object before sending: the records, then the
        # channel's wire checksum of each (header + fragment, kvstore.wire.checksum_parts)
        for h, f in layout.encode_parts(p, view, layout.DEFAULT_MIN_EC_SIZE):
            checksum_parts((h, f))
    c = layout.codec(p)
    direct = getattr(c, "isal", None) is not None  # absent from trees before it (A/B runs)

    def isal_off(fn):
        # the same call with layout's ISA-L path detached: liberasurecode through ctypes
        # (or pyeclib), as the client encoded and decoded before it
        def run():
            saved, c.isal = c.isal, None
            try:
                fn()
            finally:
                c.isal = saved
        return run
    cases = [
        ("encode", lambda: d.encode(data), lambda: layout.encode_parts(p, view, layout.DEFAULT_MIN_EC_SIZE),
         "encode_parts (sent gathered)"),
        ("encode", lambda: d.encode(data), encode_and_wire_checksums,
         "encode_parts + wire checksum of each record"),
        ("encode", lambda: d.encode(data), lambda: layout.encode_records(p, view, layout.DEFAULT_MIN_EC_SIZE),
         "encode_records (joined)"),
        ("decode, data fragments 0..K-1", lambda: d.decode(frags[:k]), lambda: layout.assemble(p, fast),
         "assemble (concatenate path)"),
        ("decode, data fragments 0..K-1", lambda: d.decode(frags[:k]),
         lambda: layout.assemble(p, fast, into), "assemble into the caller's buffer (concatenate)"),
        ("decode, data fragment 0 lost", lambda: d.decode(one_lost), lambda: layout.assemble(p, slow),
         "assemble (decode path)"),
        ("decode, data fragment 0 lost", lambda: d.decode(one_lost),
         lambda: layout.assemble(p, slow, into), "assemble into the caller's buffer (decode)"),
    ]
    if direct:
        cases += [
            ("encode", lambda: d.encode(data),
             isal_off(lambda: layout.encode_parts(p, view, layout.DEFAULT_MIN_EC_SIZE)),
             "encode_parts, ISA-L path off (liberasurecode via ctypes)"),
            ("decode, data fragment 0 lost", lambda: d.decode(one_lost),
             isal_off(lambda: layout.assemble(p, slow, into)),
             "assemble into the caller's buffer (decode), ISA-L path off"),
        ]
    engine = ("ISA-L called directly" if direct else "liberasurecode via ctypes"
              if getattr(c, "native", None) is not None else "pyeclib")
    rows = []
    for op, raw_fn, client_fn, client_name in cases:
        raw_s, cl_s, ratio = paired(raw_fn, client_fn, budget_s)
        rows.append({"codec": f"{ec_type} {k}+{m}", "size": size_name(size), "op": op,
                     "raw_GBps": round(rate(size, raw_s), 2), "raw_us": round(raw_s * 1e6),
                     "client_path": client_name,
                     "client_GBps": round(rate(size, cl_s), 2), "client_us": round(cl_s * 1e6),
                     "client_over_raw": round(ratio, 2), "engine": engine})
    return rows


def paired(raw_fn, client_fn, budget_s: float, rounds: int = 9) -> tuple[float, float, float]:
    """CPU seconds per call of ``raw_fn`` and ``client_fn`` (this thread's CPU time, which
    other processes on shared cores inflate far less than wall time), measured in
    alternating rounds; medians, and the median of the per-round ratios client / raw."""
    import statistics
    raw_fn(), client_fn()  # warm up
    t = time.thread_time()
    client_fn()
    iters = max(3, int(budget_s / rounds / 2 / max(time.thread_time() - t, 1e-6)))
    raws, cls = [], []
    for _ in range(rounds):
        for fn, out in ((raw_fn, raws), (client_fn, cls)):
            t = time.thread_time()
            for _ in range(iters):
                fn()
            out.append((time.thread_time() - t) / iters)
    return (statistics.median(raws), statistics.median(cls),
            statistics.median(c / r for c, r in zip(cls, raws)))


# ------------------------------------------------------------------ cluster table
class ShrinkingSource:
    """A member source that answers ``first`` once, then ``then`` (a cluster that had
    len(first) nodes and now has len(then) live)."""

    def __init__(self, first: list[str], then: list[str]):
        self.first, self.then, self.calls = first, then, 0

    def __call__(self):
        self.calls += 1
        return self.first if self.calls == 1 else self.then


def measure(cc, size: int, count: int, rounds: int, ns: str) -> dict:
    payloads = [os.urandom(size) for _ in range(min(count, 8))]
    warm = [(f"s{size}-warm-{i}".encode(), payloads[0]) for i in range(min(count, 8))]
    cc.batch_put(warm, namespace=ns)  # connections to every node, first-use allocations
    cc.batch_get([k for k, _ in warm], namespace=ns)
    cc.delete([k for k, _ in warm], namespace=ns)
    puts, gets, intos = [], [], []
    bufs = [bytearray(size) for _ in range(count)]  # batch_get_into's destinations, reused
    for r in range(rounds):
        items = [(f"s{size}-r{r}-o{i}".encode(), payloads[i % len(payloads)]) for i in range(count)]
        # distinct bytes per key would not change the cost; 8 distinct payloads keep the
        # client's memory small. Puts are fresh keys (no dedup no-ops).
        t = time.perf_counter()
        stored = cc.batch_put(items, namespace=ns)
        puts.append(time.perf_counter() - t)
        assert all(stored), "a put was a no-op (key already stored)"
        keys = [k for k, _ in items]
        t = time.perf_counter()
        got = cc.batch_get(keys, namespace=ns)
        gets.append(time.perf_counter() - t)
        assert all(g == payloads[i % len(payloads)] for i, g in enumerate(got)), "get returned wrong bytes"
        del got
        t = time.perf_counter()
        sizes = cc.batch_get_into(keys, bufs, namespace=ns)
        intos.append(time.perf_counter() - t)
        assert sizes == [size] * count and bufs[-1] == payloads[(count - 1) % len(payloads)]
        cc.delete(keys, namespace=ns)
    n = count * size
    return {"put_GBps": round(rate(n, min(puts)), 2), "get_GBps": round(rate(n, min(gets)), 2),
            "get_into_GBps": round(rate(n, min(intos)), 2)}


def client_cpu_s() -> float:
    """User + system CPU seconds of this process, all threads."""
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def nodes_cpu_s(pids: list[int]) -> float:
    """CPU seconds the processes ``pids`` have run: /proc/PID/schedstat (nanoseconds), else
    /proc/PID/stat's user + system clock ticks (10 ms steps)."""
    t = 0.0
    for pid in pids:
        try:
            t += int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
            continue
        except (OSError, ValueError, IndexError):
            pass
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        t += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return t


def paired_puts(clients: dict, size: int, count: int, rounds: int, ns: str, node_pids: list[int]) -> list[dict]:
    """batch_put of every policy in turn, ``rounds`` times (after one warm-up turn; the
    order rotated every turn), on the same nodes in one process: load that drifts during
    a run hits every policy alike.
    Per policy: median and best GB/s, the median of the per-turn put-time ratios against
    the first policy, and the CPU seconds per batch of this process (the client) and of
    the nodes (``nodes_cpu_s``)."""
    import statistics
    payloads = [os.urandom(size) for _ in range(min(count, 8))]
    got: dict[str, list[tuple[float, float, float]]] = {name: [] for name in clients}
    names = list(clients)
    for r in range(rounds + 1):
        for name in names[r % len(names):] + names[:r % len(names)]:  # each first in turn
            cc = clients[name]
            items = [(f"p{size}-r{r}-{name}-o{i}".encode(), payloads[i % len(payloads)]) for i in range(count)]
            c0, d0, t0 = client_cpu_s(), nodes_cpu_s(node_pids), time.perf_counter()
            stored = cc.batch_put(items, namespace=ns)
            t1, c1, d1 = time.perf_counter(), client_cpu_s(), nodes_cpu_s(node_pids)
            assert all(stored), "a put was a no-op (key already stored)"
            cc.delete([k for k, _ in items], namespace=ns)
            if r:
                got[name].append((t1 - t0, c1 - c0, d1 - d0))
    base = next(iter(got.values()))
    n = count * size
    out = []
    for name, v in got.items():
        out.append({"policy": name, "size": size_name(size), "objects": count, "turns": rounds,
                    "put_GBps_median": round(rate(n, statistics.median(x[0] for x in v)), 2),
                    "put_GBps_best": round(rate(n, min(x[0] for x in v)), 2),
                    "speed_vs_first": round(statistics.median(b[0] / x[0] for b, x in zip(base, v)), 2),
                    "client_cpu_ms": round(statistics.median(x[1] for x in v) * 1e3, 1),
                    "nodes_cpu_ms": round(statistics.median(x[2] for x in v) * 1e3, 1)})
    return out


def paired_gets(clients: dict, size: int, count: int, rounds: int, ns: str, node_pids: list[int]) -> list[dict]:
    """batch_get and batch_get_into of every client in turn, ``rounds`` times (after one
    warm-up turn), each reading back the batch it stored once before the turns: as
    ``paired_puts``, load that drifts hits every client alike. Per client and call: median
    and best GB/s, the median of the per-turn time ratios against the first client, and
    the CPU seconds per batch of the client and of the nodes."""
    import statistics
    payloads = [os.urandom(size) for _ in range(min(count, 8))]
    keys = {}
    for name, cc in clients.items():
        items = [(f"g{size}-{name}-o{i}".encode(), payloads[i % len(payloads)]) for i in range(count)]
        assert all(cc.batch_put(items, namespace=ns)), "a put was a no-op (key already stored)"
        keys[name] = [k for k, _ in items]
    bufs = [bytearray(size) for _ in range(count)]
    got: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for r in range(rounds + 1):
        for name, cc in clients.items():
            for call in ("get", "get_into"):
                c0, d0, t0 = client_cpu_s(), nodes_cpu_s(node_pids), time.perf_counter()
                if call == "get":
                    res = cc.batch_get(keys[name], namespace=ns)
                else:
                    res = cc.batch_get_into(keys[name], bufs, namespace=ns)
                t1, c1, d1 = time.perf_counter(), client_cpu_s(), nodes_cpu_s(node_pids)
                if call == "get":
                    assert all(g == payloads[i % len(payloads)] for i, g in enumerate(res)), "wrong bytes"
                else:
                    assert res == [size] * count and bufs[-1] == payloads[(count - 1) % len(payloads)]
                del res
                if r:
                    got.setdefault((name, call), []).append((t1 - t0, c1 - c0, d1 - d0))
    for name, cc in clients.items():
        cc.delete(keys[name], namespace=ns)
    first = next(iter(clients))
    n = count * size
    out = []
    for (name, call), v in got.items():
        base = got[(first, call)]
        row = {"policy": name, "call": call, "size": size_name(size), "objects": count, "turns": rounds,
               "GBps_median": round(rate(n, statistics.median(x[0] for x in v)), 2),
               "GBps_best": round(rate(n, min(x[0] for x in v)), 2),
               "speed_vs_first": round(statistics.median(b[0] / x[0] for b, x in zip(base, v)), 2),
               "client_cpu_ms": round(statistics.median(x[1] for x in v) * 1e3, 1),
               "nodes_cpu_ms": round(statistics.median(x[2] for x in v) * 1e3, 1)}
        pool = got.get((f"{name} pool", call))
        if pool:  # the same policy on the thread-pool path, turn by turn
            row["speed_vs_pool"] = round(statistics.median(q[0] / x[0] for q, x in zip(pool, v)), 2)
        out.append(row)
    return out


def paired_latency(clients: dict, size: int, turns: int, ns: str) -> list[dict]:
    """get_into of one object, every client in turn, ``turns`` times (after 10 warm-up
    turns): the latency a single block read sees. Per client: median microseconds, and the
    median of the per-turn ratios pool / this client where a "<policy> pool" client exists."""
    import statistics
    payload = os.urandom(size)
    keys = {name: [f"lat{size}-{name}".encode()] for name in clients}
    for name, cc in clients.items():
        cc.batch_put([(keys[name][0], payload)], namespace=ns)
    buf = [bytearray(size)]
    got: dict[str, list[float]] = {name: [] for name in clients}
    for r in range(turns + 10):
        for name, cc in clients.items():
            t = time.perf_counter()
            cc.batch_get_into(keys[name], buf, namespace=ns)
            if r >= 10:
                got[name].append(time.perf_counter() - t)
    assert buf[0] == payload
    for name, cc in clients.items():
        cc.delete(keys[name], namespace=ns)
    out = []
    for name, v in got.items():
        row = {"policy": name, "size": size_name(size), "turns": turns,
               "get_into_us_median": round(statistics.median(v) * 1e6)}
        pool = got.get(f"{name} pool")
        if pool:
            row["speed_vs_pool"] = round(statistics.median(q / x for q, x in zip(pool, v)), 2)
        out.append(row)
    return out


def client_with_writes_of(tree: Path, cls):
    """A ClusterClient subclass whose batch put is ``tree``'s (its writes.py loaded as a
    module of this kvstore package, so it runs with this tree's channels and layout)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "kvstore.cluster._compared_writes", tree / "client" / "kvstore" / "cluster" / "writes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return type("ComparedWrites", (cls,), {"_batch_put_once": mod.Writes._batch_put_once})


def run_row(make_client, size: int, count: int, rounds: int, ns: str) -> dict:
    from kvstore import errors
    try:
        with make_client() as cc:
            return measure(cc, size, count, rounds, ns)
    except (errors.InvalidArgument, errors.Unavailable) as e:
        return {"put_GBps": None, "get_GBps": None, "get_into_GBps": None,
                "note": f"n/a: {type(e).__name__}: {e}"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objects", "--count", dest="objects", type=int, default=64,
                    help="1 MiB objects per batch; other sizes get the same bytes per batch")
    ap.add_argument("--rounds", type=int, default=3, help="batches per row (best is reported)")
    ap.add_argument("--nodes", default="3,5", help="node counts, comma separated")
    ap.add_argument("--sizes", default="1MiB,4MiB", help="object sizes, comma separated")
    ap.add_argument("--policies", default="none,replicas:2,ec:4+2", help="policies, comma separated")
    ap.add_argument("--codec-seconds", type=float, default=0.4,
                    help="time budget of each codec measurement")
    ap.add_argument("--no-ec-fallback", action="store_true",
                    help="do not measure a refused EC policy on enough nodes / after seeing them")
    ap.add_argument("--shm", action="store_true", help="let clients use the same-host shm path")
    ap.add_argument("--json", help="also write the results as JSON to this file")
    ap.add_argument("--codec-only", action="store_true", help="only the codec table (no daemons)")
    ap.add_argument("--pool-too", action="store_true",
                    help="paired turns also with fanout_puts=False and fanout_gets=False (each "
                         "node's part on a pool thread, the paths before the fanned-out put and "
                         "get), rows '<policy> pool'")
    ap.add_argument("--compare-writes", metavar="TREE",
                    help="with --paired: also each EC policy through a client whose batch put "
                         "(Writes._batch_put_once and what it calls in its module) is TREE's "
                         "client/kvstore/cluster/writes.py, e.g. a worktree of the commit before: "
                         "rows '<policy> (TREE)', the two put paths in the same turns")
    ap.add_argument("--latency", type=int, default=0, metavar="TURNS",
                    help="with --paired: also get_into of one object per call, every client in "
                         "alternation, this many turns (median latency; vs pool with --pool-too)")
    ap.add_argument("--paired", type=int, default=0, metavar="TURNS",
                    help="also put-only turns, then get and get_into turns, of every policy in "
                         "alternation on the largest node count (ratios to the first policy from "
                         "the same turns; CPU per batch)")
    args = ap.parse_args(argv)
    sys.path[:0] = [str(REPO / "client"), str(REPO / "tests")]
    from daemonutil import Daemon

    from kvstore.cluster import ClusterClient
    from kvstore.layout import Policy

    node_counts = [] if args.codec_only else [int(x) for x in args.nodes.split(",") if x.strip()]
    sizes = [parse_size(x) for x in args.sizes.split(",") if x.strip()]
    policies = [Policy.parse(x) for x in args.policies.split(",") if x.strip()]
    need = max(node_counts, default=0)
    if not args.no_ec_fallback and node_counts:
        need = max([need] + [p.nodes for p in policies if p.kind == "ec"])
    max_size = max(sizes)
    # 2 fragments or copies of a batch on one node at worst, plus headroom for deletes
    dram = max(256 * MIB, 4 * args.objects * MIB)
    slab = max(4 * MIB, 1 << (max_size - 1).bit_length())  # a whole object fits one slab

    cc_algo = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    results = {"congestion_control": cc_algo, "transport": "shm" if args.shm else "tcp",
               "batch_bytes": args.objects * MIB, "rounds": args.rounds, "cpus": os.cpu_count(),
               "rows": [], "codec": [], "paired": [], "paired_gets": [], "latency": [],
               "load_start": os.getloadavg()[0]}  # other work on shared cores moves every figure
    n_paired = max(node_counts, default=0)
    shm = None if args.shm else False
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        daemons = []
        try:
            for _ in range(need):
                daemons.append(Daemon(Path(tmp), "--dram-size", f"{dram // MIB}MiB",
                                      "--slab-size", f"{slab // MIB}MiB",
                                      "--max-value-size", f"{slab // MIB}MiB").start())
            addrs = [d.control for d in daemons]
            for size in sizes:
                count = max(2, args.objects * MIB // size)
                for n in node_counts:
                    for p in policies:
                        ns = f"b{n}"
                        row = {"nodes": str(n), "policy": str(p), "size": size_name(size), "objects": count}
                        row.update(run_row(lambda: ClusterClient(addrs[:n], policy=p, shm=shm),
                                           size, count, args.rounds, ns))
                        results["rows"].append(row)
                        print(json.dumps(row), file=sys.stderr, flush=True)
                        if row["put_GBps"] is None and p.kind == "ec" and not args.no_ec_fallback \
                                and n < p.nodes <= len(addrs) and n >= p.min_live():
                            def shrunk(n=n, p=p):
                                cc = ClusterClient(ShrinkingSource(addrs[:p.nodes], addrs[:n]), policy=p,
                                                   refresh_s=0, shm=shm)
                                cc.members()  # sees all p.nodes nodes ...
                                cc.members()  # ... then only n live
                                cc.refresh_s = float("inf")
                                assert len(cc.members()) == n
                                return cc
                            row = {"nodes": f"{n} live (of {p.nodes} seen)", "policy": str(p),
                                   "size": size_name(size), "objects": count}
                            row.update(run_row(shrunk, size, count, args.rounds, ns))
                            results["rows"].append(row)
                            print(json.dumps(row), file=sys.stderr, flush=True)
                if args.paired and n_paired <= len(addrs):
                    with contextlib.ExitStack() as stack:
                        clients = {str(p): stack.enter_context(ClusterClient(addrs[:n_paired], policy=p, shm=shm))
                                   for p in policies}
                        if args.pool_too:
                            clients.update({f"{p} pool": stack.enter_context(ClusterClient(
                                addrs[:n_paired], policy=p, shm=shm, fanout_puts=False, fanout_gets=False))
                                for p in policies})
                        if args.compare_writes:
                            other = client_with_writes_of(Path(args.compare_writes), ClusterClient)
                            clients.update({f"{p} ({args.compare_writes})": stack.enter_context(
                                other(addrs[:n_paired], policy=p, shm=shm)) for p in policies if p.kind == "ec"})
                        pids = [d.proc.pid for d in daemons[:n_paired]]
                        for row in paired_puts(clients, size, count, args.paired, f"pp{n_paired}", pids):
                            row["nodes"] = n_paired
                            results["paired"].append(row)
                            print(json.dumps(row), file=sys.stderr, flush=True)
                        for row in paired_gets(clients, size, count, args.paired, f"pg{n_paired}", pids):
                            row["nodes"] = n_paired
                            results["paired_gets"].append(row)
                            print(json.dumps(row), file=sys.stderr, flush=True)
                        if args.latency:
                            for row in paired_latency(clients, size, args.latency, f"pl{n_paired}"):
                                row["nodes"] = n_paired
                                results["latency"].append(row)
                                print(json.dumps(row), file=sys.stderr, flush=True)
                if not args.no_ec_fallback:
                    for p in policies:
                        if p.kind == "ec" and p.nodes not in node_counts and p.nodes <= len(addrs):
                            row = {"nodes": f"{p.nodes} (ec fallback)", "policy": str(p),
                                   "size": size_name(size), "objects": count}
                            row.update(run_row(lambda: ClusterClient(addrs[:p.nodes], policy=p, shm=shm),
                                               size, count, args.rounds, f"b{p.nodes}"))
                            results["rows"].append(row)
                            print(json.dumps(row), file=sys.stderr, flush=True)
        finally:
            for d in daemons:
                d.stop()
        still = [d.proc.pid for d in daemons if d.alive()]
        assert not still, f"kvstored processes still running: {still}"
    t_cluster = time.perf_counter() - t_start
    results["load_end"] = os.getloadavg()[0]

    from kvstore import layout
    # what ClusterClient's first EC put did (again here for --codec-only); True if it set any
    tune = getattr(layout, "tune_malloc", lambda: False)  # absent from trees before it (A/B runs)
    tuned = any(p.kind == "ec" for p in policies) and tune()
    results["malloc"] = ("set in the environment" if "MALLOC_MMAP_THRESHOLD_" in os.environ
                         else "tuned by the SDK" if tuned else "glibc defaults")
    for p in policies:
        if p.kind == "ec":
            for size in sizes:
                if size >= layout.DEFAULT_MIN_EC_SIZE:  # smaller objects are stored whole, not coded
                    results["codec"].extend(bench_codec(p.k, p.m, size, args.codec_seconds))

    print(f"# ClusterClient, {results['transport']}, {cc_algo}, {os.cpu_count()} cpus, batches of "
          f"{size_name(args.objects * MIB)} (objects x size), best of {args.rounds}; "
          f"malloc thresholds: {results['malloc']}; cluster part {t_cluster:.0f} s, load average "
          f"{results['load_start']:.1f} -> {results['load_end']:.1f}\n")
    if results["rows"]:
        print("| nodes | policy | size | objects/batch | put GB/s | get GB/s | get_into GB/s | note |")
        print("|---|---|---|---:|---:|---:|---:|---|")
    for r in results["rows"]:
        fmt = (lambda v: "n/a" if v is None else f"{v:.2f}")
        print(f"| {r['nodes']} | {r['policy']} | {r['size']} | {r['objects']} | {fmt(r['put_GBps'])} | "
              f"{fmt(r['get_GBps'])} | {fmt(r['get_into_GBps'])} | {r.get('note', '')} |")
    # each EC row against `none` on the same node list (the ec:4+2 put >= 0.5x none)
    plain = {(r["nodes"], r["size"]): r for r in results["rows"] if r["policy"] == "none"}
    for r in results["rows"]:
        base = plain.get((r["nodes"], r["size"]))
        if r["policy"].startswith("ec:") and base and r["put_GBps"] and base["put_GBps"]:
            print(f"{r['policy']} / none on {r['nodes']} nodes, {r['size']}: put "
                  f"{r['put_GBps'] / base['put_GBps']:.2f}x, get {r['get_GBps'] / base['get_GBps']:.2f}x, "
                  f"get_into {r['get_into_GBps'] / base['get_into_GBps']:.2f}x")
    if results["paired"]:
        first = results["paired"][0]["policy"]
        print(f"\n# batch_put only, policies in alternation on the same {n_paired} nodes, {args.paired} turns "
              f"(medians; speed vs {first}: median of the per-turn time ratios)\n")
        print(f"| size | policy | put GB/s median | best | speed vs {first} | client CPU ms/batch | nodes CPU ms/batch |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for r in results["paired"]:
            print(f"| {r['size']} | {r['policy']} | {r['put_GBps_median']:.2f} | {r['put_GBps_best']:.2f} | "
                  f"{r['speed_vs_first']:.2f}x | {r['client_cpu_ms']} | {r['nodes_cpu_ms']} |")
    if results["paired_gets"]:
        first = results["paired_gets"][0]["policy"]
        print(f"\n# batch_get / batch_get_into, every client in alternation on the same {n_paired} nodes, "
              f"{args.paired} turns (medians; speed vs {first} / vs pool: median of the per-turn time ratios)\n")
        print(f"| size | policy | call | GB/s median | best | speed vs {first} | vs pool | client CPU ms/batch "
              "| nodes CPU ms/batch |")
        print("|---|---|---|---:|---:|---:|---:|---:|---:|")
        for r in sorted(results["paired_gets"], key=lambda r: (parse_size(r["size"]), r["call"])):
            vs_pool = f"{r['speed_vs_pool']:.2f}x" if "speed_vs_pool" in r else ""
            print(f"| {r['size']} | {r['policy']} | {r['call']} | {r['GBps_median']:.2f} | {r['GBps_best']:.2f} | "
                  f"{r['speed_vs_first']:.2f}x | {vs_pool} | {r['client_cpu_ms']} | {r['nodes_cpu_ms']} |")
    if results["latency"]:
        print(f"\n# get_into of one object, every client in alternation on the same {n_paired} nodes, "
              f"{args.latency} turns (median; vs pool: median of the per-turn time ratios)\n")
        print("| size | policy | get_into us | vs pool |")
        print("|---|---|---:|---:|")
        for r in results["latency"]:
            vs_pool = f"{r['speed_vs_pool']:.2f}x" if "speed_vs_pool" in r else ""
            print(f"| {r['size']} | {r['policy']} | {r['get_into_us_median']} | {vs_pool} |")
    if results["codec"]:
        print("\n# EC codec per object: pyeclib raw vs the client path (one thread, CPU time, "
              f"9 alternating rounds: medians); client encoder: {results['codec'][0]['engine']}\n")
        print("| codec | size | op | raw GB/s | raw us | client path | client GB/s | client us | client / raw time |")
        print("|---|---|---|---:|---:|---|---:|---:|---:|")
        for r in results["codec"]:
            print(f"| {r['codec']} | {r['size']} | {r['op']} | {r['raw_GBps']:.2f} | {r['raw_us']} | "
                  f"{r['client_path']} | {r['client_GBps']:.2f} | {r['client_us']} | {r['client_over_raw']:.2f}x |")
    results["floors"] = ec_floors(results)
    if results["floors"]:
        print("\n# ec put CPU per batch against its floor (paired turns): the client's `none` CPU x "
              "(K+M)/K (the same TCP path, (K+M)/K the bytes) plus the batch's objects encoded at raw "
              "pyeclib speed (codec table, this run); the nodes' `none` CPU x (K+M)/K\n")
        print("| size | policy | client CPU ms | client floor | nodes CPU ms | nodes floor |")
        print("|---|---|---:|---:|---:|---:|")
        for r in results["floors"]:
            print(f"| {r['size']} | {r['policy']} | {r['client_cpu_ms']} | {r['client_floor_ms']} | "
                  f"{r['nodes_cpu_ms']} | {r['nodes_floor_ms']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def ec_floors(results: dict) -> list[dict]:
    """Per paired EC put row: its client and nodes CPU per batch beside what moving (K+M)/K
    the bytes of a `none` put costs plus encoding at raw pyeclib speed (see main)."""
    from kvstore.layout import Policy
    plain = {r["size"]: r for r in results["paired"] if r["policy"] == "none"}
    raw: dict[str, int] = {}
    for r in results["codec"]:
        if r["op"] == "encode":
            raw.setdefault(r["size"], r["raw_us"])  # the first raw encode row of the size
    out = []
    for r in results["paired"]:
        if not r["policy"].startswith("ec:") or r["size"] not in plain or r["size"] not in raw:
            continue
        p = Policy.parse(r["policy"].split(" ")[0])  # "ec:4+2 pool", "ec:4+2 (TREE)" too
        grow = p.n / p.k
        base = plain[r["size"]]
        client_floor = base["client_cpu_ms"] * grow + r["objects"] * raw[r["size"]] / 1e3
        out.append({"size": r["size"], "policy": r["policy"], "client_cpu_ms": r["client_cpu_ms"],
                    "client_floor_ms": round(client_floor, 1), "nodes_cpu_ms": r["nodes_cpu_ms"],
                    "nodes_floor_ms": round(base["nodes_cpu_ms"] * grow, 1)})
    return out


if __name__ == "__main__":
    sys.exit(main())
