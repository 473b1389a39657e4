"""The data session with bytes alone: no sockets, a real in-memory Store.

A tiny harness plays the transport: it feeds request bytes, collects the
session's output, runs its store calls and reports what a driver would.
"""
from __future__ import annotations

import asyncio
import random
import time

import pytest

from kvstore import errors
from kvstore.wire import (FLAG_CHECKSUM_UNKNOWN, FLAG_OVERWRITE, HEADER_SIZE, OP_AUTH, OP_GET,
                          OP_PING, OP_PUT, OP_SHM_COMMIT, OP_SHM_GET, OP_SHM_RELEASE,
                          OP_SHM_RESERVE, SHM_IDS, FLAG_RESPONSE, checksum, decode, encode_auth,
                          encode_request)
from kvstored.auth import Auth
from kvstored.dataplane.policy import ConnectionBudget, EpochGate
from kvstored.dataplane.ops import CORE_OPS
from kvstored.dataplane.session import (DISCARD_LIMIT, HEADER_WINDOW, LARGE_PAYLOAD, DataSession,
                                        OpTable, Plane)
from kvstored.engine import Store, StoreLimits
from fakes import Clock

MiB = 1 << 20
NS = b"ns"


def make_store(clock=None, **kw) -> Store:
    args = dict(dram_size=8 * MiB, slab_size=1 * MiB, max_value_size=1 * MiB, hugepages=False,
                prefault=False, reservation_timeout=30.0, put_wait_timeout=0.3)
    args.update(kw)
    return Store(StoreLimits(**args), clock=clock or Clock())


class Peer:
    """Plays the transport around one session."""

    def __init__(self, store: Store, *, ops: OpTable = CORE_OPS, auth: Auth | None = None,
                 epoch: int = 0, max_pipelined: int = 1 << 30, burst: int = 64 << 20):
        self.plane = Plane(store, ops, gate=EpochGate(epoch), auth=auth,
                           max_pipelined=max_pipelined, burst=burst)
        self.woken = 0
        self.s: DataSession = DataSession(self.plane, "unit-test", wake=self._wake)
        self.wire = bytearray()  # everything the session sent
        self.unsent = 0  # bytes the "transport" still holds (get views not yet released)

    def _wake(self):
        self.woken += 1

    def send(self, data: bytes) -> int:
        """Feed bytes as a socket would; returns how many the session took."""
        n = self.s.feed(data)
        self.flush()
        return n

    def flush(self) -> None:
        s = self.s
        for _ in range(10_000):
            if not s.out:
                break
            for b in s.take_output():
                self.wire += bytes(b)
            s.written(self.unsent)
            if s.burst_stop:
                s.advance()

    def run_calls(self) -> int:
        """Await the session's store calls (as the driver's tasks would)."""
        calls = self.s.take_calls()

        async def run(call):
            try:
                r = await call.fn(*call.args)
            except errors.KVStoreError as e:
                self.s.call_done(call, None, e)
            else:
                self.s.call_done(call, r, None)

        async def all_():
            for c in calls:
                await run(c)

        asyncio.run(all_())
        self.flush()
        return len(calls)

    def responses(self) -> list:
        """(header, payload) of every whole response sent so far (consumed)."""
        out, w, pos = [], bytes(self.wire), 0
        self.wire.clear()
        while pos < len(w):
            h = decode(w, pos)
            assert h.flags & FLAG_RESPONSE and h.ns_len == h.key_len == 0
            end = pos + HEADER_SIZE + h.length
            assert end <= len(w), "a response is sent whole"
            out.append((h, w[pos + HEADER_SIZE:end]))
            pos = end
        return out

    def one(self):
        rs = self.responses()
        assert len(rs) == 1, rs
        return rs[0]


def put_frame(rid, key, data, ns=NS, flags=0, epoch=0, csum=None):
    return encode_request(OP_PUT, rid, ns, key, len(data),
                          checksum(data) if csum is None else csum, flags, epoch) + data


def get_frame(rid, key, ns=NS, epoch=0):
    return encode_request(OP_GET, rid, ns, key, epoch=epoch)


@pytest.fixture
def store():
    s = make_store()
    yield s
    s.close()


