"""Hostile clients, round 3: what one client can hold on the KV event endpoints (now served
by the daemon's own ZMTP, kvstored/events.py), the control port's calls and the metrics
port, and for how long.

One daemon for the module (events.max_subscribers = 4 on both endpoints, 4 control calls
at once, control_request_timeout = 1 s, control connections closed at 3 s of age); the event endpoints' time bounds (handshake,
stalled and idle replays) are checked on the real publisher in this process with its
deadlines shortened. Every wait is on a condition, bounded in count and time.
"""
from __future__ import annotations

import os
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import grpc
import pytest

import kvstore
from kvstore.v1 import control_pb2 as pb

from test_hostile import closed_by_peer, open_fds, publisher_on_a_loop, rss, wait_for

zmq = pytest.importorskip("zmq")
msgpack = pytest.importorskip("msgpack")

KiB, MiB = 1 << 10, 1 << 20
END = (-1).to_bytes(8, "big", signed=True)
LIMIT = 4  # events.max_subscribers of the module's daemon


def metrics(d) -> dict[str, float] | None:
    """Every sample of /metrics by its full text (labels included); None when the scrape
    is refused (rate limit: the caller waits and asks again)."""
    try:
        with urllib.request.urlopen(d.metrics_url + "/metrics", timeout=5) as r:
            text = r.read().decode()
    except urllib.error.HTTPError:
        return None
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, v = line.rpartition(" ")
            out[name] = float(v)
    return out


def metric_when(d, name: str, pred, timeout: float = 15.0) -> float:
    def ok():
        m = metrics(d)
        return m is not None and pred(m.get(name, 0.0)) and (m.get(name, 0.0),)
    return wait_for(ok, timeout, f"{name} as expected")[0]



def put_until_event(node, sub, namespace: str, when: str) -> None:
    """Put small objects (at most 100, 0.1 s apart) until ``sub`` has an event to read."""
    with kvstore.Client(node.control, namespace=namespace, timeout=10, shm=False) as c:
        for i in range(100):
            c.put(f"{namespace}-{i}", b"a")
            if sub.poll(100):
                return
    raise AssertionError(f"no event reached the subscriber {when}")

