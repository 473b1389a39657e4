"""The data-plane frame codec, shared by the daemon and the SDK.

A frame is a fixed 40-byte little-endian header, then the namespace bytes,
then the key bytes, then ``payload_len`` bytes of payload::

    magic    4s  b"KVSD"
    version  u8  1
    op       u8  PUT / GET / PING / AUTH
    flags    u16 requests: FLAG_OVERWRITE, FLAG_REPAIR (PUT and GET), FLAG_COMMIT_AGE (a
                 repair PUT; other bits on a PUT are refused), FLAG_NOT_VERIFIED_OK (gets);
                 FLAG_RESPONSE on responses
    req_id   u64 chosen by the client; responses echo it (completion may be out of order)
    status   u16 0 on requests; a kvstore.errors code on responses
    ns_len   u8  namespace length (responses: 0)
    key_len  u8  key length (responses: 0)
    aux      u32 requests: the sender's cluster member-list epoch (0 = none; PUT, GET,
                 SHM_GET, SHM_RESERVE), a node with another epoch answers Redirect;
                 responses: op-specific (a put's aux=1: deduplicated)
    length   u64 payload length
    checksum u64 xxh3-64 of the payload (0 for error payloads, which are UTF-8 text)

Bulk bytes never go through this module: callers send and receive payloads
straight from / into their own buffers. ``FrameReader`` is the one incremental
reader of a frame stream, used by the daemon's data session and the SDK alike:
it collects headers in a small buffer and hands large payloads to the caller's
own view (zero copy) or skips them.
"""
from __future__ import annotations

import re
import struct
from typing import NamedTuple

import xxhash

from .errors import InvalidArgument, ProtocolError

MAGIC = b"KVSD"
VERSION = 1
HEADER = struct.Struct("<4sBBHQHBBIQQ")
HEADER_SIZE = HEADER.size  # 40

OP_PUT = 1
OP_GET = 2
OP_PING = 3
# AUTH: the payload is a token (UTF-8, at most MAX_TOKEN_LEN bytes; namespace and key
# empty). When the daemon has auth enabled it is the first frame on a connection;
# the connection is then bound to that token's namespaces and scopes.
OP_AUTH = 4
# Same-host shared-memory channel (a Unix socket; see kvstored/dataplane/shm.py). Only
# offsets and ids travel; the bytes are in the daemon's arena, which the client maps.
#   SHM_GET     ns, key -> OK, checksum field = the object's checksum, 24-byte payload
#               SHM_IDS: offset, size, lease id
#   SHM_RELEASE checksum field = lease id -> no answer (an unknown lease closes the connection)
#   SHM_RESERVE ns, key, length = object size (no payload follows), flags: overwrite,
#               0x0002 = the daemon computes the checksum at commit (else checksum field)
#               -> OK with SHM_IDS: offset, size, reservation id; or aux=1: already stored
#   SHM_COMMIT  checksum field = reservation id -> OK (aux=1: deduplicated) or an error;
#               flags 0x0004 (FLAG_REFILL): the answer may carry a *credit* (SHM_IDS: offset,
#               size, credit id), a slot of the same size reserved ahead for the next put
#   SHM_PUT     ns, key, checksum = the object's, length = credit id (no payload follows:
#               the object is already in the credit's slot, its size is the credit's),
#               flags: overwrite, FLAG_REFILL -> like SHM_COMMIT (aux=1: deduplicated, and
#               the same credit comes back); one round trip per put
OP_SHM_GET = 17
OP_SHM_RELEASE = 18
OP_SHM_RESERVE = 19
OP_SHM_COMMIT = 20
SHM_IDS = struct.Struct("<QQQ")  # offset, size, lease or reservation id
FLAG_CHECKSUM_UNKNOWN = 0x0002
FLAG_REFILL = 0x0004
OP_SHM_PUT = 24
SHM_HELLO = struct.Struct("<4sIQ")  # b"KVSM", version, arena size: sent with the memfd
SHM_MAGIC = b"KVSM"
# RDMA, on a TCP data connection (see kvstored/dataplane/rdma.py); the bytes move by RDMA
#   RDMA_CONNECT payload = the client's kvstore.rdma.verbs.Endpoint -> OK with the daemon's
#   RDMA_PUT     ns, key, checksum = the object's, payload = RDMA_DESC of the client's
#                registered buffer (the daemon RDMA-READs it) -> OK (aux=1: deduplicated)
#   RDMA_GET     ns, key, payload = RDMA_DESC of the client's buffer (capacity) -> the daemon
#                RDMA-WRITEs the object, then OK, checksum = the object's, 8-byte payload: size
OP_RDMA_CONNECT = 21
OP_RDMA_PUT = 22
OP_RDMA_GET = 23
RDMA_DESC = struct.Struct("<QQI4x")  # address, length, rkey
RDMA_SIZE = struct.Struct("<Q")
OPS = {OP_PUT: "put", OP_GET: "get", OP_PING: "ping", OP_AUTH: "auth",
       OP_SHM_GET: "shm_get", OP_SHM_RELEASE: "shm_release", OP_SHM_RESERVE: "shm_reserve",
       OP_SHM_COMMIT: "shm_commit", OP_RDMA_CONNECT: "rdma_connect", OP_RDMA_PUT: "rdma_put",
       OP_RDMA_GET: "rdma_get", OP_SHM_PUT: "shm_put"}
