"""The staged pipeline, written once for both clients: every transfer is a generator
("plan") that yields the network steps it needs (``_Put``, ``_Get``, ``_Views``,
``_Wait``); ``_drive`` runs it on a ``Client``, ``_adrive`` on an ``AsyncClient``.
``_staged_put`` / ``_staged_get`` move chunks of objects through two staging slots
so that packing (or unpacking) chunk i+1 overlaps the network transfer of chunk i.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any, Iterable, NamedTuple

from .. import errors
from .hostmem import _host_view
from .register import register_host_memory
from .staging import StagingPool, _align
from .streams import _Copier


class _Put(NamedTuple):
    items: list  # [(key bytes, buffer)]
    namespace: str | None
    overwrite: bool


class _Get(NamedTuple):
    keys: list
    buffers: list
    namespace: str | None


class _Views(NamedTuple):
    keys: list
    namespace: str | None


class _Wait(NamedTuple):
    handle: Any  # a torch.cuda.Event or a concurrent.futures.Future


def _take_views(client, keys, namespace) -> list:
    out = []
    try:
        for k in keys:
            out.append(client.get_view(k, namespace=namespace))
    except BaseException:
        _release_views(out)
        raise
    return out


def _release_views(views) -> None:
    for v in views or ():
        try:
            v.release()
        except Exception:  # the connection is gone: the daemon drops its leases by itself
            pass


def _execute(client, op):
    if isinstance(op, _Put):
        return client.batch_put(op.items, namespace=op.namespace, overwrite=op.overwrite)
    if isinstance(op, _Get):
        return client.batch_get_into(op.keys, op.buffers, namespace=op.namespace)
    if isinstance(op, _Views):
        return _take_views(client, op.keys, op.namespace)
    if isinstance(op, _Wait):
        if isinstance(op.handle, concurrent.futures.Future):
            return op.handle.result()
        op.handle.synchronize()
        return None
    raise AssertionError(op)


async def _aexecute(client, op):
    if isinstance(op, _Put):
        return await client.batch_put(op.items, namespace=op.namespace, overwrite=op.overwrite)
    if isinstance(op, _Get):
        return await client.batch_get_into(op.keys, op.buffers, namespace=op.namespace)
    if isinstance(op, _Wait):
        if isinstance(op.handle, concurrent.futures.Future):
            return await asyncio.wrap_future(op.handle)
        if not op.handle.query():
            await asyncio.to_thread(op.handle.synchronize)
        return None
    raise AssertionError(op)


def _drive(client, plan):
    try:
        value, exc = None, None
        while True:
            try:
                op = plan.throw(exc) if exc is not None else plan.send(value)
            except StopIteration as stop:
                return stop.value
            value, exc = None, None
            try:
                value = _execute(client, op)
            except BaseException as e:  # handed to the plan, whose cleanup runs; it re-raises
                exc = e
    finally:
        plan.close()


async def _adrive(client, plan):
    try:
        value, exc = None, None
        while True:
            try:
                op = plan.throw(exc) if exc is not None else plan.send(value)
            except StopIteration as stop:
                return stop.value
            value, exc = None, None
            try:
                value = await _aexecute(client, op)
            except BaseException as e:
                exc = e
    finally:
        plan.close()


def _check_received(keys, got, sizes, what) -> None:
    for k, n, want, w in zip(keys, got, sizes, what):
        if n != want:
            raise errors.InvalidArgument(
                f"object {bytes(k)!r} holds {n} bytes but {w} needs exactly {want}")


class _Chunk:
    """Objects moved together through one staging slot: ``offsets`` into the slot,
    ``pack(slot)`` fills it for a put, ``unpack(slot)`` empties it after a get."""

    __slots__ = ("keys", "sizes", "offsets", "what", "nbytes", "pack", "unpack", "unpack_views")

    def __init__(self, keys, sizes, what, pack=None, unpack=None, unpack_views=None, offsets=None):
        self.keys, self.sizes, self.what = keys, sizes, what
        if offsets is None:
            offsets, off = [], 0
            for n in sizes:
                offsets.append(off)
                off += _align(n)
        self.offsets = offsets
        self.nbytes = _align(max((o + n for o, n in zip(offsets, sizes)), default=0))
        self.pack, self.unpack, self.unpack_views = pack, unpack, unpack_views


def _staged_put(chunks: list[_Chunk], namespace, overwrite, pool: StagingPool, device):
    """Plan: for each chunk, pack into a staging slot, then batch_put from it. With more
    than one chunk, two slots: chunk i+1 is packed (copied off the GPU on the side
    stream, or gathered by a worker thread on CPU) while chunk i is on the network."""
    out: list = []
    if not chunks:
        return out
    size = max(c.nbytes for c in chunks)
    nslots = 2 if len(chunks) > 1 else 1
    with pool.lease(size * nslots, pinned=True if device is not None else None) as host:
        copier = _Copier(device, overlap=nslots > 1)
        try:
            hv = _host_view(host)

            def fill(ci: int):
                base = (ci % nslots) * size
                return copier.run(lambda: chunks[ci].pack(host[base:base + size]))

            pending = fill(0)
            for ci, ch in enumerate(chunks):
                if pending is not None:
                    yield _Wait(pending)
                # slot (ci+1) % 2 was last sent as chunk ci-1, whose put has returned
                pending = fill(ci + 1) if ci + 1 < len(chunks) else None
                base = (ci % nslots) * size
                items = [(k, hv[base + o:base + o + n]) for k, o, n in zip(ch.keys, ch.offsets, ch.sizes)]
                out += yield _Put(items, namespace, overwrite)
        finally:
            copier.drain()  # no copy may still target a slot when it goes back to the pool
    return out


def _staged_get(chunks: list[_Chunk], namespace, pool: StagingPool, device, views: bool = False):
    """Plan: for each chunk, batch_get_into a staging slot, check every size, then unpack.
    With more than one chunk, two slots: chunk i is received while chunk i-1 is
    unpacked (to the GPU on the side stream, or scattered by a worker thread on CPU).
    With ``views`` (shm), each object is read in place in the daemon's arena instead."""
    if not chunks:
        return
    if views:
        yield from _view_get(chunks, namespace, device)
        return
    size = max(c.nbytes for c in chunks)
    nslots = 2 if len(chunks) > 1 else 1
    with pool.lease(size * nslots, pinned=True if device is not None else None) as host:
        copier = _Copier(device, overlap=nslots > 1)
        try:
            hv = _host_view(host)
            pending: list = [None] * nslots
            for ci, ch in enumerate(chunks):
                s = ci % nslots
                if pending[s] is not None:  # the unpack of chunk ci-2 is done with this slot
                    h, pending[s] = pending[s], None
                    yield _Wait(h)
                base = s * size
                bufs = [hv[base + o:base + o + n] for o, n in zip(ch.offsets, ch.sizes)]
                got = yield _Get(ch.keys, bufs, namespace)
                _check_received(ch.keys, got, ch.sizes, ch.what)
                pending[s] = copier.run(lambda ch=ch, base=base: ch.unpack(host[base:base + size]))
            for h in pending:
                if h is not None:
                    yield _Wait(h)
        finally:
            copier.drain()


