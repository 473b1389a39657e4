"""Hostile clients, round 4: one client taking every place on the control port (HTTP/2
streams of one connection, calls of one address over several) or the KV event endpoints
(connections, replays from one address), and a replay reader slow enough to hold its place
for good.

One daemon for the module: max_control_rpcs = 4 with 2 streams per control connection and
2 calls per client address, a control_request_timeout long enough (20 s) that calls without
a request message hold their places through a test; events.max_subscribers = 4 with 2 per
source address. Loopback tests bind their client sockets to 127.0.0.x to be different
sources. The replay rules are checked on the real publisher in this process (a replay must
outgrow the kernel's socket buffers, ~3 MB on loopback, for a reader to hold it: more
batches than a test can put through a daemon cheaply). Every wait is on a condition,
bounded in count and time.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import socket
import struct
import time

import grpc
import pytest

import kvstore
from kvstore.v1 import control_pb2 as pb

from test_hostile import closed_by_peer, connect_from, publisher_on_a_loop, wait_for
from test_hostile_round3 import _h2_frame, _hpack_literal, metric_when

zmq = pytest.importorskip("zmq")
msgpack = pytest.importorskip("msgpack")

KiB, MiB = 1 << 10, 1 << 20
END = (-1).to_bytes(8, "big", signed=True)
RPCS, STREAMS, PER_ADDRESS = 4, 2, 2  # server.max_control_rpcs, control_streams_per_connection,
# control_rpcs_per_client
SUBS, PER_CLIENT = 4, 2  # events.max_subscribers, max_subscribers_per_client


@pytest.fixture(scope="module")
def node(module_daemons, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("round4")
    cfg = tmp / "round4.toml"
    cfg.write_text(f"[server]\nmax_control_rpcs = {RPCS}\ncontrol_request_timeout = 20.0\n"
                   f"control_streams_per_connection = {STREAMS}\n"
                   f"control_rpcs_per_client = {PER_ADDRESS}\n"
                   '[events]\nendpoint = "tcp://127.0.0.1:*"\n'
                   f'replay_endpoint = "tcp://127.0.0.1:*"\nmax_subscribers = {SUBS}\n'
                   f"max_subscribers_per_client = {PER_CLIENT}\n")
    d = module_daemons("round4", "--config", str(cfg))
    # any free ports, as the daemon bound them (its ready file): none picked here to race for
    d.pub_port, d.rep_port = (int(d.info[k].rpartition(":")[2])
                              for k in ("events_endpoint", "events_replay_endpoint"))
    return d


# ------------------------------------------------------------------ settings

@pytest.mark.parametrize("overrides, expect", [
    ({"max_control_rpcs": 8, "control_streams_per_connection": 9},
     "server.control_streams_per_connection (9) must be at most server.max_control_rpcs (8)"),
    ({"control_streams_per_connection": -1},
     "server.control_streams_per_connection: -1 is outside"),
    ({"max_control_rpcs": 8, "control_rpcs_per_client": 9},
     "server.control_rpcs_per_client (9) must be at most server.max_control_rpcs (8)"),
    ({"events_max_subscribers": 4, "events_max_subscribers_per_client": 5},
     "events.max_subscribers_per_client (5) must be at most events.max_subscribers (4)"),
    ({"events_max_replays": 4, "events_max_replays_per_client": 5},
     "events.max_replays_per_client (5) must be at most events.max_replays (4)"),
    ({"events_max_replays": 0}, "events.max_replays: 0 is outside 1..1024"),
    ({"events_max_replays_per_client": 2000}, "events.max_replays_per_client: 2000 is outside"),
    ({"events_replay_rate_window": 0}, "events.replay_rate_window: 0.0 is outside 0.1..3600"),
    ({"events_replay_rate_window": float("nan")}, "events.replay_rate_window: nan is outside"),
    ({"events_replay_min_rate": "2GiB"}, "events.replay_min_rate: 2147483648 is outside"),
])
def test_new_limits_are_checked_at_start_naming_the_setting(overrides, expect):
    from kvstored.config import ConfigError, load_config

    with pytest.raises(ConfigError) as ei:
        load_config(None, overrides)
    assert expect in str(ei.value) and "\n" not in str(ei.value)


def test_new_limits_default_to_a_share_of_the_whole():
    from kvstored.config import load_config

    c = load_config(None, {"max_control_rpcs": 1024, "events_max_subscribers": 64})
    assert (c.control_streams(), c.control_calls_per_client(), c.events_per_client()) == (
        512, 512, 16)  # (a connection: as many as its client may run; see the next test)
    c = load_config(None, {"max_control_rpcs": 64, "control_rpcs_per_client": 64})
    assert c.control_streams() == 64  # (a NAT's fleet allowed every place, on one connection too)
    c = load_config(None, {"max_control_rpcs": 1, "events_max_subscribers": 1})
    assert (c.control_streams(), c.control_calls_per_client(), c.events_per_client()) == (
        1, 1, 1)  # at least one
    c = load_config(None, {"control_streams_per_connection": 3, "control_rpcs_per_client": 7,
                           "events_max_subscribers_per_client": 5})
    assert (c.control_streams(), c.control_calls_per_client(), c.events_per_client()) == (
        3, 7, 5)


def test_one_clients_burst_on_one_connection_is_served_under_the_defaults(module_daemons):
    """An SDK-like client (one channel: one HTTP/2 connection) runs 400 calls at once
    against the default limits (control_rpcs_per_client 512): every one is answered. With
    control_streams_per_connection defaulting to a quarter of max_control_rpcs (256), gRPC
    refused the calls the client opened at the cap as earlier ones ended (REFUSED_STREAM:
    UNAVAILABLE, "daemon unreachable" to the SDK; 10-85 of 400 in each burst, measured)."""
    d = module_daemons("round4-defaults")

    async def burst() -> list:
        async with grpc.aio.insecure_channel(d.control) as ch:
            info = ch.unary_unary("/kvstore.v1.KVStore/Info",
                                  request_serializer=pb.InfoRequest.SerializeToString,
                                  response_deserializer=pb.InfoResponse.FromString)
            got = await asyncio.gather(*(info(pb.InfoRequest(), timeout=60) for _ in range(400)),
                                       return_exceptions=True)
        return [(r.code(), r.details()) for r in got if isinstance(r, grpc.RpcError)]

    for _ in range(2):  # a fresh connection each
        failed = asyncio.run(burst())
        assert not failed, f"{len(failed)} of 400 failed: {set(failed)}"


@pytest.mark.parametrize("peer, address", [
    ("ipv4:10.0.0.1:5000", "10.0.0.1"),
    ("ipv6:%5B::1%5D:49528", "::1"),  # as grpcio 1.85 writes it: a URI, brackets encoded
    ("ipv6:[fe80::1]:5000", "fe80::1"),
    ("unix:/run/kvstored/x.sock", "unix"),
])
def test_a_call_counts_against_its_peer_address_without_the_port(peer, address):
    from kvstored.control.errors import peer_address

    assert peer_address(peer) == address


# ------------------------------------------------------------------ control port

def _resets(frames) -> set[int]:
    return {f[2] for f in frames if f[0] == 0x3}  # streams that got RST_STREAM


def _ended(frames) -> set[int]:
    return {f[2] for f in frames if f[0] == 0x1 and f[1] & 0x1}  # HEADERS with END_STREAM


def _h2_frames(s: socket.socket, timeout: float, done) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream, payload) of the frames that arrive until ``done(frames)``, or
    for ``timeout`` s."""
    s.settimeout(0.2)
    buf, out, until = b"", [], time.monotonic() + timeout
    while time.monotonic() < until and not done(out):
        try:
            got = s.recv(65536)
        except TimeoutError:
            continue
        if not got:
            break
        buf += got
        while len(buf) >= 9:
            n = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + n:
                break
            out.append((buf[3], buf[4], struct.unpack(">I", buf[5:9])[0] & 0x7FFFFFFF,
                        buf[9:9 + n]))
            buf = buf[9 + n:]
    return out


