"""Typed errors shared by the SDK and the daemon.

Each error has a stable numeric ``code`` that travels in data-plane frames and
in gRPC trailing metadata, so both paths raise the same Python class.
"""
from __future__ import annotations


class KVStoreError(Exception):
    """Base class of every error the store reports."""

    code = 9  # INTERNAL
    name = "Internal"

    def __init__(self, message: str = "", *, request_id: int | None = None):
        super().__init__(message or self.name)
        self.message = message or self.name
        self.request_id = request_id


class NotFound(KVStoreError):
    code = 1
    name = "NotFound"


class NoSpace(KVStoreError):
    code = 2
    name = "NoSpace"


class Conflict(KVStoreError):
    code = 3
    name = "Conflict"


class Deleted(Conflict):
    """A cluster repair write (wire FLAG_REPAIR) of a key the node saw deleted lately:
    refused, so a delete racing a repair pass leaves nothing behind (kvstored/engine/fence.py).
    Never raised to a client that does not set the flag."""

    code = 12
    name = "Deleted"


class ChecksumMismatch(KVStoreError):
    code = 4
    name = "ChecksumMismatch"


class InvalidArgument(KVStoreError):
    code = 5
    name = "InvalidArgument"


class PermissionDenied(KVStoreError):
    code = 6
    name = "PermissionDenied"


class Unavailable(KVStoreError):
    code = 7
    name = "Unavailable"


class ProtocolError(InvalidArgument):
    """A frame that cannot be parsed; the daemon closes the connection after it."""

    code = 8
    name = "ProtocolError"


class Timeout(Unavailable):
    code = 10
    name = "Timeout"


class Redirect(Unavailable):
    """The request was sent with an old cluster member list (its epoch differs from the
    node's): refresh the member list and send it to the object's current nodes. A plain
    Client never sees it (it sends no epoch); ClusterClient handles it by itself."""

    code = 11
    name = "Redirect"


class NotVerified(Unavailable):
    """The node holds the object but has not verified it yet: a cluster node back from a
    restart (NVMe tier) or dropped from the member list holds its records back until
    repair has checked them against the other nodes (docs/cluster.md). Not NotFound
    ("gone, recompute"): the object is there, retry shortly. An answer, not a failed
    node: callers must not mark the node down for it.

    Sent only to callers that announce they know it (data plane: a GET with
    wire.FLAG_NOT_VERIFIED_OK; gRPC: metadata ``kvstore-accepts: not-verified``, which
    this SDK always sends); older SDKs get NotFound, as before."""

    code = 13
    name = "NotVerified"


Internal = KVStoreError

_BY_CODE: dict[int, type[KVStoreError]] = {
    cls.code: cls
    for cls in (NotFound, NoSpace, Conflict, ChecksumMismatch, InvalidArgument,
                PermissionDenied, Unavailable, ProtocolError, KVStoreError, Timeout, Redirect,
                Deleted, NotVerified)
}


def error_for_code(code: int, message: str = "", request_id: int | None = None) -> KVStoreError:
    """Build the typed error for a wire status code (unknown codes -> KVStoreError)."""
    cls = _BY_CODE.get(code, KVStoreError)
    return cls(message, request_id=request_id)
