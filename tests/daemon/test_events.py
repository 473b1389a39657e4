"""KV events of a real kvstored (--kv-events), read with a plain ZMQ SUB socket and msgpack.

The stream must be vLLM's (topic, 8-byte big-endian sequence number, msgpack
``[ts, [events], dp_rank]`` with tagged-array events), complete and in order for a
subscriber that joined before, replayable for one that joins late, and never a brake
on the data path.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import xxhash

zmq = pytest.importorskip("zmq")
msgpack = pytest.importorskip("msgpack")

import kvstore  # noqa: E402
from daemonutil import ROOT  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20
END = (-1).to_bytes(8, "big", signed=True)


def scrape(d) -> dict[str, float]:
    """Unlabelled samples of /metrics: ``{sample name: value}``."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(d.metrics_url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if not s.labels}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bhash(ns: str, key: str) -> int:
    """The documented block hash: xxh3-64 of the key, seeded with xxh3-64 of the namespace."""
    return xxhash.xxh3_64_intdigest(key.encode(), xxhash.xxh3_64_intdigest(ns.encode()))


@pytest.fixture
def events_daemon(start_daemon, tmp_path):
    """A daemon publishing on a free port, replay on another; returns (daemon, pub, replay).
    The daemon binds any free port (``*``) and names it in its ready file: a port picked
    here and bound there later could be taken in between."""
    cfg = tmp_path / "events.toml"
    cfg.write_text('[events]\nreplay_endpoint = "tcp://127.0.0.1:*"\nblock_size = 16\n')
    d = start_daemon("--config", str(cfg), "--kv-events", "tcp://127.0.0.1:*")
    pub, rep = d.info["events_endpoint"], d.info["events_replay_endpoint"]
    assert pub.startswith("tcp://127.0.0.1:") and not pub.endswith((":*", ":0")), d.info
    assert rep.startswith("tcp://127.0.0.1:") and rep != pub and not rep.endswith(":*"), d.info
    return d, pub, rep


class Sub:
    """A SUB socket that collects (seq, decoded batch) in order."""

    def __init__(self, ctx, endpoint: str, opts: dict | None = None):
        self.s = ctx.socket(zmq.SUB)
        for k, v in (opts or {}).items():
            self.s.setsockopt(k, v)
        self.s.setsockopt(zmq.LINGER, 0)
        self.s.connect(endpoint)
        self.s.setsockopt(zmq.SUBSCRIBE, b"")
        self.got: list[tuple[int, list]] = []
        self.raw: list[bytes] = []

    def _recv(self) -> None:
        topic, seq, payload = self.s.recv_multipart()
        assert topic == b"" and len(seq) == 8
        self.got.append((int.from_bytes(seq, "big"), msgpack.unpackb(payload)))
        self.raw.append(payload)

    def drain(self, timeout: float = 0.5) -> None:
        """What arrives until ``timeout`` passes without a message."""
        while self.s.poll(int(timeout * 1000)):
            self._recv()

    def drain_until(self, pred, timeout: float = 15.0) -> None:
        """Until ``pred()`` holds (the event the test waits for has arrived: a loaded
        machine may publish it well after a fixed quiet time), bounded; then whatever
        follows within 0.2 s, so that an unexpected later event is still seen."""
        t_end = time.monotonic() + timeout
        while not pred():
            left = t_end - time.monotonic()
            assert left > 0, f"the awaited event never reached the subscriber ({len(self.got)} batches)"
            if self.s.poll(int(min(left, 0.1) * 1000)):
                self._recv()
        self.drain(0.2)

    def saw(self, kind: str, h: int) -> bool:
        """Whether an event of ``kind`` naming block hash ``h`` has arrived."""
        return any(e[0] == kind and h in (e[1] if kind == "BlockRemoved" else e[1][:1])
                   for e in self.events())

    def events(self) -> list:
        return [ev for _, batch in self.got for ev in batch[1]]


