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
# failed") unless GRPC_VERBOSITY is set when grpc is imported, which is when it reads it:
# the typed error already says it in one line (kvstore-cli's contract). Set for that
# import only, so the processes this one starts (a kvstored, whose own default is NONE)
# inherit no setting; an application's own setting, or an earlier import, is left alone.
if "GRPC_VERBOSITY" not in _os.environ:
    _os.environ["GRPC_VERBOSITY"] = "ERROR"
    try:
        import grpc as _grpc  # noqa: F401
    finally:
        del _os.environ["GRPC_VERBOSITY"]
    del _grpc

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