MAX_TOKEN_LEN = 4096

EPOCH_OPS = frozenset((OP_PUT, OP_GET, OP_SHM_GET, OP_SHM_RESERVE, OP_RDMA_PUT,
                       OP_RDMA_GET, OP_SHM_PUT))  # ops a node redirects

FLAG_OVERWRITE = 0x0001
# PUT from a cluster node's repair agent: refused with errors.Deleted when the key was
# deleted on the receiving node lately (kvstored/engine/fence.py). Needs the admin scope on
# the namespace when auth is on (repair presents cluster.token). On a GET: a repair agent's
# read, counted apart from clients' requests (kvstored/cluster/repair/pace.py); nodes of
# earlier versions ignore it.
FLAG_REPAIR = 0x0008
# PUT, with FLAG_REPAIR only: the payload starts with COMMIT_AGE, the milliseconds since the
# record being copied or rebuilt was committed on the sender (an age: it crosses nodes, a
# clock never does), then the record; ``length`` counts both, ``checksum`` is the record's
# alone (what the receiver stores and deduplicates by). The receiver stores the record with
# that commit time on its own clock (repair drops records older than a delete a peer
# reports: a copy must not look newer than the record it copies). Sent only to a node
# whose Heads answer lists it in ``put_flags``; refused (InvalidArgument, nothing stored)
# without FLAG_REPAIR, on a payload shorter than COMMIT_AGE, or with an age outside
# 0..MAX_COMMIT_AGE_MS.
FLAG_COMMIT_AGE = 0x0020
COMMIT_AGE = struct.Struct("<q")
MAX_COMMIT_AGE_MS = 100 * 365 * 86_400_000  # a century: past it an age is garbage, not old
PUT_FLAGS = FLAG_OVERWRITE | FLAG_REPAIR | FLAG_COMMIT_AGE  # the flags a PUT may carry
# GET, SHM_GET, RDMA_GET: the sender knows errors.NotVerified (a record held back until a
# cluster node's repair has checked it). This SDK sets it on every get; a node answers
# NotFound in its place on a connection whose gets never carried it (an older SDK, which
# would read the unknown code as Internal). Nodes of earlier versions ignore it.
FLAG_NOT_VERIFIED_OK = 0x0010
FLAG_RESPONSE = 0x8000

STATUS_OK = 0

MAX_KEY_LEN = 128
MAX_NAMESPACE_LEN = 64
MAX_ERROR_MESSAGE = 1024
DEFAULT_NAMESPACE = "default"

