"""The put path's CPU cuts (session 10, H1) keep its behaviour.

* SO_RCVLOWAT: a socket object of our own over uvloop's fd (made once, detached at the
  end: the transport alone closes the fd), and the mark raised only once a read drained
  the socket (lowered at once, as before);
* one index lookup per put: ``dedup`` is folded into the store's reserve, and an object
  stored already is still answered as such past a connection's reservation bound;
* the put's OK answer built from a template, the size -> class cache, the inlined
  commit / push / eviction steps: same answers, same store state, under eviction, with
  interleaved sessions and corrupt payloads.
"""
from __future__ import annotations

import asyncio
import os
import random
import socket

import pytest
import uvloop

from kvstore import errors
from kvstore.wire import (FLAG_RESPONSE, HEADER_SIZE, OP_GET, OP_PING, OP_PUT, checksum, decode,
                          encode_request, encode_response)
from kvstored.dataplane import ops
from kvstored.dataplane.connection import RCVLOWAT_PAYLOAD, option_socket, rcvlowat_cap
from kvstored.dataplane.ops import CORE_OPS
from kvstored.dataplane.policy import ConnectionBudget
from kvstored.dataplane.session import DataSession, Plane
from kvstored.dataplane.tcp import DataConnection, DataServer
from kvstored.engine import Store, StoreLimits, entries
from kvstored.engine import store as store_mod
from kvstored.engine.arena import CLASS_CACHE, Arena

MiB = 1 << 20
NS = b"ns"
KINDS = ["dict"] + (["packed"] if entries.make_index("auto").kind == "packed" else [])


def make_store(dram=8 * MiB, slab=1 * MiB, **kw) -> Store:
    return Store(StoreLimits(dram_size=dram, slab_size=slab, max_value_size=slab, hugepages=False,
                             prefault=False, **kw))


def put_frame(rid, key, data, csum=None):
    return encode_request(OP_PUT, rid, NS, key, len(data),
                          checksum(data) if csum is None else csum) + data


def answers(wire: bytearray) -> list:
    out, pos = [], 0
    w = bytes(wire)
    wire.clear()
    while pos < len(w):
        h = decode(w, pos)
        assert h.flags & FLAG_RESPONSE
        out.append((h, w[pos + HEADER_SIZE:pos + HEADER_SIZE + h.length]))
        pos += HEADER_SIZE + h.length
    return out


class Session:
    """A session fed as a driver would, its output collected."""

    def __init__(self, store: Store, budget: ConnectionBudget | None = None):
        self.s = DataSession(Plane(store, CORE_OPS), "unit", budget=budget, client="127.0.0.1")
        self.wire = bytearray()

    def send(self, data: bytes) -> None:
        assert self.s.feed(data) == len(data)
        for _ in range(1000):
            if not self.s.out:
                break
            for b in self.s.take_output():
                self.wire += bytes(b)
            self.s.written(0)
            if self.s.burst_stop:
                self.s.advance()


# ----------------------------------------------------------------- SO_RCVLOWAT

def test_option_socket_over_uvloops_fd_sets_the_option_and_never_closes_it():
    async def run():
        got = []

        class Echo(asyncio.Protocol):
            def connection_made(self, t):
                self.t = t

            def data_received(self, data):
                got.append(data)

        loop = asyncio.get_running_loop()
        srv = await loop.create_server(Echo, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        t, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
        pseudo = t.get_extra_info("socket")
        assert type(pseudo).__name__ == "PseudoSocket"  # uvloop's: a socket object per call
        own = option_socket(pseudo)
        assert isinstance(own, socket.socket) and own.fileno() == pseudo.fileno()
        for n in (1, 300_000, 512 << 10, 1):
            own.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)
            assert pseudo.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == n
        fd = pseudo.fileno()
        own.detach()  # what the connection does at its end: the fd stays the transport's
        del own
        assert os.fstat(fd) is not None
        t.write(b"still open")
        for _ in range(200):
            if got:
                break
            await asyncio.sleep(0.01)
        assert b"".join(got) == b"still open"
        t.close()
        srv.close()
        await srv.wait_closed()

    uvloop.run(run())


