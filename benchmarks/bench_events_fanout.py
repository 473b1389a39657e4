#!/usr/bin/env python3
"""KV events fan-out: what a published batch costs the daemon's loop, and how long it takes
to reach subscribers, for N subscribers.

    python benchmarks/bench_events_fanout.py [--subscribers 1,4,16,64] [--rate 200]
                                             [--seconds 3] [--events-per-batch 8]

The real publisher (kvstored/events.py of this tree) runs on uvloop in this process and is
fed ``--events-per-batch`` index changes ``--rate`` times a second (each feeding is one
batch: the 2 ms flush timer gathers them). A second process holds N pyzmq SUB sockets and
records, for every message, receive time minus the batch's own timestamp (set when the
batch is encoded, so the 2 ms gathering is left out; both processes read the same
CLOCK_REALTIME). Reported per N: the loop's time per batch inside ``_publish`` (framing and
handing the batch to every subscriber; perf_counter around the call; the median, as a
loaded machine preempts some calls) and the latency
p50 / p99 / max over all subscribers' messages. Compare trees by running each tree's copy
of this script from its own directory (it puts its own tree first on sys.path).
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import sys
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def subscribers(endpoint: str, n: int, seconds: float, ready, out) -> None:
    import msgpack
    import zmq

    ctx = zmq.Context()
    socks = []
    for _ in range(n):
        s = ctx.socket(zmq.SUB)
        s.setsockopt(zmq.SUBSCRIBE, b"")
        s.connect(endpoint)
        socks.append(s)
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    joined: set = set()
    lat: list[float] = []
    end = None
    while True:
        if end is None and len(joined) == n:
            ready.set()
            end = time.monotonic() + seconds + 1.0
        if end is not None and time.monotonic() > end:
            break
        for s, _ in poller.poll(100):
            while True:
                try:
                    _, _, payload = s.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                now = time.time()
                joined.add(id(s))
                if end is not None:
                    lat.append(now - msgpack.unpackb(payload)[0])
    out.put(lat)
    ctx.destroy(0)


async def publish(n: int, rate: float, seconds: float, per_batch: int) -> dict:
    from kvstored import events

    pub = events.EventPublisher("tcp://127.0.0.1:0", max_subscribers=max(64, n))
    pub.start()
    bound = pub.bound()[0] if hasattr(pub, "bound") else \
        pub._pub.getsockopt(__import__("zmq").LAST_ENDPOINT).decode()
    cpu: list[float] = []
    inner = pub._publish

    def timed(payload, k):
        t = time.perf_counter()
        inner(payload, k)
        cpu.append(time.perf_counter() - t)

    pub._publish = timed
    ready, out = mp.Event(), mp.Queue()
    proc = mp.Process(target=subscribers, args=(bound, n, seconds, ready, out))
    proc.start()
    i = 0
    t_join = time.monotonic() + 30
    while not ready.is_set():  # publish until every subscription is live
        assert time.monotonic() < t_join, "subscribers never joined"
        pub.stored(SimpleNamespace(ns=b"b", key=b"join%d" % i))
        i += 1
        await asyncio.sleep(0.01)
    cpu.clear()
    t_end = time.monotonic() + seconds
    step = 1.0 / rate
    nxt = time.monotonic()
    while time.monotonic() < t_end:
        for _ in range(per_batch):
            pub.stored(SimpleNamespace(ns=b"b", key=b"k%d" % i))
            i += 1
        nxt += step
        await asyncio.sleep(max(0.0, nxt - time.monotonic()))
    lat = await asyncio.to_thread(out.get, True, 60)
    proc.join(10)
    pub.close()
    lat.sort()
    cpu.sort()

    def q(xs, p):
        return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")

    return {"subscribers": n, "batches": len(cpu), "messages": len(lat),
            "cpu_us_per_batch": q(cpu, 0.5) * 1e6,
            "p50_ms": q(lat, 0.5) * 1e3, "p99_ms": q(lat, 0.99) * 1e3,
            "max_ms": (lat[-1] if lat else float("nan")) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subscribers", default="1,4,16,64")
    ap.add_argument("--rate", type=float, default=200.0, help="batches a second")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--events-per-batch", type=int, default=8)
    a = ap.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    print(f"tree {ROOT}; {a.rate:.0f} batches/s of {a.events_per_batch} events, {a.seconds} s")
    for n in (int(x) for x in a.subscribers.split(",")):
        r = asyncio.run(publish(n, a.rate, a.seconds, a.events_per_batch))
        print(f"subscribers {r['subscribers']:3d}: loop {r['cpu_us_per_batch']:7.1f} us/batch (median) "
              f"({r['batches']} batches), latency p50 {r['p50_ms']:.3f} ms p99 "
              f"{r['p99_ms']:.3f} ms max {r['max_ms']:.3f} ms ({r['messages']} messages)")


if __name__ == "__main__":
    main()
