"""A whole buffered put in one C call (native/frame.c ``put_run``, DataSession.fast_put)
gives the answers and leaves the store as the Python path does.

Two stores get the same byte stream, cut into the same reads, over two connections each:
one side's sessions take their puts through ``put_run``, the other's through ops._put ->
put_buffered -> Store.put_bytes. The stream mixes new keys, re-puts of the same bytes,
conflicts, overwrites, bad checksums, oversized and empty puts, bad names, another epoch,
repair-flagged puts, unknown flags, gets, pings and frames cut across reads, in a small
arena that evicts. Both sides must send the same bytes and end with the same index,
arena use, counters, namespace usage and put count in
the latency histogram; and the C side must have stored most puts without Store.put_bytes.
"""
from __future__ import annotations

import random

import pytest

from kvstore.wire import (FLAG_OVERWRITE, FLAG_REPAIR, OP_GET, OP_PING, OP_PUT, checksum,
                          encode_request)
from kvstored.dataplane import session as session_mod
from kvstored.dataplane.ops import CORE_OPS
from kvstored.dataplane.policy import EpochGate
from kvstored.dataplane.session import DataSession, Plane
from kvstored.engine import Store, StoreLimits
from kvstored.metrics import StoreUsage

pytestmark = pytest.mark.skipif(session_mod._put_run is None, reason="native/frame.c not built")

KiB = 1 << 10
NS = b"native-put"
EPOCH = 0x51


class Side:
    """A store, its observer and two connections' sessions; ``native`` picks the path."""

    def __init__(self, native: bool, index: str):
        self.store = Store(StoreLimits(dram_size=2 << 20, slab_size=256 * KiB,
                                       max_value_size=64 * KiB, hugepages=False,
                                       prefault=False, index=index))
        self.store.observer = StoreUsage(self.store)
        self.plane = Plane(self.store, CORE_OPS, gate=EpochGate(EPOCH))
        self.sessions = [DataSession(self.plane, f"c{i}", client="10.0.0.1") for i in range(2)]
        for s in self.sessions:
            assert (s.fast_put is not None) is True
            if not native:
                s.fast_put = None
        self.wire: list[list[bytes]] = [[], []]
        self.put_bytes_calls = 0
        put_bytes = self.store.put_bytes

        def counting(*a, **kw):
            self.put_bytes_calls += 1
            return put_bytes(*a, **kw)

        self.store.put_bytes = counting

    def read(self, conn: int, data: bytes) -> None:
        s = self.sessions[conn]
        assert s.feed(data) == len(data)
        self.wire[conn].extend(bytes(b) for b in s.take_output())
        s.written(0)  # the transport took everything: gets' references are released

    def state(self) -> dict:
        st = self.store
        # (not the offsets: which partial slab a class takes a slot from is set order,
        # which differs between two arenas; the bytes each one uses are in stats)
        objects = sorted((e.ns, e.key, e.size, e.checksum, bytes(st.view(e)))
                         for e in st.index.iterate(None))
        stats = st.stats()
        usage = st.observer
        hist = self.plane.latency[OP_PUT]
        return {"objects": objects, "stats": stats, "ns": usage.ns, "sizes": usage.sizes,
                "plane": dict(self.plane.counters), "puts_timed": sum(hist.counts),
                "sessions": [(s.reserved, s.reader.start, s.reader.end, s.closed, s.req_id)
                             for s in self.sessions]}


def workload(rng: random.Random) -> list[tuple[int, bytes]]:
    """(connection, bytes of one read) in order: frames of every kind, cut at random."""
    sizes = [4 * KiB, 4 * KiB, 16 * KiB, 1000, 64 * KiB]
    blobs = {}  # key -> bytes last put under it (re-puts and conflicts pick from here)
    streams: list[list[bytes]] = [[], []]
    for rid in range(1, 700):
        conn = rng.randrange(2)
        r = rng.random()
        key = b"k%d" % rng.randrange(400)  # keys collide: re-puts, conflicts, evictions
        data = rng.randbytes(rng.choice(sizes))
        csum, flags, epoch, ns = checksum(data), 0, 0, NS
        if r < 0.12 and key in blobs:
            data = blobs[key]  # the same bytes again: stored already
            csum = checksum(data)
        elif r < 0.17:
            csum ^= 1  # corrupt
        elif r < 0.22:
            flags = FLAG_OVERWRITE
        elif r < 0.25:
            epoch = rng.choice([EPOCH, EPOCH + 1])
        elif r < 0.27:
            data, csum = bytes(64 * KiB + 1), 0  # past max_value_size
        elif r < 0.29:
            data, csum = b"", checksum(b"")
        elif r < 0.31:
            ns = rng.choice([b"bad ns!", b"other-ns"])
        elif r < 0.33:
            key = rng.choice([b"", bytes(129)])
        elif r < 0.35:
            flags = rng.choice([FLAG_REPAIR, 0x40])
        elif r < 0.45:
            streams[conn].append(encode_request(OP_GET, rid, NS, key, epoch=epoch))
            continue
        elif r < 0.48:
            streams[conn].append(encode_request(OP_PING, rid, b"", b""))
            continue
        streams[conn].append(encode_request(OP_PUT, rid, ns, key, len(data), csum, flags=flags,
                                            epoch=epoch) + data)
        if csum == checksum(data) and flags == 0 and ns == NS and 0 < len(key) <= 128:
            blobs.setdefault(key, data)
    reads = []
    pending = [b"".join(s) for s in streams]
    pos = [0, 0]
    for _ in range(100_000):  # bounded: every round takes at least a byte
        live = [c for c in (0, 1) if pos[c] < len(pending[c])]
        if not live:
            break
        c = rng.choice(live)
        n = rng.choice([1, 39, 100, 5000, 70_000, 200_000])
        reads.append((c, pending[c][pos[c]:pos[c] + n]))
        pos[c] += n
    return reads


