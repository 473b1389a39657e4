"""Client side of the same-host shared-memory path (see kvstored/dataplane/shm.py).

The daemon hands over its arena's memfd when we connect to its Unix socket;
we map it once per connection. A get is then an offset into that mapping plus
a lease (``ShmView``: zero copies; or one memcpy into the caller's buffer). A
put copies the caller's bytes straight into the arena: into a *credit* (a slot
of that size the daemon reserved ahead, handed back with the previous put's
answer) and one SHM_PUT, one round trip; without a credit (the first put of a
size on this connection, or when the daemon grants none) it reserves a slot,
copies and commits, and the commit's answer brings a credit for the next put.
Requests are the ordinary frames, pipelined like on TCP. Released leases ride
on the connection's next request instead of costing a send of their own.
"""
from __future__ import annotations

import mmap
import os
import select
import socket
import sys
import time

from . import errors
from .channel import SHM_INLINE_MAX, DataConnection, Response
from .wire import (FLAG_OVERWRITE, FLAG_REFILL, HEADER, HEADER_SIZE, MAGIC, OP_SHM_COMMIT, OP_SHM_GET,
                   OP_SHM_PUT, OP_SHM_RELEASE, OP_SHM_RESERVE, SHM_HELLO, SHM_IDS, SHM_MAGIC, VERSION,
                   checksum, decode, encode_request)

# Released leases wait for the connection's next request (no send and no wake-up of
# the daemon of their own: on a loaded host each wake-up can cost milliseconds) while
# fewer than this many, and of fewer bytes, wait; beyond, they are sent at once. An idle
# client so keeps at most that much leased (not evictable) until it sends again or
# shm.lease_ttl passes.
DEFERRED_RELEASES = 32
DEFERRED_RELEASE_BYTES = 64 << 20
# ... and never more than this share of the arena: the daemon may be waiting for DRAM
# (promoting a batch's NVMe objects) that only these releases would give back, and a
# small arena (16 MiB of 1 MiB objects) would otherwise stall that batch until NoSpace.
DEFERRED_RELEASE_ARENA_SHARE = 1 / 16
# Copies into credits are announced to the daemon in sends of about this many bytes
# of objects, so it checksums and commits one group while we copy the next.
PUT_FLUSH_BYTES = 1 << 20
# Answers are read through a buffer of this size: one recv takes a whole answer (header
# and ids), or all the answers of a batch that have arrived, instead of two per answer.
# Larger reads (an object inside the frames) go straight into their destination.
RECV_BUFFER = 4096
_CREDIT_MARGIN = 0.5  # a credit is used only in the first half of its life


class ShmView:
    """A read-only view of an object inside the daemon's arena, valid while leased.

    Release it (``release()`` or a ``with`` block) as soon as you are done: while
    leased, the object cannot be evicted. The daemon releases it by itself after
    ``shm.lease_ttl`` seconds or when the connection closes; reading the view after
    that may see other bytes. Release from the thread that took it.
    """

    __slots__ = ("view", "checksum", "_conn", "_lease")

    def __init__(self, view: memoryview, csum: int, conn: "ShmConnection", lease: int):
        self.view = view
        self.checksum = csum
        self._conn = conn
        self._lease = lease

    def __len__(self) -> int:
        return len(self.view)

    def __enter__(self) -> memoryview:
        return self.view

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self._lease:
            lease, self._lease = self._lease, 0
            n = len(self.view)
            self.view.release()
            if not self._conn.closed:
                self._conn.release([lease], n)


