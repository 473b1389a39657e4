"""Scale on paper, from our own code: what a 1,000-node, 10^9-object fleet costs.

Measures, with the SDK's real placement and layout code (kvstore.placement,
kvstore.layout), on this machine:

1. placement cost per key (``layout.slots``) for none / replicas:3 / ec:4+2 at 10, 100
   and 1,000 members: rendezvous hashing scores every member for every key, so the cost
   grows with the cluster;
2. data moved when one node joins or leaves: the share of sampled objects whose slot set
   (or, for EC, any position) changes, beside the ideal 1/N;

and derives, from per-object figures measured elsewhere in this repository (given as
arguments, defaults = the figures in benchmarks/RESULTS.md at the time of writing):

3. index memory per node, restart time per node, repair time for a lost node;
4. etcd load per cluster size (leases, keep-alives, watch events, periodic re-reads),
   from the membership code's own intervals (kvstored/cluster/membership.py: renew every
   ttl/3, full re-read every ttl).

    PYTHONPATH=client python benchmarks/sim_scale.py [--objects 1e9] [--nodes 1000]
        [--sample 2000] [--markdown F]
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(os.path.dirname(HERE), "client")]

from kvstore import layout  # noqa: E402
from kvstore.placement import Member  # noqa: E402

POLICIES = ["none", "replicas:3", "ec:4+2"]


def members(n: int, domains: int = 0) -> list[Member]:
    return [Member(f"node-{i:05d}", f"10.0.{i // 250}.{i % 250}:7070",
                   f"rack-{i % domains}" if domains else "") for i in range(n)]


def keys(n: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(32) for _ in range(n)]


def placement_cost(n_members: int, policy: str, sample: int, budget_s: float = 4.0) -> float:
    """Seconds per key for layout.slots() (best of the sample; bounded by budget_s)."""
    p = layout.Policy.parse(policy)
    ms = members(n_members, domains=max(1, n_members // 20))
    ks = keys(sample)
    done = 0
    t0 = time.perf_counter()
    for k in ks:
        layout.slots(layout.placement_key(k, p), ms, p, b"ns")
        done += 1
        if time.perf_counter() - t0 > budget_s:
            break
    return (time.perf_counter() - t0) / done


def moved_share(n_members: int, policy: str, sample: int, change: str) -> float:
    """Share of objects with at least one slot moved when one member leaves or one joins."""
    p = layout.Policy.parse(policy)
    ms = members(n_members + (1 if change == "join" else 0))
    before = ms[:n_members] if change == "join" else ms
    after = ms if change == "join" else [m for m in ms if m.node_id != ms[n_members // 2].node_id]
    moved = 0
    ks = keys(sample, seed=7)
    for k in ks:
        pk = layout.placement_key(k, p)
        a = [m.node_id for m, _lap in layout.slots(pk, before, p, b"ns")]
        b = [m.node_id for m, _lap in layout.slots(pk, after, p, b"ns")]
        if p.kind == "ec":
            moved += sum(x != y for x, y in zip(a, b))  # positions moved
        else:
            moved += len(set(a) - set(b))  # records moved
    return moved / (len(ks) * p.n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--objects", type=float, default=1e9)
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--sample", type=int, default=2000, help="keys sampled per measurement")
    ap.add_argument("--object-size", type=float, default=256 * 1024, help="mean object bytes")
    ap.add_argument("--index-bytes", type=float, default=600.0,
                    help="daemon RAM per object in the index (measured: ~600 B today)")
    ap.add_argument("--restart-us", type=float, default=3.2,
                    help="restart cost per NVMe record, microseconds (measured: 3.2 us with "
                         "region summaries, 1 M records; 98 us before them)")
    ap.add_argument("--repair-mbs", type=float, default=70.0,
                    help="repair rebuild rate per surviving node pool, MB/s (measured: ~70 MB/s today)")
    ap.add_argument("--ttl", type=float, default=10.0, help="cluster.lease_ttl seconds")
    ap.add_argument("--markdown")
    args = ap.parse_args(argv)
    out: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        out.append(line)

    say("## Placement cost per key (layout.slots, measured on this machine)")
    say("")
    say("| members | " + " | ".join(POLICIES) + " |")
    say("|---:|" + "---:|" * len(POLICIES))
    cost = {}
    for n in (10, 100, 1000):
        row = []
        for pol in POLICIES:
            c = placement_cost(n, pol, args.sample)
            cost[(n, pol)] = c
            row.append(f"{c * 1e6:,.0f} us")
        say(f"| {n} | " + " | ".join(row) + " |")
    say("")
    say("## Data moved by one membership change (share of records; ideal = replicas/N)")
    say("")
    say("| members | policy | leave | join | 1/N |")
    say("|---:|---|---:|---:|---:|")
    for n in (10, 100):
        for pol in POLICIES:
            s = max(200, args.sample // (1 if n <= 10 else 4))
            lv = moved_share(n, pol, s, "leave")
            jn = moved_share(n, pol, s, "join")
            say(f"| {n} | {pol} | {lv:.4f} | {jn:.4f} | {1 / n:.4f} |")
    say("")
    n, objs = args.nodes, args.objects
    say(f"## One node of {n:,} holding its share of {objs:,.0f} objects")
    say("")
    say("| policy | records/node | index RAM (today) | index RAM (64 B) | restart (today) | "
        "restart (before summaries, 98 us) | bytes/node | repair of a lost node (today) |")
    say("|---|---:|---:|---:|---:|---:|---:|---:|")
    for pol in POLICIES:
        p = layout.Policy.parse(pol)
        stretch = (p.k + p.m) / p.k if p.kind == "ec" else p.n
        recs = objs * (p.k + p.m if p.kind == "ec" else p.n) / n
        nbytes = objs * args.object_size * stretch / n
        say(f"| {pol} | {recs:,.0f} | {recs * args.index_bytes / 2**30:,.1f} GiB | "
            f"{recs * 64 / 2**30:,.2f} GiB | {recs * args.restart_us / 1e6 / 60:,.1f} min | "
            f"{recs * 98e-6 / 60:,.1f} min | {nbytes / 2**40:,.2f} TiB | "
            f"{nbytes / (args.repair_mbs * 1e6) / 3600:,.1f} h |")
    say("")
    say(f"## etcd load (lease_ttl {args.ttl:g} s; renew every ttl/3, full re-read every ttl)")
    say("")
    say("| nodes | leases | keep-alives/s | re-read ranges/s | re-read keys/s | "
        "watch events per change | watch events/s at 1 change/min |")
    say("|---:|---:|---:|---:|---:|---:|---:|")
    for nodes in (10, 100, 1000, 10000):
        ka = nodes / max(0.5, args.ttl / 3)
        rr = nodes / args.ttl
        say(f"| {nodes:,} | {nodes:,} | {ka:,.0f} | {rr:,.0f} | {rr * nodes:,.0f} | {nodes:,} | "
            f"{nodes / 60:,.1f} |")
    say("")
    per_key_1000 = cost[(1000, "ec:4+2")]
    say(f"At {n:,} members an ec:4+2 placement costs {per_key_1000 * 1e3:.2f} ms per key in "
        f"Python: a client putting 10,000 blocks/s would spend {per_key_1000 * 1e4:.0f} s of CPU "
        "per second on placement alone.")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
