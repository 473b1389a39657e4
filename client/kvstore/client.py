"""Blocking client: gRPC for control, a pipelined data channel per thread for data.

The data channel (kvstore.channel: TCP, same-host shm, or RDMA) is chosen once per
connection by ``transport_plan`` and used through the ``DataChannel`` interface.
Batch calls write every request frame of a window first and then collect the
responses in whatever order the daemon completes them. Control calls are the
table in kvstore.control, shared with AsyncClient.
"""
from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
from typing import Iterable, Sequence

import grpc

from . import errors
from ._common import (CONNECT_TIMEOUT, DEFAULT_NAMESPACE, Namespaced, ServerInfo, TLSConfig,
                      call_metadata, control_channel, data_endpoint, grpc_error, is_unreachable,
                      ride_out_seconds, split_address, tls_diagnosis, value_parts, writable_view)
from .channel import TRANSPORTS, UNBOUNDED, DataChannel, TcpChannel, transport_plan
from .control import SyncControl, epoch_metadata
# names older callers import from here
from .channel import SHM_INLINE_MAX, DataConnection  # noqa: F401
from .recvpool import DEFAULT_POOL_BYTES, ReceivePool
from .v1 import control_pb2 as pb
from .v1 import control_pb2_grpc as pb_grpc
from .wire import key_bytes

log = logging.getLogger("kvstore")

_RETRY_BACKOFF = (0.05, 0.1, 0.2, 0.5, 1.0)
# Requests per pipelined round: bounds the response bytes queued in the daemon, so a
# huge batch can never fill both directions of the socket and stall.
WINDOW = 32


