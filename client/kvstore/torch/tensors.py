"""Put and get of whole tensors: checks (a dense cpu or cuda tensor, one CUDA device per
call, sizes within the daemon's limit), contiguous CPU tensors sent from / received into
their own memory, the rest staged in chunks through the pipeline of plans.py.
"""
from __future__ import annotations

from typing import Iterable

import torch

from .. import errors
from ..wire import key_bytes
from .hostmem import _host_view, _read_tensor
from .plans import (_adrive, _check_limit, _check_received, _Chunk, _drive, _Get, _Put,
                    _staged_get, _staged_put, _use_views)
from .staging import StagingPool, _align, default_pool


def _tensor(t, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise errors.InvalidArgument(f"{what} must be a torch.Tensor, not {type(t).__name__}")
    if t.layout != torch.strided:
        raise errors.InvalidArgument(f"{what}: {t.layout} tensors are not supported (dense tensors only)")
    if t.is_quantized:
        raise errors.InvalidArgument(f"{what}: quantized tensors are not supported")
    if t.device.type not in ("cpu", "cuda"):
        raise errors.InvalidArgument(
            f"{what} is on device {t.device}; only cpu and cuda tensors can be transferred")
    return t.detach()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _direct(t: torch.Tensor) -> bool:
    """The tensor's own memory can be sent / received as is."""
    return t.device.type == "cpu" and t.is_contiguous() and not t.is_conj() and not t.is_neg()


def _describe(t: torch.Tensor) -> str:
    return f"the tensor ({str(t.dtype).replace('torch.', '')}, shape {tuple(t.shape)}, {t.device})"


def _one_cuda_device(tensors: Iterable[torch.Tensor]) -> torch.device | None:
    dev = None
    for t in tensors:
        if t.device.type == "cuda":
            d = t.device if t.device.index is not None else torch.device("cuda", torch.cuda.current_device())
            if dev is None:
                dev = d
            elif d != dev:
                raise errors.InvalidArgument(
                    f"tensors on {dev} and {d} in one call: use one CUDA device per call")
    return dev


def _tensor_chunks(keys: list[bytes], tensors: list[torch.Tensor], chunk_bytes: int) -> list[_Chunk]:
    """Group staged tensors into chunks of about ``chunk_bytes``."""
    chunks, cur = [], []
    total = 0
    for k, t in zip(keys, tensors):
        n = _align(_nbytes(t))
        if cur and total + n > chunk_bytes:
            chunks.append(cur)
            cur, total = [], 0
        cur.append((k, t))
        total += n
    if cur:
        chunks.append(cur)
    out = []
    for group in chunks:
        ks = [k for k, _ in group]
        ts = [t for _, t in group]
        c = _Chunk(ks, [_nbytes(t) for t in ts], [_describe(t) for t in ts])
        c.pack = _tensor_pack(ts, c.offsets)
        c.unpack = _tensor_unpack(ts, c.offsets)
        c.unpack_views = _tensor_unpack_views(ts)
        out.append(c)
    return out


def _typed(slot_u8: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``slot_u8`` (a uint8 slice) seen as a tensor shaped and typed like ``t``."""
    return slot_u8.view(t.dtype).view(t.shape)


def _tensor_pack(ts, offsets):
    def pack(slot: torch.Tensor) -> None:
        for t, o in zip(ts, offsets):
            n = _nbytes(t)
            if n:
                _typed(slot[o:o + n], t).copy_(t, non_blocking=t.device.type == "cuda")
    return pack


def _tensor_unpack(ts, offsets):
    def unpack(slot: torch.Tensor) -> None:
        for t, o in zip(ts, offsets):
            n = _nbytes(t)
            if n:
                t.copy_(_typed(slot[o:o + n], t), non_blocking=t.device.type == "cuda")
    return unpack


def _tensor_unpack_views(ts):
    def unpack(views) -> None:
        for t, v in zip(ts, views):
            if _nbytes(t):
                t.copy_(_typed(_read_tensor(v), t), non_blocking=t.device.type == "cuda")
    return unpack


def _prepare_tensors(keys, tensors, what: str, destination: bool = False):
    if isinstance(keys, (bytes, str)):
        raise errors.InvalidArgument("pass a list of keys, not a single key")
    keys = list(keys)
    tensors = list(tensors)
    if len(keys) != len(tensors):
        raise errors.InvalidArgument(f"{len(keys)} keys but {len(tensors)} tensors")
    ks = [key_bytes(k) for k in keys]
    ts = [_tensor(t, f"{what} {i}" if len(tensors) > 1 else what) for i, t in enumerate(tensors)]
    if destination:
        for i, t in enumerate(ts):
            if any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
                raise errors.InvalidArgument(
                    f"{what} {i}: an expanded view (elements sharing memory) cannot be filled")
    return ks, ts


def _put_tensors_plan(ks, ts, namespace, overwrite, pool: StagingPool):
    results: list = [None] * len(ts)
    direct = [i for i, t in enumerate(ts) if _direct(t)]
    staged = [i for i, t in enumerate(ts) if not _direct(t)]
    if direct:
        r = yield _Put([(ks[i], _host_view(ts[i])) for i in direct], namespace, overwrite)
        for i, x in zip(direct, r):
            results[i] = x
    if staged:
        device = _one_cuda_device(ts[i] for i in staged)
        chunks = _tensor_chunks([ks[i] for i in staged], [ts[i] for i in staged], pool.chunk_bytes)
        r = yield from _staged_put(chunks, namespace, overwrite, pool, device)
        for i, x in zip(staged, r):
            results[i] = x
    return results


def _get_tensors_plan(ks, ts, namespace, pool: StagingPool, views: bool):
    direct = [i for i, t in enumerate(ts) if _direct(t)]
    staged = [i for i, t in enumerate(ts) if not _direct(t)]
    if direct:
        dk = [ks[i] for i in direct]
        got = yield _Get(dk, [_host_view(ts[i]) for i in direct], namespace)
        _check_received(dk, got, [_nbytes(ts[i]) for i in direct], [_describe(ts[i]) for i in direct])
    if staged:
        device = _one_cuda_device(ts[i] for i in staged)
        chunks = _tensor_chunks([ks[i] for i in staged], [ts[i] for i in staged], pool.chunk_bytes)
        yield from _staged_get(chunks, namespace, pool, device, views=views)


def batch_put_tensors(client, items, *, namespace: str | None = None, overwrite: bool = False,
                      pool: StagingPool | None = None) -> list[bool]:
    """Put ``(key, tensor)`` pairs; one bool per pair (False: the identical object was
    already stored). Every pair is checked before anything is sent."""
    items = list(items)
    ks, ts = _prepare_tensors([k for k, _ in items], [t for _, t in items], "tensor")
    if not ts:
        return []
    _one_cuda_device(ts)
    _check_limit(map(_nbytes, ts), client.info().max_value_size)
    return _drive(client, _put_tensors_plan(ks, ts, namespace, overwrite, pool or default_pool()))


def put_tensor(client, key, tensor, *, namespace: str | None = None, overwrite: bool = False,
               pool: StagingPool | None = None) -> bool:
    """Store ``tensor``'s elements (row-major, no header) under ``key``. True if stored,
    False if the identical object was already there; Conflict if other bytes are
    (unless ``overwrite``)."""
    return batch_put_tensors(client, [(key, tensor)], namespace=namespace, overwrite=overwrite, pool=pool)[0]


def batch_get_tensors_into(client, keys, tensors, *, namespace: str | None = None,
                           pool: StagingPool | None = None) -> None:
    """Fill each tensor with its object; each object must be exactly the tensor's size.

    Raises NotFound, or InvalidArgument on a size mismatch, after every request of the
    batch was answered. A larger object is refused before its bytes are received; a CPU
    contiguous tensor receives in place, so a *shorter* object has been written into its
    first bytes when the error is raised (the size of an object is known only once it
    arrives). Staged tensors (CUDA, non-contiguous) are untouched on a size mismatch of
    their own chunk."""
    ks, ts = _prepare_tensors(keys, tensors, "tensor", destination=True)
    if not ts:
        return
    _one_cuda_device(ts)
    _drive(client, _get_tensors_plan(ks, ts, namespace, pool or default_pool(), _use_views(client)))


def get_tensor_into(client, key, tensor, *, namespace: str | None = None,
                    pool: StagingPool | None = None) -> None:
    """Receive the object ``key`` into ``tensor`` (its size must match exactly)."""
    batch_get_tensors_into(client, [key], [tensor], namespace=namespace, pool=pool)


def _new_tensor(dtype, shape, device) -> torch.Tensor:
    if not isinstance(dtype, torch.dtype):
        raise errors.InvalidArgument(f"dtype must be a torch.dtype, not {dtype!r}")
    try:
        shape = tuple(int(s) for s in ((shape,) if isinstance(shape, int) else shape))
    except (TypeError, ValueError):
        raise errors.InvalidArgument(f"shape must be a sequence of ints, not {shape!r}") from None
    if any(s < 0 for s in shape):
        raise errors.InvalidArgument(f"negative size in shape {shape}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise errors.InvalidArgument(f"device {device!r}: {e}") from None
    if dev.type not in ("cpu", "cuda"):
        raise errors.InvalidArgument(f"device {dev}: only cpu and cuda tensors can be transferred")
    return torch.empty(shape, dtype=dtype, device=dev)


def get_tensor(client, key, *, dtype, shape, device="cpu", namespace: str | None = None,
               pool: StagingPool | None = None) -> torch.Tensor:
    """A new tensor of ``dtype`` and ``shape`` on ``device`` holding the object ``key``
    (whose size must be exactly ``prod(shape) * itemsize``)."""
    t = _new_tensor(dtype, shape, device)
    get_tensor_into(client, key, t, namespace=namespace, pool=pool)
    return t


async def abatch_put_tensors(client, items, *, namespace: str | None = None, overwrite: bool = False,
                             pool: StagingPool | None = None) -> list[bool]:
    """``batch_put_tensors`` for a ``kvstore.AsyncClient``."""
    items = list(items)
    ks, ts = _prepare_tensors([k for k, _ in items], [t for _, t in items], "tensor")
    if not ts:
        return []
    _one_cuda_device(ts)
    _check_limit(map(_nbytes, ts), (await client.info()).max_value_size)
    return await _adrive(client, _put_tensors_plan(ks, ts, namespace, overwrite, pool or default_pool()))


async def aput_tensor(client, key, tensor, *, namespace: str | None = None, overwrite: bool = False,
                      pool: StagingPool | None = None) -> bool:
    """``put_tensor`` for a ``kvstore.AsyncClient``."""
    return (await abatch_put_tensors(client, [(key, tensor)], namespace=namespace,
                                     overwrite=overwrite, pool=pool))[0]


async def abatch_get_tensors_into(client, keys, tensors, *, namespace: str | None = None,
                                  pool: StagingPool | None = None) -> None:
    """``batch_get_tensors_into`` for a ``kvstore.AsyncClient``."""
    ks, ts = _prepare_tensors(keys, tensors, "tensor", destination=True)
    if not ts:
        return
    _one_cuda_device(ts)
    await _adrive(client, _get_tensors_plan(ks, ts, namespace, pool or default_pool(), False))


async def aget_tensor_into(client, key, tensor, *, namespace: str | None = None,
                           pool: StagingPool | None = None) -> None:
    """``get_tensor_into`` for a ``kvstore.AsyncClient``."""
    await abatch_get_tensors_into(client, [key], [tensor], namespace=namespace, pool=pool)


async def aget_tensor(client, key, *, dtype, shape, device="cpu", namespace: str | None = None,
                      pool: StagingPool | None = None) -> torch.Tensor:
    """``get_tensor`` for a ``kvstore.AsyncClient``."""
    t = _new_tensor(dtype, shape, device)
    await aget_tensor_into(client, key, t, namespace=namespace, pool=pool)
    return t