def test_put_get_ping(store):
    p = Peer(store)
    data = random.Random(1).randbytes(300_000)
    p.send(put_frame(1, b"k", data))
    h, body = p.one()
    assert (h.op, h.req_id, h.status, h.aux) == (OP_PUT, 1, 0, 0)
    p.send(put_frame(2, b"k", data))  # the same bytes again: deduplicated, payload skipped
    h, _ = p.one()
    assert (h.req_id, h.status, h.aux) == (2, 0, 1)
    p.send(get_frame(3, b"k") + encode_request(OP_PING, 4, b"", b""))
    (g, gbody), (ping, _) = p.responses()
    assert (g.op, g.req_id, g.status, g.checksum) == (OP_GET, 3, 0, checksum(data))
    assert gbody == data
    assert (ping.op, ping.req_id, ping.status) == (OP_PING, 4, 0)
    assert p.plane.latency[OP_GET].count == 1 and p.plane.latency[OP_PUT].count == 2
    p.send(get_frame(5, b"missing"))
    h, msg = p.one()
    assert h.status == errors.NotFound.code and msg


def test_payload_lands_in_the_slot_without_a_staging_copy(store):
    """The receive buffer offered while a put's payload arrives is the arena slot itself."""
    p = Peer(store)
    data = bytes(range(256)) * 1024
    p.send(put_frame(1, b"zc", data)[:HEADER_SIZE + 4])  # header, ns, key; no payload yet
    view = p.s.receive_buffer()
    assert len(view) == len(data)
    arena = store.arena.view
    assert view.obj is arena.obj  # a view of the arena's own memory
    assert p.responses() == []
    p.send(data)
    assert p.one()[0].status == 0


def test_header_reads_after_a_large_put_take_a_window():
    """After a put of LARGE_PAYLOAD bytes or more, reads between payloads offer at most
    HEADER_WINDOW bytes (the next large payload then goes from the socket into its slot);
    a smaller put lifts the bound. A pipelined stream of large and small puts, fed in
    random chunks, still stores every object and answers every request in order."""
    store = make_store(dram_size=16 * MiB, max_value_size=1 * MiB)
    try:
        p = Peer(store)
        big = random.Random(2).randbytes(LARGE_PAYLOAD)
        assert len(p.s.receive_buffer()) > HEADER_WINDOW  # no bound before any put
        p.send(put_frame(1, b"big", big))
        assert p.one()[0].status == 0
        assert len(p.s.receive_buffer()) == HEADER_WINDOW
        p.send(put_frame(2, b"small", b"x" * 100))
        assert p.one()[0].status == 0
        assert len(p.s.receive_buffer()) > HEADER_WINDOW
        rng = random.Random(3)
        blobs = {i: rng.randbytes(LARGE_PAYLOAD + i * 4099 if i % 3 else 1000 + i)
                 for i in range(12)}
        stream = b"".join(put_frame(10 + i, b"w%d" % i, b) for i, b in blobs.items())
        stream += b"".join(get_frame(40 + i, b"w%d" % i) for i in blobs)
        pos = 0
        for _ in range(len(stream)):  # each round takes >= 1 byte
            if pos == len(stream):
                break
            n = rng.choice((1, 37, HEADER_WINDOW + 1, 70_000, 300_000))
            took = p.send(stream[pos:pos + n])
            assert took == min(n, len(stream) - pos)
            pos += took
        assert pos == len(stream)
        rs = p.responses()
        assert [(h.req_id, h.status) for h, _ in rs[:12]] == [(10 + i, 0) for i in range(12)]
        assert {h.req_id: bytes(b) for h, b in rs[12:]} == {40 + i: b for i, b in blobs.items()}
    finally:
        store.close()


def test_pipelined_byte_at_a_time_and_out_of_order(store):
    """Requests split at every byte still parse; answers carry their ids."""
    p = Peer(store)
    stream = bytearray()
    blobs = {i: random.Random(i).randbytes(1000 + i) for i in range(20)}
    for i, b in blobs.items():
        stream += put_frame(100 + i, b"k%d" % i, b)
    for i in reversed(range(20)):
        stream += get_frame(200 + i, b"k%d" % i)
    for i in range(len(stream)):
        assert p.send(stream[i:i + 1]) == 1
    rs = p.responses()
    assert [h.req_id for h, _ in rs[:20]] == [100 + i for i in range(20)]
    gets = {h.req_id: body for h, body in rs[20:]}
    assert gets == {200 + i: blobs[i] for i in range(20)}


