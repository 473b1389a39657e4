"""Where the copies of a call run: a per-thread side CUDA stream (which first waits
for the caller's stream), or worker threads for CPU gather / scatter overlapped with
the network, or inline; ``_Copier`` hands back something to wait for.
"""
from __future__ import annotations

import concurrent.futures
import threading
from typing import Callable

import torch


_streams = threading.local()


def _side_stream(device: torch.device):
    """This thread's side stream on ``device`` (created once)."""
    table = getattr(_streams, "table", None)
    if table is None:
        table = _streams.table = {}
    idx = device.index if device.index is not None else torch.cuda.current_device()
    s = table.get(idx)
    if s is None:
        s = table[idx] = torch.cuda.Stream(device=idx)
    return s


_executor: concurrent.futures.ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _copy_thread() -> concurrent.futures.ThreadPoolExecutor:
    """Worker threads for CPU gather / scatter overlapped with the network (shared)."""
    global _executor
    if _executor is None:
        with _executor_lock:
            if _executor is None:
                _executor = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="kvstore-torch")
    return _executor


class _Copier:
    """Runs the copies of a call and hands back something to wait for.

    CUDA: queued on the side stream (which first waits for the caller's stream), an
    event per step. CPU with ``overlap``: on a worker thread (the memcpy releases the
    GIL), a future per step. Otherwise at once (nothing to wait for)."""

    def __init__(self, device: torch.device | None, overlap: bool = False):
        self.device = device
        self.stream = None
        self.overlap = overlap and device is None
        self.pending: list = []
        if device is not None:
            self.stream = _side_stream(device)
            self.stream.wait_stream(torch.cuda.current_stream(device))

    def run(self, fn: Callable[[], None]):
        if self.stream is not None:
            with torch.cuda.stream(self.stream), torch.inference_mode():
                fn()
            ev = torch.cuda.Event()
            ev.record(self.stream)
            return ev
        if self.overlap:
            fut = _copy_thread().submit(_in_inference_mode, fn)
            self.pending.append(fut)
            return fut
        with torch.inference_mode():
            fn()
        return None

    def drain(self) -> None:
        """Wait for everything queued (errors are the plan's to report, not this wait's)."""
        if self.stream is not None:
            self.stream.synchronize()
        for f in self.pending:
            try:
                f.result()
            except BaseException:
                pass
        self.pending.clear()


def _in_inference_mode(fn) -> None:
    with torch.inference_mode():
        fn()
