"""ClusterClient's put path: every copy or EC record of a batch written to its slot, one
pipelined batch of puts per node, all nodes at once, acknowledged when all are stored.
The calling thread writes every node's connection itself (``_Fanout``); a node whose
channel cannot take that goes to the thread pool (``Writes._put_records``).

EC records go out as two buffers, header and fragment (``layout.encode_hashed``), a value
the node's Client sends gathered and the node stores as their concatenation: the fragment
the encoder returned is never copied behind a header. The encoder also gives each record's
checksum (hashed while the object's fragments are still in cache), which the fanned-out
path puts in the PUT frame as it is (``TcpChannel.put_frames_hashed``: frame header, names
and record header packed as one buffer) instead of hashing every record again when it is
queued. A batch of EC objects is encoded in rounds of about ``ENCODE_ROUND_BYTES``: the
calling thread encodes the first, then each next round is encoded on the thread pool
while the calling thread sends the round before (``_Fanout.encode_ahead``; ISA-L and xxh3
let go of the GIL), so the encoding and the sends overlap on two cores instead of taking
turns. Rounds of 1-2 MiB cost the client and the nodes more CPU per batch (more, smaller
sends: each wakes the nodes again); 32 MiB about the same as 8 MiB.

Partial failure: the records this call newly stored are deleted best effort and the
error is raised; objects are immutable and a repeated put of the same bytes is a no-op,
so retrying is idempotent. Not those of an object some node answered it held already:
the object existed before this call, its new records only complete its copies, and
their deletes would read, to the nodes' repair, as a client's delete of the object
made after the copies it had (a peer's delete history, kvstored/cluster/repair/
decide.py), so repair would delete those too.
"""
from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Iterable
from concurrent.futures import Future, wait

from .. import errors
from .._common import as_bytes_view, value_parts
from ..layout import FRAG_HEADER, Policy, encode_hashed, fragment_key, lap_key, parse_head, tune_malloc
from ..placement import Member
from ..wire import key_bytes, namespace_bytes

ENCODE_ROUND_BYTES = 8 << 20  # user bytes encoded before their records are sent
# Unanswered puts one node's connection may hold in a fanned-out batch before its answers
# are read (the daemon's own bound, server.max_pipelined_requests, is 1024 by default).
FANOUT_WINDOW = 512


def _head(value) -> bytes | None:
    """The EC header at the front of a record to write (two buffers or one), or None."""
    if isinstance(value, tuple):
        return parse_head(value[0])
    return parse_head(value) if isinstance(value, bytes) else None


