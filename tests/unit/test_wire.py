"""kvstore.wire without sockets: header codec and the incremental frame reader."""
from __future__ import annotations

import random

import pytest

from kvstore import errors, wire
from kvstore.wire import (FLAG_OVERWRITE, FLAG_RESPONSE, HEADER, HEADER_SIZE, MAGIC, OP_AUTH,
                          OP_GET, OP_PING, OP_PUT, VERSION, FrameError, FrameReader, Header,
                          checksum, decode, encode_auth, encode_error, encode_request,
                          encode_response)


def test_request_round_trip():
    raw = encode_request(OP_PUT, 77, b"ns", b"key", 5, 123, FLAG_OVERWRITE, epoch=9)
    h = decode(raw)
    assert h == Header(OP_PUT, FLAG_OVERWRITE, 77, 0, 2, 3, 9, 5, 123)
    assert raw[HEADER_SIZE:] == b"nskey"
    assert h.encode(b"ns", b"key") == raw


def test_response_and_error_round_trip():
    h = decode(encode_response(OP_GET, 1 << 63, 0, 1 << 40, (1 << 64) - 1, aux=3))
    assert (h.op, h.flags, h.req_id, h.length, h.checksum, h.aux) == (
        OP_GET, FLAG_RESPONSE, 1 << 63, 1 << 40, (1 << 64) - 1, 3)
    frame = encode_error(OP_PUT, 5, errors.NoSpace.code, "x" * 5000)
    h = decode(frame)
    assert h.status == errors.NoSpace.code and h.length == wire.MAX_ERROR_MESSAGE
    assert len(frame) == HEADER_SIZE + h.length


def test_auth_frame_bounds():
    h = decode(encode_auth(3, "t" * wire.MAX_TOKEN_LEN))
    assert (h.op, h.length) == (OP_AUTH, wire.MAX_TOKEN_LEN)
    for bad in ("", "t" * (wire.MAX_TOKEN_LEN + 1)):
        with pytest.raises(errors.InvalidArgument):
            encode_auth(3, bad)


def test_bad_magic_version_truncated():
    good = encode_request(OP_PING, 42, b"", b"")
    with pytest.raises(FrameError, match="magic") as e:
        decode(b"XXXX" + good[4:])
    assert e.value.request_id == 42  # the version matched: the id can be trusted
    with pytest.raises(FrameError, match="magic") as e:
        decode(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 20)
    assert e.value.request_id == 0
    with pytest.raises(FrameError, match="version 2") as e:
        decode(good[:4] + bytes([2]) + good[5:])
    assert e.value.request_id == 42
    for n in (0, 1, HEADER_SIZE - 1):
        with pytest.raises(FrameError, match="truncated"):
            decode(good[:n])
    assert isinstance(FrameError("x"), errors.ProtocolError)  # a typed error clients know


def test_unknown_ops_and_long_names_decode():
    """Op and name-length policy is the session's (a typed error, the stream goes on; see
    tests/unit/test_session.py): the codec decodes any op and u8 lengths as they are."""
    raw = HEADER.pack(MAGIC, VERSION, 99, 0, 1, 0, 255, 255, 0, 0, 0) + b"n" * 255 + b"k" * 255
    r = FrameReader()
    r.feed(raw)
    h, ns, key = r.next()
    assert (h.op, len(ns), len(key)) == (99, 255, 255) and r.buffered() == 0


def _drain(reader: FrameReader, data: bytes, sizes, big_payloads: bool):
    """Feed ``data`` in chunks of ``sizes``; collect (header, ns, key, payload) frames.
    Payloads of 64+ bytes go into their own buffer through receive_into (as the daemon's
    put does); smaller ones are skipped every other time to exercise skip()."""
    frames, pos, state = [], 0, None
    chunks = iter(sizes)
    for _ in range(len(data) + 10):
        # parse everything buffered
        for _ in range(len(data) + 10):
            if state is not None:
                break
            f = reader.next()
            if f is None:
                break
            h, ns, key = f
            if h.length >= 64 and big_payloads:
                buf = bytearray(h.length)
                state = (h, ns, key, buf)
                if reader.receive_into(memoryview(buf), h.length):
                    frames.append(state)
                    state = None
            else:
                if reader.skip(h.length):
                    frames.append((h, ns, key, None))
                else:
                    state = (h, ns, key, None)
        if pos >= len(data):
            break
        n = min(next(chunks, 1 << 20), len(data) - pos)
        while n:
            dst = reader.buffer()
            k = min(len(dst), n)
            if k == 0:  # header buffer full of unparsed frames: parse first
                break
            dst[:k] = data[pos:pos + k]
            pos += k
            n -= k
            if reader.filled(k):
                frames.append(state)
                state = None
                break  # parse before feeding more, as the daemon does
    assert state is None and reader.buffered() == 0
    return frames


