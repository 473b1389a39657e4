"""kvstored._frame.next_frame (native/frame.c) answers as FrameReader.next (wire.py), which
the daemon's sessions call in its place: the same headers, names, reader positions, None
for what is incomplete, and the codec's FrameError for a bad magic or version."""
from __future__ import annotations

import random
import struct

import pytest

from kvstore.wire import HEADER, HEADER_SIZE, FrameError, FrameReader, Header

_frame = pytest.importorskip("kvstored._frame", reason="native/frame.c not built")


def _raw(rng: random.Random, magic=b"KVSD", version=1) -> bytes:
    nl, kl = rng.choice([0, 1, 3, 255]), rng.choice([0, 1, 7, 128, 255])
    fields = (magic, version, rng.randrange(256), rng.randrange(1 << 16), rng.getrandbits(64),
              rng.randrange(1 << 16), nl, kl, rng.getrandbits(32), rng.getrandbits(64),
              rng.getrandbits(64))
    return HEADER.pack(*fields) + rng.randbytes(nl) + rng.randbytes(kl)


def _twins(data: bytes, start: int = 0) -> tuple[FrameReader, FrameReader]:
    out = []
    for _ in range(2):
        r = FrameReader(64 << 10)
        r.buf[start:start + len(data)] = data
        r.start, r.end = start, start + len(data)
        out.append(r)
    return out[0], out[1]


def _answers(r: FrameReader, parse) -> list:
    got = []
    for _ in range(64):  # bounded: each step consumes a frame or stops
        try:
            f = parse(r)
        except FrameError as e:
            got.append(("error", e.request_id, e.message))
            break
        got.append((f, r.start, r.end))
        if f is None:
            break
    return got


def test_streams_of_frames_cut_anywhere_parse_the_same():
    rng = random.Random(11)
    for _ in range(300):
        frames = b"".join(_raw(rng) for _ in range(rng.randrange(1, 5)))
        cut = rng.randrange(len(frames) + 1)  # an incomplete tail at a random point
        c, p = _twins(frames[:cut], start=rng.choice([0, 17]))
        native = _answers(c, lambda r: _frame.next_frame(r, Header))
        assert native == _answers(p, FrameReader.next)
        for f, *_ in native[:-1]:
            assert type(f[0]) is Header and type(f[1]) is bytes and type(f[2]) is bytes


def test_bad_magic_or_version_raises_the_codecs_error():
    rng = random.Random(12)
    for bad in ({"magic": b"KVSX"}, {"version": 2}, {"magic": b"\0\0\0\0", "version": 0}):
        data = _raw(rng) + _raw(rng, **bad)
        c, p = _twins(data)
        native = _answers(c, lambda r: _frame.next_frame(r, Header))
        assert native == _answers(p, FrameReader.next)
        assert native[-1][0] == "error" and len(native) == 2


def test_nothing_parsed_while_a_payload_is_received_and_bad_arguments_refused():
    rng = random.Random(13)
    c, _ = _twins(_raw(rng))
    c.receive_into(memoryview(bytearray(10 ** 6)), 10 ** 6)  # a payload target is set
    assert _frame.next_frame(c, Header) is None
    c, _ = _twins(_raw(rng))
    with pytest.raises(TypeError):
        _frame.next_frame(c, dict)
    with pytest.raises(TypeError):
        _frame.next_frame(c)
    c.end = len(c.buf) + 1  # positions outside the buffer: refused, not read
    with pytest.raises(ValueError):
        _frame.next_frame(c, Header)
    # far apart: end - start overflowed (UBSan) and wrapped to "incomplete"
    for c.start, c.end in ((-(1 << 62), 1 << 62), (-1, 0), (-(1 << 63), 40)):
        with pytest.raises(ValueError):
            _frame.next_frame(c, Header)
    assert struct.calcsize(HEADER.format) == HEADER_SIZE == 40
