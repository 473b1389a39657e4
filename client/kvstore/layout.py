"""Where the records of a clustered object live and what they look like.

Shared by the SDK's ClusterClient (which writes and reads them) and the daemon's repair
agent (which rebuilds, moves and verifies them), so both compute the same homes.

Policies (per namespace): ``none``, ``replicas:N``, ``ec:K+M``.

Slots. An object's records go to *slots*: ``(member, lap)`` pairs computed from the
member list by rendezvous hashing (``kvstore.placement``):

* ``none`` / ``replicas:N``: the first min(N, live) members of the preference list,
  lap 0, each storing the object's bytes under its own key.
* ``ec:K+M``: K+M slots over the first min(K+M, live) members; when fewer than K+M
  members are live the slots wrap around (slot j -> member j mod n, lap j // n), so a
  cluster that lost nodes still stores every fragment. The record of lap L is stored
  under ``lap_key(fragment_key(key), L)``; placement hashes ``fragment_key(key)`` so
  that a node can compute an object's homes from what it stores alone.

EC slots are chosen position by position (``placement.place_positions``): losing a member
moves only the position it held, so after repair slot j still holds fragment j and
healthy reads of the first K slots concatenate. A fragment's *index* is in its record
header, not in its key: readers decode from any K distinct fragments when the first K
slots do not hold data fragments 0..K-1 (wrap-around, a record not yet repaired), and
repair rebuilds only the lost index on the slot that lacks a record.

Every EC record starts with ``FRAG_HEADER``: magic, version, kind, index, K, M, EC type,
original length, xxh3-64 of the whole object and of the record's payload. Objects
smaller than ``min_ec_size`` are stored whole (kind REPLICA) on the first M+1 slots.

The member-list *epoch* is a 32-bit digest of the placement members (sorted node ids of
live, non-draining nodes). Clients send it with every put and get; a node whose list
differs answers Redirect, so a client with an old list refreshes instead of writing to
the wrong homes.
"""
from __future__ import annotations

import hashlib
import os
import struct
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

from . import errors
from .malloc import raise_thresholds
from .placement import Member, place, place_positions
from .wire import MAX_KEY_LEN, checksum, checksum_stream

DEFAULT_MIN_EC_SIZE = 256 << 10

# magic, version, kind, index, K, M, ec type, reserved, original length, object xxh3-64,
# payload xxh3-64
FRAG_HEADER = struct.Struct("<4sBBBBBBHQQQ")
FRAG_MAGIC = b"KVEC"
FRAG_VERSION = 1
KIND_FRAGMENT = 0
KIND_REPLICA = 1  # a small object stored whole
EC_TYPES = ("isa_l_rs_vand", "isa_l_rs_cauchy")
_EC_SUFFIX = b"#ec"
_EC_HASHED_SUFFIX = b"#ech"
MAX_LAPS = 32  # K+M <= 32, so a lap number fits one byte 1..31


def fragment_key(key: bytes) -> bytes:
    """The lap-0 key of an EC object's records: key + b"#ec", or sha256(key) + b"#ech"
    when that would leave no room for a lap byte under the 128-byte key limit."""
    if len(key) + len(_EC_SUFFIX) + 1 <= MAX_KEY_LEN:
        return key + _EC_SUFFIX
    return hashlib.sha256(key).digest() + _EC_HASHED_SUFFIX


def lap_key(fkey: bytes, lap: int) -> bytes:
    """The key of the record in lap ``lap`` (0: ``fkey`` itself, else fkey + one byte)."""
    return fkey if lap == 0 else fkey + bytes((lap,))


def split_lap(stored: bytes) -> tuple[bytes, int] | None:
    """(lap-0 key, lap) of a stored EC record key, or None if it is not one."""
    if stored.endswith(_EC_SUFFIX) or stored.endswith(_EC_HASHED_SUFFIX):
        return stored, 0
    if len(stored) > 4 and 0 < stored[-1] < MAX_LAPS and (
            stored[:-1].endswith(_EC_SUFFIX) or stored[:-1].endswith(_EC_HASHED_SUFFIX)):
        return stored[:-1], stored[-1]
    return None