def test_get_from_nvme_answers_out_of_order():
    pytest.importorskip("kvstored.engine.nvme")
    # an object the store must load first goes out as a Call; later requests are answered
    # meanwhile, so the get's answer follows them (responses carry the request id)
    store = make_store()
    try:
        p = Peer(store)
        p.send(put_frame(1, b"a", b"x" * 100))
        p.responses()
        e = store.index[(NS, b"a")]
        orig = store.acquire

        def not_resident(ns, key):
            from kvstored.engine.store import NotResident
            if key == b"a":
                raise NotResident(e)
            return orig(ns, key)

        async def load(ns, key):
            return orig(ns, key)

        store.acquire, store.acquire_async = not_resident, load
        p.send(get_frame(2, b"a") + encode_request(OP_PING, 3, b"", b""))
        assert [h.req_id for h, _ in p.responses()] == [3]
        assert p.s.loads == 1 and not p.s.idle()
        assert p.run_calls() == 1
        h, body = p.one()
        assert (h.req_id, body) == (2, b"x" * 100)
        assert p.s.loads == 0 and p.s.idle()
    finally:
        store.close()


def test_auth(store, tmp_path):
    f = tmp_path / "tokens.toml"
    f.write_text('[[token]]\nname = "w"\ntoken = "writer-token-0123456789"\n'
                 'namespaces = ["ns"]\nscopes = ["read", "write"]\n'
                 '[[token]]\nname = "r"\ntoken = "reader-token-0123456789"\n'
                 'namespaces = ["ns"]\nscopes = ["read"]\n')
    auth = Auth(str(f))
    p = Peer(store, auth=auth)
    p.send(encode_request(OP_PING, 1, b"", b"") + put_frame(2, b"k", b"v" * 10))
    (ping, _), (put, _) = p.responses()
    assert ping.status == errors.PermissionDenied.code and put.status == errors.PermissionDenied.code
    assert p.plane.counters["auth_rejected_no_token"] == 2
    p.send(encode_auth(3, "reader-token-0123456789") + put_frame(4, b"k", b"v" * 10)
           + put_frame(5, b"k", b"v", ns=b"other"))
    (a, _), (put, msg), (other, msg2) = p.responses()
    assert a.status == 0
    assert put.status == errors.PermissionDenied.code and b"write" in msg
    assert other.status == errors.PermissionDenied.code and b"other" in msg2
    assert p.plane.counters["auth_rejected_scope"] == 1
    assert p.plane.counters["auth_rejected_namespace"] == 1
    p.send(encode_auth(6, "writer-token-0123456789") + put_frame(7, b"k", b"v" * 10))
    assert [h.status for h, _ in p.responses()] == [0, 0]
    # a token the daemon does not know: an error, then the connection is closed
    p.send(encode_auth(8, "not-a-token-at-all"))
    h, _ = p.one()
    assert h.status == errors.PermissionDenied.code and p.s.finish == "close"


def test_auth_frame_malformed(store):
    p = Peer(store)
    p.send(encode_request(OP_AUTH, 1, NS, b"", 5) + b"token" + encode_request(OP_PING, 2, b"", b""))
    (a, msg), (ping, _) = p.responses()
    assert a.status == errors.InvalidArgument.code and b"token" in msg
    assert ping.status == 0  # the token bytes were skipped; the stream goes on


def test_epoch_redirect(store):
    p = Peer(store, epoch=0x1234)
    data = b"d" * 5000
    p.send(put_frame(1, b"k", data, epoch=0x9999) + get_frame(2, b"k", epoch=0x9999)
           + put_frame(3, b"k", data, epoch=0x1234) + put_frame(4, b"j", data))
    rs = p.responses()
    assert [(h.req_id, h.status) for h, _ in rs] == [
        (1, errors.Redirect.code), (2, errors.Redirect.code), (3, 0), (4, 0)]
    assert b"refresh the member list" in rs[0][1]
    p.plane.gate.epoch = 0x9999  # membership moved on: the old epoch is the stale one now
    p.send(get_frame(5, b"k", epoch=0x1234))
    assert p.one()[0].status == errors.Redirect.code


