"""The native io_uring binding (native/uring.c -> kvstored._uring) and the NVMe tier's choice
of backend: round trips, ring wrap-around, errors, bad arguments, buffers kept alive while the
kernel uses them, and the loud fallback when io_uring cannot run (probe killed by a signal,
binding missing, io_uring refused)."""
from __future__ import annotations

import asyncio
import gc
import logging
import mmap
import os
import shutil
import subprocess
import time

import pytest

from kvstored.engine import nvmeio

# the tier, its scan and io_uring on their own: no index (tests/engine/conftest.py)
pytestmark = pytest.mark.index_free

_uring = pytest.importorskip(
    "kvstored._uring", reason="native binding not built (needs liburing-dev at install: make install)")

BLOCK = 4096


def _ring_or_skip(entries=8):
    try:
        return _uring.Ring(entries)
    except OSError as e:  # e.g. seccomp in a container, or an emulator without io_uring
        pytest.skip(f"io_uring refused by this kernel: {e}")


@pytest.fixture
def fd(tmp_path):
    fd = os.open(tmp_path / "f.dat", os.O_RDWR | os.O_CREAT, 0o600)
    yield fd
    os.close(fd)


def test_write_then_read_vectored(fd):
    r = _ring_or_skip()
    a, b = bytearray(b"a" * BLOCK), bytearray(b"b" * 100)
    assert r.prep(True, fd, 8192, [a, memoryview(b)], 7) is True
    assert r.inflight == 1
    r.submit()
    assert r.wait(1) == [(7, BLOCK + 100)]
    assert r.inflight == 0
    out1, out2 = bytearray(BLOCK), bytearray(100)
    r.prep(False, fd, 8192, [out1, memoryview(out2)], 8)
    r.submit()
    assert r.wait(1) == [(8, BLOCK + 100)]
    assert out1 == a and out2 == b
    assert os.pread(fd, 3, 8192) == b"aaa"
    r.close()
    r.close()  # idempotent


def test_many_ops_wrap_the_completion_ring(fd):
    """Far more completions than the ring has entries: results stay right after the rings wrap
    (the PyPI wheel's documented cqe[i] indexing returned garbage here)."""
    r = _ring_or_skip(4)
    n = 200
    bufs = [bytearray(bytes([i % 251]) * 512) for i in range(n)]
    got = {}
    for i in range(n):
        while not r.prep(True, fd, i * 512, [bufs[i]], i):  # SQ full: submit and reap
            r.submit()
            got.update(r.wait(1))
        if r.inflight >= 4:
            r.submit()
            got.update(r.wait(1))
    r.submit()
    while r.inflight:
        got.update(r.wait(1))
    assert got == {i: 512 for i in range(n)}
    data = os.pread(fd, n * 512, 0)
    assert all(data[i * 512:(i + 1) * 512] == bufs[i] for i in range(n))
    r.close()


