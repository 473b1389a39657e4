"""The SDK never allocates, receives or discards what a bad response header claims
(wire.check_response, the one check of every reader): an error message longer than
MAX_ERROR_MESSAGE, a GET payload over the daemon's max_value_size, an answer whose op
does not answer the request or is unknown, a payload on an answer that carries none,
names on a response, an unknown request id. Each is a ProtocolError naming the field
and value, at once (not after the timeout), without the process's memory growing, and
the connection is dropped: the next call goes over a fresh one.

The daemon is real; what damages the answers is a proxy between the SDK and the
daemon's data port that rewrites one response header in flight (a corrupted stream,
another service on the port, a misbehaving node), for Client, AsyncClient and
ClusterClient's fanned-out batch get, alone and with other threads / tasks busy."""
from __future__ import annotations

import asyncio
import os
import socket
import threading
import time

import pytest
import relayutil
from threadutil import run_threads

import kvstore
from kvstore import errors
from kvstore.cluster import ClusterClient
from kvstore.wire import (HEADER, HEADER_SIZE, MAGIC, OP_GET, OP_PING, OP_PUT, OP_RDMA_GET, OP_RDMA_PUT,
                          OP_SHM_GET, SHM_IDS, VERSION, check_response, decode)

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
TIMEOUT = 5.0  # the clients'; every refusal must come well within it
FAST = TIMEOUT / 2
RSS_GROWTH = 100 * MiB
NS = "rb"
KEY, VALUE = b"present", os.urandom(MiB + 3)


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class TamperProxy(relayutil.Relay):
    """Relays TCP connections to ``target``. The daemon's answers are parsed frame by frame
    (header, then its payload as the daemon sent it); once ``arm(rule)`` is called, the
    first header for which ``rule(header)`` returns a new one is sent rewritten (once).
    Threads end with their sockets; ``close`` shuts every socket down and joins them."""

    def __init__(self, target: tuple[str, int]):
        self.fired = 0
        self._rule = None
        self._lock = threading.Lock()
        super().__init__(target, timeout=30)

    def arm(self, rule) -> None:
        with self._lock:
            self._rule = rule

    def _rewrite(self, h):
        with self._lock:
            if self._rule is None:
                return None
            new = self._rule(h)
            if new is not None:
                self._rule = None
                self.fired += 1
            return new

    @staticmethod
    def _exact(sock: socket.socket, n: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            got = sock.recv(min(n - len(buf), 1 << 20))
            if not got:
                return None
            buf += got
        return bytes(buf)

    def down(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self._stop.is_set():
                raw = self._exact(src, HEADER_SIZE)
                if raw is None:
                    break
                h = decode(raw)
                new = self._rewrite(h)
                dst.sendall(raw if new is None else HEADER.pack(MAGIC, VERSION, *new))
                left = h.length  # the payload the daemon sent, as it sent it
                while left:
                    data = src.recv(min(left, 1 << 20))
                    if not data:
                        raise ConnectionResetError
                    dst.sendall(data)
                    left -= len(data)
        except OSError:
            pass
        self.shut(src, dst)


@pytest.fixture
def daemon(shared_daemon):
    """The module's tests share one kvstored (4 MiB max_value_size), emptied before each."""
    return shared_daemon


@pytest.fixture
def proxy(daemon):
    p = TamperProxy(("127.0.0.1", daemon.data_port))
    yield p
    p.close()


# ---- rules: a response header -> the header to send instead, or None (not this one)
def error_length(n):
    return lambda h: h._replace(length=n) if h.status else None


def get_length(n):
    return lambda h: h._replace(length=n) if h.op == OP_GET and not h.status else None


def get_field(**kw):
    return lambda h: h._replace(**kw) if h.op == OP_GET and not h.status else None


def answer_length(op, n):
    return lambda h: h._replace(length=n) if h.op == op and not h.status else None


def get_with_names(h):
    if h.op != OP_GET or h.status:
        return None
    return h._replace(ns_len=3)


# the call that meets the damaged answer (with the Client's max_value_size, ``m``)
def c_get_absent(c, m):
    return c.get(b"absent")


def c_get(c, m):
    return c.get(KEY)


def c_get_into(c, m):
    return c.get_into(KEY, bytearray(len(VALUE)))


def c_batch_get(c, m):
    return c.batch_get([b"other", KEY])


def c_batch_get_into(c, m):
    return c.batch_get_into([b"other", KEY], [bytearray(len(VALUE)), bytearray(len(VALUE))])


def c_put(c, m):
    return c.put(b"fresh", b"x" * 100)


def c_ping(c, m):
    return c.ping()


GiB, TiB = 1 << 30, 1 << 40
CASES = {
    # an error response claiming a huge message (the daemon truncates to 1024 bytes)
    "error-1GiB": (error_length(GiB), c_get_absent, f"length={GiB}"),
    "error-1TiB": (error_length(TiB), c_get_absent, f"length={TiB}"),
    "error-1025": (error_length(1025), c_get_absent, "length=1025"),
    # a GET answer over max_value_size: into a new buffer, into the caller's (which was
    # discarded when too small), in a batch
    "get-max+1": (None, c_get, "max_value_size"),
    "get-1GiB-batch": (get_length(GiB), c_batch_get, f"length={GiB}"),
    "get_into-1TiB": (get_length(TiB), c_get_into, f"length={TiB}"),
    "batch_get_into-1TiB": (get_length(TiB), c_batch_get_into, f"length={TiB}"),
    # an op that does not answer the request, an unknown op
    "get-answered-as-put": (get_field(op=OP_PUT), c_get, "op=1 .put., which does not answer"),
    "unknown-op": (get_field(op=99), c_get, "unknown op=99"),
    # a length on an answer that carries none
    "put-with-payload": (answer_length(OP_PUT, GiB), c_put, f"length={GiB}"),
    "ping-with-payload": (answer_length(OP_PING, 8), c_ping, "length=8"),
    # names on a response, an answer to no request
    "names": (get_with_names, c_get, "ns_len=3"),
    "unknown-request-id": (get_field(req_id=777_777), c_get, "unknown request id 777777"),
}


def _client(daemon, proxy, **kw) -> kvstore.Client:
    return kvstore.Client(daemon.control, namespace=NS, timeout=TIMEOUT, transport="tcp",
                          data_address=proxy.address, **kw)


@pytest.mark.parametrize("case", list(CASES))
def test_client_refuses_a_bad_header_at_once_and_reconnects(daemon, proxy, case):
    rule, call, match = CASES[case]
    with _client(daemon, proxy) as c:
        m = c.info().max_value_size
        assert m == 4 * MiB
        if rule is None:
            rule = get_length(m + 1)
        c.batch_put([(KEY, VALUE), (b"other", b"o")])
        assert proxy.accepted == 1
        proxy.arm(rule)
        before, t0 = rss(), time.monotonic()
        with pytest.raises(errors.ProtocolError, match=match) as ei:
            call(c, m)
        took = time.monotonic() - t0
        assert proxy.fired == 1
        assert took < FAST, f"refused after {took:.2f}s"
        assert rss() - before < RSS_GROWTH
        assert not isinstance(ei.value, errors.Timeout)
        # the connection is dropped, never reused: the next call goes over a fresh one
        assert c.get(KEY) == VALUE
        assert proxy.accepted == 2
        if call is c_put:
            assert c.get(b"fresh") == b"x" * 100  # the put itself was stored
        with pytest.raises(errors.NotFound):
            c.get(b"absent")
        c.ping()
        assert proxy.accepted == 2


def test_a_get_first_client_learns_the_limit_before_its_first_get(daemon, proxy):
    """A Client given data_address whose first call is a get (no Info asked yet): the
    channel is set up first, then gets the daemon's max_value_size before the get."""
    with kvstore.Client(daemon.control, namespace=NS, timeout=TIMEOUT, shm=False) as w:
        w.put(KEY, VALUE)
        m = w.info().max_value_size
    with _client(daemon, proxy) as c:
        assert c._info is None
        proxy.arm(get_length(m + 1))
        t0 = time.monotonic()
        with pytest.raises(errors.ProtocolError, match=f"length={m + 1}"):
            c.get(KEY)
        assert time.monotonic() - t0 < FAST
        assert c.get(KEY) == VALUE and proxy.accepted == 2


def test_a_good_stream_through_the_proxy_is_untouched(daemon, proxy):
    """The proxy without a rule: every call as direct (the control case of the above)."""
    with _client(daemon, proxy) as c:
        big = os.urandom(c.info().max_value_size)  # the largest object is not refused
        c.put(KEY, VALUE)
        c.put(b"big", big)
        assert c.get(b"big") == big
        assert c.batch_get([KEY, b"big"]) == [VALUE, big]
        buf = bytearray(len(big))
        assert c.get_into(b"big", buf) == len(big) and buf == big
        with pytest.raises(errors.InvalidArgument, match="does not fit"):
            c.get_into(b"big", bytearray(10))  # too small: discarded, the stream in step
        assert c.get(KEY) == VALUE
        assert proxy.accepted == 1 and proxy.fired == 0


def test_threads_one_hit_the_others_unaffected(daemon, proxy):
    """Four threads share one Client (each its own connection through the proxy); the
    first GET answer of any of them claims 1 TiB. Exactly one get fails with
    ProtocolError, at once; every other get of every thread returns the object, and the
    hit thread carries on over a fresh connection."""
    rounds, n = 15, 4
    with _client(daemon, proxy) as c:
        c.put(KEY, VALUE)
        proxy.arm(get_length(TiB))
        results: list[list] = [[] for _ in range(n)]
        start = threading.Barrier(n)

        def work(t: int) -> None:
            start.wait(10)
            for _ in range(rounds):
                t0 = time.monotonic()
                try:
                    results[t].append(c.get(KEY) == VALUE)
                except errors.KVStoreError as e:
                    results[t].append((type(e), time.monotonic() - t0))

        before = rss()
        run_threads(work, range(n), timeout=60)
        assert rss() - before < RSS_GROWTH
        flat = [r for rs in results for r in rs]
        errs = [r for r in flat if r is not True]
        assert len(flat) == rounds * n
        assert len(errs) == 1 and errs[0][0] is errors.ProtocolError and errs[0][1] < FAST, errs
        assert proxy.fired == 1 and proxy.accepted == n + 2  # + the main thread's put, + the reconnect


# ---- AsyncClient
def _aclient(daemon, proxy) -> kvstore.AsyncClient:
    return kvstore.AsyncClient(daemon.control, namespace=NS, timeout=TIMEOUT,
                               data_address=proxy.address)


async def a_get_absent(c, m):
    return await c.get(b"absent")


async def a_get(c, m):
    return await c.get(KEY)


async def a_get_into(c, m):
    return await c.get_into(KEY, bytearray(len(VALUE)))


async def a_batch_get(c, m):
    return await c.batch_get([b"other", KEY])


async def a_put(c, m):
    return await c.put(b"fresh", b"x" * 100)


async def a_ping(c, m):
    return await c.ping()


ACASES = {
    "error-1TiB": (error_length(TiB), a_get_absent, f"length={TiB}"),
    "error-1025": (error_length(1025), a_get_absent, "length=1025"),
    "get-max+1": (None, a_get, "max_value_size"),
    "batch_get-1GiB": (get_length(GiB), a_batch_get, f"length={GiB}"),
    "get_into-1TiB": (get_length(TiB), a_get_into, f"length={TiB}"),
    "get-answered-as-put": (get_field(op=OP_PUT), a_get, "does not answer"),
    "unknown-op": (get_field(op=99), a_get, "unknown op=99"),
    "put-with-payload": (answer_length(OP_PUT, GiB), a_put, f"length={GiB}"),
    "ping-with-payload": (answer_length(OP_PING, 8), a_ping, "length=8"),
    "names": (get_with_names, a_get, "ns_len=3"),
}


@pytest.mark.parametrize("case", list(ACASES))
def test_async_client_refuses_a_bad_header_at_once_and_reconnects(daemon, proxy, case):
    rule, call, match = ACASES[case]

    async def main() -> None:
        async with _aclient(daemon, proxy) as c:
            m = (await c.info()).max_value_size
            await c.batch_put([(KEY, VALUE), (b"other", b"o")])
            assert proxy.accepted == 1
            proxy.arm(rule or get_length(m + 1))
            before, t0 = rss(), time.monotonic()
            with pytest.raises(errors.ProtocolError, match=match):
                await call(c, m)
            assert time.monotonic() - t0 < FAST
            assert rss() - before < RSS_GROWTH
            assert proxy.fired == 1
            assert await c.get(KEY) == VALUE  # a fresh connection
            assert proxy.accepted == 2
            with pytest.raises(errors.NotFound):
                await c.get(b"absent")
            assert proxy.accepted == 2

    asyncio.run(asyncio.wait_for(main(), 60))


def test_async_tasks_one_hit_the_others_unaffected(daemon, proxy):
    """Eight tasks get at once over the AsyncClient's one connection; the first GET answer
    claims 1 TiB. That get fails with ProtocolError; the other seven, whose answers can no
    longer be read from that stream, are retried over a fresh connection and return the
    object."""
    async def main() -> None:
        async with _aclient(daemon, proxy) as c:
            await c.put(KEY, VALUE)
            assert await c.get(KEY) == VALUE
            proxy.arm(get_length(TiB))
            before = rss()
            got = await asyncio.gather(*(c.get(KEY) for _ in range(8)), return_exceptions=True)
            assert rss() - before < RSS_GROWTH
            bad = [g for g in got if not isinstance(g, (bytes, bytearray))]
            assert len(bad) == 1 and isinstance(bad[0], errors.ProtocolError), got
            assert all(g == VALUE for g in got if g is not bad[0])
            assert proxy.fired == 1 and proxy.accepted == 2
            assert await c.batch_get([KEY, KEY]) == [VALUE, VALUE]

    asyncio.run(asyncio.wait_for(main(), 60))


# ---- ClusterClient, fanned-out batch get (channel.GetReader)
@pytest.mark.parametrize("rule, into, absent, match", [
    (get_length(TiB), False, False, f"length={TiB}"),
    (get_length(TiB), True, False, f"length={TiB}"),  # into buffers: was a 1 TiB skip
    (None, False, False, "max_value_size"),
    (error_length(TiB), False, True, f"length={TiB}"),  # the absent key's NotFound
    (get_field(op=OP_PUT), False, False, "does not answer"),
], ids=["get-1TiB", "get_into-1TiB", "get-max+1", "error-1TiB", "get-answered-as-put"])
def test_cluster_fanned_out_batch_get_refuses_a_bad_header(daemon, proxy, rule, into, absent, match):
    """One node behind the proxy, read by ClusterClient's fanned-out batch get: the bad
    answer fails the batch with ProtocolError at once (as the pool path does), and the
    next batch goes over a fresh connection, fanned out again."""
    objs = {f"c{i}".encode(): os.urandom(300_000 + i) for i in range(6)}
    keys = list(objs)
    with ClusterClient([daemon.control], policy="none", namespace=NS, fanout_gets=True,
                       node_timeout=TIMEOUT, shm=False, data_address=proxy.address) as cc:
        assert all(cc.batch_put(list(objs.items())))
        assert [bytes(b) for b in cc.batch_get(keys)] == list(objs.values())
        m = cc.client(cc.members()[0]).info().max_value_size
        conns = proxy.accepted
        ask = keys + [b"absent"] if absent else keys
        proxy.arm(rule or get_length(m + 1))
        before, t0 = rss(), time.monotonic()
        with pytest.raises(errors.ProtocolError, match=match):
            if into:
                cc.batch_get_into(ask, [bytearray(400_000) for _ in ask])
            else:
                cc.batch_get(ask)
        assert time.monotonic() - t0 < FAST
        assert rss() - before < RSS_GROWTH
        assert proxy.fired == 1
        # dropped: the next batch is fanned out again over a fresh connection
        assert [bytes(b) for b in cc.batch_get(keys)] == list(objs.values())
        assert proxy.accepted == conns + 1
        assert cc.pooled_get_jobs == 0



# ---- the check itself, at its bounds (the same function every reader calls)
@pytest.mark.parametrize("args, ok", [
    ((OP_GET, 0, 0, 0, 4 * MiB, 4 * MiB, OP_GET), True),  # the largest object
    ((OP_GET, 0, 0, 0, 4 * MiB + 1, 4 * MiB, OP_GET), False),
    ((OP_GET, 5, 0, 0, 1024, 4 * MiB, OP_GET), True),  # an error message at the cap
    ((OP_GET, 5, 0, 0, 1025, 4 * MiB, OP_GET), False),
    ((0, 7, 0, 0, 100, 4 * MiB, OP_GET), True),  # a connection-level error (op 0)
    ((OP_PUT, 0, 0, 0, 0, 4 * MiB, OP_PUT), True),
    ((OP_PUT, 0, 0, 0, 1, 4 * MiB, OP_PUT), False),
    ((OP_SHM_GET, 0, 0, 0, SHM_IDS.size, 4 * MiB, OP_SHM_GET), True),
    ((OP_SHM_GET, 0, 0, 0, SHM_IDS.size + 1, 4 * MiB, OP_SHM_GET), False),
    ((OP_RDMA_GET, 0, 0, 0, 8, 4 * MiB, (OP_GET, OP_RDMA_GET)), True),
    ((OP_RDMA_PUT, 0, 0, 0, 0, 4 * MiB, (OP_GET, OP_RDMA_GET)), False),
    ((OP_GET, 0, 0, 1, 0, 4 * MiB, None), False),  # a key on a response
    ((200, 0, 0, 0, 0, 4 * MiB, None), False),
])
def test_check_response_bounds(args, ok):
    op, status, ns_len, key_len, length, limit, expect = args
    if ok:
        check_response(op, 9, status, ns_len, key_len, length, limit, expect)
    else:
        with pytest.raises(errors.ProtocolError) as ei:
            check_response(op, 9, status, ns_len, key_len, length, limit, expect)
        assert ei.value.request_id == 9 and "response 9" in ei.value.message


def test_shm_get_claiming_more_than_max_value_size(daemon, monkeypatch):
    """Same host: an SHM_GET answer's ids (read from the frame's payload; no proxy can sit
    on the Unix socket, so they are altered as they are unpacked) claiming an object over
    max_value_size, inside the arena: ProtocolError before copy_out allocates, and a fresh
    connection next."""
    from kvstore import shm

    with kvstore.Client(daemon.control, namespace=NS, timeout=TIMEOUT, shm=True) as c:
        objs = [(b"s%d" % i, os.urandom(300_000)) for i in range(3)]
        c.batch_put(objs)
        assert c.transport == "shm"
        first = c._channel_here()
        real, hit = shm.SHM_IDS, []

        claim = 4 * c.info().max_value_size
        assert claim <= len(first.view)  # inside the arena (64 MiB): only the new bound refuses it

        class Claim:  # SHM_IDS whose first unpack claims 4 x max_value_size from offset 0
            size = real.size

            @staticmethod
            def unpack_from(buf, offset=0):
                offset_, size, lease = real.unpack_from(buf, offset)
                if not hit:
                    hit.append(size)
                    offset_, size = 0, claim
                return offset_, size, lease

        monkeypatch.setattr(shm, "SHM_IDS", Claim)
        before = rss()
        with pytest.raises(errors.ProtocolError, match=f"size={claim}"):
            c.batch_get([k for k, _ in objs])
        assert rss() - before < RSS_GROWTH and hit
        assert c.batch_get([k for k, _ in objs]) == [v for _, v in objs]
        assert c._channel_here() is not first