@pytest.mark.parametrize("index", ["dict", "packed"])
@pytest.mark.parametrize("seed", [1, 2])
def test_both_paths_answer_and_store_the_same(index, seed):
    native, python = Side(True, index), Side(False, index)
    try:
        for conn, data in workload(random.Random(seed)):
            native.read(conn, data)
            python.read(conn, data)
        assert native.wire == python.wire
        assert native.state() == python.state()
        c = native.store.counters
        assert c["puts"] > 200 and c["evictions"] > 50 and c["dedups"] and c["conflicts"]
        assert c["checksum_failures"] and native.plane.counters["errors_Redirect"]
        # most puts went through C (the Python side's went through put_bytes)
        assert native.put_bytes_calls < python.put_bytes_calls // 3
    finally:
        native.store.close()
        python.store.close()


def test_bounds_and_limits_leave_puts_to_the_python_path():
    """A connection or client over its reservation bound, a burst, a queue bound and the
    fair share of frames: the C run stops where the Python path would act."""
    rng = random.Random(5)
    data = [rng.randbytes(4 * KiB) for _ in range(40)]
    frames = b"".join(encode_request(OP_PUT, i + 1, NS, b"b%d" % i, len(d), checksum(d)) + d
                      for i, d in enumerate(data))
    sides = [Side(True, "packed"), Side(False, "packed")]
    try:
        for side in sides:
            a, b = side.sessions
            a.budget.max_reserved_bytes = 3 * KiB  # every put: reserve() answers NoSpace
            b.budget.max_queued_frames = 7  # stops reading after 7 answers until written
            b.budget.burst = 20 * KiB
            a.feed(frames)
            side.wire[0].extend(bytes(x) for x in a.take_output())
            taken = 0
            for _ in range(50):  # bounded: each round lets the queue drain once
                taken += b.feed(frames[taken:])
                side.wire[1].extend(bytes(x) for x in b.take_output())
                b.written(0)
            assert taken == len(frames)
        assert sides[0].wire == sides[1].wire
        assert sides[0].state() == sides[1].state()
        assert sides[0].plane.counters["reservations_refused_over_limit"] == 40
        assert sides[0].plane.counters["queue_limit_pauses"] >= 1
        assert sides[0].store.counters["puts"] == 40
    finally:
        for side in sides:
            side.store.close()


def test_a_run_ends_at_the_fair_share():
    """FAIR_FRAMES bounds the frames one advance() handles, C or not: both paths stop at
    the same frame, and go on from there."""
    n = session_mod.FAIR_FRAMES + 10
    d = b"x" * 300
    wire = b"".join(encode_request(OP_PUT, i + 1, NS, b"f%d" % i, len(d), checksum(d)) + d
                    for i in range(n))
    seen = []
    for native in (True, False):
        side = Side(native, "packed")
        try:
            s = side.sessions[0]
            s.reader = session_mod.FrameReader(len(wire) + (64 << 10))  # all of it in one read
            if native:
                s.fast_put = session_mod._fast_put_context(s)
            s.feed(wire)
            stopped = (s.yield_stop, side.store.counters["puts"], s.reader.start)
            s.yield_stop = False
            s.advance()
            seen.append((stopped, side.store.counters["puts"], s.reader.buffered(),
                         b"".join(bytes(b) for b in s.take_output())))
        finally:
            side.store.close()
    assert seen[0] == seen[1]
    (yielded, puts, _), after, left, _ = seen[0]
    assert yielded and session_mod.FAIR_FRAMES <= puts < n and after == n and left == 0


def test_bad_arguments_are_refused():
    side = Side(True, "packed")
    try:
        s = side.sessions[0]
        with pytest.raises(TypeError):
            session_mod._put_run(s, (), 1)
        with pytest.raises(TypeError):
            session_mod._put_run(s)
        s.reader.buf[:40] = encode_request(OP_PUT, 1, NS, b"", 0, 0)[:40]
        s.reader.start, s.reader.end = 0, len(s.reader.buf) + 1
        with pytest.raises(ValueError):
            session_mod._put_run(s, s.fast_put, 1)
    finally:
        side.store.close()
