"""TLS and mutual TLS for both planes.

* Data path: kvstored accepts TCP connections itself, peeks at the first byte
  (a TLS handshake record starts with 0x16), then hands the socket to uvloop's
  TLS transport (``connect_accepted_socket(ssl=...)``), so the BufferedProtocol
  receives decrypted bytes straight into the reserved arena slot. A client that
  talks plaintext to a TLS port gets one plaintext error frame ("this port
  requires TLS") instead of a silent close; every failed handshake is counted
  by reason (``tls_handshake_failed_<reason>``).
* Control plane: gRPC's own TLS (``dynamic_ssl_server_credentials``, which also
  lets a reload swap certificates without a restart). gRPC reports no per-handshake
  outcome, so what is counted there is ``control_tls_handshakes`` (every attempt;
  the credentials fetcher runs once per handshake) and ``control_tls_connections``
  (connections that then made a call); the difference is the rejected ones.

With ``tls.client_ca_file`` set, both planes require a client certificate signed
by that CA (mutual TLS).
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import socket
import ssl
import threading
import time
from typing import Callable

import grpc

from kvstore import errors
from kvstore.wire import encode_error

log = logging.getLogger("kvstored.tls")

HANDSHAKE_TIMEOUT = 10.0  # seconds from accept to a finished TLS handshake
REFUSE_LINGER = 2.0  # seconds to wait for a refused plaintext client to read our error
# Seconds a closing TLS connection waits for the peer's close_notify. asyncio's default is
# 30 s: one idle client that never answers it held a SIGTERM'd daemon for the whole drain
# deadline (10 s), and any closed connection's descriptor for 30 s.
SHUTDOWN_TIMEOUT = 2.0
REFUSE_DRAIN = 1 << 20  # bytes of a refused plaintext client's request we read and drop
MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_TLS_HANDSHAKE_RECORD = 0x16
_PEERS_TRACKED = 65536

# verify codes (OpenSSL X509_V_ERR_*) -> counter reason
_EXPIRED = {9, 10}  # not yet valid, has expired
_UNTRUSTED = {2, 18, 19, 20, 21, 27, 28}  # unknown issuer, self-signed, not trusted, rejected
PLAINTEXT_MESSAGE = ("this kvstored data port requires TLS: connect with "
                     "kvstore.Client(..., tls=kvstore.TLSConfig(ca_file=...)) or kvstore-cli --tls-ca")


def classify(exc: BaseException) -> str:
    """A short reason for a failed server-side handshake, used in counter names."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = getattr(exc, "verify_code", 0)
        if code in _EXPIRED:
            return "cert_expired"
        if code in _UNTRUSTED:
            return "cert_untrusted"
        return "cert_invalid"
    reason = getattr(exc, "reason", "") or ""
    if reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED"):
        return "no_cert"
    if "VERSION" in reason or "PROTOCOL" in reason:
        return "protocol"
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)) or "longer than" in str(exc):
        return "timeout"
    return "other"


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# a serving certificate this close to its end is warned about at start and reload
CERT_EXPIRY_WARNING = 14 * 86400.0


def cert_not_after(path: str) -> float | None:
    """When the (first) certificate in ``path`` expires, as a Unix time; None where that
    cannot be read (the stdlib's decoder is the one CPython's own tests use)."""
    try:
        return float(ssl.cert_time_to_seconds(ssl._ssl._test_decode_cert(path)["notAfter"]))
    except (AttributeError, KeyError, OSError, ValueError, ssl.SSLError):
        return None


class ServerTLS:
    """Certificates and contexts for both planes; ``reload()`` re-reads the files."""

    def __init__(self, cert_file: str, key_file: str, client_ca_file: str = "",
                 min_version: str = "1.2"):
        self.cert_file, self.key_file, self.client_ca_file = cert_file, key_file, client_ca_file
        self.min_version = min_version
        self.mutual = bool(client_ca_file)
        self._lock = threading.Lock()  # the gRPC fetcher runs on gRPC's own threads
        self._handshakes = 0
        self._grpc_update = None
        self._peers: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.connections = 0
        self.context, self._grpc_config, self._fingerprint = self._load()
        self.not_after = cert_not_after(self.cert_file)  # said by warn_expiry (the node's start)

    def _load(self):
        cert, key = _read(self.cert_file), _read(self.key_file)
        ca = _read(self.client_ca_file) if self.client_ca_file else None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = MIN_VERSIONS[self.min_version]
        ctx.load_cert_chain(self.cert_file, self.key_file)
        if ca is not None:
            ctx.load_verify_locations(cadata=ca.decode("ascii", "replace"))
            ctx.verify_mode = ssl.CERT_REQUIRED
        cfg = grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)
        fp = hashlib.sha256(cert + b"\0" + key + b"\0" + (ca or b"")).digest()
        return ctx, cfg, fp

    def reload(self) -> bool:
        """Re-read certificate, key and CA; new handshakes use them. Returns whether they
        changed. On an unreadable or invalid file the old ones stay and the error is raised."""
        ctx, cfg, fp = self._load()
        if fp == self._fingerprint:
            return False
        self.context, self._fingerprint = ctx, fp
        with self._lock:
            self._grpc_update = cfg
        log.info("TLS certificates reloaded from %s", self.cert_file)
        self.not_after = cert_not_after(self.cert_file)
        self.warn_expiry()
        return True

    def warn_expiry(self) -> None:
        """Say an expired serving certificate, or one ending within CERT_EXPIRY_WARNING,
        at start and reload: every TLS client refuses this node from that moment, and
        nothing else would say why (kvstored_tls_cert_expiry_timestamp_seconds alerts)."""
        end = self.not_after
        if end is not None:
            left = end - time.time()
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(end))
            if left <= 0:
                log.error("tls.cert_file %s expired at %s: TLS clients refuse this node until "
                          "it is renewed (then SIGHUP)", self.cert_file, when)
            elif left < CERT_EXPIRY_WARNING:
                log.warning("tls.cert_file %s expires at %s, in %.1f days: renew it (then "
                            "SIGHUP)", self.cert_file, when, left / 86400)

    # ------------------------------------------------------------ gRPC
    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._grpc_config, self._fetch, require_client_authentication=self.mutual)

    def _fetch(self):
        # called by gRPC at the start of every handshake on the control port
        with self._lock:
            self._handshakes += 1
            cfg, self._grpc_update = self._grpc_update, None
        return cfg

    def note_peer(self, peer: str) -> None:
        """Count a control connection the first time it makes a call (its handshake worked)."""
        peers = self._peers
        if peer in peers:
            peers.move_to_end(peer)
            return
        peers[peer] = None
        self.connections += 1
        if len(peers) > _PEERS_TRACKED:
            peers.popitem(last=False)

    def counters(self) -> dict[str, int]:
        return {"control_tls_handshakes": self._handshakes,
                "control_tls_connections": self.connections}