@dataclass(frozen=True)
class Policy:
    kind: str  # "none" | "replicas" | "ec"
    n: int = 1  # copies (none: 1), or K+M
    k: int = 0
    m: int = 0

    @classmethod
    def parse(cls, text: "str | Policy") -> "Policy":
        if isinstance(text, Policy):
            return text
        t = str(text).strip().lower()
        try:
            if t == "none":
                return cls("none", 1)
            if t.startswith("replicas:"):
                n = int(t.split(":", 1)[1])
                if 1 <= n <= MAX_LAPS:
                    return cls("replicas", n)
            elif t.startswith("ec:"):
                k, m = (int(x) for x in t.split(":", 1)[1].split("+"))
                if k >= 1 and m >= 1 and k + m <= MAX_LAPS:
                    return cls("ec", k + m, k, m)
        except ValueError:
            pass
        raise errors.InvalidArgument(
            f"invalid redundancy policy {text!r}: use none, replicas:N (1 <= N <= 32) or ec:K+M "
            "(K, M >= 1, K+M <= 32)")

    @property
    def nodes(self) -> int:
        """How many distinct nodes the policy spreads over when the cluster is whole."""
        return self.n

    @property
    def ec_type(self) -> str:
        return "isa_l_rs_cauchy" if self.m > 4 else "isa_l_rs_vand"

    def check_cluster(self, members: int) -> None:
        """A policy is set only on a cluster that can hold it whole (InvalidArgument)."""
        if self.nodes > members:
            what = f"{self.k}+{self.m} fragments" if self.kind == "ec" else f"{self.n} copies"
            raise errors.InvalidArgument(
                f"policy {self} needs {self.nodes} nodes for its {what} but the cluster has "
                f"{members} member(s)")

    def min_live(self) -> int:
        """The fewest live nodes that still take writes: enough that the loss of one more
        node leaves the object readable (EC: no node holds more than M fragments)."""
        if self.kind == "ec":
            n = 1
            while -(-self.n // n) > self.m:
                n += 1
            return n
        return min(self.n, 2)

    def __str__(self) -> str:
        if self.kind == "ec":
            return f"ec:{self.k}+{self.m}"
        return "none" if self.kind == "none" else f"replicas:{self.n}"


def placement_key(key: bytes, p: Policy) -> bytes:
    """The key that placement hashes and that lap 0 is stored under."""
    return fragment_key(key) if p.kind == "ec" else key


def slots(pkey: bytes, members: Sequence[Member], p: Policy, ns) -> list[tuple[Member, int]]:
    """The object's slots, in order (see the module doc). ``pkey``: placement_key()."""
    if not members:
        return []
    if p.kind == "ec":
        placed = place_positions(pkey, members, min(p.n, len(members)), ns)
        n = len(placed)
        return [(placed[j % n], j // n) for j in range(p.n)]
    return [(m, 0) for m in place(pkey, members, min(p.n, len(members)), ns)]


def member_epoch(node_ids) -> int:
    """The 32-bit epoch of a placement member set (never 0, which means "none")."""
    e = xxhash.xxh32_intdigest("\n".join(sorted(node_ids)).encode())
    return e or 1


def parse_record(buf) -> tuple | None:
    """(header tuple, payload view) of a whole stored EC record, or None if invalid."""
    if buf is None or len(buf) < FRAG_HEADER.size:
        return None
    h = FRAG_HEADER.unpack_from(buf)
    magic, ver, kind, _index, _k, _m, _t, _r, olen, ocsum, pcsum = h
    if magic != FRAG_MAGIC or ver != FRAG_VERSION or kind not in (KIND_FRAGMENT, KIND_REPLICA):
        return None
    payload = memoryview(buf)[FRAG_HEADER.size:]
    if checksum(payload) != pcsum:
        return None
    if kind == KIND_REPLICA and (len(payload) != olen or pcsum != ocsum):
        return None
    return h, payload


def inner_index(payload) -> int | None:
    """The index liberasurecode wrote at the start of a fragment (see Codec.indexed), or
    None when the payload is too short to hold one."""
    return int.from_bytes(payload[:4], "little") if len(payload) >= 4 else None


def parse_head(head: bytes) -> tuple | None:
    """The header tuple from a record's first bytes (payload not checked), or None."""
    if head is None or len(head) < FRAG_HEADER.size:
        return None
    h = FRAG_HEADER.unpack_from(head)
    if h[0] != FRAG_MAGIC or h[1] != FRAG_VERSION or h[2] not in (KIND_FRAGMENT, KIND_REPLICA):
        return None
    return h


class Codec:
    """A pyeclib driver plus whether its data fragments are the object's bytes after a
    fixed-size liberasurecode header (checked once), which allows decode-free reads, and
    the probed fast paths: ``isal`` (ISA-L called directly, used by encode_parts and
    assemble) and ``native`` (liberasurecode through ctypes, behind encode / decode)."""

    def __init__(self, k: int, m: int, ec_type: str):
        try:
            from pyeclib.ec_iface import ECDriver, ECDriverError
        except ImportError as e:
            raise errors.InvalidArgument(
                "ec policies need pyeclib (pip install 'kvstored[cluster]' or pyeclib==1.8.0)") from e
        self.k, self.m, self.ec_type = k, m, ec_type
        self.errors = ECDriverError
        self.driver = ECDriver(k=k, m=m, ec_type=ec_type)
        probe = bytes((i * 7 + 3) & 0xFF for i in range(k * 1000 + 17))
        frags = self.driver.encode(probe)
        self.offset = None
        for off in (80,):  # liberasurecode's fragment header
            if b"".join(f[off:] for f in frags[:k])[:len(probe)] == probe:
                self.offset = off
        # liberasurecode's own header starts each fragment with its index (little-endian
        # uint32), inside the payload checksum: repair checks a source record's outer
        # index against it (``inner_index``), a header field no payload checksum covers
        self.indexed = all(inner_index(f) == i for i, f in enumerate(frags))
        self.native = _NativeEncoder.attach(self.driver, k, m, probe, frags)
        # ISA-L called directly (no fragment copies) where a probe proves it gives
        # pyeclib's records; else encode_parts uses ``encode`` above
        self.isal = _IsalCodec.attach(self.driver, k, m, ec_type) if self.offset == LIBEC_HEADER else None

    def encode(self, data) -> list:
        """The K+M fragments of ``data`` (a contiguous buffer; pyeclib itself takes only
        bytes). Through liberasurecode directly where that was checked to give pyeclib's
        bytes (``_NativeEncoder``): read-only views, without the GIL and without a copy."""
        if self.native is not None:
            return self.native.encode(data)
        return self.driver.encode(_as_bytes(data))

    def decode(self, fragments: list):
        """The object from K or more fragments (any buffers): bytes, or a read-only view
        of liberasurecode's memory through ``_NativeEncoder`` (fragments received into
        writable buffers are read in place, without the GIL)."""
        if self.native is not None and _same_length(fragments):
            return self.native.decode(fragments)
        # pyeclib needs bytes (a bytearray aborts the process inside liberasurecode)
        return self.driver.decode([bytes(f) for f in fragments])

    def reconstruct(self, fragments: list, indexes: list[int]) -> list:
        """The fragments of ``indexes`` rebuilt from any K others (liberasurecode
        fragments, any buffers). Through ISA-L directly where attach proved it equal to
        pyeclib (sources read in place, one ec_encode_data call, each fragment written
        into one fresh buffer); else, or when that path declines, pyeclib with a bytes
        copy of each source (liberasurecode called in place measured slower: RESULTS.md,
        issue 13 H8)."""
        if self.isal is not None:
            try:
                out = self.isal.reconstruct(fragments, indexes)
            except Exception:  # noqa: BLE001 (any surprise: pyeclib below decides)
                out = None
            if out is not None:
                return out
        return self.driver.reconstruct([bytes(f) for f in fragments], indexes)


class _Fragments:
    """One encode's fragments in liberasurecode's memory, freed with its cleanup call when
    the last view of them is gone (each view's ctypes array holds this object)."""

    def __init__(self, free, desc: int, data_p, parity_p):
        self.free, self.desc, self.data_p, self.parity_p = free, desc, data_p, parity_p

    def __del__(self):
        try:
            self.free(self.desc, self.data_p, self.parity_p)
        except Exception:  # noqa: BLE001 (interpreter shutdown: nothing left to free into)
            pass


class _NativeEncoder:
    """liberasurecode_encode and _decode called through ctypes on pyeclib's own instance:
    ctypes lets go of the GIL for the call, so the batch's senders run while a round is
    encoded (pyeclib's encode holds the GIL throughout), and the fragments are used where
    liberasurecode wrote them instead of being copied into bytes objects (a decode reads
    received records in place, where pyeclib needs a bytes copy of each). Used only when
    a probe object encodes to exactly pyeclib's fragments and decodes back (``attach``);
    otherwise Codec keeps pyeclib's. Calls are serialised per codec, as pyeclib's were
    by the GIL."""

    def __init__(self, lib, desc: int, k: int, m: int):
        import ctypes
        self.ct, self.desc, self.k, self.m = ctypes, desc, k, m
        pp = ctypes.POINTER(ctypes.c_void_p)
        self.enc = lib.liberasurecode_encode
        self.enc.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64, ctypes.POINTER(pp),
                             ctypes.POINTER(pp), ctypes.POINTER(ctypes.c_uint64)]
        self.enc.restype = ctypes.c_int
        self.free = lib.liberasurecode_encode_cleanup
        self.free.argtypes = [ctypes.c_int, pp, pp]
        self.free.restype = ctypes.c_int
        self.dec = lib.liberasurecode_decode
        self.dec.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_uint64,
                             ctypes.c_int, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_uint64)]
        self.dec.restype = ctypes.c_int
        self.dec_free = lib.liberasurecode_decode_cleanup
        self.dec_free.argtypes = [ctypes.c_int, ctypes.c_void_p]
        self.dec_free.restype = ctypes.c_int
        self.lock = threading.Lock()

    @classmethod
    def attach(cls, driver, k: int, m: int, probe: bytes, want: list) -> "_NativeEncoder | None":
        if not _native_allowed():
            return None
        try:
            import ctypes
            handle = driver.ec_lib_reference._handle  # pyeclib_c's capsule: a pyeclib_t *
            get_name = ctypes.pythonapi.PyCapsule_GetName
            get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
            get_ptr = ctypes.pythonapi.PyCapsule_GetPointer
            get_ptr.restype, get_ptr.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
            ptr = get_ptr(handle, get_name(handle))
            desc = ctypes.c_int.from_address(ptr).value  # pyeclib_t's first field: the instance
            path = _loaded_library("liberasurecode")
            if not ptr or path is None:
                return None
            native = cls(ctypes.CDLL(path), desc, k, m)
            if [bytes(f) for f in native.encode(probe)] != want:
                return None
            if bytes(native.decode([bytearray(f) for f in want[1:k + 1]])) != probe:
                return None
        except Exception:  # noqa: BLE001 (any surprise: pyeclib's own encode is used)
            return None
        return native

    def encode(self, data) -> list[memoryview]:
        ct = self.ct
        if isinstance(data, bytes):
            src, n = data, len(data)
        else:
            mv = memoryview(data).cast("B")
            n = mv.nbytes
            # a caller's writable buffer (bytearray, numpy, a tensor) is read in place
            src = _as_bytes(mv) if mv.readonly else (ct.c_char * n).from_buffer(mv)
        addr = src if isinstance(src, bytes) else ct.addressof(src)
        data_p = ct.POINTER(ct.c_void_p)()
        parity_p = ct.POINTER(ct.c_void_p)()
        flen = ct.c_uint64()
        with self.lock:
            rc = self.enc(self.desc, addr, n, ct.byref(data_p), ct.byref(parity_p), ct.byref(flen))
        if rc < 0:
            from pyeclib.ec_iface import ECDriverError
            raise ECDriverError(f"liberasurecode_encode failed: {rc}")
        owner = _Fragments(self.free, self.desc, data_p, parity_p)
        arr = ct.c_char * flen.value
        out = []
        for ptrs, count in ((data_p, self.k), (parity_p, self.m)):
            for i in range(count):
                a = arr.from_address(ptrs[i])
                a.owner = owner  # the memory lives as long as any view of any fragment
                out.append(memoryview(a).cast("B").toreadonly())
        return out


    def decode(self, fragments: list) -> memoryview:
        """liberasurecode_decode on fragments of one length (Codec checks), read where
        they lie when writable; the object as a read-only view of liberasurecode's
        memory, freed with the last view."""
        ct = self.ct
        keep, addrs = [], []
        for f in fragments:
            mv = memoryview(f).cast("B")
            if mv.readonly:
                b = _as_bytes(mv)
                keep.append(b)
                addrs.append(ct.cast(ct.c_char_p(b), ct.c_void_p).value)
            else:
                a = (ct.c_char * mv.nbytes).from_buffer(mv)
                keep.append(a)
                addrs.append(ct.addressof(a))
        out, olen = ct.c_void_p(), ct.c_uint64()
        with self.lock:
            rc = self.dec(self.desc, (ct.c_void_p * len(addrs))(*addrs), len(addrs), len(fragments[0]), 0,
                          ct.byref(out), ct.byref(olen))
        if rc < 0 or not out.value:
            from pyeclib.ec_iface import ECDriverError
            raise ECDriverError(f"liberasurecode_decode failed: {rc}")
        owner = _Decoded(self.dec_free, self.desc, out.value)
        a = (ct.c_char * olen.value).from_address(out.value)
        a.owner = owner
        return memoryview(a).cast("B").toreadonly()


