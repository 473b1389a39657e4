"""ClusterClient's put path: every copy or EC record of a batch written to its slot, one
pipelined batch_put per node, all nodes in parallel, acknowledged when all are stored.

EC records go out as two buffers, header and fragment (``layout.encode_parts``), a value
the node's Client sends gathered and the node stores as their concatenation: the fragment
the encoder returned is never copied behind a header. A batch of EC objects is encoded in
rounds of about ``ENCODE_ROUND_BYTES``, each round's records sent while the next round is
encoded (layout's encoder lets go of the GIL where liberasurecode is reachable through
ctypes; pyeclib's own encode holds it).

Partial failure: the records this call newly stored are deleted best effort and the
error is raised; objects are immutable and a repeated put of the same bytes is a no-op,
so retrying is idempotent.
"""
from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import wait

from .. import errors
from .._common import as_bytes_view
from ..layout import FRAG_HEADER, Policy, encode_parts, fragment_key, lap_key, parse_head, tune_malloc
from ..placement import Member
from ..wire import key_bytes

ENCODE_ROUND_BYTES = 8 << 20  # user bytes encoded before their records are sent


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

    def _writes(self, key: bytes, value: memoryview, ns: str, p: Policy) -> list[tuple[Member, bytes, object]]:
        """(member, stored key, value) of every record of one object."""
        sl = self._slots(key, ns, p, write=True)
        if p.kind != "ec":
            return [(m, key, value) for m, _ in sl]
        fk = fragment_key(key)
        return [(m, lap_key(fk, lap), parts)
                for (m, lap), parts in zip(sl, encode_parts(p, value, self.min_ec_size))]

    def _batch_put_once(self, items, ns: str, overwrite: bool) -> list[bool]:
        p = self.policy(ns)
        jobs: list[tuple[Member, list]] = []  # one batch_put each; a node has one per round
        futs: list = []
        owners: list[list[tuple[int, int]]] = []  # per object: (job, item) of each record
        per_round = len(items)
        if p.kind == "ec" and items:
            tune_malloc()  # once per process: pyeclib's fragments (layout.tune_malloc)
            per_round = max(1, ENCODE_ROUND_BYTES // max(1, len(items[0][1])))
        try:
            for s in range(0, len(items), per_round):
                first_job = len(jobs)
                at: dict[str, int] = {}
                for kb, v in items[s:s + per_round]:
                    where = []
                    for m, sk, rec in self._writes(kb, v, ns, p):
                        j = at.get(m.node_id)
                        if j is None:
                            j = at[m.node_id] = len(jobs)
                            jobs.append((m, []))
                        where.append((j, len(jobs[j][1])))
                        jobs[j][1].append((sk, rec))
                    owners.append(where)
                futs += [self._pool.submit(self._put_records, m, its, ns, overwrite)
                         for m, its in jobs[first_job:]]
        except BaseException:
            # encoding (or placement) failed mid-batch: the rounds already sent are undone
            self._settle(jobs[:len(futs)], futs, ns, undo=True)
            raise
        res = self._settle(jobs, futs, ns)
        return [any(res[j][i] for j, i in where) for where in owners]

    def _settle(self, jobs: list[tuple[Member, list]], futs: list, ns: str,
                undo: bool = False) -> list[list[bool]]:
        """Wait for every job; all must succeed (W = all). On a failure (or ``undo``) the
        items newly stored by this call are deleted best effort and the first error is
        raised (a Redirect first: the caller re-routes)."""
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
        for (m, items), r in zip(jobs, results):
            if r is not None:
                fresh = [k for (k, _v), stored in zip(items, r) if stored]
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