_NAMESPACE_RE = re.compile(rb"[A-Za-z0-9_.:/\-]{1,64}\Z")

checksum = xxhash.xxh3_64_intdigest
"""Checksum of a payload (any buffer): xxh3-64 as an int."""


checksum_stream = xxhash.xxh3_64
"""A new incremental hasher (``update(buf)`` per piece, ``intdigest()`` at the end) whose
result equals ``checksum`` of the pieces' concatenation: a receiver hashes each chunk of a
large payload right after it lands, while it is still in cache."""


def checksum_parts(parts) -> int:
    """``checksum`` of the concatenation of ``parts`` (buffers), computed incrementally:
    a value given as (header, fragment) is checksummed without joining it."""
    if len(parts) == 1:
        return checksum(parts[0])
    h = checksum_stream()
    for p in parts:
        h.update(p)
    return h.intdigest()


def namespace_bytes(namespace: str | bytes) -> bytes:
    """Validate a namespace and return its wire bytes."""
    ns = namespace.encode() if isinstance(namespace, str) else bytes(namespace)
    if not _NAMESPACE_RE.match(ns):
        raise InvalidArgument(
            f"invalid namespace {ns[:80]!r}: 1-{MAX_NAMESPACE_LEN} bytes of [A-Za-z0-9_.:/-]")
    return ns


def key_bytes(key: str | bytes | bytearray | memoryview) -> bytes:
    """Validate a key (opaque binary, 1-128 bytes; str is UTF-8 encoded)."""
    k = key.encode() if isinstance(key, str) else bytes(key)
    if not 1 <= len(k) <= MAX_KEY_LEN:
        raise InvalidArgument(f"key length {len(k)} outside 1-{MAX_KEY_LEN} bytes")
    return k


def encode_request(op: int, request_id: int, ns: bytes, key: bytes,
                   payload_len: int = 0, payload_checksum: int = 0, flags: int = 0,
                   epoch: int = 0) -> bytes:
    """Header + namespace + key of a request (ns and key already validated)."""
    return HEADER.pack(MAGIC, VERSION, op, flags, request_id, 0, len(ns), len(key), epoch,
                       payload_len, payload_checksum) + ns + key


def encode_commit_age(seconds: float) -> bytes:
    """The COMMIT_AGE prefix of a FLAG_COMMIT_AGE put: ``seconds`` since the record's commit
    in whole milliseconds, rounded down (the copy looks a little newer, never older: a
    record is not taken for the leftover of a delete made just after it), 0 when
    negative (a clock stepped back), at most MAX_COMMIT_AGE_MS."""
    ms = int(seconds * 1000) if seconds > 0 else 0
    return COMMIT_AGE.pack(min(ms, MAX_COMMIT_AGE_MS))


def decode_commit_age(prefix) -> float:
    """Seconds of a COMMIT_AGE prefix (8 bytes); InvalidArgument outside 0..MAX_COMMIT_AGE_MS."""
    (ms,) = COMMIT_AGE.unpack(prefix)
    if not 0 <= ms <= MAX_COMMIT_AGE_MS:
        raise InvalidArgument(f"a repair put's commit age is {ms} ms: outside 0-{MAX_COMMIT_AGE_MS}; "
                              "nothing was stored")
    return ms / 1000.0


def encode_response(op: int, request_id: int, status: int = STATUS_OK,
                    payload_len: int = 0, payload_checksum: int = 0, aux: int = 0) -> bytes:
    return HEADER.pack(MAGIC, VERSION, op, FLAG_RESPONSE, request_id, status, 0, 0, aux,
                       payload_len, payload_checksum)


def encode_error(op: int, request_id: int, status: int, message: str) -> bytes:
    """A whole error response: header plus the UTF-8 message as payload."""
    body = message.encode("utf-8", "replace")[:MAX_ERROR_MESSAGE]
    return encode_response(op, request_id, status, len(body), 0) + body


