"""Helpers for the operations tests: scrape /metrics, wait for log lines, raw frames."""
from __future__ import annotations

import json
import os
import re
import socket
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families

from kvstore.wire import HEADER, MAGIC, VERSION, checksum, decode


def http_get(url: str, timeout: float = 5.0, headers: dict | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def scrape(daemon) -> dict[str, dict]:
    """``{family: {"type", "help", "samples": {(sample name, frozenset(labels)): value}}}``."""
    status, _, body = http_get(daemon.metrics_url + "/metrics")
    assert status == 200, body
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        out[fam.name] = {"type": fam.type, "help": fam.documentation,
                         "samples": {(s.name, frozenset(s.labels.items())): s.value
                                     for s in fam.samples}}
    return out


def value(metrics: dict, family: str, sample: str | None = None, **labels) -> float:
    """One sample's value; ``sample`` defaults to the family name (``_total`` for counters)."""
    fam = metrics[family]
    if sample is None:
        sample = family + ("_total" if fam["type"] == "counter" else "")
    key = (sample, frozenset((k, str(v)) for k, v in labels.items()))
    assert key in fam["samples"], (key, sorted(fam["samples"])[:20])
    return fam["samples"][key]


def wait_for_log(daemon, needle: str, timeout: float = 10.0, start: int = 0) -> str:
    """The first full log line (from byte ``start``) that contains ``needle``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = daemon.log_path.read_text(errors="replace")[start:]
        for line in text.splitlines():
            if needle in line:
                return line
        time.sleep(0.05)
    raise AssertionError(f"no log line with {needle!r} within {timeout}s:\n{daemon.log()}")


def log_size(daemon) -> int:
    return len(daemon.log_path.read_text(errors="replace"))


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def put_frame(rid: int, key: bytes, data: bytes, ns: bytes = b"t", csum: int | None = None,
              magic: bytes = MAGIC) -> bytes:
    cs = checksum(data) if csum is None else csum
    return HEADER.pack(magic, VERSION, 1, 0, rid, 0, len(ns), len(key), 0, len(data), cs) + ns + key + data


def read_frame(sock: socket.socket) -> tuple[int, int, int, bytes]:
    """(op, rid, status, payload) of one response."""
    head = _recv(sock, HEADER.size)
    h = decode(head)  # checks magic and version
    _recv(sock, h.ns_len + h.key_len)
    return h.op, h.req_id, h.status, _recv(sock, h.length)


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return bytes(buf)


_KV = re.compile(r'([\w.]+)=("(?:[^"\\]|\\.)*"|\S*)')


def kv_fields(line: str) -> dict[str, str]:
    """The fields of one key=value log line, quotes and escapes removed."""
    out = {}
    for k, v in _KV.findall(line):
        if v.startswith('"'):
            v = v[1:-1].replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
        out[k] = v
    return out


def index_reachable() -> bool:
    """Whether pip's package index answers (the install tests skip when it does not)."""
    u = urlsplit(os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple"))
    try:
        socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)),
                                 timeout=3).close()
        return True
    except OSError:
        return False