@pytest.fixture(scope="module")
def node(module_daemons, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("round3")
    cfg = tmp / "round3.toml"
    # (every place to one connection and one client: the caps on those are round 4's)
    cfg.write_text("[server]\nmax_control_rpcs = 4\ncontrol_streams_per_connection = 4\n"
                   "control_rpcs_per_client = 4\n"
                   "control_request_timeout = 1.0\n"
                   "control_connection_max_age = 3.0\n"
                   '[events]\nendpoint = "tcp://127.0.0.1:*"\n'
                   f'replay_endpoint = "tcp://127.0.0.1:*"\nmax_subscribers = {LIMIT}\n'
                   f"max_subscribers_per_client = {LIMIT}\n")  # (every client here is 127.0.0.1)
    d = module_daemons("round3", "--config", str(cfg))
    # any free ports, as the daemon bound them (its ready file): none picked here to race for
    d.pub_port, d.rep_port = (int(d.info[k].rpartition(":")[2])
                              for k in ("events_endpoint", "events_replay_endpoint"))
    return d


# ------------------------------------------------------------------ KV event endpoints

def test_an_event_endpoint_never_holds_more_than_its_limit_plus_one(node):
    """300 connections as fast as one thread opens them, 200 on the events endpoint and
    100 on the replay endpoint, kept open: the daemon's descriptors, sampled all along,
    never pass where they were + 2 x (limit + 1) (+ 2 of slack); all but the 2 x limit let
    in are closed and counted; the gauge never passes the limit."""
    pid = node.info["pid"]
    base = open_fds(pid)
    refused0 = metric_when(node, "kvstored_kv_event_subscribers_refused_total", lambda v: True)
    conns: list[socket.socket] = []

    def flood() -> None:
        for i in range(300):
            port = node.pub_port if i % 3 else node.rep_port
            try:
                conns.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError:
                pass

    t = threading.Thread(target=flood, daemon=True)
    peak = base
    try:
        t.start()
        end = time.monotonic() + 60
        while t.is_alive() and time.monotonic() < end:
            peak = max(peak, open_fds(pid))
        t.join(5)
        for _ in range(50):  # and a little after the last connect
            peak = max(peak, open_fds(pid))
        assert len(conns) >= 250, "the flood did not get going"
        assert peak <= base + 2 * (LIMIT + 1) + 2, (base, peak)
        closed = closed_by_peer(conns, keep=2 * LIMIT, timeout=20)
        assert closed >= len(conns) - 2 * LIMIT, (closed, len(conns))
        metric_when(node, "kvstored_kv_event_subscribers_refused_total",
                    lambda v: v - refused0 >= len(conns) - 2 * LIMIT)
        assert metric_when(node, "kvstored_kv_event_subscribers", lambda v: True) <= LIMIT
    finally:
        for s in conns:
            s.close()
    # the places free again: a subscriber gets in and receives events
    metric_when(node, "kvstored_kv_event_subscribers", lambda v: v == 0)
    ctx = zmq.Context()
    try:
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(f"tcp://127.0.0.1:{node.pub_port}")
        put_until_event(node, sub, "r3", "after the flood")
        topic, seq, payload = sub.recv_multipart()
        assert topic == b"" and len(seq) == 8 and msgpack.unpackb(payload)[1]
    finally:
        ctx.destroy(0)
    assert node.alive()


def test_replay_endpoint_answers_oversized_and_malformed_requests_in_bounded_memory(node):
    """A 16 MiB frame, a message of 40 frames, a request without its start: each gets the
    end marker (the large frame skipped unread: the daemon does not grow by it); a client
    that is not ZMTP at all, one asking for CURVE and one of the wrong socket type are
    closed at once and counted."""
    pid = node.info["pid"]
    failed0 = metric_when(node, "kvstored_kv_event_handshakes_failed_total", lambda v: True)
    before = rss(pid)
    ctx = zmq.Context()
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(f"tcp://127.0.0.1:{node.rep_port}")
        for request in ([b"", b"\0" * (16 * MiB)], [b""] + [b"x"] * 40, [b""]):
            dealer.send_multipart(request)
            assert dealer.poll(15000), "no answer"
            assert dealer.recv_multipart() == [b"", END, b""]
        dealer.send_multipart([b"", (0).to_bytes(8, "big")])  # a good one is served
        assert dealer.poll(15000)
        assert dealer.recv_multipart()[0] == b""
        grown = rss(pid) - before
        assert grown < 12 * MiB, f"the daemon grew by {grown >> 20} MiB"
        # a PUB-side socket type on the replay endpoint, refused at READY
        wrong = ctx.socket(zmq.PUSH)
        wrong.setsockopt(zmq.LINGER, 0)
        wrong.connect(f"tcp://127.0.0.1:{node.rep_port}")
        curve = b"\xff" + b"\0" * 8 + b"\x7f\x03\x01" + b"CURVE".ljust(20, b"\0") + b"\0" * 32
        for hello in (b"GET / HTTP/1.1\r\n\r\n", curve):
            with socket.create_connection(("127.0.0.1", node.rep_port), timeout=5) as s:
                s.sendall(hello)
                assert closed_by_peer([s], keep=0, timeout=10) == 1
        metric_when(node, "kvstored_kv_event_handshakes_failed_total",
                    lambda v: v - failed0 >= 3)
        wrong.close(0)
    finally:
        ctx.destroy(0)
    assert node.alive()


def test_event_accepts_failing_for_descriptors_are_logged_counted_and_recovered(node):
    """The daemon at its descriptor limit (its soft limit lowered to what it has open):
    accepts on the events endpoint fail with EMFILE; that is logged (once a minute at most)
    and counted in kvstored_accept_failures_total, and once descriptors are free a
    subscriber that waited in the backlog is served."""
    import resource

    pid = node.info["pid"]
    failed0 = metric_when(node, "kvstored_accept_failures_total", lambda v: True)
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    waiting: list[socket.socket] = []
    ctx = zmq.Context()
    try:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (open_fds(pid), hard))
        for _ in range(3):  # the kernel queues them; the daemon cannot take them
            waiting.append(socket.create_connection(("127.0.0.1", node.pub_port), timeout=5))
        wait_for(lambda: "KV events: accept on events.endpoint failed" in node.log(), 15,
                 "the accept failure logged")
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    try:
        metric_when(node, "kvstored_accept_failures_total", lambda v: v > failed0)
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(f"tcp://127.0.0.1:{node.pub_port}")
        for s in waiting:  # accepted after the pause: they get the daemon's greeting
            s.settimeout(10)
            assert s.recv(1) == b"\xff"
            s.close()
        waiting.clear()
        put_until_event(node, sub, "r3fd", "after the spell")
    finally:
        for s in waiting:
            s.close()
        ctx.destroy(0)
    whole_log = node.log_path.read_text(errors="replace")  # (node.log() is its tail)
    assert whole_log.count("KV events: accept on events.endpoint failed") == 1


