"""glibc's malloc thresholds, for processes that move ~1 MiB buffers (the daemon; EC clients).

Under glibc's dynamic thresholds a freed ~1 MiB block goes back to the kernel and the next
allocation page-faults it in again (DESIGN.md pitfalls: an ISA-L 4+2 encode of 1 MiB took
1.5 ms instead of 0.27 ms). Raising M_MMAP_THRESHOLD / M_TRIM_THRESHOLD has the effect of
MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_, which win when the environment sets them.
One function for the daemon (kvstored/__main__.py) and the SDK (layout.tune_malloc).
"""
from __future__ import annotations

import os
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3


def raise_thresholds(mmap_threshold: int, trim_threshold: int) -> bool | None:
    """Set the thresholds the environment did not choose. True when glibc took every one
    set, False where it refused one or the C library is not glibc, None when there was
    nothing to set (the environment chose both)."""
    todo = [(M_MMAP_THRESHOLD, mmap_threshold, "MALLOC_MMAP_THRESHOLD_"),
            (M_TRIM_THRESHOLD, trim_threshold, "MALLOC_TRIM_THRESHOLD_")]
    todo = [(param, value) for param, value, env in todo if env not in os.environ]
    if not todo:
        return None
    if platform.libc_ver()[0] != "glibc":
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = True
    for param, value in todo:
        ok &= mallopt(param, value) == 1
    return ok