class _Decoded:
    """One decode's output in liberasurecode's memory, freed when its last view goes."""

    def __init__(self, free, desc: int, ptr: int):
        self.free, self.desc, self.ptr = free, desc, ptr

    def __del__(self):
        try:
            self.free(self.desc, self.ptr)
        except Exception:  # noqa: BLE001 (interpreter shutdown)
            pass


# liberasurecode's fragment_header_t (include/erasurecode/erasurecode.h), little-endian and
# packed: the metadata (index, payload size, backend metadata size, original size, checksum
# type, 32 bytes of checksums, checksum-mismatch flag, backend id, backend version), then
# magic, library version, zlib crc32 of the metadata, and padding to 80 bytes
_LIBEC_META = struct.Struct("<IIIQB32xBBI")
_LIBEC_TAIL = struct.Struct("<III9x")
LIBEC_HEADER = _LIBEC_META.size + _LIBEC_TAIL.size  # 80
_RECORD_HEAD = struct.Struct(f"{FRAG_HEADER.format}{LIBEC_HEADER}s")  # ours, then liberasurecode's
_CHKSUM_NONE = 1  # liberasurecode's CHKSUM_NONE: pyeclib's default, no per-fragment CRC
_ISAL_MAX_BLOCK = 1 << 31  # ec_encode_data takes a fragment's length as a C int