def _view_get(chunks: list[_Chunk], namespace, device):
    """shm path: lease each chunk's objects as views of the arena and copy from there."""
    copier = _Copier(device)
    held = None
    try:
        for ch in chunks:
            held = yield _Views(ch.keys, namespace)
            _check_received(ch.keys, [len(v) for v in held], ch.sizes, ch.what)
            if device is not None:
                for v in held:  # the arena mapping (once): the GPU copies straight out of it
                    register_host_memory(v.view.obj)
            done = copier.run(lambda ch=ch, held=held: ch.unpack_views([v.view for v in held]))
            if done is not None:
                yield _Wait(done)  # the copies out of the arena are done: leases can go
            _release_views(held)
            held = None
    finally:
        copier.drain()
        _release_views(held)


def _check_limit(sizes: Iterable[int], limit: int) -> None:
    for n in sizes:
        if n > limit:
            raise errors.InvalidArgument(f"value of {n} bytes exceeds the daemon's max_value_size {limit}")


def _use_views(client) -> bool:
    """The client reads objects in place in the daemon's memory: its data channel
    declares zero-copy gets (kvstore.channel; the same-host shm path). A client without
    that property (ClusterClient) copies."""
    try:
        return bool(getattr(client, "zero_copy_get", False))
    except errors.KVStoreError:
        return False