def test_option_socket_passes_other_sockets_through():
    class NotUvloop:
        pass

    s = NotUvloop()
    assert option_socket(s) is s
    with socket.socket() as real:
        assert option_socket(real) is real


class Transport:
    """The driver's transport, as far as a put uses it."""

    def __init__(self, sock):
        self.sock = sock
        self.data = bytearray()
        self.closed = False

    def get_extra_info(self, name):
        return {"peername": ("127.0.0.1", 4242), "socket": self.sock}.get(name)

    def writelines(self, bufs):
        for b in bufs:
            self.data += bytes(b)

    def write(self, b):
        self.data += bytes(b)

    def get_write_buffer_size(self):
        return 0

    def set_write_buffer_limits(self, high, low):
        pass

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def close(self):
        self.closed = True

    abort = close


class Sock:
    family, type, proto = socket.AF_INET, socket.SOCK_STREAM, 0

    def __init__(self):
        self.lowats: list[int] = []

    def setsockopt(self, level, name, value):
        if name == socket.SO_RCVLOWAT:
            self.lowats.append(value)


def deliver(c: DataConnection, data: bytes, *, full: bool) -> bytes:
    """One read: ``full`` fills the buffer the connection offers (libuv then reads again
    without epoll), else delivers all of ``data`` into it (which must be shorter)."""
    b = c.get_buffer(-1)
    n = len(b) if full else len(data)
    assert n <= len(data) and (full or n < len(b))
    b[:n] = data[:n]
    c.buffer_updated(n)
    return data[n:]


def test_rcvlowat_is_raised_only_after_a_drained_read_and_lowered_at_once():
    async def run():
        store = make_store(dram=32 * MiB, slab=4 * MiB)
        srv = DataServer(store, max_connections=4, max_inflight_bytes=4 * MiB)
        cap = rcvlowat_cap(srv.limits)
        sock = Sock()
        c = DataConnection(srv)
        t = Transport(sock)
        c.connection_made(t)
        data = random.Random(3).randbytes(3 * MiB)
        rest = put_frame(1, b"big", data)
        # a read that fills the header buffer: the pipe is full, libuv reads on without
        # epoll, so the mark is not raised (it was raised for every put before)
        rest = deliver(c, rest, full=True)
        assert sock.lowats == [] and c.lowat == 1
        # a read into the slot that leaves the socket empty: now the mark goes up
        rest = deliver(c, rest[:200_000], full=False) + rest[200_000:]
        assert sock.lowats == [cap]
        # full reads again, down to 300 000 bytes left: lowered at once to what is left
        while len(rest) > 300_000:
            piece = rest[:min(len(rest) - 300_000, len(c.get_buffer(-1)))]
            b = c.get_buffer(-1)
            b[:len(piece)] = piece
            c.buffer_updated(len(piece))
            rest = rest[len(piece):]
        assert sock.lowats == [cap, 300_000]
        # the last read fills the slot: back to 1 at once, whatever the read's size
        rest = deliver(c, rest, full=True)
        assert rest == b"" and sock.lowats == [cap, 300_000, 1]
        await asyncio.sleep(0)
        assert [(h.req_id, h.status) for h, _ in answers(t.data)] == [(1, 0)]
        # small payloads never touch the option
        small = b"s" * (RCVLOWAT_PAYLOAD - 1)
        rest = put_frame(2, b"small", small)
        for _ in range(1000):
            if not rest:
                break
            rest = deliver(c, rest, full=len(rest) >= len(c.get_buffer(-1)))
        await asyncio.sleep(0)
        assert sock.lowats == [cap, 300_000, 1]
        assert [(h.req_id, h.status) for h, _ in answers(t.data)] == [(2, 0)]
        assert bytes(store.view(store.peek(NS, b"big"))) == data
        c.connection_lost(None)
        assert c.lowat_sock is None
        store.close()

    asyncio.run(run())


