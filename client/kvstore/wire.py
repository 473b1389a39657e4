"""The data-plane frame codec, shared by the daemon and the SDK.

A frame is a fixed 40-byte little-endian header, then the namespace bytes,
then the key bytes, then ``payload_len`` bytes of payload::

    magic    4s  b"KVSD"
    version  u8  1
    op       u8  PUT / GET / PING / AUTH
    flags    u16 FLAG_OVERWRITE on requests, FLAG_RESPONSE on responses
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
straight from / into their own buffers.
"""
from __future__ import annotations

import re
import struct

import xxhash

from .errors import InvalidArgument

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
#   SHM_COMMIT  checksum field = reservation id -> OK (aux=1: deduplicated) or an error
OP_SHM_GET = 17
OP_SHM_RELEASE = 18
OP_SHM_RESERVE = 19
OP_SHM_COMMIT = 20
SHM_IDS = struct.Struct("<QQQ")  # offset, size, lease or reservation id
FLAG_CHECKSUM_UNKNOWN = 0x0002
SHM_HELLO = struct.Struct("<4sIQ")  # b"KVSM", version, arena size: sent with the memfd
SHM_MAGIC = b"KVSM"
OPS = {OP_PUT: "put", OP_GET: "get", OP_PING: "ping", OP_AUTH: "auth",
       OP_SHM_GET: "shm_get", OP_SHM_RELEASE: "shm_release", OP_SHM_RESERVE: "shm_reserve",
       OP_SHM_COMMIT: "shm_commit"}
MAX_TOKEN_LEN = 4096

EPOCH_OPS = frozenset((OP_PUT, OP_GET, OP_SHM_GET, OP_SHM_RESERVE))  # ops a node redirects

FLAG_OVERWRITE = 0x0001
FLAG_RESPONSE = 0x8000

STATUS_OK = 0

MAX_KEY_LEN = 128
MAX_NAMESPACE_LEN = 64
MAX_ERROR_MESSAGE = 1024
DEFAULT_NAMESPACE = "default"

_NAMESPACE_RE = re.compile(rb"[A-Za-z0-9_.:/\-]{1,64}\Z")

checksum = xxhash.xxh3_64_intdigest
"""Checksum of a payload (any buffer): xxh3-64 as an int."""


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


def encode_response(op: int, request_id: int, status: int = STATUS_OK,
                    payload_len: int = 0, payload_checksum: int = 0, aux: int = 0) -> bytes:
    return HEADER.pack(MAGIC, VERSION, op, FLAG_RESPONSE, request_id, status, 0, 0, aux,
                       payload_len, payload_checksum)


def encode_error(op: int, request_id: int, status: int, message: str) -> bytes:
    """A whole error response: header plus the UTF-8 message as payload."""
    body = message.encode("utf-8", "replace")[:MAX_ERROR_MESSAGE]
    return encode_response(op, request_id, status, len(body), 0) + body


def encode_auth(request_id: int, token: str | bytes) -> bytes:
    """An AUTH request frame carrying ``token``."""
    tok = token.encode() if isinstance(token, str) else bytes(token)
    if not 1 <= len(tok) <= MAX_TOKEN_LEN:
        raise InvalidArgument(f"token length {len(tok)} outside 1-{MAX_TOKEN_LEN} bytes")
    return HEADER.pack(MAGIC, VERSION, OP_AUTH, 0, request_id, 0, 0, 0, 0, len(tok), 0) + tok
