"""A real etcd for cluster tests (no mocks): a single member on 127.0.0.1, free ports."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

ETCD = shutil.which("etcd")
try:
    import aetcd  # noqa: F401
    HAVE_AETCD = True
except ImportError:
    HAVE_AETCD = False

needs_etcd = pytest.mark.skipif(
    ETCD is None or not HAVE_AETCD,
    reason="etcd binary not on PATH (apt-get install etcd-server; `make test` tries) "
           "or the aetcd package is missing (pip install 'kvstored[server]')")

TTL = 2  # cluster.lease_ttl in these tests (etcd's minimum lease)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Etcd:
    """A single-member etcd on 127.0.0.1 with free ports and its own data dir."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.client_port = _free_port()
        self.peer_port = _free_port()
        self.data_dir = tmp / "etcd-data"
        self.log_path = tmp / "etcd.log"
        self.proc: subprocess.Popen | None = None
        self._told = False  # endpoint handed out: the ports may no longer change

    @property
    def endpoint(self) -> str:
        self._told = True
        return f"127.0.0.1:{self.client_port}"

    def start(self, timeout: float = 20.0) -> "Etcd":
        # a free port is free only until someone binds it: another test's process (two
        # xdist workers) may take it before etcd does; new ports then, unless a test was
        # already given the endpoint
        for _ in range(3):
            try:
                return self._start(timeout)
            except RuntimeError as e:
                if self._told or "address already in use" not in str(e):
                    raise
                self.stop()
                self.client_port, self.peer_port = _free_port(), _free_port()
        return self._start(timeout)

    def _start(self, timeout: float) -> "Etcd":
        url_c = f"http://127.0.0.1:{self.client_port}"
        url_p = f"http://127.0.0.1:{self.peer_port}"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [ETCD, "--name", "t", "--data-dir", str(self.data_dir),
             "--listen-client-urls", url_c, "--advertise-client-urls", url_c,
             "--listen-peer-urls", url_p, "--initial-advertise-peer-urls", url_p,
             "--initial-cluster", f"t={url_p}", "--log-level", "error"],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}: {self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.client_port), 0.2):
                    pass
                if self._healthy():
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"etcd not up within {timeout}s: {self.log()}")

    def _healthy(self) -> bool:
        import urllib.request
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.client_port}/health", timeout=1) as r:
                return b"true" in r.read()
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc is not None:
            self._log.close()
        self.proc = None


def enable_auth(etcd: Etcd, user: str, password: str) -> None:
    """Turn etcd authentication on (root user ``user``) through etcd's own JSON gateway;
    from then on every client needs those credentials."""
    import json
    import urllib.request

    def post(path: str, body: dict) -> None:
        req = urllib.request.Request(f"http://{etcd.endpoint}/v3/auth/{path}",
                                     data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=5) as r:
            doc = json.loads(r.read())
        if "error" in doc:
            raise RuntimeError(f"etcd {path}: {doc['error']}")

    post("user/add", {"name": user, "password": password})
    post("role/add", {"name": "root"})
    post("user/grant", {"user": user, "role": "root"})
    post("enable", {})



def _gateway(etcd: Etcd, path: str, body: dict) -> dict:
    """One call to etcd's own JSON gateway (keys and values base64)."""
    import json
    import urllib.request
    req = urllib.request.Request(f"http://{etcd.endpoint}/v3/{path}",
                                 data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _b64(b: bytes) -> str:
    import base64
    return base64.b64encode(b).decode()


def etcd_keys(etcd: Etcd, prefix: bytes) -> set[bytes]:
    """The keys under ``prefix`` now, as etcd itself has them (the truth the nodes watch)."""
    import base64
    end = prefix[:-1] + bytes([prefix[-1] + 1])
    doc = _gateway(etcd, "kv/range", {"key": _b64(prefix), "range_end": _b64(end), "keys_only": True})
    return {base64.b64decode(kv["key"]) for kv in doc.get("kvs", [])}


def etcd_put(etcd: Etcd, key: bytes, value: bytes) -> None:
    _gateway(etcd, "kv/put", {"key": _b64(key), "value": _b64(value)})


def etcd_delete(etcd: Etcd, key: bytes) -> None:
    _gateway(etcd, "kv/deleterange", {"key": _b64(key)})
