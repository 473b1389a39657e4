"""Reed-Solomon over GF(2^8) by calling ISA-L directly, through ctypes.

The library is the ``libisal`` that pyeclib's liberasurecode loaded for its
``isa_l_rs_vand`` / ``isa_l_rs_cauchy`` backends (the very instance, found in this
process's memory map), so the generator matrices are the ones those backends build:
``gf_gen_rs_matrix`` (vand) or ``gf_gen_cauchy1_matrix`` (cauchy), (K+M) x K with the
identity on top, turned into multiplication tables by ``ec_init_tables``. ISA-L picks its
SIMD kernels by CPU at run time (``ec_init_tables`` and ``ec_encode_data`` dispatch
together), so nothing here depends on the build machine.

Why not liberasurecode: its encode allocates and zero-fills K+M fragment buffers and
copies the caller's object into the data ones before any arithmetic (measured ~23 % of a
client's ec:4+2 put); here the data fragments are read where the object lies and only the
parity is written, into buffers the caller sends. ``layout`` proves the results equal to
pyeclib's on a probe before using any of this (``layout._IsalCodec.attach``).

ctypes lets go of the GIL for every call into the library, so other threads (a batch's
senders) run while a round is computed. The tables are read-only once built: one
instance serves concurrent callers without a lock.
"""
from __future__ import annotations

import ctypes
import os

GEN_MATRIX = {"isa_l_rs_vand": "gf_gen_rs_matrix", "isa_l_rs_cauchy": "gf_gen_cauchy1_matrix"}


class IsalError(Exception):
    """The library is missing a symbol, or a matrix cannot be inverted."""


class _PyBuffer(ctypes.Structure):
    # CPython's Py_buffer (stable layout since 3.3): only ``buf`` is read
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.py_object), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_release_buffer.restype = None
_new_bytearray = ctypes.pythonapi.PyByteArray_FromStringAndSize
_new_bytearray.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
_new_bytearray.restype = ctypes.py_object


def address(mv: memoryview) -> int:
    """The address of a C-contiguous byte view's first byte, read-only views included
    (ctypes' from_buffer refuses those). Valid while ``mv`` (which holds its own export
    of the memory) is alive: the export taken here is released at once."""
    b = _PyBuffer()
    if _get_buffer(mv, ctypes.byref(b), 0) != 0:  # PyBUF_SIMPLE: contiguous bytes
        raise IsalError("buffer is not contiguous")
    try:
        return b.buf or 0
    finally:
        _release_buffer(ctypes.byref(b))


def uninitialized(n: int) -> bytearray:
    """A bytearray of ``n`` bytes whose contents are not zeroed first (``bytearray(n)``
    would memset it): for buffers the library overwrites whole."""
    return _new_bytearray(None, n)


class Library:
    """The ISA-L functions liberasurecode's isa-l backend uses, bound with their C types."""

    def __init__(self, path: str):
        lib = ctypes.CDLL(path)
        u8p = ctypes.c_void_p
        try:
            self.encode_data = lib.ec_encode_data
            self.init_tables = lib.ec_init_tables
            self.invert = lib.gf_invert_matrix
            self.gen = {t: getattr(lib, name) for t, name in GEN_MATRIX.items()}
        except AttributeError as e:
            raise IsalError(f"{path}: {e}") from None
        # void ec_encode_data(int len, int k, int rows, u8 *gftbls, u8 **data, u8 **coding)
        self.encode_data.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, u8p, u8p, u8p]
        self.encode_data.restype = None
        # void ec_init_tables(int k, int rows, u8 *a, u8 *gftbls)
        self.init_tables.argtypes = [ctypes.c_int, ctypes.c_int, u8p, u8p]
        self.init_tables.restype = None
        # int gf_invert_matrix(u8 *in, u8 *out, int n): 0, or nonzero when singular
        self.invert.argtypes = [u8p, u8p, ctypes.c_int]
        self.invert.restype = ctypes.c_int
        for f in self.gen.values():  # void gf_gen_*_matrix(u8 *a, int rows, int k)
            f.argtypes = [u8p, ctypes.c_int, ctypes.c_int]
            f.restype = None
        self.path = path


