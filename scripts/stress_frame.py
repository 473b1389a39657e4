"""Random stress of the daemon's frame parser (kvstored._frame.next_frame, native/frame.c),
for runs under the sanitizers (scripts/sanitize.sh) and plain ones.

Random byte streams (good frames, cut anywhere, with random bytes, bad magic or version)
go through next_frame and FrameReader.next (wire.py), which must answer the same: the
frame, the reader's positions, None, or the codec's FrameError. Readers with positions
no real one holds (negative, past the buffer, far apart) and odd buffers must get None or
a typed error, never a read outside the buffer.

    python scripts/stress_frame.py --seconds 30 [--seed N]
"""
from __future__ import annotations

import argparse
import random
import sys
import time

from kvstore.wire import HEADER, FrameError, FrameReader, Header

try:
    from kvstored import _frame
except ImportError:
    _frame = None


def _frame_bytes(rng: random.Random) -> bytes:
    nl, kl = rng.choice([0, 1, 3, 255]), rng.choice([0, 1, 7, 128, 255])
    magic, version = (b"KVSD", 1) if rng.random() < 0.9 else (rng.randbytes(4), rng.randrange(3))
    fields = (magic, version, rng.randrange(256), rng.randrange(1 << 16), rng.getrandbits(64),
              rng.randrange(1 << 16), nl, kl, rng.getrandbits(32), rng.getrandbits(64),
              rng.getrandbits(64))
    return HEADER.pack(*fields) + rng.randbytes(nl) + rng.randbytes(kl)


def _answer(r: FrameReader, parse):
    try:
        return parse(r), r.start, r.end
    except FrameError as e:
        return "error", e.request_id, e.message


def differential(rng: random.Random) -> None:
    data = b"".join(_frame_bytes(rng) if rng.random() < 0.8 else rng.randbytes(rng.randrange(60))
                    for _ in range(rng.randint(1, 6)))
    data = data[:rng.randrange(len(data) + 1)]
    a, b = FrameReader(64 << 10), FrameReader(64 << 10)
    for r in (a, b):
        r.feed(data)
    for _ in range(16):  # bounded: each step consumes a frame or stops
        got, want = _answer(a, lambda r: _frame.next_frame(r, Header)), _answer(b, FrameReader.next)
        if got != want:
            raise AssertionError(f"next_frame {got!r} != FrameReader.next {want!r} on {data!r}")
        if got[0] in (None, "error"):
            return


class Bogus:
    """A reader with any positions and buffer."""
    __slots__ = ("buf", "start", "end", "target")

    def next(self):
        raise FrameError("bad magic")


def bogus(rng: random.Random) -> None:
    raw = bytearray(rng.randbytes(rng.choice([0, 1, 39, 40, 41, 300])))
    if len(raw) >= 40 and rng.random() < 0.8:
        raw[0:5] = b"KVSD\x01"
    r = Bogus()
    r.buf = rng.choice([raw, bytes(raw), memoryview(raw), memoryview(raw)[1:]])
    n = len(raw)
    r.start = rng.choice([0, 1, -1, n, n // 2, 1 << 62, -(1 << 62), -(1 << 63)])
    r.end = rng.choice([n, n - 1, n + 1, 0, 40, 1 << 62, -(1 << 62)])
    r.target = None if rng.random() < 0.95 else bytearray(1)
    try:
        _frame.next_frame(r, Header)
    except (ValueError, TypeError, OverflowError, FrameError):
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=None)
    a = ap.parse_args()
    if _frame is None:
        print("stress_frame: kvstored._frame is not built: nothing to do")
        return 0
    seed = a.seed if a.seed is not None else random.randrange(1 << 32)
    rng = random.Random(seed)
    end = time.monotonic() + a.seconds
    n = 0
    while True:
        for _ in range(1000):
            differential(rng)
            bogus(rng)
        n += 1000
        if time.monotonic() >= end:
            break
    print(f"stress_frame: {n} streams and {n} bogus readers, seed {seed}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