@pytest.mark.parametrize("bad, fragment", [
    (b"XXXX" + bytes(36), "magic"),
    (b"GET / HTTP/1.1\r\n\r\n" + bytes(30), "magic"),
    (encode_request(OP_PING, 1, b"", b"")[:4] + b"\x09" + bytes(35), "version"),
    (encode_request(OP_GET, 1, NS, b"k", payload_len=3) + b"abc", "carries no payload"),
    (encode_request(OP_PING, 1, b"", b"", payload_len=1) + b"x", "carries no payload"),
])
def test_malformed_frames_are_fatal(store, bad, fragment):
    p = Peer(store)
    p.send(bad + encode_request(OP_PING, 7, b"", b""))
    h, msg = p.one()
    assert h.status == errors.ProtocolError.code and fragment in msg.decode()
    assert p.s.closed and p.s.finish == "close"
    assert p.plane.counters["errors_ProtocolError"] == 1


@pytest.mark.parametrize("frame, code, fragment", [
    (encode_request(99, 1, NS, b"k", 100) + bytes(100), errors.InvalidArgument, "unknown op 99"),
    (put_frame(1, b"K" * 129, b"v" * 10), errors.InvalidArgument, "key length 129"),
    (put_frame(1, b"k", b"v", ns=b"bad ns!"), errors.InvalidArgument, "namespace"),
    (put_frame(1, b"k", b"v" * 100, csum=1), errors.ChecksumMismatch, "checksum"),
    (encode_request(OP_SHM_GET, 1, NS, b"k"), errors.InvalidArgument, "unknown op 17"),
])
def test_bad_requests_keep_the_connection(store, frame, code, fragment):
    p = Peer(store)
    p.send(frame + put_frame(2, b"after", b"ok"))
    (h, msg), (after, _) = p.responses()
    assert h.status == code.code and fragment in msg.decode()
    assert (after.req_id, after.status) == (2, 0)
    assert not p.s.closed and store.reserved_bytes == 0


def test_oversized(store):
    p = Peer(store)
    big = 2 * MiB  # over max_value_size: rejected, its payload skipped, the stream goes on
    p.send(encode_request(OP_PUT, 1, NS, b"big", big, 0) + bytes(big) + get_frame(2, b"big"))
    (h, msg), (g, _) = p.responses()
    assert h.status == errors.InvalidArgument.code and b"max_value_size" in msg
    assert g.status == errors.NotFound.code
    # too large even to skip: fatal
    p.send(encode_request(OP_PUT, 3, NS, b"huge", DISCARD_LIMIT + 1, 0))
    h, msg = p.one()
    assert h.status == errors.ProtocolError.code and b"too large to skip" in msg
    assert p.s.finish == "close"


def test_peer_lost_mid_payload_leaves_nothing(store):
    p = Peer(store)
    data = b"p" * 500_000
    p.send(put_frame(1, b"partial", data)[:HEADER_SIZE + 11 + 200_000])
    assert store.reserved_bytes == len(data) and p.s.reserved == len(data)
    assert not p.s.idle()
    assert p.s.connection_lost() == []
    assert store.reserved_bytes == 0 and store.stats()["objects"] == 0
    assert (NS, b"partial") not in store.index
    assert p.s.feed(b"more") == 0  # a lost session takes nothing


def test_stalled_put_is_reaped_and_aborted():
    clock = Clock()
    store = make_store(clock, reservation_timeout=5.0)
    try:
        p = Peer(store)
        p.send(put_frame(1, b"stall", b"s" * 1000)[:HEADER_SIZE + 9 + 10])
        clock.t += 6
        assert store.reap() == 1
        assert p.woken == 1 and p.s.finish == "abort"  # the driver aborts the transport
        assert p.plane.counters["stalled_puts"] == 1 and p.s.reserved == 0
        assert p.s.receive_buffer() is not None  # no slot view is offered any more
        assert store.reserved_bytes == 0
    finally:
        store.close()


def _fill_pinned(p: Peer, store: Store) -> tuple[list[bytes], int, Peer | None]:
    """Fill DRAM with pinned ~1 MiB objects until a put on ``p`` has to wait for space.
    Returns the pinned keys, the waiting put's request id (its header is sent, its payload
    not) and, where needed, another session whose stalled put holds the last free slot."""
    obj = b"f" * (1 * MiB - 4096)
    keys: list[bytes] = []
    for i in range(64):
        k = b"fill%d" % i
        frame = put_frame(i, k, obj)
        p.send(frame[:-len(obj)])
        if p.s.waiting is not None:  # the store refuses what it could not keep
            return keys, i, None
        p.send(frame[-len(obj):])
        assert p.one()[0].status == 0
        if store.pin(NS, [k], 60.0) == 0:  # a store that evicts it at once instead
            break
        keys.append(k)
    other = Peer(store)
    other.send(put_frame(0, b"stalled", obj)[:HEADER_SIZE + 9])
    assert store.reserved_bytes == len(obj)
    rid = len(keys) + 1
    p.send(put_frame(rid, b"new", obj)[:HEADER_SIZE + 5])
    assert p.s.waiting is not None
    return keys, rid, other


