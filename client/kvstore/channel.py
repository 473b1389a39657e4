"""The SDK's data channels: one interface, one implementation per transport.

``DataChannel`` is what ``Client`` sees of a data connection: a ``transport`` name
and declared capabilities (no probing of attributes), and four operations (a
window of puts, a window of gets, a ping, a leased view where the transport has
one). ``TcpChannel`` is the TCP implementation and the framing every channel
shares: shm (``kvstore.shm``, frames over a Unix socket) and RDMA
(``kvstore.rdma.channel``, frames over TCP) derive from it and replace only what
moves the bytes of objects above their ``inline_max``.

``transport_plan`` is the one place that decides which transports a client tries,
in which order.

Blocking sockets are the fastest way for Python to move megabyte payloads: a put is
one ``sendmsg`` of header + the caller's buffers (a value may be several buffers,
sent gathered and stored as their concatenation), a get is ``recv_into`` the
destination buffer.
"""
from __future__ import annotations

import abc
import itertools
import socket
import ssl
import struct
from typing import ClassVar

from . import errors
from ._common import CONNECT_TIMEOUT
from .wire import (FLAG_NOT_VERIFIED_OK, FLAG_OVERWRITE, FLAG_RESPONSE, HEADER, HEADER_SIZE, MAGIC, OP_AUTH, OP_GET, OP_PING,
                   OP_PUT, VERSION, FrameError, check_response, checksum, checksum_parts, checksum_stream, decode,
                   encode_auth, encode_request)

TRANSPORTS = ("shm", "rdma", "tcp")
INLINE_ANY = 1 << 62  # inline_max of a channel that moves every object inside frames
# On the shm socket, objects up to this size travel inside the frames (OP_PUT / OP_GET, as
# on TCP but over the Unix socket): one round trip, no reserve/commit pair and no lease to
# release, which at 64 KiB cost more than the copy through the socket saves. Applies to
# batch_get_into and to single puts (batch_put keeps reserve-all / copy / commit-all).
SHM_INLINE_MAX = 128 << 10
_IOV_MAX = 512  # buffers per sendmsg (the kernel's limit is 1024)
_ANSWERS_PER_RECV = 512  # put answers one recv takes at most (TcpChannel._put_answers_bulk)
_TLS_COALESCE = 64 << 10  # TLS: buffers smaller than this are joined into one write
# A verified get receives a payload larger than this in chunks of this size and hashes
# each one right after it lands, while it is still in cache: hashing a 4 MiB buffer after
# the whole of it arrived reads it back cold from memory (~2x the CPU of hashing it hot).
VERIFY_CHUNK = 1 << 20
# A GET payload bound for a channel made without the daemon's max_value_size (tools and
# tests that build channels by hand): none. Client passes the daemon's (Info) to every
# channel it makes, and wire.check_response refuses a GET answer claiming more.
UNBOUNDED = 1 << 63


# put_frames_hashed's packers of HEADER + namespace + key + head in one struct call, by
# (namespace, key, head) lengths: the exact lengths, since a struct's "Ns" field pads or
# truncates silently. Names are at most 64 and 128 bytes and EC heads one of two sizes, so
# a handful of shapes are live; the cache is cleared when it reaches _PUT_FRAMES_MAX.
_PUT_FRAMES: dict[tuple, object] = {}
_PUT_FRAMES_MAX = 256


def _put_frame(nl: int, kl: int, hl: int):
    if len(_PUT_FRAMES) >= _PUT_FRAMES_MAX:
        _PUT_FRAMES.clear()
    pack = _PUT_FRAMES[(nl, kl, hl)] = struct.Struct(f"{HEADER.format}{nl}s{kl}s{hl}s").pack
    return pack


def _advance(views: list, n: int) -> None:
    """Drop ``n`` sent bytes from the front of ``views``, and empty views after them (an
    empty value, a 0-byte fragment)."""
    i = 0
    while i < len(views) and n >= len(views[i]):  # a batch is hundreds of views: one del
        n -= len(views[i])
        i += 1
    if n:
        views[i] = views[i][n:]
    del views[:i]


