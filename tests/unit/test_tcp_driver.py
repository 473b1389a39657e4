"""The asyncio driver (kvstored/dataplane/tcp.py) over an in-memory transport.

The transport here is a stand-in for uvloop's (it records writes and
pause/resume calls); the daemon's own code runs unchanged. The real sockets
are in tests/daemon/ and tests/security/.
"""
from __future__ import annotations

import asyncio

import pytest

from kvstore import errors
from kvstore.wire import HEADER_SIZE, OP_GET, OP_PING, OP_PUT, checksum, decode, encode_request
from kvstored.dataplane.connection import RCVLOWAT_PAYLOAD, rcvlowat_cap
from kvstored.dataplane.tcp import TLS_MAX_INFLIGHT, DataConnection, DataServer
from kvstored.engine import Store, StoreLimits

MiB = 1 << 20


class Transport:
    def __init__(self, peer=("127.0.0.1", 5555)):
        self.peer = peer
        self.data = bytearray()
        self.buffered = 0  # what a real transport would still hold
        self.paused = False
        self.closed = self.aborted = False
        self.limits = None
        self.writes = 0  # writelines / write calls (each one a syscall on a real socket)

    def writelines(self, bufs):
        self.writes += 1
        for b in bufs:
            self.data += bytes(b)

    def write(self, b):
        self.writes += 1
        self.data += bytes(b)

    def get_write_buffer_size(self):
        return self.buffered

    def set_write_buffer_limits(self, high, low):
        self.limits = (high, low)

    def pause_reading(self):
        self.paused = True

    def resume_reading(self):
        self.paused = False

    def close(self):
        self.closed = True

    def abort(self):
        self.aborted = True

    def can_write_eof(self):
        return True

    def write_eof(self):
        pass

    def get_extra_info(self, name):
        return self.peer if name == "peername" else None


def frames(t: Transport) -> list:
    out, w, pos = [], bytes(t.data), 0
    t.data.clear()
    while pos < len(w):
        h = decode(w, pos)
        out.append((h, w[pos + HEADER_SIZE:pos + HEADER_SIZE + h.length]))
        pos += HEADER_SIZE + h.length
    return out


async def sent(t: Transport) -> list:
    """The frames written once the loop has come round: over a TCP socket the driver sends
    the answers of one loop iteration's reads together, at its end."""
    await asyncio.sleep(0)
    return frames(t)


def feed(c: DataConnection, data: bytes) -> None:
    mv = memoryview(data)
    while mv:
        b = c.get_buffer(len(mv))
        n = min(len(b), len(mv))
        b[:n] = mv[:n]
        c.buffer_updated(n)
        mv = mv[n:]


@pytest.fixture
def server():
    store = Store(StoreLimits(dram_size=8 * MiB, slab_size=1 * MiB, max_value_size=1 * MiB,
                              hugepages=False, prefault=False))
    srv = DataServer(store, max_connections=2, max_inflight_bytes=4 * MiB,
                     max_connections_per_client=1 << 30, max_pipelined_requests=8)
    yield srv
    store.close()


def connect(srv, peer=("127.0.0.1", 5555)):
    c = DataConnection(srv)
    t = Transport(peer)
    c.connection_made(t)
    return c, t


def test_requests_answers_and_lifecycle(server):
    async def run():
        c, t = connect(server)
        assert t.limits == (4 * MiB, 2 * MiB) and c in server.connections
        data = b"x" * 100_000
        feed(c, encode_request(OP_PUT, 1, b"ns", b"k", len(data), checksum(data)) + data
             + encode_request(OP_GET, 2, b"ns", b"k") + encode_request(OP_PING, 3, b"", b""))
        rs = frames(t)
        assert [(h.req_id, h.status) for h, _ in rs] == [(1, 0), (2, 0), (3, 0)]
        assert rs[1][1] == data
        assert server.traffic()[0] > len(data)
        c.connection_lost(None)
        assert c not in server.connections and server.store.index[(b"ns", b"k")].refs == 0
    asyncio.run(run())


def test_connection_limit_refuses_with_a_frame(server):
    async def run():
        a, _ = connect(server)
        b, _ = connect(server)
        c, t = connect(server)
        (h, msg), = frames(t)
        assert h.status == errors.Unavailable.code and b"too many connections" in msg
        assert t.closed and c.closed and server.counters["rejected_connections"] == 1
    asyncio.run(run())


