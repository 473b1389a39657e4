"""Asynchronous positional I/O for the NVMe tier: io_uring, or a thread pool.

Both backends take lists of buffers (memoryviews) and complete asyncio
futures. Buffers must stay alive and unchanged until the future is done; with
O_DIRECT they must be 4 KiB aligned (arena slots and the header pool are).

io_uring goes through our own binding, ``kvstored._uring`` (native/uring.c over the
system liburing, compiled for the build machine's baseline ISA). The PyPI ``liburing``
wheel it replaces executed AVX-512 instructions and killed the daemon with SIGILL on CPUs
without them. Before the first ring is made, a child process opens a ring and does one
read and one write (``probe_uring``): whatever the kernel, seccomp or the CPU does to
it, the daemon survives and falls back. Completions are signalled on an eventfd the event
loop watches. When io_uring cannot be used, ``open_backend`` falls back to
``os.pwritev`` / ``os.preadv`` in worker threads, logs a warning with the reason, and
the tier reports ``io_backend="threads"`` with ``io_backend_reason`` (metrics
``kvstored_tier_io_backend_fallback``, ``kvstore-cli status``).
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import errno
import itertools
import logging
import mmap
import os
import signal
import subprocess
import sys

log = logging.getLogger("kvstored.nvme")

BLOCK = 4096


class HeaderPool:
    """4 KiB aligned header blocks for O_DIRECT writes (anonymous mmap is page aligned).

    ``take_wait`` also bounds the I/O in flight: a caller that finds every block in use
    waits for one, so a burst of tens of thousands of tombstones (a large Delete, an admin
    DeleteAll) holds ``count`` blocks, not one mapping each: a mapping per record ran into
    the kernel's ``vm.max_map_count`` (65,530 by default) and failed with ENOMEM."""

    def __init__(self, count: int):
        self.mm = mmap.mmap(-1, count * BLOCK)
        self.view = memoryview(self.mm)
        self.free = list(range(count))
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self.waits = 0  # takes that had to wait (tier stats: header_waits)

    def take(self) -> tuple[int, memoryview] | None:
        if not self.free:
            return None
        i = self.free.pop()
        return i, self.view[i * BLOCK:(i + 1) * BLOCK]

    async def take_wait(self) -> tuple[int, memoryview]:
        """A block, waiting (first come, first served) while all are in use."""
        hdr = self.take() if not self._waiters else None
        if hdr is not None:
            return hdr
        self.waits += 1
        while True:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            except BaseException:
                if fut.done() and not fut.cancelled():
                    self._wake()  # woken, then cancelled: the block goes to the next waiter
                raise
            hdr = self.take()
            if hdr is not None:
                return hdr

    def give(self, i: int) -> None:
        self.free.append(i)
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(None)
                return


class ThreadBackend:
    name = "threads"
    reason = ""  # why io_uring is not used, when it was wanted

    def __init__(self, fd: int, queue_depth: int):
        self.fd = fd
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(2, min(queue_depth, 16)),
                                                          thread_name_prefix="nvme-io")

    async def writev(self, offset: int, bufs: list) -> int:
        return await asyncio.get_running_loop().run_in_executor(self.pool, _pwritev_all, self.fd, bufs, offset)

    async def readv(self, offset: int, bufs: list) -> int:
        return await asyncio.get_running_loop().run_in_executor(self.pool, os.preadv, self.fd, bufs, offset)

    def writev_many(self, reqs: list) -> list[asyncio.Future]:
        """Start a write of every ``(offset, bufs)`` in ``reqs``; a future (bytes written) each."""
        loop = asyncio.get_running_loop()
        return [loop.run_in_executor(self.pool, _pwritev_all, self.fd, bufs, offset)
                for offset, bufs in reqs]

    def read_many(self, reqs: list) -> list[int]:
        """Blocking: read every ``(offset, buf)`` in ``reqs``, up to the pool's width at once
        (for the restart, before any asynchronous I/O). Bytes read per request, or -errno."""
        return list(self.pool.map(lambda req: _pread_or_errno(self.fd, req), reqs))

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def _pread_or_errno(fd: int, req) -> int:
    offset, buf = req
    try:
        return os.preadv(fd, [buf], offset)
    except OSError as e:
        return -(e.errno or errno.EIO)