def transport_plan(choice: str, shm: bool | None, tls: bool, data_address: bool,
                   rdma_unusable: bool) -> list[str]:
    """The transports a client tries for a new data connection, in order.

    ``choice``: Client's ``transport``; ``shm``: its ``shm`` (None = if offered, True =
    required); ``tls`` / ``data_address``: set by the caller (either means "that TCP
    endpoint": no shm); ``rdma_unusable``: RDMA already fell back once (auto skips it).
    A required transport that cannot be used raises in its connector; an optional
    one returns nothing and the next is tried. TCP is always last.
    """
    if choice not in ("auto",) + TRANSPORTS:
        raise errors.InvalidArgument(f"transport {choice!r}: one of auto, shm, rdma, tcp")
    out = []
    if shm is not False and not tls and not data_address:
        out.append("shm")
    if choice in ("auto", "rdma"):
        if tls:
            if choice == "rdma":
                raise errors.Unavailable("transport='rdma' cannot be combined with TLS")
        elif not (rdma_unusable and choice == "auto"):
            out.append("rdma")
    out.append("tcp")
    return out


def raise_first(results: list) -> list:
    """Batch semantics shared by every channel: every request is answered, then the
    first error (by position) raises."""
    for r in results:
        if isinstance(r, errors.KVStoreError):
            raise r
    return results


def joined(parts: list) -> memoryview:
    """One buffer for a value given as several (channels that copy the value anyway)."""
    return parts[0] if len(parts) == 1 else memoryview(b"".join(parts))


def too_small(length: int, room: int) -> errors.InvalidArgument:
    """The error of a get whose object does not fit the caller's buffer."""
    return errors.InvalidArgument(f"object of {length} bytes does not fit the {room}-byte buffer")


def mismatch() -> errors.ChecksumMismatch:
    """The error of a get whose bytes do not match the response's checksum."""
    return errors.ChecksumMismatch("object bytes do not match their checksum after transfer")


class Response:
    __slots__ = ("op", "rid", "status", "aux", "length", "checksum")

    def __init__(self, op, rid, status, aux, length, csum):
        self.op, self.rid, self.status, self.aux, self.length, self.checksum = op, rid, status, aux, length, csum


class DataChannel(abc.ABC):
    """One blocking data connection as Client uses it (not thread-safe; one per thread).

    Capabilities are declared by each implementation, and ``Client`` decides with them
    (``frames_put`` / ``frames_get``) instead of asking what a connection is.
    """

    transport: ClassVar[str]  # "tcp" | "shm" | "rdma"
    zero_copy_get: ClassVar[bool] = False  # get_view: a leased view of the daemon's memory
    # Largest object that moves inside the frames (OP_PUT / OP_GET payloads); larger ones
    # use the transport's own path (put / copy_out). -1: none does.
    inline_max: ClassVar[int] = INLINE_ANY
    inline_batch_put: ClassVar[bool] = True  # several puts of one window may move inline
    epoch = 0  # cluster member-list epoch sent with puts and gets (Client.epoch)
    # The largest GET payload an answer may claim (the daemon's max_value_size, given by
    # Client when it makes the channel); see wire.check_response.
    max_payload: int = UNBOUNDED

    def frames_put(self, sizes: list[int]) -> bool:
        """Whether a window of puts of these sizes moves inside frames."""
        return max(sizes, default=0) <= self.inline_max and (len(sizes) <= 1 or self.inline_batch_put)

    def frames_get(self, sizes: list[int] | None) -> bool:
        """Whether gets into buffers of these sizes (None: new buffers, sizes unknown)
        move inside frames."""
        if sizes is None:
            return self.inline_max >= INLINE_ANY
        return max(sizes, default=0) <= self.inline_max

    @abc.abstractmethod
    def setup(self, token: str | None) -> None:
        """First exchange (AUTH or PING); a refusal raises its typed error."""

    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    def put_batch(self, ns: bytes, items: list, overwrite: bool) -> list[bool]:
        """``items``: (key, parts, size), parts being the value's buffers (stored as their
        concatenation). True stored / False identical already there; raises the first error."""

    @abc.abstractmethod
    def get_batch(self, ns: bytes, keys: list[bytes], dests: list | None, verify: bool, alloc) -> list:
        """Sizes (into ``dests``) or buffers from ``alloc(size)``; raises the first error."""

    @abc.abstractmethod
    def ping(self) -> None: ...

    def get_view(self, ns: bytes, key: bytes, verify: bool):
        raise errors.Unavailable(f"get_view needs the same-host shm path (this client uses {self.transport.upper()})")


