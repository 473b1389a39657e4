#!/usr/bin/env python3
"""TLS vs plaintext on the TCP data path: 1 MiB put / get / get_into with the blocking SDK.

    python benchmarks/bench_tls.py [--size 1MiB] [--duration 3] [--keys 32]

Starts two kvstored daemons on 127.0.0.1 (plaintext; TLS 1.3 with mutual TLS and a
token), times the same loop against each, and prints GB/s per op and the TLS/plaintext
ratio. Test certificates are made with ``cryptography`` (tests/security/seccerts.py).
The machine's congestion control is reported, not changed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "client"), str(REPO), str(REPO / "tests" / "security")]

import kvstore  # noqa: E402
from seccerts import make_certs  # noqa: E402

TOKEN = "bench-token-0123456789abcdef"


def parse_size(text: str) -> int:
    units = {"kib": 10, "mib": 20, "gib": 30, "": 0}
    t = text.strip().lower()
    num = t.rstrip("kmgib")
    return int(num) << units[t[len(num):]]


def start(tmp: Path, name: str, config: str) -> tuple[subprocess.Popen, dict]:
    cfg = tmp / f"{name}.toml"
    cfg.write_text(config)
    ready = tmp / f"{name}.ready"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "client"), str(REPO)]))
    proc = subprocess.Popen([sys.executable, "-m", "kvstored", "--config", str(cfg), "--port", "0",
                             "--data-port", "0", "--metrics-port", "0", "--dram-size", "512MiB",
                             "--ready-file", str(ready)],
                            stdout=subprocess.DEVNULL, stderr=open(tmp / f"{name}.log", "wb"), env=env)
    deadline = time.monotonic() + 30
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{name} daemon did not start: {(tmp / f'{name}.log').read_text()[-2000:]}")
        time.sleep(0.05)
    return proc, json.loads(ready.read_text())


def loop(fn, keys: list, duration: float) -> float:
    """Calls per second of fn(key), cycling over keys, for about ``duration`` seconds."""
    n, t0 = 0, time.perf_counter()
    end = t0 + duration
    while True:
        for k in keys:
            fn(k)
        n += len(keys)
        if time.perf_counter() >= end:
            return n / (time.perf_counter() - t0)


def measure(client: kvstore.Client, size: int, nkeys: int, duration: float) -> dict[str, float]:
    data = os.urandom(size)
    keys = [f"bench-{i}".encode() for i in range(nkeys)]
    buf = bytearray(size)
    out = {}
    loop(lambda k: client.put(k, data, overwrite=True), keys, duration)  # warm-up (arena prefault)
    # puts: overwrite keeps each put a real transfer (a same-bytes put is a cheap dedup)
    out["put"] = loop(lambda k: client.put(k, data, overwrite=True), keys, duration) * size / 1e9
    out["get"] = loop(lambda k: client.get(k), keys, duration) * size / 1e9
    out["get_into"] = loop(lambda k: client.get_into(k, buf), keys, duration) * size / 1e9
    assert buf == data
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1MiB")
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--keys", type=int, default=32)
    args = ap.parse_args()
    size = parse_size(args.size)
    cc = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        certs = make_certs(tmp / "certs")
        (tmp / "tokens.toml").write_text(
            f'[[token]]\nname = "bench"\ntoken = "{TOKEN}"\nnamespaces = ["*"]\n'
            'scopes = ["read", "write"]\n')
        plain, pinfo = start(tmp, "plain", "")
        secure, sinfo = start(tmp, "tls", f"""
[tls]
cert_file = "{certs.server.cert}"
key_file = "{certs.server.key}"
client_ca_file = "{certs.ca}"
[auth]
enabled = true
tokens_file = "{tmp / 'tokens.toml'}"
""")
        try:
            tls = kvstore.TLSConfig(ca_file=certs.ca, cert_file=certs.client.cert,
                                    key_file=certs.client.key)
            with kvstore.Client(f"127.0.0.1:{pinfo['control_port']}", namespace="bench") as c:
                rp = measure(c, size, args.keys, args.duration)
            with kvstore.Client(f"127.0.0.1:{sinfo['control_port']}", namespace="bench", tls=tls,
                                token=TOKEN) as c:
                rt = measure(c, size, args.keys, args.duration)
        finally:
            for p in (plain, secure):
                p.terminate()
                p.wait(10)
    print(f"data path, {args.size} objects, 1 blocking client, congestion control {cc}")
    print(f"{'op':<10}{'plaintext GB/s':>16}{'TLS GB/s':>12}{'TLS/plain':>11}")
    for op in rp:
        print(f"{op:<10}{rp[op]:>16.2f}{rt[op]:>12.2f}{rt[op] / rp[op]:>11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
