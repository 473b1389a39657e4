"""Typed errors for requests gRPC cannot even decode (issue 17).

With the generated ``add_KVStoreServicer_to_server`` a request body that is not
the method's protobuf message fails in grpc's own deserializer and the caller
gets ``UNKNOWN`` with a Python exception text. Here every method of the
``kvstore.v1.KVStore`` service is registered with a deserializer that never
raises: a body that does not decode becomes a ``Malformed`` marker, and the
handler answers it with ``INVALID_ARGUMENT`` and the ``kvstore-code`` trailing
metadata, like every other typed error of the control plane, before the
servicer sees it.

Each method is served as stream-unary (the same on the wire: one request message, one
answer) so that the handler runs as soon as a call opens and can bound how long its
request message may take: gRPC counts a call against ``maximum_concurrent_rpcs`` from
its headers on, so calls whose message never came (an HTTP/2 stream left open) held
every place without end and the control plane answered RESOURCE_EXHAUSTED to all.

Running first also lets it count a call against its client's address (``CallsPerClient``,
``server.control_rpcs_per_client``) before the call waits for anything: one client, over
as many connections as it likes, cannot hold every place of ``maximum_concurrent_rpcs``.
"""
from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import time
import urllib.parse
from typing import Any, Callable

import grpc
from google.protobuf.message import DecodeError

from kvstore import errors
from kvstore.v1 import control_pb2 as pb

log = logging.getLogger("kvstored.control")

SERVICE = "KVStore"


class Malformed:
    """A request body that is not a valid ``message`` (what the handler gets instead)."""

    __slots__ = ("message", "size")

    def __init__(self, message: str, size: int):
        self.message = message
        self.size = size


def _deserializer(cls) -> Callable[[bytes], Any]:
    name = cls.DESCRIPTOR.full_name

    def decode(data: bytes):
        try:
            return cls.FromString(data)
        except (DecodeError, ValueError, TypeError):  # what the protobuf runtimes raise
            return Malformed(name, len(data))

    return decode


def _handler(fn: Callable, method: str, on_error: Callable[[errors.KVStoreError], None] | None):
    async def handle(request, context):
        if type(request) is Malformed:
            err = errors.InvalidArgument(
                f"{method}: the request body ({request.size} bytes) is not a valid "
                f"{request.message} message")
            if on_error is not None:
                on_error(err)
            log.info("malformed control request", extra={
                "method": method, "peer": context.peer(), "error": err.name})
            context.set_trailing_metadata((("kvstore-code", str(err.code)),))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, err.message)
        result = fn(request, context)
        if inspect.isawaitable(result):
            result = await result
        return result

    handle.__name__ = method
    return handle


def peer_address(peer: str) -> str:
    """The address in gRPC's peer string (``ipv4:10.0.0.1:5000``, ``ipv6:%5B::1%5D:5000``: a
    URI, its brackets percent-encoded): whom a call counts against, as the log names it; the
    port is left out (a client opens as many as it likes)."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return urllib.parse.unquote(rest).rpartition(":")[0].strip("[]")
    return kind  # unix and the like: one source


class CallsPerClient:
    """Calls in progress by client address, at most ``limit`` each: past it a call is
    refused at once (RESOURCE_EXHAUSTED, NoSpace), counted in ``counters`` and logged once
    a minute at most. gRPC's own limits are per server (maximum_concurrent_rpcs) and per
    connection (max_concurrent_streams): a client with a few connections took every place."""

    LOG_EVERY = 60.0

    def __init__(self, limit: int, counters: collections.Counter):
        self.limit = limit
        self.counters = counters
        self.running: collections.Counter = collections.Counter()
        self.refused_since_log = 0
        self.logged = -self.LOG_EVERY

    def enter(self, peer: str) -> str | None:
        """The call's client address, counted; None when that client is at its limit."""
        who = peer_address(peer)
        if self.running[who] >= self.limit:
            self.counters["control_client_calls_refused"] += 1
            self.refused_since_log += 1
            now = time.monotonic()
            if now - self.logged >= self.LOG_EVERY:
                log.warning("%d control call(s) refused (the last from %s): %d at once from "
                            "one client address at most (server.control_rpcs_per_client)",
                            self.refused_since_log, who, self.limit)
                self.logged, self.refused_since_log = now, 0
            return None
        self.running[who] += 1
        return who

    def leave(self, who: str) -> None:
        self.running[who] -= 1
        if not self.running[who]:
            del self.running[who]