def join(sub: Sub, client, ns: str, deadline_s: float = 10.0) -> set[int]:
    """Put probe objects (namespace ``probe-<ns>``) until the subscription is live (ZMQ's
    slow joiner), then drain until the last probe's event; returns the probes' hashes (an
    eviction may remove them)."""
    t_end = time.monotonic() + deadline_s
    i = 0
    while not sub.got:
        assert time.monotonic() < t_end, "no event reached the subscriber"
        client.put(f"probe{i}", b"p", namespace=f"probe-{ns}")
        i += 1
        sub.drain(0.05)
    # the batch that arrived may be one flushed before the last probe was put: that probe's
    # own batch follows, on a loaded machine after any fixed quiet time, and a test would
    # find it first; batches arrive in order, so once it is in nothing of the probes is left
    sub.drain_until(lambda: sub.saw("BlockStored", bhash(f"probe-{ns}", f"probe{i - 1}")),
                    timeout=deadline_s)
    sub.got.clear()
    sub.raw.clear()
    return {bhash(f"probe-{ns}", f"probe{j}") for j in range(i)}


def test_every_block_once_in_order(events_daemon):
    d, pub, _ = events_daemon
    ctx = zmq.Context()
    try:
        sub = Sub(ctx, pub)
        with kvstore.Client(d.control, namespace="ev", timeout=10.0) as c:
            probes = join(sub, c, "ev")
            keys = [f"k{i}" for i in range(120)]
            big = os.urandom(1 * MiB)
            for i, k in enumerate(keys):  # 120 MiB into a 64 MiB arena: evictions
                assert c.put(k, big[i:] + big[:i])
            gone = [k for k in keys[-10:] if c.exists([k])[0]][:3]
            assert c.delete(gone) == len(gone)
            for i in range(10):  # a second namespace: its hashes differ
                c.put(f"k{i}", b"other", namespace="ev2")
            held = [k for k, e in zip(keys, c.exists(keys)) if e]
            sub.drain_until(lambda: sub.saw("BlockStored", bhash("ev2", "k9")))
        seqs = [s for s, _ in sub.got]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "sequence numbers not consecutive"
        for ts, evs, rank in (b for _, b in sub.got):
            assert isinstance(ts, float) and abs(ts - time.time()) < 300 and rank == 0
            assert evs
        stored = [e for e in sub.events() if e[0] == "BlockStored"]
        removed = [e for e in sub.events() if e[0] == "BlockRemoved"]
        assert all(len(e) == 7 and e[2] is None and e[3] == [] and e[4] == 16 and e[5] is None
                   and e[6] == "EXTERNAL" and len(e[1]) == 1 for e in stored)
        assert all(len(e) == 3 and e[2] == "EXTERNAL" and e[1] for e in removed)
        want = [bhash("ev", k) for k in keys] + [bhash("ev2", f"k{i}") for i in range(10)]
        assert [e[1][0] for e in stored] == want  # every put, once, in put order
        # replaying the stream gives exactly what the node holds; each removal follows its store
        live: set[int] = set()
        for e in sub.events():
            if e[0] == "BlockStored":
                assert e[1][0] not in live
                live.add(e[1][0])
            else:  # a run of removals shares one BlockRemoved (probes stored before we joined)
                assert e[0] == "BlockRemoved" and len(set(e[1])) == len(e[1])
                assert set(e[1]) - probes <= live, e
                live.difference_update(e[1])
        assert live == {bhash("ev", k) for k in held} | {bhash("ev2", f"k{i}") for i in range(10)}
        evicted = set(keys) - set(held)
        removed_hashes = [h for e in removed for h in e[1] if h not in probes]
        assert len(evicted) >= 40 and len(removed_hashes) == len(evicted)  # evictions, deletes
        assert set(removed_hashes) == {bhash("ev", k) for k in evicted}
        assert {bhash("ev", k) for k in gone} <= set(removed_hashes)
    finally:
        ctx.destroy(0)


try:  # the structs a vLLM-side consumer declares (msgspec, array_like, tag=True)
    import msgspec
except ImportError:
    msgspec = None
else:
    class Event(msgspec.Struct, array_like=True, omit_defaults=True, tag=True):
        pass

    class BlockStored(Event):
        block_hashes: list[int]
        parent_block_hash: int | None
        token_ids: list[int]
        block_size: int
        lora_id: int | None
        medium: str | None

    class BlockRemoved(Event):
        block_hashes: list[int]
        medium: str | None

    class AllBlocksCleared(Event):
        pass

    class Batch(msgspec.Struct, array_like=True, omit_defaults=True):
        ts: float
        events: list[BlockStored | BlockRemoved | AllBlocksCleared]
        data_parallel_rank: int | None = None