class Client(SyncControl, Namespaced):
    """A blocking kvstored client. Thread-safe: each thread gets its own data connection.

    ``address`` is the control (gRPC) address ``host:port``; the data address is
    learned from the daemon (``Info``) unless ``data_address`` is given. Control calls
    (stats, pin, lookup, delete, members...) are kvstore.control's table.
    """

    def __init__(self, address: str = "127.0.0.1:7070", *, namespace: str = DEFAULT_NAMESPACE,
                 timeout: float = 30.0, verify_checksums: bool = True, data_address: str | None = None,
                 tcp_congestion: str = "", tls: TLSConfig | None = None, token: str | None = None,
                 shm: bool | None = None, ride_out_restarts: bool | float = False,
                 connect_timeout: float = CONNECT_TIMEOUT, transport: str = "auto",
                 get_pool_bytes: int = DEFAULT_POOL_BYTES):
        """``shm``: None = use the same-host shared-memory path when the daemon offers one
        and its socket is reachable here, else TCP; True = require it; False = TCP only.
        ``ride_out_restarts``: False (default) = an unreachable daemon (connection refused,
        nothing listening) is reported at once as Unavailable; True = keep retrying it for
        up to ``timeout`` so that a restart passes unnoticed; a number = for up to that
        many seconds. ``connect_timeout``: how long one connection attempt may take (a
        host that drops packets). ``transport``: "auto" (default) = shm on the same host,
        then RDMA, then TCP (a fallback is logged once and counted, see kvstore.rdma);
        "shm" / "rdma" / "tcp" = that one or a typed Unavailable saying why.
        ``get_pool_bytes``: how much the receive pool behind ``get()`` / ``batch_get()`` may
        keep (see kvstore.recvpool; 0 = a new bytearray per object)."""
        super().__init__(namespace)
        self._pool = ReceivePool(get_pool_bytes)
        if transport not in ("auto",) + TRANSPORTS:
            raise errors.InvalidArgument(f"transport {transport!r}: one of auto, shm, rdma, tcp")
        if transport != "auto":
            shm = transport == "shm"
        self.transport_choice = transport
        self.transport_reason = ""  # why the data path is not the first choice (set on fallback)
        self.address = address
        self.shm = shm
        self.timeout = timeout
        self.verify_checksums = verify_checksums
        self.tcp_congestion = tcp_congestion
        self.tls = tls
        self._token = token or None
        self._metadata = call_metadata(self._token)
        self._ssl = tls.ssl_context() if tls is not None else None
        self._data_address = data_address
        if not connect_timeout > 0:
            raise errors.InvalidArgument(f"connect_timeout must be positive, not {connect_timeout!r}")
        self.connect_timeout = connect_timeout
        self._ride_out = ride_out_seconds(ride_out_restarts, timeout)
        self._channel = control_channel(address, tls, connect_timeout=connect_timeout)
        self._stub = pb_grpc.KVStoreStub(self._channel)
        self._info: ServerInfo | None = None
        self._local = threading.local()
        self._conns: set[DataChannel] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._shm_warned = False  # say once that the shm path could not be used
        # Cluster member-list epoch sent with every put/get (0 = none). ClusterClient sets
        # it; a node whose member list has another epoch answers Redirect.
        self.epoch = 0
        self.ride_out_restarts = ride_out_restarts

    # ------------------------------------------------------------ plumbing
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._closed = True
        with self._lock:
            for c in self._conns:
                c.close()
            self._conns.clear()
        self._channel.close()

    def _call(self, method: str, request, timeout: float | None = None, epoch: int | None = None):
        timeout = timeout or self.timeout
        start = time.monotonic()
        deadline = start + timeout
        # Calls fail fast (no wait_for_ready): a refused connection is an Unavailable in
        # milliseconds, not a wait for the whole timeout. Riding out a restart is a loop
        # of such calls for the time the caller allowed; the channel's reconnect back-off
        # is capped at 1 s (_common.RECONNECT_BACKOFF_MS), so a daemon that is back is
        # reached on the next try.
        ride_until = start + min(self._ride_out, timeout)
        diagnosed = False
        for attempt in itertools.count():
            tried = time.monotonic()
            try:
                md = epoch_metadata(self._metadata, self.epoch if epoch is None else epoch)
                return getattr(self._stub, method)(request, timeout=max(deadline - time.monotonic(), 0.001),
                                                   wait_for_ready=False, metadata=md)
            except grpc.RpcError as e:
                err = grpc_error(e, self.address)
            if not is_unreachable(err):
                raise err from None
            # once per call: is TLS the reason? (milliseconds when refused; not asked after a
            # dial that timed out: no handshake can be seen where no connection is made)
            if not diagnosed and time.monotonic() - tried < 0.9 * self.connect_timeout:
                diagnosed = True
                diag = tls_diagnosis(*split_address(self.address), self.tls, self._diag_timeout())
                if diag is not None:
                    raise diag from None
            left = ride_until - time.monotonic()
            if left <= 0 or self._closed:
                raise err from None
            time.sleep(min(_RETRY_BACKOFF[min(attempt, len(_RETRY_BACKOFF) - 1)], left))

    def _diag_timeout(self) -> float:
        # the probe dials again: bounded like a connection (a host that drops packets
        # must not cost a second connect timeout of 3 s)
        return min(self.timeout, self.connect_timeout, 3.0)

    def info(self, refresh: bool = False) -> ServerInfo:
        if self._info is None or refresh:
            self._info = ServerInfo.from_pb(self._call("Info", pb.InfoRequest()))
        return self._info

    def _connect(self) -> DataChannel:
        """A new data channel for this thread: the first usable of ``transport_plan``."""
        if self._closed:
            raise errors.Unavailable("client is closed")
        plan = transport_plan(self.transport_choice, self.shm, self.tls is not None,
                              bool(self._data_address), bool(self.transport_reason))
        for name in plan:
            conn = self._CONNECT[name](self)
            if conn is not None:
                with self._lock:
                    self._conns.add(conn)
                self._local.conn = conn
                return conn
        raise AssertionError("transport_plan ends with tcp, which never returns None")

    def _connect_tcp(self) -> TcpChannel:
        # every channel gets the daemon's max_value_size before its first request: no GET
        # answer may claim more (wire.check_response)
        if self._data_address:
            host, _, port = self._data_address.rpartition(":")
            info = self._info  # None: asked once the data connection is set up (below)
        else:
            info = self.info(refresh=True)
            host, port = data_endpoint(info, self.address)
        try:
            conn = TcpChannel(host, int(port), self.timeout, self.tcp_congestion,
                              self._ssl, self.tls.server_name if self.tls else None,
                              self.connect_timeout,
                              UNBOUNDED if info is None else info.max_value_size)
        except TimeoutError:
            raise  # no connection: nothing for a TLS diagnosis to see
        except OSError:
            diag = tls_diagnosis(host, int(port), self.tls, self._diag_timeout())
            if diag is not None:
                raise diag from None
            raise
        try:
            conn.setup(self._token)
        except OSError:
            conn.close()
            diag = tls_diagnosis(host, int(port), self.tls, self._diag_timeout())
            if diag is not None:
                raise diag from None
            raise
        except BaseException:
            conn.close()
            raise
        if info is None:
            self._limit(conn)  # after set-up: a data-path refusal (TLS, token) is reported first
        return conn

    def _limit(self, conn: DataChannel) -> None:
        """Give ``conn`` the daemon's max_value_size (Info, asked once per client)."""
        try:
            conn.max_payload = self.info().max_value_size
        except BaseException:
            conn.close()
            raise

    def _connect_shm(self) -> DataChannel | None:
        """A shared-memory channel, or None to use the next transport (when shm is not required)."""
        from .shm import ShmConnection  # on first use: TCP-only clients never map an arena

        info = self.info(refresh=True)
        path = info.shm_socket
        if not path or not os.path.exists(path):
            if self.shm:
                raise errors.Unavailable("shm=True but kvstored offers no shared-memory socket on "
                                         f"this host ({path or 'shm disabled'})")
            return None
        try:
            conn = ShmConnection(path, self.timeout, info.max_value_size)
            conn.setup(self._token)
        except (OSError, errors.KVStoreError) as e:
            if self.shm:
                raise e if isinstance(e, errors.KVStoreError) else errors.Unavailable(
                    f"cannot use the shm socket {path}: {e}") from None
            if not self._shm_warned:
                self._shm_warned = True
                log.warning("kvstore: shared-memory path %s not usable (%s); using TCP", path, e)
            return None
        return conn

    def _connect_rdma(self) -> DataChannel | None:
        """An RDMA channel (kvstore.rdma.channel), or None to use TCP (noted once)."""
        from .rdma import channel

        def where() -> tuple[str, int]:  # asked only once this host has a usable device
            if self._data_address:
                host, _, port = self._data_address.rpartition(":")
                return host, int(port)
            return data_endpoint(self.info(refresh=True), self.address)

        conn, reason = channel.connect(where, self.timeout, self._token,
                                       explicit=self.transport_choice == "rdma",
                                       connect_timeout=self.connect_timeout)
        if conn is None:
            self.transport_reason = reason
        else:
            self._limit(conn)  # Info is cached unless data_address skipped it
        return conn

    _CONNECT = {"shm": _connect_shm, "rdma": _connect_rdma, "tcp": _connect_tcp}

    def _channel_here(self) -> DataChannel:
        """This thread's channel (connecting if needed)."""
        return self._run(lambda c: c)

    @property
    def transport(self) -> str:
        """"shm", "rdma" or "tcp": the data path this thread's connection uses (connects if
        needed); ``transport_reason`` says why RDMA is not used after a fallback."""
        return self._channel_here().transport

    @property
    def zero_copy_get(self) -> bool:
        """Whether ``get_view`` works here (this thread's channel maps the daemon's memory)."""
        return self._channel_here().zero_copy_get

    def get_view(self, key, *, namespace: str | None = None):
        """A leased, read-only view of the object in the daemon's arena (shm path only).

        Zero copies: ``with client.get_view(k) as view: ...`` and release promptly.
        """
        ns = self._nsb(namespace)
        k = key_bytes(key)
        return self._run(lambda conn: conn.get_view(ns, k, self.verify_checksums))

    def _drop(self, conn: DataChannel) -> None:
        conn.close()
        with self._lock:
            self._conns.discard(conn)
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None

    def _run(self, fn):
        """Run ``fn(conn)``; on a broken connection reconnect once, and with
        ``ride_out_restarts`` keep retrying for that long.

        Every data-path request is idempotent (objects are immutable and a repeated put
        of the same bytes is a no-op), so retrying after a reconnect is safe.
        """
        ride_until = time.monotonic() + self._ride_out
        for attempt in itertools.count():
            conn = getattr(self._local, "conn", None)
            cached = conn is not None
            try:
                if conn is None:
                    conn = self._connect()
                conn.epoch = self.epoch
                return fn(conn)
            except (socket.timeout, BlockingIOError):  # SO_RCVTIMEO/SO_SNDTIMEO expired
                if conn is not None:
                    self._drop(conn)
                raise errors.Timeout(f"no answer from kvstored within {self.timeout}s") from None
            except (errors.ProtocolError, errors.Timeout):
                if conn is not None:
                    self._drop(conn)
                raise
            except (errors.Redirect, errors.NotVerified):  # answers, not a broken connection
                raise
            except (OSError, errors.Unavailable) as e:
                if conn is not None:
                    self._drop(conn)
                if self._closed:
                    raise errors.Unavailable(f"kvstored data path unreachable: {e}") from None
                if cached and attempt == 0:
                    continue  # the kept connection may predate a restart: one fresh one, now
                left = ride_until - time.monotonic()
                if left <= 0:
                    raise errors.Unavailable(f"kvstored data path unreachable: {e}") from None
                time.sleep(min(_RETRY_BACKOFF[min(attempt, len(_RETRY_BACKOFF) - 1)], left))

    def _check_size(self, n: int) -> None:
        limit = self.info().max_value_size
        if n > limit:
            raise errors.InvalidArgument(f"value of {n} bytes exceeds the daemon's max_value_size {limit}")

    # ------------------------------------------------------------ data path
    def put(self, key, value, *, namespace: str | None = None, overwrite: bool = False) -> bool:
        """Store ``value`` under ``key``: any contiguous buffer, or a tuple/list of them
        stored as their concatenation (sent gathered, never joined on TCP).

        Returns True if stored, False if the identical object was already there.
        Raises Conflict if the key holds different bytes (unless ``overwrite``).
        """
        return self.batch_put([(key, value)], namespace=namespace, overwrite=overwrite)[0]

    def batch_put(self, items: Iterable[tuple[object, object]], *, namespace: str | None = None,
                  overwrite: bool = False) -> list[bool]:
        """Put many objects in one pipelined round (values as for ``put``); raises the
        first error (others may be stored)."""
        ns = self._nsb(namespace)
        prepared = []
        for k, v in items:
            parts, n = value_parts(v)
            self._check_size(n)
            prepared.append((key_bytes(k), parts, n))

        def run(conn: DataChannel) -> list[bool]:
            out: list[bool] = []
            for w in range(0, len(prepared), WINDOW):
                out += conn.put_batch(ns, prepared[w:w + WINDOW], overwrite)
            return out

        return self._run(run)

    def get(self, key, *, namespace: str | None = None) -> bytearray:
        """The object's bytes, as a bytearray. Raises NotFound.

        Objects of 64 KiB and more are received into the client's receive pool: the
        bytearray is yours while you hold any reference to it (or a view of it), and is
        refilled by a later get of the same size only after the last one is dropped (see
        kvstore.recvpool). ``get_into`` / ``batch_get_into`` receive into your buffers."""
        return self.batch_get([key], namespace=namespace)[0]

    def get_into(self, key, buffer, *, namespace: str | None = None) -> int:
        """Receive the object straight into ``buffer``; returns its size."""
        return self.batch_get_into([key], [buffer], namespace=namespace)[0]

    def batch_get(self, keys: Sequence, *, namespace: str | None = None) -> list[bytearray]:
        ns = self._nsb(namespace)
        ks = self._keys(keys)

        def run(conn: DataChannel) -> list:
            out: list = []
            for w in range(0, len(ks), WINDOW):
                out += conn.get_batch(ns, ks[w:w + WINDOW], None, self.verify_checksums, self._pool.take)
            return out

        return self._run(run)

    def batch_get_into(self, keys: Sequence, buffers: Sequence, *, namespace: str | None = None) -> list[int]:
        ns = self._nsb(namespace)
        ks = self._keys(keys)
        if len(ks) != len(buffers):
            raise errors.InvalidArgument(f"{len(ks)} keys but {len(buffers)} buffers")
        views = [writable_view(b) for b in buffers]

        def run(conn: DataChannel) -> list:
            out: list = []
            for w in range(0, len(ks), WINDOW):
                out += conn.get_batch(ns, ks[w:w + WINDOW], views[w:w + WINDOW], self.verify_checksums,
                                      self._pool.take)
            return out

        return self._run(run)

    def ping(self) -> float:
        """Round trip over the data path, in seconds."""
        def run(conn: DataChannel) -> float:
            t = time.perf_counter()
            conn.ping()
            return time.perf_counter() - t
        return self._run(run)
