"""The SDK's RDMA channel: a TCP data connection plus an RC queue pair.

Frames still travel over the TCP connection (auth, errors, answers); the
object bytes move by RDMA, driven by the daemon: a put names the caller's
registered buffer and the daemon RDMA-READs it, a get names the destination
buffer and the daemon RDMA-WRITEs into it before answering. The client posts no
work requests of its own; its queue pair only has to be at RTS for the
daemon's reads and writes to land.

Buffers are registered once and kept in a ``RegistrationCache`` (bounded in
bytes and entries, least recently used first out). The cache holds a reference
to every buffer it registered, so that memory cannot be freed and its address
handed to another object while a registration still covers it (the stale-
registration problem of address-keyed caches).
"""
from __future__ import annotations

import collections
import threading

from .. import errors
from ..channel import TcpChannel
from ..wire import (FLAG_NOT_VERIFIED_OK, FLAG_OVERWRITE, OP_GET, OP_PUT, OP_RDMA_CONNECT, OP_RDMA_GET, OP_RDMA_PUT,
                    RDMA_DESC, RDMA_SIZE, checksum, encode_request)
from . import note_fallback, open_device
from .verbs import (LOCAL_WRITE, MR, REMOTE_READ, REMOTE_WRITE, Endpoint, Unsupported,
                    VerbsError, buffer_address)

DEFAULT_CACHE_BYTES = 1 << 30
DEFAULT_CACHE_ENTRIES = 4096


class RegistrationCache:
    """(address, length, access) -> registration, LRU, at most ``max_bytes`` registered."""

    def __init__(self, device, max_bytes: int = DEFAULT_CACHE_BYTES,
                 max_entries: int = DEFAULT_CACHE_ENTRIES):
        self.dev = device
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.entries: collections.OrderedDict = collections.OrderedDict()  # key -> (MR, buffer)
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self.lock = threading.Lock()

    def get(self, buf, access: int) -> MR:
        addr, length, _ro = buffer_address(buf)
        key = (addr, length, access)
        with self.lock:
            hit = self.entries.get(key)
            if hit is not None:
                self.entries.move_to_end(key)
                self.hits += 1
                return hit[0]
            self.misses += 1
            if length > self.max_bytes:
                raise errors.InvalidArgument(
                    f"a {length}-byte buffer exceeds the RDMA registration limit {self.max_bytes}")
            for _ in range(len(self.entries)):
                if self.bytes + length <= self.max_bytes and len(self.entries) < self.max_entries:
                    break
                self._evict_oldest()
            try:
                mr = self.dev.reg_mr(buf, access)
            except VerbsError as e:
                raise errors.InvalidArgument(f"cannot register the buffer for RDMA: {e}") from None
            self.entries[key] = (mr, buf)  # the reference keeps the memory (and address) ours
            self.bytes += length
            return mr

    def _evict_oldest(self) -> None:
        _, (mr, _buf) = self.entries.popitem(last=False)
        self.bytes -= mr.length
        self.evictions += 1
        try:
            self.dev.dereg_mr(mr)
        except VerbsError:
            pass

    def clear(self) -> None:
        with self.lock:
            for _ in range(len(self.entries)):
                self._evict_oldest()


