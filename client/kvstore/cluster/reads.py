"""ClusterClient's read path: get / batch_get, and get_into / batch_get_into, which put
the object straight into the caller's buffer.

Replicated objects: the first healthy copy (a node that does not answer, or answers
NotFound or ChecksumMismatch, is followed by the next); ``*_into`` receives the bytes
into the caller's buffer on the socket. EC objects: the first K slots in parallel,
assembled (``layout.assemble``: concatenated when they hold data fragments 0..K-1,
decoded otherwise); a missing, slow (``fragment_timeout``) or corrupt record turns the
read into a degraded one that fetches the other slots too. ``*_into`` assembles into the
caller's buffer, so no object-sized intermediate is made on the concatenate path.

A node that answers NotVerified holds its record back until its repair has checked it
(back from a restart): an answer, so the node is not marked down, and the other copies
are read as for a NotFound. When nothing verified is found and some node held its
record back, the read raises NotVerified (an Unavailable: retry shortly), not NotFound.

Batches are fanned out from the calling thread (``_GetFanout``: every node's GETs sent
without blocking, every answer read with poll; EC data fragments received at their
offsets in the object's buffer, ``_Placer``), or on the thread pool per node
(``fanout_gets=False``, and channels that cannot do that).

A buffer too small for its object is an InvalidArgument (the object's size in the
message); a batch's other buffers may have been filled by then.
"""
from __future__ import annotations

import select
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait

from .. import errors
from .._common import writable_view
from ..layout import FRAG_HEADER, KIND_FRAGMENT, Policy, assemble, codec, fragment_key, lap_key, parse_head, \
    tune_malloc
from ..placement import Member
from ..wire import OP_GET, checksum, key_bytes, namespace_bytes
from .writes import FANOUT_WINDOW


