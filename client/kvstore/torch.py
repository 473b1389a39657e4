"""kvstore.torch: torch tensors and paged KV-cache blocks in and out of kvstored.

``import kvstore`` never imports torch; ``import kvstore.torch`` does.

Tensors
    ``put_tensor(client, key, t)`` stores the tensor's elements in row-major (C) order,
    nothing else: the object is exactly ``t.numel() * t.element_size()`` bytes, so any
    client can read it. ``get_tensor_into(client, key, t)`` fills ``t`` and requires the
    object to be exactly that size. dtype and shape are the caller's to know (an object
    of the right size but written as another dtype cannot be told apart).

    * A CPU tensor that is contiguous goes straight from / into its own memory (no copy
      in this module). A non-contiguous tensor (a slice, a transpose) is accepted: it
      goes through a staging buffer, one extra copy, and the object still holds its
      elements in row-major order of its shape.
    * A CUDA tensor goes through pinned staging buffers; copies run on a side CUDA
      stream, and batch calls overlap the copy of chunk i+1 with the transfer of chunk i.
    * Bad input (not a tensor, a sparse / quantized tensor, a device other than cpu or
      cuda, mismatched counts, a value over the daemon's ``max_value_size``) raises
      ``kvstore.InvalidArgument`` before any byte moves, so a failed batch stores nothing.

Paged KV blocks
    ``KVLayout.vllm(kv_caches)`` / ``KVLayout.sglang(k_buffers, v_buffers, page_size)``
    describe an engine's paged cache; ``put_blocks(client, layout, keys, block_ids)``
    gathers each block (every layer, K and V) into one contiguous object, and
    ``get_blocks`` scatters objects back into (possibly other) block ids. One object is::

        for layer in 0..L-1:          # the layout's layer order
            K[layer][block]           # block_size x num_kv_heads x head_size, row-major
            V[layer][block]

    i.e. a C array ``[L][2][block_size][num_kv_heads][head_size]`` of the cache dtype,
    ``block_nbytes = L * 2 * block_size * heads * head_size * itemsize`` bytes. vLLM and
    SGLang (page_size = block_size) produce the same bytes for the same geometry, so a
    block written by one can be read by the other. Objects are raw bytes: nothing in
    them names the layout; put ``layout.signature`` into the key chain's ``extra``.

Staging and overlap
    Objects move through staging in chunks (at most ``pool.chunk_bytes``, and at least
    4 chunks when a call has 4 or more blocks) and two slots: while chunk i is on the
    network, chunk i+1 is being packed (put) or chunk i-1 unpacked (get): on a worker
    thread for CPU tensors (block rows are moved with memcpy, which releases the GIL),
    on a side CUDA stream for GPU tensors. A ``StagingPool`` (one per process by
    default, ``default_pool()``) keeps those buffers and hands them out again: after the
    first call of a given shape no further buffer is allocated. It retains at most
    ``max_bytes``; a request it cannot meet within that bound while other callers hold
    its buffers gets a one-off buffer, freed after the call (``stats()["overflows"]``).
    Host buffers are pinned (page-locked) when CUDA is available.

Errors
    Argument errors are raised before any byte moves. A get checks every object of a
    chunk (present, exactly the expected size) before unpacking that chunk, so the
    failing chunk's destinations are untouched, but chunks before it have been
    written: after a failed ``get_blocks`` treat every destination block as undefined.
    A contiguous CPU tensor receives in place: an object too large is refused before
    its bytes arrive, but one too short has filled the tensor's first bytes when the
    size error is raised (an object's size is known only once it arrives).

CUDA (cannot be exercised on a host without a GPU; the tests skip it and say so)
    Copies run on a per-thread side stream that first waits for the caller's current
    stream (so KV written by the model is complete). A put gathers a chunk of blocks on
    the GPU into a device scratch buffer (``torch.stack``) and copies it to pinned
    staging; a get copies a chunk to device scratch and scatters it (``index_copy_``).
    Events mark each chunk; every call waits for its side stream before it returns, so
    results are visible to any stream afterwards.

Same-host shared memory
    When a ``kvstore.Client`` uses the shm data path and offers ``get_view``,
    ``get_blocks`` and staged tensor gets read each object where it lies in the
    daemon's arena (a leased, zero-copy view) instead of receiving it into staging: on
    CPU the scatter copies from the arena straight into the cache; with CUDA the arena
    mapping is registered as pinned memory (``register_host_memory``, once per mapping),
    so the GPU copies straight out of the store. Puts go through ``client.batch_put``
    (one copy from staging into the arena). ``AsyncClient`` has no shm path yet.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import math
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import torch

from . import errors
from .wire import key_bytes

__all__ = [
    "DEFAULT_CHUNK_BYTES", "DEFAULT_STAGING_BYTES", "KVLayout", "StagingPool",
    "abatch_get_tensors_into", "abatch_put_tensors", "aget_blocks", "aget_tensor",
    "aget_tensor_into", "aput_blocks", "aput_tensor", "batch_get_tensors_into",
    "batch_put_tensors", "cuda_available", "default_pool", "get_blocks", "get_tensor",
    "get_tensor_into", "put_blocks", "put_tensor", "register_host_memory",
    "unregister_host_memory",
]

KiB = 1 << 10
MiB = 1 << 20
DEFAULT_STAGING_BYTES = 256 * MiB
"""What the default StagingPool retains at most."""
DEFAULT_CHUNK_BYTES = 16 * MiB
"""Granularity of the staged pipeline: objects are gathered / sent / scattered in chunks
of about this many bytes (at least one object per chunk)."""
_ALIGN = 256  # byte alignment of every object inside a staging slot (any dtype view works)


def cuda_available() -> bool:
    """True when torch can use a CUDA device here (then staging buffers are pinned)."""
    return torch.cuda.is_available()


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


# ====================================================================== host memory views

def _host_view(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (no copy, no numpy).

    The view keeps the tensor alive."""
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(bytearray())
    arr = (ctypes.c_char * n).from_address(t.data_ptr())
    arr._kvstore_owner = t  # the memory lives as long as the view
    return memoryview(arr).cast("B")


