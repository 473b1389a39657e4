"""The NVMe tier's on-disk codec (kvstored.engine.nvmeformat) on bytes alone: record
headers, region headers, summaries and their trailers; corrupt, truncated, mixed and
forged inputs."""
from __future__ import annotations

import random

import pytest
import xxhash

from kvstored.engine import nvmeformat as f

SEED = 0x1234_5678_9ABC_DEF0


def _rows(n: int, ns: bytes = b"ns", key_fmt: bytes = b"key-%06d", tomb_every: int = 0) -> list[tuple]:
    rows, rel = [], f.REGION_HEADER
    for i in range(n):
        key = key_fmt % i
        tomb = bool(tomb_every) and i % tomb_every == 0
        length = 0 if tomb else 1000 + i
        rows.append((100 + i, rel, length, 0xABC + i, 1.5 * i, f.FLAG_TOMBSTONE if tomb else 0,
                     len(ns), len(key), ns, key))
        rel += f.record_len(rows[-1][f.FLAGS], length)
    return rows


def _body(rows) -> bytes:
    return b"".join(f.summary_entry(r[f.SEQ], r[f.REL], r[f.LENGTH], r[f.CSUM], r[f.COMMITTED],
                                    bool(r[f.FLAGS] & f.FLAG_TOMBSTONE), r[f.NS], r[f.KEY]) for r in rows)


def test_summary_round_trip_uniform_keys_takes_one_unpack():
    rows = _rows(500)
    body = _body(rows)
    assert f.summary_of_rows(rows) == body
    assert f.count_entries(body) == 500
    assert f.parse_summary(body, 500) == rows
    assert f.parse_summary(memoryview(body), 500) == rows  # a view of the read buffer


def test_summary_round_trip_mixed_lengths_and_tombstones():
    rows = _rows(40, tomb_every=3)
    other = _rows(40, ns=b"another-ns", key_fmt=b"k%d")
    mixed = sorted(rows + [(r[0] + 1000, r[1] + 10**6) + r[2:] for r in other], key=lambda r: r[f.REL])
    body = _body(mixed)
    assert f.parse_summary(body, len(mixed)) == mixed
    assert f.count_entries(body) == len(mixed)


def test_uniform_stride_that_only_looks_uniform_falls_back_to_entry_by_entry():
    """Entries whose total size is count * stride of the first, but with other lengths
    inside (ns 2 + key 4, then ns 4 + key 2): the fast path must not be taken."""
    a = (1, 8192, 10, 11, 0.0, 0, 2, 4, b"ns", b"key1")
    b = (2, 16384, 10, 11, 0.0, 0, 4, 2, b"nsns", b"k2")
    body = _body([a, b])
    assert f.parse_summary(body, 2) == [a, b]


@pytest.mark.parametrize("count_delta", [-1, 1, 10**6])
def test_summary_with_the_wrong_count_is_refused(count_delta):
    rows = _rows(20)
    assert f.parse_summary(_body(rows), 20 + count_delta) is None


def test_truncated_or_padded_summary_is_refused():
    body = _body(_rows(20, key_fmt=b"%d"))  # variable key lengths: the entry-by-entry path
    assert f.parse_summary(body[:-1], 20) is None
    assert f.parse_summary(body + b"\0", 20) is None
    assert f.count_entries(body[:-3]) is None
    assert f.parse_summary(b"", 0) == [] and f.parse_summary(b"x", 0) is None
    assert f.parse_summary(b"\0" * 5, 1) is None


def test_random_garbage_never_raises():
    rnd = random.Random(7)
    for _ in range(300):
        junk = rnd.randbytes(rnd.randrange(0, 400))
        count = rnd.randrange(0, 12)
        got = f.parse_summary(junk, count)
        assert got is None or len(got) == count
        n = f.count_entries(junk)
        assert n is None or n >= 0
        assert f.parse_record(junk, 1, SEED) is None
        assert f.parse_trailer(junk.ljust(f.BLOCK, b"\0"), SEED) in (False, None)


