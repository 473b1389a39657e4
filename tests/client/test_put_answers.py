"""A plain TCP channel reads a window's PUT answers in bulk (TcpChannel._put_answers_bulk:
as many 40-byte answers per recv as have arrived, never a byte past the last one) and
sends records whose checksum is known as two buffers each (put_frames_hashed).

Real daemon on 127.0.0.1. What splits, cuts or damages the answers is a relay between
the channel and the daemon's data port that forwards the daemon's answers frame by frame
(header, then an error's message), optionally a few bytes at a time, rewritten, followed
by bytes of its own, or cut off."""
from __future__ import annotations

import fcntl
import itertools
import os
import socket
import termios
import time

import pytest
from threadutil import run_threads
import relayutil

from kvstore import errors
from kvstore.channel import TcpChannel
from kvstore.wire import HEADER, HEADER_SIZE, checksum, checksum_parts

pytestmark = pytest.mark.timeout(120)

NS = b"answers"
TIMEOUT = 10.0


class AnswerRelay(relayutil.Relay):
    """Forwards the daemon's answers one frame at a time: ``rule(i, header tuple)`` may
    return a replacement header tuple (or None: unchanged); ``chunk`` > 0 sends every
    frame that many bytes at a time (a pause between), ``cut_after`` closes both sockets
    after that many answers, and ``extra`` is sent after answer number ``extra_after``."""

    def __init__(self, target, rule=None, chunk: int = 0, cut_after: int | None = None,
                 extra: bytes = b"", extra_after: int = 0):
        self.rule, self.chunk, self.cut_after = rule, chunk, cut_after
        self.extra, self.extra_after = extra, extra_after
        self.answers = 0
        super().__init__(target, timeout=30)

    @staticmethod
    def _exact(sock, n: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            got = sock.recv(n - len(buf))
            if not got:
                return None
            buf += got
        return bytes(buf)

    def _send(self, dst, data: bytes) -> None:
        if not self.chunk:
            dst.sendall(data)
            return
        for i in range(0, len(data), self.chunk):
            dst.sendall(data[i:i + self.chunk])
            time.sleep(0.0002)

    def down(self, src, dst) -> None:
        dst.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while not self._stop.is_set():
                head = self._exact(src, HEADER_SIZE)
                if head is None:
                    break
                t = HEADER.unpack(head)
                body = self._exact(src, t[-2]) if t[-2] else b""
                if body is None:
                    break
                new = self.rule(self.answers, t) if self.rule else None
                if new is not None:
                    head = HEADER.pack(*new)
                self.answers += 1
                self._send(dst, head + body)
                if self.extra and self.answers == self.extra_after:
                    self._send(dst, self.extra)
                if self.cut_after is not None and self.answers >= self.cut_after:
                    break
        except OSError:
            pass
        self.shut(src, dst)


class CountingSocket:
    """The channel's socket, with the size of every recv_into it returns recorded."""

    def __init__(self, sock):
        self.sock, self.reads = sock, []

    def recv_into(self, *a):
        n = self.sock.recv_into(*a)
        self.reads.append(n)
        return n

    def __getattr__(self, name):
        return getattr(self.sock, name)


@pytest.fixture
def daemon(module_daemons):
    return module_daemons()


def channel(port: int) -> TcpChannel:
    ch = TcpChannel("127.0.0.1", port, TIMEOUT)
    ch.setup(None)
    return ch


def items(tag: str, n: int, size: int = 100) -> list:
    out = []
    for i in range(n):
        v = os.urandom(size)
        out.append((f"{tag}-{i}".encode(), [memoryview(v)], size))
    return out


@pytest.fixture
def relay(daemon):
    made = []

    def make(**kw) -> AnswerRelay:
        r = AnswerRelay(("127.0.0.1", daemon.data_port), **kw)
        made.append(r)
        return r
    yield make
    for r in made:
        r.close()


def test_a_burst_of_answers_is_read_in_one_recv(daemon):
    """300 answers already waiting: one recv takes them all (not one per answer)."""
    ch = channel(daemon.data_port)
    try:
        its = items("burst", 300)
        order: dict = {}
        ch.send(ch.put_frames(NS, its, False, order))
        want = 300 * HEADER_SIZE
        deadline = time.monotonic() + 20
        buf = bytearray(4)
        while time.monotonic() < deadline:  # until every answer is in the socket
            fcntl.ioctl(ch.sock.fileno(), termios.FIONREAD, buf)
            if int.from_bytes(buf, "little") >= want:
                break
            time.sleep(0.01)
        ch.sock = CountingSocket(ch.sock)
        assert ch.put_answers(order) == [True] * 300
        assert ch.sock.reads == [want]
        ch.ping()  # the stream is in step
    finally:
        ch.close()


def test_answers_split_anywhere_are_reassembled(daemon, relay):
    """Answers arriving 3 bytes at a time (headers split across reads), an error's message
    among them: every result is right, the error comes after all, the stream stays in step."""
    plain = channel(daemon.data_port)
    try:
        taken = items("split-taken", 1)
        assert plain.put_batch(NS, taken, False) == [True]
    finally:
        plain.close()
    r = relay(chunk=3)
    ch = channel(r.port)
    try:
        ch.sock = CountingSocket(ch.sock)
        its = items("split", 40)
        other = os.urandom(100)  # different bytes under a stored key: a Conflict
        its.insert(17, (taken[0][0], [memoryview(other)], 100))
        with pytest.raises(errors.Conflict):
            ch.put_batch(NS, its, False)
        assert any(n % HEADER_SIZE for n in ch.sock.reads), ch.sock.reads[:20]
        # the 40 others were stored: a repeat is all no-ops but the Conflict again
        with pytest.raises(errors.Conflict):
            ch.put_batch(NS, its, False)
        assert ch.put_batch(NS, its[:17] + its[18:], False) == [False] * 40
        ch.ping()
    finally:
        ch.close()


def test_no_byte_past_the_last_answer_is_taken(daemon, relay):
    """Bytes that follow the answers (here the relay's own) stay in the socket: the bulk
    reader asks for at most what the outstanding answers take."""
    extra = b"Z" * 100
    r = relay(extra=extra, extra_after=25)
    ch = channel(r.port)
    try:
        # the setup PING was answer 1; the 24 puts end at answer 25
        assert ch.put_batch(NS, items("exact", 24), False) == [True] * 24
        ch.sock.settimeout(5)
        got = b""
        while len(got) < len(extra):
            got += ch.sock.recv(len(extra) - len(got))
        assert got == extra
    finally:
        ch.close()


@pytest.mark.parametrize("damage", ["payload", "unknown_id", "bad_magic"])
def test_a_damaged_answer_is_a_protocol_error(daemon, relay, damage):
    """An OK put answer claiming a payload, an answer to no request, a frame that is not
    one: ProtocolError at once (not after the timeout)."""
    def rule(i, t):
        if i != 6:  # answer 0 is the setup PING's; 6 is the sixth put's
            return None
        t = list(t)
        if damage == "payload":
            t[-2] = 1 << 40
        elif damage == "unknown_id":
            t[4] = 999_999
        else:
            t[0] = b"XXXX"
        return tuple(t)
    r = relay(rule=rule)
    ch = channel(r.port)
    try:
        t0 = time.monotonic()
        with pytest.raises(errors.ProtocolError):
            ch.put_batch(NS, items(f"dmg-{damage}", 12), False)
        assert time.monotonic() - t0 < TIMEOUT / 2
    finally:
        ch.close()


def test_a_stream_cut_among_the_answers_is_an_error(daemon, relay):
    r = relay(cut_after=5)  # the PING's answer and four of the ten puts'
    ch = channel(r.port)
    try:
        with pytest.raises((ConnectionError, OSError)):
            ch.put_batch(NS, items("cut", 10), False)
    finally:
        ch.close()


def test_threads_each_with_a_channel(daemon):
    """Four threads, a channel each, 50 windows of 20 puts: every answer is right."""

    def run(t: int) -> None:
        ch = channel(daemon.data_port)
        try:
            for w in range(50):
                its = items(f"thr{t}-{w}", 20, size=1000)
                assert ch.put_batch(NS, its, False) == [True] * 20
                assert ch.put_batch(NS, its, False) == [False] * 20
        finally:
            ch.close()
    run_threads(run, range(4), timeout=100)


def test_hashed_frames_are_the_frames_put_frames_makes(daemon):
    """put_frames_hashed with the checksum given gives the same bytes as put_frames hashing
    the two buffers itself; the daemon stores them as the concatenation."""
    ch = channel(daemon.data_port)
    try:
        recs = []
        for i, (hl, bl) in enumerate([(128, 1000), (48, 0), (0, 5), (128, 300_000), (200, 1)]):
            head, body = os.urandom(hl), memoryview(os.urandom(bl))
            recs.append((b"hashed-%d" % i, head, body, checksum(head + bytes(body))))
        for ns in (NS, b"a-much-longer-namespace.for/the:frames"):
            for overwrite in (False, True):
                ch._rid, o1 = itertools.count(7), {}
                a = ch.put_frames(ns, [(k, [h, b], len(h) + len(b)) for k, h, b, _c in recs], overwrite, o1)
                ch._rid, o2 = itertools.count(7), {}
                b2 = ch.put_frames_hashed(ns, recs, overwrite, o2)
                assert o1 == o2
                assert b"".join(bytes(x) for x in a) == b"".join(bytes(x) for x in b2)
                assert len(b2) == 2 * len(recs)  # two buffers a request
        order: dict = {}
        ch.send(ch.put_frames_hashed(NS, recs, False, order))
        assert ch.put_answers(order) == [True] * len(recs)
        for k, h, b, c in recs:
            assert checksum_parts([h, b]) == c
        got = ch.get_batch(NS, [k for k, *_ in recs], None, True, bytearray)
        assert [bytes(g) for g in got] == [h + bytes(b) for _k, h, b, _c in recs]
        # a wrong checksum is refused by the daemon, as on any put
        k, h, b, c = recs[0]
        order = {}
        ch.send(ch.put_frames_hashed(NS, [(b"wrong", h, b, c ^ 1)], False, order))
        with pytest.raises(errors.ChecksumMismatch):
            ch.put_answers(order)
        ch.ping()
    finally:
        ch.close()


def test_hashed_frames_of_many_shapes(daemon):
    """Key and head lengths of every kind, more shapes than the packer cache keeps, and
    lengths whose packed sizes add up alike (1 + 65536 and 2 + 65535): every frame is
    the one put_frames makes."""
    from kvstore import channel as chmod
    ch = channel(daemon.data_port)
    try:
        shapes = [(kl, hl) for kl in (1, 2, 3, 17, 64, 127, 128) for hl in (0, 1, 36, 128, 129)]
        shapes += [(1, 65536), (2, 65535), (1, 65537), (3, 65534)]
        shapes += [(5 + i % 100, 300 + i) for i in range(chmod._PUT_FRAMES_MAX + 20)]  # past the bound
        for kl, hl in shapes:
            k, head, body = b"k" * kl, os.urandom(hl), memoryview(os.urandom(7))
            rec = (k, head, body, checksum(head + bytes(body)))
            ch._rid, o1 = itertools.count(3), {}
            a = ch.put_frames(NS, [(k, [head, body], hl + 7)], False, o1)
            ch._rid, o2 = itertools.count(3), {}
            b = ch.put_frames_hashed(NS, [rec], False, o2)
            assert b"".join(bytes(x) for x in a) == b"".join(bytes(x) for x in b), (kl, hl)
            assert len(chmod._PUT_FRAMES) <= chmod._PUT_FRAMES_MAX
        ch.ping()
    finally:
        ch.close()