def test_pipeline_limit_pauses_the_transport_until_drained(server):
    async def run():
        c, t = connect(server)
        data = b"v" * 1000
        feed(c, encode_request(OP_PUT, 1, b"ns", b"k", len(data), checksum(data)) + data)
        frames(t)
        t.buffered = 10 ** 9  # nothing leaves: get references stay held
        feed(c, b"".join(encode_request(OP_GET, 10 + i, b"ns", b"k") for i in range(20)))
        assert len(frames(t)) == 8 and t.paused
        t.buffered = 0
        for _ in range(100):  # the prune timer (2 ms) sees the buffer drained
            await asyncio.sleep(0.01)
            if not t.paused:
                break
        # parsing resumed from what was buffered, and the transport reads again
        assert [h.req_id for h, _ in frames(t)] == list(range(18, 30)) and not t.paused
        assert server.store.index[(b"ns", b"k")].refs == 0
        c.connection_lost(None)
    asyncio.run(run())


def test_write_buffer_back_pressure(server):
    async def run():
        c, t = connect(server)
        c.pause_writing()
        assert t.paused
        feed(c, encode_request(OP_PING, 1, b"", b""))  # bytes already read are kept, not parsed
        assert frames(t) == []
        c.resume_writing()
        assert not t.paused and [h.req_id for h, _ in frames(t)] == [1]
        c.connection_lost(None)
    asyncio.run(run())


