"""Byte views and addresses of host memory, without numpy and without a copy: a CPU
tensor's memory as a writable memoryview, a (read-only) buffer as a uint8 tensor, the
address of any contiguous buffer (through our own ctypes prototypes of the buffer API).
"""
from __future__ import annotations

import ctypes

import torch

from .. import errors


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