def test_connection_detaches_its_option_socket_on_close_and_loss():
    class Own(socket.socket):
        detached = 0

        def detach(self):
            Own.detached += 1
            return super().detach()

    store = make_store()
    srv = DataServer(store, max_connections=4, max_inflight_bytes=4 * MiB)

    async def run():
        for end in ("close", "abort", "lost"):
            raw = socket.socket()
            c = DataConnection(srv)
            c.connection_made(Transport(Sock()))
            c.lowat_sock = Own(fileno=raw.detach())
            c.lowat_own = True
            fd = c.lowat_sock.fileno()
            getattr(c, end)() if end != "lost" else c.connection_lost(None)
            c.connection_lost(None)  # (after close/abort the loop reports the loss too)
            assert c.lowat_sock is None
            os.close(fd)  # still open: the connection let go of it without closing it
        assert Own.detached == 3
        # a transport that hands out its own socket object: that one is never detached
        # (the transport would then leak its fd), only used
        raw = Own()
        c = DataConnection(srv)
        c.connection_made(Transport(Sock()))
        c.lowat_sock, c.lowat_own = raw, False
        c.close()
        c.connection_lost(None)
        assert c.lowat_sock is None and Own.detached == 3 and raw.fileno() >= 0
        raw.close()

    asyncio.run(run())
    store.close()


# ----------------------------------------------------------------- one lookup per put

def test_stored_object_is_answered_as_such_past_the_connection_bound():
    store = make_store()
    data = b"x" * 60_000
    assert store.put_bytes(NS, b"have", data)
    p = Session(store, ConnectionBudget(1 << 30, 64 << 20, max_reserved_bytes=1_000))
    p.send(put_frame(1, b"have", data) + put_frame(2, b"new", data)
           + put_frame(3, b"have", b"y" * 60_000) + encode_request(OP_PING, 4, b"", b""))
    rs = answers(p.wire)
    assert [(h.req_id, h.status, h.aux) for h, _ in rs] == [
        (1, 0, 1), (2, errors.NoSpace.code, 0), (3, errors.NoSpace.code, 0), (4, 0, 0)]
    assert store.counters["dedups"] == 1 and store.peek(NS, b"new") is None
    assert p.s.reserved == 0 and not store.reservations


@pytest.mark.parametrize("kind", KINDS)
def test_put_over_the_wire_is_one_index_lookup(kind, monkeypatch):
    base = type(entries.make_index(kind))

    class Counting(base):
        __slots__ = ("keys",)

        def get(self, ns, key):
            self.keys.append(key)
            return super().get(ns, key)

    def make(_kind, slab_size):
        ix = Counting(slab_size)
        ix.keys = []
        return ix

    monkeypatch.setattr(store_mod, "make_index", make)
    store = make_store()
    p = Session(store)
    data = b"z" * 5000
    p.send(put_frame(1, b"k1", data))
    assert store.index.keys == [b"k1"]  # the session's dedup check was a second one
    store.index.keys.clear()
    p.send(put_frame(2, b"k1", data))  # the same bytes: dedup, from that one lookup
    assert store.index.keys == [b"k1"]
    assert [(h.req_id, h.aux) for h, _ in answers(p.wire)] == [(1, 0), (2, 1)]
    store.close()


def test_buffered_put_is_committed_uncounted_and_a_split_one_is_counted():
    store = make_store()
    p = Session(store)
    data = random.Random(4).randbytes(50_000)
    split = put_frame(2, b"b", data)
    # the whole first put is buffered: committed within the call, never counted; the
    # second stops mid-payload: its reservation counts against connection and client
    p.send(put_frame(1, b"a", data) + split[:HEADER_SIZE + 1 + 100])
    assert p.s.reserved == len(data) and p.s.clients.held == {"127.0.0.1": len(data)}
    assert p.s.res is not None and p.s.res.held and p.s.res.deadline <= p.s.put_cap
    p.send(split[HEADER_SIZE + 1 + 100:])
    assert p.s.reserved == 0 and p.s.clients.held == {}
    # a buffered put with a bad checksum: refused, nothing stored, nothing left counted
    p.send(put_frame(3, b"c", data, csum=checksum(data) ^ 1) + put_frame(4, b"a", data))
    rs = answers(p.wire)
    assert [(h.req_id, h.status, h.aux) for h, _ in rs] == [
        (1, 0, 0), (2, 0, 0), (3, errors.ChecksumMismatch.code, 0), (4, 0, 1)]
    assert p.s.reserved == 0 and p.s.clients.held == {} and not store.reservations
    assert store.peek(NS, b"c") is None
    assert bytes(store.view(store.peek(NS, b"b"))) == data
    # a buffered put larger than the connection's bound is still refused
    q = Session(store, ConnectionBudget(1 << 30, 64 << 20, max_reserved_bytes=10_000))
    q.send(put_frame(5, b"d", data))
    assert [(h.req_id, h.status) for h, _ in answers(q.wire)] == [(5, errors.NoSpace.code)]
    assert store.peek(NS, b"d") is None
    store.close()