@pytest.fixture
def publisher(tmp_path, monkeypatch):
    """The real publisher in this process on an ipc endpoint pair, deadlines shortened;
    yields (publisher, loop runner). Its loop runs in a thread: the test drives clients."""
    from kvstored import events

    monkeypatch.setattr(events, "HANDSHAKE_TIMEOUT", 0.5)
    monkeypatch.setattr(events, "REPLAY_IDLE_TIMEOUT", 0.5)
    monkeypatch.setattr(events, "REPLAY_BUFFER", 64 * KiB)
    with publisher_on_a_loop(f"ipc://{tmp_path}/ev", replay_endpoint=f"ipc://{tmp_path}/rep",
                             max_subscribers=LIMIT, replay_buffer=5000,
                             replay_rate_window=0.5) as pub:
        yield pub


def test_event_connections_that_never_finish_zmtp_are_closed_at_the_deadline(publisher):
    """Silent connections, and one that sends half a greeting, hold their place only until
    the handshake deadline (0.5 s here, 10 s in the daemon); the places are then free for
    real subscribers."""
    pub = publisher
    ep = pub.bound()[0][6:]
    silent = []
    for i in range(LIMIT):
        s = socket.socket(socket.AF_UNIX)
        s.connect(ep)
        if i == 0:
            s.sendall(b"\xff" + b"\0" * 8)  # most of a signature, then nothing
        silent.append(s)
    assert wait_for(lambda: pub.call(pub.subscribers) == LIMIT, 10, "the places taken")
    t0 = time.monotonic()
    assert closed_by_peer(silent, keep=0, timeout=15) == LIMIT
    held = time.monotonic() - t0
    assert held < 10, f"silent connections held {held:.1f} s"
    assert pub.counters["handshakes_failed"] >= LIMIT
    for s in silent:
        s.close()
    ctx = zmq.Context()
    try:
        subs = []
        for _ in range(LIMIT):
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(f"ipc://{ep}")
            subs.append(sub)
        end = time.monotonic() + 15
        got: set[int] = set()
        while len(got) < LIMIT:  # ZMQ's slow joiner: publish until every one is in
            assert time.monotonic() < end, f"{len(got)} of {LIMIT} subscribers got events"
            pub.call(pub.stored, SimpleNamespace(ns=b"h", key=b"k"))
            for i, sub in enumerate(subs):
                if sub.poll(20):
                    sub.recv_multipart()
                    got.add(i)
    finally:
        ctx.destroy(0)


