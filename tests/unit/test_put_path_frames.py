"""FrameReader.next's one-unpack parse (issues 11, 13): every name-length shape, more
shapes than its struct cache keeps, names that stay immutable bytes after the buffer is
reused, frames split at every byte, and bad input still refused. No sockets."""
import random

import pytest

from kvstore import wire
from kvstore.wire import (FLAG_OVERWRITE, HEADER_SIZE, MAX_KEY_LEN, MAX_NAMESPACE_LEN,
                          OP_GET, OP_PUT, FrameError, FrameReader, decode, encode_request)


def frame(i: int, nl: int, kl: int) -> tuple[bytes, bytes, bytes]:
    ns = bytes((97 + (i + j) % 26) for j in range(nl))
    key = bytes((48 + (i * 7 + j) % 10) for j in range(kl))
    return encode_request(OP_PUT, i, ns, key, payload_len=0, payload_checksum=i * 31,
                          flags=FLAG_OVERWRITE, epoch=i), ns, key


def test_every_shape_beyond_the_cache_bound():
    shapes = [(nl, kl) for nl in range(0, MAX_NAMESPACE_LEN + 1, 3)
              for kl in range(0, MAX_KEY_LEN + 1, 5)]
    assert len(shapes) > wire._MAX_FRAMES  # the cache fills; later shapes are built per call
    r = FrameReader()
    for i, (nl, kl) in enumerate(shapes):
        data, ns, key = frame(i, nl, kl)
        assert r.feed(data) == len(data)
        h, got_ns, got_key = r.next()
        assert (got_ns, got_key) == (ns, key)
        assert type(got_ns) is bytes and type(got_key) is bytes  # index keys: immutable
        assert h == decode(data) and h.req_id == i and h.checksum == i * 31
        assert (h.ns_len, h.key_len) == (nl, kl)
        assert r.next() is None and r.buffered() == 0
    assert len(wire._FRAMES) <= wire._MAX_FRAMES


def test_names_survive_buffer_reuse():
    r = FrameReader()
    data, ns, key = frame(1, 10, 20)
    r.feed(data)
    _, got_ns, got_key = r.next()
    other, _, _ = frame(2, 10, 20)
    r.feed(other)  # the same buffer bytes are overwritten
    r.next()
    assert (got_ns, got_key) == (ns, key)


def test_split_at_every_byte_and_pipelined():
    rng = random.Random(7)
    frames = [frame(i, rng.randrange(0, 65), rng.randrange(0, 129)) for i in range(40)]
    stream = b"".join(f[0] for f in frames)
    for cut in range(0, 200):
        r = FrameReader()
        r.feed(stream[:cut])
        got = []
        while (x := r.next()) is not None:
            got.append(x)
        pos = cut
        while pos < len(stream):  # the rest in uneven pieces, bounded by the stream length
            n = r.feed(stream[pos:pos + 1 + (pos % 97)])
            pos += n
            while (x := r.next()) is not None:
                got.append(x)
        assert [(g[1], g[2]) for g in got] == [(f[1], f[2]) for f in frames]
        assert [g[0] for g in got] == [decode(f[0]) for f in frames]


def test_truncated_names_wait_and_bad_magic_raises():
    r = FrameReader()
    data, ns, key = frame(3, 64, 128)
    r.feed(data[:HEADER_SIZE + 64 + 127])  # one key byte short
    assert r.next() is None and r.need() == 1
    r.feed(data[-1:])
    assert r.next()[1:] == (ns, key)
    bad = bytearray(encode_request(OP_GET, 9, b"n", b"k"))
    bad[0] ^= 0xFF
    r.feed(bytes(bad))
    with pytest.raises(FrameError):
        r.next()
