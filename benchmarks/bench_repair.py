"""Cluster repair after a node loss: how fast do the survivors restore full redundancy?

Starts a real etcd (tests/cluster/etcdutil.Etcd) and 5 kvstored nodes (tests/daemonutil.
Daemon) with the cluster enabled (lease_ttl 2, repair_delay 0.5, repair_interval 30,
cluster.repair_rate from ``--repair-rate``, default 1GiB so the throttle is not the
limit) and the policy ``ec:3+2`` on namespace "ec". It writes ``--objects`` objects of
``--size`` bytes through ``ClusterClient.from_cluster(...).batch_put``, SIGKILLs one
node, waits until every survivor has dropped it from placement (Members RPC,
``m.placement``), then polls every survivor's own repair status (Members().repair) until
each has completed a pass since it saw the drop and is idle with pending 0. The time from
"drop seen by all survivors" to that point is the rebuild time; it is then checked once in
full (every object's slots over the 4 live nodes hold all K+M distinct records, each
read back and checksum-verified), and every object is read back through the
ClusterClient and compared byte for byte (exit status 1 when anything differs).

Lost data is what the survivors' repair counters say they wrote (records_written /
bytes_written deltas, record = 64-byte header + fragment), shown beside what the victim
held (its Stats counters before the kill). Beside the rebuild throughput stands pyeclib's
raw reconstruct speed for one fragment of the same object size
(``ECDriver(k=3, m=2, ec_type="isa_l_rs_vand").reconstruct(K fragments, [missing])``),
measured in the same run.

All processes share one host (and its cores) and talk over loopback: this measures the
repair agent's software path, not a network. So it also reports the CPU seconds the
survivors used during the rebuild (/proc; user and system, and per record rebuilt),
which shared cores do not inflate as much as wall time. ``--malloc-env`` starts the
nodes with glibc's mmap/trim thresholds raised (fragment-sized buffers reused instead
of mapped and faulted in afresh).

    PYTHONPATH=client:. python benchmarks/bench_repair.py [--objects 256] [--size 1MiB]
        [--repair-rate 1GiB] [--dram 512MiB] [--victim 2] [--codec-iters 300]
        [--timeout 120] [--keep] [--malloc-env]
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "client"), str(REPO), str(REPO / "tests"), str(REPO / "tests" / "cluster")]

MIB = 1 << 20
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * MIB), "MALLOC_TRIM_THRESHOLD_": str(256 * MIB)}
N_NODES = 5
EC = "ec:3+2"
NS = "ec"


def parse_size(text: str) -> int:
    t = text.strip()
    for suffix, mult in (("GiB", 1 << 30), ("MiB", MIB), ("KiB", 1 << 10), ("B", 1)):
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * mult)
    return int(t)


def fmt_size(n: float) -> str:
    for unit, mult in (("GiB", 1 << 30), ("MiB", MIB), ("KiB", 1 << 10)):
        if n >= mult:
            return f"{n / mult:.4g} {unit}"
    return f"{int(n)} B"


def config(tmp: Path, name: str, etcd_endpoint: str, repair_rate: int) -> str:
    lines = ["[node]", f'id = "{name}"',
             "[cluster]", "enabled = true", "lease_ttl = 2", 'name = "bench-repair"',
             f'etcd_endpoints = "{etcd_endpoint}"', "repair_delay = 0.5", "repair_interval = 30",
             f"repair_rate = {repair_rate}", f'policies = "{NS}={EC}"']
    path = tmp / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def members_of(d):
    import kvstore
    with kvstore.Client(d.control, timeout=5, shm=False) as c:
        return c.members()


def placement(d) -> set[str]:
    return {m.node_id for m in members_of(d).members if m.placement}


def full_check(members, objs: dict, p) -> list:
    """Objects not at full redundancy over ``members`` (every record read and
    checksum-verified): [] when repair is done."""
    from clusterutil import missing_redundancy
    return missing_redundancy(members, NS, p, objs)


def cpu_seconds(d) -> tuple[float, float]:
    """(user, system) CPU seconds a daemon process has used (Linux /proc)."""
    fields = Path(f"/proc/{d.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tck, int(fields[12]) / tck


def cpu_of(daemons) -> tuple[float, float]:
    """(user, system) CPU seconds of ``daemons`` together."""
    got = [cpu_seconds(d) for d in daemons]
    return sum(u for u, _s in got), sum(s for _u, s in got)


def codec_speed(size: int, iters: int) -> dict:
    """pyeclib's raw reconstruct of one fragment of a ``size``-byte object from K others."""
    from pyeclib.ec_iface import ECDriver
    d = ECDriver(k=3, m=2, ec_type="isa_l_rs_vand")
    frags = d.encode(os.urandom(size))
    out = {}
    for missing in (0, 3):  # a data fragment, a parity fragment
        src = [f for i, f in enumerate(frags) if i != missing][:3]
        got = d.reconstruct(src, [missing])
        assert got[0] == frags[missing], "pyeclib reconstruct mismatch"
        for _ in range(10):
            d.reconstruct(src, [missing])
        t0 = time.perf_counter()
        for _ in range(iters):
            d.reconstruct(src, [missing])
        dt = (time.perf_counter() - t0) / iters
        out[missing] = (len(frags[missing]), dt)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objects", type=int, default=256)
    ap.add_argument("--size", type=parse_size, default=MIB)
    ap.add_argument("--repair-rate", type=parse_size, default=1 << 30)
    ap.add_argument("--dram", type=parse_size, default=512 * MIB)
    ap.add_argument("--victim", type=int, default=2, help="index of the node to SIGKILL (0..4)")
    ap.add_argument("--codec-iters", type=int, default=300)
    ap.add_argument("--timeout", type=float, default=120.0, help="limit on the rebuild wait (s)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    ap.add_argument("--malloc-env", action="store_true",
                    help="start the nodes with MALLOC_MMAP_THRESHOLD_=64MiB / MALLOC_TRIM_THRESHOLD_="
                         "256MiB (glibc keeps freed fragment-sized buffers instead of a fresh mmap, "
                         "and page faults, per allocation)")
    args = ap.parse_args(argv)

    import kvstore
    from kvstore.cluster import ClusterClient
    from kvstore.layout import Policy
    from kvstore.placement import Member
    from daemonutil import Daemon
    from etcdutil import Etcd
    from clusterutil import wait_for as wait

    if shutil.which("etcd") is None:
        print("etcd binary not on PATH", file=sys.stderr)
        return 2

    def on_term(signum, frame):  # SIGTERM cleans up like Ctrl-C
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)

    p = Policy.parse(EC)
    tmp = Path(tempfile.mkdtemp(prefix="bench-repair-"))
    etcd = None
    daemons: list = []
    cc = None
    rc = 0
    t_start = time.monotonic()
    load = os.getloadavg()[0]
    try:
        etcd = Etcd(tmp).start()
        for i in range(N_NODES):
            daemons.append(Daemon(tmp, "--config", config(tmp, f"n{i}", etcd.endpoint, args.repair_rate),
                                  "--dram-size", f"{args.dram // MIB}MiB",
                                  env=MALLOC_ENV if args.malloc_env else None).start())
        ids = {f"n{i}" for i in range(N_NODES)}
        for d in daemons:
            wait(lambda d=d: placement(d) == ids, 20, "five nodes registered")
        cc = ClusterClient.from_cluster([d.control for d in daemons], node_timeout=5.0, fragment_timeout=1.0,
                                        down_s=1.0, refresh_s=0.5)
        assert str(cc.policy(NS)) == EC, cc.policy(NS)

        # ---- write
        objs: dict[bytes, bytes] = {}
        for i in range(args.objects):
            objs[f"obj-{i:06d}".encode()] = i.to_bytes(4, "little") + os.urandom(args.size - 4)
        items = list(objs.items())
        t0 = time.monotonic()
        for i in range(0, len(items), 32):
            cc.batch_put(items[i:i + 32], namespace=NS)
        t_put = time.monotonic() - t0

        # ---- kill one node
        victim = daemons[args.victim]
        vid = f"n{args.victim}"
        survivors = [d for d in daemons if d is not victim]
        with kvstore.Client(victim.control, timeout=5, shm=False) as c:
            vc = dict(c.stats().counters)
        victim_records = int(vc.get("objects", 0))
        base = {}
        for d in survivors:
            r = members_of(d).repair
            base[d.control] = (r.passes, r.records_written, r.bytes_written, r.failures)
        # records younger than max(2 s, repair_delay) are left to a later pass: the drop
        # below (lease_ttl 2) takes longer than that anyway
        victim.stop(signal.SIGKILL)
        t_kill = time.monotonic()
        passes_at_drop = {}
        pending_drop = set(d.control for d in survivors)
        deadline = t_kill + 30
        while pending_drop:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{vid} not dropped from placement within 30s")
            for d in survivors:
                if d.control in pending_drop:
                    r = members_of(d)
                    if vid not in {m.node_id for m in r.members if m.placement}:
                        passes_at_drop[d.control] = r.repair.passes
                        pending_drop.discard(d.control)
            time.sleep(0.05)
        t_drop = time.monotonic()
        cpu_drop = cpu_of(survivors)

        # ---- wait for every survivor: a pass done since the drop, idle, pending 0
        polls = 0
        while True:
            if time.monotonic() - t_drop > args.timeout:
                raise TimeoutError(f"repair not done within {args.timeout}s")
            sts = [members_of(d).repair for d in survivors]
            polls += 1
            if all(r.passes > passes_at_drop[d.control] and r.state == "idle" and r.pending == 0
                   for d, r in zip(survivors, sts)):
                break
            time.sleep(0.05)
        t_done = time.monotonic()
        cpu_now = cpu_of(survivors)
        cpu_user, cpu_sys = cpu_now[0] - cpu_drop[0], cpu_now[1] - cpu_drop[1]
        cpu_rebuild = cpu_user + cpu_sys
        rebuild_s = t_done - t_drop
        records = sum(r.records_written - base[d.control][1] for d, r in zip(survivors, sts))
        nbytes = sum(r.bytes_written - base[d.control][2] for d, r in zip(survivors, sts))
        failures = sum(r.failures - base[d.control][3] for d, r in zip(survivors, sts))
        passes = sum(r.passes - passes_at_drop[d.control] for d, r in zip(survivors, sts))
        last_pass = max(r.last_pass_seconds for r in sts)

        # ---- one full check, then read everything back
        live = members_of(survivors[0])
        members = [Member(m.node_id, m.control_address, m.failure_domain) for m in live.members if m.placement]
        assert {m.node_id for m in members} == ids - {vid}, members
        t0 = time.monotonic()
        bad = full_check(members, objs, p)
        t_check = time.monotonic() - t0
        mismatched = 0
        keys = list(objs)
        for i in range(0, len(keys), 32):
            got = cc.batch_get(keys[i:i + 32], namespace=NS)
            mismatched += sum(1 for k, g in zip(keys[i:i + 32], got) if bytes(g) != objs[k])
        codec = codec_speed(args.size, args.codec_iters)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if cc is not None:
            cc.close()
        for d in daemons:
            try:
                d.stop(signal.SIGKILL, timeout=5)
            except Exception as e:  # keep cleaning up
                print(f"stopping a node: {e}", file=sys.stderr)
        if etcd is not None:
            etcd.stop()
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    frag_len, frag_dt = codec[0]
    _, par_dt = codec[3]
    total = args.objects * args.size
    print(f"{args.objects} x {fmt_size(args.size)} objects ({fmt_size(total)}), {EC}, {N_NODES} nodes, "
          f"{os.cpu_count()} cores (load average {load:.1f} at start); puts took {t_put:.2f}s ({total / t_put / 1e9:.2f} GB/s)")
    print(f"victim {vid}: {victim_records} records before the kill; dropped from placement by all survivors {t_drop - t_kill:.2f}s after SIGKILL")
    print(f"survivors: {passes} passes since the drop, longest last pass {last_pass:.2f}s, "
          f"{failures} failures, {polls} status polls; full check {t_check:.2f}s")
    print()
    rows = [
        ("objects lost with the node (records rebuilt)", f"{records}", ""),
        ("bytes rebuilt (records, header + fragment)", fmt_size(nbytes), ""),
        ("rebuild time (drop seen -> redundancy)", f"{rebuild_s:.2f} s", ""),
        ("rebuild time (SIGKILL -> redundancy)", f"{t_done - t_kill:.2f} s", ""),
        ("rebuild throughput", f"{nbytes / rebuild_s / 1e6:.1f} MB/s",
         f"{records / rebuild_s:.0f} records/s"),
        ("  same, less the 0.5 s repair_delay", f"{nbytes / (rebuild_s - 0.5) / 1e6:.1f} MB/s",
         f"{rebuild_s - 0.5:.2f} s of passes"),
        ("survivors' CPU time during the rebuild", f"{cpu_rebuild:.2f} s",
         f"all 4 processes; {nbytes / max(cpu_rebuild, 1e-9) / 1e6:.0f} MB rebuilt per CPU-second"),
        ("  of which user / system", f"{cpu_user:.2f} / {cpu_sys:.2f} s",
         f"{cpu_rebuild * 1e6 / max(records, 1):.0f} us of CPU per record rebuilt"),
        ("pyeclib reconstruct, 1 data fragment", f"{frag_len / frag_dt / 1e6:.0f} MB/s",
         f"{frag_dt * 1e6:.0f} us per {fmt_size(frag_len)} fragment"),
        ("pyeclib reconstruct, 1 parity fragment", f"{frag_len / par_dt / 1e6:.0f} MB/s",
         f"{par_dt * 1e6:.0f} us"),
        ("configured cluster.repair_rate (per node)", f"{args.repair_rate / 1e6:.0f} MB/s",
         fmt_size(args.repair_rate) + "/s"),
    ]
    w = max(len(r[0]) for r in rows)
    print(f"| {'metric':<{w}} | value | note |")
    print(f"|{'-' * (w + 2)}|---:|---|")
    for name, val, note in rows:
        print(f"| {name:<{w}} | {val} | {note} |")
    print()
    print(f"full redundancy check: {'OK' if not bad else f'{len(bad)} objects incomplete, e.g. {bad[:3]}'}")
    print(f"read-back through the ClusterClient: {len(objs) - mismatched}/{len(objs)} objects byte-identical")
    if bad or mismatched:
        rc = 1
    if records != victim_records:
        print(f"note: records rebuilt ({records}) != records the victim held ({victim_records})")
    print(f"total runtime {time.monotonic() - t_start:.1f}s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