def _first_message(handle: Callable, method: str, timeout: float,
                   on_error: Callable[[errors.KVStoreError], None] | None,
                   per_client: CallsPerClient | None = None, calls=None):
    """A stream-unary handler calling ``handle`` with the call's request message, or
    DEADLINE_EXCEEDED (a Timeout, counted by ``on_error``) when it has not arrived within
    ``timeout`` seconds of the call; with ``per_client``, NoSpace (RESOURCE_EXHAUSTED) at
    once for a call whose client address has its limit of calls in progress. ``calls``
    (ControlStats) counts every call from its start, as gRPC's limit does: one waiting for
    its message holds a place too."""
    async def read_then_handle(request_iterator, context):
        # one coroutine for every call of the service (Heads: each peer's repair batch):
        # no nested coroutines, and asyncio.timeout where wait_for made a Task per call
        if calls is not None:
            calls.began()
        who = None
        try:
            if per_client is not None:
                who = per_client.enter(context.peer())
                if who is None:
                    err = errors.NoSpace(f"{method}: {per_client.limit} calls at once from one "
                                         "client address at most (server.control_rpcs_per_client)")
                    if on_error is not None:
                        on_error(err)
                    context.set_trailing_metadata((("kvstore-code", str(err.code)),))
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, err.message)
            try:
                async with asyncio.timeout(timeout):
                    request = await context.read()
            except TimeoutError:
                err = errors.Timeout(f"{method}: the request message did not arrive within "
                                     f"{timeout:g} s of the call (server.control_request_timeout)")
                if on_error is not None:
                    on_error(err)
                context.set_trailing_metadata((("kvstore-code", str(err.code)),))
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, err.message)
            if request is grpc.aio.EOF:  # the client closed its side without the message
                err = errors.InvalidArgument(f"{method}: the call ended without its request message")
                if on_error is not None:
                    on_error(err)
                context.set_trailing_metadata((("kvstore-code", str(err.code)),))
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, err.message)
            return await handle(request, context)
        finally:
            if who is not None:
                per_client.leave(who)
            if calls is not None:
                calls.ended()

    read_then_handle.__name__ = method
    return read_then_handle


def register(server: grpc.aio.Server, servicer,
             on_error: Callable[[errors.KVStoreError], None] | None = None,
             request_timeout: float = 30.0, per_client: CallsPerClient | None = None,
             calls=None) -> None:
    """Serve the KVStore service from ``servicer`` on ``server`` (in place of the generated
    ``add_KVStoreServicer_to_server``), malformed requests answered INVALID_ARGUMENT;
    ``on_error`` counts them; a request message not in within ``request_timeout`` s of its
    call is answered DEADLINE_EXCEEDED (the call's place is free again); ``per_client``
    bounds the calls of one client address; ``calls`` (ControlStats) counts the calls in
    progress."""
    handlers = method_handlers(servicer, on_error, request_timeout, per_client, calls)
    name = pb.DESCRIPTOR.services_by_name[SERVICE].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    if hasattr(server, "add_registered_method_handlers"):  # grpc >= 1.62: the fast path
        server.add_registered_method_handlers(name, handlers)


def method_handlers(servicer, on_error: Callable[[errors.KVStoreError], None] | None = None,
                    request_timeout: float = 30.0, per_client: CallsPerClient | None = None,
                    calls=None) -> dict[str, grpc.RpcMethodHandler]:
    """The KVStore service's handlers for ``servicer`` (unary methods, as the service has,
    each served as stream-unary: see the module docstring)."""
    svc = pb.DESCRIPTOR.services_by_name[SERVICE]
    handlers = {}
    for m in svc.methods:
        if m.client_streaming or m.server_streaming:
            raise TypeError(f"{m.full_name} streams: typed_handler handles unary methods only")
        fn = getattr(servicer, m.name, None)
        if fn is None:
            continue
        req = getattr(pb, m.input_type.name)
        resp = getattr(pb, m.output_type.name)
        handlers[m.name] = grpc.stream_unary_rpc_method_handler(
            _first_message(_handler(fn, m.name, on_error), m.name, request_timeout, on_error,
                           per_client, calls),
            request_deserializer=_deserializer(req), response_serializer=resp.SerializeToString)
    return handlers