def test_reload_hooks_reach_live_connections(server):
    async def run():
        c, t = connect(server)
        server.set_max_inflight_bytes(1 * MiB)
        server.set_max_pipelined(3)
        assert t.limits == (1 * MiB, MiB // 2) and c.burst == 1 * MiB and c.max_pipelined == 3
        server.tls = object()  # with TLS the write-buffer bound is capped
        server.set_max_inflight_bytes(64 * MiB)
        assert c.burst == TLS_MAX_INFLIGHT and server.max_inflight_bytes == 64 * MiB
        c.connection_lost(None)
    asyncio.run(run())


def test_drain_closes_idle_connections(server):
    async def run():
        c, t = connect(server)
        await server.drain(1.0)
        assert t.closed and c.closed
        d, t2 = connect(server)  # accepted just before the listener closed
        assert t2.closed and d not in server.connections
    asyncio.run(run())


class Sock:
    """The transport's socket, as far as the driver uses it: options set, in order."""

    def __init__(self, fail: bool = False):
        import socket
        self.family, self.type = socket.AF_INET, socket.SOCK_STREAM
        self.opts: list = []
        self.fail = fail

    def setsockopt(self, level, name, value):
        import socket
        if self.fail and name == socket.SO_RCVLOWAT:
            raise OSError(92, "Protocol not available")
        self.opts.append((level, name, value))

    def lowats(self) -> list[int]:
        import socket
        return [v for _, n, v in self.opts if n == socket.SO_RCVLOWAT]


def connect_sock(srv, sock: Sock):
    c = DataConnection(srv)
    t = Transport()
    t.get_extra_info = lambda name: {"peername": t.peer, "socket": sock}.get(name)
    c.connection_made(t)
    return c, t


@pytest.fixture
def big_server():
    store = Store(StoreLimits(dram_size=32 * MiB, slab_size=4 * MiB, max_value_size=4 * MiB,
                              hugepages=False, prefault=False))
    srv = DataServer(store, max_connections=4, max_inflight_bytes=4 * MiB)
    yield srv
    store.close()


def test_rcvlowat_follows_a_large_payload(big_server):
    # defaults: min_put_rate 1 MiB/s, put_stall_timeout 2 s -> at most 512 KiB held back
    cap = rcvlowat_cap(big_server.limits)
    assert cap == 512 * 1024

    async def run():
        sock = Sock()
        c, t = connect_sock(big_server, sock)
        data = bytes(range(256)) * (3 * MiB // 256)
        head = encode_request(OP_PUT, 1, b"ns", b"big", len(data), checksum(data))
        feed(c, head + data[:100_000])
        assert sock.lowats() == [cap]  # the header was parsed: wake when 512 KiB wait
        feed(c, data[100_000:len(data) - 300_000])
        assert sock.lowats() == [cap, 300_000]  # fewer left than the cap: exactly those
        feed(c, data[len(data) - 300_000:])
        assert sock.lowats() == [cap, 300_000, 1]  # payload done: headers wake us again
        assert [(h.req_id, h.status) for h, _ in await sent(t)] == [(1, 0)]
        # payloads under RCVLOWAT_PAYLOAD and requests without one never touch the option
        small = b"s" * (RCVLOWAT_PAYLOAD - 1)
        feed(c, encode_request(OP_PUT, 2, b"ns", b"small", len(small), checksum(small)) + small[:10])
        feed(c, small[10:] + encode_request(OP_GET, 3, b"ns", b"big"))
        assert sock.lowats() == [cap, 300_000, 1]
        rs = await sent(t)
        assert [(h.req_id, h.status) for h, _ in rs] == [(2, 0), (3, 0)] and rs[1][1] == data
        c.connection_lost(None)
    asyncio.run(run())


def test_rcvlowat_off_for_tls_slow_rates_and_unsupported_sockets(big_server):
    async def run():
        data = b"z" * (2 * MiB)
        req = encode_request(OP_PUT, 1, b"ns", b"k", len(data), checksum(data))
        # the kernel refuses the option: the connection reads as before, once
        sock = Sock(fail=True)
        c, t = connect_sock(big_server, sock)
        feed(c, req + data[:1000])
        assert c.lowat_sock is None
        feed(c, data[1000:])
        assert [(h.req_id, h.status) for h, _ in await sent(t)] == [(1, 0)]
        c.connection_lost(None)
        # TLS: the socket carries ciphertext, the session's counts are plaintext
        big_server.tls = object()
        sock = Sock()
        c, t = connect_sock(big_server, sock)
        feed(c, encode_request(OP_PUT, 2, b"ns", b"j", len(data), checksum(data)) + data[:1000])
        assert c.lowat_sock is None and sock.lowats() == []
        feed(c, data[1000:])
        assert [(h.req_id, h.status) for h, _ in frames(t)] == [(2, 0)]
        c.connection_lost(None)
        big_server.tls = None
    asyncio.run(run())
    # a writer allowed to be slow (64 KiB/s for 2 s: 32 KiB) is never held back
    lim = big_server.limits
    lim.min_put_rate = 64 * 1024
    assert rcvlowat_cap(lim) == 0


def test_answers_of_one_loop_iteration_go_out_in_one_write(big_server):
    """Over TCP, the answers to every read of one loop iteration leave in one write at its
    end (issue 11, H4: a put whose payload completes in a read used to cost a write of its
    own); what is more than answers to send (a close, reading to pause) is done at once."""
    async def run():
        c, t = connect_sock(big_server, Sock())
        v = bytes(range(256)) * 256  # 64 KiB
        for i in range(4):  # four reads, each completing a put
            feed(c, encode_request(OP_PUT, i + 1, b"ns", b"k%d" % i, len(v), checksum(v)) + v)
        feed(c, encode_request(OP_GET, 9, b"ns", b"k0"))
        assert t.writes == 0 and not t.data  # the loop has not come round yet
        rs = await sent(t)
        assert t.writes == 1
        assert [(h.req_id, h.status) for h, _ in rs] == [(1, 0), (2, 0), (3, 0), (4, 0), (9, 0)]
        assert rs[4][1] == v
        assert big_server.store.index[(b"ns", b"k0")].refs == 0  # the get's bytes left: released
        # a stream that cannot be parsed: its error frame is written and the connection
        # closed in the same call, nothing waits for the loop
        feed(c, encode_request(OP_PING, 10, b"", b"") + b"X" * 64)
        assert t.writes == 2 and t.closed
        rs = frames(t)
        assert rs[0][0].req_id == 10 and rs[-1][0].status == errors.ProtocolError.code
        c.connection_lost(None)
        await asyncio.sleep(0)  # the flush scheduled before is a no-op on a closed connection
        assert t.writes == 2
    asyncio.run(run())


def test_answers_held_for_the_loop_stay_within_the_burst(big_server):
    """Answers wait for the iteration's end only while they are less than a burst
    (max_inflight_bytes): a read carrying 64 pipelined 64 KiB gets is written out burst by
    burst at once, as before, and never held whole."""
    async def run():
        big_server.plane.burst = 256 * 1024
        try:
            c, t = connect_sock(big_server, Sock())
            v = bytes(range(256)) * 256
            feed(c, encode_request(OP_PUT, 1, b"ns", b"q", len(v), checksum(v)) + v)
            await sent(t)
            t.writes = 0
            feed(c, b"".join(encode_request(OP_GET, 100 + i, b"ns", b"q") for i in range(64)))
            # 64 x 64 KiB in bursts of 256 KiB: at least 15 writes before the loop comes round
            assert t.writes >= 15 and len(t.data) >= 15 * 4 * len(v)
            rs = await sent(t)
            assert [h.req_id for h, _ in rs] == [100 + i for i in range(64)]
            assert all(p == v for _, p in rs)
            assert big_server.store.index[(b"ns", b"q")].refs == 0
            c.connection_lost(None)
        finally:
            big_server.plane.burst = 4 * MiB
    asyncio.run(run())