class Reads:
    """get / batch_get / get_into / batch_get_into (a ClusterClient mixin)."""

    def get(self, key, *, namespace: str | None = None) -> bytearray:
        """The object's bytes (a new bytearray). Raises NotFound, or Unavailable when too
        few nodes answer."""
        return self._redirected(self._get_one, key_bytes(key), self._ns(namespace))

    def get_into(self, key, buffer, *, namespace: str | None = None) -> int:
        """The object put into ``buffer`` (writable, at least the object's size); returns
        its size."""
        return self.batch_get_into([key], [buffer], namespace=namespace)[0]

    def batch_get(self, keys: Sequence, *, namespace: str | None = None) -> list[bytearray]:
        """Get many objects: one batch per node, all nodes in parallel; a key whose node
        batch fails is retried alone (with the single-key fallbacks)."""
        return self._redirected(self._batch_get, [key_bytes(k) for k in keys], self._ns(namespace))

    def batch_get_into(self, keys: Sequence, buffers: Sequence, *,
                       namespace: str | None = None) -> list[int]:
        """``batch_get`` into the caller's buffers (replicas received into them, EC objects
        assembled into them); returns each object's size."""
        if len(keys) != len(buffers):
            raise errors.InvalidArgument(f"{len(keys)} keys but {len(buffers)} buffers")
        views = [writable_view(b) for b in buffers]
        return self._redirected(self._batch_get, [key_bytes(k) for k in keys], self._ns(namespace),
                                views)

    # ------------------------------------------------------------ one object
    def _get_one(self, kb: bytes, ns: str) -> bytearray:
        p = self.policy(ns)
        if p.kind == "ec":
            tune_malloc()  # once per process (layout.tune_malloc)
            return self._get_ec(kb, ns, p)
        return self._get_replica(kb, ns, self._slots(kb, ns, p, write=False))

    def _copy_from(self, m: Member, key: bytes, ns: str, out=None):
        """One node's copy: the bytes, or (into ``out``) its size."""
        if out is None:
            return self._node(m, "get", key, namespace=ns)
        return self._node(m, "get_into", key, out, namespace=ns)

    def _get_replica(self, key: bytes, ns: str, sl: list[tuple[Member, int]], out=None):
        """The first healthy copy (into ``out`` when given: then its size)."""
        now = time.monotonic()
        order = sorted((m for m, _ in sl), key=lambda m: self._down.get(m.node_id, 0) > now)
        errs = []
        for m in order:
            try:
                return self._copy_from(m, key, ns, out)
            except errors.Redirect:
                raise
            except (errors.NotFound, errors.Unavailable, errors.ChecksumMismatch) as e:
                errs.append(e)
        if all(isinstance(e, (errors.NotFound, errors.NotVerified)) for e in errs):
            # every slot says no (or holds its copy back): the next node in the key's
            # preference order may still hold a copy, written when a node that is a slot
            # now was away (restarting), with the copy on the other slot held back until
            # checked (a node that came back from NVMe): an acknowledged object must not
            # read as NotFound
            p = self.policy(ns)  # (a put written around dead nodes: up to N-1 places further)
            for m, _ in self._extra(key, ns, p, sl, max(1, p.n - 1)):
                try:
                    return self._copy_from(m, key, ns, out)
                except errors.Redirect:
                    raise
                except (errors.NotFound, errors.Unavailable, errors.ChecksumMismatch) as e:
                    if not isinstance(e, errors.NotFound):
                        errs.append(e)
                        if not isinstance(e, errors.NotVerified):
                            break  # a node that failed: Unavailable (below), not NotFound
        held = sum(isinstance(e, errors.NotVerified) for e in errs)
        if held:  # present (or a delete's leftover), not yet checked: retry shortly
            others = [f"{type(e).__name__}: {e}" for e in errs if not isinstance(e, errors.NotVerified)]
            raise errors.NotVerified(f"{key[:64]!r}: held back unverified on {held} node(s) (back "
                                     "from a restart, repair checking it), no verified copy: retry "
                                     "shortly" + "".join("; " + o for o in others))
        if all(isinstance(e, errors.NotFound) for e in errs):
            raise errors.NotFound(f"{key[:64]!r} not found on its {len(sl)} node(s)")
        raise errors.Unavailable(f"no healthy replica of {key[:64]!r}: "
                                 + "; ".join(f"{type(e).__name__}: {e}" for e in errs))

    def _get_ec(self, key: bytes, ns: str, p: Policy, got: dict | None = None, out=None):
        """Healthy path: the first K slots in parallel, assembled. Otherwise degraded: the
        other slots too, then up to M further nodes' lap-0 records (where records sit
        after a membership change repair has not caught up with), decoded from any K
        valid fragments. ``got``: records already fetched, by (node_id, lap). ``out``: the
        buffer to assemble into (then the object's size is returned)."""
        sl = self._slots(key, ns, p, write=False)
        fk = fragment_key(key)
        got = dict(got or {})
        futs = {}
        for m, lap in sl[:p.k]:
            if (m.node_id, lap) not in got:
                futs[self._submit(m, "get", lap_key(fk, lap), namespace=ns)] = (m.node_id, lap)
        self._gather(futs, got, time.monotonic() + self.fragment_timeout)
        r = assemble(p, list(got.values()), out)
        if r is not None:
            return r
        for extra in (sl[p.k:], self._extra(key, ns, p, sl, p.m)):
            for m, lap in extra:
                if (m.node_id, lap) not in got and (m.node_id, lap) not in futs.values():
                    futs[self._submit(m, "get", lap_key(fk, lap), namespace=ns)] = (m.node_id, lap)
            deadline = time.monotonic() + self.node_timeout + self.fragment_timeout
            while futs and time.monotonic() < deadline:
                self._gather(futs, got, deadline, until_one=True)
                r = assemble(p, list(got.values()), out)
                if r is not None:
                    return r
        vals = list(got.values())
        if any(isinstance(d, errors.Redirect) for d in vals):
            raise next(d for d in vals if isinstance(d, errors.Redirect))
        if vals and all(isinstance(d, errors.NotFound) for d in vals):
            raise errors.NotFound(f"{key[:64]!r} not found")
        found = sum(1 for d in vals if not isinstance(d, Exception))
        held = sum(1 for d in vals if isinstance(d, errors.NotVerified))
        if held:
            # too few verified records, some held back (nodes back from a restart whose
            # repair has not checked them yet): present, or a delete's leftover the check
            # will drop; not "gone" yet (a held record may be a whole copy: no count of
            # fragments tells). Retry shortly
            raise errors.NotVerified(f"{key[:64]!r}: {found} verified record(s) of {p} and {held} "
                                     "held back unverified (repair checking): retry shortly")
        raise errors.Unavailable(f"{key[:64]!r}: {found} record(s) of {p} fetched and no K={p.k} "
                                 "consistent valid fragments among them")

    @staticmethod
    def _gather(futs: dict, got: dict, deadline: float, until_one: bool = False) -> None:
        """Move finished futures' results (or exceptions) from ``futs`` into ``got``."""
        while futs:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            done, _ = wait(list(futs), timeout=left, return_when=FIRST_COMPLETED)
            for f in done:
                i = futs.pop(f)
                e = f.exception()
                got[i] = e if e is not None else f.result()
            if until_one and done:
                return

    # ------------------------------------------------------------ batches
    def _batch_get(self, ks: list[bytes], ns: str, outs: list | None = None) -> list:
        """Objects (bytearrays), or with ``outs`` their sizes, put into those buffers."""
        p = self.policy(ns)
        if p.kind == "ec":
            tune_malloc()
        sls = [self._slots(k, ns, p, write=False) for k in ks]
        per_node: dict[str, tuple[Member, list]] = {}
        now = time.monotonic()
        for j, (k, sl) in enumerate(zip(ks, sls)):
            if p.kind == "ec":
                fk = fragment_key(k)
                for m, lap in sl[:p.k]:
                    per_node.setdefault(m.node_id, (m, []))[1].append((j, (m.node_id, lap), lap_key(fk, lap)))
            else:
                m = min((m for m, _ in sl), key=lambda m: self._down.get(m.node_id, 0) > now)
                per_node.setdefault(m.node_id, (m, []))[1].append((j, (m.node_id, 0), k))
        got: list[dict] = [{} for _ in ks]
        into = outs if p.kind != "ec" else None  # replicas straight into the caller's buffers
        placers: dict[int, _Placer] = {}
        if self.fanout_gets:
            if p.kind == "ec" and codec(p).offset is not None and per_node:
                # data fragments received at their offsets in the object's buffer
                alloc = self.client(next(iter(per_node.values()))[0])._pool.take
                placers = {j: _Placer(p, codec(p).offset, None if outs is None else outs[j], alloc)
                           for j in range(len(ks))}
            _GetFanout(self, ns, p.kind == "ec", into, got, placers).run(per_node.values())
        else:
            futs = [(items, self._pooled_get(m, items, ns, into)) for m, items in per_node.values()]
            wait([f for _, f in futs])
            for items, f in futs:
                _take_pooled(items, f, got)
        out = []
        for j, k in enumerate(ks):
            dest = None if outs is None else outs[j]
            if p.kind != "ec":
                out.append(got[j][next(iter(got[j]))] if got[j] else self._get_replica(k, ns, sls[j], dest))
                continue
            pl = placers.get(j)
            if pl is not None and pl.landed:
                r = pl.whole()
                if r is not None:
                    out.append(r)
                    continue
                for w, v in list(got[j].items()):  # as records again, for the paths below
                    if isinstance(v, _Landed):
                        got[j][w] = pl.record(v)
            r = assemble(p, list(got[j].values()), dest) if got[j] else None
            out.append(r if r is not None else self._get_ec(k, ns, p, got[j], dest))
        return out

    def _pooled_get(self, m: Member, items: list, ns: str, outs: list | None) -> Future:
        """One node's part of a batch get ((j, where, stored key) items) on the thread pool."""
        sks = [sk for _j, _w, sk in items]
        if outs is not None:
            return self._submit(m, "batch_get_into", sks, [outs[j] for j, _w, _sk in items], namespace=ns)
        return self._submit(m, "batch_get", sks, namespace=ns)


