"""The issue-17 bounds in the data session itself, with bytes alone (no sockets, a real
in-memory Store): queued responses, fairness between connections, reserved bytes per
connection and per client, stalled-put deadlines, nothing reserved before auth."""
from __future__ import annotations

from types import SimpleNamespace

from kvstore import errors
from kvstore.wire import FLAG_RESPONSE, HEADER_SIZE, OP_PING, OP_PUT, checksum, decode, encode_request
from kvstored.auth import Auth, Unauthenticated
from kvstored.dataplane.ops import CORE_OPS
from kvstored.dataplane.policy import DataLimits
from kvstored.dataplane.session import FAIR_FRAMES, DataSession, Plane
from kvstored.engine import Store, StoreLimits

from secutil import TOKENS, write_tokens
from fakes import Clock

KiB, MiB = 1 << 10, 1 << 20
PING = encode_request(OP_PING, 1, b"", b"")


def plane(auth=None, **limits) -> Plane:
    store = Store(StoreLimits(dram_size=32 * MiB, slab_size=4 * MiB, max_value_size=4 * MiB,
                              hugepages=False, prefault=False, reservation_timeout=30.0,
                              put_wait_timeout=0.3), clock=Clock())
    cfg = SimpleNamespace(**limits)
    return Plane(store, CORE_OPS, auth=auth, limits=DataLimits(cfg, dram_size=32 * MiB))


def drain(s) -> list:
    """Everything the session queued, as (header, payload)."""
    w = b"".join(bytes(b) for b in s.take_output())
    out, pos = [], 0
    while pos < len(w):
        h = decode(w, pos)
        assert h.flags & FLAG_RESPONSE
        out.append((h, w[pos + HEADER_SIZE:pos + HEADER_SIZE + h.length]))
        pos += HEADER_SIZE + h.length
    return out


def test_unread_responses_stop_reading_at_the_bound():
    p = plane(max_queued_response_bytes=64 * KiB, max_queued_responses=1 << 20)
    s = DataSession(p, "t")
    flood = PING * 10000  # 320 KiB of requests, 320 KiB of answers
    taken = 0
    for _ in range(100):  # the transport never drains: unsent stays > 0
        n = s.feed(flood[taken:])
        taken += n
        s.take_output()
        s.written(1)
        if n == 0:
            break
        s.yield_stop = False  # what the driver does after yielding
        s.advance()
    assert s.queue_full and not s.reading
    assert 64 * KiB <= s.queued < 64 * KiB + HEADER_SIZE * FAIR_FRAMES
    assert taken < len(flood)
    s.written(0)  # the client read everything: go on
    assert not s.queue_full and s.reading


def test_frames_bound_too():
    p = plane(max_queued_response_bytes=1 << 30, max_queued_responses=100)
    s = DataSession(p, "t")
    s.feed(PING * 500)
    s.written(1)
    assert s.queue_full and s.queued_frames == 100


def test_a_connection_yields_after_fair_frames():
    p = plane()
    s = DataSession(p, "t")
    s.feed(PING * (FAIR_FRAMES + 10))
    assert s.yield_stop and len(drain(s)) == FAIR_FRAMES
    s.yield_stop = False
    s.advance()
    assert len(drain(s)) == 10


def _put_header(rid: int, key: bytes, size: int) -> bytes:
    return encode_request(OP_PUT, rid, b"ns", key, size, 0)