class _PyBuffer(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


# Our own prototypes of the two C-API calls: the function objects of ctypes.pythonapi are
# shared by the whole process, and a module that sets their argtypes to its own Py_buffer
# structure (kvstore.rdma.verbs does) would make every call here fail with ArgumentError.
_get_buffer = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int)(
    ("PyObject_GetBuffer", ctypes.pythonapi))
_release_buffer = ctypes.PYFUNCTYPE(None, ctypes.POINTER(_PyBuffer))(("PyBuffer_Release", ctypes.pythonapi))


def _buffer_address(mv: memoryview) -> int:
    """Address of a contiguous buffer, read-only ones included (ctypes.from_buffer needs a
    writable one)."""
    pb = _PyBuffer()
    if _get_buffer(mv, ctypes.byref(pb), 0) != 0:
        raise errors.InvalidArgument("cannot take the address of this buffer")
    try:
        return pb.buf or 0
    finally:
        _release_buffer(ctypes.byref(pb))


def _read_tensor(mv: memoryview) -> torch.Tensor:
    """A uint8 tensor over a (read-only) byte view, without a copy; valid while ``mv`` is
    (the caller holds it). Only ever read from."""
    n = mv.nbytes
    if n == 0:
        return torch.empty(0, dtype=torch.uint8)
    arr = (ctypes.c_char * n).from_address(_buffer_address(mv))
    return torch.frombuffer(arr, dtype=torch.uint8)