def test_a_replay_nobody_reads_is_bounded_and_ends(publisher):
    """A DEALER asks for a replay of 3001 batches and never reads (its socket buffers made
    small): the daemon queues at most REPLAY_BUFFER (64 KiB here) + one batch for it, closes
    it once it has taken under its rate for a replay_rate_window (0.5 s here), and serves a reading client's
    full replay meanwhile; requests piled behind a replay are bounded; a replay connection
    without a replay is closed after REPLAY_IDLE_TIMEOUT and its DEALER, reconnecting by
    itself, is served again."""
    from kvstored import events

    pub = publisher
    for i in range(3000):
        pub.call(pub._publish, msgpack.packb([0.0, [["AllBlocksCleared"]] * 40, 0]), 40)
    rep = pub.bound()[1]
    ctx = zmq.Context()
    try:
        stalled = ctx.socket(zmq.DEALER)
        stalled.setsockopt(zmq.LINGER, 0)
        stalled.setsockopt(zmq.RCVHWM, 1)
        stalled.setsockopt(zmq.RCVBUF, 4096)
        stalled.connect(rep)
        for _ in range(events.MAX_QUEUED_REQUESTS + 10):  # piled up behind the first
            stalled.send_multipart([b"", (0).to_bytes(8, "big")])
        wait_for(lambda: pub.counters["replays_refused"] >= 9, 10, "piled requests refused")

        def stalled_queue() -> int:
            return max((c.queued for c in pub._router.conns if c.replay is not None), default=0)

        peak = 0
        end = time.monotonic() + 10
        while pub.counters["replays_stalled"] == 0 and time.monotonic() < end:
            peak = max(peak, pub.call(stalled_queue))
            time.sleep(0.01)
        assert pub.counters["replays_stalled"] == 1, "the stalled replay was not closed"
        assert 0 < peak <= events.REPLAY_BUFFER + 4 * KiB, peak
        stalled.close(0)  # (it would reconnect by itself, and be closed as idle, in a loop)
        # a reading client gets all of it
        reader = ctx.socket(zmq.DEALER)
        reader.setsockopt(zmq.LINGER, 0)
        dropped = reader.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        reader.connect(rep)
        reader.send_multipart([b"", (0).to_bytes(8, "big")])
        seqs = []
        while True:
            assert reader.poll(10000), f"replay did not end ({len(seqs)} batches)"
            frames = reader.recv_multipart()
            if frames[1] == END:
                break
            seqs.append(int.from_bytes(frames[1], "big"))
        assert seqs == list(range(3001))  # the start's AllBlocksCleared, then ours
        # idle: closed after REPLAY_IDLE_TIMEOUT; the DEALER reconnects when it next sends
        assert dropped.poll(10000), "the idle replay connection was not closed"
        reader.send_multipart([b"", (3000).to_bytes(8, "big")])
        assert reader.poll(10000)
        assert int.from_bytes(reader.recv_multipart()[1], "big") == 3000
    finally:
        ctx.destroy(0)


