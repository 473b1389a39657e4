"""One repair pass over many small objects: its peak transient memory, time and the
longest event-loop stall (docs/scale.md, "Where it stops", item 5).

    PYTHONPATH=client:. python benchmarks/bench_repair_pass.py [--objects 1000000]
        [--size 64] [--held] [--index packed|dict] [--passes 2]

A real engine Store filled with ``--objects`` objects of ``--size`` bytes (namespace
"rep", policy ``replicas:2``) runs on an asyncio loop in a thread, as in the daemon; a
real RepairAgent (its own thread, LocalStore hops onto the loop) runs full passes over
it. The cluster is this node alone (a membership stand-in listing one member), so a
pass asks no peer: it walks the index, groups and selects the objects, computes their
slots and decides (nothing to write). What it measures is the pass's own cost per
object, where the memory of a pass over millions of objects goes. ``--held`` holds back
every record first (``Store.hold_all``: what a restart or a drop from the cluster
leaves), so the pass checks and verifies each one (one more loop hop per batch).
Records are made old enough to be looked at (repair's YOUNG_S set to 0).

Per pass: the wall seconds and the process's CPU seconds (the repair thread and the
loop's: on a loaded host the CPU says more than the wall), the peak RSS above the RSS before it (``VmHWM`` after
resetting it through /proc/self/clear_refs; Linux), the objects scanned, and the
longest gap between the wake-ups of a 5 ms ticker on the loop. Run each tree to
compare (``--daemon-root`` is not needed: PYTHONPATH picks the tree).
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

MiB = 1 << 20
NS = b"rep"


def _status(field: str) -> int:
    """A /proc/self/status field in bytes."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


class _Membership:
    """One member (this node), one policy; what the agent reads of Membership."""
    degraded = draining = False
    epoch = 1

    def __init__(self, me):
        self.me = me
        self.policies = {"rep": "replicas:2"}

    def view(self):
        return []

    def placement_members(self):
        return [self.me]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objects", type=int, default=1_000_000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--held", action="store_true", help="hold every record back first")
    ap.add_argument("--index", choices=("packed", "dict"), default="packed")
    ap.add_argument("--passes", type=int, default=2)
    args = ap.parse_args(argv)

    from kvstore.placement import Member
    from kvstored.cluster.repair import agent as agent_mod
    from kvstored.cluster.repair.agent import RepairAgent, RepairSettings
    from kvstored.cluster.repair.local import LocalStore
    from kvstored.engine.store import Store, StoreLimits

    agent_mod.YOUNG_S = 0.0  # every record is old enough
    slot = max(64, 1 << (args.size - 1).bit_length())
    store = Store(StoreLimits(dram_size=max(64 * MiB, 8 * args.objects * slot), slab_size=4 * MiB,
                              max_value_size=MiB, hugepages=False, prefault=False,
                              index=args.index))
    t0 = time.perf_counter()
    value = b"v" * args.size
    for i in range(args.objects):
        store.put_bytes(NS, b"object-%09d" % i, value)
    print(f"filled {args.objects:,} objects of {args.size} B ({args.index} index) in "
          f"{time.perf_counter() - t0:.1f} s; {len(store.index):,} in the index", flush=True)

    loop = asyncio.new_event_loop()
    th = threading.Thread(target=loop.run_forever, name="loop", daemon=True)
    th.start()
    gap = [0.0]

    async def ticker():
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gap[0] = max(gap[0], now - last - 0.005)
            last = now
    tick = asyncio.run_coroutine_threadsafe(ticker(), loop)
    me = Member("me", "127.0.0.1:1")
    agent = RepairAgent("me", LocalStore(store, loop), _Membership(me),
                        RepairSettings(0.0, 3600.0, 1 << 40))
    try:
        for n in range(args.passes):
            if args.held:
                async def hold():
                    return store.hold_all()
                asyncio.run_coroutine_threadsafe(hold(), loop).result()
            gc.collect()
            time.sleep(0.2)
            base = _status("VmRSS")
            open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
            gap[0] = 0.0
            t0, c0 = time.perf_counter(), time.process_time()
            pending = agent._pass()
            secs, cpu = time.perf_counter() - t0, time.process_time() - c0
            peak = _status("VmHWM")
            print(f"pass {n + 1}: {secs:.2f} s ({cpu:.2f} s CPU, all threads), scanned {agent.st['scanned']:,}, "
                  f"verified {agent.st['verified']:,}, pending {pending}, "
                  f"peak RSS +{(peak - base) / MiB:.0f} MiB over {base / MiB:.0f} MiB, "
                  f"longest loop gap {gap[0] * 1e3:.0f} ms", flush=True)
            print(f"  steps cpu/wall ms: {agent.steps.summary()}", flush=True)
    finally:
        agent.stop()
        loop.call_soon_threadsafe(tick.cancel)
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0.05), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        th.join(5)
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