def _native_allowed() -> bool:
    """KVSTORE_NATIVE_EC=0 keeps pyeclib's own encode and decode (no ctypes path at all)."""
    return os.environ.get("KVSTORE_NATIVE_EC", "1").strip().lower() not in ("0", "no", "false", "off")




class _IsalCodec:
    """An EC code computed by ISA-L directly (``kvstore.isal``), records framed by us:

    * encode: the data fragments are views of the caller's object (only a zero-padded tail
      is copied), the parity is written by ec_encode_data into one fresh buffer that the
      records are sent from, and each fragment's 80-byte liberasurecode header is built
      here, so a record is the same bytes pyeclib's fragment would give;
    * decode: the missing data fragments are computed from K surviving ones straight into
      the caller's buffer (the inverse of the surviving rows of the generator matrix).

    Used only when ``attach`` proved both on probe objects of several sizes against
    pyeclib (byte-identical fragments; every single and a double erasure decoded back)."""

    _TABLES_KEPT = 256  # decode tables cached per (surviving, missing) set

    def __init__(self, rs, k: int, m: int, template: tuple):
        from . import isal
        self.rs, self.k, self.m = rs, k, m
        self.isal = isal  # held here: a ``from . import`` per call costs a Python-level lookup
        # from pyeclib's own probe fragment: what no object changes
        self.bmeta, self.ctype, self.backend_id, self.backend_version, self.magic, self.libec_version = template
        self._decode_tables: dict[tuple, object] = {}

    @classmethod
    def attach(cls, driver, k: int, m: int, ec_type: str) -> "_IsalCodec | None":
        if not _native_allowed():
            return None
        try:
            from . import isal
            path = isal.find_library(_loaded_library)
            if path is None:
                return None
            rs = isal.RS(isal.Library(path), k, m, ec_type)
            head = driver.encode(os.urandom(k * 64))[0][:LIBEC_HEADER]
            idx, _sz, bmeta, _olen, ctype, _mm, bid, bver = _LIBEC_META.unpack_from(head)
            magic, libver, _crc = _LIBEC_TAIL.unpack_from(head, _LIBEC_META.size)
            if idx != 0 or ctype != _CHKSUM_NONE or bmeta != 0 or head[21:53] != bytes(32):
                return None  # per-fragment checksums or backend metadata: not built here
            self = cls(rs, k, m, (bmeta, ctype, bid, bver, magic, libver))
            # exact multiples, padded tails, tiny objects (whole fragments of padding)
            sizes = sorted({1, k, k + 1, 2 * k - 1, k * 64, k * 4096, k * 4096 + 1, k * 4096 + 2 * k + 3,
                            k * 65536 + k - 1})
            for n in sizes:
                v = os.urandom(n)  # random: no pattern a wrong matrix could still get right
                want = driver.encode(v)
                got = self.fragments(memoryview(v))
                if [self.libec_header(i, n, len(b)) + bytes(b) for i, b in enumerate(got)] != want:
                    return None
                for lost in ({0}, {k - 1}, set(range(min(k, m))), set(range(k - min(k, m), k))):
                    have = {i: memoryview(f) for i, f in enumerate(want) if i not in lost}
                    out = bytearray(n)
                    if not self.decode_into(have, n, memoryview(out)) or out != v:
                        return None
                # reconstruct: every single index, and a double erasure (data + parity)
                lost_sets = [[i] for i in range(k + m)] + ([[0, k]] if m >= 2 else [])
                for lost in lost_sets:
                    src = [f for i, f in enumerate(want) if i not in lost][:k]
                    if self.reconstruct(src, lost) != driver.reconstruct(src, lost):
                        return None
        except Exception:  # noqa: BLE001 (any surprise: liberasurecode / pyeclib are used)
            return None
        return self

    def libec_header(self, index: int, olen: int, size: int) -> bytes:
        """The 80-byte liberasurecode header of fragment ``index`` (payload ``size``
        bytes) of an object of ``olen`` bytes."""
        meta = _LIBEC_META.pack(index, size, self.bmeta, olen, self.ctype, 0, self.backend_id,
                                self.backend_version)
        return meta + _LIBEC_TAIL.pack(self.magic, self.libec_version, zlib.crc32(meta))

    def fragments(self, mv: memoryview) -> list:
        """The K+M fragment payloads (without their liberasurecode headers) of the object
        ``mv`` (a contiguous byte view, at least one byte): data fragments are views of
        ``mv`` (a padded tail is copied), parity views of one fresh buffer."""
        isal = self.isal
        k, m, n = self.k, self.m, len(mv)
        bs = -(-n // k)  # liberasurecode aligns an isa-l object to K bytes (w = 8)
        full = n // bs  # data fragments that lie wholly inside the object
        base = isal.address(mv)
        bodies = [mv[i * bs:(i + 1) * bs] for i in range(full)]
        addrs = [base + i * bs for i in range(full)]
        if full < k:
            tail = bytearray((k - full) * bs)  # zeros: the padding liberasurecode writes
            tail[:n - full * bs] = mv[full * bs:]
            tv = memoryview(tail).toreadonly()
            t0 = isal.address(tv)
            bodies += [tv[j * bs:(j + 1) * bs] for j in range(k - full)]
            addrs += [t0 + j * bs for j in range(k - full)]
        parity = memoryview(isal.uninitialized(m * bs))  # written whole by ec_encode_data
        p0 = isal.address(parity)
        self.rs.encode(bs, addrs, [p0 + j * bs for j in range(m)])
        parity = parity.toreadonly()
        return bodies + [parity[j * bs:(j + 1) * bs] for j in range(m)]

    def parts(self, p: Policy, value, wire: bool = False) -> list[tuple]:
        """encode_parts' records: (our header + the liberasurecode header, payload view);
        with ``wire``, (header, payload, checksum of header + payload) (encode_hashed).
        The payload checksum covers the liberasurecode header and the payload, as it
        covered pyeclib's fragment. The arithmetic runs first; then each data fragment is
        hashed twice while it is in cache (into the object checksum, streamed, and its
        own payload checksum), which measured ~20 % less CPU per 1 MiB object than
        hashing the whole object in one pass beforehand when the objects are not cached.
        The record checksums (``wire``) need the object checksum in every header, so
        they are a pass of their own, right after, while this object's fragments are
        still in cache: hashed later, after a round of objects, they were read back from
        memory (measured ~0.8 ms more per 32 x 1 MiB, ~3 ms more per 8 x 4 MiB)."""
        mv = value if isinstance(value, memoryview) else memoryview(value)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        n = len(mv)
        bodies = self.fragments(mv)
        bs = len(bodies[0])
        whole = checksum_stream()
        heads, sums = [], []
        for i, body in enumerate(bodies):
            if i < self.k and i * bs < n:
                whole.update(body if (i + 1) * bs <= n else mv[i * bs:])  # object bytes only
            lh = self.libec_header(i, n, bs)
            h = checksum_stream(lh)
            h.update(body)
            heads.append(lh)
            sums.append(h.intdigest())
        ocsum = whole.intdigest()
        pack, k, m, t = _RECORD_HEAD.pack, p.k, p.m, EC_TYPES.index(p.ec_type)  # both headers, one call
        if not wire:
            return [(pack(FRAG_MAGIC, FRAG_VERSION, KIND_FRAGMENT, i, k, m, t, 0, n, ocsum, sums[i], heads[i]), body)
                    for i, body in enumerate(bodies)]
        out = []
        for i, body in enumerate(bodies):
            head = pack(FRAG_MAGIC, FRAG_VERSION, KIND_FRAGMENT, i, k, m, t, 0, n, ocsum, sums[i], heads[i])
            h = checksum_stream(head)
            h.update(body)
            out.append((head, body, h.intdigest()))
        return out

    def _tables(self, have: list[int], want: list[int]):
        """The (cached) tables that compute fragments ``want`` from ``have``, or None when
        ``have`` does not determine the data."""
        key = (tuple(have), tuple(want))
        tables = self._decode_tables.get(key)
        if tables is None:
            try:
                tables = self.rs.rebuild_tables(have, want)
            except self.isal.IsalError:
                return None
            if len(self._decode_tables) >= self._TABLES_KEPT:
                self._decode_tables.clear()
            self._decode_tables[key] = tables
        return tables

    def decode_into(self, payloads: dict, olen: int, target: memoryview) -> bool:
        """Write the object (``olen`` bytes) into ``target`` from K or more verified
        fragment payloads ``{index: liberasurecode fragment}``: the data fragments there
        are copied, the missing ones computed in place (a padded last one through a
        scratch block). False, with nothing computed, when the fragments do not describe
        this object (length, header fields) or are fewer than K; the caller checks the
        object checksum over ``target`` in any case."""
        isal = self.isal
        k = self.k
        if olen <= 0 or len(target) != olen or -(-olen // k) >= _ISAL_MAX_BLOCK:
            return False
        bs = -(-olen // k)
        have = sorted(payloads)[:k]  # data fragments first: fewer to compute
        if len(have) < k:
            return False
        for i in have:
            f = payloads[i]
            if len(f) != LIBEC_HEADER + bs:
                return False
            idx, size, _b, flen, *_ = _LIBEC_META.unpack_from(f)
            magic = _LIBEC_TAIL.unpack_from(f, _LIBEC_META.size)[0]
            if idx != i or size != bs or flen != olen or magic != self.magic:
                return False
        missing = [i for i in range(k) if i not in have and i * bs < olen]  # not all padding
        for i in have:
            if i < k and i * bs < olen:
                take = min(bs, olen - i * bs)
                target[i * bs:i * bs + take] = payloads[i][LIBEC_HEADER:LIBEC_HEADER + take]
        if not missing:
            return True
        tables = self._tables(have, missing)
        if tables is None:
            return False
        views = [memoryview(payloads[i]) for i in have]  # kept alive through the call
        srcs = [isal.address(v) + LIBEC_HEADER for v in views]
        t0 = isal.address(target)
        outs, scratch = [], []
        for i in missing:
            if (i + 1) * bs <= olen:
                outs.append(t0 + i * bs)  # straight into the caller's buffer
            else:  # the padded last fragment: computed whole, its object bytes copied
                s = memoryview(isal.uninitialized(bs))
                scratch.append((i, s))
                outs.append(isal.address(s))
        self.rs.run(tables, bs, srcs, outs)
        for i, s in scratch:
            target[i * bs:olen] = s[:olen - i * bs]
        return True


    def reconstruct(self, fragments: list, indexes: list[int]) -> list | None:
        """The liberasurecode fragments ``indexes`` (data or parity) rebuilt from the
        first K of ``fragments`` (verified liberasurecode fragments, read in place at any
        alignment), each a fresh bytearray: the header built here, the payload written
        by one ec_encode_data call. None, with nothing computed, when the sources do not
        agree (length, header fields, repeated or requested indexes) or are too few:
        the caller falls back to pyeclib, which reports the error."""
        isal = self.isal
        k, m = self.k, self.m
        if len(fragments) < k or not indexes:
            return None
        views = [memoryview(f) for f in fragments[:k]]  # kept alive through the call
        flen = len(views[0])
        bs = flen - LIBEC_HEADER
        if bs <= 0 or bs >= _ISAL_MAX_BLOCK:
            return None
        have, olen = [], None
        for v in views:
            if len(v) != flen or v.ndim != 1 or v.itemsize != 1:
                return None
            idx, size, _b, n, *_ = _LIBEC_META.unpack_from(v)
            magic = _LIBEC_TAIL.unpack_from(v, _LIBEC_META.size)[0]
            if olen is None:
                olen = n
            if size != bs or n != olen or magic != self.magic or not 0 <= idx < k + m or idx in have:
                return None
            have.append(idx)
        want = list(indexes)
        if len(set(want)) != len(want) or any(not 0 <= i < k + m or i in have for i in want):
            return None
        tables = self._tables(have, want)
        if tables is None:
            return None
        srcs = [isal.address(v) + LIBEC_HEADER for v in views]
        outs = [isal.uninitialized(flen) for _ in want]  # payload written whole below
        addrs = []
        for i, o in zip(want, outs):
            o[:LIBEC_HEADER] = self.libec_header(i, olen, bs)
            addrs.append(isal.address(memoryview(o)) + LIBEC_HEADER)
        self.rs.run(tables, bs, srcs, addrs)
        return outs


def _same_length(fragments: list) -> bool:
    """Whether every fragment has the first one's length (liberasurecode reads that many
    bytes of each: a short one would be read past its end)."""
    n = len(fragments[0]) if fragments else 0
    return n > 0 and all(len(f) == n for f in fragments)


def _loaded_library(name: str) -> str | None:
    """The path of the shared library ``name`` this process has loaded (Linux), so ctypes
    opens the very instance pyeclib_c uses (its encoder descriptors are per instance)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rsplit(" ", 1)[-1].strip()
                if os.path.basename(path).startswith(name + "-") or os.path.basename(path).startswith(name + ".so"):
                    return path
    except OSError:
        return None
    return None


_CODECS: dict[tuple[int, int], Codec] = {}
_CODECS_LOCK = threading.Lock()

# pyeclib allocates every fragment afresh inside liberasurecode and copies it into a new
# bytes object, out of reach of any SDK buffer pool. Under glibc's dynamic thresholds each
# encode of a 1 MiB object then grows the heap by a few MiB and trims it back, page faults
# included (DESIGN.md pitfalls): measured, an untuned client spent ~1.9x the CPU per
# ec:4+2 batch_put. So ClusterClient's first EC put or get raises them, as kvstored does
# for itself (the daemon's repair agent, which uses this module too, does not call this);
# MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ in the environment win, and
# KVSTORE_TUNE_MALLOC=0 leaves malloc alone. 32 MiB is glibc's own largest dynamic mmap
# threshold on 64-bit; the trim threshold bounds what freed heap the process keeps.
MALLOC_MMAP_THRESHOLD = 32 << 20
MALLOC_TRIM_THRESHOLD = 64 << 20
_malloc_tuned: bool | None = None


def tune_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds for this process, once (see above). False
    where not glibc, opted out, or the environment set both."""
    global _malloc_tuned
    if _malloc_tuned is not None:
        return _malloc_tuned
    with _CODECS_LOCK:  # several threads' first EC calls: mallopt once
        if _malloc_tuned is None:
            _malloc_tuned = _set_malloc_thresholds()
    return _malloc_tuned


def _set_malloc_thresholds() -> bool:
    if os.environ.get("KVSTORE_TUNE_MALLOC", "1").strip().lower() in ("0", "no", "false", "off"):
        return False
    return raise_thresholds(MALLOC_MMAP_THRESHOLD, MALLOC_TRIM_THRESHOLD) is True


def codec(p: Policy) -> Codec:
    """The (shared, thread-safe to call) codec of an EC policy."""
    c = _CODECS.get((p.k, p.m))
    if c is None:
        with _CODECS_LOCK:
            c = _CODECS.get((p.k, p.m))
            if c is None:
                c = _CODECS[(p.k, p.m)] = Codec(p.k, p.m, p.ec_type)
    return c


def _as_bytes(value) -> bytes:
    """``value`` as bytes for pyeclib (which refuses other buffers), without a copy when
    it is (a whole view of) a bytes object already."""
    if isinstance(value, bytes):
        return value
    mv = value if isinstance(value, memoryview) else memoryview(value)
    if isinstance(mv.obj, bytes) and mv.c_contiguous and mv.nbytes == len(mv.obj):
        return mv.obj
    return mv.tobytes()


def encode_parts(p: Policy, value, min_ec_size: int) -> list[tuple[bytes, object]]:
    """Every record of an object under EC policy ``p``, in index order, as (header,
    payload) pairs: K+M fragments, or M+1 whole copies when the object is smaller than
    ``min_ec_size``. A record is its header followed by its payload; the SDK sends the two
    buffers gathered, so no payload is copied: a fragment is the buffer pyeclib returned,
    a whole copy is ``value`` itself. The object is handed to pyeclib without a copy when
    it is a bytes object (or a whole view of one)."""
    n = len(value)
    c = codec(p) if n >= min_ec_size else None
    if c is not None and c.isal is not None and 0 < n and -(-n // p.k) < _ISAL_MAX_BLOCK:
        return c.isal.parts(p, value)  # the object checksum too, fragment by fragment
    ocsum = checksum(value)
    if n < min_ec_size:
        return [(_header(p, KIND_REPLICA, i, n, ocsum, ocsum), value) for i in range(p.m + 1)]
    return [(_header(p, KIND_FRAGMENT, i, n, ocsum, checksum(f)), f)
            for i, f in enumerate(c.encode(value))]


def encode_hashed(p: Policy, value, min_ec_size: int) -> list[tuple[bytes, object, int]]:
    """``encode_parts`` with the checksum of each whole record (header + payload, what a
    PUT frame carries as its payload checksum): (header, payload, record checksum).
    ClusterClient's fanned-out put sends these without hashing the records again; on
    the ISA-L path they are hashed while the object's fragments are still in cache."""
    n = len(value)
    if n >= min_ec_size and 0 < n and -(-n // p.k) < _ISAL_MAX_BLOCK:
        c = codec(p)
        if c.isal is not None:
            return c.isal.parts(p, value, wire=True)
    out = []
    for h, payload in encode_parts(p, value, min_ec_size):
        s = checksum_stream(h)
        s.update(payload)
        out.append((h, payload, s.intdigest()))
    return out


def encode_records(p: Policy, value, min_ec_size: int) -> list[bytes]:
    """``encode_parts`` joined: each record as one bytes object (one copy of its payload)."""
    return [h + payload for h, payload in encode_parts(p, value, min_ec_size)]


def _header(p: Policy, kind: int, index: int, olen: int, ocsum: int, pcsum: int) -> bytes:
    return FRAG_HEADER.pack(FRAG_MAGIC, FRAG_VERSION, kind, index, p.k, p.m,
                            EC_TYPES.index(p.ec_type), 0, olen, ocsum, pcsum)


def fragment_parts(p: Policy, index: int, frag, olen: int, ocsum: int) -> tuple[bytes, object]:
    """(header, payload) of the record of fragment ``index`` (repair writes the ones it
    rebuilt, the two buffers gathered)."""
    return _header(p, KIND_FRAGMENT, index, olen, ocsum, checksum(frag)), frag


def assemble(p: Policy, records: list, out=None):
    """The object from valid records of one EC object (any order; invalid ones, other
    policies' and minority versions ignored), or None when fewer than K distinct
    fragments agree. Concatenates when data fragments 0..K-1 are all there.

    ``out``: a writable buffer the object is decoded into (no intermediate copy on the
    concatenate path); then the object's size is returned instead of a bytearray.
    InvalidArgument when the object does not fit it.

    Healthy reads concatenate data fragments 0..K-1 without checking each record's
    payload checksum first: the object checksum over the result covers every byte taken
    (the records' bytes were also checked against the node's checksum on the wire), so
    hashing each record as well would read the object twice. Only when that check fails,
    or the fragments must be decoded, is every record verified before use."""
    fast = _concat_unverified(p, records, out)
    if fast is not None:
        return fast
    valid: dict[tuple[int, int], tuple] = {}
    for buf in records:
        r = parse_record(buf) if isinstance(buf, (bytes, bytearray, memoryview)) else None
        if r is not None and r[0][4] == p.k and r[0][5] == p.m:
            valid.setdefault((r[0][2], r[0][3]), r)
    for (kind, _i), r in sorted(valid.items()):
        if kind == KIND_REPLICA:  # a whole-object copy wins at once
            return bytearray(r[1]) if out is None else _place(out, r[1], len(r[1]))
    frags = {i: r for (kind, i), r in valid.items() if kind == KIND_FRAGMENT and i < p.n}
    groups: dict[tuple, list[int]] = {}
    for i, r in frags.items():
        groups.setdefault((r[0][8], r[0][9]), []).append(i)
    if not groups:
        return None
    (olen, ocsum), idx = max(groups.items(), key=lambda kv: len(kv[1]))
    if len(idx) < p.k:
        return None
    c = codec(p)
    dest = None if out is None else _dest(out, olen)
    if c.offset is not None and all(i in idx for i in range(p.k)):
        whole = bytearray(olen) if dest is None else None
        target = memoryview(whole) if dest is None else dest
        pos = 0
        for i in range(p.k):
            part = frags[i][1][c.offset:]
            take = min(len(part), olen - pos)
            target[pos:pos + take] = part[:take]
            pos += take
        if pos == olen and checksum(target) == ocsum:
            return whole if dest is None else olen
    if c.isal is not None:
        # missing data fragments computed by ISA-L straight into the caller's buffer (or
        # one fresh one); the object checksum still decides, pyeclib's decode if it fails
        whole = None if dest is not None else c.isal.isal.uninitialized(olen)
        target = dest if dest is not None else memoryview(whole)
        if c.isal.decode_into({i: frags[i][1] for i in idx}, olen, target) and checksum(target) == ocsum:
            return whole if dest is None else olen
    try:
        # K fragments are enough (data fragments first: less to compute); each one more is
        # one more copy into the bytes pyeclib needs
        data = c.decode([frags[i][1] for i in sorted(idx)[:p.k]])
    except c.errors:  # pyeclib's own errors: not enough consistent fragments
        return None
    if len(data) != olen or checksum(data) != ocsum:
        return None
    return bytearray(data) if dest is None else _place(dest, data, olen)


def _concat_unverified(p: Policy, records: list, out):
    """The object concatenated from data fragments 0..K-1 of one version (headers parsed,
    payloads not hashed) when its object checksum matches; else None (the caller then
    verifies every record). Raises InvalidArgument for a buffer the object cannot fit."""
    c = codec(p)
    if c.offset is None:
        return None
    data: list = [None] * p.k
    version = None
    for buf in records:
        if not isinstance(buf, (bytes, bytearray, memoryview)):
            continue
        h = parse_head(buf)
        if h is None or h[4] != p.k or h[5] != p.m:
            continue
        if h[2] != KIND_FRAGMENT:
            return None  # a whole copy: the verified path takes it
        if h[3] < p.k and data[h[3]] is None:
            if version is not None and (h[8], h[9]) != version:
                return None  # records of two versions: let the verified path vote
            version = (h[8], h[9])
            data[h[3]] = memoryview(buf)[FRAG_HEADER.size + c.offset:]
    if version is None or any(d is None for d in data):
        return None
    olen, ocsum = version
    target = None if out is None else _dest(out, olen)
    pieces, pos = [], 0
    for part in data:
        take = min(len(part), olen - pos)
        pieces.append(part[:take])
        pos += take
    if pos != olen:
        return None  # a truncated record
    if out is None:
        whole = bytearray().join(pieces)  # one copy, no zero-fill before it
        return whole if checksum(whole) == ocsum else None
    pos = 0
    for piece in pieces:
        target[pos:pos + len(piece)] = piece
        pos += len(piece)
    return olen if checksum(target) == ocsum else None


def _dest(out, n: int) -> memoryview:
    """The first ``n`` bytes of the caller's buffer ``out``, as a writable byte view
    (InvalidArgument when it is read-only or too small)."""
    dest = memoryview(out).cast("B")
    if dest.readonly:
        raise errors.InvalidArgument("the buffer to decode into is read-only")
    if n > len(dest):
        raise errors.InvalidArgument(f"object of {n} bytes does not fit the {len(dest)}-byte buffer")
    return dest[:n]


def _place(out, data, n: int) -> int:
    """Copy ``data`` (``n`` bytes) into the caller's buffer ``out``; returns n."""
    _dest(out, n)[:] = data
    return n


__all__ = ["DEFAULT_MIN_EC_SIZE", "FRAG_HEADER", "Codec", "Member", "Policy", "assemble", "codec",
           "encode_hashed", "encode_parts", "encode_records", "fragment_key", "fragment_parts", "lap_key", "member_epoch",
           "parse_head", "parse_record", "placement_key", "slots", "split_lap", "tune_malloc"]
