"""The NVMe tier's on-disk format (version 2): block layouts and their codec.

Pure functions over bytes: no file, no region state. The tier (nvme.py) writes
with them, the recovery scan (nvmescan.py) reads with them, and so does the tier
when it reads keys back (it keeps none per object in RAM: region_rows, key_at).

Layout (all 4 KiB aligned)::

    [superblock 4 KiB][pad to 1 MiB][region 0][region 1]...
    region = [region header 4 KiB][its copy 4 KiB][record][record]... (appended in order)
             ... free ...[summary, padded to 4 KiB][summary trailer 4 KiB]   (once sealed)
    record = [record header 4 KiB][payload, padded to 4 KiB]

Every block is self-describing and checksummed (xxh3-64): the superblock
(geometry, a random uuid), each region header (index, generation, size class)
and each record header (magic, generation, sequence, namespace, key, key
digest, length, payload checksum, tombstone flag). Headers, summaries and
trailers are checksummed with a seed derived from the uuid, which only the
daemon reads: a client's payload cannot pass for a header.

A summary is the entries of a region's records in offset order, each
``SUMMARY_ENTRY`` followed by its namespace and key. Decoded, an entry is a
*row*: the tuple ``(seq, rel, length, checksum, committed_at, flags, ns_len,
key_len, ns, key)`` (``rel``: the record header's offset in its region; index
with the ``SEQ``... ``KEY`` constants). A scanned record header decodes to the
same row, so recovery handles both alike.
"""
from __future__ import annotations

import functools
import mmap
import struct
import time

import xxhash

BLOCK = 4096
DATA_START = 1 << 20
MIN_REGION = 16 << 20
MAX_REGION = 256 << 20
VERSION = 2  # 2: seeded header checksums, doubled region header, region summaries

SUPER = struct.Struct("<8sIIQQQ16s")  # magic, version, block, size, region_size, nregions, uuid
SUPER_MAGIC = b"KVSDNVM1"
REGION = struct.Struct("<8sIIQQd")  # magic, version, index, generation, slot_size, created
REGION_MAGIC = b"KVSDRGN1"
REGION_HEADER = 2 * BLOCK  # the region header and its copy
RECORD = struct.Struct("<4sHBBQQQQQd")  # magic, flags, ns_len, key_len, generation, seq, length, checksum, key_digest, committed_at
RECORD_MAGIC = b"KVSR"
TRAILER = struct.Struct("<8sIIQQQQQ")  # magic, version, index, generation, slot_size, count, body_len, body_checksum
TRAILER_MAGIC = b"KVSDSUM1"
SUMMARY_ENTRY = struct.Struct("<QIQQdBBB")  # seq, offset in region, length, checksum, committed_at, flags, ns_len, key_len
FLAG_TOMBSTONE = 1
# what a region needs besides one record's payload: its two headers, a record header,
# a summary block and the trailer (config checks region_size >= max_value_size + this)
REGION_OVERHEAD = REGION_HEADER + 3 * BLOCK
_CSUM = struct.Struct("<Q")
_ZERO_BLOCK = memoryview(bytes(BLOCK))
_HEADER_MAX = RECORD.size + 255 + 255 + _CSUM.size  # the longest record header

# fields of a row (a decoded summary entry or scanned record header)
SEQ, REL, LENGTH, CSUM, COMMITTED, FLAGS, NS_LEN, KEY_LEN, NS, KEY = range(10)


def align_up(n: int, a: int = BLOCK) -> int:
    return (n + a - 1) // a * a


def key_digest(ns: bytes, key: bytes) -> int:
    return xxhash.xxh3_64_intdigest(ns + b"\0" + key)


def sealed(struct_bytes: bytes, seed: int = 0) -> bytes:
    """``struct_bytes`` followed by their seeded checksum."""
    return struct_bytes + _CSUM.pack(xxhash.xxh3_64_intdigest(struct_bytes, seed))


def verify(block, size: int, seed: int = 0) -> bool:
    """Whether the checksum after the first ``size`` bytes of ``block`` matches them."""
    if len(block) < size + _CSUM.size:
        return False
    return _CSUM.unpack_from(block, size)[0] == xxhash.xxh3_64_intdigest(memoryview(block)[:size], seed)