def test_answers_a_client_never_reads_stop_its_reading_at_the_bound(publisher, monkeypatch):
    """A ZMTP client that floods PINGs (events endpoint) or malformed replay requests
    (replay endpoint) and reads nothing: each would be answered (a PONG, the end marker),
    so past its bound queued (SUBSCRIBER_BUFFER, lowered to 256 KiB; REPLAY_BUFFER, 64 KiB)
    the daemon stops reading that connection: it holds the bound + one read's answers at
    most, and the flood's sender blocks. What the queued answers cost in memory, headers
    included, stays within twice that (one object per 23-byte PONG cost ~10x)."""
    import sys

    from kvstored import events

    def held(c) -> int:
        return sum(sys.getsizeof(b) + (sys.getsizeof(b.obj) if isinstance(b, memoryview) else 0)
                   for b in c.wbuf)

    monkeypatch.setattr(events, "SUBSCRIBER_BUFFER", 256 * KiB)
    monkeypatch.setattr(events, "REPLAY_IDLE_TIMEOUT", 30.0)  # (unread, it would count as idle)
    pub = publisher
    floods = ((0, b"SUB", events._command(b"PING", b"\0\0" + b"c" * 16), 256 * KiB),
              (1, b"DEALER", events.encode_message((b"", b"abc")), events.REPLAY_BUFFER))
    for endpoint, kind, frame, bound in floods:
        path = pub.bound()[endpoint][6:]
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            s.sendall(events._greeting() + events._ready(kind))
            s.setblocking(False)
            server = pub._pub if endpoint == 0 else pub._router

            def paused() -> bool:
                return bool(server.conns) and not any(c.reading for c in server.conns)

            blob = memoryview(frame * (64 * KiB // len(frame)))  # whole frames: the
            sent, off, end = 0, 0, time.monotonic() + 30  # stream wraps at a frame's end
            while not pub.call(paused):
                assert sent < 64 * MiB and time.monotonic() < end, f"{kind}: not paused"
                try:
                    n = s.send(blob[off:])
                except BlockingIOError:
                    time.sleep(0.02)
                    continue
                sent, off = sent + n, (off + n) % len(blob)
            conns = pub.call(lambda: [(c.queued, c.reading, held(c)) for c in server.conns])
            assert len(conns) == 1 and not conns[0][1], conns
            assert conns[0][0] <= bound + 4 * events.READ_SIZE, (kind, conns)
            assert conns[0][2] <= 2 * (bound + 4 * events.READ_SIZE), (kind, conns)
        finally:
            s.close()


def test_a_replay_connection_closed_by_its_end_marker_starts_no_queued_request(publisher):
    """A replay reaches its end with a request queued behind it and the end marker's write
    fails (the peer gone): the connection closes, and the queued request is not begun on
    it (before: it was counted as a replay and filed among those in progress, closed)."""
    pub = publisher
    ctx = zmq.Context()
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(pub.bound()[1])
        wait_for(lambda: pub.call(lambda: [c.ready for c in pub._router.conns]) == [True], 10,
                 "the DEALER's handshake")

        def end_with_one_queued():
            conn = next(iter(pub._router.conns))
            conn.sock.shutdown(socket.SHUT_WR)  # the next write fails (EPIPE)
            conn.replay = [(b"",), pub.seq]  # past the buffer's end: the end marker next
            pub._replays.append(conn)
            conn.requests.append((True, (0).to_bytes(8, "big")))
            replays = pub.counters["replays"]
            pub._replay_some()
            return conn.closed, len(pub._replays), pub.counters["replays"] - replays

        assert pub.call(end_with_one_queued) == (True, 0, 0)
    finally:
        ctx.destroy(0)


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        got = s.recv(n - len(buf))
        if not got:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += got
    return buf


def _recv_frame(s: socket.socket) -> tuple[int, bytes]:
    """One ZMTP frame read off ``s``: (flags, body)."""
    flags, n = _recv_exact(s, 2)
    if flags & 0x02:
        n = int.from_bytes(bytes((n,)) + _recv_exact(s, 7), "big")
    return flags, _recv_exact(s, n)


def test_zmtp_by_hand_subscriptions_pings_and_long_frames(publisher):
    """A client speaking ZMTP by hand (libzmq sends neither 3.1 commands to the 3.0 the
    daemon announces, nor long or hostile frames): the daemon's greeting and READY (PUB);
    a subscription as a 3.1 SUBSCRIBE command and as a 3.0 message (0x01), each cancelled
    (CANCEL, 0x00); a PING answered by a PONG echoing its context; a message frame over
    MAX_FRAME skipped and the stream parsed again after it; a message frame of length
    2**64 - 1 skipped as it comes with nothing kept; a command frame of length 2**63
    closes the connection."""
    from kvstored import events

    pub = publisher
    path = pub.bound()[0][6:]

    def subscribed() -> int:
        return pub.call(lambda: len(pub._pub.subscribed))

    def client() -> socket.socket:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(path)
        s.sendall(events._greeting() + events._ready(b"SUB"))
        g = _recv_exact(s, 64)
        assert g[0] == 0xFF and g[9] == 0x7F and g[10] == 3 and g[12:16] == b"NULL", g
        flags, body = _recv_frame(s)
        assert flags == 0x04 and body[:6] == b"\x05READY", body
        assert b"\x0bSocket-Type\x00\x00\x00\x03PUB" in body, body
        return s

    def pong(s: socket.socket, context: bytes) -> None:
        s.sendall(events._command(b"PING", b"\x00\x0a" + context))
        assert _recv_frame(s) == (0x04, b"\x04PONG" + context)

    s = client()
    try:
        for on, off in ((events._command(b"SUBSCRIBE", b""), events._command(b"CANCEL", b"")),
                        (events.encode_message((b"\x01",)), events.encode_message((b"\x00",)))):
            s.sendall(on)
            wait_for(lambda: subscribed() == 1, 10, "subscribed")
            pub.call(pub.stored, SimpleNamespace(ns=b"z", key=b"k"))
            frames = [_recv_frame(s) for _ in range(3)]
            assert [f for f, _ in frames] == [0x01, 0x01, 0x00], frames
            topic, seq, payload = (b for _, b in frames)
            assert topic == b"" and len(seq) == 8
            assert msgpack.unpackb(payload)[1][-1][0] == "BlockStored"
            s.sendall(off)
            wait_for(lambda: subscribed() == 0, 10, "unsubscribed")
        pong(s, b"ctx-1")
        big = 8 * KiB  # > MAX_FRAME: skipped unread, then the stream goes on
        assert big > events.MAX_FRAME
        s.sendall(b"\x02" + big.to_bytes(8, "big") + b"\x01" * big)
        pong(s, b"ctx-2")
        s.sendall(b"\x06" + (1 << 63).to_bytes(8, "big"))  # a LONG command
        assert s.recv(1) == b""  # closed
    finally:
        s.close()
    s = client()
    try:
        s.sendall(b"\x02" + (2**64 - 1).to_bytes(8, "big"))
        for _ in range(64):  # 4 MiB of a frame that never ends
            s.sendall(b"\x01" * (64 * KiB))
        kept = pub.call(lambda: [(len(c.rbuf), c.skip) for c in pub._pub.conns])
        assert len(kept) == 1 and kept[0][1] > 0, kept
        assert kept[0][0] <= events.MAX_FRAME + events.READ_SIZE, kept
    finally:
        s.close()
    wait_for(lambda: pub.call(pub.subscribers) == 0, 10, "the connection gone")


# ------------------------------------------------------------------ control port

def test_control_calls_without_a_request_message_end_at_the_deadline(node):
    """4 calls (server.max_control_rpcs here) open their HTTP/2 stream and never send the
    request message: gRPC counts them against the limit from their headers, so before
    control_request_timeout they held every place for good. Now each ends with
    DEADLINE_EXCEEDED after 1 s, counted, and the control plane serves again."""
    ch = grpc.insecure_channel(node.control)
    release = threading.Event()

    def never():
        release.wait(30)
        return
        yield

    def key(m):
        return [v for k, v in m.items() if k.startswith("kvstored_errors_total{")
                and 'plane="control"' in k and 'type="Timeout"' in k]

    before = sum(key(wait_for(lambda: metrics(node), 10, "a scrape")))
    try:
        calls = [ch.stream_unary("/kvstore.v1.KVStore/Info", request_serializer=bytes,
                                 response_deserializer=bytes).future(never())
                 for _ in range(4)]
        t0 = time.monotonic()
        wait_for(lambda: all(c.done() for c in calls), 20, "the stalled calls ended")
        assert time.monotonic() - t0 < 15
        for c in calls:
            assert c.exception().code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "server.control_request_timeout" in c.exception().details()
        info = ch.unary_unary("/kvstore.v1.KVStore/Info",
                              request_serializer=pb.InfoRequest.SerializeToString,
                              response_deserializer=pb.InfoResponse.FromString)
        assert info(pb.InfoRequest(), timeout=10).version
        after = wait_for(lambda: (m := metrics(node)) and sum(key(m)) - before >= 4 and m, 10,
                         "the timeouts counted")
        assert sum(key(after)) - before >= 4
    finally:
        release.set()
        ch.close()


def test_control_call_ended_without_its_request_message_is_a_typed_error(node):
    """A call whose client closes its side without the request message (an empty stream)
    is InvalidArgument like a malformed body: the kvstore-code trailing metadata (what the
    SDK types errors by) and counted in kvstored_errors_total."""
    ch = grpc.insecure_channel(node.control)

    def key(m):
        return [v for k, v in m.items() if k.startswith("kvstored_errors_total{")
                and 'plane="control"' in k and 'type="InvalidArgument"' in k]

    before = sum(key(wait_for(lambda: metrics(node), 10, "a scrape")))
    try:
        call = ch.stream_unary("/kvstore.v1.KVStore/Info", request_serializer=bytes,
                               response_deserializer=bytes)
        with pytest.raises(grpc.RpcError) as ei:
            call(iter(()), timeout=10)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert ("kvstore-code", str(kvstore.errors.InvalidArgument.code)) in \
            tuple(ei.value.trailing_metadata())
        after = wait_for(lambda: (m := metrics(node)) and sum(key(m)) > before and m, 10,
                         "the error counted")
        assert sum(key(after)) - before == 1
    finally:
        ch.close()


def _h2_frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + struct.pack(">I", stream) \
        + payload


def _hpack_literal(name: bytes, value: bytes) -> bytes:
    """A header field without indexing, lengths under 127 (all this test sends)."""
    return b"\x00" + bytes((len(name),)) + name + bytes((len(value),)) + value


def never_reading_get(port: int, ns: str, key: bytes) -> socket.socket:
    """An HTTP/2 client by hand: a receive window of 0 (SETTINGS_INITIAL_WINDOW_SIZE), one
    control Get, and never a WINDOW_UPDATE: the answer cannot leave the daemon."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
              + _h2_frame(0x4, 0, 0, struct.pack(">HI", 0x4, 0)))  # SETTINGS
    fields = b"".join(_hpack_literal(k, v) for k, v in (
        (b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/kvstore.v1.KVStore/Get"),
        (b":authority", b"kvstored"), (b"content-type", b"application/grpc"),
        (b"te", b"trailers")))
    msg = pb.GetRequest(namespace=ns, key=key).SerializeToString()
    s.sendall(_h2_frame(0x1, 0x4, 1, fields)  # HEADERS, END_HEADERS
              + _h2_frame(0x0, 0x1, 1, b"\x00" + len(msg).to_bytes(4, "big") + msg))  # DATA, END
    return s


def test_control_answers_nobody_takes_are_dropped_with_their_connection(node):
    """4 hand-made HTTP/2 clients each ask for a 2 MiB value with a receive window of 0 and
    never open it: each call holds a place of server.max_control_rpcs (4 here) and its
    answer (gRPC cannot cancel it from the daemon), so other calls get RESOURCE_EXHAUSTED;
    but only until the connections are control_connection_max_age old (3 s here) plus the
    grace: then the control plane serves again and the memory is not kept."""
    pid = node.info["pid"]
    with kvstore.Client(node.control, namespace="r3big", timeout=10, shm=False) as c:
        assert c.put("big", os.urandom(2 * MiB))
    port = int(node.control.rsplit(":", 1)[1])
    ch = grpc.insecure_channel(node.control)
    info = ch.unary_unary("/kvstore.v1.KVStore/Info",
                          request_serializer=pb.InfoRequest.SerializeToString,
                          response_deserializer=pb.InfoResponse.FromString)
    held = []
    try:
        before = rss(pid)
        held = [never_reading_get(port, "r3big", b"big") for _ in range(4)]

        def refused() -> bool:
            try:
                info(pb.InfoRequest(), timeout=5)
                return False
            except grpc.RpcError as e:
                return e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # (on a loaded machine the first ones may already be past their age: then the
        # hold is gone as it should be, and the second wait is at once)
        t0 = time.monotonic()
        if refused():
            wait_for(lambda: not refused(), 20, "the control plane served again")
        assert time.monotonic() - t0 < 20
        for s in held:  # the daemon closed them (GOAWAY, then the end of the grace)
            assert closed_by_peer([s], keep=0, timeout=10) == 1
        assert rss(pid) - before < 64 * MiB
    finally:
        for s in held:
            s.close()
        ch.close()


# ------------------------------------------------------------------ metrics port

def test_metrics_port_huge_request_line_is_cut_at_its_head_limit(node):
    """A 4 MiB request line without an end: the port reads at most its head limit (16 KiB)
    and closes; the daemon does not grow by it and scrapes are served."""
    pid = node.info["pid"]
    before = rss(pid)
    port = int(node.metrics_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        sent = 0
        try:
            s.sendall(b"GET /")
            chunk = b"a" * (64 * KiB)
            while sent < 4 * MiB:
                s.sendall(chunk)
                sent += len(chunk)
        except OSError:  # closed by the daemon before all of it went
            pass
        assert closed_by_peer([s], keep=0, timeout=10) == 1
    assert rss(pid) - before < 8 * MiB
    assert wait_for(lambda: metrics(node), 10, "a scrape after")