# The payload an OK response carries, by its op: none, the SHM_IDS / RDMA_SIZE record, the
# daemon's RDMA endpoint (kvstore.rdma.verbs.ENDPOINT, 44 bytes; 256 leaves room), or for a
# GET the object itself (None here: bounded by the daemon's max_value_size, which the
# reader passes). An op not in this table is no answer the SDK ever asked for.
_ANSWER_PAYLOAD = {OP_PUT: 0, OP_PING: 0, OP_AUTH: 0, OP_GET: None,
                   OP_SHM_GET: SHM_IDS.size, OP_SHM_RESERVE: SHM_IDS.size,
                   OP_SHM_COMMIT: SHM_IDS.size, OP_SHM_PUT: SHM_IDS.size,
                   OP_RDMA_CONNECT: 256, OP_RDMA_PUT: 0, OP_RDMA_GET: RDMA_SIZE.size}


def check_response(op: int, rid: int, status: int, ns_len: int, key_len: int, length: int,
                   max_payload: int, expect=None) -> None:
    """Refuse a response header before its reader allocates, receives or discards anything
    for it: the one check of every SDK reader (sync channels, GetReader, AsyncClient).

    A peer that is not a healthy kvstored (a corrupted stream, another service on the
    port, a misbehaving node) could otherwise claim a 2^40-byte payload and have the
    client zero-fill or wait for it. Refused, with a ProtocolError naming the field and
    its value (the caller then drops the connection: the stream is out of step): names
    on a response; an error message longer than MAX_ERROR_MESSAGE (the daemon truncates
    to it); an OK answer whose op is unknown, or not in ``expect`` (the op, or a tuple of
    ops, of the requests being answered; None: any); a payload longer than its op's
    (``max_payload``, the daemon's max_value_size, for a GET)."""
    if ns_len or key_len:
        raise ProtocolError(f"response {rid} names a namespace or key "
                            f"(ns_len={ns_len}, key_len={key_len}); responses carry none",
                            request_id=rid)
    if status:
        if length > MAX_ERROR_MESSAGE:
            raise ProtocolError(f"error response {rid} claims length={length}, over the "
                                f"{MAX_ERROR_MESSAGE}-byte error message limit", request_id=rid)
        return
    cap = _ANSWER_PAYLOAD.get(op, -1)
    if cap is None:
        cap = max_payload
    elif cap < 0:
        raise ProtocolError(f"response {rid} has unknown op={op}", request_id=rid)
    if expect is not None and op != expect and (type(expect) is int or op not in expect):
        raise ProtocolError(f"response {rid} has op={op} ({OPS[op]}), which does not answer "
                            f"the request ({_op_names(expect)})", request_id=rid)
    if length > cap:
        raise ProtocolError(f"{OPS[op]} response {rid} claims length={length}, over the "
                            f"{cap}-byte limit of its payload"
                            + (" (the daemon's max_value_size)" if op == OP_GET else ""),
                            request_id=rid)


def _op_names(expect) -> str:
    ops = (expect,) if type(expect) is int else expect
    return " or ".join(OPS.get(o, str(o)) for o in ops)


def encode_auth(request_id: int, token: str | bytes) -> bytes:
    """An AUTH request frame carrying ``token``."""
    tok = token.encode() if isinstance(token, str) else bytes(token)
    if not 1 <= len(tok) <= MAX_TOKEN_LEN:
        raise InvalidArgument(f"token length {len(tok)} outside 1-{MAX_TOKEN_LEN} bytes")
    return HEADER.pack(MAGIC, VERSION, OP_AUTH, 0, request_id, 0, 0, 0, 0, len(tok), 0) + tok


# ------------------------------------------------------------------ decoding

class Header(NamedTuple):
    """A decoded header (magic and version are checked by ``decode``, not kept)."""

    op: int
    flags: int
    req_id: int
    status: int
    ns_len: int
    key_len: int
    aux: int
    length: int
    checksum: int

    def encode(self, ns: bytes = b"", key: bytes = b"") -> bytes:
        """The header's wire bytes, followed by ``ns`` and ``key`` (their lengths win)."""
        return HEADER.pack(MAGIC, VERSION, self.op, self.flags, self.req_id, self.status,
                           len(ns), len(key), self.aux, self.length, self.checksum) + ns + key