def _take_pooled(items: list, f: Future, got: list[dict]) -> None:
    """A pooled node part's results into ``got``; a failed part leaves its items to the
    single-key fallbacks, except Redirect (re-route) and InvalidArgument (a buffer too
    small for its object), raised."""
    e = f.exception()
    if isinstance(e, (errors.Redirect, errors.InvalidArgument)):
        raise e
    if e is None:
        for (j, where, _sk), buf in zip(items, f.result()):
            got[j][where] = buf


class _GetFanout:
    """One batch get's requests to every node sent, and every answer read, from the
    calling thread (the put's ``writes._Fanout``, for gets).

    The thread-pool path gives each node's part to a worker that sends its GETs and reads
    the answers; on few cores the GIL passing between those workers costs more than the
    receiving. Here each node's requests (payload-less frames) go out with non-blocking
    ``sendmsg``, at most ``FANOUT_WINDOW`` unanswered per connection (more are sent as
    answers come in), and every connection's answers are read with ``poll`` as they
    arrive, each socket's stream parsed incrementally (``channel.GetReader``): payloads
    straight into the caller's buffers (replicas, ``batch_get_into``), EC data fragments
    at their offsets in the object's buffer (``_Placer``), anything else into receive-pool
    buffers, each checked against its checksum as it lands.

    Per-request outcomes are as on the pool path, item by item: a replica's failed read
    leaves it to ``_get_replica`` (the other copies); an EC record's error (NotFound: one
    fragment fewer) is kept like ``_gather`` keeps it and ``_get_ec`` fetches other slots;
    Redirect and InvalidArgument are raised once every answer is in. A node whose channel
    cannot take this (TLS, same-host shm, RDMA, marked down, unreachable) gets its part on
    the pool (``cc.pooled_get_jobs``), as does the rest of a node whose connection broke
    under the batch (dropped; the pool path connects afresh once). A node that sends
    nothing for ``node_timeout`` while it owes answers (the pool path's socket timeout),
    or answers Unavailable, is marked down and its connection dropped: its items fall back
    as on the pool path.
    """

    def __init__(self, reads: Reads, ns: str, ec: bool, outs: list | None, got: list[dict],
                 placers: dict | None = None):
        self.r = reads
        self.placers = placers or {}
        self.ns = ns
        self.nsb = namespace_bytes(ns)
        self.ec = ec
        self.outs = outs
        self.got = got
        self.raise_: errors.KVStoreError | None = None  # the first Redirect / InvalidArgument
        self.pooled: list[tuple[list, Future]] = []

    def run(self, parts) -> None:
        nodes = []
        for m, items in parts:
            conn = self._channel(m)
            if conn is None:
                self._on_pool(m, items)
            else:
                c = self.r.client(m)
                nodes.append(_NodeGet(m, c, conn, items, conn.get_reader(c.verify_checksums, c._pool.take)))
        try:
            self._exchange(nodes)
        except BaseException:
            for st in nodes:  # unanswered requests on it: never reused
                if st.conn is not None and st.reader.pending():
                    self._drop(st)
            raise
        if self.pooled:
            wait([f for _, f in self.pooled])
            for items, f in self.pooled:
                try:
                    _take_pooled(items, f, self.got)
                except errors.KVStoreError as e:
                    self.raise_ = self.raise_ or e
        if self.raise_ is not None:
            raise self.raise_

    def _channel(self, m: Member):
        """This thread's channel of the node when it takes non-blocking gets; None means
        the pool's path (which also reports a node that is down or unreachable)."""
        if self.r._is_down(m):
            return None
        try:
            conn = self.r.client(m)._channel_here()
        except (errors.KVStoreError, OSError):
            return None
        ok = getattr(conn, "nonblocking_gets", None)
        return conn if ok is not None and ok() else None

    def _on_pool(self, m: Member, items: list) -> None:
        self.r.pooled_get_jobs += 1
        self.pooled.append((items, self.r._pooled_get(m, items, self.ns, self.outs)))

    def _exchange(self, nodes: list) -> None:
        """Send every node's requests (window by window) and read all their answers."""
        timeout = self.r.node_timeout
        now = time.monotonic()
        for st in nodes:
            st.last = now
        live = list(nodes)
        done: list = []
        poller = select.poll()
        by_fd: dict[int, _NodeGet] = {}
        while live:
            for st in live:
                self._top_up(st)
            live = [st for st in live if st.conn is not None]
            for st in live:
                fd = st.conn.sock.fileno()
                by_fd[fd] = st
                poller.register(fd, select.POLLIN | (select.POLLOUT if st.out else 0))
            if not live:
                break
            now = time.monotonic()
            first = min(st.last for st in live) + timeout
            events = poller.poll(max(0.0, first - now) * 1000) if first > now else []
            for fd, ev in events:
                st = by_fd.get(fd)
                if st is None or st.conn is None:
                    continue
                if ev & select.POLLNVAL:
                    self._broken(st)
                    continue
                failure: Exception | None = None
                try:
                    if ev & select.POLLOUT and st.out:
                        st.conn.send_some(st.out)
                    if ev & (select.POLLIN | select.POLLERR | select.POLLHUP):
                        if st.reader.read_some(done):
                            st.last = time.monotonic()
                except (errors.KVStoreError, OSError) as e:
                    failure = e
                self._record(st, done)  # answers completed before a failure count
                if isinstance(failure, errors.KVStoreError):
                    self._failed(st, failure)  # a bad frame, a connection-level error
                elif failure is not None:
                    self._broken(st)
            now = time.monotonic()
            for st in live:
                if st.conn is not None and now - st.last >= timeout:
                    self._failed(st, errors.Timeout(
                        f"node {st.m.node_id}: no answer from kvstored within {timeout}s"))
            for fd in by_fd:
                poller.unregister(fd)
            by_fd.clear()
            live = [st for st in live if st.conn is not None and (st.reader.pending() or st.next < len(st.items))]

    def _top_up(self, st: "_NodeGet") -> None:
        """Queue the node's next requests while fewer than FANOUT_WINDOW are unanswered,
        and send what the socket takes now."""
        room = FANOUT_WINDOW - st.reader.pending()
        if room > 0 and st.next < len(st.items):
            batch = st.items[st.next:st.next + room]
            buf, rids = st.conn.keyed_frames(OP_GET, self.nsb, [sk for _j, _w, sk in batch])
            for n, ((j, _w, _sk), rid) in enumerate(zip(batch, rids)):
                st.reader.expect(rid, st.next + n, None if self.outs is None else self.outs[j],
                                 self.placers.get(j))
            st.next += len(batch)
            st.out.append(memoryview(buf))
        if st.out:
            try:
                st.conn.send_some(st.out)
            except OSError:
                self._broken(st)

    def _record(self, st: "_NodeGet", done: list) -> None:
        """Answers read into ``got`` (see the class's note on errors)."""
        for i, res in done:
            j, where, _sk = st.items[i]
            st.answered[i] = True
            if isinstance(res, errors.KVStoreError):
                if isinstance(res, (errors.Redirect, errors.InvalidArgument)):
                    self.raise_ = self.raise_ or res
                elif isinstance(res, errors.Unavailable) and not isinstance(res, errors.NotVerified):
                    self.r._mark_down(st.m)  # as MemberView._node does
                if self.ec:
                    self.got[j][where] = res
            else:
                if isinstance(res, _Landed):
                    self.placers[j].land(res)
                self.got[j][where] = res
        done.clear()

    def _drop(self, st: "_NodeGet") -> None:
        st.client._drop(st.conn)
        st.conn = None
        st.out.clear()

    def _broken(self, st: "_NodeGet") -> None:
        """The connection failed under the batch: dropped; the node's unanswered items go
        to the pool (a new connection, as ``Client`` retries a broken one once)."""
        self._drop(st)
        rest = [it for it, a in zip(st.items, st.answered) if not a]
        if rest:
            self._on_pool(st.m, rest)

    def _failed(self, st: "_NodeGet", e: errors.KVStoreError) -> None:
        """The node's unanswered items get nothing (the fallbacks read them elsewhere); an
        Unavailable (a Timeout too) marks it down, as ``MemberView._node`` does. A
        Redirect, or a ProtocolError (a response the SDK refused: the pool path raises it
        from the node's batch too), is raised once every answer is in."""
        if isinstance(e, (errors.Redirect, errors.ProtocolError)):
            self.raise_ = self.raise_ or e
        elif isinstance(e, errors.Unavailable):
            self.r._mark_down(st.m)
        self._drop(st)