def test_summary_block_and_trailer_round_trip():
    rows = _rows(300)
    body = _body(rows)
    buf = f.summary_block(body, 7, 42, 8192, SEED)
    assert len(buf) == f.align_up(len(body)) + f.BLOCK and len(buf) % f.BLOCK == 0
    trailer = buf[len(buf) - f.BLOCK:]
    index, gen, count, body_len, csum = f.parse_trailer(trailer, SEED)
    assert (index, gen, count, body_len) == (7, 42, 300, len(body))
    assert csum == xxhash.xxh3_64_intdigest(body, SEED)
    assert f.parse_summary(buf[:body_len], count) == rows
    # a flipped bit in the trailer: corrupt (None), not "absent" (False)
    bad = bytearray(trailer)
    bad[30] ^= 0x10
    assert f.parse_trailer(bad, SEED) is None
    assert f.parse_trailer(trailer, SEED + 1) is None  # another device's seed
    assert f.parse_trailer(bytes(f.BLOCK), SEED) is False
    with pytest.raises(ValueError):
        f.summary_block(body[:-2], 7, 42, 8192, SEED)


def test_record_header_round_trip_and_every_corruption():
    blk = f.record_header(b"ns", b"key", 9, 1234, 4096, 0xFEED, False, 2.5, SEED).ljust(f.BLOCK, b"\0")
    assert f.parse_record(blk, 9, SEED, rel=8192) == (1234, 8192, 4096, 0xFEED, 2.5, 0, 2, 3, b"ns", b"key")
    assert f.parse_record(blk, 10, SEED) is None  # another generation
    assert f.parse_record(blk, 9, SEED ^ 1) is None  # another seed
    for pos in (0, 5, 20, 40, f.RECORD.size + 1, f.RECORD.size + 6):  # magic, fields, key, checksum
        bad = bytearray(blk)
        bad[pos] ^= 0x04
        assert f.parse_record(bad, 9, SEED) is None, pos
    tomb = f.record_header(b"ns", b"gone", 9, 5, 0, 0, True, 0.0, SEED)
    row = f.parse_record(tomb, 9, SEED)
    assert row[f.FLAGS] & f.FLAG_TOMBSTONE and f.record_len(row[f.FLAGS], row[f.LENGTH]) == f.BLOCK


def test_unseeded_header_cannot_pass_for_a_record():
    """A client's payload may hold a well-formed header: without the seed it is rejected."""
    hdr = f.RECORD.pack(f.RECORD_MAGIC, 0, 2, 6, 9, 10**9, 4096, 0, f.key_digest(b"ns", b"forged"), 0.0)
    hdr += b"ns" + b"forged"
    forged = hdr + f._CSUM.pack(xxhash.xxh3_64_intdigest(hdr))
    assert f.parse_record(forged.ljust(f.BLOCK, b"\0"), 9, SEED) is None


def test_oversized_key_lengths_in_a_header_are_refused():
    hdr = f.RECORD.pack(f.RECORD_MAGIC, 0, 255, 255, 9, 1, 1, 0, 0, 0.0)
    assert f.parse_record(hdr.ljust(300, b"\0"), 9, SEED) is None  # header runs past the block


def test_region_header_copies():
    blk = f.region_header(3, 17, 65536, SEED).ljust(f.BLOCK, b"\0")
    assert f.parse_region_header(blk, 3, SEED) == (17, 65536)
    assert f.parse_region_header(blk, 4, SEED) is None  # another region's header
    bad = bytearray(blk)
    bad[20] ^= 1
    assert f.parse_region_header(bad, 3, SEED) is None
    assert f.parse_region_header(bytes(f.BLOCK), 3, SEED) is False


def test_verify_refuses_a_block_too_short_for_its_checksum():
    assert not f.verify(b"abc", 2)
    assert f.verify(f.sealed(b"abc"), 3)


def test_record_header_into_writes_record_header_over_a_used_block():
    """The batch append's header, packed in place, is ``record_header`` byte for byte, the
    rest of the block zero even where a longer header was before (and a stranger key)."""
    import mmap
    block = memoryview(mmap.mmap(-1, f.BLOCK))
    f.record_header_into(block, b"n" * 255, bytes(range(255)), 9, 1, 10, 2, 0.5, 7)
    for ns, key in ((b"ns", b"k"), (b"", b"\0" * 128), (b"n" * 255, b"k" * 255)):
        f.record_header_into(block, ns, key, 7, 12345, 4096, 99, 1.5, 42)
        want = f.record_header(ns, key, 7, 12345, 4096, 99, False, 1.5, 42)
        assert bytes(block) == want + bytes(f.BLOCK - len(want))
        assert f.parse_record(block, 7, 42)[-2:] == (ns, key)