class RdmaConnection(TcpChannel):
    """A blocking TCP data connection whose puts and gets move their bytes by RDMA."""

    transport = "rdma"
    inline_max = -1  # every object moves by RDMA (put / copy_out); frames carry descriptors

    def __init__(self, host: str, port: int, timeout: float, device, *,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, connect_timeout: float = 3.0,
                 max_payload: int | None = None):
        super().__init__(host, port, timeout, connect_timeout=connect_timeout)
        if max_payload is not None:
            self.max_payload = max_payload  # the largest GET answer over TCP (see DataChannel)
        self.closed = False
        self.dev = device
        try:
            self.cq = device.create_cq(16)  # the daemon posts; we only need a connected QP
            self.qp = device.create_qp(self.cq, 1)
        except VerbsError as e:
            super().close()
            raise errors.Unavailable(f"cannot create an RDMA queue pair: {e}") from None
        self.cache = RegistrationCache(device, cache_bytes)
        self.remote: Endpoint | None = None

    def setup(self, token: str | None) -> None:
        super().setup(token)
        rid = self.next_id()
        mine = self.dev.endpoint(self.qp).pack()
        self.send([encode_request(OP_RDMA_CONNECT, rid, b"", b"", len(mine)), mine])
        r = self.read_response(OP_RDMA_CONNECT)
        if r.status:
            err = self.read_error(r)
            if isinstance(err, errors.InvalidArgument) and "unknown op" in err.message:
                raise errors.Unavailable("kvstored does not offer RDMA (rdma.verbs is off or "
                                         "no device there)")
            raise errors.Unavailable(f"kvstored refused RDMA: {err.message}")
        if r.rid != rid or r.length != len(mine):
            raise errors.ProtocolError("malformed RDMA_CONNECT answer")
        body = bytearray(r.length)
        self.recv_into(memoryview(body))
        try:
            self.remote = Endpoint.unpack(bytes(body))
            self.qp.connect(self.remote)
        except (ValueError, VerbsError) as e:
            raise errors.Unavailable(f"cannot connect the RDMA queue pair: {e}") from None

    def close(self) -> None:
        self.closed = True
        super().close()  # the daemon stops its QP first when the TCP connection ends
        try:
            self.qp.close()
        except Exception:
            pass
        self.cache.clear()
        try:
            self.cq.close()
            self.dev.close()  # each connection opens its own device context
        except Exception:
            pass

    # ---- the transport's own path (TcpChannel.put_batch / get_batch call it: one result
    # or typed error per item, like ShmConnection's)
    def put(self, ns: bytes, items: list, overwrite: bool) -> list:
        flags = FLAG_OVERWRITE if overwrite else 0
        order, frames = {}, []
        for i, (k, mv) in enumerate(items):
            rid = self.next_id()
            order[rid] = i
            if len(mv) == 0:  # nothing to register: an ordinary put
                frames.append(encode_request(OP_PUT, rid, ns, k, 0, checksum(mv), flags, self.epoch))
                continue
            mr = self.cache.get(mv, REMOTE_READ)
            addr = buffer_address(mv)[0]
            frames.append(encode_request(OP_RDMA_PUT, rid, ns, k, RDMA_DESC.size, checksum(mv),
                                         flags, self.epoch) + RDMA_DESC.pack(addr, len(mv), mr.rkey))
        self.send([b"".join(frames)])
        return self._results(order, (OP_PUT, OP_RDMA_PUT), None, False)

    def copy_out(self, ns: bytes, keys: list, dests: list | None, verify: bool, alloc=bytearray) -> list:
        """Gets into ``dests`` by RDMA; without destinations (sizes unknown) over TCP,
        into ``alloc(size)`` buffers."""
        order, frames = {}, []
        for i, k in enumerate(keys):
            rid = self.next_id()
            order[rid] = i
            if dests is None:
                frames.append(encode_request(OP_GET, rid, ns, k, flags=FLAG_NOT_VERIFIED_OK, epoch=self.epoch))
                continue
            d = dests[i]
            mr = self.cache.get(d, LOCAL_WRITE | REMOTE_WRITE)
            addr = buffer_address(d)[0]
            frames.append(encode_request(OP_RDMA_GET, rid, ns, k, RDMA_DESC.size, 0, FLAG_NOT_VERIFIED_OK,
                                         self.epoch)
                          + RDMA_DESC.pack(addr, len(d), mr.rkey))
        self.send([b"".join(frames)])
        return self._results(order, (OP_GET, OP_RDMA_GET), dests, verify, alloc)

    def _results(self, order: dict, expect: tuple, dests: list | None, verify: bool, alloc=bytearray) -> list:
        """One result or typed error per request (TcpChannel._collect raises instead);
        ``expect``: the ops the requests were (every header is checked, see
        TcpChannel.response, before its payload is received)."""
        results: list = [None] * len(order)
        for _ in range(len(order)):
            r = self.read_response(expect)
            i = order.pop(r.rid, None)
            if i is None:
                if r.status:  # a connection-level error (id 0)
                    raise self.read_error(r)
                raise errors.ProtocolError(f"response for unknown request id {r.rid}")
            if r.status:
                results[i] = self.read_error(r)
            elif r.op in (OP_PUT, OP_RDMA_PUT):
                results[i] = r.aux != 1
            elif r.op == OP_GET:
                buf = alloc(r.length)
                self.recv_into(memoryview(buf))
                results[i] = buf
                if verify and checksum(buf) != r.checksum:
                    results[i] = errors.ChecksumMismatch("object bytes do not match their checksum "
                                                         "after transfer")
            elif r.op == OP_RDMA_GET and r.length == RDMA_SIZE.size:
                sz = bytearray(RDMA_SIZE.size)
                self.recv_into(memoryview(sz))
                (size,) = RDMA_SIZE.unpack(sz)
                d = dests[i]
                if size > len(d):
                    raise errors.ProtocolError(f"kvstored wrote {size} bytes into a {len(d)}-byte buffer")
                results[i] = size
                if verify and checksum(memoryview(d)[:size]) != r.checksum:
                    results[i] = errors.ChecksumMismatch("object bytes do not match their checksum "
                                                         "after the RDMA write")
            else:
                raise errors.ProtocolError(f"unexpected answer (op {r.op}) on the RDMA channel")
        return results


def connect(where, timeout: float, token: str | None, *, explicit: bool,
            connect_timeout: float = 3.0, kind: str | None = None):
    """``(RdmaConnection, "")``, or ``(None, why)`` after counting the fallback
    (``explicit``: raise Unavailable saying why instead). ``where()`` gives the data
    address; it is asked only once a device is open (no round trip on hosts without RDMA)."""
    try:
        dev = open_device(kind)
    except Unsupported as e:  # this host has no RDMA: expected on most hosts, logged at INFO
        return _unusable(str(e), explicit, local=True)
    try:
        host, port = where()
        conn = RdmaConnection(host, port, timeout, dev, connect_timeout=connect_timeout)
    except errors.Unavailable as e:
        dev.close()
        return _unusable(e.message, explicit)
    except BaseException:
        dev.close()
        raise
    try:
        conn.setup(token)
    except errors.Unavailable as e:
        conn.close()
        return _unusable(e.message, explicit)
    except BaseException:
        conn.close()
        raise
    return conn, ""


def _unusable(reason: str, explicit: bool, local: bool = False):
    if explicit:
        raise errors.Unavailable(f"transport='rdma' but RDMA is not usable: {reason}")
    note_fallback(reason, quiet=local)
    return None, reason
