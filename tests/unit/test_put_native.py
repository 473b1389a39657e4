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
The same on a node with an NVMe tier (evictions demote; gets promote) and on one with
auth on (granted, refused and unauthenticated puts over mixed namespaces, tokens
reloaded and revoked between reads, a malformed AUTH and a malformed frame).
"""
from __future__ import annotations

import asyncio
import random

import pytest

from kvstore import errors
from kvstore.wire import (FLAG_OVERWRITE, FLAG_REPAIR, HEADER, HEADER_SIZE, MAX_TOKEN_LEN, OP_AUTH,
                          OP_GET, OP_PING, OP_PUT, Header, checksum, encode_request)
from kvstored.auth import Auth
from kvstored.dataplane import session as session_mod
from kvstored.dataplane.ops import CORE_OPS
from kvstored.dataplane.policy import EpochGate
from kvstored.dataplane.session import DataSession, Plane
from kvstored.engine import Store, StoreLimits
from kvstored.engine.nvme import NvmeDevice, NvmeTier
from kvstored.metrics import StoreUsage

pytestmark = pytest.mark.skipif(session_mod._put_run is None, reason="native/frame.c not built")

KiB = 1 << 10
MiB = 1 << 20
NS = b"native-put"
EPOCH = 0x51
# auth: WRITER may write NS and other-ns; READER may only read NS; SPARE is reloaded (a
# new generation: every connection's cached grants are dropped); third-ns is nobody's
WRITER, READER, SPARE = b"writer-token-0123456789", b"reader-token-0123456789", b"spare-token-0123456789"


def write_tokens(path, spare_scopes: str = '"read"', writer: bool = True) -> None:
    entries = [("reader", READER, '"native-put"', '"read"'),
               ("spare", SPARE, '"*"', spare_scopes)]
    if writer:
        entries.append(("writer", WRITER, '"native-put", "other-ns"', '"read", "write"'))
    path.write_text("".join(f'[[token]]\nname = "{n}"\ntoken = "{t.decode()}"\n'
                            f"namespaces = [{ns}]\nscopes = [{sc}]\n" for n, t, ns, sc in entries))
    path.chmod(0o600)


class Side:
    """A store, its observer and two connections' sessions; ``native`` picks the path.
    ``nvme``: a file for an NVMe tier; ``tokens``: a tokens file (auth on)."""

    def __init__(self, native: bool, index: str, nvme=None, tokens=None, dram: int = 2 * MiB):
        tier = None
        if nvme is not None:
            tier = NvmeTier(NvmeDevice(str(nvme), MiB + 4 * 16 * MiB, 16 * MiB, "threads", 32))
        self.store = Store(StoreLimits(dram_size=dram, slab_size=256 * KiB,
                                       max_value_size=64 * KiB, hugepages=False,
                                       prefault=False, index=index, put_wait_timeout=5.0),
                           nvme=tier)
        self.store.observer = StoreUsage(self.store)
        self.auth = Auth(str(tokens)) if tokens is not None else None
        self.plane = Plane(self.store, CORE_OPS, gate=EpochGate(EPOCH), auth=self.auth)
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

    async def read_settled(self, conn: int, data: bytes) -> None:
        """``read``, as a driver does it where puts wait for space and gets load from NVMe:
        the session's calls are run (one at a time) and the demotions they start written
        before it reads on, and again after it took the bytes (or closed)."""
        s = self.sessions[conn]
        done = 0
        for _ in range(200):  # bounded: each round runs every call the session asked for
            done += s.feed(data[done:])
            await self.settle()
            if done == len(data) or s.closed:
                break
        assert done == len(data) or s.closed

    async def settle(self) -> None:
        for _ in range(200):  # bounded: a round ends with nothing in flight
            await self.store.drain_tasks(30)
            calls = [(s, c) for s in self.sessions for c in s.take_calls()]
            for s, call in calls:
                try:
                    result, err = await call.fn(*call.args), None
                except errors.KVStoreError as e:
                    result, err = None, e
                s.call_done(call, result, err)
            for conn, s in enumerate(self.sessions):
                self.wire[conn].extend(bytes(b) for b in s.take_output())
                s.written(0)
            if not calls and not self.store.tiering.tasks_in_flight():
                return
        raise AssertionError("the sessions' calls did not settle")

    def state(self) -> dict:
        st = self.store
        # (not the offsets: which partial slab a class takes a slot from is set order,
        # which differs between two arenas; the bytes each one uses are in stats. Nor
        # where on NVMe: demotions finish in any order)
        objects = sorted((e.ns, e.key, e.size, e.checksum, e.offset >= 0, e.nvme is not None,
                          bytes(st.view(e)) if e.offset >= 0 else b"")
                         for e in st.index.iterate(None))
        stats = st.stats()
        if st.nvme is not None:
            stats["nvme"] = dict(st.nvme.counters)
        usage = st.observer
        hist = self.plane.latency[OP_PUT]
        return {"objects": objects, "stats": stats, "ns": usage.ns, "sizes": usage.sizes,
                "plane": dict(self.plane.counters), "puts_timed": sum(hist.counts),
                "sessions": [(s.reserved, s.reader.start, s.reader.end, s.closed, s.req_id)
                             for s in self.sessions]}


def _auth_frame(rid: int, token: bytes) -> bytes:
    return encode_request(OP_AUTH, rid, b"", b"", len(token)) + token


def workload(rng: random.Random, auth: bool = False,
             one_class: bool = False) -> list[tuple[int, bytes]]:
    """(connection, bytes of one read) in order: frames of every kind, cut at random.
    ``auth``: connection 0 shows WRITER first; connection 1 puts unauthenticated, then
    shows a token too long (refused), READER, then WRITER; puts go to namespaces either
    may or may not write; connection 1 ends with a frame of a bad magic. ``one_class``:
    every put stored is of the 4 KiB slot class (no empty one): with an NVMe tier, which
    objects DramTier.reclaim_slab demotes depends on the slabs their slots are in, which
    depends on set order (object addresses), so two stores would differ (one class: it
    never runs)."""
    sizes = [4 * KiB, 4000, 3600] if one_class else [4 * KiB, 4 * KiB, 16 * KiB, 1000, 64 * KiB]
    blobs = {}  # key -> bytes last put under it (re-puts and conflicts pick from here)
    streams: list[list[bytes]] = [[], []]
    logins = {1: (0, WRITER), 60: (1, bytes(MAX_TOKEN_LEN + 1)), 90: (1, READER),
              300: (1, WRITER)} if auth else {}
    for rid in range(1, 700):
        if rid in logins:
            conn, token = logins[rid]
            streams[conn].append(_auth_frame(rid, token))
            continue
        conn = rng.randrange(2)
        r = rng.random()
        key = b"k%d" % rng.randrange(400)  # keys collide: re-puts, conflicts, evictions
        data = rng.randbytes(rng.choice(sizes))
        csum, flags, epoch, ns = checksum(data), 0, 0, NS
        if auth and rng.random() < 0.3:
            ns = rng.choice([b"other-ns", b"third-ns"])
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
            if not one_class:
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
    if auth:  # a bad magic: the connection's last answer is a ProtocolError
        streams[1].append(b"XXXX" + bytes(36))
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


@pytest.mark.parametrize("index,auth", [("dict", False), ("packed", False), ("packed", True)])
def test_both_paths_the_same_with_an_nvme_tier(tmp_path, index, auth):
    """DRAM overflows into the NVMe tier: puts past the high watermark start demotions,
    those that need an eviction (DramTier.alloc_if_free finds no free slot) take the
    Python path, which may wait for a demotion; gets of demoted keys promote them.
    ``auth``: a fleet node with both (the auth workload, tokens reloaded halfway)."""
    tokens = tmp_path / "tokens.toml"
    write_tokens(tokens)

    async def run():
        native = Side(True, index, nvme=tmp_path / "native.nvme", dram=MiB // 2,
                      tokens=tokens if auth else None)
        python = Side(False, index, nvme=tmp_path / "python.nvme", dram=MiB // 2,
                      tokens=tokens if auth else None)
        try:
            reads = workload(random.Random(3), auth=auth, one_class=True)
            for i, (conn, data) in enumerate(reads):
                if auth and i == len(reads) // 2:
                    write_tokens(tokens, spare_scopes='"read", "write"')
                    native.auth.reload()
                    python.auth.reload()
                await native.read_settled(conn, data)
                await python.read_settled(conn, data)
            assert native.wire == python.wire
            assert native.state() == python.state()
            c, n = native.store.counters, native.store.nvme.counters
            assert c["puts"] > 150 and c["dedups"] and c["conflicts"] and c["checksum_failures"]
            assert n["demotions"] > 50 and n["promotions"]
            if auth:
                assert native.plane.counters["auth_rejected_namespace"]
            assert native.put_bytes_calls < python.put_bytes_calls // 2
        finally:
            for side in (native, python):
                await side.store.drain_tasks(30)
                side.store.close()
    asyncio.run(run())


@pytest.mark.parametrize("seed", [4, 5])
def test_both_paths_the_same_with_auth(tmp_path, seed):
    """Auth on, two connections: granted puts in two namespaces, refusals of each kind
    (no token, a namespace not granted, a read-only token, a revoked token), a malformed
    AUTH, the tokens reloaded mid-stream (the guards' caches dropped), then the writer's
    token revoked, and a malformed frame last; the refusals are the guard's, counted and
    answered the same."""
    tokens = tmp_path / "tokens.toml"
    write_tokens(tokens)
    native, python = Side(True, "packed", tokens=tokens), Side(False, "packed", tokens=tokens)
    try:
        reads = workload(random.Random(seed), auth=True)
        for i, (conn, data) in enumerate(reads):
            if i == len(reads) // 2:  # another token changes: a new generation
                write_tokens(tokens, spare_scopes='"read", "write"')
                assert native.auth.reload()["changed"] == python.auth.reload()["changed"] == ["spare"]
            elif i == len(reads) * 9 // 10:
                write_tokens(tokens, spare_scopes='"read", "write"', writer=False)
                native.auth.reload()
                python.auth.reload()
            native.read(conn, data)
            python.read(conn, data)
        assert native.wire == python.wire
        assert native.state() == python.state()
        counted = native.plane.counters
        for why in ("no_token", "namespace", "scope", "revoked"):
            assert counted["auth_rejected_" + why], why
        assert counted["errors_InvalidArgument"] and counted["errors_ProtocolError"] == 1
        assert native.store.counters["puts"] > 100
        assert native.put_bytes_calls < python.put_bytes_calls // 2
    finally:
        native.store.close()
        python.store.close()


@pytest.mark.parametrize("cut", [False, True])
def test_large_puts_the_same_whole_and_cut(cut):
    """Puts of 32 KiB and more are copied into their slots with streaming stores and their
    checksum read from the buffer (native/frame.c copy_to_slot): around that bound and at
    lengths that are no multiple of the 64-byte step, new keys, the same bytes again and
    corrupt checksums, over two connections, in one read each or cut at random. Both paths
    answer and store the same (the stats compared hold the arena's use: a corrupt put's
    slot is freed alike); every object stored holds the bytes sent under its key."""
    rng = random.Random(7)
    sizes = [32 * KiB - 1, 32 * KiB, 32 * KiB + 1, 40_001, 64 * KiB - 7, 64 * KiB]
    wires = [bytearray(), bytearray()]
    sent, corrupt = {}, 0
    for rid in range(1, 61):
        key = b"L%d" % rid
        data = rng.randbytes(sizes[rid % len(sizes)])
        csum = checksum(data)
        if rid % 9 == 0:
            csum ^= 1 << rng.randrange(64)
            corrupt += 1
        elif rid % 7 == 0 and sent:
            key, data = rng.choice(sorted(sent.items()))  # stored already (or evicted since)
            csum = checksum(data)
        else:
            sent[key] = data
        wires[rid % 2] += encode_request(OP_PUT, rid, NS, key, len(data), csum) + data
    reads, pos = [], [0, 0]
    for _ in range(10_000):  # bounded: each read takes at least a byte
        live = [c for c in (0, 1) if pos[c] < len(wires[c])]
        if not live:
            break
        c = rng.choice(live)
        n = rng.choice([1, 40, 3000, 33_000, 65_600, 150_000]) if cut else len(wires[c])
        reads.append((c, bytes(wires[c][pos[c]:pos[c] + n])))
        pos[c] += n
    native, python = Side(True, "packed"), Side(False, "packed")
    try:
        for conn, data in reads:
            native.read(conn, data)
            python.read(conn, data)
        assert native.wire == python.wire
        assert native.state() == python.state()
        c = native.store.counters
        assert c["checksum_failures"] == corrupt and c["puts"] >= 40 and c["evictions"]
        objects = native.state()["objects"]
        assert len(objects) >= 10
        for _, key, size, csum, in_dram, _, stored in objects:
            assert in_dram and stored == sent[key] and csum == checksum(stored)
        # the C run took every whole buffered put but the first of each size (the size's
        # class is not cached yet: the Python path's)
        assert native.put_bytes_calls <= len(sizes) < python.put_bytes_calls
    finally:
        native.store.close()
        python.store.close()


def test_reads_end_at_whole_frames_of_the_last_put():
    """After a put below LARGE_PAYLOAD the session offers reads that end where whole frames
    of its length would (DataSession.receive_buffer, ``frame``): a stream of same-size puts
    read as uvloop reads (as much as is offered, the socket never short) is then never cut
    at the buffer's end, so the C run stores every put after the first (no reservation, no
    Python path), where reads of the whole buffer cut one put in four. Both paths set
    ``frame`` alike: they read, answer and store the same. A stream of other sizes and gets
    after it (reads then cut frames again) is answered in order."""
    rng = random.Random(11)
    size = 64 * KiB - 100  # (max_value_size here is 64 KiB)
    blobs = [rng.randbytes(size) for _ in range(30)]
    frames = [encode_request(OP_PUT, i + 1, NS, b"w%02d" % i, size, checksum(b)) + b
              for i, b in enumerate(blobs)]
    flen = len(frames[0])
    tail = b"".join(encode_request(OP_PUT, 100 + i, NS, b"m%d" % i, len(b), checksum(b)) + b
                    for i, b in enumerate(rng.randbytes(rng.randrange(1, 64 * KiB))
                                          for _ in range(12)))
    tail += b"".join(encode_request(OP_GET, 200 + i, NS, b"w%02d" % i) for i in range(5))
    seen = []
    for native in (True, False):
        side = Side(native, "packed", dram=4 * MiB)
        reserve, put_bytes = side.store.reserve, side.store.put_bytes
        reserved, put = [], []  # keys of the puts that reserved a slot / took put_bytes

        def reserving(*a, **kw):
            reserved.append(a[1])
            return reserve(*a, **kw)

        def putting(*a, **kw):
            put.append(a[1])
            return put_bytes(*a, **kw)

        side.store.reserve, side.store.put_bytes = reserving, putting
        try:
            s = side.sessions[0]
            side.read(0, frames[0])  # the first put: its size's class is met here
            assert s.frame == flen and reserved == []
            wire, offered, pos = b"".join(frames[1:]) + tail, [], 0
            for _ in range(10_000):  # bounded: each read takes at least a byte
                if pos == len(wire):
                    break
                b = s.receive_buffer()
                n = min(len(b), len(wire) - pos)
                assert n > 0
                offered.append((len(b), s.reader.end - s.reader.start, pos))
                b[:n] = wire[pos:pos + n]
                pos += n
                s.received(n)
                side.wire[0].extend(bytes(x) for x in s.take_output())
                s.written(0)
            assert pos == len(wire)
            frames_end = (len(frames) - 1) * flen
            aligned = [o for o, held, at in offered if at + o <= frames_end]
            assert len(aligned) >= 3 and all((o + held) % flen == 0 for o, held, at in offered
                                             if at + o <= frames_end)
            # none of the same-size puts was cut: none reserved a slot
            assert not [k for k in reserved if k.startswith(b"w")]
            if native:  # the C run took every same-size put but the first
                assert [k for k in put if k.startswith(b"w")] == [b"w00"]
            answers = [bytes(f) for f in side.wire[0]]
            seen.append((b"".join(answers), side.state()))
        finally:
            side.store.close()
    assert seen[0] == seen[1]
    rids = []
    data = seen[0][0]
    for _ in range(100):  # bounded: one answer a round
        if not data:
            break
        h = Header(*HEADER.unpack_from(data)[2:])
        rids.append(h.req_id)
        assert h.status == 0, h
        data = data[HEADER_SIZE + h.length:]
    assert rids == [*range(1, 31), *range(100, 112), *range(200, 205)]


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


@pytest.mark.parametrize("hook", ["same", "alloc", "clock"])
def test_python_a_run_calls_cannot_move_what_it_reads(hook):
    """Python a run calls (Store._same, alloc and its evictions, the clock) that resizes the
    reader's buffer, or empties the put histogram's counts: a typed error out of put_run,
    never a read of moved memory (before: the dedup answer read the request id through a
    stale pointer, and the histogram was indexed past its end; ASan, `make sanitize`)."""
    side = Side(True, "packed")
    try:
        s = side.sessions[0]
        d = b"y" * 1000

        def frame(rid: int, key: bytes) -> bytes:
            return encode_request(OP_PUT, rid, NS, key, len(d), checksum(d)) + d

        side.read(0, frame(1, b"r1"))  # a size's first put takes the Python path
        assert side.store.counters["puts"] == 1
        ctx = list(s.fast_put)
        at = {"alloc": 3, "clock": 10, "same": 18}[hook]
        real = ctx[at]
        hist = side.plane.latency[OP_PUT]

        def hostile(*a, **kw):
            if hook == "clock":
                del hist.counts[:]
            else:
                s.reader.buf.extend(bytes(1 << 20))  # would move the bytes the run reads
            return real(*a, **kw)

        ctx[at] = hostile
        wire = frame(2, b"r1") if hook == "same" else frame(2, b"r2")  # r1 again: _same
        size = len(s.reader.buf)
        s.reader.buf[:len(wire)] = wire
        s.reader.start, s.reader.end = 0, len(wire)
        with pytest.raises(RuntimeError if hook == "clock" else BufferError):
            session_mod._put_run(s, tuple(ctx), 4)
        assert len(s.reader.buf) == size  # not resized under the run
    finally:
        side.store.close()
