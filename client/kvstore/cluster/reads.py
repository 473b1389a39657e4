"""ClusterClient's read path: get / batch_get, and get_into / batch_get_into, which put
the object straight into the caller's buffer.

Replicated objects: the first healthy copy (a node that does not answer, or answers
NotFound or ChecksumMismatch, is followed by the next); ``*_into`` receives the bytes
into the caller's buffer on the socket. EC objects: the first K slots in parallel,
assembled (``layout.assemble``: concatenated when they hold data fragments 0..K-1,
decoded otherwise); a missing, slow (``fragment_timeout``) or corrupt record turns the
read into a degraded one that fetches the other slots too. ``*_into`` assembles into the
caller's buffer, so no object-sized intermediate is made on the concatenate path.

A buffer too small for its object is an InvalidArgument (the object's size in the
message); a batch's other buffers may have been filled by then.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, wait

from .. import errors
from .._common import writable_view
from ..layout import Policy, assemble, fragment_key, lap_key, tune_malloc
from ..placement import Member
from ..wire import key_bytes


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

    def _get_replica(self, key: bytes, ns: str, sl: list[tuple[Member, int]], out=None):
        """The first healthy copy (into ``out`` when given: then its size)."""
        now = time.monotonic()
        order = sorted((m for m, _ in sl), key=lambda m: self._down.get(m.node_id, 0) > now)
        errs = []
        for m in order:
            try:
                if out is None:
                    return self._node(m, "get", key, namespace=ns)
                return self._node(m, "get_into", key, out, namespace=ns)
            except errors.Redirect:
                raise
            except (errors.NotFound, errors.Unavailable, errors.ChecksumMismatch) as e:
                errs.append(e)
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
        futs = []
        for m, items in per_node.values():
            sks = [sk for _j, _w, sk in items]
            if outs is not None and p.kind != "ec":  # straight into the caller's buffers
                f = self._submit(m, "batch_get_into", sks, [outs[j] for j, _w, _sk in items], namespace=ns)
            else:
                f = self._submit(m, "batch_get", sks, namespace=ns)
            futs.append((items, f))
        wait([f for _, f in futs])
        got: list[dict] = [{} for _ in ks]
        for items, f in futs:
            e = f.exception()
            if isinstance(e, (errors.Redirect, errors.InvalidArgument)):
                raise e  # re-route; or a buffer too small for its object
            if e is None:
                for (j, where, _sk), buf in zip(items, f.result()):
                    got[j][where] = buf
        out = []
        for j, k in enumerate(ks):
            dest = None if outs is None else outs[j]
            if p.kind != "ec":
                out.append(got[j][next(iter(got[j]))] if got[j] else self._get_replica(k, ns, sls[j], dest))
                continue
            r = assemble(p, list(got[j].values()), dest) if got[j] else None
            out.append(r if r is not None else self._get_ec(k, ns, p, got[j], dest))
        return out
