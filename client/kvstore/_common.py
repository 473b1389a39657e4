"""Pieces shared by Client and AsyncClient: argument checks, gRPC error mapping, TLS."""
from __future__ import annotations

import socket
import ssl
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

# How long a client tries to open a connection (gRPC or data path) before it calls the
# daemon unreachable. A refused connection fails at once; this bounds a host that drops
# packets. gRPC's own default is 20 s.
CONNECT_TIMEOUT = 2.0
# gRPC re-dials a failed channel with exponential back-off (default: 1 s growing to
# 120 s), and calls made during a back-off fail without dialling: a node that came back
# after a minute would stay unreachable for up to two more. Capped at 1 s, a returning
# node is reached within a second of answering; dialling a refused port once a second
# costs nothing.
RECONNECT_BACKOFF_MS = (100, 1000)

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
    ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[1]),
]


def grpc_options(connect_timeout: float = CONNECT_TIMEOUT) -> list:
    """Channel options; ``grpc.min_reconnect_backoff_ms`` is gRPC's minimum connect
    timeout (how long one dial may take), not a back-off."""
    return GRPC_OPTIONS + [("grpc.min_reconnect_backoff_ms", max(100, int(connect_timeout * 1000)))]


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
    shm_socket: str = ""

    @classmethod
    def from_pb(cls, r) -> "ServerInfo":
        return cls(r.node_id, r.version, r.data_host, r.data_port, r.max_value_size,
                   r.max_control_value_size, r.max_key_length, r.max_batch_keys,
                   r.checksum_algorithm, r.wire_version, r.shm_socket)


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


def value_parts(value) -> tuple[list[memoryview], int]:
    """A put's value as (byte views, total size): one buffer, or a tuple/list of buffers
    that is stored as their concatenation (sent gathered, e.g. a header and a fragment)."""
    if isinstance(value, (tuple, list)):
        parts = [as_bytes_view(p) for p in value]
        return parts, sum(map(len, parts))
    mv = as_bytes_view(value)
    return [mv], len(mv)


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


@dataclass(frozen=True)
class TLSConfig:
    """How a client talks TLS to kvstored (both the control and the data plane).

    ``ca_file``: the CA certificate(s) that signed kvstored's certificate (None: the
    system's trust store). ``cert_file`` / ``key_file``: this client's certificate and
    key, for a daemon that requires mutual TLS. ``server_name``: the name to check in
    kvstored's certificate when it is not the host of the address dialled.
    """

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None

    def ssl_context(self) -> ssl.SSLContext:
        try:
            ctx = ssl.create_default_context(cafile=self.ca_file)  # verifies cert and name
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if self.cert_file:
                ctx.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
            raise errors.InvalidArgument(f"TLS settings: cannot load {self._files()}: {e}") from None
        return ctx

    def grpc_credentials(self) -> grpc.ChannelCredentials:
        try:
            root = _read(self.ca_file) if self.ca_file else None
            chain = _read(self.cert_file) if self.cert_file else None
            key = _read(self.key_file or self.cert_file) if self.cert_file else None
        except OSError as e:
            raise errors.InvalidArgument(f"TLS settings: cannot read {e.filename}: {e.strerror}") from None
        return grpc.ssl_channel_credentials(root, key, chain)

    def grpc_options(self) -> list:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def _files(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in (("ca_file", self.ca_file), ("cert_file", self.cert_file),
                                                   ("key_file", self.key_file)) if v) or "the system CAs"


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def control_channel(address: str, tls: TLSConfig | None, aio: bool = False,
                    connect_timeout: float = CONNECT_TIMEOUT):
    """The gRPC channel to kvstored's control address, plaintext or TLS."""
    mod = grpc.aio if aio else grpc
    options = grpc_options(connect_timeout)
    if tls is None:
        return mod.insecure_channel(address, options=options)
    return mod.secure_channel(address, tls.grpc_credentials(), options=options + tls.grpc_options())


def ride_out_seconds(ride_out_restarts, timeout: float) -> float:
    """How long a client keeps retrying an unreachable daemon: False/0 = not at all (fail
    fast), True = up to ``timeout``, a number = that many seconds (at most ``timeout``)."""
    if ride_out_restarts is True:
        return float(timeout)
    try:
        s = float(ride_out_restarts or 0)
    except (TypeError, ValueError):
        raise errors.InvalidArgument(f"ride_out_restarts must be a bool or seconds, not {ride_out_restarts!r}")
    if s < 0:
        raise errors.InvalidArgument("ride_out_restarts must not be negative")
    return min(s, float(timeout))


