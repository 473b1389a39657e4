"""Pieces shared by Client and AsyncClient: argument checks, gRPC error mapping."""
from __future__ import annotations

from dataclasses import dataclass

import grpc

from . import errors
from .wire import DEFAULT_NAMESPACE, key_bytes, namespace_bytes

_GRPC_TO_ERROR = {
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.NoSpace,
    grpc.StatusCode.ALREADY_EXISTS: errors.Conflict,
    grpc.StatusCode.DATA_LOSS: errors.ChecksumMismatch,
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: errors.PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.Timeout,
}

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]


def grpc_error(e: grpc.RpcError, address: str) -> errors.KVStoreError:
    """The typed error for a failed control call (exact code from trailing metadata)."""
    code = e.code() if hasattr(e, "code") else None
    details = (e.details() if hasattr(e, "details") else "") or str(code)
    for k, v in (e.trailing_metadata() or ()) if hasattr(e, "trailing_metadata") else ():
        if k == "kvstore-code":
            return errors.error_for_code(int(v), details)
    cls = _GRPC_TO_ERROR.get(code, errors.KVStoreError)
    if cls in (errors.Unavailable, errors.Timeout):
        details = f"kvstored at {address} not reachable: {details}"
    return cls(details)


@dataclass(frozen=True)
class ServerInfo:
    node_id: str
    version: str
    data_host: str
    data_port: int
    max_value_size: int
    max_control_value_size: int
    max_key_length: int
    max_batch_keys: int
    checksum_algorithm: str
    wire_version: int

    @classmethod
    def from_pb(cls, r) -> "ServerInfo":
        return cls(r.node_id, r.version, r.data_host, r.data_port, r.max_value_size,
                   r.max_control_value_size, r.max_key_length, r.max_batch_keys,
                   r.checksum_algorithm, r.wire_version)


_WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


def data_endpoint(info: ServerInfo, control_address: str) -> tuple[str, int]:
    """Where to dial the data path: the advertised host, or the control host when the
    daemon listens on a wildcard address (which is not dialable from elsewhere)."""
    host = info.data_host
    if host in _WILDCARD_HOSTS:
        host = control_address.rpartition(":")[0].strip("[]") or "127.0.0.1"
    return host, info.data_port


def as_bytes_view(value) -> memoryview:
    """A flat byte view of any C-contiguous buffer (bytes, bytearray, numpy, mmap...)."""
    try:
        mv = memoryview(value)
    except TypeError:
        raise errors.InvalidArgument(f"value must support the buffer protocol, not {type(value).__name__}")
    if not mv.c_contiguous:
        raise errors.InvalidArgument("value buffer must be C-contiguous")
    return mv.cast("B") if (mv.format != "B" or mv.ndim != 1) else mv


def writable_view(buffer) -> memoryview:
    mv = as_bytes_view(buffer)
    if mv.readonly:
        raise errors.InvalidArgument("get_into needs a writable buffer")
    return mv


class Namespaced:
    """Namespace handling shared by both clients."""

    def __init__(self, namespace: str):
        self.namespace = namespace
        self._ns = namespace_bytes(namespace)

    def _nsb(self, namespace: str | None) -> bytes:
        return self._ns if namespace is None else namespace_bytes(namespace)

    def _nss(self, namespace: str | None) -> str:
        return self.namespace if namespace is None else namespace_bytes(namespace).decode()

    @staticmethod
    def _keys(keys) -> list[bytes]:
        if isinstance(keys, (bytes, str)):
            raise errors.InvalidArgument("pass a list of keys, not a single key")
        return [key_bytes(k) for k in keys]


__all__ = ["DEFAULT_NAMESPACE", "GRPC_OPTIONS", "Namespaced", "ServerInfo", "as_bytes_view",
           "data_endpoint", "grpc_error", "writable_view"]
