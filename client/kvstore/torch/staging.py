"""Staging buffers: a bounded pool of host (pinned when CUDA is there) and device
buffers reused across calls, and the process-wide default pool.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

from .. import errors
from .register import cuda_available


KiB = 1 << 10
MiB = 1 << 20
DEFAULT_STAGING_BYTES = 256 * MiB
"""What the default StagingPool retains at most."""
DEFAULT_CHUNK_BYTES = 16 * MiB
"""Granularity of the staged pipeline: objects are gathered / sent / scattered in chunks
of about this many bytes (at least one object per chunk)."""
_ALIGN = 256  # byte alignment of every object inside a staging slot (any dtype view works)


def _align(n: int) -> int:
    """``n`` rounded up to the alignment of objects inside a staging slot."""
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


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
