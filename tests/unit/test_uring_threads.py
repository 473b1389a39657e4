"""kvstored._uring.Ring used from several threads (native/uring.c, the threads rule): wait()
blocks with the GIL released, and a completion another thread reaps meanwhile is one that
wait never sees (liburing goes back to sleep for it: a hang when no other op is in flight).
So while a thread waits, reap() and wait() from another are refused with a RuntimeError, as
close() is; the wait returns its completion. Each case runs in a child process with a
bounded timeout, so a regression is a failure, not a hung test run."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

_uring = pytest.importorskip(
    "kvstored._uring", reason="native binding not built (needs liburing-dev at install: make install)")

# The child: a thread waits for a pipe read (it completes only when the pipe is written);
# once it is blocked in io_uring_enter the main thread tries `case` on the ring while it
# writes the pipe, spinning on reap()/wait() so that it would take the waiter's completion
# first if it could. Exit 0 and "ok" when the waiter got its completion and every attempt
# by the other thread was refused; 3 when a thread hangs (a watchdog ends the child); 4 when
# the ring answered the other thread.
_CHILD = r'''
import os, sys, threading, time
from kvstored import _uring

case = sys.argv[1]
r = _uring.Ring(8)
rd, wr = os.pipe()
buf = bytearray(16)
r.prep(False, rd, 0, [buf], 1)
r.submit()
got, tids = [], []

def waiter():
    tids.append(threading.get_native_id())
    got.extend(r.wait(1))

def in_io_uring_enter(tid):  # syscall 426 on every Linux arch
    try:
        with open(f"/proc/self/task/{tid}/syscall") as f:
            return f.read().split()[0] == "426"
    except (OSError, IndexError):
        return False

def watchdog():  # a hang (the waiter's, or this thread's in wait) ends the child
    time.sleep(30)
    print(f"hangs: the other thread took {answered}"); sys.stdout.flush(); os._exit(3)

t = threading.Thread(target=waiter, daemon=True)
t.start()
deadline = time.monotonic() + 30
while time.monotonic() < deadline and not (tids and in_io_uring_enter(tids[0])):
    time.sleep(0.005)
if not (tids and in_io_uring_enter(tids[0])):
    print("the waiter never blocked"); sys.exit(5)
refused, answered = 0, []
threading.Thread(target=watchdog, daemon=True).start()

def attempt():
    global refused
    try:
        answered.extend(r.reap() if case == "reap" else r.wait(1))
    except RuntimeError as e:
        assert "another thread" in str(e), e
        refused += 1

threading.Timer(0.2, os.write, (wr, b"hello")).start()  # a wait() by this thread returns then
attempt()
spin_until = time.monotonic() + 0.5
while time.monotonic() < spin_until and t.is_alive():  # race the waiter for its completion
    attempt()
t.join(20)
if t.is_alive():
    print(f"hangs: the other thread took {answered}"); sys.stdout.flush(); os._exit(3)
if answered:
    print(f"the other thread was answered: {answered}"); sys.exit(4)
assert got == [(1, 5)] and buf[:5] == b"hello", got
assert refused >= 1 and r.inflight == 0
assert r.reap() == [] and r.wait(1) == []  # the waiter gone: this thread may reap and wait
r.close()
print("ok")
'''


@pytest.mark.parametrize("case", ["reap", "wait"])
def test_a_second_thread_cannot_take_a_waiters_completion(case):
    try:
        _uring.Ring(8).close()
    except OSError as e:  # e.g. seccomp in a container, or an emulator without io_uring
        pytest.skip(f"io_uring refused by this kernel: {e}")
    if not os.path.exists(f"/proc/self/task/{os.getpid()}/syscall"):
        pytest.skip("no /proc/<pid>/task/<tid>/syscall to see the waiter block")
    done = subprocess.run([sys.executable, "-c", _CHILD, case], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", (
        f"rc={done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