class FrameError(ProtocolError):
    """The byte stream cannot be parsed any further (bad magic or version, truncated).

    ``request_id`` is the frame's id when it can be trusted (the version matched), else 0.
    """


_new_header = tuple.__new__


def decode(buf, offset: int = 0) -> Header:
    """Decode the 40-byte header at ``offset`` of ``buf``; raises FrameError."""
    if len(buf) - offset < HEADER_SIZE:
        raise FrameError(f"truncated header: {max(len(buf) - offset, 0)} of {HEADER_SIZE} bytes")
    t = HEADER.unpack_from(buf, offset)
    if t[0] != MAGIC or t[1] != VERSION:
        raise _bad_frame(t)
    return _new_header(Header, t[2:])


def _bad_frame(t: tuple) -> FrameError:
    if t[0] != MAGIC:  # the id of a frame whose version is wrong too is noise
        return FrameError("bad frame magic", request_id=t[4] if t[1] == VERSION else 0)
    return FrameError(f"unsupported wire version {t[1]} (expected {VERSION})",
                      request_id=t[4])


# Payloads skipped by any reader land here; their content is never read, so one buffer
# serves every reader (and thread) of the process.
_SCRATCH = memoryview(bytearray(1 << 20))


class _Sink:
    """A receive target that swallows ``size`` bytes into the shared scratch buffer."""

    __slots__ = ("size",)

    def __init__(self, size: int):
        self.size = size

    def __getitem__(self, s: slice) -> memoryview:
        return _SCRATCH[:min(self.size - (s.start or 0), len(_SCRATCH))]


# Whole-frame structs (header, namespace, key) by name lengths, made on first use;
# names are at most 255 bytes each, and only this many shapes are kept.
_FRAMES: dict[int, struct.Struct] = {}
_MAX_FRAMES = 512


def _frame_struct(ns_len: int, key_len: int) -> struct.Struct:
    frame = struct.Struct(f"{HEADER.format}{ns_len}s{key_len}s")
    if len(_FRAMES) < _MAX_FRAMES:
        _FRAMES[ns_len << 8 | key_len] = frame
    return frame