def _address_of(buffer, nbytes: int | None) -> tuple[int, int]:
    if isinstance(buffer, int) and not isinstance(buffer, bool):
        if nbytes is None:
            raise errors.InvalidArgument("register_host_memory(address) needs nbytes")
        return buffer, int(nbytes)
    if isinstance(buffer, torch.Tensor):
        if buffer.device.type != "cpu" or not buffer.is_contiguous():
            raise errors.InvalidArgument("register_host_memory needs a contiguous CPU tensor")
        n = buffer.numel() * buffer.element_size()
        return buffer.data_ptr(), n if nbytes is None else int(nbytes)
    try:
        mv = memoryview(buffer)
    except TypeError:
        raise errors.InvalidArgument(
            f"register_host_memory needs a buffer, a tensor or an address, not {type(buffer).__name__}"
        ) from None
    if mv.readonly or not mv.c_contiguous:
        raise errors.InvalidArgument("register_host_memory needs a writable, contiguous buffer "
                                     "(or pass its address and nbytes)")
    if mv.nbytes == 0:
        raise errors.InvalidArgument("register_host_memory: empty buffer")
    ptr, size = _buffer_address(mv), mv.nbytes
    mv.release()  # no export left behind: the mapping can still be closed later
    return ptr, size if nbytes is None else int(nbytes)


_registered: dict[int, int] = {}  # address -> nbytes, registered by this module
_registered_lock = threading.Lock()
_CUDA_HOST_REGISTER_ALREADY = 712  # cudaErrorHostMemoryAlreadyRegistered


def register_host_memory(buffer, nbytes: int | None = None, *, flags: int = 0) -> bool:
    """Page-lock a host region for CUDA (``cudaHostRegister``): copies between the GPU and
    it then run as DMA, asynchronously, like those of a pinned buffer.

    ``buffer``: a writable buffer (an ``mmap`` of the shm arena, a bytearray...), a
    contiguous CPU tensor, or an address with ``nbytes``. ``flags``: cudaHostRegister
    flags (0 = default). Returns True when the region is registered (now or already),
    False on a host without CUDA, where it does nothing. Registration pins every page
    (a one-time cost that grows with the size) and must be undone with
    ``unregister_host_memory`` before the region is unmapped or freed.
    """
    ptr, n = _address_of(buffer, nbytes)
    if not cuda_available():
        return False
    with _registered_lock:
        if ptr in _registered:
            return True
        res = torch.cuda.cudart().cudaHostRegister(ptr, n, flags)
        code = int(getattr(res, "value", res))
        if code not in (0, _CUDA_HOST_REGISTER_ALREADY):
            raise errors.KVStoreError(f"cudaHostRegister of {n} bytes at {ptr:#x} failed: CUDA error {code}")
        _registered[ptr] = n
    return True


def unregister_host_memory(buffer, nbytes: int | None = None) -> bool:
    """Undo ``register_host_memory`` (``cudaHostUnregister``); False if it was not registered
    by this module or there is no CUDA."""
    ptr, _n = _address_of(buffer, nbytes)
    if not cuda_available():
        return False
    with _registered_lock:
        if _registered.pop(ptr, None) is None:
            return False
        res = torch.cuda.cudart().cudaHostUnregister(ptr)
        code = int(getattr(res, "value", res))
        if code != 0:
            raise errors.KVStoreError(f"cudaHostUnregister at {ptr:#x} failed: CUDA error {code}")
    return True


# ====================================================================== staging pool

def _round_size(n: int) -> int:
    """Pool size classes: powers of two up to 1 MiB, then whole MiB."""
    if n <= 4 * KiB:
        return 4 * KiB
    if n <= MiB:
        return 1 << (n - 1).bit_length()
    return (n + MiB - 1) // MiB * MiB


def _remove(buffers: list, buf) -> None:
    """list.remove by identity (== on tensors compares elements)."""
    for i, b in enumerate(buffers):
        if b is buf:
            del buffers[i]
            return