@pytest.fixture
def real_time_store():
    s = make_store(time.monotonic)  # reserve_wait's deadline needs a clock that moves
    yield s
    s.close()


def test_put_waits_for_space_then_completes(real_time_store):
    """NoSpace: a Call waits for space; nothing else is parsed meanwhile (order kept)."""
    store = real_time_store
    p = Peer(store)
    keys, waiting_rid, other = _fill_pinned(p, store)
    assert p.s.feed(encode_request(OP_PING, 901, b"", b"")) == 0  # not reading meanwhile
    assert p.responses() == []
    assert p.s.waiting is not None and not p.s.reading
    store.unpin(NS, keys)
    assert p.run_calls() == 1
    assert p.s.waiting is None and p.s.reading
    p.send(b"f" * (1 * MiB - 4096) + encode_request(OP_PING, 901, b"", b""))
    rs = p.responses()
    assert [(h.req_id, h.status) for h, _ in rs] == [(waiting_rid, 0), (901, 0)]


def test_put_wait_times_out_with_nospace(real_time_store):
    store = real_time_store
    p = Peer(store)
    keys, waiting_rid, other = _fill_pinned(p, store)
    t0 = time.monotonic()
    p.run_calls()
    assert 0.2 < time.monotonic() - t0 < 5.0  # put_wait_timeout is 0.3 s
    assert p.responses() == []  # the answer waits for the payload to be skipped
    p.send(b"f" * (1 * MiB - 4096) + encode_request(OP_PING, 901, b"", b""))
    (h, msg), (ping, _) = p.responses()
    assert (h.req_id, h.status) == (waiting_rid, errors.NoSpace.code)
    assert ping.req_id == 901  # the stream goes on after the payload skip
    if other is not None:
        other.s.connection_lost()
    assert store.reserved_bytes == 0


def test_pipeline_limit_and_release_after_send(store):
    p = Peer(store, max_pipelined=4)
    p.send(put_frame(1, b"k", b"v" * 100))
    p.responses()
    p.unsent = 10 ** 9  # the transport holds every byte: gets are not released
    stream = b"".join(get_frame(10 + i, b"k") for i in range(10))
    p.send(stream)
    assert len(p.responses()) == 4 and len(p.s.pending) == 4
    assert not p.s.reading and p.plane.counters["pipeline_limit_pauses"] == 1
    e = store.index[(NS, b"k")]
    assert e.refs == 4  # read references held while the bytes may still be in flight
    p.unsent = 0
    p.s.written(0)  # the transport drained: references go, parsing resumes
    p.flush()  # (which keeps draining at once: the rest is answered)
    assert [h.req_id for h, _ in p.responses()] == list(range(14, 20))
    assert p.s.reading and e.refs == 0 and not p.s.pending


def test_burst_is_flushed_in_pieces(store):
    p = Peer(store, burst=150_000)
    p.send(put_frame(1, b"k", b"v" * 100_000))
    p.responses()
    s = p.s
    s.feed(b"".join(get_frame(10 + i, b"k") for i in range(5)))
    assert s.burst_stop and len(s.out) == 4  # two gets, then a flush is due
    p.flush()
    assert [h.req_id for h, _ in p.responses()] == [10, 11, 12, 13, 14]


def test_write_blocked_stops_parsing(store):
    p = Peer(store)
    p.send(put_frame(1, b"k", b"v" * 100))
    p.responses()
    p.s.write_blocked()
    assert p.s.feed(get_frame(2, b"k")) == 0  # not reading: the bytes stay in the "socket"
    p.s.write_unblocked(0)
    assert p.s.reading and p.send(get_frame(2, b"k")) > 0
    assert p.one()[0].req_id == 2