class FrameReader:
    """Incremental reader of one frame stream; it does no I/O itself.

    The owner receives into ``buffer()`` (a ``BufferedProtocol.get_buffer`` or a
    ``recv_into``) and reports the count with ``filled(n)``. ``next()`` returns the
    next ``(header, ns, key)`` once all of it is here. The payload that follows is
    then the owner's to place: ``receive_into(view, n)`` (later bytes go straight into
    ``view``; whatever came with the header is copied), ``skip(n)``, or read from the
    buffer for small inline payloads. ``need()`` says how many bytes the next step
    waits for.
    """

    __slots__ = ("buf", "view", "start", "end", "target", "got", "want", "_compact_at")

    def __init__(self, size: int = 256 << 10):
        if size < 2 * (HEADER_SIZE + MAX_NAMESPACE_LEN + 255):
            raise ValueError(f"frame reader buffer of {size} bytes is too small")
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.start = 0  # first unparsed byte
        self.end = 0  # end of received bytes
        self.target = None  # payload destination: a memoryview or a _Sink
        self.got = 0
        self.want = 0
        # moving the tail to the front is cheap while it is small: do it only when the
        # buffer's free end gets short (a quarter of the buffer, at most 64 KiB)
        self._compact_at = size - min(size // 4, 65536)

    # ---- receiving
    def buffer(self) -> memoryview:
        """Where the next received bytes go: the payload target, else the header buffer."""
        if self.target is not None:
            return self.target[self.got:]
        if self.end > self._compact_at:
            n = self.end - self.start
            self.buf[:n] = self.buf[self.start:self.end]
            self.start, self.end = 0, n
        return self.view[self.end:]

    def filled(self, n: int) -> bool:
        """``n`` bytes were written into ``buffer()``. True: the payload target is complete."""
        if self.target is None:
            self.end += n
            return False
        self.got += n
        if self.got < self.want:
            return False
        self.target = None
        return True

    def feed(self, data) -> int:
        """Copy bytes in (for callers that get bytes, not buffers). Returns how many were
        taken: it stops at the end of a payload target (``receiving`` turns False) so the
        caller can act on the payload, and when the header buffer is full."""
        dst = self.buffer()
        n = min(len(dst), len(data))
        dst[:n] = data[:n]
        self.filled(n)
        return n

    # ---- parsing
    @property
    def receiving(self) -> bool:
        """A payload is being received into a target (no frame can be parsed now)."""
        return self.target is not None

    def buffered(self) -> int:
        """Bytes received and not yet parsed or placed."""
        return self.end - self.start

    def need(self) -> int:
        """Bytes still missing for the next step (a payload, a header, its ns and key)."""
        if self.target is not None:
            return self.want - self.got
        avail = self.end - self.start
        if avail < HEADER_SIZE:
            return HEADER_SIZE - avail
        t = HEADER.unpack_from(self.buf, self.start)
        return max(HEADER_SIZE + t[6] + t[7] - avail, 0)

    def next(self):
        """``(Header, ns, key)`` of the next frame, or None while incomplete (or while a
        payload is being received). Raises FrameError on a stream that cannot be parsed."""
        start = self.start
        end = self.end
        if self.target is not None or end - start < HEADER_SIZE:
            return None
        buf = self.buf
        t = HEADER.unpack_from(buf, start)
        if t[0] != MAGIC or t[1] != VERSION:
            raise _bad_frame(t)
        nl = t[6]
        kl = t[7]
        e = start + HEADER_SIZE + nl + kl
        if e > end:
            return None
        # one unpack of a struct made for these name lengths gives the namespace and key
        # as immutable bytes, without the slice-then-copy of bytes(buf[a:b])
        frame = _FRAMES.get(nl << 8 | kl)
        if frame is None:
            frame = _frame_struct(nl, kl)
        t = frame.unpack_from(buf, start)
        if e == end:
            self.start = self.end = 0
        else:
            self.start = e
        return _new_header(Header, t[2:11]), t[11], t[12]

    def take(self, n: int) -> bytes | None:
        """The next ``n`` bytes if they are all buffered (small inline payloads), else None."""
        if self.target is not None or self.end - self.start < n:
            return None
        b = bytes(self.buf[self.start:self.start + n])
        self.start += n
        if self.start == self.end:
            self.start = self.end = 0
        return b

    def receive_into(self, view: memoryview, n: int) -> bool:
        """Place the next ``n`` payload bytes into ``view``. True: all were already here."""
        take = min(self.end - self.start, n)
        if take:
            view[:take] = self.view[self.start:self.start + take]
            self.start += take
            if self.start == self.end:
                self.start = self.end = 0
        if take == n:
            return True
        self.target, self.got, self.want = view, take, n
        return False

    def skip(self, n: int) -> bool:
        """Drop the next ``n`` payload bytes. True: all were already here."""
        take = min(self.end - self.start, n)
        self.start += take
        if self.start == self.end:
            self.start = self.end = 0
        if take == n:
            return True
        self.target, self.got, self.want = _Sink(n - take), 0, n - take
        return False

    def divert(self) -> None:
        """Receive the rest of the current payload into scratch: its owner gave up on it
        (a caller that timed out must never have its buffer written again)."""
        if self.target is not None and not isinstance(self.target, _Sink):
            left = self.want - self.got
            self.target, self.got, self.want = _Sink(left), 0, left

    def abandon(self) -> None:
        """Forget a payload target (the connection is gone; its bytes will never come)."""
        self.target = None