class StagingPool:
    """Staging buffers reused across calls, bounded in total.

    ``max_bytes``: the most the pool keeps allocated (host and device buffers together).
    A lease that does not fit beside the buffers other callers hold gets a one-off
    buffer, dropped after the call and counted in ``stats()["overflows"]``; idle buffers
    are freed (largest first) to make room for a new size. ``chunk_bytes``: the pipeline
    granularity of the transfer functions (see ``DEFAULT_CHUNK_BYTES``); a CUDA call
    holds about 2 chunks of pinned host memory and 1 chunk on the device.
    ``pin_memory``: None = pinned host buffers exactly when CUDA is available.
    Thread-safe; several calls can hold leases at once.
    """

    def __init__(self, max_bytes: int = DEFAULT_STAGING_BYTES, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 pin_memory: bool | None = None):
        if max_bytes <= 0 or chunk_bytes <= 0:
            raise errors.InvalidArgument("StagingPool: max_bytes and chunk_bytes must be positive")
        self.max_bytes = int(max_bytes)
        self.chunk_bytes = int(chunk_bytes)
        self._pin = pin_memory
        self._lock = threading.Lock()
        self._free: dict[str, list[torch.Tensor]] = {}
        self._retained = 0
        self._in_use = 0
        self._counts = {"allocations": 0, "reuses": 0, "overflows": 0, "freed": 0}

    @property
    def pin_memory(self) -> bool:
        return cuda_available() if self._pin is None else bool(self._pin)

    def _kind(self, device: torch.device | None, pinned: bool | None) -> tuple[str, torch.device]:
        if device is not None and device.type != "cpu":
            return str(device), device
        if pinned is None:
            pinned = self.pin_memory
        return ("pinned" if pinned else "cpu"), torch.device("cpu")

    @contextmanager
    def lease(self, nbytes: int, *, device: torch.device | str | None = None, pinned: bool | None = None):
        """A uint8 tensor of exactly ``nbytes`` (a view of a pooled buffer), returned to the
        pool when the ``with`` block ends. ``device``: a CUDA device for device scratch
        space; default host memory (pinned per ``pinned`` / the pool's ``pin_memory``)."""
        dev = torch.device(device) if device is not None else None
        kind, alloc_dev = self._kind(dev, pinned)
        if nbytes <= 0:
            yield torch.empty(0, dtype=torch.uint8, device=alloc_dev)
            return
        size = _round_size(nbytes)
        buf = None
        pooled = True
        with self._lock:
            free = self._free.setdefault(kind, [])
            fits = [b for b in free if b.numel() >= size]
            if fits:
                buf = min(fits, key=lambda b: b.numel())
                _remove(free, buf)
                self._counts["reuses"] += 1
            else:
                # make room: drop idle buffers, largest first
                idle = sorted(((b.numel(), k, b) for k, bs in self._free.items() for b in bs),
                              key=lambda x: -x[0])
                while self._retained + size > self.max_bytes and idle:
                    n, k, b = idle.pop(0)
                    _remove(self._free[k], b)
                    self._retained -= n
                    self._counts["freed"] += 1
                if self._retained + size <= self.max_bytes:
                    self._retained += size
                    self._counts["allocations"] += 1
                else:
                    pooled = False
                    self._counts["overflows"] += 1
            self._in_use += size
        try:
            if buf is None:
                try:
                    buf = torch.empty(size, dtype=torch.uint8, device=alloc_dev,
                                      pin_memory=(kind == "pinned"))
                except BaseException:
                    with self._lock:
                        self._in_use -= size
                        if pooled:
                            self._retained -= size
                    raise
            yield buf[:nbytes]
        finally:
            with self._lock:
                self._in_use -= size
                if pooled and buf is not None:
                    self._free.setdefault(kind, []).append(buf)

    def stats(self) -> dict:
        """Counters: ``retained_bytes`` (allocated and kept), ``in_use_bytes``, ``buffers``
        (idle ones), ``allocations``, ``reuses``, ``overflows``, ``freed``, limits."""
        with self._lock:
            return {"max_bytes": self.max_bytes, "chunk_bytes": self.chunk_bytes,
                    "pinned": self.pin_memory, "retained_bytes": self._retained,
                    "in_use_bytes": self._in_use,
                    "buffers": sum(len(v) for v in self._free.values()), **self._counts}

    def clear(self) -> None:
        """Free every idle buffer (leases in progress are unaffected)."""
        with self._lock:
            for bs in self._free.values():
                for b in bs:
                    self._retained -= b.numel()
                    self._counts["freed"] += 1
                bs.clear()


