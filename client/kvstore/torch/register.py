"""GPU registration of host memory: ``cudaHostRegister`` / ``cudaHostUnregister`` of a
region (the shm arena mapping, a buffer, a tensor), once per region, so GPU copies to
and from it run as DMA like those of a pinned buffer.
"""
from __future__ import annotations

import threading

import torch

from .. import errors
from .hostmem import _buffer_address


def cuda_available() -> bool:
    """True when torch can use a CUDA device here (then staging buffers are pinned)."""
    return torch.cuda.is_available()


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