def is_unreachable(err: errors.KVStoreError) -> bool:
    """An error that means "nobody answered" (worth a retry while riding out a restart):
    Unavailable, but not a Timeout (the time is spent) nor a Redirect or NotVerified (answers)."""
    return isinstance(err, errors.Unavailable) and not isinstance(
        err, (errors.Timeout, errors.Redirect, errors.NotVerified))


def auth_metadata(token: str | None) -> tuple | None:
    """gRPC metadata carrying ``token`` (None when there is none)."""
    if not token:
        return None
    if any(c.isspace() for c in token):
        raise errors.InvalidArgument("token must not contain white space")
    return (("authorization", f"Bearer {token}"),)


# Sent with every control call: this SDK knows errors.NotVerified (code 13). A daemon
# answers NotFound in its place to callers without it (older SDKs would read the unknown
# code as Internal); the data plane's counterpart is wire.FLAG_NOT_VERIFIED_OK.
ACCEPTS_METADATA = (("kvstore-accepts", "not-verified"),)


def call_metadata(token: str | None) -> tuple:
    """The metadata of every control call: the token's (``auth_metadata``) and what this
    SDK accepts."""
    return (auth_metadata(token) or ()) + ACCEPTS_METADATA


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


# OpenSSL reasons that mean "the other side did not answer in TLS"
_NOT_TLS = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG",
            "UNEXPECTED_RECORD", "HTTP_REQUEST", "UNKNOWN_PROTOCOL", "RECORD_TOO_LARGE")
DIAGNOSIS_TIMEOUT = 3.0


def tls_diagnosis(host: str, port: int, tls: TLSConfig | None,
                  timeout: float = DIAGNOSIS_TIMEOUT) -> errors.KVStoreError | None:
    """Why connections to ``host:port`` fail, when the reason is TLS: a PermissionDenied
    with a message that says what to change, else None (unreachable, or TLS is fine).

    Called only after a connection or a call has failed: it opens one more connection
    (bounded by ``timeout``) and looks at how the TLS handshake goes.
    """
    where = f"{host}:{port}"
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return None  # not reachable at all: not a TLS problem
    try:
        if tls is None:
            probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            probe.check_hostname = False
            probe.verify_mode = ssl.CERT_NONE
            try:
                probe.wrap_socket(raw).close()
            except OSError:
                return None  # no TLS there either: something else is wrong
            return errors.PermissionDenied(
                f"kvstored at {where} expects TLS and this client connects in plaintext: pass "
                "tls=kvstore.TLSConfig(ca_file=...) (kvstore-cli --tls-ca FILE)")
        try:
            s = tls.ssl_context().wrap_socket(raw, server_hostname=tls.server_name or host)
        except ssl.SSLCertVerificationError as e:
            return errors.PermissionDenied(
                f"TLS: cannot verify kvstored's certificate at {where}: {e.verify_message} "
                "(is TLSConfig.ca_file / --tls-ca the CA that signed it?)")
        except ssl.SSLError as e:
            reason = e.reason or str(e)
            if reason in _NOT_TLS:
                return errors.PermissionDenied(
                    f"kvstored at {where} does not speak TLS ({reason}): connect without TLS, "
                    "or enable [tls] on the daemon")
            return errors.PermissionDenied(f"kvstored at {where} refused the TLS handshake: {reason}")
        except OSError:
            return None
        # TLS 1.3 reports a rejected client certificate only after the handshake
        try:
            s.settimeout(min(timeout, 0.5))
            data = s.recv(1)
        except ssl.SSLError as e:
            return errors.PermissionDenied(
                f"kvstored at {where} rejected this client's certificate: {e.reason or e}")
        except (socket.timeout, TimeoutError):
            return None  # it waits for us to speak: the handshake was fine
        except OSError:
            data = b""
        finally:
            s.close()
        if not data:
            return errors.PermissionDenied(
                f"kvstored at {where} closed the connection right after the TLS handshake: it "
                "rejected this client's certificate (missing, expired, or not signed by the CA "
                "it trusts); check TLSConfig.cert_file / --tls-cert")
        return None
    finally:
        raw.close()


__all__ = ["CONNECT_TIMEOUT", "DEFAULT_NAMESPACE", "GRPC_OPTIONS", "Namespaced", "ServerInfo", "TLSConfig",
           "as_bytes_view", "auth_metadata", "call_metadata", "control_channel", "data_endpoint", "grpc_error",
           "grpc_options", "is_unreachable", "ride_out_seconds", "split_address", "tls_diagnosis", "value_parts",
           "writable_view"]