class TLSListener:
    """The data port with TLS: accept, sniff, hand over to uvloop's TLS transport."""

    def __init__(self, tls: ServerTLS, factory: Callable, counters: collections.Counter,
                 max_handshakes: int, max_per_client: int = 1 << 30,
                 timeout: float = HANDSHAKE_TIMEOUT):
        self.tls = tls
        self.factory = factory
        self.counters = counters
        self.max_handshakes = max_handshakes
        # a client's silent connections (no ClientHello) must not hold every handshake slot
        self.max_per_client = max_per_client
        self.timeout = timeout
        self.per_client: collections.Counter = collections.Counter()
        self.sock: socket.socket | None = None
        self.task: asyncio.Task | None = None
        self.handshakes: set[asyncio.Task] = set()

    async def start(self, host: str, port: int) -> int:
        family, type_, proto, _, addr = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, type_, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(1024)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.task = asyncio.get_running_loop().create_task(self._accept_loop())
        return sock.getsockname()[1]

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None
        for t in list(self.handshakes):
            t.cancel()
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, addr = await loop.sock_accept(self.sock)
            except OSError as e:  # EMFILE and friends: back off, keep serving
                self.counters["accept_failed"] += 1  # (the log line is rate-limited)
                log.warning("data port accept failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            ip = addr[0] if isinstance(addr, tuple) and addr else ""
            if self.per_client[ip] >= self.max_per_client:
                self.counters["rejected_handshakes_per_client"] += 1
                sock.close()
                continue
            if len(self.handshakes) >= self.max_handshakes:
                self.counters["rejected_connections"] += 1
                sock.close()
                continue
            self.per_client[ip] += 1
            t = loop.create_task(self._handshake(sock, addr))
            self.handshakes.add(t)
            t.add_done_callback(lambda t, ip=ip: self._done(t, ip))

    def _done(self, t: asyncio.Task, ip: str) -> None:
        self.handshakes.discard(t)
        self.per_client[ip] -= 1
        if self.per_client[ip] <= 0:
            del self.per_client[ip]

    def _failed(self, reason: str, addr, detail) -> None:
        self.counters["tls_handshake_failed"] += 1
        self.counters["tls_handshake_failed_" + reason] += 1
        log.info("TLS handshake from %s failed (%s): %s", addr[0] if addr else "?", reason, detail)

    async def _handshake(self, sock: socket.socket, addr) -> None:
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        try:
            first = await self._peek(sock)
        except (OSError, asyncio.CancelledError):  # cancelled: the listener is closing
            sock.close()
            return
        if first is None:
            self._failed("timeout", addr, f"no handshake within {self.timeout:g}s")
            sock.close()
            return
        if not first:  # connected and left (port probe)
            sock.close()
            return
        if first[0] != _TLS_HANDSHAKE_RECORD:
            self._failed("plaintext", addr, "the client did not start a TLS handshake")
            await self._refuse(sock)
            return
        try:
            await loop.connect_accepted_socket(self.factory, sock, ssl=self.tls.context,
                                               ssl_handshake_timeout=self.timeout,
                                               ssl_shutdown_timeout=SHUTDOWN_TIMEOUT)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the transport closes the socket itself
            self._failed(classify(e), addr, e)

    async def _peek(self, sock: socket.socket) -> bytes | None:
        """The first bytes the client sent, left in the socket; b"" on EOF, None on timeout."""
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        fd = sock.fileno()
        loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
        try:
            await asyncio.wait_for(ready, self.timeout)
        except asyncio.TimeoutError:
            return None
        finally:
            loop.remove_reader(fd)
        return sock.recv(8, socket.MSG_PEEK)

    @staticmethod
    async def _refuse(sock: socket.socket) -> None:
        """Tell a plaintext client, in its own framing, that this port needs TLS."""
        loop = asyncio.get_running_loop()
        try:
            sock.send(encode_error(0, 0, errors.PermissionDenied.code, PLAINTEXT_MESSAGE))
            sock.shutdown(socket.SHUT_WR)
            # read (and drop) what the client sent until it closes, bounded, so that closing
            # with unread bytes does not reset the connection before it has read our frame
            deadline = loop.time() + REFUSE_LINGER
            drained = 0
            while drained < REFUSE_DRAIN:
                left = deadline - loop.time()
                if left <= 0:
                    break
                data = await asyncio.wait_for(loop.sock_recv(sock, 65536), left)
                if not data:
                    break
                drained += len(data)
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            sock.close()


__all__ = ["HANDSHAKE_TIMEOUT", "MIN_VERSIONS", "PLAINTEXT_MESSAGE", "ServerTLS", "TLSListener",
           "classify"]