@pytest.mark.skipif(msgspec is None, reason="msgspec is not installed")
def test_events_decode_as_vllm_structs(events_daemon):
    """The payload decodes with msgspec structs declared like vLLM's (array_like, tag=True)."""
    d, pub, rep = events_daemon
    ctx = zmq.Context()
    try:
        sub = Sub(ctx, pub)
        with kvstore.Client(d.control, namespace="v", timeout=10.0) as c:
            join(sub, c, "v")
            c.put("a", b"x" * 100)
            c.delete(["a"])
            sub.drain_until(lambda: sub.saw("BlockRemoved", bhash("v", "a")))
        dec = msgspec.msgpack.Decoder(Batch)
        evs = [ev for raw in sub.raw for ev in dec.decode(raw).events]
        assert [type(e).__name__ for e in evs] == ["BlockStored", "BlockRemoved"]
        assert evs[0].block_hashes == evs[1].block_hashes == [bhash("v", "a")]
        assert evs[0].block_size == 16 and evs[0].medium == "EXTERNAL"
        # the replay's first batch is the start's AllBlocksCleared, in vLLM's encoding too
        first = replay(ctx, rep, 0)[0]
        assert first[0] == 0 and isinstance(dec.decode(first[1]).events[0], AllBlocksCleared)
    finally:
        ctx.destroy(0)


def replay(ctx, endpoint: str, start: int, *, raw_request: list[bytes] | None = None,
           timeout: float = 5.0) -> list[tuple[int, bytes]]:
    """Ask the replay socket from ``start`` (a DEALER with REQ's empty delimiter)."""
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    try:
        s.send_multipart(raw_request or [b"", start.to_bytes(8, "big")])
        out = []
        t_end = time.monotonic() + timeout
        while True:
            assert s.poll(int(max(0.0, t_end - time.monotonic()) * 1000)), "replay did not end"
            frames = s.recv_multipart()
            assert frames[0] == b"" and len(frames) == 3, frames
            if frames[1] == END:
                assert frames[2] == b""
                return out
            out.append((int.from_bytes(frames[1], "big"), frames[2]))
    finally:
        s.close(0)