class Writes:
    """put / batch_put (a ClusterClient mixin)."""

    def put(self, key, value, *, namespace: str | None = None, overwrite: bool = False) -> bool:
        """Store ``value`` under the namespace's policy; acknowledged when every replica or
        fragment is stored. Returns False if it was all there already."""
        return self.batch_put([(key, value)], namespace=namespace, overwrite=overwrite)[0]

    def batch_put(self, items: Iterable[tuple[object, object]], *, namespace: str | None = None,
                  overwrite: bool = False) -> list[bool]:
        """Put many objects, one pipelined batch per node, all nodes in parallel."""
        items = [(key_bytes(k), as_bytes_view(v)) for k, v in items]
        return self._redirected(self._batch_put, items, self._ns(namespace), overwrite)

    def _batch_put(self, items, ns: str, overwrite: bool) -> list[bool]:
        down = self._down_now()
        try:
            return self._batch_put_once(items, ns, overwrite)
        except errors.Redirect:
            raise
        except errors.Unavailable:
            if self._down_now() <= down:
                raise
            # a node failed under this put and is marked down now: write again without it
            return self._batch_put_once(items, ns, overwrite)

    def _writes(self, key: bytes, value: memoryview, ns: str, p: Policy) -> list[tuple]:
        """(member, stored key, value, checksum of the value or None) of every record of
        one object. An EC record's value is (header, payload), its checksum computed by
        the encoder (``layout.encode_hashed``) while the fragments were in cache."""
        sl = self._slots(key, ns, p, write=True)
        if p.kind != "ec":
            return [(m, key, value, None) for m, _ in sl]
        fk = fragment_key(key)
        return [(m, lap_key(fk, lap), (head, body), csum)
                for (m, lap), (head, body, csum) in zip(sl, encode_hashed(p, value, self.min_ec_size))]

    def _round_writes(self, chunk: list, ns: str, p: Policy) -> list[list[tuple]]:
        """``_writes`` of each object of one encode round."""
        return [self._writes(kb, v, ns, p) for kb, v in chunk]

    def _batch_put_once(self, items, ns: str, overwrite: bool) -> list[bool]:
        p = self.policy(ns)
        jobs: list[tuple[Member, list]] = []  # one batch_put each; a node has one per round
        sums: list[list] = []  # per job, each item's value checksum (None: hashed when sent)
        futs: list = []
        owners: list[list[tuple[int, int]]] = []  # per object: (job, item) of each record
        per_round = len(items)
        if p.kind == "ec" and items:
            tune_malloc()  # once per process: pyeclib's fragments (layout.tune_malloc)
            per_round = max(1, ENCODE_ROUND_BYTES // max(1, len(items[0][1])))
        fan = _Fanout(self, ns, overwrite) if self.fanout_puts and items else None
        rounds = [items[s:s + per_round] for s in range(0, len(items), per_round)]
        # the fanned-out put encodes each EC round after the first on the pool while the
        # calling thread sends the round before (see the module docstring)
        ahead_on = fan is not None and p.kind == "ec" and len(rounds) > 1
        ahead = None  # Future: the next round's records
        try:
            for r, chunk in enumerate(rounds):
                if ahead is None:
                    recs = self._round_writes(chunk, ns, p)
                else:
                    fan.pump_until(ahead)
                    recs, ahead = ahead.result(), None
                if ahead_on and r + 1 < len(rounds):
                    ahead = fan.encode_ahead(self._round_writes, rounds[r + 1], ns, p)
                first_job = len(jobs)
                at: dict[str, int] = {}
                for writes in recs:
                    where = []
                    for m, sk, rec, csum in writes:
                        j = at.get(m.node_id)
                        if j is None:
                            j = at[m.node_id] = len(jobs)
                            jobs.append((m, []))
                            sums.append([])
                        its = jobs[j][1]
                        where.append((j, len(its)))
                        its.append((sk, rec))
                        sums[j].append(csum)
                    owners.append(where)
                if fan is None:
                    futs += [self._pool.submit(self._put_records, m, its, ns, overwrite)
                             for m, its in jobs[first_job:]]
                else:
                    futs += [fan.add(m, its, sums[j]) for j, (m, its) in enumerate(jobs[first_job:], first_job)]
                    fan.pump()  # what the sockets take now; then more while the next round is encoded
            if fan is not None:
                fan.finish()
        except BaseException:
            # encoding (or placement) failed mid-batch: the rounds already sent are undone
            if fan is not None:
                fan.finish()
            self._settle(jobs[:len(futs)], futs, ns, owners, undo=True)
            raise
        finally:
            if fan is not None:
                fan.close(ahead)
        res = self._settle(jobs, futs, ns, owners)
        return [any(res[j][i] for j, i in where) for where in owners]

    def _settle(self, jobs: list[tuple[Member, list]], futs: list, ns: str,
                owners: list[list[tuple[int, int]]], undo: bool = False) -> list[list[bool]]:
        """Wait for every job; all must succeed (W = all). On a failure (or ``undo``) the
        items newly stored by this call are deleted best effort, but those of objects a
        node held already (``owners``: each object's (job, item) records; see the module
        docstring), and the first error is raised (a Redirect first: the caller re-routes)."""
        wait(futs)
        results, first = [], None
        for (m, _items), f in zip(jobs, futs):
            e = f.exception()
            if e is not None:
                if first is None or (isinstance(e, errors.Redirect) and not isinstance(first[0], errors.Redirect)):
                    first = (e, m)
                results.append(None)
            else:
                results.append(f.result())
        if first is None and not undo:
            return results
        kept = set()  # (job, item): records of an object some node answered it held already
        for where in owners:
            if any(j < len(results) and results[j] is not None and not results[j][i]
                   for j, i in where):
                kept.update(where)
        for j, ((m, items), r) in enumerate(zip(jobs, results)):
            if r is not None:
                fresh = [k for i, ((k, _v), stored) in enumerate(zip(items, r))
                         if stored and (j, i) not in kept]
                if fresh:
                    try:  # exactly what this call wrote, where it wrote it: no redirect
                        self._node(m, "delete", fresh, namespace=ns, check_epoch=False)
                    except errors.KVStoreError:
                        pass
        if first is None:
            return results  # undo after an encoding failure: the caller raises that
        e, m = first
        raise type(e)(f"put not acknowledged: node {m.node_id} ({m.address}) failed: {e}") from e

    def _put_records(self, m: Member, items: list, ns: str, overwrite: bool) -> list[bool]:
        """batch_put on one node. A Conflict on an EC record whose stored record belongs to
        the same object (same length, checksum, K and M: another fragment index left by an
        earlier attempt whose undo did not reach this node) is resolved by overwriting it;
        any other Conflict stands."""
        try:
            return self._node(m, "batch_put", items, namespace=ns, overwrite=overwrite)
        except errors.Conflict:
            if overwrite or not all(_head(v) for _k, v in items):
                raise
        out = []
        for k, v in items:
            try:
                out.append(self._node(m, "put", k, v, namespace=ns))
                continue
            except errors.Conflict as conflict:
                try:  # rare path: read the stored record (read scope, not admin)
                    theirs = parse_head(bytes(self._node(m, "get", k, namespace=ns)[:FRAG_HEADER.size]))
                except errors.KVStoreError:
                    raise conflict from None
                mine = _head(v)
                if theirs is None or theirs[4:6] != mine[4:6] or theirs[8:10] != mine[8:10]:
                    raise
            out.append(self._node(m, "put", k, v, namespace=ns, overwrite=True))
        return out


class _Fanout:
    """One batch put's requests to every node, sent from the calling thread.

    The thread-pool path gives each node's batch to a worker thread that sends it and
    waits for the answers. On few cores its cost is the GIL passing between those threads
    and the thread encoding the next round (a futex wake-up and a context switch each
    time), more than the sending. Here the calling thread writes each node's requests into
    its connection (this thread's channel of that node's Client) with non-blocking
    ``sendmsg``: as much as each socket takes after every encoded round, the rest once the
    last round is encoded (``poll`` for room, the node timeout as the deadline); then it
    reads every node's answers.

    A node whose channel cannot take this (TLS, a transport that moves large objects
    outside the frames) gets its batch on the thread pool, as does a node whose
    connection breaks here (dropped and retried there once, as ``Client`` retries a
    broken connection) or that answers Conflict (``Writes._put_records`` sorts that out).
    Every job gets a Future, so ``Writes._settle`` sees one kind of result.
    """

    def __init__(self, writes: Writes, ns: str, overwrite: bool):
        self.w = writes
        self.ns = ns
        self.nsb = namespace_bytes(ns)
        self.overwrite = overwrite
        self.nodes: dict[str, _NodeSend] = {}
        self._wake: tuple[int, int] | None = None  # encode_ahead's pipe (read end, write end)

    def add(self, m: Member, items: list, sums: list | None = None) -> Future:
        """Queue one job (a node's records of one round); returns its Future. ``sums``:
        each item's value checksum, known for EC records ((header, payload) values, sent
        as they are, not hashed again); None entries are hashed here."""
        f: Future = Future()
        st = self.nodes.get(m.node_id)
        if st is None:
            st = self.nodes[m.node_id] = _NodeSend(m, self.w.client(m), self._channel(m))
        if st.conn is None:  # no channel for this: the thread pool's path
            self._on_pool(f, m, items)
            return f
        try:
            if sums is not None and None not in sums:
                hashed = True
                prepared = [(k, v[0], v[1], s) for (k, v), s in zip(items, sums)]
                sizes = [len(h) + len(b) for _k, h, b, _s in prepared]
            else:
                hashed = False
                prepared = []
                for k, v in items:
                    parts, n = value_parts(v)
                    prepared.append((k, parts, n))
                sizes = [n for _k, _p, n in prepared]
            st.client._check_size(max(sizes))
            if not st.conn.frames_put(sizes):
                self._on_pool(f, m, items)
                return f
        except errors.KVStoreError as e:
            f.set_exception(e)
            return f
        if len(st.order) + len(prepared) > FANOUT_WINDOW and st.jobs:
            self._drain(st)  # answers first: the daemon bounds unanswered requests too
            if st.conn is None:
                self._on_pool(f, m, items)
                return f
        first = len(st.order)
        if hashed:  # frame headers are small bytes objects: sendmsg takes them as they are
            st.out += st.conn.put_frames_hashed(self.nsb, prepared, self.overwrite, st.order)
        else:
            st.out += [memoryview(b) for b in st.conn.put_frames(self.nsb, prepared, self.overwrite, st.order)]
        st.jobs.append((f, items, first, len(st.order)))
        return f

    def _channel(self, m: Member):
        """This thread's channel of the node, if it can take non-blocking sends; None means
        the thread pool's path (which also reports a node that is down or unreachable)."""
        if self.w._is_down(m):
            return None
        try:
            conn = self.w.client(m)._channel_here()
        except (errors.KVStoreError, OSError):
            return None  # the pool's path tries again and reports it (and marks the node down)
        return conn if getattr(conn, "nonblocking_send", False) else None

    def _on_pool(self, f: Future, m: Member, items: list) -> None:
        self.w.pooled_put_jobs += 1
        pf = self.w._pool.submit(self.w._put_records, m, items, self.ns, self.overwrite)
        pf.add_done_callback(lambda pf: _copy_outcome(pf, f))

    def encode_ahead(self, fn, *args) -> Future:
        """``fn(*args)`` (the next round's records) on the pool; its end is written to a
        pipe (one byte per call, always, before the Future is done) that ``pump_until``
        waits on beside the sockets."""
        if self._wake is None:
            self._wake = os.pipe()
        wfd = self._wake[1]

        def run():
            try:
                return fn(*args)
            finally:
                os.write(wfd, b"\0")
        return self.w._pool.submit(run)

    def pump_until(self, fut: Future) -> None:
        """Send what the sockets take while ``fut`` (from ``encode_ahead``) runs: ``poll``
        for room on the sockets with requests queued and for the pipe; returns once the
        pipe's byte is read (``fut`` is then done) or ``fut`` was cancelled. A socket
        that takes nothing within the node timeout is left to ``finish``."""
        rfd = self._wake[0]
        deadline = time.monotonic() + self.w.node_timeout
        while True:
            left = deadline - time.monotonic()
            waiting = {st.conn.sock.fileno(): st for st in self.nodes.values()
                       if st.out and st.conn is not None} if left > 0 else {}
            p = select.poll()
            p.register(rfd, select.POLLIN)
            for fd in waiting:
                p.register(fd, select.POLLOUT)
            done = False
            for fd, ev in p.poll(left * 1000 if waiting else 1000):
                if fd == rfd:
                    done = True
                elif ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                    self._broken(waiting[fd])
            if done:
                os.read(rfd, 1)
                return
            if fut.cancelled():  # the pool was shut down (the client closed): no byte comes
                return
            self.pump()

    def close(self, ahead: Future | None) -> None:
        """Release the pipe, once no encode submitted here can still write to it."""
        if self._wake is None:
            return
        if ahead is not None and not ahead.cancel():
            wait([ahead])
        for fd in self._wake:
            os.close(fd)
        self._wake = None

    def pump(self) -> None:
        """Send what every socket takes now, without blocking."""
        for st in self.nodes.values():
            if st.out and st.conn is not None:
                try:
                    st.conn.send_some(st.out)
                except OSError:
                    self._broken(st)

    def finish(self) -> None:
        """Send the rest and read every answer; every job's Future is then set (or handed
        to the thread pool)."""
        deadline = time.monotonic() + self.w.node_timeout
        while True:
            self.pump()
            waiting = {st.conn.sock.fileno(): st for st in self.nodes.values() if st.out and st.conn is not None}
            if not waiting:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                for st in waiting.values():
                    self._failed(st, errors.Timeout(
                        f"node {st.m.node_id} did not take the batch's requests within "
                        f"{self.w.node_timeout}s"), drop=True)
                break
            p = select.poll()
            for fd in waiting:
                p.register(fd, select.POLLOUT)
            for fd, ev in p.poll(left * 1000):
                if ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                    self._broken(waiting[fd])
        for st in self.nodes.values():
            if st.jobs:
                self._drain(st)

    def _drain(self, st: "_NodeSend") -> None:
        """Send the node's queued requests (blocking) and read all their answers."""
        conn = st.conn
        try:
            if st.out:
                conn.send(st.out)
                st.out.clear()
            results = conn.put_answers(dict(st.order))
        except errors.Conflict:
            self._retry_on_pool(st)  # another fragment of the same object, or a real Conflict
            return
        except (socket.timeout, BlockingIOError):
            self._failed(st, errors.Timeout(f"no answer from kvstored within {st.client.timeout}s"), drop=True)
            return
        except (errors.ProtocolError, errors.Timeout) as e:
            self._failed(st, e, drop=True)
            return
        except OSError:
            self._broken(st)
            return
        except errors.KVStoreError as e:
            self._failed(st, e)
            return
        for f, _items, a, b in st.jobs:
            f.set_result(results[a:b])
        st.jobs.clear()
        st.order.clear()

    def _broken(self, st: "_NodeSend") -> None:
        """The connection failed under this batch: drop it, send the node's jobs again on
        the thread pool (a new connection; puts are idempotent)."""
        st.client._drop(st.conn)
        self._retry_on_pool(st)
        st.conn = None

    def _retry_on_pool(self, st: "_NodeSend") -> None:
        for f, items, _a, _b in st.jobs:
            self._on_pool(f, st.m, items)
        st.jobs.clear()
        st.order.clear()
        st.out.clear()

    def _failed(self, st: "_NodeSend", e: Exception, drop: bool = False) -> None:
        """The node's jobs fail with ``e``; an Unavailable (a Timeout too) marks the node
        down, as ``MemberView._node`` does, so the batch is written again without it."""
        if isinstance(e, errors.Unavailable) and not isinstance(e, errors.Redirect):
            self.w._mark_down(st.m)
        if drop and st.conn is not None:
            st.client._drop(st.conn)
            st.conn = None
        for f, _items, _a, _b in st.jobs:
            f.set_exception(e)
        st.jobs.clear()
        st.order.clear()
        st.out.clear()


class _NodeSend:
    """One node's part of a fanned-out batch put."""

    __slots__ = ("m", "conn", "client", "out", "order", "jobs")

    def __init__(self, m: Member, client, conn):
        self.m = m
        self.client = client
        self.conn = conn
        self.out: list = []  # memoryviews not yet sent
        self.order: dict[int, int] = {}  # request id -> index among the queued requests
        self.jobs: list = []  # (Future, items, first index, end index)


def _copy_outcome(src: Future, dst: Future) -> None:
    e = src.exception()
    if e is None:
        dst.set_result(src.result())
    else:
        dst.set_exception(e)
