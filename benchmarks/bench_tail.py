#!/usr/bin/env python3
"""Tail latency of a steady reader while the node does other work, beside Redis.

    python benchmarks/bench_tail.py [--seconds 8] [--rate 400] [--size 64KiB]
                                    [--phases idle,neighbour,evict,nvme,repair] [--skip-redis]
                                    [--repair-objects 1536] [--repair-rate SIZE]
                                    [--repair-yield-lag S] [--repair-min-pace P]
                                    [--no-repair-reader] [--repair-profile DIR]
    (phases: idle, neighbour, evict, nvme by default; bigcalls, repair when named)

A user's question: "my engine reads 64 KiB blocks at a steady rate; what happens to its
p99 / p99.9 when another client writes 4 MiB blocks flat out, when the cache is full and
every put evicts, or when puts spill to the NVMe tier?" Each phase runs:

* a **foreground reader** in its own process: ``get`` of ``--size`` objects (pinned, so
  they stay resident; 256 of them, read in a shuffled cycle) at a fixed ``--rate`` on a
  schedule set in advance (open loop). A get's latency counts from the moment the
  schedule said to send it, so a stall is charged to every get that had to wait for it
  (no coordinated omission); "service" is from the actual send;
* a **background writer** in another process for the same window, paced at
  ``--writer-mbs`` (250 MB/s by default, which redis-py reaches too, so both servers
  carry the same background bytes; ``0`` = flat out, where kvstored takes several
  times Redis's bytes and the rows compare different loads):
  - ``idle``: none (the reader alone);
  - ``neighbour``: 4 MiB puts of new bytes over a working set of 16 keys (no eviction);
  - ``evict``: 1 MiB puts of new keys into a full 256 MiB arena (each put evicts);
  - ``nvme``: as ``evict`` with an NVMe tier file: evicted objects are demoted to it;
  - ``bigcalls`` (not run unless named): no writer; another client asks whether
    65,536 stored keys exist (the daemon's max_batch_keys; Redis: one EXISTS of them) twice
    a second;
  - ``repair`` (not run unless named): five nodes under etcd with ``--repair-objects`` x
    1 MiB under ec:3+2; the reader reads from n0 while n4 is SIGKILLed and the survivors
    rebuild its records (no writer; two rows: before the loss, and while repair runs;
    then the repair's time to full redundancy and the seconds n0's repair yielded to the
    reader, kvstored_repair_yield_seconds_total). ``--no-repair-reader``: the same
    without the reader (the repair's time on an idle cluster). ``--repair-yield-lag``
    sets the nodes' cluster.repair_yield_lag (0: repair never yields), ``--repair-min-pace``
    their cluster.repair_min_pace (unset: the daemon's defaults, and nothing written, so
    the script runs against older trees too). Where the time goes, from the kill to full
    redundancy: each survivor's and the reader's CPU seconds; their main threads' seconds
    on a CPU and runnable but waiting for one (Linux schedstat: the reader's and n0's
    event loop's wait for a core); the seconds peers' repair requests were held behind
    each node's clients (kvstored_repair_held_seconds_total); n0's loop lag and
    data-plane get/put p99 (histogram buckets). ``--repair-profile DIR``: py-spy records
    every survivor and the reader meanwhile (raw stacks, idle included, per thread) into
    DIR/<name>.txt; a profiled run's figures are not comparable.

Every kvstored client here uses TCP (``transport="tcp"``), never same-host shm. The peer
is Redis measured in the same run with the same processes and schedule (GET / SET; its
``evict`` phase is ``maxmemory 256mb`` + ``volatile-lru`` with the writer's keys given a TTL,
so only they are evicted, as kvstored's pins keep the reader's; it has no NVMe phase). The
background writer's rate is printed beside each row: a writer that did little says little.
Two cores are shared by the reader, the writer and the server, as on a busy host.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "client"), str(REPO / "tests"), str(REPO / "benchmarks")]

FG_OBJECTS = 256
NEIGHBOUR_SIZE, NEIGHBOUR_KEYS = 4 << 20, 16
EVICT_SIZE = 1 << 20
BIG_CALL_KEYS = 65_536  # the daemon's max_batch_keys
BIG_CALL_EVERY = 0.5  # s between the bigcalls phase's calls (10 a second saturated the node: ~150 ms of loop CPU each)
ARENA = "256MiB"


def parse_size(text: str) -> int:
    from peers import parse_size as ps
    return ps(text)


# ---------------------------------------------------------------- the two client roles

def _client(system: str, addr: str):
    if system == "kvstored":
        import kvstore
        return kvstore.Client(addr, transport="tcp", namespace="tail")
    import redis
    host, port = addr.rsplit(":", 1)
    return redis.Redis(host=host, port=int(port))


def role_load(system: str, addr: str, size: int, phase: str = "") -> None:
    """Store the reader's objects (pinned on kvstored, so eviction never takes them), and
    for ``bigcalls`` the BIG_CALL_KEYS small objects the caller asks about."""
    c = _client(system, addr)
    keys = [b"fg-%04d" % i for i in range(FG_OBJECTS)]
    vals = [os.urandom(size) for _ in keys]
    small = [(b"bc-%05d" % i, b"s" * 64) for i in range(BIG_CALL_KEYS)] if phase == "bigcalls" else []
    if system == "kvstored":
        c.batch_put(list(zip(keys, vals)), overwrite=True)
        c.pin(keys, ttl=3600)
        for i in range(0, len(small), 4096):
            c.batch_put(small[i:i + 4096], overwrite=True)
        c.close()
    else:
        for k, v in zip(keys, vals):
            c.set(k, v)
        for i in range(0, len(small), 4096):
            c.mset(dict(small[i:i + 4096]))


def role_caller(system: str, addr: str, seconds: float, out: str) -> None:
    """``bigcalls``: one exists() of BIG_CALL_KEYS stored keys every BIG_CALL_EVERY s."""
    c = _client(system, addr)
    keys = [b"bc-%05d" % i for i in range(BIG_CALL_KEYS)]
    calls = errors = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while True:
        due = t0 + calls * BIG_CALL_EVERY
        now = time.perf_counter()
        if due >= end:
            break
        if now < due:
            time.sleep(due - now)
        try:
            found = c.exists(keys) if system == "kvstored" else c.exists(*keys)
            if (sum(found) if system == "kvstored" else found) != BIG_CALL_KEYS:
                errors += 1
        except Exception:  # noqa: BLE001 (counted and reported)
            errors += 1
        calls += 1
    Path(out).write_text(json.dumps({"calls": calls, "bytes": 0, "errors": errors, "seconds": seconds}))


def role_reader(system: str, addr: str, size: int, rate: float, seconds: float, out: str) -> None:
    c = _client(system, addr)
    keys = [b"fg-%04d" % i for i in range(FG_OBJECTS)]
    random.Random(1).shuffle(keys)
    get = c.get
    for k in keys[:16]:  # connect and warm
        get(k)
    n = int(rate * seconds)
    lat, svc, errors = [], [], 0
    # CLOCK_MONOTONIC is one clock for every process: the driver's marks (a node killed,
    # repair done) select gets by their scheduled time
    t0 = time.monotonic() + 0.05
    stop = []
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))  # the driver's "enough": write results
    Path(out + ".started").write_text(str(t0))
    for i in range(n):
        if stop:
            break
        due = t0 + i / rate
        now = time.monotonic()
        if now < due:
            time.sleep(due - now)
        start = time.monotonic()
        try:
            v = get(keys[i % FG_OBJECTS])
            if v is None or len(v) != size:
                errors += 1
        except Exception:  # noqa: BLE001 (counted and reported, the row says how many)
            errors += 1
        end = time.monotonic()
        lat.append(end - due)
        svc.append(end - start)
        del v
    Path(out).write_text(json.dumps({"t0": t0, "rate": rate, "lat": lat, "svc": svc, "errors": errors,
                                     "wall": time.monotonic() - t0}))


def role_writer(system: str, addr: str, phase: str, seconds: float, mb_s: float, out: str) -> None:
    c = _client(system, addr)
    size = NEIGHBOUR_SIZE if phase == "neighbour" else EVICT_SIZE
    base = bytearray(os.urandom(size))
    stamp = 0
    nbytes, errors = 0, 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while time.perf_counter() < end:
        if mb_s > 0:  # paced: the same background bytes for every system
            due = t0 + nbytes / (mb_s * 1e6)
            now = time.perf_counter()
            if now < due:
                time.sleep(min(due - now, end - now))
                continue
        stamp += 1
        base[:8] = stamp.to_bytes(8, "little")  # new bytes every put: stored, never deduplicated
        key = (b"bg-%d" % (stamp % NEIGHBOUR_KEYS)) if phase == "neighbour" else b"bg-%d" % stamp
        try:
            if system == "kvstored":
                c.put(key, base, overwrite=True)
            else:
                # a TTL marks the writer's keys volatile: volatile-lru evicts only them,
                # as a Redis user keeps a hot set (kvstored's reader pins its objects)
                c.set(key, bytes(base), ex=3600)
            nbytes += size
        except Exception:  # noqa: BLE001 (NoSpace while eviction catches up is counted)
            errors += 1
    Path(out).write_text(json.dumps({"bytes": nbytes, "errors": errors, "seconds": seconds}))


# ---------------------------------------------------------------- the driver

def _spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, *args])


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))] * 1e6


def run_phase(system: str, addr: str, phase: str, a, tmp: Path) -> dict:
    fg_out, bg_out = tmp / f"fg-{system}-{phase}.json", tmp / f"bg-{system}-{phase}.json"
    procs = []
    if phase == "bigcalls":
        procs.append(_spawn("--role", "caller", "--system", system, "--addr", addr,
                            "--seconds", str(a.seconds + 0.5), "--out", str(bg_out)))
        time.sleep(0.3)
    elif phase != "idle":
        procs.append(_spawn("--role", "writer", "--system", system, "--addr", addr, "--phase", phase,
                            "--seconds", str(a.seconds + 0.5), "--writer-mbs", str(a.writer_mbs),
                            "--out", str(bg_out)))
        time.sleep(0.3)  # the writer is running when the reader starts
    reader = _spawn("--role", "reader", "--system", system, "--addr", addr, "--size", str(a.size),
                    "--rate", str(a.rate), "--seconds", str(a.seconds), "--out", str(fg_out))
    procs.append(reader)
    for p in procs:
        p.wait(timeout=a.seconds * 4 + 60)
    fg = json.loads(fg_out.read_text())
    bg = json.loads(bg_out.read_text()) if phase != "idle" else {"bytes": 0, "errors": 0, "seconds": 1}
    row = _row(system, phase, fg["lat"], fg["svc"], fg["errors"], bg["bytes"] / bg["seconds"] / 1e6)
    if "calls" in bg:
        row["phase"] = f"bigcalls ({bg['calls'] / bg['seconds']:.1f} exists of {BIG_CALL_KEYS} keys/s)"
        row["bg_errors"] = bg["errors"]
    return row


def _row(system: str, phase: str, lat: list, svc: list, errors: int, bg_mb_s: float) -> dict:
    return {"system": system, "phase": phase, "gets": len(lat), "errors": errors,
            "p50": _pct(lat, 0.5), "p99": _pct(lat, 0.99), "p999": _pct(lat, 0.999),
            "max": max(lat) * 1e6, "svc_p99": _pct(svc, 0.99), "svc_max": max(svc) * 1e6, "bg_mb_s": bg_mb_s,
            "load": os.getloadavg()[0]}


def repair_rows(a, tmp: Path) -> list[dict]:
    """Five nodes under etcd, ``--repair-objects`` x 1 MiB under ec:3+2 (bench_repair's
    cluster, the daemon's default ``repair_rate``); the reader gets its own objects (a
    namespace without a policy, which repair leaves alone) from node n0 while n4 is
    SIGKILLed and the survivors rebuild its records. Two rows from one reader: its gets
    scheduled before the kill, and those scheduled from the moment every survivor dropped
    n4 until every survivor's repair is idle with nothing pending."""
    import shutil

    import bench_repair as br
    from daemonutil import Daemon
    from etcdutil import Etcd

    from clusterutil import wait_for
    from kvstore.cluster import ClusterClient
    if shutil.which("etcd") is None:
        print("repair phase skipped: no etcd binary on PATH", file=sys.stderr)
        return []
    rate = a.repair_rate or _default_repair_rate()
    etcd, daemons = Etcd(tmp).start(), []
    try:
        for i in range(br.N_NODES):
            cfg = br.config(tmp, f"n{i}", etcd.endpoint, rate)
            with open(cfg, "a") as f:  # (the [cluster] section is the file's last)
                if a.repair_yield_lag is not None:
                    f.write(f"repair_yield_lag = {a.repair_yield_lag}\n")
                if a.repair_min_pace is not None:
                    f.write(f"repair_min_pace = {a.repair_min_pace}\n")
            daemons.append(Daemon(tmp, "--config", cfg,
                                  "--dram-size", "1GiB", "--slab-size", "4MiB").start(timeout=60))
        ids = {f"n{i}" for i in range(br.N_NODES)}
        for d in daemons:
            wait_for(lambda d=d: br.placement(d) == ids, 30, "five nodes registered")
        cc = ClusterClient.from_cluster([d.control for d in daemons], node_timeout=5.0)
        blob = os.urandom((1 << 20) + a.repair_objects * 64)
        for i in range(0, a.repair_objects, 32):
            cc.batch_put([(b"rep-%06d" % j, memoryview(blob)[j * 64:j * 64 + (1 << 20)])
                          for j in range(i, min(i + 32, a.repair_objects))], namespace=br.NS)
        cc.close()
        reader_node, victim, survivors = daemons[0], daemons[-1], daemons[:-1]
        subprocess.run([sys.executable, __file__, "--role", "load", "--system", "kvstored",
                        "--addr", reader_node.control, "--size", str(a.size)], check=True, timeout=120)
        time.sleep(br.YOUNG_WAIT_S)  # repair leaves records younger than 2 s to a later pass
        fg_out = tmp / "fg-repair.json"
        seconds = a.seconds + 40  # the reader outlasts the rebuild; it is stopped after it
        reader = None
        if a.repair_reader:
            reader = _spawn("--role", "reader", "--system", "kvstored", "--addr", reader_node.control,
                            "--size", str(a.size), "--rate", str(a.rate), "--seconds", str(seconds),
                            "--out", str(fg_out))
            started = Path(str(fg_out) + ".started")
            wait_for(started.exists, 30, "reader started")
            time.sleep(max(0.0, float(started.read_text()) + a.seconds / 2 - time.monotonic()))
        yielded0 = _yielded(reader_node)
        passes = {d.control: br.members_of(d).repair.passes for d in survivors}
        victim.stop(signal.SIGKILL)
        wait_for(lambda: all("n4" not in br.placement(d) for d in survivors), 30, "n4 dropped")
        t_drop = time.monotonic()
        pids = {f"n{i}": d.proc.pid for i, d in enumerate(survivors)}
        if reader is not None:
            pids["reader"] = reader.pid
        cpu0 = {n: _cpu_s(p) for n, p in pids.items()}
        sched0 = {n: _sched_s(p) for n, p in pids.items()}
        hists0 = _node_hists(reader_node)
        spies = [subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(p), "--duration", "30",
                                   "--rate", "500", "--idle", "--threads", "--nonblocking", "--format", "raw",
                                   "--output", str(Path(a.repair_profile) / f"{n}.txt")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for n, p in pids.items()] if a.repair_profile else []

        def repaired() -> bool:
            sts = [br.members_of(d).repair for d in survivors]
            return all(r.passes > passes[d.control] and r.state == "idle" and r.pending == 0
                       for d, r in zip(survivors, sts))
        wait_for(repaired, 120, "repair done on every survivor", step=0.1)
        t_done = time.monotonic()
        cpu = {n: _cpu_s(p) - cpu0[n] for n, p in pids.items()}
        sched = {n: [b - a for a, b in zip(sched0[n], _sched_s(p))] for n, p in pids.items()}
        hists = {k: [(le, n1 - n0) for (le, n1), (_, n0) in zip(v, hists0[k])]
                 for k, v in _node_hists(reader_node).items()}
        for spy in spies:  # py-spy writes its file on SIGINT
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=30)
        yielded = _yielded(reader_node) - yielded0
        held = [_metric(d, "kvstored_repair_held_seconds_total") for d in survivors]
        print(f"repair: {t_done - t_drop:.2f} s to full redundancy, n0 yielded {yielded:.2f} s"
              f" ({'with' if reader else 'without'} the reader); CPU s meanwhile: "
              + ", ".join(f"{n} {c:.2f}" for n, c in cpu.items()), flush=True)
        print("peers' repair requests held behind clients, s: "
              + ", ".join(f"n{i} {h:.2f}" for i, h in enumerate(held)), flush=True)
        print("main threads meanwhile, s on a CPU / s runnable waiting for one: "
              + ", ".join(f"{n} {r:.2f}/{w:.2f}" for n, (r, w) in sched.items()), flush=True)
        print("n0 meanwhile, p99 (ms, a bucket's bound): "
              + ", ".join(f"{k} {_bucket_pct(v, 0.99):g} of {v[-1][1] if v else 0:.0f}" for k, v in hists.items()),
              flush=True)
        if reader is None:
            return [{"system": "kvstored", "phase": f"repair, no reader ({t_done - t_drop:.2f} s)",
                     "gets": 0, "errors": 0, "p50": 0, "p99": 0, "p999": 0, "max": 0,
                     "svc_p99": 0, "svc_max": 0, "bg_mb_s": 0.0, "load": os.getloadavg()[0]}]
        reader.send_signal(signal.SIGINT)
        reader.wait(timeout=30)
        fg = json.loads(fg_out.read_text()) if fg_out.exists() else None
    finally:
        for d in daemons:
            d.stop()
        etcd.stop()
    if fg is None:
        raise RuntimeError("the reader left no results")
    t0, r = fg["t0"], fg["rate"]
    before = [i for i in range(len(fg["lat"])) if t0 + i / r < t_drop - 3.0]  # before the kill
    during = [i for i in range(len(fg["lat"])) if t_drop <= t0 + i / r <= t_done]
    rows = []
    for phase, idx in (("cluster, before the loss", before),
                       (f"repair at {rate >> 20} MiB/s ({t_done - t_drop:.2f} s, n0 yielded "
                        f"{yielded:.2f} s)", during)):
        if idx:
            rows.append(_row("kvstored", phase, [fg["lat"][i] for i in idx], [fg["svc"][i] for i in idx],
                             fg["errors"] if phase.startswith("repair") else 0, 0.0))
            print(_line(rows[-1]), flush=True)
    return rows