_default_pool: StagingPool | None = None
_default_lock = threading.Lock()


def default_pool() -> StagingPool:
    """The process-wide StagingPool used when a call passes no ``pool``."""
    global _default_pool
    if _default_pool is None:
        with _default_lock:
            if _default_pool is None:
                _default_pool = StagingPool()
    return _default_pool


# ====================================================================== CUDA plumbing

_streams = threading.local()


def _side_stream(device: torch.device):
    """This thread's side stream on ``device`` (created once)."""
    table = getattr(_streams, "table", None)
    if table is None:
        table = _streams.table = {}
    idx = device.index if device.index is not None else torch.cuda.current_device()
    s = table.get(idx)
    if s is None:
        s = table[idx] = torch.cuda.Stream(device=idx)
    return s


_executor: concurrent.futures.ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _copy_thread() -> concurrent.futures.ThreadPoolExecutor:
    """Worker threads for CPU gather / scatter overlapped with the network (shared)."""
    global _executor
    if _executor is None:
        with _executor_lock:
            if _executor is None:
                _executor = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="kvstore-torch")
    return _executor


class _Copier:
    """Runs the copies of a call and hands back something to wait for.

    CUDA: queued on the side stream (which first waits for the caller's stream), an
    event per step. CPU with ``overlap``: on a worker thread (the memcpy releases the
    GIL), a future per step. Otherwise at once (nothing to wait for)."""

    def __init__(self, device: torch.device | None, overlap: bool = False):
        self.device = device
        self.stream = None
        self.overlap = overlap and device is None
        self.pending: list = []
        if device is not None:
            self.stream = _side_stream(device)
            self.stream.wait_stream(torch.cuda.current_stream(device))

    def run(self, fn: Callable[[], None]):
        if self.stream is not None:
            with torch.cuda.stream(self.stream), torch.inference_mode():
                fn()
            ev = torch.cuda.Event()
            ev.record(self.stream)
            return ev
        if self.overlap:
            fut = _copy_thread().submit(_in_inference_mode, fn)
            self.pending.append(fut)
            return fut
        with torch.inference_mode():
            fn()
        return None

    def drain(self) -> None:
        """Wait for everything queued (errors are the plan's to report, not this wait's)."""
        if self.stream is not None:
            self.stream.synchronize()
        for f in self.pending:
            try:
                f.result()
            except BaseException:
                pass
        self.pending.clear()


def _in_inference_mode(fn) -> None:
    with torch.inference_mode():
        fn()


# ====================================================================== plans and drivers
#
# Every transfer is written once, as a generator ("plan") that yields the network steps
# it needs; a blocking driver runs it on a Client, an async one on an AsyncClient.

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


# ====================================================================== tensors

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


def _check_limit(sizes: Iterable[int], limit: int) -> None:
    for n in sizes:
        if n > limit:
            raise errors.InvalidArgument(f"value of {n} bytes exceeds the daemon's max_value_size {limit}")


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


def _use_views(client) -> bool:
    """The client reads objects in place in the daemon's arena (same-host shm path)."""
    if not callable(getattr(client, "get_view", None)):
        return False
    try:
        return getattr(client, "transport", "tcp") == "shm"
    except errors.KVStoreError:
        return False


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


# ====================================================================== paged KV layouts

