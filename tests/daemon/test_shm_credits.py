"""shm puts in one round trip (credits: slots reserved ahead) and leases released late,
against real kvstored processes; raw-socket cases play the hostile client."""
from __future__ import annotations

import mmap
import os
import socket

import pytest

import kvstore
from daemonutil import config, counters, read_frame, wait_for
from kvstore import wire
from threadutil import run_threads

KiB, MiB = 1 << 10, 1 << 20
SMALL = ("--dram-size", "8MiB", "--slab-size", "1MiB", "--max-value-size", "1MiB")


class Raw:
    """A hand-driven shm connection: the arena mapped, frames written by hand."""

    def __init__(self, path: str):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(5)
        self.s.connect(path)
        msg, fds, _, _ = socket.recv_fds(self.s, 4096, 1)
        assert msg[:4] == wire.SHM_MAGIC and fds
        size = wire.SHM_HELLO.unpack_from(msg)[2]
        self.arena = mmap.mmap(fds[0], size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        for fd in fds:
            os.close(fd)
        self.rid = 0

    def send(self, op, ns=b"", key=b"", length=0, csum=0, flags=0) -> int:
        self.rid += 1
        self.s.sendall(wire.encode_request(op, self.rid, ns, key, length, csum, flags))
        return self.rid

    def frame(self):
        """(Header, body) of the next response, or None when the daemon hung up."""
        return read_frame(self.s)

    def credit(self, ns: bytes, key: bytes, value: bytes) -> tuple[int, int, int] | None:
        """Put ``value`` by reserve / copy / commit asking for a refill: the credit granted."""
        self.send(wire.OP_SHM_RESERVE, ns, key, len(value), wire.checksum(value), wire.FLAG_OVERWRITE)
        h, body = self.frame()
        assert h.status == 0, body
        off, size, res = wire.SHM_IDS.unpack(body)
        self.arena[off:off + size] = value
        self.send(wire.OP_SHM_COMMIT, csum=res, flags=wire.FLAG_REFILL)
        h, body = self.frame()
        assert h.status == 0, body
        if not body:
            return None  # stored, but no credit granted (a bound)
        assert len(body) == wire.SHM_IDS.size and h.checksum > 0  # checksum field: its life in ms
        return wire.SHM_IDS.unpack(body)

    def close(self):
        self.s.close()
        self.arena.close()


def _frames_sent(conn) -> list:
    """Wrap ``conn.send`` to record the ops of the frames it sends."""
    ops: list = []
    send = conn.send

    def spy(buffers):
        for b in buffers:
            b = bytes(b)
            if b[:4] == wire.MAGIC and len(b) >= wire.HEADER_SIZE:
                at = 0
                while at + wire.HEADER_SIZE <= len(b) and b[at:at + 4] == wire.MAGIC:
                    h = wire.decode(b, at)
                    ops.append(h.op)
                    # requests here carry no payload but OP_PUT's
                    at += wire.HEADER_SIZE + h.ns_len + h.key_len + (h.length if h.op == wire.OP_PUT else 0)
        send(buffers)
    conn.send = spy
    return ops


@pytest.fixture
def daemon(shared_daemon):
    """The module's tests share one kvstored, emptied before each (conftest.shared_daemon):
    counters are read as differences; a test that needs other flags, or damages its
    daemon, uses start_daemon."""
    return shared_daemon


def test_put_after_the_first_is_one_request(daemon):
    with kvstore.Client(daemon.control, namespace="cr") as c, \
            kvstore.Client(daemon.control, namespace="cr", transport="tcp") as t:
        assert c.transport == "shm"
        granted = counters(t).get("shm_credits_granted", 0)
        conn = c._run(lambda x: x)
        ops = _frames_sent(conn)
        v = [os.urandom(MiB) for _ in range(4)]
        assert c.put(b"a", v[0]) is True  # no credit yet: reserve + commit (with refill)
        assert ops == [wire.OP_SHM_RESERVE, wire.OP_SHM_COMMIT]
        ops.clear()
        assert c.put(b"b", v[1]) is True  # the credit: one frame, one answer
        assert ops == [wire.OP_SHM_PUT]
        ops.clear()
        assert c.put(b"b", v[1]) is False  # dedup: answered, and the credit comes back
        assert c.put(b"c", v[2]) is True
        assert ops == [wire.OP_SHM_PUT, wire.OP_SHM_PUT]
        with pytest.raises(kvstore.Conflict):  # different bytes, no overwrite: nothing changes
            c.put(b"a", v[3])
        assert c.put(b"a", v[3], overwrite=True) is True
        for k, want in ((b"a", v[3]), (b"b", v[1]), (b"c", v[2])):
            assert t.get(k) == want and c.get(k) == want
        # a batch: the first window takes credits for all, the next one uses only them
        items = [(b"k%d" % i, os.urandom(64 * KiB)) for i in range(32)]
        assert c.batch_put(items) == [True] * 32
        ops.clear()
        items2 = [(k, os.urandom(64 * KiB)) for k, _ in items]
        assert c.batch_put(items2, overwrite=True) == [True] * 32
        assert set(ops) == {wire.OP_SHM_PUT} and len(ops) == 32
        assert t.batch_get([k for k, _ in items2]) == [v for _, v in items2]
        assert counters(c)["shm_credits_granted"] >= granted + 33


def test_credits_are_bounded_and_expire_when_never_used(start_daemon, tmp_path):
    # an 8 MiB arena: credits of one connection hold at most 1 MiB (1/8); a hostile client
    # that collects them and never puts gets them taken back at the put deadline
    d = start_daemon(*SMALL, "--config", config(
        tmp_path, "[server]\nput_stall_timeout = 0.5\nmin_put_rate = \"1GiB\"\n"))
    with kvstore.Client(d.control, namespace="s") as c:
        raw = Raw(c.info().shm_socket)
        try:
            granted = [raw.credit(b"s", b"k%d" % i, os.urandom(64 * KiB)) for i in range(40)]
            assert sum(g is not None for g in granted) == 16  # 16 x 64 KiB = 1 MiB
            other = Raw(c.info().shm_socket)  # all connections' credits together: 1/8 too
            try:
                assert other.credit(b"s", b"other", os.urandom(64 * KiB)) is None
            finally:
                other.close()
            got = counters(c)
            assert got["shm_credits_granted"] == 16 and got["reserved_bytes"] <= MiB
            assert wait_for(lambda: counters(c).get("reservations", 1) == 0, 10)
            assert counters(c)["shm_credits_expired"] >= 1
            # the connection is still in good standing; the expired credit is refused, typed
            raw.send(wire.OP_PING)
            assert raw.frame()[0].status == 0
            raw.send(wire.OP_SHM_PUT, b"s", b"late", raw.rid, 0)  # an id it was given
            h, body = raw.frame()
            assert h.status == kvstore.InvalidArgument.code and b"unknown credit" in body
            assert c.exists([b"late"]) == [False]
            # and the space is there for everyone
            assert c.batch_put([(b"big%d" % i, os.urandom(MiB)) for i in range(6)]) == [True] * 6
        finally:
            raw.close()


def test_credits_die_with_the_connection(daemon):
    with kvstore.Client(daemon.control, namespace="s") as c:
        raw = Raw(c.info().shm_socket)
        raw.credit(b"s", b"x", os.urandom(MiB))
        assert counters(c)["reservations"] == 1
        raw.close()
        assert wait_for(lambda: counters(c)["reservations"] == 0)


def test_shm_put_refuses_forged_bad_and_mismatched(daemon):
    with kvstore.Client(daemon.control, namespace="s") as c:
        c.put(b"held", b"old bytes")
        raw = Raw(c.info().shm_socket)
        try:
            off, size, cid = raw.credit(b"s", b"first", os.urandom(4096))
            forged = c.stats().counters.get("shm_forged_ids", 0)
            # a credit id never given: typed error, counted, connection alive
            raw.send(wire.OP_SHM_PUT, b"s", b"k", 10 ** 9, 1)
            h, body = raw.frame()
            assert h.status == kvstore.InvalidArgument.code and b"unknown credit" in body
            assert counters(c)["shm_forged_ids"] == forged + 1
            # a bad key (empty): typed error, and the credit is still usable
            raw.send(wire.OP_SHM_PUT, b"s", b"", cid, 1)
            h, body = raw.frame()
            assert h.status == kvstore.InvalidArgument.code
            # bytes that do not match the checksum: refused, nothing stored, credit gone
            v = os.urandom(size)
            raw.arena[off:off + size] = v
            raw.send(wire.OP_SHM_PUT, b"s", b"bad", cid, wire.checksum(v) ^ 1)
            h, body = raw.frame()
            assert h.status == kvstore.ChecksumMismatch.code
            assert c.exists([b"bad"]) == [False]
            raw.send(wire.OP_SHM_PUT, b"s", b"bad", cid, wire.checksum(v))
            assert raw.frame()[0].status == kvstore.InvalidArgument.code
            # a key holding other bytes: Conflict without overwrite, the old object intact
            off, size, cid = raw.credit(b"s", b"second", os.urandom(4096))
            raw.arena[off:off + size] = v
            raw.send(wire.OP_SHM_PUT, b"s", b"held", cid, wire.checksum(v), wire.FLAG_REFILL)
            assert raw.frame()[0].status == kvstore.Conflict.code
            assert c.get(b"held") == b"old bytes"
            # a well-formed one is stored and answered with a fresh credit
            off, size, cid = raw.credit(b"s", b"third", os.urandom(4096))
            raw.arena[off:off + size] = v
            raw.send(wire.OP_SHM_PUT, b"s", b"good", cid, wire.checksum(v), wire.FLAG_REFILL)
            h, body = raw.frame()
            assert h.status == 0 and h.aux == 0 and len(body) == wire.SHM_IDS.size
            assert wire.SHM_IDS.unpack(body)[2] != cid
            assert c.get(b"good") == v
            # oversized: the reservation is refused, typed, nothing read from the socket
            raw.send(wire.OP_SHM_RESERVE, b"s", b"huge", 8 * MiB, 1)  # max_value_size: 4 MiB
            h, body = raw.frame()
            assert h.status == kvstore.InvalidArgument.code and b"max_value_size" in body
            raw.send(wire.OP_PING)
            assert raw.frame()[0].status == 0
        finally:
            raw.close()


def test_leases_bounded_late_releases_ignored(daemon, monkeypatch):
    from kvstored.dataplane import shm as dshm

    with kvstore.Client(daemon.control, namespace="s") as c:
        stale = counters(c).get("shm_stale_releases", 0)
        c.put(b"a", b"v" * 1000)
        raw = Raw(c.info().shm_socket)
        try:
            n = dshm.MAX_LEASES
            raw.s.sendall(b"".join(wire.encode_request(wire.OP_SHM_GET, i + 1, b"s", b"a")
                                   for i in range(n + 1)))
            raw.rid = n + 1
            leases = []
            for _ in range(n):
                h, body = raw.frame()
                assert h.status == 0
                leases.append(wire.SHM_IDS.unpack(body)[2])
            h, body = raw.frame()  # one past the bound: refused, typed
            assert h.status == kvstore.NoSpace.code and b"leases" in body
            raw.send(wire.OP_SHM_RELEASE, csum=leases[0])
            raw.send(wire.OP_SHM_RELEASE, csum=leases[0])  # again: late, ignored
            raw.send(wire.OP_SHM_GET, b"s", b"a")
            h, body = raw.frame()
            assert h.status == 0  # room for one again; the connection lives
            assert counters(c)["shm_stale_releases"] >= stale + 1
        finally:
            raw.close()


def test_sdk_defers_releases_within_bounds(daemon):
    from kvstore import shm as cshm

    with kvstore.Client(daemon.control, namespace="s") as c:
        keys = [b"k%d" % i for i in range(40)]
        c.batch_put([(k, os.urandom(64 * KiB)) for k in keys])
        conn = c._run(lambda x: x)
        bufs = [bytearray(64 * KiB) for _ in keys]
        assert c.batch_get_into(keys, bufs) == [64 * KiB] * 40
        assert len(conn._releases) < cshm.DEFERRED_RELEASES  # the rest went with a send
        with c.get_view(b"k0") as v:
            assert len(v) == 64 * KiB
        c.ping()  # the next request carries the deferred releases
        assert conn._releases == []


def test_concurrent_clients_in_a_small_arena(start_daemon):
    # credits must never starve writers: four clients fill an 8 MiB arena over and over.
    # Another writer may evict an object before it is read back (NotFound); what is read
    # is exactly what was put.
    d = start_daemon(*SMALL)
    reads = [0]

    def worker(w: int) -> None:
        with kvstore.Client(d.control, namespace="cc", timeout=20) as c:
            for i in range(24):
                v = os.urandom((256 + 64 * (i % 4)) * KiB)
                assert c.put(b"w%d-%d" % (w, i), v) is True
                buf = bytearray(len(v))
                try:
                    assert c.get_into(b"w%d-%d" % (w, i), buf) == len(v) and buf == v
                    reads[0] += 1
                except kvstore.NotFound:
                    pass
            items = [(b"b%d-%d" % (w, i), os.urandom(128 * KiB)) for i in range(8)]
            assert c.batch_put(items) == [True] * 8

    run_threads(worker, range(4), timeout=120)
    assert reads[0] > 0


def test_get_into_reports_bytes_changed_in_the_arena(start_daemon):
    # copy and checksum go chunk by chunk: a byte changed anywhere is still caught
    daemon = start_daemon()  # its own: the test writes into the daemon's arena
    with kvstore.Client(daemon.control, namespace="s") as c:
        v = os.urandom(MiB + 5)
        c.put(b"big", v)
        raw = Raw(c.info().shm_socket)
        try:
            raw.send(wire.OP_SHM_GET, b"s", b"big")
            h, body = raw.frame()
            off, size, lease = wire.SHM_IDS.unpack(body)
            assert size == len(v) and h.checksum == wire.checksum(v)
            buf = bytearray(2 * MiB)
            assert c.get_into(b"big", buf) == size and buf[:size] == v
            at = off + size - 3  # in the last, partial chunk
            raw.arena[at] ^= 0xFF
            with pytest.raises(kvstore.ChecksumMismatch):
                c.get_into(b"big", buf)
            with pytest.raises(kvstore.ChecksumMismatch):
                c.batch_get_into([b"big", b"big"], [buf, bytearray(2 * MiB)])
            raw.arena[at] ^= 0xFF
            assert c.get_into(b"big", buf) == size and buf[:size] == v
        finally:
            raw.close()