def _stream(rng: random.Random, count: int):
    data, expect = bytearray(), []
    for i in range(count):
        ns = bytes(rng.choice(b"abcxyz") for _ in range(rng.randint(0, 64)))
        key = rng.randbytes(rng.randint(0, 128))
        plen = rng.choice((0, 1, 63, 64, 1000, 70_000, 300_000))
        if plen > 1000 and rng.random() < 0.7:  # keep the stream small: the splits matter
            plen = 1000
        payload = rng.randbytes(plen)
        data += encode_request(OP_PUT, i, ns, key, plen, checksum(payload)) + payload
        expect.append((i, ns, key, payload))
    return bytes(data), expect


@pytest.mark.parametrize("seed", range(12))
def test_randomized_splits(seed):
    """The same stream cut at random places always yields the same frames and payloads."""
    rng = random.Random(seed)
    data, expect = _stream(rng, 40)
    sizes = iter(lambda: rng.choice((1, 2, 7, 39, 40, 41, 500, 65536, 1 << 20)), None)
    reader = FrameReader(rng.choice((4096, 256 << 10)))
    frames = _drain(reader, data, sizes, big_payloads=True)
    assert len(frames) == len(expect)
    for (h, ns, key, buf), (i, ens, ekey, payload) in zip(frames, expect):
        assert (h.req_id, ns, key) == (i, ens, ekey)
        assert h.length == len(payload)
        if buf is not None:
            assert bytes(buf) == payload and checksum(buf) == h.checksum


def test_need_reports_the_next_step():
    r = FrameReader()
    raw = encode_request(OP_PUT, 1, b"ns", b"k", 10)
    assert r.need() == HEADER_SIZE
    r.view[:10] = raw[:10]
    r.filled(10)
    assert r.need() == HEADER_SIZE - 10
    r.buffer()[:HEADER_SIZE - 10] = raw[10:HEADER_SIZE]
    r.filled(HEADER_SIZE - 10)
    assert r.need() == 3 and r.next() is None  # ns and key still missing
    r.buffer()[:3] = raw[HEADER_SIZE:]
    r.filled(3)
    assert r.need() == 0
    h, ns, key = r.next()
    assert (ns, key, h.length) == (b"ns", b"k", 10)
    dest = bytearray(10)
    assert r.receive_into(memoryview(dest), 10) is False
    assert r.receiving and r.need() == 10 and r.next() is None
    r.buffer()[:4] = b"abcd"
    assert r.filled(4) is False and r.need() == 6
    r.buffer()[:6] = b"efghij"
    assert r.filled(6) is True and not r.receiving
    assert bytes(dest) == b"abcdefghij"


def test_take_inline_payload_and_feed():
    r = FrameReader()
    raw = encode_error(OP_GET, 9, errors.NotFound.code, "missing")
    assert r.feed(raw[:45]) == 45
    h, _, _ = r.next()
    assert r.take(h.length) is None  # not all here yet
    assert r.feed(raw[45:]) == len(raw) - 45
    assert r.take(h.length) == b"missing" and r.buffered() == 0


def test_garbage_stream_raises_and_does_not_advance():
    r = FrameReader()
    r.feed(b"\x16\x03\x01" + bytes(100))  # a TLS ClientHello sent to a plaintext port
    for _ in range(2):
        with pytest.raises(FrameError):
            r.next()


def test_reader_rejects_a_tiny_buffer():
    with pytest.raises(ValueError):
        FrameReader(100)


def test_large_declared_lengths_parse_without_allocating():
    """A header may declare up to 2**64-1 payload bytes: parsing it allocates nothing;
    the owner decides (the daemon rejects, skips up to a bound, or closes)."""
    r = FrameReader()
    r.feed(HEADER.pack(MAGIC, VERSION, OP_PUT, 0, 5, 0, 1, 1, 0, (1 << 64) - 1, 0) + b"nk")
    h, ns, key = r.next()
    assert h.length == (1 << 64) - 1 and (ns, key) == (b"n", b"k")
    assert r.skip(1 << 30) is False and r.need() == 1 << 30


def test_divert_stops_writing_into_the_owner_buffer():
    r = FrameReader()
    r.feed(encode_response(OP_GET, 1, 0, 100) + b"a" * 30)
    h, _, _ = r.next()
    dest = bytearray(100)
    assert r.receive_into(memoryview(dest), 100) is False
    r.divert()  # the caller gave up: the rest goes to scratch
    assert r.need() == 70 and r.feed(b"b" * 70) == 70
    assert not r.receiving and bytes(dest) == b"a" * 30 + bytes(70)
    r.feed(encode_response(OP_PING, 2))
    assert r.next()[0].req_id == 2  # the stream stays in step