def test_reserved_bytes_per_connection_and_per_client():
    p = plane(max_reserved_bytes_per_connection=8 * MiB, max_reserved_bytes_per_client=10 * MiB)
    a, b, other = DataSession(p, "a"), DataSession(p, "b"), DataSession(p, "c")
    a.client = b.client = "10.0.0.1"
    other.client = "10.0.0.2"
    a.feed(_put_header(1, b"a1", 4 * MiB) + b"x" * KiB)  # held, mid-payload
    assert a.reserved == 4 * MiB
    a2 = DataSession(p, "a2")
    a2.client = "10.0.0.1"
    a2.feed(_put_header(1, b"a2", 4 * MiB) + b"x")
    b.feed(_put_header(2, b"b1", 4 * MiB))  # 12 MiB for the client: over 10, refused, payload skipped
    b.feed(bytes(4 * MiB))
    (h, msg), = drain(b)
    assert h.status == errors.NoSpace.code, msg
    assert b"client 10.0.0.1 already holds 8388608 bytes" in msg and b"limit 10485760 per client" in msg
    other.feed(_put_header(3, b"o1", 4 * MiB))  # another client is not affected
    assert other.reserved == 4 * MiB
    assert p.clients.held == {"10.0.0.1": 8 * MiB, "10.0.0.2": 4 * MiB}
    for s in (a, a2, other):
        s.connection_lost()
    assert p.clients.held == {} and p.store.reserved_bytes == 0


def test_stalled_put_is_reclaimed_a_slow_one_is_not():
    p = plane(put_stall_timeout=1.0, min_put_rate=1 * MiB)
    store, clock = p.store, p.store.clock
    slow, staller = DataSession(p, "slow"), DataSession(p, "staller")
    value = bytes(range(256)) * (2 * MiB // 256)
    slow.feed(encode_request(OP_PUT, 1, b"ns", b"slow", len(value), checksum(value)))
    staller.feed(_put_header(1, b"stall", 2 * MiB) + b"x" * KiB)
    # the slow writer pauses 0.5 s between 512 KiB parts (under put_stall_timeout): 2 s
    # for 2 MiB, within 1 s + 2 MiB / (1 MiB/s)
    sent = 0
    for _ in range(4):
        clock.t += 0.5
        store.reap()
        slow.feed(value[sent:sent + 512 * KiB])
        sent += 512 * KiB
    (h, _), = drain(slow)
    assert (h.req_id, h.status) == (1, 0)
    assert staller.finish == "abort" and staller.reserved == 0  # cut 1 s after its last byte
    assert p.counters["stalled_puts"] == 1 and p.clients.held == {}
    # a trickle that never pauses 1 s is still cut at 1 s + size / min_put_rate
    trickle = DataSession(p, "trickle")
    t0 = clock.t
    trickle.feed(_put_header(2, b"trickle", 2 * MiB))
    for _ in range(40):
        clock.t += 0.25
        store.reap()
        if trickle.finish:
            break
        trickle.feed(b"x" * KiB)
    assert trickle.finish == "abort" and 3.0 <= clock.t - t0 <= 3.25


def test_nothing_reserved_before_auth(tmp_path):
    auth = Auth(str(write_tokens(tmp_path / "tokens.toml", TOKENS)))
    p = plane(auth=auth)
    s = DataSession(p, "t")
    s.feed(_put_header(1, b"k", 4 * MiB) + bytes(4 * MiB))
    (h, msg), = drain(s)
    assert h.status == Unauthenticated.code
    assert p.store.reserved_bytes == 0 and not p.store.reservations and s.reserved == 0


def test_a_put_paused_by_the_daemon_is_not_cut_as_stalled():
    # the daemon stops reading (the client's responses are unread) in the middle of a put's
    # payload: put_stall_timeout does not apply meanwhile, only the put's overall cap
    p = plane(put_stall_timeout=1.0, min_put_rate=1 * MiB)
    store, clock = p.store, p.store.clock
    s = DataSession(p, "t")
    value = bytes(2 * MiB)
    s.feed(encode_request(OP_PUT, 1, b"ns", b"k", len(value), checksum(value)) + value[:KiB])
    s.write_blocked()
    clock.t += 2.0  # over put_stall_timeout, under 1 s + 2 MiB / (1 MiB/s)
    store.reap()
    assert s.finish is None and s.reserved == 2 * MiB
    s.write_unblocked(0)
    s.feed(value[KiB:])
    (h, _), = drain(s)
    assert (h.req_id, h.status) == (1, 0)