class RS:
    """One K+M code: its generator matrix and encode tables, and decode tables built on
    demand for a set of surviving fragments."""

    def __init__(self, lib: Library, k: int, m: int, ec_type: str):
        if ec_type not in GEN_MATRIX:
            raise IsalError(f"no ISA-L matrix for {ec_type!r}")
        self.lib, self.k, self.m = lib, k, m
        self.matrix = (ctypes.c_ubyte * (k * (k + m)))()
        lib.gen[ec_type](ctypes.addressof(self.matrix), k + m, k)
        self.tables = self._tables(bytes(self.matrix)[k * k:], m)

    def _tables(self, rows: bytes, count: int):
        """ec_init_tables of ``count`` rows of K coefficients (32 bytes per coefficient)."""
        a = (ctypes.c_ubyte * len(rows)).from_buffer_copy(rows)
        t = (ctypes.c_ubyte * (self.k * count * 32))()
        self.lib.init_tables(self.k, count, ctypes.addressof(a), ctypes.addressof(t))
        return t

    def run(self, tables, size: int, sources: list[int], outputs: list[int]) -> None:
        """ec_encode_data: ``len(outputs)`` blocks of ``size`` bytes at the addresses
        ``outputs`` from the K blocks at ``sources`` through ``tables``."""
        src = (ctypes.c_void_p * len(sources))(*sources)
        dst = (ctypes.c_void_p * len(outputs))(*outputs)
        self.lib.encode_data(size, self.k, len(outputs), ctypes.addressof(tables),
                             ctypes.addressof(src), ctypes.addressof(dst))

    def encode(self, size: int, data: list[int], parity: list[int]) -> None:
        """The M parity blocks of the K data blocks (addresses), each ``size`` bytes."""
        self.run(self.tables, size, data, parity)

    def rebuild_tables(self, have: list[int], want: list[int]):
        """Tables that compute any fragments ``want`` (data or parity indexes) from the K
        fragments ``have`` (their indexes, in the order their addresses will be given): a
        data index's row of the inverse of the ``have`` rows, or a parity index's
        generator row times that inverse, so one ec_encode_data call makes them all (a
        degraded read asks for data indexes only, repair for either). IsalError when
        ``have`` does not determine the data."""
        k = self.k
        g = bytes(self.matrix)
        sub = (ctypes.c_ubyte * (k * k)).from_buffer_copy(b"".join(g[i * k:(i + 1) * k] for i in have))
        inv = (ctypes.c_ubyte * (k * k))()
        if self.lib.invert(ctypes.addressof(sub), ctypes.addressof(inv), k) != 0:
            raise IsalError(f"fragments {have} do not determine the data")
        rows = bytes(inv)
        out = bytearray()
        for i in want:
            if i < k:
                out += rows[i * k:(i + 1) * k]
                continue
            gi = g[i * k:(i + 1) * k]
            for col in range(k):
                acc = 0
                for j in range(k):
                    acc ^= gf_mul(gi[j], rows[j * k + col])
                out.append(acc)
        return self._tables(bytes(out), len(want))


def gf_mul(a: int, b: int) -> int:
    """a * b in GF(2^8) modulo x^8+x^4+x^3+x^2+1 (0x11d, ISA-L's field). Only for the few
    coefficients of a rebuild's tables, which are cached."""
    r = 0
    while b:
        if b & 1:
            r ^= a
        a <<= 1
        if a & 0x100:
            a ^= 0x11D
        b >>= 1
    return r


def find_library(loaded) -> str | None:
    """The path of the libisal this process loaded (``loaded``: layout's map reader), else
    the one bundled beside pyeclib's wheel."""
    path = loaded("libisal")
    if path is not None:
        return path
    try:
        import pyeclib
    except ImportError:
        return None
    libs = os.path.join(os.path.dirname(os.path.dirname(pyeclib.__file__)), "pyeclib.libs")
    try:
        names = sorted(n for n in os.listdir(libs) if n.startswith("libisal"))
    except OSError:
        return None
    return os.path.join(libs, names[0]) if names else None