def test_errors_come_back_as_negative_errno(tmp_path):
    r = _ring_or_skip()
    ro = os.open(tmp_path / "ro.dat", os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        r.prep(True, ro, 0, [bytearray(10)], 1)  # write to a read-only fd
        r.prep(False, 987654, 0, [bytearray(10)], 2)  # not an fd
        r.submit()
        res = dict(r.wait(2))
        assert res == {1: -9, 2: -9}  # EBADF
    finally:
        os.close(ro)
        r.close()


def test_bad_arguments_are_typed_errors(fd):
    r = _ring_or_skip()
    with pytest.raises(ValueError):
        r.prep(False, fd, -1, [bytearray(1)], 1)
    with pytest.raises(ValueError):
        r.prep(False, fd, 0, [], 1)
    with pytest.raises(TypeError):
        r.prep(False, fd, 0, [object()], 1)
    with pytest.raises(BufferError):  # a read needs writable memory
        r.prep(False, fd, 0, [b"immutable"], 1)
    with pytest.raises(TypeError):
        r.prep(False, fd, 0, 5, 1)
    with pytest.raises(ValueError):
        _uring.Ring(0)
    # the rejected preps took no slot that stays in flight
    r.submit()
    assert r.inflight == 0 and r.wait(1) == []
    r.close()
    with pytest.raises(ValueError, match="closed"):
        r.submit()


def test_buffers_stay_alive_until_reaped(fd):
    """The ring holds its own reference to every buffer until the completion is reaped, so a
    caller dropping its reference cannot make the kernel write into freed memory."""
    r = _ring_or_skip()
    os.pwrite(fd, b"z" * BLOCK, 0)
    mm = mmap.mmap(-1, BLOCK)
    r.prep(False, fd, 0, [mm], 1)
    with pytest.raises(BufferError):  # exported to the ring: cannot be closed under it
        mm.close()
    r.submit()
    r.wait(1)
    assert mm[:1] == b"z"
    mm.close()  # released once reaped
    r.close()


def test_close_waits_for_ops_in_flight(fd):
    r = _ring_or_skip()
    bufs = [bytearray(BLOCK) for _ in range(6)]
    for i, b in enumerate(bufs):
        r.prep(False, fd, 0, [b], i)
    r.submit()
    r.close()  # must not free what the kernel may still write into
    assert r.inflight == 0
    del r
    gc.collect()


def test_backend_through_asyncio(tmp_path):
    fd = os.open(tmp_path / "b.dat", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        _ring_or_skip().close()
        be = nvmeio.open_backend(fd, "io_uring", 4, str(tmp_path))
        assert be.name == "io_uring" and be.reason == ""

        async def run():
            bufs = [bytearray(bytes([i]) * BLOCK) for i in range(40)]  # 10x the queue depth
            ns = await asyncio.gather(*(be.writev(i * BLOCK, [bufs[i]]) for i in range(40)))
            assert ns == [BLOCK] * 40
            outs = [bytearray(BLOCK) for _ in range(40)]
            ns = await asyncio.gather(*(be.readv(i * BLOCK, [outs[i]]) for i in range(40)))
            assert ns == [BLOCK] * 40 and outs == bufs
            with pytest.raises(OSError):
                await be.readv(-5, [bytearray(1)])  # negative offset: a typed error, loop alive
            be.close()
            with pytest.raises(OSError, match="closed"):
                await be.readv(0, [bytearray(1)])

        asyncio.run(run())
    finally:
        os.close(fd)


def test_fallback_when_the_probe_dies_is_loud(tmp_path, monkeypatch, caplog):
    """A native backend that cannot run here (illegal instruction, seccomp kill) costs the probe
    child, never the daemon: the tier runs on threads and says why."""
    monkeypatch.setattr(nvmeio, "_PROBE", "import os, signal; os.kill(os.getpid(), signal.SIGILL)")
    monkeypatch.setattr(nvmeio, "_probe_result", {})
    fd = os.open(tmp_path / "c.dat", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with caplog.at_level(logging.WARNING, logger="kvstored.nvme"):
            be = nvmeio.open_backend(fd, "auto", 8, str(tmp_path))
        assert be.name == "threads"
        assert "SIGILL" in be.reason and "instruction" in be.reason
        assert any("falls back" in r.message and "SIGILL" in r.message for r in caplog.records)
        be.close()
        with pytest.raises(OSError, match="cannot run here: io_uring probe died with SIGILL"):
            nvmeio.open_backend(fd, "io_uring", 8, str(tmp_path))
        # asked for threads: no probe, no reason
        be = nvmeio.open_backend(fd, "threads", 8, str(tmp_path))
        assert be.name == "threads" and be.reason == ""
        be.close()
    finally:
        os.close(fd)


def test_fallback_when_the_binding_is_missing(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "kvstored._uring" else real(name, *a))
    monkeypatch.setattr(nvmeio, "_probe_result", {})
    fd = os.open(tmp_path / "d.dat", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        be = nvmeio.open_backend(fd, "auto", 8, str(tmp_path))
        assert be.name == "threads" and "liburing-dev" in be.reason
        be.close()
    finally:
        os.close(fd)


def test_the_binding_has_no_avx512():
    """Built for the baseline ISA: no zmm registers (AVX-512) anywhere in the binding or the
    liburing it links. (PyPI liburing 2026.3.30 had them and died with SIGILL.)"""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump not installed (binutils)")
    paths = [_uring.__file__]
    ldd = subprocess.run(["ldd", _uring.__file__], capture_output=True, text=True).stdout
    paths += [line.split("=>")[1].split()[0] for line in ldd.splitlines()
              if "liburing" in line and "=>" in line]
    for p in paths:
        dis = subprocess.run([objdump, "-d", p], capture_output=True, text=True, timeout=60).stdout
        assert dis, p
        assert "%zmm" not in dis, f"{p} uses AVX-512 registers"


# Run in a child: before the fix these crashed (a double free, or a read of an unmapped
# completion ring), which must fail this test rather than take the test worker down.
_REENTRY = r'''
import os, sys
from kvstored import _uring

fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
r = _uring.Ring(8)
nested = []

class Owner(bytearray):
    """A buffer whose last reference goes when the ring releases it, running Python that
    calls back into the ring that is reaping it."""
    def __del__(self):
        if self.action in ("reap", "wait") and not closed(r):
            nested.extend(r.reap() if self.action == "reap" else r.wait(1))
        elif self.action == "close":
            r.close()
        elif self.action == "prep":  # queue more work from inside the reap
            assert r.prep(True, fd, 0, [bytearray(b"x" * 64)], 100 + self.uid) is True

def queue(action, n, ring):
    for i in range(n):
        b = Owner(b"%d" % i * 64)
        b.action, b.uid = action, i + 1
        assert ring.prep(True, fd, i * 64, [b], i + 1) is True
        del b  # the ring's view holds the last reference

def closed(ring):
    try:
        ring.submit()
    except ValueError as e:
        return "closed" in str(e)
    return False

def round_trip(action, n):
    queue(action, n, r)
    r.submit()
    got = []
    while r.inflight and len(got) + len(nested) < n:
        got += r.wait(1)
    return got

for action in ("reap", "wait"):
    nested.clear()
    got = round_trip(action, 4)
    ids = sorted(u for u, _ in got + nested)
    assert ids == [1, 2, 3, 4], (action, got, nested)  # each completion exactly once
    assert all(res == 64 for _, res in got + nested), (got, nested)
    assert r.inflight == 0, r.inflight

got = round_trip("prep", 3)  # each release queues one more write: they complete too
r.submit()
while r.inflight:
    got += r.wait(1)
assert sorted(u for u, _ in got) == [1, 2, 3, 101, 102, 103], got
assert r.inflight == 0

queue("close", 3, r)
r.submit()
got = r.wait(3)  # all three in one reap; the first release closes the ring under it
assert sorted(u for u, _ in got) == [1, 2, 3], got
assert r.inflight == 0 and closed(r)
r.close()

r = _uring.Ring(8)  # close() whose drain releases owners that close (and reap) again
queue("close", 2, r)
queue("reap", 1, r)
r.close()  # not submitted: the drain submits them, then waits
assert r.inflight == 0 and closed(r)
print("ok")
'''


def test_buffer_owner_released_during_a_reap_may_call_back_into_the_ring(tmp_path):
    """A completion's buffer owner freed while the ring reaps runs Python (its __del__ here; the
    GC in general) that may reap, wait, queue more work or close the ring: every completion is
    returned exactly once, nothing is freed twice and a close under the reap is safe."""
    _run_ring_script(_REENTRY, tmp_path / "r.dat", 120, "a reap with re-entering owners hung")


def _run_ring_script(script: str, path, timeout: float, hung: str) -> None:
    """Runs ``script`` (it prints "ok") in a child process: a wait that hangs fails the
    test with ``hung`` instead of hanging the run."""
    _ring_or_skip().close()
    import sys
    try:
        done = subprocess.run([sys.executable, "-c", script, str(path)],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(hung)
    assert done.returncode == 0 and done.stdout.strip() == "ok", (
        f"rc={done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")


_WAIT_UNSUBMITTED = r'''
import os, sys
from kvstored import _uring
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
r = _uring.Ring(8)
assert r.prep(True, fd, 0, [bytearray(b"y" * 64)], 7) is True  # queued, not submitted
got = r.wait(1)
assert got == [(7, 64)] and r.inflight == 0, (got, r.inflight)
r.close()
print("ok")
'''


def test_wait_submits_what_is_queued_first(tmp_path):
    """An op prepped and not submitted counts in ``inflight``: wait() submits it before it
    blocks. It used to wait for it for ever (the re-entry test above hung now and then when
    a released owner's Python queued a write during a reap: 4 of 35 runs in session 17)."""
    _run_ring_script(_WAIT_UNSUBMITTED, tmp_path / "w.dat", 30,
                     "wait() never returned for an op that was prepped and not submitted")


_WAIT_REFUSED_SUBMIT = r'''
import errno, os, sys
from kvstored import _uring
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
rd, wr = os.pipe()
r = _uring.Ring(8)
# 1. a pipe read the kernel took (it completes once data is written), then a file write whose
#    submit the kernel refuses (EAGAIN): wait(2) waits for what the kernel took only.
pipe_buf = bytearray(4)
r.prep(False, rd, 0, [pipe_buf], 1)
r.submit()
r.prep(True, fd, 0, [bytearray(b"z" * 64)], 2)
r._fail_submits(errno.EAGAIN, 1)
os.write(wr, b"ping")
got = r.wait(2)
assert got == [(1, 4)], got
assert r.inflight == 1, r.inflight        # the refused write is still queued...
assert r.wait(1) == [(2, 64)]             # ...and the next wait submits it
# 2. nothing the kernel took and every submit refused (EBUSY): a typed error, not a hang;
#    the op stays queued and a later wait completes it.
r.prep(True, fd, 4096, [bytearray(b"q" * 64)], 3)
r._fail_submits(errno.EBUSY, 10 ** 6)
try:
    r.wait(1)
except BlockingIOError as e:
    assert "queued" in str(e), e
else:
    raise AssertionError("wait() returned with every submit refused")
assert r.inflight == 1
r._fail_submits(errno.EBUSY, 0)
assert r.wait(1) == [(3, 64)]
# 3. a refused submit that the kernel takes on a retry: wait() returns the completion
r.prep(True, fd, 8192, [bytearray(b"r" * 64)], 4)
r._fail_submits(errno.EAGAIN, 3)
assert r.wait(1) == [(4, 64)]
try:
    r._fail_submits(0, 1)
except ValueError:
    pass
else:
    raise AssertionError("errno 0 accepted")
r.close()
print("ok")
'''


def test_wait_waits_only_for_what_the_kernel_took(tmp_path):
    """A submit the kernel refuses (-EAGAIN, -EBUSY) leaves ops queued: wait() waits for the
    ops it did take, retries the submit a bounded number of times when it took none, then
    raises BlockingIOError with the ops still queued. It used to wait for the refused ops too,
    for ever (found by session 17's review)."""
    _run_ring_script(_WAIT_REFUSED_SUBMIT, tmp_path / "w.dat", 60,
                     "wait() hung on ops whose submit the kernel refused")


def _in_io_uring_enter(tid: int) -> bool:
    """Whether thread tid is blocked in io_uring_enter (syscall 426 on every Linux arch)."""
    try:
        with open(f"/proc/self/task/{tid}/syscall") as f:
            return f.read().split()[0] == "426"
    except (OSError, IndexError):
        return False


def test_close_from_another_thread_during_a_wait_is_refused(tmp_path):
    """wait() blocks with the GIL released; a close() from another thread meanwhile would unmap
    the ring under it. It is refused with a typed error; the wait still completes."""
    import threading
    if not os.path.exists(f"/proc/self/task/{threading.get_native_id()}/syscall"):
        pytest.skip("no /proc/<pid>/task/<tid>/syscall to see the waiter block")
    r = _ring_or_skip()
    rd, wr = os.pipe()
    try:
        buf = bytearray(16)
        r.prep(False, rd, 0, [buf], 1)  # a pipe read completes only when data is written
        r.submit()
        got, tids = [], []

        def wait():
            tids.append(threading.get_native_id())
            got.extend(r.wait(1))

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (tids and _in_io_uring_enter(tids[0])):
            time.sleep(0.005)
        assert tids and _in_io_uring_enter(tids[0]), "the waiter never blocked in wait()"
        closed = []

        def close():
            try:
                r.close()
                closed.append("closed")
            except RuntimeError as e:
                closed.append(str(e))

        closer = threading.Thread(target=close, daemon=True)
        closer.start()
        closer.join(30)  # refused at once; before the fix it blocked until the read completed
        os.write(wr, b"hello")
        waiter.join(30)
        closer.join(30)
        assert not waiter.is_alive() and not closer.is_alive()
        assert len(closed) == 1 and "another thread" in closed[0], closed
        assert got == [(1, 5)] and buf[:5] == b"hello"
        r.close()
        assert r.inflight == 0
    finally:
        os.close(rd)
        os.close(wr)
