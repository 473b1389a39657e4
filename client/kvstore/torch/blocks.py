"""Put and get of paged KV blocks: block ids and keys checked, blocks grouped into chunks
(at most ``pool.chunk_bytes``, at least 4 chunks when there are that many blocks), each
chunk gathered into / scattered from a staging slot (through device scratch on CUDA)
by the pipeline of plans.py.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from .. import errors
from ..wire import key_bytes
from .hostmem import _read_tensor
from .layout import KVLayout
from .plans import _adrive, _check_limit, _Chunk, _drive, _staged_get, _staged_put, _use_views
from .staging import StagingPool, default_pool


def _block_args(layout, keys, block_ids, *, destination: bool):
    if not isinstance(layout, KVLayout):
        raise errors.InvalidArgument(f"layout must be a KVLayout, not {type(layout).__name__}")
    if isinstance(keys, (bytes, str)):
        raise errors.InvalidArgument("pass a list of keys, not a single key")
    ks = [key_bytes(k) for k in keys]
    if isinstance(block_ids, torch.Tensor):
        if block_ids.dim() != 1 or block_ids.dtype.is_floating_point or block_ids.dtype == torch.bool:
            raise errors.InvalidArgument("block_ids must be a 1-D integer tensor or a sequence of ints")
        ids = block_ids.tolist()
    else:
        ids = list(block_ids)
    if len(ks) != len(ids):
        raise errors.InvalidArgument(f"{len(ks)} keys but {len(ids)} block ids")
    for b in ids:
        if isinstance(b, bool) or not isinstance(b, int):
            raise errors.InvalidArgument(f"block id {b!r} is not an int")
        if not 0 <= b < layout.num_blocks:
            raise errors.InvalidArgument(f"block id {b} out of range: the layout has {layout.num_blocks} blocks")
    if destination and len(set(ids)) != len(ids):
        seen, dup = set(), None
        for b in ids:
            if b in seen:
                dup = b
                break
            seen.add(b)
        raise errors.InvalidArgument(f"block id {dup} appears twice as a destination")
    return ks, ids


def _block_chunks(layout: KVLayout, ks, ids, per: int, scratch) -> list[_Chunk]:
    bn = layout.block_nbytes
    cuda = layout.device.type == "cuda"
    out = []
    for s in range(0, len(ids), per):
        cids = ids[s:s + per]
        n = len(cids)
        c = _Chunk(ks[s:s + per], [bn] * n, [f"block {b}" for b in cids],
                   offsets=[i * bn for i in range(n)])

        if cuda:
            def pack(slot, cids=cids, n=n):
                dev = scratch[:n * bn]
                layout.gather_into(cids, dev)
                slot[:n * bn].copy_(dev, non_blocking=True)

            def unpack(slot, cids=cids, n=n):
                dev = scratch[:n * bn]
                dev.copy_(slot[:n * bn], non_blocking=True)
                layout.scatter_from(cids, dev)

            def unpack_views(views, cids=cids, n=n):
                dev = scratch[:n * bn]
                for i, v in enumerate(views):  # DMA straight out of the registered arena
                    dev[i * bn:(i + 1) * bn].copy_(_read_tensor(v), non_blocking=True)
                layout.scatter_from(cids, dev)
        else:
            def pack(slot, cids=cids):
                layout.gather_into(cids, slot)

            def unpack(slot, cids=cids):
                layout.scatter_from(cids, slot)

            def unpack_views(views, cids=cids):
                layout.scatter_views(cids, views)
        c.pack, c.unpack, c.unpack_views = pack, unpack, unpack_views
        out.append(c)
    return out


@contextmanager
def _scratch(layout: KVLayout, pool: StagingPool, per: int, count: int):
    """Device scratch for one chunk (CUDA layouts only)."""
    if layout.device.type != "cuda":
        yield None
        return
    with pool.lease(min(per, count) * layout.block_nbytes, device=layout.device) as s:
        yield s


def _blocks_per_chunk(layout: KVLayout, pool: StagingPool, count: int) -> int:
    """At most ``pool.chunk_bytes`` per chunk, and at least 4 chunks when there are that
    many blocks, so that packing and the network overlap even in small calls."""
    return max(1, min(pool.chunk_bytes // layout.block_nbytes, -(-count // 4)))


def _put_blocks_plan(layout: KVLayout, ks, ids, namespace, overwrite, pool: StagingPool):
    per = _blocks_per_chunk(layout, pool, len(ids))
    with _scratch(layout, pool, per, len(ids)) as scratch:
        chunks = _block_chunks(layout, ks, ids, per, scratch)
        device = layout.device if layout.device.type == "cuda" else None
        return (yield from _staged_put(chunks, namespace, overwrite, pool, device))


def _get_blocks_plan(layout: KVLayout, ks, ids, namespace, pool: StagingPool, views: bool):
    per = _blocks_per_chunk(layout, pool, len(ids))
    with _scratch(layout, pool, per, len(ids)) as scratch:
        chunks = _block_chunks(layout, ks, ids, per, scratch)
        device = layout.device if layout.device.type == "cuda" else None
        yield from _staged_get(chunks, namespace, pool, device, views=views)


def put_blocks(client, layout: KVLayout, keys, block_ids, *, namespace: str | None = None,
               overwrite: bool = False, pool: StagingPool | None = None) -> list[bool]:
    """Store block ``block_ids[i]`` of ``layout`` (all layers, K and V, in the documented
    object order) as object ``keys[i]``; one bool per key (False: already stored).

    Blocks are gathered a chunk at a time into a reused staging buffer and sent with
    ``client.batch_put``. Arguments are checked before anything is sent: equal counts,
    ids in range, ``block_nbytes`` within the daemon's ``max_value_size``. A block id may
    appear more than once (under different keys)."""
    ks, ids = _block_args(layout, keys, block_ids, destination=False)
    if not ids:
        return []
    _check_limit([layout.block_nbytes], client.info().max_value_size)
    return _drive(client, _put_blocks_plan(layout, ks, ids, namespace, overwrite, pool or default_pool()))


def get_blocks(client, layout: KVLayout, keys, block_ids, *, namespace: str | None = None,
               pool: StagingPool | None = None) -> None:
    """Receive objects ``keys[i]`` into block ``block_ids[i]`` of ``layout``.

    Checked before anything moves: equal counts, ids in range, no destination id twice.
    Objects arrive a chunk at a time into staging (or, on the shm path, are read in
    place in the daemon's arena); each is checked to be exactly ``block_nbytes`` before
    its chunk is scattered. On an error (NotFound, a size mismatch...) the blocks of
    chunks before the failing one have been written; treat every destination block as
    undefined then."""
    ks, ids = _block_args(layout, keys, block_ids, destination=True)
    if not ids:
        return
    _drive(client, _get_blocks_plan(layout, ks, ids, namespace, pool or default_pool(), _use_views(client)))


async def aput_blocks(client, layout: KVLayout, keys, block_ids, *, namespace: str | None = None,
                      overwrite: bool = False, pool: StagingPool | None = None) -> list[bool]:
    """``put_blocks`` for a ``kvstore.AsyncClient``."""
    ks, ids = _block_args(layout, keys, block_ids, destination=False)
    if not ids:
        return []
    _check_limit([layout.block_nbytes], (await client.info()).max_value_size)
    return await _adrive(client, _put_blocks_plan(layout, ks, ids, namespace, overwrite, pool or default_pool()))


async def aget_blocks(client, layout: KVLayout, keys, block_ids, *, namespace: str | None = None,
                      pool: StagingPool | None = None) -> None:
    """``get_blocks`` for a ``kvstore.AsyncClient``."""
    ks, ids = _block_args(layout, keys, block_ids, destination=True)
    if not ids:
        return
    await _adrive(client, _get_blocks_plan(layout, ks, ids, namespace, pool or default_pool(), False))