def _yielded(d) -> float:
    """kvstored_repair_yield_seconds_total of node ``d`` (0.0 on a tree without it)."""
    return _metric(d, "kvstored_repair_yield_seconds_total")


def _metric(d, name: str) -> float:
    """Node ``d``'s metric ``name`` (without labels; 0.0 on a tree without it)."""
    import urllib.request
    with urllib.request.urlopen(d.metrics_url + "/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


_HISTS = {"loop lag": ("kvstored_event_loop_lag_seconds_bucket{", ""),
          "data get": ("kvstored_request_duration_seconds_bucket{", 'op="get",plane="data"'),
          "data put": ("kvstored_request_duration_seconds_bucket{", 'op="put",plane="data"')}


def _node_hists(d) -> dict[str, list]:
    """Node ``d``'s loop-lag and data-plane get/put histograms: name -> [(le, count)]."""
    import urllib.request
    with urllib.request.urlopen(d.metrics_url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, list] = {}
    for name, (prefix, labels) in _HISTS.items():
        rows = []
        for line in text.splitlines():
            if line.startswith(prefix) and labels in line:
                le = line.split('le="', 1)[1].split('"', 1)[0]
                rows.append((float(le), float(line.rsplit(" ", 1)[1])))
        out[name] = rows
    return out


def _bucket_pct(delta: list, q: float) -> float:
    """The bound (ms) of the bucket holding quantile ``q`` of a histogram's [(le, d_count)]
    deltas (cumulative counts)."""
    total = delta[-1][1] if delta else 0
    for le, n in delta:
        if total and n >= q * total:
            return le * 1e3
    return 0.0


def _sched_s(pid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of process ``pid``'s main
    thread (the daemon's event loop; Linux schedstat)."""
    try:
        run, wait, _ = Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()
    except (OSError, ValueError):
        return 0.0, 0.0
    return int(run) / 1e9, int(wait) / 1e9


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds process ``pid`` has used (Linux /proc; its threads too)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _default_repair_rate() -> int:
    from kvstored.config import load_config
    return int(load_config(None).cluster_repair_rate)


def kvstored_rows(a, tmp: Path) -> list[dict]:
    from daemonutil import Daemon
    rows = []
    for phase in a.phases:
        if phase == "repair":
            rows += repair_rows(a, tmp)
            continue
        args = ["--dram-size", ARENA, "--slab-size", "4MiB", "--max-value-size", "4MiB"]
        if phase == "nvme":
            args += ["--nvme-path", str(tmp / "tier.bin"), "--nvme-size", "2GiB"]
        d = Daemon(tmp, *args).start(timeout=60)
        try:
            addr = d.control
            subprocess.run([sys.executable, __file__, "--role", "load", "--system", "kvstored",
                            "--addr", addr, "--size", str(a.size), "--phase", phase], check=True, timeout=300)
            rows.append(run_phase("kvstored", addr, phase, a, tmp))
        finally:
            d.stop()
            (tmp / "tier.bin").unlink(missing_ok=True)
        print(_line(rows[-1]), flush=True)
    return rows


def redis_rows(a, tmp: Path) -> list[dict]:
    from peers import RedisServer
    rows = []
    for phase in a.phases:
        if phase in ("nvme", "repair"):
            continue
        with RedisServer() as r:
            addr = f"127.0.0.1:{r.port}"
            if phase == "evict":
                import redis
                redis.Redis(port=r.port).config_set("maxmemory", "256mb")
                redis.Redis(port=r.port).config_set("maxmemory-policy", "volatile-lru")
            subprocess.run([sys.executable, __file__, "--role", "load", "--system", "redis",
                            "--addr", addr, "--size", str(a.size), "--phase", phase], check=True, timeout=300)
            rows.append(run_phase("redis", addr, phase, a, tmp))
        print(_line(rows[-1]), flush=True)
    return rows


def _line(r: dict) -> str:
    return (f"{r['system']:8s} {r['phase']:9s} gets {r['gets']:5d} err {r['errors']}  p50 {r['p50']:8.0f}"
            f"  p99 {r['p99']:8.0f}  p99.9 {r['p999']:8.0f}  max {r['max']:8.0f} us"
            f"  | writer {r['bg_mb_s']:7.0f} MB/s  load {r['load']:.1f}")


def table(rows: list[dict], a) -> str:
    pace = f"{a.writer_mbs:.0f} MB/s" if a.writer_mbs > 0 else "flat out"
    out = [f"reader: get of {a.size >> 10} KiB at {a.rate:.0f}/s for {a.seconds:.0f} s, open loop "
           f"(latency from the scheduled send); writer paced at {pace}; TCP; us",
           "",
           "| phase | system | gets | errors | p50 | p99 | p99.9 | max | service p99 | service max | writer MB/s | load |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    order = {p: i for i, p in enumerate(a.phases)}
    for r in sorted(rows, key=lambda r: (order.get(r["phase"], len(order)), r["system"])):
        out.append(f"| {r['phase']} | {r['system']} | {r['gets']} | {r['errors']} | {r['p50']:.0f} | "
                   f"{r['p99']:.0f} | {r['p999']:.0f} | {r['max']:.0f} | {r['svc_p99']:.0f} | {r['svc_max']:.0f} | "
                   f"{r['bg_mb_s']:.0f} | {r['load']:.1f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rate", type=float, default=400.0, help="reader gets per second")
    ap.add_argument("--size", default="64KiB")
    ap.add_argument("--phases", default="idle,neighbour,evict,nvme")
    ap.add_argument("--writer-mbs", type=float, default=250.0,
                    help="background writer's pace in MB/s (0: flat out, which differs per system)")
    ap.add_argument("--repair-objects", type=int, default=1536,
                    help="1 MiB objects under ec:3+2 in the repair phase")
    ap.add_argument("--repair-rate", type=lambda t: parse_size(t) if not t.isdigit() else int(t), default=0,
                    help="the nodes' cluster.repair_rate (bytes/s; default: the daemon's default)")
    ap.add_argument("--repair-yield-lag", type=float, default=None,
                    help="the nodes' cluster.repair_yield_lag in seconds (0: never yield; "
                         "default: the daemon's default)")
    ap.add_argument("--repair-min-pace", type=float, default=None,
                    help="the nodes' cluster.repair_min_pace (default: the daemon's default)")
    ap.add_argument("--no-repair-reader", dest="repair_reader", action="store_false",
                    help="repair phase without the reader: the repair's time alone")
    ap.add_argument("--repair-profile", metavar="DIR", default="",
                    help="py-spy record (raw, --idle) each survivor and the reader during the "
                         "repair into DIR/<name>.txt (slows them: not for comparable figures)")
    ap.add_argument("--skip-redis", action="store_true")
    ap.add_argument("--role", choices=["load", "reader", "writer", "caller"], help=argparse.SUPPRESS)
    ap.add_argument("--system", help=argparse.SUPPRESS)
    ap.add_argument("--addr", help=argparse.SUPPRESS)
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.size = int(a.size) if str(a.size).isdigit() else parse_size(a.size)
    if a.role == "load":
        role_load(a.system, a.addr, a.size, a.phase or "")
        return 0
    if a.role == "caller":
        role_caller(a.system, a.addr, a.seconds, a.out)
        return 0
    if a.role == "reader":
        role_reader(a.system, a.addr, a.size, a.rate, a.seconds, a.out)
        return 0
    if a.role == "writer":
        role_writer(a.system, a.addr, a.phase, a.seconds, a.writer_mbs, a.out)
        return 0
    a.phases = [p for p in a.phases.split(",") if p]
    bad = set(a.phases) - {"idle", "neighbour", "evict", "nvme", "repair", "bigcalls"}
    if bad:
        ap.error(f"unknown phase(s): {', '.join(sorted(bad))}")
    with tempfile.TemporaryDirectory(prefix="bench-tail-") as t:
        tmp = Path(t)
        rows = kvstored_rows(a, tmp)
        if not a.skip_redis:
            rows += redis_rows(a, tmp)
    print()
    print(table(rows, a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