def test_late_subscriber_replays(events_daemon):
    d, pub, rep = events_daemon
    ctx = zmq.Context()
    try:
        with kvstore.Client(d.control, namespace="late", timeout=10.0) as c:
            for i in range(50):
                c.put(f"r{i}", b"v" * 512)
            c.delete(["r3"])
            t_end = time.monotonic() + 15  # until the loop has published the delete (last)
            while not (got := replay(ctx, rep, 0)) or not any(
                    e[0] == "BlockRemoved" for _, p in got for e in msgpack.unpackb(p)[1]):
                assert time.monotonic() < t_end, "the delete was never published"
                time.sleep(0.05)
            seqs = [s for s, _ in got]
            assert seqs == list(range(len(got))) and len(got) >= 2
            evs = [ev for _, p in got for ev in msgpack.unpackb(p)[1]]
            assert evs[0] == ["AllBlocksCleared"]  # every start begins with it
            assert [e[1][0] for e in evs if e[0] == "BlockStored"] == [bhash("late", f"r{i}")
                                                                       for i in range(50)]
            assert [e[1] for e in evs if e[0] == "BlockRemoved"] == [[bhash("late", "r3")]]
            # from the middle: only that batch on; past the end: only the end marker
            mid = seqs[len(seqs) // 2]
            assert [s for s, _ in replay(ctx, rep, mid)] == seqs[seqs.index(mid):]
            assert replay(ctx, rep, 10**9) == []
            # a live subscriber that joins now, then catches up by replay, misses nothing
            sub = Sub(ctx, pub)
            join(sub, c, "late")
            c.put("after", b"z")
            sub.drain_until(lambda: sub.saw("BlockStored", bhash("late", "after")))
            first_live = sub.got[0][0]
            caught = [s for s, _ in replay(ctx, rep, 0) if s < first_live]
            assert caught + [s for s, _ in sub.got] == list(range(sub.got[-1][0] + 1))
            # malformed requests (a 3-byte start, extra frames): the end marker, daemon fine
            for bad in ([b"", b"abc"], [b"", b"\0" * 8, b"extra"]):
                assert replay(ctx, rep, 0, raw_request=bad) == []
            assert c.put("still", b"ok") and c.get("still") == b"ok"
    finally:
        ctx.destroy(0)


def test_subscriber_that_never_reads_holds_up_no_put_and_no_reader(events_daemon):
    """A subscriber that never reads, with the smallest buffers ZMQ allows, beside a router
    that reads: every put is answered, the router gets every batch, in order and without a
    gap (nothing waits for the stalled one), the publisher's own queue never overflows
    (nothing dropped before publishing), and the stalled one, read at last, gets in order
    what was kept for it. The bound on what is kept (SUBSCRIBER_BUFFER, then drops for
    that subscriber alone) is test_publisher_never_blocks_past_the_high_water_mark's; how fast
    puts go beside a stalled subscriber is a benchmark's question, not a timed test's."""
    d, pub, _ = events_daemon
    ctx = zmq.Context()
    n = 2000
    try:
        with kvstore.Client(d.control, namespace="slow", timeout=30.0) as c:
            router = Sub(ctx, pub)
            join(router, c, "router")
            stalled = Sub(ctx, pub, {zmq.RCVHWM: 1, zmq.RCVBUF: 4096})
            join(stalled, c, "stalled")  # its subscription is live; it reads no more
            router.drain(0.2)
            router.got.clear()
            value = b"s" * KiB
            t0 = time.perf_counter()
            assert all(c.put(f"s{i}", value) for i in range(n))
            took = time.perf_counter() - t0
            last = bhash("slow", f"s{n - 1}")
            router.drain_until(lambda: router.saw("BlockStored", last), timeout=60)
            assert c.put("alive", b"1") and c.get("alive") == b"1"
        print(f"{n} puts of 1 KiB beside a stalled subscriber: {took:.2f} s")
        seqs = [q for q, _ in router.got]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "the router saw a gap"
        stored = {e[1][0] for e in router.events() if e[0] == "BlockStored"}
        assert {bhash("slow", f"s{i}") for i in range(n)} <= stored
        m = scrape(d)
        assert m["kvstored_kv_events_published_total"] >= n
        assert m["kvstored_kv_events_dropped_total"] == 0  # the queue never overflowed
        stalled.drain(0.5)  # read at last
        kept = [q for q, _ in stalled.got]
        assert kept and kept == sorted(set(kept)), kept[-5:]  # in order, each once
        assert any(e[0] == "BlockStored" and e[1][0] in stored for e in stalled.events())
    finally:
        ctx.destroy(0)


def test_publisher_never_blocks_past_the_high_water_mark(tmp_path, monkeypatch):
    """The real publisher in this process: 30000 batches to a subscriber that never reads
    (far past SUBSCRIBER_BUFFER, lowered to 64 KiB) all return at once, and the publisher
    dropped that subscriber's surplus (counted; it sees gaps) instead of holding the loop
    or queueing without bound. The subscriber reads in a thread: the loop sends."""
    import asyncio
    from types import SimpleNamespace

    from kvstored import events

    endpoint = f"ipc://{tmp_path}/hwm"
    monkeypatch.setattr(events, "FLUSH_DELAY", 0)  # one batch per loop turn: many messages
    monkeypatch.setattr(events, "SUBSCRIBER_BUFFER", 64 * KiB)

    async def run() -> tuple[float, list[int], int]:
        pub = events.EventPublisher(endpoint)
        pub.start()
        ctx = zmq.Context()
        stalled = Sub(ctx, endpoint, {zmq.RCVHWM: 1, zmq.RCVBUF: 4096})
        try:
            t_end = time.monotonic() + 15
            while not stalled.got:  # ZMQ's slow joiner: publish until the subscription is live
                assert time.monotonic() < t_end, "no batch reached the subscriber"
                pub.stored(SimpleNamespace(ns=b"h", key=b"join"))
                await asyncio.sleep(0.01)  # the flush timer runs
                await asyncio.to_thread(stalled.drain, 0.02)
            stalled.got.clear()
            t0 = time.perf_counter()
            for i in range(30000):  # about one batch per event
                pub.stored(SimpleNamespace(ns=b"h", key=b"%d" % i))
                await asyncio.sleep(0)
                await asyncio.sleep(0)  # the flush timer (delay 0) runs on the next pass
            elapsed = time.perf_counter() - t0
            await asyncio.sleep(0.3)
            queued = pub._pub.subscribed[0].queued
            await asyncio.to_thread(stalled.drain, 0.5)  # it reads at last: what was kept
            pub.stored(SimpleNamespace(ns=b"h", key=b"last"))  # and then one more batch
            await asyncio.sleep(0.1)  # the flush timer runs
            await asyncio.to_thread(stalled.drain_until,
                                    lambda: stalled.got and stalled.got[-1][0] == pub.seq - 1)
            assert 0 < queued <= events.SUBSCRIBER_BUFFER and pub.counters["subscriber_drops"] > 0
            return elapsed, [s for s, _ in stalled.got], pub.seq
        finally:
            pub.close()
            ctx.destroy(0)

    elapsed, seqs, sent = asyncio.run(run())
    print(f"{sent} batches past the HWM in {elapsed:.2f} s; the stalled subscriber got {len(seqs)}")
    assert sent > 20000 and elapsed < 30  # bounded: nothing waited for the subscriber
    assert seqs and len(seqs) < sent // 2  # the surplus was dropped
    # in order, with a gap where the drops were (the subscriber can replay it), then live
    assert seqs == sorted(seqs) and seqs[-1] == sent - 1 and seqs[-1] - seqs[0] + 1 > len(seqs)


def test_a_burst_past_max_subscribers_is_closed_and_the_places_kept():
    """The real publisher in this process, max_subscribers = 2 and both places taken: a
    burst of 200 connections. Every one is closed on accept and counted, no descriptor is
    left, the two subscribers keep their stream and a place that frees is taken again."""
    import asyncio
    import threading
    from types import SimpleNamespace

    from kvstored import events

    burst = 200

    def connect_all(port: int, out: list) -> None:
        for _ in range(burst):
            try:
                out.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            except OSError as e:
                out.append(e)

    def closed_by_server(conns: list, timeout: float) -> int:
        """How many of conns the server closes (EOF or reset; past ZMQ's greeting) within
        timeout."""
        closed, end = 0, time.monotonic() + timeout
        for c in conns:
            c.settimeout(max(0.01, end - time.monotonic()))
            try:
                while c.recv(4096):
                    pass
                closed += 1
            except ConnectionResetError:
                closed += 1
            except OSError:  # still open at the deadline
                pass
        return closed

    async def until(pred, what: str, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while not pred():
            assert time.monotonic() < end, what
            await asyncio.sleep(0.01)

    async def run() -> None:
        pub = events.EventPublisher("tcp://127.0.0.1:0", max_subscribers=2)
        pub.start()
        port = int(pub.bound()[0].rsplit(":", 1)[1])
        ctx = zmq.Context()
        subs = [Sub(ctx, f"tcp://127.0.0.1:{port}") for _ in range(2)]
        conns: list = []
        try:
            await until(lambda: pub.subscribers() == 2, "the two subscribers were not counted")
            # neither ever sends once subscribed: TCP keepalive finds a vanished host
            assert all(c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
                       for c in pub._pub.conns)
            fds = len(os.listdir("/proc/self/fd"))
            flood = threading.Thread(target=connect_all, args=(port, conns), daemon=True)
            flood.start()
            await until(lambda: not flood.is_alive(), "the burst did not finish")
            socks = [c for c in conns if isinstance(c, socket.socket)]
            assert len(socks) >= burst // 2, conns[:3]  # the flood got going
            await until(lambda: pub.counters["subscribers_refused"] >= len(socks),
                        f"refusals counted: {pub.counters['subscribers_refused']} of {len(socks)}")
            closed = await asyncio.to_thread(closed_by_server, socks, 20.0)
            assert closed == len(socks), (closed, len(socks))
            assert pub.subscribers() == 2
            for c in socks:
                c.close()
            # what the burst cost: no descriptor of the publisher's is left
            await until(lambda: len(os.listdir("/proc/self/fd")) <= fds,
                        f"descriptors back to {fds}: {len(os.listdir('/proc/self/fd'))}")
            # the subscribers kept their stream
            pub.stored(SimpleNamespace(ns=b"b", key=b"after-burst"))
            for sub in subs:
                await asyncio.to_thread(sub.drain_until, lambda sub=sub: any(
                    e[0] == "BlockStored" for e in sub.events()))
            # a place that frees is taken by the next subscriber
            subs.pop().s.close(0)
            late = Sub(ctx, f"tcp://127.0.0.1:{port}")
            subs.append(late)
            end = time.monotonic() + 30
            while not late.got:  # ZMQ's slow joiner: publish until it is in
                assert time.monotonic() < end, "the freed place was not taken again"
                pub.stored(SimpleNamespace(ns=b"b", key=b"late"))
                await asyncio.sleep(0.02)
                await asyncio.to_thread(late.drain, 0.02)
            assert pub.subscribers() == 2
        finally:
            for c in conns:
                if isinstance(c, socket.socket):
                    c.close()
            for sub in subs:
                sub.s.close(0)
            pub.close()
            ctx.term()

    asyncio.run(run())


def test_subscriptions_select_by_topic_prefix_and_heartbeats_are_answered():
    """The daemon speaks ZMTP itself: subscriptions select as libzmq's PUB does (a message
    goes to a SUB whose subscription is a prefix of its topic), and a SUB set for ZMTP
    heartbeats (every 0.1 s; 0.3 s without an answer would end its connection) stays
    connected while it receives (libzmq sends no PING to the ZMTP 3.0 the daemon announces;
    the daemon would answer one). The real publisher in this process, topic "kv"."""
    import asyncio
    from types import SimpleNamespace

    from kvstored import events

    def sub(ctx, endpoint: str, topic: bytes, **opts):
        s = ctx.socket(zmq.SUB)
        s.setsockopt(zmq.LINGER, 0)
        for k, v in opts.items():
            s.setsockopt(getattr(zmq, k), v)
        s.setsockopt(zmq.SUBSCRIBE, topic)
        s.connect(endpoint)
        return s

    async def run() -> tuple[dict, int, int]:
        pub = events.EventPublisher("tcp://127.0.0.1:0", topic="kv")
        pub.start()
        ctx = zmq.Context()
        try:
            ep = pub.bound()[0]
            subs = {t: sub(ctx, ep, t) for t in (b"", b"k", b"kv", b"kvx", b"x")}
            hb = sub(ctx, ep, b"", HEARTBEAT_IVL=100, HEARTBEAT_TIMEOUT=300)
            mon = hb.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            got, beats = dict.fromkeys(subs, 0), 0
            joined, end, i = None, time.monotonic() + 30, 0
            while joined is None or time.monotonic() - joined < 1.5:
                assert time.monotonic() < end, (got, beats)
                pub.stored(SimpleNamespace(ns=b"n", key=b"%d" % i))
                i += 1
                await asyncio.sleep(0.02)
                for t, s in subs.items():
                    while s.poll(0):
                        assert s.recv_multipart()[0] == b"kv"
                        got[t] += 1
                while hb.poll(0):
                    hb.recv_multipart()
                    beats += 1
                if joined is None and got[b""] and got[b"k"] and got[b"kv"] and beats:
                    joined = time.monotonic()  # everyone in: 1.5 s more, heartbeats going
            drops = 0
            while mon.poll(0):
                mon.recv_multipart()
                drops += 1
            return got, beats, drops
        finally:
            pub.close()
            ctx.destroy(0)

    got, beats, drops = asyncio.run(run())
    assert got[b"kvx"] == got[b"x"] == 0 and min(got[b""], got[b"k"], got[b"kv"]) > 0, got
    assert beats > 0 and drops == 0, (beats, drops)


def _start(*args: str, timeout: float = 20.0) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "client"), str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "kvstored", "--port", "0", "--data-port", "0",
                           "--metrics-port", "0", "--dram-size", "64MiB", "--slab-size", "4MiB",
                           "--max-value-size", "4MiB", "--log-level", "error", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("endpoint, says", [
    ("bogus://x", "events.endpoint: 'bogus://x' is not a tcp:// or ipc:// endpoint"),
    ("tcp://192.0.2.1:5557", "events.endpoint: cannot bind 'tcp://192.0.2.1:5557'"),
    ("tcp://127.0.0.1:99999", "events.endpoint: 'tcp://127.0.0.1:99999' needs host:port"),
    ("tcp://127.0.0.1", "needs host:port"),
])
def test_bad_endpoint_is_one_line_exit_2(endpoint, says):
    r = _start("--kv-events", endpoint)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvstored: error: ") and says in lines[0], r.stderr


def test_endpoint_in_use_is_one_line_exit_2():
    ctx = zmq.Context()
    try:
        held = ctx.socket(zmq.PUB)
        port = held.bind_to_random_port("tcp://127.0.0.1")
        r = _start("--kv-events", f"tcp://127.0.0.1:{port}")
        assert r.returncode == 2 and "cannot bind" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    finally:
        ctx.destroy(0)


@pytest.mark.parametrize("text, says", [
    ('[events]\nendpoint = "tcp://127.0.0.1:5557"\nreplay_buffer = 0\n', "events.replay_buffer"),
    ('[events]\nendpoint = "tcp://127.0.0.1:5557"\nreplay_endpoint = "tcp://127.0.0.1:5557"\n',
     "must differ"),
    ('[events]\nblock_size = -1\n', "events.block_size"),
    ('[events]\nmedium = "' + "M" * 40 + '"\n', "events.medium"),
    ('[events]\nendpont = "tcp://x:1"\n', "did you mean 'events.endpoint'"),
])
def test_bad_events_settings(tmp_path, text, says):
    from kvstored.config import ConfigError, load_config

    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_any_free_port_endpoints_are_named_in_the_ready_file(start_daemon):
    """``tcp://HOST:*`` binds any free port; the replay endpoint beside it (by default) too,
    and the ready file names both as bound, so a supervisor or a test never picks a port
    and races another process for it. The same ``*`` endpoint for both is two binds."""
    from kvstored.config import Config
    from kvstored.events import default_replay_endpoint

    assert default_replay_endpoint("tcp://127.0.0.1:*") == "tcp://127.0.0.1:*"
    assert default_replay_endpoint("tcp://127.0.0.1:5557") == "tcp://127.0.0.1:5558"
    Config(events_endpoint="tcp://127.0.0.1:*", events_replay_endpoint="tcp://127.0.0.1:*").validate()
    d = start_daemon("--kv-events", "tcp://127.0.0.1:*")
    pub, rep = d.info["events_endpoint"], d.info["events_replay_endpoint"]
    ports = {int(e.rpartition(":")[2]) for e in (pub, rep)}
    assert len(ports) == 2 and 0 not in ports and pub.startswith("tcp://127.0.0.1:"), d.info
    for port in ports:  # both listen
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
    off = start_daemon()
    assert off.info["events_endpoint"] == off.info["events_replay_endpoint"] == ""


def test_concurrent_writers_and_replays(events_daemon):
    """Four writers at once: every object stored once; 20 replays at once all end; an
    oversized replay request gets the end marker."""
    import threading

    d, pub, rep = events_daemon
    ctx = zmq.Context()
    try:
        sub = Sub(ctx, pub)
        with kvstore.Client(d.control, namespace="cc", timeout=10.0) as c:
            join(sub, c, "cc")
        errors: list = []

        def writer(w: int) -> None:
            try:
                with kvstore.Client(d.control, namespace="cc", timeout=10.0, shm=w % 2 == 0) as c:
                    for i in range(100):
                        c.put(f"w{w}-{i}", b"c" * 2048)
            except Exception as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors and not any(t.is_alive() for t in threads), errors
        last = {bhash("cc", f"w{w}-99") for w in range(4)}  # each writer's last put
        sub.drain_until(lambda: last <= {e[1][0] for e in sub.events() if e[0] == "BlockStored"})
        stored = [e[1][0] for e in sub.events() if e[0] == "BlockStored"]
        want = {bhash("cc", f"w{w}-{i}") for w in range(4) for i in range(100)}
        assert len(stored) == len(want) == len(set(stored)) and set(stored) == want
        for w in range(4):  # each writer's puts in its own order
            mine = [h for h in stored if h in {bhash("cc", f"w{w}-{i}") for i in range(100)}]
            assert mine == [bhash("cc", f"w{w}-{i}") for i in range(100)]
        results: list = [None] * 20

        def replayer(j: int) -> None:
            results[j] = replay(ctx, rep, 0, timeout=20.0)

        threads = [threading.Thread(target=replayer, args=(j,)) for j in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        full = [r for r in results if r]
        # at most MAX_REPLAYS (16) run at once; a refused one gets just the end marker
        assert len(full) >= 1 and all(r == full[0] for r in full) and all(r is not None
                                                                          for r in results)
        assert replay(ctx, rep, 0, raw_request=[b"", b"\0" * (1 << 20)]) == []
        assert replay(ctx, rep, 0)  # still serving
    finally:
        ctx.destroy(0)


def test_queue_overflow_drops_counts_and_clears(tmp_path, monkeypatch):
    """The engine and the real publisher in one process: a burst larger than the queue is
    dropped and counted, and the stream says AllBlocksCleared before going on, so what a
    subscriber rebuilds never holds a block the store does not."""
    import asyncio

    from kvstored import events
    from kvstored.engine.store import Store, StoreLimits
    from kvstored.metrics import StoreUsage

    monkeypatch.setattr(events, "MAX_PENDING", 10)
    endpoint = f"ipc://{tmp_path}/ev"

    async def run() -> tuple[list, dict, set]:
        store = Store(StoreLimits(dram_size=8 * MiB, slab_size=MiB, max_value_size=MiB,
                                  prefault=False))
        usage = StoreUsage(store)
        store.observer = usage
        pub = events.EventPublisher(endpoint)
        pub.start()
        usage.events = pub
        ctx = zmq.Context()
        sub = Sub(ctx, endpoint)
        try:
            t_end = time.monotonic() + 15
            for j in range(100000):  # until the subscription is live (first batch arrives)
                assert time.monotonic() < t_end, "no event reached the subscriber"
                store.put_bytes(b"o", b"probe%d" % j, b"p")
                await asyncio.sleep(0.02)
                sub.drain(0.0)
                if sub.got:
                    break
            for i in range(25):  # one loop turn: more than the queue holds
                store.put_bytes(b"o", b"b%d" % i, b"x" * 100)
            store.delete(b"o", [b"b24"])
            await asyncio.sleep(0.05)
            for i in range(5):  # after the burst: published normally
                store.put_bytes(b"o", b"a%d" % i, b"y" * 100)
            await asyncio.sleep(0.05)
            sub.drain_until(lambda: sub.saw("BlockStored", block_hash(b"o", b"a4")))
            held = {block_hash(b"o", k) for (_, k) in store.index}
            return sub.events(), dict(pub.counters), held
        finally:
            pub.close()
            store.close()
            ctx.destroy(0)

    from kvstored.events import block_hash
    evs, counters, held = asyncio.run(run())
    assert counters["dropped"] > 0
    last_clear = max(i for i, e in enumerate(evs) if e == ["AllBlocksCleared"])
    assert last_clear > 0  # not only the start's
    live: set[int] = set()
    for e in evs[last_clear + 1:]:
        if e[0] == "BlockStored":
            live.add(e[1][0])
        else:
            live.difference_update(e[1])
    assert live <= held and {block_hash(b"o", b"a%d" % i) for i in range(5)} <= live


def test_tier_moves_publish_nothing(start_daemon, tmp_path):
    """With an NVMe tier, DRAM evictions demote and gets promote: the node still holds
    every object, so no BlockRemoved; a delete still publishes one."""
    cfg = tmp_path / "events.toml"  # replay unused here: off, not the default port pub + 1
    cfg.write_text('[events]\nreplay_endpoint = "off"\n')  # (which may be taken: a CI flake)
    d = start_daemon("--config", str(cfg), "--kv-events", "tcp://127.0.0.1:*", "--nvme-path",
                     str(tmp_path / "nvme"), "--nvme-size", "256MiB", "--nvme-region-size", "16MiB")
    pub = d.info["events_endpoint"]
    assert d.info["events_replay_endpoint"] == ""  # off
    ctx = zmq.Context()
    try:
        sub = Sub(ctx, pub)
        with kvstore.Client(d.control, namespace="t", timeout=30.0) as c:
            join(sub, c, "t")
            big = os.urandom(MiB)
            for i in range(100):  # 100 MiB into 64 MiB of DRAM: demotions
                assert c.put(f"d{i}", big[i:] + big[:i])
            assert c.get("d0") == big  # promoted back from NVMe
            assert all(c.exists([f"d{i}" for i in range(100)]))
            stats = c.stats()
            assert stats.tiers[1].objects > 0  # the NVMe tier took some
            c.delete(["d5"])
            sub.drain_until(lambda: sub.saw("BlockRemoved", bhash("t", "d5")))
        kinds = [e[0] for e in sub.events()]
        assert kinds.count("BlockStored") == 100
        assert [e[1] for e in sub.events() if e[0] == "BlockRemoved"] == [[bhash("t", "d5")]]
    finally:
        ctx.destroy(0)


def test_missing_msgpack_is_one_line_exit_2(tmp_path):
    """Without msgpack installed, --kv-events is refused at start with the install hint (the
    daemon speaks ZMTP itself: pyzmq is the subscribers' need, not the daemon's)."""
    shadow = tmp_path / "shadow" / "msgpack"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'msgpack'\", name='msgpack')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "shadow"), str(ROOT / "client"),
                                         str(ROOT), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-m", "kvstored", "--port", "0", "--data-port", "0",
                        "--metrics-port", "0", "--dram-size", "64MiB", "--slab-size", "4MiB",
                        "--max-value-size", "4MiB", "--log-level", "error",
                        "--kv-events", "tcp://127.0.0.1:5557"],
                       capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "'msgpack' package is not installed" in lines[0] \
        and "pip install 'kvstored[server]'" in lines[0], r.stderr