class TcpChannel(DataChannel):
    """One blocking TCP connection to the data port, and the framing all channels share.

    A subclass that lowers ``inline_max`` provides ``put(ns, [(key, view)], overwrite)``
    and ``copy_out(ns, keys, dests, verify, alloc)``, each returning one result or typed
    error per item.
    """

    transport = "tcp"

    def __init__(self, host: str, port: int, timeout: float, tcp_congestion: str = "",
                 ssl_context: ssl.SSLContext | None = None, server_name: str | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT, max_payload: int = UNBOUNDED):
        self.address = (host, port)
        self.max_payload = max_payload
        self.sock = socket.create_connection((host, port), timeout=min(timeout, connect_timeout))
        self.sock.settimeout(timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tcp_congestion:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, tcp_congestion.encode())
        if ssl_context is not None:
            # TLS: sendmsg and MSG_WAITALL do not exist on an SSLSocket; Python's own
            # timeouts are used (an SSL read cannot resume after SO_RCVTIMEO's EAGAIN)
            try:
                self.sock = ssl_context.wrap_socket(self.sock, server_hostname=server_name or host)
            except BaseException:
                self.sock.close()
                raise
            self.send = self._send_tls
            self.nonblocking_send = False
            self.recv_into = self._recv_into_tls
        else:
            # Blocking socket with kernel-side timeouts: CPython's own timeout mode polls
            # before every recv/send, one extra syscall per chunk on the hot path.
            self._kernel_timeouts(timeout)
        self._rid = itertools.count(1)
        self._hdr = bytearray(HEADER_SIZE)
        self._hview = memoryview(self._hdr)

    def _init_framing(self, timeout: float) -> None:
        """For subclasses that bring their own connected socket (the shm channel)."""
        self._kernel_timeouts(timeout)
        self._rid = itertools.count(1)
        self._hdr = bytearray(HEADER_SIZE)
        self._hview = memoryview(self._hdr)

    def _kernel_timeouts(self, timeout: float) -> None:
        self.sock.settimeout(None)
        tv = struct.pack("ll", int(timeout), int((timeout % 1) * 1e6))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    # ---- operations (DataChannel)
    def put_batch(self, ns: bytes, items: list, overwrite: bool) -> list[bool]:
        if not self.frames_put([n for _k, _p, n in items]):
            return raise_first(self.put(ns, [(k, joined(p)) for k, p, _n in items], overwrite))
        order: dict[int, int] = {}
        self.send(self.put_frames(ns, items, overwrite, order))
        return self.put_answers(order)

    def get_batch(self, ns: bytes, keys: list[bytes], dests: list | None, verify: bool, alloc) -> list:
        if not self.frames_get(None if dests is None else [len(d) for d in dests]):
            return raise_first(self.copy_out(ns, keys, dests, verify, alloc))
        return self._collect(self.send_keyed(OP_GET, ns, keys), dests, verify, alloc, OP_GET)

    def ping(self) -> None:
        rid = self.next_id()
        self.send([encode_request(OP_PING, rid, b"", b"")])
        self._collect({rid: 0}, None, False, None, OP_PING)

    def put(self, ns: bytes, items: list, overwrite: bool) -> list:
        raise NotImplementedError("TCP moves every object inside frames")

    def copy_out(self, ns: bytes, keys: list, dests: list | None, verify: bool, alloc=bytearray) -> list:
        raise NotImplementedError("TCP moves every object inside frames")

    # ---- framing
    def next_id(self) -> int:
        return next(self._rid)

    def send_keyed(self, op: int, ns: bytes, keys: list[bytes], flags: int = 0) -> dict[int, int]:
        """One payload-less request per key (GET, SHM_GET) in one write, with this
        connection's epoch; returns request id -> index. ``flags``: as keyed_frames'."""
        buf, rids = self.keyed_frames(op, ns, keys, flags)
        self.send([buf])
        return {rid: i for i, rid in enumerate(rids)}

    def keyed_frames(self, op: int, ns: bytes, keys: list[bytes],
                     flags: int = 0) -> tuple[bytes, list[int]]:
        """One payload-less ``op`` request per key with this connection's epoch, joined
        into one buffer to send; and the request id of each. (Gets, flagged: this SDK
        knows errors.NotVerified, wire.FLAG_NOT_VERIFIED_OK; ``flags``: further flags,
        e.g. FLAG_REPAIR, a cluster repair agent's read.)"""
        rids, frames = [], []
        flags |= FLAG_NOT_VERIFIED_OK
        for k in keys:
            rid = self.next_id()
            rids.append(rid)
            frames.append(encode_request(op, rid, ns, k, flags=flags, epoch=self.epoch))
        return b"".join(frames), rids

    def put_frames(self, ns: bytes, items: list, overwrite: bool, order: dict[int, int],
                   flags: int = 0) -> list:
        """The buffers of one PUT request per item ((key, parts, size)), to be sent gathered:
        a value in several buffers is never joined. ``order`` gets request id -> the next
        index (``len(order)`` onwards), as ``_collect`` reads it. ``flags``: further PUT
        flags (FLAG_REPAIR: a cluster repair agent's write)."""
        flags |= FLAG_OVERWRITE if overwrite else 0
        bufs = []
        for k, parts, n in items:
            rid = self.next_id()
            order[rid] = len(order)
            bufs.append(encode_request(OP_PUT, rid, ns, k, n, checksum_parts(parts), flags, self.epoch))
            bufs += parts
        return bufs

    def put_frames_hashed(self, ns: bytes, items: list, overwrite: bool, order: dict[int, int]) -> list:
        """``put_frames`` for values whose checksum is known: items (key, head, body,
        checksum of head + body), e.g. EC records from ``layout.encode_hashed``. Nothing is
        hashed here, and each request is two buffers: its frame header, namespace, key
        and ``head`` packed as one bytes object (one struct call), then ``body``."""
        flags = FLAG_OVERWRITE if overwrite else 0
        epoch, nl, rids = self.epoch, len(ns), self._rid
        bufs = []
        for k, head, body, csum in items:
            kl, hl = len(k), len(head)
            pack = _PUT_FRAMES.get((nl, kl, hl)) or _put_frame(nl, kl, hl)
            rid = next(rids)
            order[rid] = len(order)
            bufs.append(pack(MAGIC, VERSION, OP_PUT, flags, rid, 0, nl, kl, epoch, hl + len(body), csum, ns, k, head))
            bufs.append(body)
        return bufs

    def put_answers(self, order: dict[int, int]) -> list[bool]:
        """The answers to the PUTs ``put_frames`` numbered in ``order`` (True stored, False
        identical already there), read in any order; raises the first error after all."""
        if (self.nonblocking_send and type(self).recv_into is TcpChannel.recv_into
                and type(self).read_response is TcpChannel.read_response):
            return self._put_answers_bulk(order)
        return self._collect(order, None, False, None, OP_PUT)  # a channel that buffers its own reads

    def _put_answers_bulk(self, order: dict[int, int]) -> list[bool]:
        """put_answers on a plain socket: as many answers per recv as have arrived (a
        batch's answers come in a burst), not a recv per 40-byte header. Each recv asks at
        most for what the outstanding answers take at the least (a header each, plus the
        rest of an error message being read), so no byte past the last answer is taken
        from the stream. Every header is checked as on every reader (``response``)."""
        results: list = [None] * len(order)
        first_error: errors.KVStoreError | None = None
        left = len(order)
        buf = bytearray(HEADER_SIZE * min(left, _ANSWERS_PER_RECV))
        view = memoryview(buf)
        recv = self.sock.recv_into
        pos = end = 0
        while left:
            if end - pos < HEADER_SIZE:
                if pos:  # a partial header moves to the front
                    view[:end - pos] = view[pos:end]
                    end -= pos
                    pos = 0
                got = recv(view[end:min(len(buf), left * HEADER_SIZE)])
                if got == 0:
                    raise ConnectionResetError("kvstored closed the data connection")
                end += got
                continue
            r = self.response(buf, pos, OP_PUT)
            pos += HEADER_SIZE
            left -= 1
            if r.status:
                # an error message (at most MAX_ERROR_MESSAGE, checked with the header):
                # what came with the header, then the rest read exactly
                msg = bytearray(r.length)
                take = min(r.length, end - pos)
                msg[:take] = view[pos:pos + take]
                pos += take
                if take < r.length:
                    self.recv_into(memoryview(msg)[take:])
                err = errors.error_for_code(r.status, msg.decode("utf-8", "replace"), r.rid)
            i = order.pop(r.rid, None)
            if i is None:
                if r.status:  # connection-level error (id 0): e.g. too many connections
                    raise err
                raise errors.ProtocolError(f"response for unknown request id {r.rid}")
            if r.status:
                first_error = first_error or err
            else:
                results[i] = r.aux != 1  # aux=1: deduplicated
        if first_error is not None:
            raise first_error
        return results

    def send(self, buffers: list) -> None:
        """sendmsg all buffers (gathered, no copy), handling partial sends."""
        views = [memoryview(b) for b in buffers]
        while views:
            _advance(views, self.sock.sendmsg(views[:_IOV_MAX]))

    # A channel whose socket takes MSG_DONTWAIT sends (plain TCP or a Unix socket; not TLS):
    # ClusterClient's batch put then feeds every node's connection from one thread.
    nonblocking_send = True

    def send_some(self, views: list) -> None:
        """Send from the front of ``views`` (memoryviews, consumed in place) until they are
        all sent or the socket's buffer is full; never blocks."""
        while views:
            try:
                n = self.sock.sendmsg(views[:_IOV_MAX], [], socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            _advance(views, n)

    def nonblocking_gets(self) -> bool:
        """Whether GETs can go out with ``send_some`` and their answers be read with a
        ``GetReader`` (ClusterClient's fanned-out batch get): every object inside the
        frames and a socket that takes MSG_DONTWAIT. Not TLS, shm or RDMA."""
        return self.nonblocking_send and self.frames_get(None)

    def get_reader(self, verify: bool, alloc) -> "GetReader":
        """A reader of this connection's GET answers that never blocks (see GetReader)."""
        return GetReader(self, verify, alloc)

    def setup(self, token: str | None) -> None:
        """First exchange: AUTH with the token, or a PING. Any refusal (wrong token, too
        many connections, a TLS port reached in plaintext) surfaces here as a typed error,
        before a batch is sent."""
        rid = self.next_id()
        self.send([encode_auth(rid, token) if token else encode_request(OP_PING, rid, b"", b"")])
        r = self.read_response(OP_AUTH if token else OP_PING)
        if r.status:
            raise self.read_error(r)
        if r.rid != rid:
            raise errors.ProtocolError(f"response for unknown request id {r.rid}")

    def _send_tls(self, buffers: list) -> None:
        small: list = []
        for b in buffers:
            if len(b) < _TLS_COALESCE:
                small.append(b)
                continue
            if small:
                self.sock.sendall(b"".join(small))
                small = []
            self.sock.sendall(b)
        if small:
            self.sock.sendall(b"".join(small))

    def _recv_into_tls(self, view: memoryview) -> None:
        got, want = 0, len(view)
        recv = self.sock.recv_into
        while got < want:
            n = recv(view[got:])
            if n == 0:
                raise ConnectionResetError("kvstored closed the data connection")
            got += n

    def recv_into(self, view: memoryview) -> None:
        got, want = 0, len(view)
        recv = self.sock.recv_into
        while got < want:
            # MSG_WAITALL: one syscall and one wake-up for the whole payload, not one per segment
            n = recv(view[got:], 0, socket.MSG_WAITALL)
            if n == 0:
                raise ConnectionResetError("kvstored closed the data connection")
            got += n

    def recv_hashed(self, view: memoryview) -> int:
        """``recv_into(view)`` and return ``checksum(view)``, hashing a large payload chunk
        by chunk as it arrives (VERIFY_CHUNK)."""
        n = len(view)
        if n <= VERIFY_CHUNK:
            self.recv_into(view)
            return checksum(view)
        h = checksum_stream()
        recv, update = self.recv_into, h.update
        for off in range(0, n, VERIFY_CHUNK):
            part = view[off:off + VERIFY_CHUNK]
            recv(part)
            update(part)
        return h.intdigest()

    def read_response(self, expect=None) -> Response:
        """The next response's header, checked (see ``response``)."""
        self.recv_into(self._hview)
        return self.header_response(expect)

    def header_response(self, expect=None) -> Response:
        """The response whose header is in ``self._hdr`` (see ``response``)."""
        return self.response(self._hdr, 0, expect)

    def response(self, buf, offset: int, expect=None) -> Response:
        """The response whose header is at ``offset`` of ``buf``, or ProtocolError if it is
        none or claims what no answer to ``expect`` (an op or tuple of ops; None: any)
        carries: checked before anything is allocated or received for it
        (wire.check_response, with this channel's ``max_payload``). Every reader of every
        channel comes through here."""
        try:
            h = decode(buf, offset)
        except FrameError:
            h = None
        if h is None or not h.flags & FLAG_RESPONSE:
            raise errors.ProtocolError("malformed response frame from kvstored")
        check_response(h.op, h.req_id, h.status, h.ns_len, h.key_len, h.length, self.max_payload, expect)
        return Response(h.op, h.req_id, h.status, h.aux, h.length, h.checksum)

    def read_error(self, r: Response) -> errors.KVStoreError:
        msg = bytearray(r.length)  # at most MAX_ERROR_MESSAGE: checked with the header
        self.recv_into(memoryview(msg))
        return errors.error_for_code(r.status, msg.decode("utf-8", "replace"), r.rid)

    def discard(self, n: int) -> None:
        # n: a GET payload's length, at most max_payload (checked with the header)
        buf = memoryview(bytearray(min(n, 1 << 20)))
        while n:
            take = min(n, len(buf))
            self.recv_into(buf[:take])
            n -= take

    def _collect(self, order: dict[int, int], views: list | None, verify: bool, alloc, op: int,
                 keep_errors: bool = False) -> list:
        """Read one response per request id (any order) to requests of ``op``; raise the
        first error (by arrival) after all arrive, or with ``keep_errors`` give each
        request's error in its place. Gets go into ``views`` or ``alloc(size)`` buffers."""
        results: list = [None] * len(order)
        first_error: errors.KVStoreError | None = None
        for _ in range(len(order)):
            r = self.read_response(op)
            i = order.pop(r.rid, None)
            if i is None:
                if r.status:  # connection-level error (id 0): e.g. too many connections
                    raise self.read_error(r)
                raise errors.ProtocolError(f"response for unknown request id {r.rid}")
            if r.status:
                err = self.read_error(r)
                if keep_errors:
                    results[i] = err
                else:
                    first_error = first_error or err
                continue
            if r.op == OP_PUT:
                results[i] = r.aux != 1  # aux=1: deduplicated
            elif r.op == OP_GET:
                if views is not None:
                    dest = views[i]
                    if r.length > len(dest):
                        self.discard(r.length)
                        first_error = first_error or too_small(r.length, len(dest))
                        continue
                    dest = dest[:r.length]
                    results[i] = r.length
                else:
                    results[i] = alloc(r.length)
                    dest = memoryview(results[i])
                if not verify:
                    self.recv_into(dest)
                elif self.recv_hashed(dest) != r.checksum:
                    first_error = first_error or mismatch()
            else:
                results[i] = True
        if first_error is not None:
            raise first_error
        return results


class GetReader:
    """The answers to GETs sent on one plain-TCP channel (``keyed_frames(OP_GET, ...)``), read without
    blocking as they arrive: a response's header, then its payload, each resumed where
    the last ``read_some`` stopped. Answers come in any order (by request id).

    ClusterClient's fanned-out batch get reads every node's connection this way from one
    thread, with poll(). A payload goes straight into the buffer given to ``expect`` or
    an ``alloc(size)`` one; with ``verify`` it is hashed as it lands (a large one piece by
    piece while still in cache, as ``recv_hashed``) and checked against the response's
    checksum. Per-request errors are results; a broken stream raises.

    A request may instead name a placer (``expect(..., place=)``): an object with
    ``head_len`` and ``place(index, length, head)``, asked once the first ``head_len``
    bytes of the payload are in. It returns ``(views, result)``: the rest of the payload
    is received into those views in order (so an EC data fragment lands at its offset in
    the object's buffer) and ``result`` is the request's; or None, and the payload is
    received whole into an ``alloc`` buffer, head included. The hash covers every piece."""

    __slots__ = ("ch", "verify", "alloc", "want", "_hgot", "_r", "_i", "_view", "_got", "_hash",
                 "_result", "_skip", "_scratch", "_place", "_rest")

    def __init__(self, ch: TcpChannel, verify: bool, alloc):
        self.ch = ch
        self.verify = verify
        self.alloc = alloc
        self.want: dict[int, tuple] = {}  # request id -> (index, dest, placer)
        self._hgot = 0  # header bytes of the next response received so far
        self._r: Response | None = None  # the response whose payload is being read
        self._i = 0
        self._view: memoryview | None = None  # where that payload goes
        self._got = 0
        self._hash = None
        self._result = None  # what the request gets once the payload is in
        self._skip = 0  # payload bytes still to discard (an object too big for its buffer)
        self._scratch: memoryview | None = None
        self._place = None  # the placer asked once the head is in
        self._rest: list = []  # further views of the payload (reversed)

    def expect(self, rid: int, index: int, dest: memoryview | None = None, place=None) -> None:
        """Request ``rid`` (sent) answers item ``index``, into ``dest`` when given (or as
        ``place`` says)."""
        self.want[rid] = (index, dest, place)

    def pending(self) -> int:
        """Requests not completely answered yet."""
        return len(self.want) + (self._r is not None)

    def read_some(self, done: list) -> int:
        """Read what the socket holds now, never blocking; append ``(index, result)`` for
        each answer completed: its size (into ``dest``), its buffer, or the request's
        KVStoreError (InvalidArgument for a buffer too small, ChecksumMismatch, NotFound...).
        Returns the bytes read. Raises when the connection is unusable: OSError
        (ConnectionResetError when closed), ProtocolError, or a connection-level error."""
        recv = self.ch.sock.recv_into
        total = 0
        while self.want or self._r is not None:
            if self._r is None:
                into, n_max = self.ch._hview[self._hgot:], HEADER_SIZE - self._hgot
            elif self._skip:
                into, n_max = self._scratch, min(self._skip, len(self._scratch))
            else:
                into, n_max = self._view[self._got:], 0
            try:
                n = recv(into, n_max, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return total
            if n == 0:
                raise ConnectionResetError("kvstored closed the data connection")
            total += n
            if self._r is None:
                self._hgot += n
                if self._hgot == HEADER_SIZE:
                    self._hgot = 0
                    self._start(self.ch.header_response(OP_GET), done)
            elif self._skip:
                self._skip -= n
                if not self._skip:
                    self._finish(done)
            else:
                if self._hash is not None:
                    self._hash.update(into[:n])
                self._got += n
                if self._got == len(self._view):
                    if self._place is not None:
                        self._placed()
                    elif self._rest:
                        self._view, self._got = self._rest.pop(), 0
                    else:
                        self._finish(done)
        return total

    def _start(self, r: Response, done: list) -> None:
        item = self.want.pop(r.rid, None)
        if item is None:
            if r.status:  # connection-level error (id 0): e.g. too many connections
                raise self.ch.read_error(r)
            raise errors.ProtocolError(f"response for unknown request id {r.rid}")
        self._r, (self._i, dest, place) = r, item
        self._got, self._hash, self._result, self._skip = 0, None, None, 0
        # r's length was checked with its header (ch.response): at most MAX_ERROR_MESSAGE
        # for an error's message, the daemon's max_value_size for an object
        if r.status:
            self._view = memoryview(bytearray(r.length))  # the error's message
        elif dest is not None and r.length > len(dest):
            self._result = too_small(r.length, len(dest))  # after the payload is discarded
            if self._scratch is None:
                self._scratch = memoryview(bytearray(VERIFY_CHUNK))
            self._skip = r.length
            return
        elif place is not None and r.length > place.head_len:
            self._place = place
            self._view = memoryview(bytearray(place.head_len))  # the head first
            if self.verify:
                self._hash = checksum_stream()
        else:
            if dest is not None:
                self._view, self._result = dest[:r.length], r.length
            else:
                self._result = self.alloc(r.length)
                self._view = memoryview(self._result)
            if self.verify and r.length > VERIFY_CHUNK:
                self._hash = checksum_stream()
        if not r.length:
            self._finish(done)

    def _placed(self) -> None:
        """The head is in: receive the rest where the placer says, or whole."""
        head, place, self._place = self._view.obj, self._place, None
        rest = self._r.length - len(head)
        plan = place.place(self._i, self._r.length, head)
        views = [] if plan is None else [v for v in plan[0] if len(v)]
        if plan is None or sum(len(v) for v in views) != rest:
            buf = self.alloc(self._r.length)
            buf[:len(head)] = head
            self._result, self._view, self._rest = buf, memoryview(buf)[len(head):], []
        else:
            self._result = plan[1]
            self._rest = views[::-1]
            self._view = self._rest.pop()
        self._got = 0

    def _finish(self, done: list) -> None:
        r, result = self._r, self._result
        if r.status:
            result = errors.error_for_code(r.status, bytes(self._view).decode("utf-8", "replace"), r.rid)
        elif self.verify and not isinstance(result, errors.KVStoreError):
            got = self._hash.intdigest() if self._hash is not None else checksum(self._view)
            if got != r.checksum:
                result = mismatch()
        done.append((self._i, result))
        self._r = self._view = self._hash = self._result = self._place = None
        self._rest = []


DataConnection = TcpChannel  # the name kvstore.shm and older callers import

__all__ = ["DataChannel", "DataConnection", "GetReader", "INLINE_ANY", "SHM_INLINE_MAX", "TRANSPORTS", "TcpChannel",
           "raise_first", "transport_plan"]