def test_reservation_budget_hook(store):
    p = Peer(store)
    p.s.budget = ConnectionBudget(1 << 30, 64 << 20, max_reserved_bytes=100_000)
    p.send(put_frame(1, b"a", b"a" * 60_000)[:HEADER_SIZE + 3 + 10])
    assert p.s.reserved == 60_000
    p.send(b"a" * (60_000 - 10) + put_frame(2, b"b", b"b" * 60_000))
    rs = p.responses()
    assert [(h.req_id, h.status) for h, _ in rs] == [(1, 0), (2, 0)]  # one at a time: fine
    assert p.s.reserved == 0
    # a second session holds 60 KB; past its bound a put is refused at once (no wait for
    # space, which would not help), its payload skipped, and the stream goes on
    q = Peer(store)
    q.s.budget = ConnectionBudget(1 << 30, 64 << 20, max_reserved_bytes=100_000)
    q.send(put_frame(1, b"c", b"c" * 60_000)[:HEADER_SIZE + 3 + 10])
    q.s.budget.max_reserved_bytes = 50_000
    q.send(b"c" * (60_000 - 10) + put_frame(2, b"d", b"d" * 60_000)
           + encode_request(OP_PING, 3, b"", b""))
    rs = q.responses()
    assert [(h.req_id, h.status) for h, _ in rs] == [(1, 0), (2, errors.NoSpace.code), (3, 0)]
    assert b"limit 50000 per connection" in rs[1][1] and q.s.waiting is None


def test_draining_starts_nothing_new(store):
    p = Peer(store)
    p.plane.draining = True
    p.send(encode_request(OP_PING, 1, b"", b""))
    assert p.responses() == [] and not p.s.reading and p.s.idle()


def test_shm_ops_registered_on_a_copy(store):
    from kvstored.dataplane.shm import SHM_OPS, ShmState

    assert OP_SHM_GET not in CORE_OPS and OP_SHM_GET in SHM_OPS
    with pytest.raises(ValueError):
        SHM_OPS.register(OP_PUT, lambda *a: None, scope=None)

    class FakeShm:  # what ShmState needs of its server
        lease_ttl = 30.0
        connections: set = set()

        class ds:
            pass

    FakeShm.ds.store = store
    p = Peer(store, ops=SHM_OPS)
    st = p.s.ext = ShmState(FakeShm)
    st.made(p.s)
    data = b"s" * 5000
    p.send(encode_request(OP_SHM_RESERVE, 1, NS, b"k", len(data), 0, FLAG_CHECKSUM_UNKNOWN))
    h, body = p.one()
    off, size, rid = SHM_IDS.unpack(body)
    store.arena.view[off:off + size] = data
    p.send(encode_request(OP_SHM_COMMIT, 2, b"", b"", payload_checksum=rid))
    assert p.one()[0].status == 0
    p.send(encode_request(OP_SHM_GET, 3, NS, b"k"))
    h, body = p.one()
    off, size, lease = SHM_IDS.unpack(body)
    assert bytes(store.arena.view[off:off + size]) == data and h.checksum == checksum(data)
    assert store.index[(NS, b"k")].refs == 1  # the lease holds a read reference
    p.send(encode_request(OP_SHM_RELEASE, 4, b"", b"", payload_checksum=lease))
    assert p.responses() == [] and store.index[(NS, b"k")].refs == 0
    p.send(encode_request(OP_SHM_COMMIT, 5, b"", b"", payload_checksum=12345))  # forged id
    assert p.one()[0].status == errors.InvalidArgument.code
    # a reservation held when the peer goes is aborted, a lease released
    p.send(encode_request(OP_SHM_RESERVE, 6, NS, b"j", 100, checksum(b"j" * 100), FLAG_OVERWRITE)
           + encode_request(OP_SHM_GET, 7, NS, b"k"))
    assert len(p.responses()) == 2 and store.reserved_bytes == 100
    p.s.connection_lost()
    assert store.reserved_bytes == 0 and store.index[(NS, b"k")].refs == 0
    assert st not in FakeShm.connections


def test_random_garbage_never_crashes(store):
    """Random bytes after a valid frame: every outcome is an answer, an error or a close."""
    for seed in range(30):
        rng = random.Random(seed)
        p = Peer(store)
        junk = bytearray(put_frame(1, b"g%d" % seed, b"ok"))
        junk += rng.randbytes(rng.randint(1, 400))
        if rng.random() < 0.5:  # keep a valid magic and version so deeper fields get hit
            junk[len(junk) - 40:len(junk) - 36] = b"KVSD"
        p.send(bytes(junk))
        p.responses()
        p.s.connection_lost()
        assert store.reserved_bytes == 0
