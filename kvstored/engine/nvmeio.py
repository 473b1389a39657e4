"""Asynchronous positional I/O for the NVMe tier: io_uring, or a thread pool.

Both backends take lists of buffers (memoryviews) and complete asyncio
futures. Buffers must stay alive and unchanged until the future is done; with
O_DIRECT they must be 4 KiB aligned (arena slots and the header pool are).

io_uring (PyPI ``liburing``): completions are signalled on an eventfd the
event loop watches; reaping uses ``io_uring_cqe_iter_*`` (the plain
``cqe[i]`` indexing does not mask the ring index and breaks after wrap-around).
When the kernel refuses io_uring (seccomp, old kernel), ``open_backend`` falls
back to ``os.pwritev`` / ``os.preadv`` in worker threads, logs a warning and the
tier reports ``io_backend="threads"``.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import os

log = logging.getLogger("kvstored.nvme")


class ThreadBackend:
    name = "threads"

    def __init__(self, fd: int, queue_depth: int):
        self.fd = fd
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(2, min(queue_depth, 16)),
                                                          thread_name_prefix="nvme-io")

    async def writev(self, offset: int, bufs: list) -> int:
        return await asyncio.get_running_loop().run_in_executor(self.pool, _pwritev_all, self.fd, bufs, offset)

    async def readv(self, offset: int, bufs: list) -> int:
        return await asyncio.get_running_loop().run_in_executor(self.pool, os.preadv, self.fd, bufs, offset)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def _pwritev_all(fd: int, bufs: list, offset: int) -> int:
    total = sum(len(b) for b in bufs)
    n = os.pwritev(fd, bufs, offset)
    if n != total:  # short write: retry the rest once, flattened
        rest = b"".join(bytes(b) for b in bufs)[n:]
        n += os.pwrite(fd, rest, offset + n)
    return n


class UringBackend:
    name = "io_uring"

    def __init__(self, fd: int, queue_depth: int):
        import liburing as L  # imported here: the SDK never needs it

        self.L = L
        self.fd = fd
        self.depth = queue_depth
        self.ring = L.Ring()
        L.io_uring_queue_init(max(queue_depth, 8), self.ring)
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        L.io_uring_register_eventfd(self.ring, self.efd)
        self.cqe = L.Cqe()
        self.inflight: dict[int, tuple[asyncio.Future, object]] = {}
        self.waiting: collections.deque = collections.deque()  # ops beyond the queue depth
        self.ids = itertools.count(1)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.closed = False

    def _attach(self) -> None:
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
            self.loop.add_reader(self.efd, self._reap)

    async def writev(self, offset: int, bufs: list) -> int:
        return await self._submit(True, offset, bufs)

    async def readv(self, offset: int, bufs: list) -> int:
        return await self._submit(False, offset, bufs)

    def _submit(self, write: bool, offset: int, bufs: list) -> asyncio.Future:
        self._attach()
        fut = self.loop.create_future()
        if len(self.inflight) >= self.depth:
            self.waiting.append((write, offset, bufs, fut))
        else:
            self._prep(write, offset, bufs, fut)
            self.L.io_uring_submit(self.ring)
        return fut

    def _prep(self, write: bool, offset: int, bufs: list, fut: asyncio.Future) -> None:
        L = self.L
        sqe = L.io_uring_get_sqe(self.ring)
        iov = L.Iovec(bufs)  # holds the buffers; kept alive in self.inflight
        if write:
            L.io_uring_prep_writev(sqe, self.fd, iov, offset)
        else:
            L.io_uring_prep_readv(sqe, self.fd, iov, offset)
        uid = next(self.ids)
        L.io_uring_sqe_set_data64(sqe, uid)
        self.inflight[uid] = (fut, iov, bufs)

    def _reap(self) -> None:
        L = self.L
        try:
            os.eventfd_read(self.efd)
        except BlockingIOError:
            pass
        it = L.io_uring_cqe_iter_init(self.ring)
        n = 0
        done = []
        while L.io_uring_cqe_iter_next(it, self.cqe):
            c = self.cqe[0]
            done.append((c.user_data, c.res))
            n += 1
        if n:
            L.io_uring_cq_advance(self.ring, n)
        for uid, res in done:
            fut, _iov, _bufs = self.inflight.pop(uid, (None, None, None))
            if fut is None or fut.done():
                continue
            if res < 0:
                fut.set_exception(OSError(-res, os.strerror(-res)))
            else:
                fut.set_result(res)
        submitted = False
        while self.waiting and len(self.inflight) < self.depth:
            write, offset, bufs, fut = self.waiting.popleft()
            self._prep(write, offset, bufs, fut)
            submitted = True
        if submitted:
            L.io_uring_submit(self.ring)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        # wait (bounded) for the kernel to finish with our buffers before they go away
        L = self.L
        for _ in range(1000):
            if not self.inflight:
                break
            try:
                L.io_uring_wait_cqe(self.ring, self.cqe)
            except OSError:
                break
            self._reap_blocking()
        if self.loop is not None:
            self.loop.remove_reader(self.efd)
        L.io_uring_queue_exit(self.ring)
        os.close(self.efd)

    def _reap_blocking(self) -> None:
        L = self.L
        it = L.io_uring_cqe_iter_init(self.ring)
        n = 0
        while L.io_uring_cqe_iter_next(it, self.cqe):
            self.inflight.pop(self.cqe[0].user_data, None)
            n += 1
        if n:
            L.io_uring_cq_advance(self.ring, n)


def open_backend(fd: int, preference: str, queue_depth: int):
    """The I/O backend for ``fd``: io_uring unless refused or not wanted."""
    if preference in ("auto", "io_uring"):
        try:
            return UringBackend(fd, queue_depth)
        except (ImportError, OSError) as e:
            if preference == "io_uring":
                raise OSError(f"io_uring requested but unavailable: {e}") from e
            log.warning("io_uring unavailable (%s); NVMe tier falls back to pread/pwrite threads", e)
    return ThreadBackend(fd, queue_depth)
