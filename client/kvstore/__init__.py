"""kvstore: the client SDK of kvstored.

    import kvstore
    with kvstore.Client("127.0.0.1:7070", namespace="llama3-8b") as c:
        keys = kvstore.keys.chain(tokens, 256)
        hit = c.lookup(keys)           # how many leading blocks are stored
        blocks = c.batch_get(keys[:hit])
"""
import os as _os

# gRPC's documented default log level is ERROR, but grpcio 1.85's C core writes INFO lines
# on stderr (a failed TLS handshake: "I1202 ... ssl_transport_security.cc ... Handshake
# failed") unless GRPC_VERBOSITY is set before grpc is imported: the typed error already
# says it in one line (kvstore-cli's contract). An application's own setting is kept.
_os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from . import errors, keys
from ._common import TLSConfig
from .aio import AsyncClient
from .client import Client
from .errors import (ChecksumMismatch, Conflict, InvalidArgument, KVStoreError, NoSpace, NotFound,
                     NotVerified, PermissionDenied, ProtocolError, Redirect, Timeout, Unavailable)

__version__ = "0.1.0"

__all__ = ["AsyncClient", "ChecksumMismatch", "Client", "Conflict", "InvalidArgument", "KVStoreError",
           "NoSpace", "NotFound", "NotVerified", "PermissionDenied", "ProtocolError", "Redirect", "TLSConfig", "Timeout",
           "Unavailable", "errors", "keys"]