def _pwritev_all(fd: int, bufs: list, offset: int) -> int:
    total = sum(len(b) for b in bufs)
    n = os.pwritev(fd, bufs, offset)
    if n != total:  # short write: retry the rest once, flattened
        rest = b"".join(bytes(b) for b in bufs)[n:]
        n += os.pwrite(fd, rest, offset + n)
    return n


class UringBackend:
    name = "io_uring"
    reason = ""

    def __init__(self, fd: int, queue_depth: int):
        from kvstored import _uring  # the native binding; ImportError -> threads

        self.fd = fd
        self.depth = max(queue_depth, 8)
        self.ring = _uring.Ring(self.depth)
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            self.ring.register_eventfd(self.efd)
        except BaseException:
            self.ring.close()
            os.close(self.efd)
            raise
        self.futures: dict[int, asyncio.Future] = {}
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

    def writev_many(self, reqs: list) -> list[asyncio.Future]:
        """Start a write of every ``(offset, bufs)`` in ``reqs`` with one submission (the
        demotion writer's batch); a future (bytes written) each."""
        if self.closed:
            raise OSError("io_uring backend is closed")
        self._attach()
        futs = []
        for offset, bufs in reqs:
            fut = self.loop.create_future()
            if len(self.futures) >= self.depth:
                self.waiting.append((True, offset, bufs, fut))
            else:
                self._prep(True, offset, bufs, fut)
            futs.append(fut)
        self.ring.submit()
        return futs

    def _submit(self, write: bool, offset: int, bufs: list) -> asyncio.Future:
        if self.closed:
            raise OSError("io_uring backend is closed")
        self._attach()
        fut = self.loop.create_future()
        if len(self.futures) >= self.depth:
            self.waiting.append((write, offset, bufs, fut))
        else:
            self._prep(write, offset, bufs, fut)
            self.ring.submit()
        return fut

    def read_many(self, reqs: list) -> list[int]:
        """Blocking: read every ``(offset, buf)`` in ``reqs`` with up to the queue depth in
        flight (one submit per batch, not one syscall per read). For the restart, before
        any asynchronous I/O: the ring must be idle. Bytes read per request, or -errno."""
        if self.closed:
            raise OSError("io_uring backend is closed")
        if self.futures or self.waiting or self.ring.inflight:
            raise RuntimeError("read_many needs an idle ring (asynchronous I/O is in flight)")
        results = [0] * len(reqs)
        nxt = 0
        while nxt < len(reqs) or self.ring.inflight:
            while nxt < len(reqs) and self.ring.inflight < self.depth:
                offset, buf = reqs[nxt]
                try:
                    # user_data = index + 1 (0 is never handed out by _prep's ids either way)
                    queued = self.ring.prep(False, self.fd, offset, [buf], nxt + 1)
                except (ValueError, TypeError, BufferError):
                    results[nxt] = -errno.EINVAL
                    nxt += 1
                    continue
                if not queued:
                    break
                nxt += 1
            self.ring.submit()
            for uid, res in self.ring.wait(1):
                results[uid - 1] = res
        return results

    def _prep(self, write: bool, offset: int, bufs: list, fut: asyncio.Future) -> None:
        uid = next(self.ids)
        # the ring holds buffer views until the completion is reaped (native/uring.c)
        try:
            queued = self.ring.prep(write, self.fd, offset, bufs, uid)
            if not queued:
                self.ring.submit()  # queue full (should not happen below depth): flush and retry
                queued = self.ring.prep(write, self.fd, offset, bufs, uid)
        except (ValueError, TypeError, BufferError) as e:  # bad offset or buffer: this op only
            fut.set_exception(OSError(errno.EINVAL, f"bad NVMe I/O request: {e}"))
            return
        if not queued:
            fut.set_exception(OSError(errno.EAGAIN, "io_uring submission queue full"))
            return
        self.futures[uid] = fut

    def _reap(self) -> None:
        try:
            os.eventfd_read(self.efd)
        except BlockingIOError:
            pass
        self._complete(self.ring.reap())
        submitted = False
        while self.waiting and len(self.futures) < self.depth:
            write, offset, bufs, fut = self.waiting.popleft()
            self._prep(write, offset, bufs, fut)
            submitted = True
        if submitted:
            self.ring.submit()

    def _complete(self, done: list) -> None:
        for uid, res in done:
            fut = self.futures.pop(uid, None)
            if fut is None or fut.done():
                continue
            if res < 0:
                fut.set_exception(OSError(-res, os.strerror(-res)))
            else:
                fut.set_result(res)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.loop is not None:
            self.loop.remove_reader(self.efd)
        for _w, _o, _b, fut in self.waiting:
            if not fut.done():
                fut.set_exception(OSError("NVMe tier closed"))
        self.waiting.clear()
        # the kernel must finish with our buffers before they go away: close() waits for
        # what is in flight (GIL released) and only then tears the ring down
        self.ring.close()
        for fut in self.futures.values():
            if not fut.done():
                fut.set_exception(OSError("NVMe tier closed"))
        self.futures.clear()
        os.close(self.efd)