class _NodeGet:
    """One node's part of a fanned-out batch get."""

    __slots__ = ("m", "client", "conn", "items", "reader", "next", "out", "answered", "last")

    def __init__(self, m: Member, client, conn, items: list, reader):
        self.m = m
        self.client = client
        self.conn = conn
        self.items = items  # (j, where, stored key)
        self.reader = reader
        self.next = 0  # items[:next] have been queued
        self.out: list = []  # request bytes not yet sent
        self.answered = [False] * len(items)
        self.last = 0.0  # when bytes last came from the node


class _Landed:
    """An EC data fragment received at its offset in the object's buffer (the record's
    head and the zero padding past the object's end kept aside)."""

    __slots__ = ("index", "head", "pad")

    def __init__(self, index: int, head: bytearray, pad: bytearray):
        self.index, self.head, self.pad = index, head, pad


class _Placer:
    """Where one EC object's data fragments go as they arrive (``GetReader``'s placer):
    fragment i's bytes at ``i * fragment length`` in the object's buffer (the caller's
    for ``batch_get_into``, else one from the receive pool, taken at the first head),
    when its head shows a data fragment of this policy and of the same version (length
    and object checksum) as the others placed. Anything else (a whole copy, another
    version, a fragment index already taken, an object the buffer cannot hold) is
    received whole, as before. The object is returned only once all K data fragments
    landed (each checked against its wire checksum) and the object checksum matches,
    as ``layout.assemble``'s concatenate path decides; otherwise the landed fragments
    are made records again (``record``) for assemble and the degraded path."""

    __slots__ = ("p", "head_len", "out", "alloc", "buf", "version", "flen", "taken", "landed")

    def __init__(self, p: Policy, offset: int, out, alloc):
        self.p = p
        self.head_len = FRAG_HEADER.size + offset  # record header + liberasurecode header
        self.out = out  # the caller's buffer (memoryview) or None
        self.alloc = alloc
        self.buf = None  # the object's buffer once the first fragment is placed
        self.version: tuple | None = None  # (object length, object checksum)
        self.flen = 0  # data bytes per fragment
        self.taken: set[int] = set()
        self.landed: dict[int, _Landed] = {}

    def place(self, _i: int, length: int, head: bytearray):
        h = parse_head(head)
        p = self.p
        if h is None or h[2] != KIND_FRAGMENT or h[4] != p.k or h[5] != p.m or h[3] >= p.k \
                or h[3] in self.taken:
            return None
        olen, flen, version = h[8], length - self.head_len, (h[8], h[9])
        if self.version is None:
            if flen * p.k < olen or (self.out is not None and olen > len(self.out)):
                return None  # not this layout, or a buffer too small (assemble says so)
            self.version, self.flen = version, flen
            self.buf = self.out if self.out is not None else self.alloc(olen)
        elif version != self.version or flen != self.flen:
            return None
        i = h[3]
        self.taken.add(i)
        at = i * flen
        take = max(0, min(flen, olen - at))
        pad = bytearray(flen - take)
        view = memoryview(self.buf)
        return [view[at:at + take], memoryview(pad)], _Landed(i, head, pad)

    def land(self, f: _Landed) -> None:
        self.landed[f.index] = f

    def whole(self):
        """The object (its size when received into the caller's buffer) once every data
        fragment landed and the object checksum matches; else None."""
        if len(self.landed) < self.p.k:
            return None
        olen, ocsum = self.version
        if checksum(memoryview(self.buf)[:olen]) != ocsum:
            return None
        return olen if self.out is not None else self.buf

    def record(self, f: _Landed) -> bytes:
        """The stored record of a landed fragment, whole again (a copy)."""
        at = f.index * self.flen
        take = max(0, min(self.flen, self.version[0] - at))
        return bytes(f.head) + bytes(memoryview(self.buf)[at:at + take]) + bytes(f.pad)