# an Info call's HEADERS block (HPACK literals): sent without its request message, the call
# holds a place of max_control_rpcs until control_request_timeout
INFO_HEADERS = b"".join(_hpack_literal(k, v) for k, v in (
    (b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/kvstore.v1.KVStore/Info"),
    (b":authority", b"kvstored"), (b"content-type", b"application/grpc"), (b"te", b"trailers")))
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def test_one_control_connection_cannot_take_every_call_place(node):
    """A hand-made HTTP/2 client (from 127.0.0.2) that ignores
    SETTINGS_MAX_CONCURRENT_STREAMS opens 8 Info calls on one connection and never sends
    their request messages (each would hold one of max_control_rpcs = 4 places until
    control_request_timeout, 20 s here): gRPC refuses the streams past
    control_streams_per_connection (2; RST_STREAM), so another client is still served at
    once; before, the 8 took all 4 places and it got RESOURCE_EXHAUSTED."""
    port = int(node.control.rsplit(":", 1)[1])
    ch = grpc.insecure_channel(node.control)
    info = ch.unary_unary("/kvstore.v1.KVStore/Info",
                          request_serializer=pb.InfoRequest.SerializeToString,
                          response_deserializer=pb.InfoResponse.FromString)
    assert info(pb.InfoRequest(), timeout=10).node_id  # the channel is up
    s = connect_from("127.0.0.2", port, timeout=10)
    try:
        # the preface and our SETTINGS, and an ACK of the daemon's (sent blind: a client
        # that never ACKs is the next test's part); then 8 calls' HEADERS, no DATA
        s.sendall(PREFACE + _h2_frame(0x4, 0, 0, b"")
                  + _h2_frame(0x4, 0x1, 0, b""))
        s.sendall(b"".join(_h2_frame(0x1, 0x4, 2 * i + 1, INFO_HEADERS) for i in range(8)))
        frames = _h2_frames(s, 10, lambda f: len(_resets(f)) >= 8 - STREAMS)
        # another client: served, not RESOURCE_EXHAUSTED (the hostile calls are still open)
        for _ in range(3):
            assert info(pb.InfoRequest(), timeout=10).node_id
        settings = [f for f in frames if f[0] == 0x4 and not f[1] & 0x1]
        assert settings, "no SETTINGS from the daemon"
        advertised = dict(struct.unpack(">HI", settings[0][3][i:i + 6])
                          for i in range(0, len(settings[0][3]), 6))
        assert advertised.get(0x3) == STREAMS, advertised  # SETTINGS_MAX_CONCURRENT_STREAMS
        assert len(_resets(frames)) >= 8 - STREAMS, frames
    finally:
        s.close()
        ch.close()


def test_control_streams_past_the_cap_without_a_settings_ack_are_refused_too(node):
    """The same client (127.0.0.2) without ever ACKing the daemon's SETTINGS (so it may
    claim it never learnt the limit): gRPC refuses the streams past it all the same (RST_STREAM
    ENHANCE_YOUR_CALM, measured), and a second client is served."""
    port = int(node.control.rsplit(":", 1)[1])
    s = connect_from("127.0.0.2", port, timeout=10)
    try:
        s.sendall(PREFACE + _h2_frame(0x4, 0, 0, b"")
                  + b"".join(_h2_frame(0x1, 0x4, 2 * i + 1, INFO_HEADERS) for i in range(8)))
        frames = _h2_frames(s, 10, lambda f: len(_resets(f)) >= 8 - STREAMS)
        with kvstore.Client(node.control, timeout=10, shm=False) as c:
            assert c.info()
        assert len(_resets(frames)) >= 8 - STREAMS, frames
    finally:
        s.close()


def test_one_client_address_cannot_take_every_call_place(node):
    """The same client (127.0.0.2) within the per-connection cap, over 2 connections of 2
    calls each without their request messages: 4 would take every place (max_control_rpcs),
    but past control_rpcs_per_client (2) calls of one address are answered at once
    RESOURCE_EXHAUSTED with kvstore-code, counted and logged with the address; a client
    from 127.0.0.1 is still served. Before, the 4 held every place."""
    port = int(node.control.rsplit(":", 1)[1])
    # the calls the previous tests held from 127.0.0.2 end as the daemon sees their
    # connections close: until then they would count against this test's address
    metric_when(node, "kvstored_control_calls", lambda v: v == 0)
    refused0 = metric_when(node, "kvstored_control_client_calls_refused_total", lambda v: True)
    socks = [connect_from("127.0.0.2", port, timeout=10) for _ in range(2)]
    calls = PREFACE + _h2_frame(0x4, 0, 0, b"") + _h2_frame(0x4, 0x1, 0, b"") \
        + _h2_frame(0x1, 0x4, 1, INFO_HEADERS) + _h2_frame(0x1, 0x4, 3, INFO_HEADERS)
    try:
        for s in socks:
            s.sendall(calls)
        # 2 of the 4 answered at once (HEADERS ending the stream: a trailers-only
        # RESOURCE_EXHAUSTED), the other 2 held (they wait for their request messages)
        frames: list[list] = [[], []]
        end = time.monotonic() + 15
        while sum(len(_ended(f)) for f in frames) < 2 and time.monotonic() < end:
            for i, s in enumerate(socks):
                frames[i] += _h2_frames(s, 0.2, lambda f: False)
        with kvstore.Client(node.control, timeout=10, shm=False) as c:  # (from 127.0.0.1)
            for _ in range(3):
                assert c.info()
        metric_when(node, "kvstored_control_client_calls_refused_total",
                    lambda v: v - refused0 == 2)
        answers = [f for fs in frames for f in fs if f[0] == 0x1 and f[1] & 0x1]
        assert len(answers) == 2, frames
        assert all(b"server.control_rpcs_per_client" in a[3] for a in answers), answers
        for i, s in enumerate(socks):  # the held ones still are
            frames[i] += _h2_frames(s, 0.2, lambda f: False)
        assert sum(len(_ended(f)) for f in frames) == 2, frames
        assert "the last from 127.0.0.2" in node.log_path.read_text(errors="replace")
    finally:
        for s in socks:
            s.close()


def test_calls_waiting_for_their_message_count_as_in_progress(node):
    """Two addresses (127.0.0.2, .3) hold 2 calls each without their request messages:
    every place of max_control_rpcs (4) is taken and gRPC refuses a client from 127.0.0.1
    (RESOURCE_EXHAUSTED). The node says so: kvstored_control_calls shows the 4 calls and
    kvstored_control_rpc_limit_reached_total counts the limit reached (before, a call was
    counted only once its message came: the gauge said 0 while every client was refused,
    and the counter never moved); once the connections close the gauge is 0 again."""
    port = int(node.control.rsplit(":", 1)[1])
    metric_when(node, "kvstored_control_calls", lambda v: v == 0)  # earlier tests' calls ended
    reached0 = metric_when(node, "kvstored_control_rpc_limit_reached_total", lambda v: True)
    calls = PREFACE + _h2_frame(0x4, 0, 0, b"") + _h2_frame(0x4, 0x1, 0, b"") \
        + _h2_frame(0x1, 0x4, 1, INFO_HEADERS) + _h2_frame(0x1, 0x4, 3, INFO_HEADERS)
    socks = [connect_from(src, port, timeout=10) for src in ("127.0.0.2", "127.0.0.3")]
    ch = grpc.insecure_channel(node.control)
    try:
        for s in socks:
            s.sendall(calls)
        metric_when(node, "kvstored_control_calls", lambda v: v == RPCS)
        info = ch.unary_unary("/kvstore.v1.KVStore/Info",
                              request_serializer=pb.InfoRequest.SerializeToString,
                              response_deserializer=pb.InfoResponse.FromString)
        with pytest.raises(grpc.RpcError) as ei:
            info(pb.InfoRequest(), timeout=10)
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, ei.value
        metric_when(node, "kvstored_control_rpc_limit_reached_total",
                    lambda v: v - reached0 == 1)
    finally:
        ch.close()
        for s in socks:
            s.close()
    metric_when(node, "kvstored_control_calls", lambda v: v == 0)


# ------------------------------------------------------------------ KV event endpoints

def _zmtp_peer(src: str, port: int, kind: bytes) -> socket.socket:
    """A ZMTP 3 peer by hand from ``src``: greeting and READY sent, so the daemon keeps it
    past its handshake deadline."""
    from kvstored import events

    s = connect_from(src, port)
    s.sendall(events._greeting() + events._ready(kind))
    return s


def test_one_source_cannot_take_every_event_place(node):
    """One address (127.0.0.2) opens 4 subscribers and 4 replay connections, each finishing
    ZMTP's handshake: it keeps 2 of each (max_subscribers_per_client), the others are
    closed, counted and logged with the address; a router from 127.0.0.3 subscribes and gets
    events, and a replay from there is answered. Before, the 4 took every place and the
    router was refused."""
    refused0 = metric_when(node, "kvstored_kv_event_subscribers_refused_per_client_total",
                           lambda v: True)
    held = []
    ctx = zmq.Context()
    try:
        for port, kind in ((node.pub_port, b"SUB"), (node.rep_port, b"DEALER")):
            socks = [_zmtp_peer("127.0.0.2", port, kind) for _ in range(SUBS)]
            held += socks
            assert closed_by_peer(socks, keep=PER_CLIENT, timeout=10) == SUBS - PER_CLIENT
        metric_when(node, "kvstored_kv_event_subscribers_refused_per_client_total",
                    lambda v: v - refused0 >= 2 * (SUBS - PER_CLIENT))
        assert metric_when(node, "kvstored_kv_event_subscribers", lambda v: True) == PER_CLIENT
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(f"tcp://127.0.0.3:0;127.0.0.1:{node.pub_port}")
        with kvstore.Client(node.control, namespace="r4", timeout=10, shm=False) as c:
            for i in range(100):  # (ZMQ's slow joiner: until one arrives)
                c.put(f"k{i}", b"a")
                if sub.poll(100):
                    break
            else:
                raise AssertionError("the router from another address got no event")
        assert msgpack.unpackb(sub.recv_multipart()[2])[1]
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(f"tcp://127.0.0.3:0;127.0.0.1:{node.rep_port}")
        dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        for _ in range(10000):
            assert dealer.poll(10000), "no replay answer from another address"
            if dealer.recv_multipart()[1] == END:
                break
        log = node.log_path.read_text(errors="replace")
        assert "refused for their source (the last from 127.0.0.2)" in log
        assert "events.max_subscribers_per_client" in log
    finally:
        ctx.destroy(0)
        for s in held:
            s.close()


# ------------------------------------------------------------------ replay rate

@pytest.fixture
def tcp_publisher():
    """The real publisher in this process on 127.0.0.1 (replays must take 64 KiB/s over
    each 0.5 s); yields it with ``call`` to run a function on its loop (in a thread)."""
    with publisher_on_a_loop("tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0",
                             max_subscribers=16, replay_buffer=5000,
                             replay_min_rate=64 * KiB, replay_rate_window=0.5) as pub:
        yield pub


def test_a_slow_replay_reader_is_closed_and_a_fast_one_is_not(tcp_publisher, caplog):
    """8 MB of batches to replay (more than loopback's socket buffers take): a reader that
    takes 4 KiB every 0.1 s (40 KiB/s, under the 64 KiB/s asked) is closed within a few
    0.5 s windows and counted (before: it never took nothing for the 30 s stall timeout, so
    it held its replay place for good); a reader that takes what comes gets all of it."""
    pub = tcp_publisher
    for _ in range(2000):
        pub.call(pub._publish, msgpack.packb([0.0, [["AllBlocksCleared"]] * 200, 0]), 200)
    assert pub._buffer_bytes > 4 * MiB
    port = int(pub.bound()[1].rsplit(":", 1)[1])
    from kvstored import events

    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(("127.0.0.1", port))
    slow.settimeout(10)
    caplog.set_level(logging.INFO, "kvstored.events")
    try:
        slow.sendall(events._greeting() + events._ready(b"DEALER")
                     + events.encode_message((b"", (0).to_bytes(8, "big"))))
        t0, took = time.monotonic(), 0
        while time.monotonic() - t0 < 15:
            try:
                got = slow.recv(4 * KiB)
            except OSError:  # reset
                break
            if not got:
                break
            took += len(got)
            time.sleep(0.1)
        else:
            raise AssertionError(f"the slow reader was not closed ({took} bytes in 15 s)")
        assert pub.counters["replays_stalled"] == 1
        assert any("under events.replay_min_rate" in r.getMessage() for r in caplog.records)
        assert pub.call(lambda: len(pub._replays)) == 0  # its place is free
    finally:
        slow.close()
    ctx = zmq.Context()
    try:
        reader = ctx.socket(zmq.DEALER)
        reader.setsockopt(zmq.LINGER, 0)
        reader.connect(pub.bound()[1])
        reader.send_multipart([b"", (0).to_bytes(8, "big")])
        n = 0
        while True:
            assert reader.poll(10000), f"replay did not end ({n} batches)"
            if reader.recv_multipart()[1] == END:
                break
            n += 1
        assert n == 2001  # the start's AllBlocksCleared, then ours
        assert pub.counters["replays_stalled"] == 1
    finally:
        ctx.destroy(0)


def _replay_request_from(src: str, port: int) -> socket.socket:
    """A DEALER by hand from ``src`` that asks for a replay from 0 and reads nothing (a
    small receive buffer: what it is sent stays queued in the publisher)."""
    from kvstored import events

    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.bind((src, 0))
    s.connect(("127.0.0.1", port))
    s.sendall(events._greeting() + events._ready(b"DEALER")
              + events.encode_message((b"", (0).to_bytes(8, "big"))))
    return s


def test_one_source_cannot_hold_every_replay_place(tcp_publisher):
    """A source (127.0.0.2) asks for 5 replays of ~7 MB on 5 connections and reads none (a
    rate window of 30 s: none is closed meanwhile): 3 run (events.max_replays_per_client,
    set to 3 here; 4 by default), the other 2 get the end marker alone and are counted; a
    replay from 127.0.0.3 runs. Before, one source could run all 16 (events.max_replays),
    each for as long as it read just fast enough."""
    from test_hostile_round3 import _recv_exact, _recv_frame

    pub = tcp_publisher
    pub.replay_rate_window = 30.0
    per_client = pub.max_replays_per_client = 3
    for _ in range(2000):
        pub.call(pub._publish, msgpack.packb([0.0, [["AllBlocksCleared"]] * 200, 0]), 200)
    port = int(pub.bound()[1].rsplit(":", 1)[1])

    def running() -> dict:
        return pub.call(lambda: dict(collections.Counter(c.source for c in pub._replays)))

    socks = []
    try:
        for i in range(per_client):
            socks.append(_replay_request_from("127.0.0.2", port))
            wait_for(lambda: running().get("127.0.0.2") == i + 1, 10, f"replay {i + 1} running")
        refused = [_replay_request_from("127.0.0.2", port) for _ in range(2)]
        socks += refused
        for s in refused:  # the daemon's greeting and READY, then the end marker alone
            s.settimeout(10)
            _recv_exact(s, 64)
            assert _recv_frame(s)[0] & 0x04  # READY
            assert [_recv_frame(s)[1] for _ in range(3)] == [b"", END, b""]
        assert pub.counters["replays_refused"] == 2
        socks.append(_replay_request_from("127.0.0.3", port))
        wait_for(lambda: running().get("127.0.0.3") == 1, 10, "the other source's replay")
        assert running() == {"127.0.0.2": per_client, "127.0.0.3": 1}
    finally:
        for s in socks:
            s.close()