_PROBE = r"""
import mmap, os, sys, tempfile
from kvstored import _uring
r = _uring.Ring(8)
d = sys.argv[1]
fd, path = tempfile.mkstemp(prefix=".kvstored-uring-probe-", dir=d)
try:
    os.unlink(path)
    w = bytearray(b"k" * 4096)
    r.prep(True, fd, 0, [w], 1); r.submit()
    (uid, res), = r.wait(1)
    assert (uid, res) == (1, 4096), (uid, res)
    b = bytearray(4096)
    r.prep(False, fd, 0, [memoryview(b)], 2); r.submit()
    (uid, res), = r.wait(1)
    assert (uid, res) == (2, 4096) and b == w, (uid, res)
finally:
    os.close(fd)
    r.close()
print("ok")
"""

_probe_result: dict[str, str] = {}


def probe_uring(directory: str, timeout: float = 20.0) -> str:
    """"" when io_uring works here, else why not. Runs in a child process, so an illegal
    instruction, a seccomp kill or a hang costs the child, never the daemon. One probe
    per process and directory."""
    if directory in _probe_result:
        return _probe_result[directory]
    try:
        import importlib.util
        if importlib.util.find_spec("kvstored._uring") is None:
            reason = ("kvstored was installed without its native io_uring binding "
                      "(build needs liburing's headers: apt-get install liburing-dev, then reinstall)")
            _probe_result[directory] = reason
            return reason
    except (ImportError, ValueError) as e:
        _probe_result[directory] = f"cannot look for kvstored._uring: {e}"
        return _probe_result[directory]
    env = dict(os.environ)
    # the child must import the same kvstored as this process, installed or from a checkout
    pkg_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        p = subprocess.run([sys.executable, "-c", _PROBE, directory], capture_output=True,
                           timeout=timeout, env=env, text=True)
    except subprocess.TimeoutExpired:
        reason = f"io_uring probe did not finish in {timeout:.0f} s"
    except OSError as e:
        reason = f"io_uring probe could not start: {e}"
    else:
        if p.returncode == 0 and p.stdout.strip().endswith("ok"):
            reason = ""
        elif p.returncode < 0:
            try:
                sig = signal.Signals(-p.returncode).name
            except ValueError:
                sig = f"signal {-p.returncode}"
            reason = f"io_uring probe died with {sig}" + (
                " (a CPU instruction this machine lacks)" if sig == "SIGILL" else "")
        else:
            last = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
            reason = f"io_uring probe failed: {last[:300]}"
    _probe_result[directory] = reason
    return reason


def open_backend(fd: int, preference: str, queue_depth: int, directory: str | None = None):
    """The I/O backend for ``fd``: io_uring unless it cannot run here or is not wanted.
    ``directory``: where the probe may create a scratch file (the tier's file system)."""
    if preference in ("auto", "io_uring"):
        reason = probe_uring(directory or os.getcwd())
        if not reason:
            try:
                return UringBackend(fd, queue_depth)
            except (ImportError, OSError) as e:
                reason = f"io_uring unavailable: {e}"
        if preference == "io_uring":
            raise OSError(f"nvme.io_backend = io_uring, but it cannot run here: {reason}")
        log.warning("NVMe tier falls back to pread/pwrite threads: %s", reason)
        backend = ThreadBackend(fd, queue_depth)
        backend.reason = reason
        return backend
    return ThreadBackend(fd, queue_depth)