class KVLayout:
    """A paged KV cache as the store sees it: ``planes`` of blocks, in object order.

    Plane ``2*l`` is layer l's K, plane ``2*l+1`` its V; each plane is a tensor view
    ``[num_blocks, *block_shape]`` of the engine's own memory (never a copy), and block
    ``b`` of the object is ``cat(plane[b].flatten() for plane in planes)``. All planes
    share dtype, device, block shape and block count (checked when the layout is made).

    Build one with ``KVLayout.vllm(kv_caches)`` or ``KVLayout.sglang(k_buffers,
    v_buffers, page_size)``; ``KVLayout(planes)`` takes any other layout whose blocks
    are indexable along a first dimension.
    """

    def __init__(self, planes: Sequence[torch.Tensor], *, engine: str = "custom", num_layers: int | None = None):
        planes = list(planes)
        if not planes:
            raise errors.InvalidArgument("a KV layout needs at least one layer")
        for i, p in enumerate(planes):
            if not isinstance(p, torch.Tensor):
                raise errors.InvalidArgument(f"plane {i} must be a torch.Tensor, not {type(p).__name__}")
        first = planes[0]
        per = 2 if num_layers is not None else 1
        name = (lambda i: f"layer {i // 2} {'KV'[i % 2]}") if per == 2 else (lambda i: f"plane {i}")
        for i, p in enumerate(planes):
            if p.dtype != first.dtype:
                raise errors.InvalidArgument(f"{name(i)} is {p.dtype} but {name(0)} is {first.dtype}")
            if p.device != first.device:
                raise errors.InvalidArgument(f"{name(i)} is on {p.device} but {name(0)} on {first.device}")
            if p.shape != first.shape:
                raise errors.InvalidArgument(
                    f"{name(i)} has blocks {tuple(p.shape)} but {name(0)} {tuple(first.shape)}")
        if first.dim() < 1 or first.shape[0] == 0:
            raise errors.InvalidArgument("a KV layout needs at least one block")
        _tensor(first, name(0))  # layout and device type
        self.planes = tuple(p.detach() for p in planes)
        self.engine = engine
        self.num_layers = num_layers if num_layers is not None else len(planes)
        self.num_blocks = int(first.shape[0])
        self.block_shape = tuple(int(s) for s in first.shape[1:])
        self.dtype = first.dtype
        self.device = first.device
        self.block_elems = math.prod(self.block_shape)
        self.block_nbytes = len(planes) * self.block_elems * first.element_size()
        if self.block_nbytes == 0:
            raise errors.InvalidArgument("KV blocks of 0 bytes")

    # ---------------------------------------------------------------- constructors
    @classmethod
    def vllm(cls, kv_caches, *, kv_first: bool = True) -> "KVLayout":
        """vLLM's per-layer caches: a list (or a ``{layer name: tensor}`` dict, in order)
        of tensors ``[2, num_blocks, block_size, num_kv_heads, head_size]`` (flash
        attention; ``kv_first=False`` for ``[num_blocks, 2, ...]``, FlashInfer). Block ids
        are vLLM's block table entries. The tensors may be strided views (e.g. an HND
        physical layout): objects are always in the logical [token][head][dim] order."""
        layers = list(kv_caches.values()) if isinstance(kv_caches, dict) else list(kv_caches)
        if not layers:
            raise errors.InvalidArgument("KVLayout.vllm: no layers")
        planes = []
        for i, t in enumerate(layers):
            if not isinstance(t, torch.Tensor):
                raise errors.InvalidArgument(f"layer {i} must be a torch.Tensor, not {type(t).__name__}")
            kv_dim = 0 if kv_first else 1
            if t.dim() != 5 or t.shape[kv_dim] != 2:
                want = "[2, num_blocks, block_size, heads, head_size]" if kv_first else \
                    "[num_blocks, 2, block_size, heads, head_size]"
                raise errors.InvalidArgument(f"layer {i}: shape {tuple(t.shape)} is not {want}")
            k, v = t.unbind(kv_dim)
            planes += [k, v]
        return cls(planes, engine="vllm", num_layers=len(layers))

    @classmethod
    def sglang(cls, k_buffers, v_buffers, page_size: int = 1) -> "KVLayout":
        """SGLang's MHA token pool: per-layer ``k_buffers[l]`` and ``v_buffers[l]`` shaped
        ``[num_tokens, num_kv_heads, head_size]``; block (page) ``p`` is token slots
        ``p*page_size .. (p+1)*page_size-1`` (``page_size``: SGLang's ``--page-size``).
        Trailing slots that do not fill a page are not addressable."""
        ks, vs = list(k_buffers), list(v_buffers)
        if not ks:
            raise errors.InvalidArgument("KVLayout.sglang: no layers")
        if len(ks) != len(vs):
            raise errors.InvalidArgument(f"{len(ks)} K buffers but {len(vs)} V buffers")
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise errors.InvalidArgument(f"page_size must be a positive int, not {page_size!r}")
        planes = []
        for i, (k, v) in enumerate(zip(ks, vs)):
            for name, t in (("K", k), ("V", v)):
                if not isinstance(t, torch.Tensor):
                    raise errors.InvalidArgument(f"layer {i} {name} must be a torch.Tensor, not {type(t).__name__}")
                if t.dim() != 3:
                    raise errors.InvalidArgument(
                        f"layer {i} {name}: shape {tuple(t.shape)} is not [num_tokens, heads, head_size]")
                pages = t.shape[0] // page_size
                if pages == 0:
                    raise errors.InvalidArgument(
                        f"layer {i} {name}: {t.shape[0]} token slots hold no page of {page_size}")
                planes.append(t[:pages * page_size].unflatten(0, (pages, page_size)))
        return cls(planes, engine="sglang", num_layers=len(ks))

    # ---------------------------------------------------------------- description
    @property
    def signature(self) -> bytes:
        """Names the object layout (geometry and dtype, not the engine): mix it into the
        key chain (``kvstore.keys.chain(..., extra=layout.signature)``) so that caches of
        other shapes never share keys."""
        dims = "x".join(str(d) for d in self.block_shape)
        dt = str(self.dtype).replace("torch.", "")
        return f"kvl1/P{len(self.planes)}/{dims}/{dt}".encode()

    def __repr__(self) -> str:
        return (f"KVLayout({self.engine}, layers={self.num_layers}, blocks={self.num_blocks}, "
                f"block_shape={self.block_shape}, dtype={self.dtype}, device={self.device}, "
                f"block_nbytes={self.block_nbytes})")

    # ---------------------------------------------------------------- gather / scatter
    def _typed(self, buf_u8: torch.Tensor, n: int) -> torch.Tensor:
        """``n`` objects back to back in ``buf_u8``, as ``[n, planes, block_elems]``."""
        return buf_u8[:n * self.block_nbytes].view(self.dtype).view(n, len(self.planes), self.block_elems)

    def _flat_planes(self) -> list:
        """Each plane as ``[num_blocks, block_elems]`` when its blocks are contiguous (the
        usual case), else as is."""
        flat = getattr(self, "_flat", None)
        if flat is None:
            flat = []
            for p in self.planes:
                try:
                    flat.append(p.view(p.shape[0], self.block_elems))
                except RuntimeError:  # strided blocks (e.g. an HND view): keep the block shape
                    flat.append(p)
            self._flat = flat
            self._rows_ok = self.device.type == "cpu" and all(f.dim() == 2 for f in flat)
        return flat

    def _rows(self) -> list[tuple[int, int]] | None:
        """CPU layouts whose blocks are contiguous: (address, bytes between blocks) per plane,
        for plain memcpy of each block row; None otherwise."""
        self._flat_planes()
        if not self._rows_ok:
            return None
        item = self.planes[0].element_size()
        return [(f.data_ptr(), f.stride(0) * item) for f in self._flat]

    def _row(self, plane: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        """``src`` (``[..., block_elems]``) shaped like ``plane``'s blocks."""
        return src if plane.dim() == 2 else src.unflatten(-1, self.block_shape)

    def _check_ids(self, block_ids) -> None:
        for b in block_ids:
            if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < self.num_blocks:
                raise errors.InvalidArgument(f"block id {b!r} is not an int in [0, {self.num_blocks})")

    def _check_buffer(self, buf: torch.Tensor, n: int) -> None:
        if not isinstance(buf, torch.Tensor) or buf.dtype != torch.uint8 or buf.dim() != 1 \
                or not buf.is_contiguous() or buf.device != self.device:
            raise errors.InvalidArgument(f"need a contiguous 1-D uint8 tensor on {self.device}")
        if buf.numel() < n * self.block_nbytes:
            raise errors.InvalidArgument(f"{n} blocks need {n * self.block_nbytes} bytes, "
                                         f"the buffer has {buf.numel()}")

    # On CPU, block rows are moved with memcpy (ctypes.memmove, which releases the GIL)
    # rather than torch ops: those split work over intra-op threads, and on a busy host
    # each of their parallel regions waits for a descheduled thread (index_copy_ fell
    # from ~5 GB/s to ~0.1 GB/s on the loaded 2-core dev machine; memcpy stayed ~6 GB/s).

    def gather_into(self, block_ids: Sequence[int], out: torch.Tensor) -> None:
        """Copy blocks (ids already checked) into ``out`` (contiguous uint8 on the layout's
        device, at least ``len(block_ids) * block_nbytes`` bytes) in object layout."""
        n = len(block_ids)
        self._check_ids(block_ids)
        self._check_buffer(out, n)
        rows = self._rows()
        if rows is not None:
            size = self.block_nbytes // len(self.planes)
            o = out.data_ptr()
            for b in block_ids:
                for ptr, stride in rows:
                    _memmove(o, ptr + b * stride, size)
                    o += size
            return
        dst = out[:n * self.block_nbytes].view(self.dtype).view(n * len(self.planes), *self.block_shape)
        torch.stack([p[b] for b in block_ids for p in self.planes], out=dst)

    def scatter_from(self, block_ids: Sequence[int], src: torch.Tensor) -> None:
        """Copy objects laid out back to back in ``src`` (contiguous uint8 on the layout's
        device) into blocks ``block_ids`` (checked, distinct)."""
        n = len(block_ids)
        self._check_ids(block_ids)
        self._check_buffer(src, n)
        rows = self._rows()
        if rows is not None:
            self._scatter_rows(block_ids, [src.data_ptr() + i * self.block_nbytes for i in range(n)], rows)
            return
        typed = self._typed(src, n)
        idx = torch.as_tensor(list(block_ids), dtype=torch.long)
        if self.device.type != "cpu":
            idx = idx.to(self.device, non_blocking=True)
        for j, p in enumerate(self._flat_planes()):
            p.index_copy_(0, idx, self._row(p, typed[:, j]))

    def _scatter_rows(self, block_ids, addresses, rows) -> None:
        size = self.block_nbytes // len(self.planes)
        for b, o in zip(block_ids, addresses):
            for ptr, stride in rows:
                _memmove(ptr + b * stride, o, size)
                o += size

    def scatter_views(self, block_ids: Sequence[int], views: Sequence[memoryview]) -> None:
        """Copy separate objects (byte views of exactly ``block_nbytes``, e.g. leased views of
        the shm arena) into blocks ``block_ids`` of a CPU layout."""
        self._check_ids(block_ids)
        if len(views) != len(block_ids):
            raise errors.InvalidArgument(f"{len(views)} objects for {len(block_ids)} blocks")
        for v in views:
            if v.nbytes != self.block_nbytes:
                raise errors.InvalidArgument(f"object of {v.nbytes} bytes for a {self.block_nbytes}-byte block")
        rows = self._rows()
        if rows is not None:
            self._scatter_rows(block_ids, [_buffer_address(v) for v in views], rows)
            return
        flat = self._flat_planes()
        for b, v in zip(block_ids, views):
            objs = _read_tensor(v).view(self.dtype).view(len(self.planes), self.block_elems)
            for j, p in enumerate(flat):
                p[b].copy_(self._row(p, objs[j]))


_memmove = ctypes.memmove


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