# ----------------------------------------------------------------- answers and classes

def test_put_answer_template_matches_the_codec():
    rng = random.Random(5)
    for rid in [0, 1, 255, 1 << 32, (1 << 64) - 1] + [rng.getrandbits(64) for _ in range(200)]:
        assert ops._put_ok(ops._PUT_OK_HEAD, rid, ops._PUT_OK_TAIL) == encode_response(OP_PUT, rid)


def test_class_cache_agrees_with_the_search_and_is_bounded():
    a = Arena(16 * MiB, 1 * MiB, hugepages=False)
    try:
        fresh = Arena(16 * MiB, 1 * MiB, hugepages=False)
        try:
            rng = random.Random(9)
            sizes = [0, 1, 255, 256, 257, 4095, 4096, 4097, MiB - 1, MiB]
            sizes += [rng.randrange(1, MiB + 1) for _ in range(CLASS_CACHE + 500)]
            for sz in sizes:
                assert a.class_for(sz) is a.classes[fresh.classes.index(fresh.class_for(sz))]
                fresh.class_by_size.clear()  # the reference answer: always the search
            assert len(a.class_by_size) == CLASS_CACHE
            for _ in range(2):  # too large: refused each time, never remembered
                with pytest.raises(ValueError):
                    a.class_for(MiB + 1)
            assert MiB + 1 not in a.class_by_size
        finally:
            fresh.close()
    finally:
        a.close()


# ----------------------------------------------------------------- under eviction

def test_interleaved_sessions_under_eviction_store_only_whole_verified_objects():
    store = make_store(dram=4 * MiB, slab=1 * MiB)
    sessions = [Session(store) for _ in range(3)]
    rng = random.Random(11)
    expect: dict[bytes, bytes] = {}
    bad: set[bytes] = set()
    pending = []
    for i in range(600):
        key = f"k{i}".encode()
        data = rng.randbytes(rng.choice([700, 5000, 16_384, 60_000]))
        corrupt = i % 17 == 0
        frame = put_frame(i + 1, key, data, csum=checksum(data) ^ 1 if corrupt else None)
        if corrupt:
            bad.add(key)
        else:
            expect[key] = data
        p = sessions[i % 3]
        cut = rng.randrange(1, len(frame))
        p.send(frame[:cut])  # a put split across reads, the other sessions going on meanwhile
        pending.append((p, frame[cut:]))
        if len(pending) == 3:
            for q, tail in pending:
                q.send(tail)
            pending.clear()
    for q, tail in pending:
        q.send(tail)
    got = {}
    for p in sessions:
        for h, body in answers(p.wire):
            got[h.req_id] = h.status
        assert p.s.reserved == 0 and p.s.res is None
    assert len(got) == 600
    for i in range(600):
        key = f"k{i}".encode()
        want = errors.ChecksumMismatch.code if key in bad else 0
        assert got[i + 1] == want, (i, got[i + 1])
    assert store.counters["evictions"] > 0 and not store.reservations
    assert store.counters["checksum_failures"] == len(bad)
    held = 0
    for key, data in expect.items():
        e = store.peek(NS, key)
        if e is not None:  # evicted ones are gone whole; the rest read back exactly
            held += 1
            assert bytes(store.view(e)) == data and e.checksum == checksum(data)
    for key in bad:
        assert store.peek(NS, key) is None
    assert held == store.object_count() and 0 < held < len(expect)
    assert store.arena.used_bytes <= store.arena.size
    # every stored object is also served whole through a session
    q = Session(store)
    some = [k for k in expect if store.peek(NS, k) is not None][:20]
    q.send(b"".join(encode_request(OP_GET, 1000 + j, NS, k) for j, k in enumerate(some)))
    rs = answers(q.wire)
    assert [body for _, body in rs] == [expect[k] for k in some]
    assert not q.s.pending  # (written(0): the reads were released)
    store.close()