class ShmConnection(DataConnection):
    """One blocking Unix-socket connection to the daemon plus its arena mapping.

    Framing (send, read_response, setup/AUTH) is DataConnection's; the socket, the
    SHM_* operations and how answers are read (poll, then one buffered recv) differ.
    """

    transport = "shm"  # the DataChannel capabilities Client decides with (kvstore.channel)
    zero_copy_get = True
    inline_max = SHM_INLINE_MAX
    inline_batch_put = False
    shm = True

    def __init__(self, path: str, timeout: float, max_payload: int | None = None):
        self.closed = False
        if max_payload is not None:
            self.max_payload = max_payload  # the largest inline GET answer (see DataChannel)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
            msg, fds, _flags, _addr = socket.recv_fds(self.sock, 4096, 1)
        except BaseException:
            self.sock.close()
            raise
        try:
            if msg[:4] == MAGIC:  # an error frame instead of the arena: refused
                h = decode(msg)
                text = msg[HEADER_SIZE:HEADER_SIZE + h.length].decode("utf-8", "replace")
                raise errors.error_for_code(h.status, text)
            if len(msg) < SHM_HELLO.size or not fds:
                raise errors.ProtocolError("kvstored did not send its arena over the shm socket")
            magic, _version, size = SHM_HELLO.unpack_from(msg)
            if magic != SHM_MAGIC:
                raise errors.ProtocolError("unexpected greeting on the shm socket")
            # MAP_POPULATE: map every page now (a one-time cost at connect, ~0.2 s per GiB)
            # instead of a page fault per 4 KiB on first touch, which made a 1 MiB get
            # 3x slower than its round trips
            self.arena = mmap.mmap(fds[0], size, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                                   mmap.PROT_READ | mmap.PROT_WRITE)
            self.view = memoryview(self.arena)
        except BaseException:
            self.sock.close()
            raise
        finally:
            for fd in fds:
                os.close(fd)
        self._init_framing(timeout)
        self._poller = select.poll()
        self._poller.register(self.sock, select.POLLIN)
        self._poll_ms = max(int(timeout * 1000), 1)
        self._rbuf = memoryview(bytearray(RECV_BUFFER))
        self._rpos = self._rend = 0  # unread bytes: _rbuf[_rpos:_rend]
        self._credits: dict[int, list] = {}  # object size -> [(offset, credit id, use by)]
        self._releases: list[bytes] = []  # RELEASE frames waiting for the next request
        self._release_bytes = 0
        self._release_limit = min(DEFERRED_RELEASE_BYTES, int(size * DEFERRED_RELEASE_ARENA_SHARE))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass
        kt = sys.modules.get("kvstore.torch")  # loaded only by GPU users: never import torch here
        if kt is not None:
            try:
                kt.unregister_host_memory(self.arena)  # a CUDA-pinned mapping must not outlive munmap
            except Exception:  # noqa: BLE001 - best effort at close
                pass
        try:
            self.view.release()
            self.arena.close()
        except (BufferError, ValueError):  # a view handed out is still alive: the GC unmaps
            pass

    def send(self, buffers: list) -> None:
        if self._releases:  # deferred releases go first, in the same sendmsg
            buffers = [b"".join(self._releases), *buffers]
            self._releases = []
            self._release_bytes = 0
        super().send(buffers)

    def read_response(self, expect=None) -> Response:
        pos, end = self._rpos, self._rend
        if pos == end:
            # Wait for an answer in poll(POLLIN), never asleep in recv: a reader asleep in
            # a Unix socket's recv is also woken each time the daemon reads what we sent
            # (the kernel's write-space wake-up shares the reader's wait queue; poll filters
            # it out), so every round trip cost this thread two wake-ups instead of one
            # (measured 1.9 vs 1.0 per put, client and daemon on separate cores)
            if not self._poller.poll(self._poll_ms):
                raise socket.timeout(f"no answer from kvstored within {self._poll_ms / 1000}s")
            end = self.sock.recv_into(self._rbuf)  # this answer and any after it
            if end == 0:
                raise ConnectionResetError("kvstored closed the data connection")
            pos, self._rend = 0, end
        if end - pos < HEADER_SIZE:  # a header split across reads: the generic path
            self._rpos = pos
            return super().read_response(expect)
        self._rpos = pos + HEADER_SIZE
        return self.response(self._rbuf, pos, expect)  # checked as on every channel

    def recv_into(self, view: memoryview) -> None:
        """Fill ``view`` from the socket, through the answer buffer (see RECV_BUFFER)."""
        want = len(view)
        got = min(want, self._rend - self._rpos)
        if got:
            view[:got] = self._rbuf[self._rpos:self._rpos + got]
            self._rpos += got
        if got == want:
            return
        if want - got >= RECV_BUFFER:
            super().recv_into(view[got:])  # MSG_WAITALL straight into the destination
            return
        recv, buf = self.sock.recv_into, self._rbuf
        while got < want:
            n = recv(buf)  # whatever has arrived (at least one byte): later answers too
            if n == 0:
                raise ConnectionResetError("kvstored closed the data connection")
            take = min(n, want - got)
            view[got:got + take] = buf[:take]
            got += take
            self._rpos, self._rend = take, n

    def _read(self, expect) -> tuple:
        """The next response (to requests of the op or ops ``expect``) and its payload: a
        few bytes, as checked with the header (read_response)."""
        r = self.read_response(expect)
        pos = self._rpos
        if r.length <= self._rend - pos:  # the usual case: it came with its header
            self._rpos = pos + r.length
            return r, self._rbuf[pos:pos + r.length].tobytes()
        body = bytearray(r.length)
        if r.length:
            self.recv_into(memoryview(body))
        return r, body

    def _responses(self, order: dict[int, int], expect=None) -> dict:
        """One response per request id in ``order`` (requests of the op ``expect``; any
        arrival order), keyed by its index: a typed error, or (aux, checksum field,
        SHM_IDS tuple or None)."""
        out: dict = {}
        for _ in range(len(order)):
            r, body = self._read(expect)
            i = order.pop(r.rid, None)
            if r.status:
                err = errors.error_for_code(r.status, body.decode("utf-8", "replace"), r.rid)
                if i is None:
                    raise err  # connection-level (e.g. refused while draining)
                out[i] = err
                continue
            if i is None:
                raise errors.ProtocolError(f"response for unknown request id {r.rid}")
            out[i] = (r.aux, r.checksum, SHM_IDS.unpack_from(body) if r.length >= SHM_IDS.size else None)
        return out

    # -- operations --------------------------------------------------------------
    def release(self, leases: list[int], nbytes: int = 0) -> None:
        """Give leases back. Not answered by the daemon; the frames go with the next
        request unless too many (or too many bytes) wait already."""
        rel = self._releases
        for lease in leases:
            rel.append(HEADER.pack(MAGIC, VERSION, OP_SHM_RELEASE, 0, self.next_id(), 0, 0, 0, 0, 0, lease))
        self._release_bytes += nbytes
        if len(rel) >= DEFERRED_RELEASES or self._release_bytes >= self._release_limit:
            self.send([])

    def _arena_slice(self, offset: int, size: int) -> memoryview:
        """An object's bytes in the arena (SHM_IDS of an SHM_GET answer), checked: copy_out
        allocates ``size`` bytes for it."""
        if size > self.max_payload:
            raise errors.ProtocolError(f"shm_get answer claims size={size}, over the daemon's "
                                       f"max_value_size {self.max_payload}")
        if offset + size > len(self.view):
            raise errors.ProtocolError("kvstored sent an offset outside its arena")
        return self.view[offset:offset + size]

    def get_view(self, ns: bytes, key: bytes, verify: bool) -> ShmView:
        """A leased read-only view of one object (raises its typed error)."""
        r = self._responses(self.send_keyed(OP_SHM_GET, ns, [key]), OP_SHM_GET)[0]
        if isinstance(r, errors.KVStoreError):
            raise r
        _aux, csum, (offset, size, lease) = r
        sv = ShmView(self._arena_slice(offset, size).toreadonly(), csum, self, lease)
        if verify and checksum(sv.view) != csum:
            sv.release()
            raise errors.ChecksumMismatch("object bytes in the arena do not match their checksum")
        return sv

    def frames_get(self, sizes: list[int] | None) -> bool:
        # only a single small get moves inside the frames: a batch is one round trip and
        # one copy per object out of the arena either way, and through the small Unix
        # socket buffer its payloads cost ~10 wake-ups per 32 x 64 KiB (measured 2x slower)
        return sizes is not None and len(sizes) <= 1 and super().frames_get(sizes)

    def frames_put(self, sizes: list[int]) -> bool:
        # with a credit a put is one copy and one round trip at any size: cheaper than
        # the frames (two copies through the socket, and the daemon reads the payload)
        return False

    def copy_out(self, ns: bytes, keys: list[bytes], dests: list | None, verify: bool,
                 alloc=bytearray) -> list:
        """Gets with one copy each: every object is copied (into ``dests[i]`` or a new
        ``alloc(size)`` buffer, by default a bytearray) as its answer arrives, and its
        lease is given back with the connection's next request (or at once past the
        deferral bounds). Results: size / bytearray / typed error, per key."""
        order = self.send_keyed(OP_SHM_GET, ns, keys)
        out: list = [None] * len(keys)
        for _ in range(len(keys)):
            r, body = self._read(OP_SHM_GET)
            rid, csum = r.rid, r.checksum
            i = order.pop(rid, None)
            if r.status:
                err = errors.error_for_code(r.status, body.decode("utf-8", "replace"), rid)
                if i is None:
                    raise err
                out[i] = err
                continue
            if i is None or r.length < SHM_IDS.size:
                raise errors.ProtocolError(f"unexpected response {rid} on the shm socket")
            offset, size, lease = SHM_IDS.unpack_from(body)
            src = self._arena_slice(offset, size)
            if dests is None:
                dest = alloc(size)
                out[i] = dest
            elif size > len(dests[i]):
                self.release([lease])
                out[i] = errors.InvalidArgument(
                    f"object of {size} bytes does not fit the {len(dests[i])}-byte buffer")
                continue
            else:
                dest = dests[i][:size]
                out[i] = size
            dest[:] = src
            # copied: the lease goes back with a later send (one past the deferral
            # bounds goes mid-batch, while we copy the rest)
            self.release([lease], size)
            # verified on the destination: cache-hot, and it checks the bytes the caller got.
            # (Copying and hashing 256 KiB chunks in turn measured no faster, and in the
            # benchmark's process 2x slower at 4 MiB.)
            if verify and checksum(dest) != csum:
                out[i] = errors.ChecksumMismatch("object bytes in the arena do not match their checksum")
        return out

    # -- puts --------------------------------------------------------------------
    def _take_credit(self, size: int, now: float):
        slots = self._credits.get(size)
        while slots:
            offset, cid, use_by = slots.pop()
            if now < use_by:
                return offset, cid
        return None

    def _keep_credit(self, ids: tuple, life_ms: int, now: float) -> None:
        """A credit from an answer (its life in ms rides in the checksum field)."""
        offset, size, cid = ids
        if offset + size > len(self.view):
            raise errors.ProtocolError("kvstored granted a slot outside its arena")
        self._credits.setdefault(size, []).append((offset, cid, now + life_ms / 1000 * _CREDIT_MARGIN))

    def put(self, ns: bytes, items: list[tuple[bytes, memoryview]], overwrite: bool) -> list:
        """Store each value with one copy into the arena: True stored / False already
        there / typed error, per item. Values with a credit: copy + SHM_PUT, one round
        trip for the lot; the others reserve / copy / commit (two)."""
        now = time.monotonic()
        with_credit, rest = [], []
        for i, (_k, mv) in enumerate(items):
            c = self._take_credit(len(mv), now)
            if c is None:
                rest.append(i)
            else:
                with_credit.append((i, c))
        results: list = [None] * len(items)
        retry: list[int] = []
        if with_credit:
            self._put_credited(ns, items, with_credit, overwrite, results, retry)
        rest += retry  # a credit the daemon no longer knew (it expired while we copied)
        if rest:
            for i, r in zip(rest, self._put_reserved(ns, [items[i] for i in rest], overwrite)):
                results[i] = r
        return results

    def _put_credited(self, ns: bytes, items: list, with_credit: list, overwrite: bool,
                      results: list, retry: list) -> None:
        flags = (FLAG_OVERWRITE if overwrite else 0) | FLAG_REFILL
        view, order, frames, pending = self.view, {}, [], 0
        for i, (offset, cid) in with_credit:
            k, mv = items[i]
            size = len(mv)
            # end to end: the checksum of the caller's bytes goes with the put and the
            # daemon verifies the slot against it before anything is visible
            csum = checksum(mv)
            view[offset:offset + size] = mv  # the one copy: caller's buffer -> arena
            rid = self.next_id()
            order[rid] = i
            frames.append(encode_request(OP_SHM_PUT, rid, ns, k, cid, csum, flags, self.epoch))
            pending += size
            if pending >= PUT_FLUSH_BYTES:
                self.send([b"".join(frames)])
                frames, pending = [], 0
        if frames:
            self.send([b"".join(frames)])
        self._put_answers(order, OP_SHM_PUT, results, retry)

    def _put_reserved(self, ns: bytes, items: list[tuple[bytes, memoryview]], overwrite: bool) -> list:
        """Reserve, copy into the arena, commit (asking for a credit for the next put)."""
        # end to end: the checksum of the caller's bytes goes with the reservation and the
        # daemon verifies the slot against it at commit, so bytes changed in the shared
        # slot before commit are refused (ChecksumMismatch), never stored
        flags = FLAG_OVERWRITE if overwrite else 0
        order, frames = {}, []
        for i, (k, mv) in enumerate(items):
            rid = self.next_id()
            order[rid] = i
            frames.append(encode_request(OP_SHM_RESERVE, rid, ns, k, len(mv), checksum(mv), flags,
                                         self.epoch))
        self.send([b"".join(frames)])
        reserved = self._responses(order, OP_SHM_RESERVE)
        results: list = [None] * len(items)
        order, frames = {}, []
        for i in range(len(items)):
            r = reserved[i]
            if isinstance(r, errors.KVStoreError):
                results[i] = r
                continue
            aux, _csum, ids = r
            if aux == 1:
                results[i] = False  # identical object already stored
                continue
            offset, size, res = ids
            mv = items[i][1]
            if size != len(mv) or offset + size > len(self.view):
                raise errors.ProtocolError("kvstored reserved a slot that does not fit the value")
            self.view[offset:offset + size] = mv  # the one copy: caller's buffer -> arena
            rid = self.next_id()
            order[rid] = i
            # commit at once: the daemon checksums this slot while we copy the next one
            self.send([encode_request(OP_SHM_COMMIT, rid, b"", b"", 0, res, FLAG_REFILL)])
        if order:
            self._put_answers(order, OP_SHM_COMMIT, results)
        return results

    def _put_answers(self, order: dict, op: int, results: list, retry: list | None = None) -> None:
        """Collect the answers of SHM_PUT / SHM_COMMIT frames: stored (True) / already
        there (False) / typed error per item, keeping any credit an answer carries. With
        ``retry``: a credit the daemon no longer knew (it expired) puts the item there."""
        now = time.monotonic()
        for i, r in self._responses(order, op).items():
            if isinstance(r, errors.KVStoreError):
                if (retry is not None and isinstance(r, errors.InvalidArgument)
                        and r.message.startswith("unknown credit")):
                    retry.append(i)
                else:
                    results[i] = r
                continue
            aux, life_ms, ids = r
            results[i] = aux != 1
            if ids is not None:
                self._keep_credit(ids, life_ms, now)