def tail_size(summary_len: int) -> int:
    """Bytes a region keeps free at its end for a summary of ``summary_len`` bytes."""
    return align_up(max(summary_len, 1)) + BLOCK


def record_len(flags: int, length: int) -> int:
    """Bytes a record takes in its region: its header, and its payload unless a tombstone."""
    return BLOCK + (0 if flags & FLAG_TOMBSTONE else align_up(length))


# -- superblock and region header ----------------------------------------------
def superblock(size: int, region_size: int, nregions: int, uid: bytes) -> bytes:
    return sealed(SUPER.pack(SUPER_MAGIC, VERSION, BLOCK, size, region_size, nregions, uid))


def region_header(index: int, generation: int, slot_size: int, seed: int) -> bytes:
    return sealed(REGION.pack(REGION_MAGIC, VERSION, index, generation, slot_size, time.time()), seed)


def parse_region_header(block, index: int, seed: int) -> tuple[int, int] | None | bool:
    """(generation, slot_size) of a region header block of region ``index``; False when the
    block holds no region header at all (never written), None when it holds a corrupt one
    or one of another region."""
    if bytes(block[:8]) != REGION_MAGIC:
        return False
    if not verify(block, REGION.size, seed):
        return None
    _m, _v, idx, gen, slot_size, _created = REGION.unpack_from(block)
    return (gen, slot_size) if idx == index else None


# -- records ------------------------------------------------------------------------
def record_header(ns: bytes, key: bytes, generation: int, seq: int, length: int, checksum: int,
                  tombstone: bool, committed_at: float, seed: int) -> bytes:
    """A record's (or tombstone's) header as bytes: ``record_header_into`` a scratch block."""
    buf = bytearray(_HEADER_MAX)
    n = record_header_into(memoryview(buf), ns, key, generation, seq, length, checksum,
                           committed_at, seed, tombstone)
    return bytes(buf[:n])


def record_header_into(block: memoryview, ns: bytes, key: bytes, generation: int, seq: int,
                       length: int, checksum: int, committed_at: float, seed: int,
                       tombstone: bool = False) -> int:
    """A record's header packed into ``block`` (at least _HEADER_MAX bytes; the batch
    append's path, with no intermediate bytes objects), zeroed after it up to the longest
    header there can be (ns and key lengths are one byte each): a block used for headers
    only keeps no other header's bytes, and past that length it is never written (a fresh
    mapping's zeros), so 4 KiB need not be zeroed per record. Returns the header's length."""
    n, k = len(ns), len(key)
    RECORD.pack_into(block, 0, RECORD_MAGIC, FLAG_TOMBSTONE if tombstone else 0, n, k,
                     generation, seq, length, checksum, key_digest(ns, key), committed_at)
    h = RECORD.size + n
    block[RECORD.size:h] = ns
    end = h + k
    block[h:end] = key
    _CSUM.pack_into(block, end, xxhash.xxh3_64_intdigest(block[:end], seed))
    end += _CSUM.size
    block[end:_HEADER_MAX] = _ZERO_BLOCK[end:_HEADER_MAX]
    return end


def parse_record(block, gen: int, seed: int, rel: int = 0) -> tuple | None:
    """The row of a record header block of generation ``gen`` found at ``rel`` in its
    region, or None when the block is not one (wrong magic or generation, bad checksum,
    key digest that does not match)."""
    if len(block) < RECORD.size + _CSUM.size or bytes(block[:4]) != RECORD_MAGIC:
        return None
    (_m, flags, ns_len, key_len, rgen, seq, length, csum, digest,
     committed_at) = RECORD.unpack_from(block)
    hsize = RECORD.size + ns_len + key_len
    if rgen != gen or hsize + _CSUM.size > min(BLOCK, len(block)) or not verify(block, hsize, seed):
        return None
    ns = bytes(block[RECORD.size:RECORD.size + ns_len])
    key = bytes(block[RECORD.size + ns_len:hsize])
    if key_digest(ns, key) != digest:
        return None
    return (seq, rel, length, csum, committed_at, flags, ns_len, key_len, ns, key)


