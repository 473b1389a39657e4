"""Cluster repair after a node loss: how fast do the survivors restore full redundancy?

Starts a real etcd (tests/cluster/etcdutil.Etcd) and 5 kvstored nodes (tests/daemonutil.
Daemon) with the cluster enabled (lease_ttl 2, repair_delay 0.5, repair_interval 30,
cluster.repair_rate from ``--repair-rate``, default 1GiB so the throttle is not the
limit) and the policy ``ec:3+2`` on namespace "ec". It writes ``--objects`` objects of
``--size`` bytes through ``ClusterClient.from_cluster(...).batch_put``, SIGKILLs one
node (2.5 s after the last put: a pass leaves records younger than 2 s to a later
pass), waits until every survivor has dropped it from placement (Members RPC,
``m.placement``), then polls every survivor's own repair status (Members().repair) until
each has completed a pass since it saw the drop and is idle with pending 0. It is then
checked once in full (every object's slots over the 4 live nodes hold all K+M distinct
records, each read back and checksum-verified), and every object is read back through the
ClusterClient and compared byte for byte (exit status 1 when anything differs).

Three times are reported, each labelled:

* SIGKILL -> redundancy: what an operator waits (includes etcd's lease expiry, ~2 s);
* drop seen -> redundancy: from the moment every survivor has dropped the victim from
  placement; includes the configured ``repair_delay`` (0.5 s) a pass waits after a
  membership change, so with few objects that fixed wait is a large share;
* the passes: from the earliest start of a survivor's pass since the drop to the latest end
  (each survivor's pass end seen by the 50 ms status polls, its start = end - its
  ``last_pass_seconds``; both are late by at most one poll). This excludes the configured
  delay; its rate is the repair agent's own speed. Use ``--objects 3072`` or more to make
  the delay a small share of drop -> redundancy too (``--dram`` defaults to a size that
  holds a node's records after the rebuild).

Lost data is what the survivors' repair counters say they wrote (records_written /
bytes_written deltas, record = 64-byte header + fragment), shown beside what the victim
held (its Stats counters before the kill). Beside the rebuild throughput stands pyeclib's
raw reconstruct speed for one fragment of the same object size
(``ECDriver(k=3, m=2, ec_type="isa_l_rs_vand").reconstruct(K fragments, [missing])``),
measured in the same run.

All processes share one host (and its cores) and talk over loopback: this measures the
repair agent's software path, not a network. So it also reports the CPU seconds the
survivors used from the drop to redundancy (/proc; user and system, and per record
rebuilt), and how many cores that is over the passes. ``--malloc-env`` starts the nodes
with glibc's mmap/trim thresholds raised. Object bytes are slices of one random pool at a
distinct offset per object (no two objects or fragments alike), made again for the
read-back, so the benchmark holds no copy of all objects.

``--profile py-spy|py-spy-py|perf|strace`` records the survivors from the kill to
redundancy into ``--profile-dir`` (py-spy --native per survivor, raw collapsed stacks, or
py-spy-py: Python frames only, --nonblocking, lighter; perf record --call-graph dwarf
of all four; strace -c -f per survivor: syscall counts). Profilers slow the survivors: figures of
a profiled run are not comparable. ``--daemon-root DIR`` runs the nodes from another
checkout (its client/ and its root on PYTHONPATH), for A/B runs of frozen trees.

    PYTHONPATH=client:. python benchmarks/bench_repair.py [--objects 256] [--size 1MiB]
        [--repair-rate 1GiB] [--dram auto] [--victim 2] [--codec-iters 300]
        [--timeout 120] [--keep] [--malloc-env] [--daemon-root DIR]
        [--profile py-spy|perf|strace --profile-dir DIR]
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "client"), str(REPO), str(REPO / "tests"), str(REPO / "tests" / "cluster")]

MIB = 1 << 20
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * MIB), "MALLOC_TRIM_THRESHOLD_": str(256 * MIB)}
N_NODES = 5
REPAIR_DELAY_S = 0.5  # cluster.repair_delay of the nodes
POLL_S = 0.05  # status polls while waiting for the drop and for redundancy
YOUNG_WAIT_S = 2.5  # from the last put to the SIGKILL (repair's YOUNG_S is 2 s)
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
             f'etcd_endpoints = "{etcd_endpoint}"', f"repair_delay = {REPAIR_DELAY_S}", "repair_interval = 30",
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


class Objects:
    """Object i: its index (8 bytes) and a slice of one random pool at offset i * 4099
    mod ``size`` (4099 is odd, so no two of a million objects share an offset, and no two
    objects or fragments are alike); made on demand, so nothing holds them all."""

    def __init__(self, n: int, size: int):
        self.n, self.size = n, size
        self.pool = os.urandom(2 * size)
        self.keys = [f"obj-{i:06d}".encode() for i in range(n)]

    def value(self, i: int) -> bytes:
        off = i * 4099 % self.size
        return i.to_bytes(8, "little") + self.pool[off:off + self.size - 8]

    def sizes(self) -> dict:
        """{key: a buffer of the object's length}: what the full check reads of them (len)."""
        z = memoryview(bytes(self.size))
        return {k: z for k in self.keys}


def auto_dram(objects: int, size: int, p) -> int:
    """A DRAM tier that holds a node's records once the fifth record of every object has
    been rebuilt over the 4 survivors (K+M records of size/K each, over N_NODES - 1
    nodes), with a quarter to spare, rounded up to 64 MiB; never below 512 MiB."""
    rec = size // p.k + 4096
    need = objects * p.n * rec / (N_NODES - 1) * 1.25
    return max(512 * MIB, -(-int(need) // (64 * MIB)) * 64 * MIB)


def start_profilers(kind: str, out: Path, survivors) -> list:
    """One profiler per survivor (py-spy, strace) or one for all (perf), attached now."""
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    if kind == "perf":
        pids = ",".join(str(d.proc.pid) for d in survivors)
        procs.append(subprocess.Popen(["perf", "record", "-F", "499", "--call-graph", "dwarf,16384", "-p", pids, "-o",
                                       str(out / "perf.data")], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        return procs
    for d in survivors:
        name = d.proc.pid
        if kind in ("py-spy", "py-spy-py"):
            # py-spy is a dev dependency of the venv: next to its interpreter, if not on PATH
            spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            cmd = [spy, "record", *(["--native"] if kind == "py-spy" else ["--nonblocking"]),
                   "--rate", "200" if kind == "py-spy" else "500", "--format", "raw", "--pid",
                   str(d.proc.pid), "--output", str(out / f"pyspy-{name}.txt")]
        else:
            cmd = ["strace", "-c", "-f", "-p", str(d.proc.pid), "-o", str(out / f"strace-{name}.txt")]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


def stop_profilers(procs: list) -> None:
    for pr in procs:
        if pr.poll() is None:
            pr.send_signal(signal.SIGINT)
    for pr in procs:
        try:
            pr.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pr.kill()
            pr.wait()


def cpu_seconds(d) -> tuple[float, float]:
    """(user, system) CPU seconds a daemon process has used (Linux /proc)."""
    fields = Path(f"/proc/{d.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tck, int(fields[12]) / tck


def minor_faults(daemons) -> int:
    """Minor page faults of ``daemons`` together (Linux /proc: fresh anonymous pages the
    kernel zeroes, mostly buffers malloc took from the kernel again)."""
    return sum(int(Path(f"/proc/{d.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[7])
               for d in daemons)


def thread_cpu(daemons) -> dict:
    """{(pid, tid, comm): user + system CPU seconds} of every thread of ``daemons`` (the
    event loop's thread is the one whose tid is the pid)."""
    tck = os.sysconf("SC_CLK_TCK")
    out = {}
    for d in daemons:
        pid = d.proc.pid
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                head, fields = task.joinpath("stat").read_text().rsplit(")", 1)
            except OSError:  # the thread ended
                continue
            f = fields.split()
            out[(pid, int(task.name), head.split("(", 1)[1])] = (int(f[11]) + int(f[12])) / tck
    return out


def threads_summary(before: dict, after: dict, records: int) -> str:
    """Survivors' CPU per rebuilt record by thread kind: the event loop (main thread),
    the busiest other thread of each node (the repair agent's), and the rest."""
    loop = busiest = rest = 0.0
    by_pid: dict = {}
    for k, v in after.items():
        by_pid.setdefault(k[0], []).append((v - before.get(k, 0.0), k))
    for pid, rows in by_pid.items():
        rows.sort(reverse=True)
        others = []
        for dv, k in rows:
            if k[1] == pid:
                loop += dv
            else:
                others.append(dv)
        if others:
            busiest += others[0]
            rest += sum(others[1:])
    per = 1e6 / max(records, 1)
    return (f"event loops {loop * per:.0f} us, repair threads (busiest other) {busiest * per:.0f} us, "
            f"other threads {rest * per:.0f} us")


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
    ap.add_argument("--dram", default="auto",
                    help="DRAM tier per node (auto: a node's records after the rebuild, +25 %%)")
    ap.add_argument("--victim", type=int, default=2, help="index of the node to SIGKILL (0..4)")
    ap.add_argument("--codec-iters", type=int, default=300)
    ap.add_argument("--timeout", type=float, default=120.0, help="limit on the rebuild wait (s)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    ap.add_argument("--malloc-env", action="store_true",
                    help="start the nodes with MALLOC_MMAP_THRESHOLD_=64MiB / MALLOC_TRIM_THRESHOLD_="
                         "256MiB (glibc keeps freed fragment-sized buffers instead of a fresh mmap, "
                         "and page faults, per allocation)")
    ap.add_argument("--daemon-root", type=Path, default=None,
                    help="run the nodes from this checkout (its client/ and root on PYTHONPATH)")
    ap.add_argument("--profile", choices=("py-spy", "py-spy-py", "perf", "strace"), default=None,
                    help="record the survivors from the kill to redundancy (slows them)")
    ap.add_argument("--profile-dir", type=Path, default=Path("repair-profile"))
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
    dram = auto_dram(args.objects, args.size, p) if args.dram == "auto" else parse_size(args.dram)
    env = dict(MALLOC_ENV) if args.malloc_env else {}
    if args.daemon_root is not None:
        root = args.daemon_root.resolve()
        env["PYTHONPATH"] = os.pathsep.join([str(root / "client"), str(root)])
    profilers: list = []
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
                                  "--dram-size", f"{dram // MIB}MiB", env=env or None).start())
        ids = {f"n{i}" for i in range(N_NODES)}
        for d in daemons:
            wait(lambda d=d: placement(d) == ids, 20, "five nodes registered")
        cc = ClusterClient.from_cluster([d.control for d in daemons], node_timeout=5.0, fragment_timeout=1.0,
                                        down_s=1.0, refresh_s=0.5)
        assert str(cc.policy(NS)) == EC, cc.policy(NS)

        # ---- write
        gen = Objects(args.objects, args.size)
        t0 = time.monotonic()
        for i in range(0, args.objects, 32):
            cc.batch_put([(gen.keys[j], gen.value(j)) for j in range(i, min(i + 32, args.objects))],
                         namespace=NS)
        t_put = time.monotonic() - t0
        t_last_put = time.monotonic()

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
        # a pass leaves records younger than max(2 s, repair_delay) (agent.YOUNG_S) to a
        # later pass, 2 s on (a put may still be in flight): wait until the last put is
        # older than that, so that what is measured is one rebuild of settled data
        time.sleep(max(0.0, t_last_put + YOUNG_WAIT_S - time.monotonic()))
        if args.profile:
            profilers = start_profilers(args.profile, args.profile_dir, survivors)
            time.sleep(1.0)  # attached before the drop (lease_ttl 2)
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
            time.sleep(POLL_S)
        t_drop = time.monotonic()
        cpu_drop = cpu_of(survivors)
        faults_drop = minor_faults(survivors)
        threads_drop = thread_cpu(survivors)

        # ---- wait for every survivor: a pass done since the drop, idle, pending 0;
        # each pass that ends is seen here (its end, and its start = end - its length)
        polls = 0
        seen = dict(passes_at_drop)
        pass_spans = []  # (start, end) of the survivors' passes since the drop
        while True:
            if time.monotonic() - t_drop > args.timeout:
                raise TimeoutError(f"repair not done within {args.timeout}s")
            sts = [members_of(d).repair for d in survivors]
            now = time.monotonic()
            polls += 1
            for d, r in zip(survivors, sts):
                if r.passes > seen[d.control]:
                    seen[d.control] = r.passes
                    pass_spans.append((now - r.last_pass_seconds, now))
            if all(r.passes > passes_at_drop[d.control] and r.state == "idle" and r.pending == 0
                   for d, r in zip(survivors, sts)):
                break
            time.sleep(POLL_S)
        t_done = time.monotonic()
        cpu_now = cpu_of(survivors)
        faults_now = minor_faults(survivors)
        threads_now = thread_cpu(survivors)
        stop_profilers(profilers)
        profilers = []
        passes_s = max(e for _s, e in pass_spans) - min(s for s, _e in pass_spans)
        cpu_user, cpu_sys = cpu_now[0] - cpu_drop[0], cpu_now[1] - cpu_drop[1]
        cpu_rebuild = cpu_user + cpu_sys
        rebuild_s = t_done - t_drop
        records = sum(r.records_written - base[d.control][1] for d, r in zip(survivors, sts))
        nbytes = sum(r.bytes_written - base[d.control][2] for d, r in zip(survivors, sts))
        failures = sum(r.failures - base[d.control][3] for d, r in zip(survivors, sts))
        passes = sum(r.passes - passes_at_drop[d.control] for d, r in zip(survivors, sts))
        # each survivor's last pass (the one that rebuilt, after a single drop): a node
        # done well before the others means the rest ran on fewer busy processes
        pass_each = sorted(r.last_pass_seconds for r in sts)
        written_each = sorted(r.records_written - base[d.control][1] for d, r in zip(survivors, sts))

        # ---- one full check, then read everything back
        live = members_of(survivors[0])
        members = [Member(m.node_id, m.control_address, m.failure_domain) for m in live.members if m.placement]
        assert {m.node_id for m in members} == ids - {vid}, members
        t0 = time.monotonic()
        bad = full_check(members, gen.sizes(), p)
        t_check = time.monotonic() - t0
        mismatched = 0
        keys = gen.keys
        for i in range(0, len(keys), 32):
            got = cc.batch_get(keys[i:i + 32], namespace=NS)
            mismatched += sum(1 for j, g in enumerate(got, i) if bytes(g) != gen.value(j))
        codec = codec_speed(args.size, args.codec_iters)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        stop_profilers(profilers)
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
          f"DRAM tier {fmt_size(dram)} each, "
          f"{os.cpu_count()} cores (load average {load:.1f} at start); puts took {t_put:.2f}s ({total / t_put / 1e9:.2f} GB/s)")
    print(f"victim {vid}: {victim_records} records before the kill, SIGKILLed {t_kill - t_last_put:.2f}s after the "
          f"last put; dropped from placement by all survivors {t_drop - t_kill:.2f}s after SIGKILL")
    print(f"survivors: {passes} passes since the drop, last passes "
          f"{', '.join(f'{x:.2f}' for x in pass_each)} s, records written "
          f"{', '.join(str(x) for x in written_each)}, "
          f"{failures} failures, {polls} status polls; full check {t_check:.2f}s")
    print()
    rows = [
        ("objects lost with the node (records rebuilt)", f"{records}", ""),
        ("bytes rebuilt (records, header + fragment)", fmt_size(nbytes), ""),
        ("time SIGKILL -> redundancy", f"{t_done - t_kill:.2f} s",
         f"incl. {t_drop - t_kill:.2f} s until all survivors dropped the node (etcd lease)"),
        ("time drop seen -> redundancy", f"{rebuild_s:.2f} s",
         f"incl. the configured repair_delay ({REPAIR_DELAY_S} s)"),
        ("time of the passes (first start -> last end)", f"{passes_s:.2f} s",
         "excl. the configured repair_delay; +-1 status poll"),
        ("rebuild rate over the passes", f"{nbytes / passes_s / 1e6:.1f} MB/s",
         f"{records / passes_s:.0f} records/s; excl. the configured repair_delay"),
        ("rebuild rate over drop seen -> redundancy", f"{nbytes / rebuild_s / 1e6:.1f} MB/s",
         f"{records / rebuild_s:.0f} records/s; incl. the configured repair_delay"),
        ("survivors' CPU, drop seen -> redundancy", f"{cpu_rebuild:.2f} s",
         f"all 4 processes; {nbytes / max(cpu_rebuild, 1e-9) / 1e6:.0f} MB rebuilt per CPU-second; "
         f"{cpu_rebuild / passes_s:.2f} cores busy over the passes"),
        ("  of which user / system", f"{cpu_user:.2f} / {cpu_sys:.2f} s",
         f"{cpu_rebuild * 1e6 / max(records, 1):.0f} us of CPU per record rebuilt"),
        ("  of which by thread, per record", "", threads_summary(threads_drop, threads_now, records)),
        ("survivors' minor page faults", f"{faults_now - faults_drop}",
         f"{(faults_now - faults_drop) / max(records, 1):.0f} per record rebuilt "
         f"({fmt_size(4096 * (faults_now - faults_drop))} of pages faulted in)"),
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
    print(f"read-back through the ClusterClient: {args.objects - mismatched}/{args.objects} objects byte-identical")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if args.profile:
        print(f"profile ({args.profile}) in {args.profile_dir}: figures above are slowed by it")
    if bad or mismatched:
        rc = 1
    if records != victim_records:
        print(f"note: records rebuilt ({records}) != records the victim held ({victim_records})")
    print(f"total runtime {time.monotonic() - t_start:.1f}s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
