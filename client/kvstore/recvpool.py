"""Reusable receive buffers for ``get()`` / ``batch_get()``.

A fresh ``bytearray`` per large object costs an ``mmap`` and one page fault per 4 KiB as
the socket fills it (glibc serves big allocations from fresh mappings; a caller that keeps
results, as a retrieval of many blocks does until it copies them out, never lets malloc
reuse them): at 1-4 MiB that halves ``get()``'s throughput on a small machine.

The pool keeps the bytearrays it handed out, by exact size (KV-cache blocks of one model
are all one size). **Lifetime rule: a result is yours for as long as you hold a reference
to it** (the bytearray itself, or any memoryview / numpy / torch view of it); once the last
one is dropped, the pool may fill it with a later ``get()`` of the same size. Whether
anyone but the pool still holds a buffer is read from its reference count, so a buffer
is never reused under a live reference: nothing to release by hand, and a result kept
forever simply stays out of the pool. Objects under ``MIN_POOLED`` bytes come from malloc
as before (its heap reuses small blocks anyway); ``max_bytes`` bounds what the pool keeps
(beyond it results are plain new bytearrays).
"""
from __future__ import annotations

import sys
import threading
from collections import deque

MIN_POOLED = 64 << 10
DEFAULT_POOL_BYTES = 256 << 20
PROBES = 8  # buffers of one size looked at per take (the oldest first): O(1) per get
_getrefcount = getattr(sys, "getrefcount", None)


def _free_refs() -> int:
    """References to a pooled buffer nobody else holds, as seen inside ``take``: the deque,
    the local name, and getrefcount's own argument (measured, not assumed)."""
    q = deque([bytearray(1)])
    b = q[0]
    return _getrefcount(b) if _getrefcount is not None else -1


class ReceivePool:
    __slots__ = ("max_bytes", "held", "reused", "_by_size", "_lock", "_free")

    def __init__(self, max_bytes: int = DEFAULT_POOL_BYTES):
        if max_bytes < 0:
            raise ValueError(f"receive pool size must be >= 0, not {max_bytes}")
        # without reference counts (not CPython) nothing can tell a dropped result from a
        # kept one: no pooling then
        self.max_bytes = max_bytes if _getrefcount is not None else 0
        self.held = 0  # bytes of the buffers the pool keeps (handed out or free)
        self.reused = 0  # takes served by a buffer already faulted in (for tests, stats)
        self._by_size: dict[int, deque] = {}
        self._lock = threading.Lock()
        self._free = _free_refs()

    def take(self, n: int) -> bytearray:
        """A bytearray of exactly ``n`` bytes, to be filled whole by the caller."""
        if n < MIN_POOLED or self.max_bytes == 0:
            return bytearray(n)
        with self._lock:
            q = self._by_size.get(n)
            if q is None:
                q = self._by_size[n] = deque()
            for _ in range(min(PROBES, len(q))):
                b = q[0]
                if _getrefcount(b) == self._free:
                    if len(b) == n:
                        q.rotate(-1)  # handed out: to the back, the oldest is looked at first
                        self.reused += 1
                        return b
                    q.popleft()  # resized by its last owner: not ours to guess about
                    self.held -= n
                else:
                    q.rotate(-1)
                b = None
            if self.held + n > self.max_bytes:
                return bytearray(n)
            b = bytearray(n)
            q.append(b)
            self.held += n
            return b

    def clear(self) -> None:
        """Forget every buffer (results still held stay valid: they are plain bytearrays)."""
        with self._lock:
            self._by_size.clear()
            self.held = 0