# -- summaries ----------------------------------------------------------------------
def summary_entry(seq: int, rel: int, length: int, checksum: int, committed_at: float,
                  tombstone: bool, ns: bytes, key: bytes) -> bytes:
    return SUMMARY_ENTRY.pack(seq, rel, length, checksum, committed_at,
                              FLAG_TOMBSTONE if tombstone else 0, len(ns), len(key)) + ns + key


def summary_of_rows(rows) -> bytes:
    """A summary body listing ``rows`` (in the order given: offset order)."""
    pack = SUMMARY_ENTRY.pack
    return b"".join(pack(*row[:NS]) + row[NS] + row[KEY] for row in rows)


def count_entries(body) -> int | None:
    """How many entries a summary body holds; None when its last entry is cut short."""
    count = pos = 0
    size = SUMMARY_ENTRY.size
    while pos < len(body):
        if pos + size > len(body):
            return None
        pos += size + body[pos + size - 2] + body[pos + size - 1]
        count += 1
    return count if pos == len(body) else None


def summary_block(body, index: int, generation: int, slot_size: int, seed: int) -> mmap.mmap:
    """A region's summary body and its trailer, as one aligned buffer for the region's tail."""
    body = bytes(body)
    count = count_entries(body)
    if count is None:
        raise ValueError("summary body ends inside an entry")
    blen = align_up(max(len(body), 1))
    buf = mmap.mmap(-1, blen + BLOCK)
    buf[:len(body)] = body
    buf[blen:blen + TRAILER.size + 8] = sealed(TRAILER.pack(
        TRAILER_MAGIC, VERSION, index, generation, slot_size, count, len(body),
        xxhash.xxh3_64_intdigest(body, seed)), seed)
    return buf


def parse_trailer(block, seed: int) -> tuple[int, int, int, int, int] | None | bool:
    """(index, generation, count, body_len, body_checksum) of a summary trailer block; False
    when the block holds no trailer, None when it holds a corrupt one."""
    if bytes(block[:8]) != TRAILER_MAGIC:
        return False
    if not verify(block, TRAILER.size, seed):
        return None
    _m, _v, index, gen, _slot, count, body_len, body_csum = TRAILER.unpack_from(block)
    return index, gen, count, body_len, body_csum


@functools.lru_cache(maxsize=64)
def _row_struct(ns_len: int, key_len: int) -> struct.Struct:
    return struct.Struct(f"{SUMMARY_ENTRY.format}{ns_len}s{key_len}s")


def parse_summary(body, count: int) -> list[tuple] | None:
    """The rows of a summary body that verified, or None when it does not hold exactly
    ``count`` whole entries.

    Most regions hold keys of one namespace and one key length: then every entry has
    the same size and the whole body decodes in one ``iter_unpack`` (C, no Python per
    field). Otherwise entry by entry."""
    data = body if isinstance(body, bytes) else bytes(body)
    n = len(data)
    esize = SUMMARY_ENTRY.size
    if count <= 0 or n < esize:
        return [] if count == 0 and n == 0 else None
    ns_len, key_len = data[esize - 2], data[esize - 1]
    stride = esize + ns_len + key_len
    # every entry's two length bytes, picked out by strided slices (C, no Python loop)
    if (stride * count == n and data[esize - 2::stride] == bytes((ns_len,)) * count
            and data[esize - 1::stride] == bytes((key_len,)) * count):
        return list(_row_struct(ns_len, key_len).iter_unpack(data))
    rows, pos = [], 0
    unpack, append = SUMMARY_ENTRY.unpack_from, rows.append
    for _ in range(count):
        if pos + esize > n:
            return None
        row = unpack(data, pos)
        pos += esize
        ns_len, key_len = row[NS_LEN], row[KEY_LEN]
        ns = data[pos:pos + ns_len]
        pos += ns_len
        key = data[pos:pos + key_len]
        pos += key_len
        append(row + (ns, key))
    return rows if pos == n else None
