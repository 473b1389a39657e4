"""A real kvstored process for tests (imported by conftest.py and by tests that need the class)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOCKET_DIR_MAX = 80  # + "/kvstored-<port>.sock" stays within a Unix socket path's 107 bytes


class Daemon:
    """A kvstored subprocess started with --port 0 --data-port 0 and a ready file."""

    def __init__(self, tmp: Path, *args: str, env: dict | None = None, wrapper: list[str] | None = None):
        """``wrapper``: a command to run the interpreter under (e.g. qemu-x86_64 -cpu ...)."""
        self.tmp = tmp
        self.ready_file = tmp / f"ready-{time.monotonic_ns()}.json"
        self.log_path = tmp / f"kvstored-{time.monotonic_ns()}.log"
        self.args = ["--host", "127.0.0.1", "--port", "0", "--data-port", "0",
                     "--dram-size", "64MiB", "--slab-size", "4MiB", "--max-value-size", "4MiB",
                     "--metrics-port", "0",  # never the shared default 9090 (tests run side by side)
                     "--ready-file", str(self.ready_file), *args]
        self.env = env
        self.wrapper = list(wrapper or [])
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}

    # the ready wait is long on purpose: a loaded CI machine (two xdist workers, several
    # clusters starting at once) can take tens of seconds to import and start a node, and
    # a node that cannot start exits (seen at once) rather than running into this bound
    def start(self, timeout: float = 60.0) -> "Daemon":
        return self.launch().wait_ready(timeout)

    def launch(self) -> "Daemon":
        """Start the process without waiting for it (start_all: several start at once)."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "client"), str(ROOT), env.get("PYTHONPATH", "")])
        # the default shm socket (<tmpdir>/kvstored-<port>.sock) goes into the test's own
        # directory: a daemon a test kills leaves its socket there, not in the shared /tmp
        # (sun_path holds 107 bytes; a deeper directory keeps the system's tmpdir)
        if len(str(self.tmp)) <= SOCKET_DIR_MAX:
            env["TMPDIR"] = str(self.tmp)
        env.update(self.env or {})
        self._log = open(self.log_path, "ab")
        # cwd: the test's own directory. `python -m` puts the cwd first on sys.path, so a
        # daemon started from another checkout's directory (a benchmark run from a copied
        # tree) would import that checkout's kvstored instead of ROOT's
        self.proc = subprocess.Popen([*self.wrapper, sys.executable, "-m", "kvstored", *self.args],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     cwd=self.tmp)
        return self

    def wait_ready(self, timeout: float = 60.0) -> "Daemon":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready_file.exists():
                self.info = json.loads(self.ready_file.read_text())
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvstored exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"kvstored not ready within {timeout}s:\n{self.log()}")

    @property
    def control(self) -> str:
        return f"127.0.0.1:{self.info['control_port']}"

    @property
    def data_port(self) -> int:
        return self.info["data_port"]

    @property
    def metrics_url(self) -> str:
        """``http://127.0.0.1:<port>`` of the /metrics, /healthz, /readyz endpoint."""
        return f"http://127.0.0.1:{self.info['metrics_port']}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        if self.ready_file.exists():
            self.ready_file.unlink()
        return self.proc.returncode


def start_all(*daemons: Daemon, timeout: float = 60.0) -> list[Daemon]:
    """Start several daemons at once (their imports overlap), each ready on return; all
    stopped again if one fails."""
    try:
        for d in daemons:
            d.launch()
        return [d.wait_ready(timeout) for d in daemons]
    except BaseException:
        for d in daemons:
            d.stop()
        raise


def stop_all(daemons, sig: int = signal.SIGTERM) -> None:
    """Stop several daemons at once: each gets ``sig`` before any is waited for (a
    cluster's nodes drain side by side, not one after the other)."""
    for d in daemons:
        if d.alive():
            d.proc.send_signal(sig)
    for d in daemons:
        d.stop(sig)


def config(tmp_path: Path, text: str) -> str:
    """A TOML config file with ``text`` (dedented) for a daemon's --config."""
    p = tmp_path / f"cfg-{time.monotonic_ns()}.toml"
    p.write_text(textwrap.dedent(text))
    return str(p)


def counters(c) -> dict:
    """A client's view of the daemon's Stats counters."""
    return dict(c.stats().counters)


def wait_for(pred, timeout: float = 10.0) -> bool:
    """Poll ``pred`` every 50 ms for up to ``timeout`` seconds; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def _recv_exact(s, n: int) -> bytes | None:
    """``n`` bytes from a raw socket, or None when the peer hung up first."""
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def read_frame(s) -> tuple | None:
    """(kvstore.wire.Header, payload) of the next frame on a raw socket, or None when the
    peer hung up (tests that play a hand-driven client)."""
    from kvstore import wire
    hdr = _recv_exact(s, wire.HEADER_SIZE)
    if hdr is None:
        return None
    h = wire.decode(hdr)
    body = _recv_exact(s, h.length)
    return None if body is None else (h, body)
