"""Per-namespace tokens on both paths of a real kvstored (plaintext here; TLS in test_tls.py).

Every refusal must be a typed PermissionDenied with a message naming the problem,
must be counted in Stats, and must leave the daemon serving everyone else.
"""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest

import kvstore
from kvstore import errors
from kvstore.v1 import control_pb2 as pb
from kvstore.v1 import control_pb2_grpc as pb_grpc
from kvstore.wire import (FLAG_RESPONSE, HEADER_SIZE, OP_AUTH, OP_GET, OP_PUT, decode,
                          checksum, encode_auth, encode_request)

from secutil import TOKENS, counters, token, write_tokens

KiB = 1 << 10


def client(d, name: str | None, namespace: str = "team-a", **kw) -> kvstore.Client:
    return kvstore.Client(d.control, namespace=namespace, timeout=10,
                          token=token(name) if name else None, **kw)


def denied(fn, *words: str) -> errors.PermissionDenied:
    with pytest.raises(errors.PermissionDenied) as ei:
        fn()
    for w in words:
        assert w in ei.value.message, ei.value.message
    return ei.value


class Raw:
    """A raw plaintext data connection; every read bounded by the socket timeout."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)

    def send(self, *parts: bytes) -> None:
        self.sock.sendall(b"".join(parts))

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def response(self) -> tuple[int, int, int, bytes]:
        """(op, request id, status, payload)."""
        h = decode(self.recv_exact(HEADER_SIZE))  # checks magic and version
        assert h.flags & FLAG_RESPONSE
        return h.op, h.req_id, h.status, self.recv_exact(h.length)

    def close(self) -> None:
        self.sock.close()


def test_wrong_token_is_rejected_on_both_paths(secure_daemon):
    d = secure_daemon(tls=False)
    with client(d, "rw") as good:
        good.put(b"k", b"v" * 1000)
    bad = kvstore.Client(d.control, namespace="team-a", timeout=10, token="not-a-real-token-at-all")
    with bad:
        denied(lambda: bad.lookup([b"k"]), "invalid token")
        denied(lambda: bad.get(b"k"), "invalid token")
        denied(lambda: bad.put(b"k2", b"x"), "invalid token")
    # a gRPC call without the Bearer scheme is no better than a wrong token
    with grpc.insecure_channel(d.control) as ch:
        stub = pb_grpc.KVStoreStub(ch)
        with pytest.raises(grpc.RpcError) as ei:
            stub.Lookup(pb.KeysRequest(namespace="team-a", keys=[b"k"]), timeout=10,
                        metadata=(("authorization", token("rw")),))
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert dict(ei.value.trailing_metadata())["kvstore-code"] == str(errors.PermissionDenied.code)
    with client(d, "rw") as good:  # everyone else is unaffected
        assert good.get(b"k") == b"v" * 1000
    c = counters(d, tls=False)
    assert c["control_auth_rejected_bad_token"] >= 2
    assert c["auth_rejected_bad_token"] >= 1
    with urllib.request.urlopen(d.metrics_url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    exported = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line.startswith("kvstored_auth_rejected_total")}
    assert exported['kvstored_auth_rejected_total{plane="data",reason="bad_token"}'] == \
        c["auth_rejected_bad_token"]
    assert exported['kvstored_auth_rejected_total{plane="control",reason="bad_token"}'] == \
        c["control_auth_rejected_bad_token"]


def test_requests_without_a_token(secure_daemon):
    d = secure_daemon(tls=False)
    with client(d, None) as anon:
        denied(lambda: anon.lookup([b"k"]), "authentication required")
        denied(lambda: anon.get(b"k"), "authentication required")
        denied(lambda: anon.stats(), "authentication required")  # Stats needs a valid token
        assert anon.health().live  # Health and Info stay open (probes, discovery)
        assert anon.info().data_port == d.data_port
    # raw data path: a request before AUTH gets PermissionDenied with its own id, its
    # payload is skipped, and the connection stays usable for an AUTH
    raw = Raw(d.data_port)
    try:
        data = b"p" * (300 * KiB)
        raw.send(encode_request(OP_PUT, 7, b"team-a", b"raw", len(data), checksum(data)), data,
                 encode_request(OP_GET, 8, b"team-a", b"raw"))
        for want in (7, 8):
            op, rid, status, msg = raw.response()
            assert (rid, status) == (want, errors.PermissionDenied.code), msg
            assert b"authentication required" in msg
        # a malformed AUTH (with a namespace): a typed error, the connection goes on
        raw.send(encode_request(OP_AUTH, 12, b"team-a", b"", 5), b"12345")
        op, rid, status, msg = raw.response()
        assert (rid, status) == (12, errors.InvalidArgument.code) and b"auth frame" in msg
        raw.send(encode_auth(9, token("rw")))
        assert raw.response()[1:3] == (9, 0)
        raw.send(encode_request(OP_PUT, 10, b"team-a", b"raw", len(data), checksum(data)), data)
        assert raw.response()[1:3] == (10, 0)
        # a wrong token on AUTH: refused, then the connection is closed
        raw.send(encode_auth(11, "definitely-not-a-token"))
        op, rid, status, msg = raw.response()
        assert (op, rid, status) == (OP_AUTH, 11, errors.PermissionDenied.code)
        assert raw.sock.recv(1) == b""
    finally:
        raw.close()
    with client(d, "rw") as good:
        assert good.get(b"raw") == b"p" * (300 * KiB)
    c = counters(d, tls=False)
    assert c["auth_rejected_no_token"] >= 3
    assert c["control_auth_rejected_no_token"] >= 2


def test_token_for_another_namespace(secure_daemon):
    d = secure_daemon(tls=False)
    with client(d, "rw") as a:
        a.put(b"blk", b"a" * 4096)
    with client(d, "other", namespace="team-b") as b:  # valid token, but for team-b only
        b.put(b"blk", b"b" * 4096)  # its own namespace works
        assert b.get(b"blk") == b"b" * 4096
        for call in (lambda: b.get(b"blk", namespace="team-a"),
                     lambda: b.put(b"new", b"x", namespace="team-a"),
                     lambda: b.lookup([b"blk"], namespace="team-a"),
                     lambda: b.exists([b"blk"], namespace="team-a"),
                     lambda: b.pin([b"blk"], namespace="team-a"),
                     lambda: b.delete([b"blk"], namespace="team-a"),
                     lambda: b.control_get(b"blk", namespace="team-a"),
                     lambda: b.list(namespace="team-a"),
                     lambda: b.list(namespace="")):  # every namespace needs a "*" token
            denied(call, "not valid for namespace")
    with client(d, "rw") as a:
        assert a.get(b"blk") == b"a" * 4096  # untouched
    c = counters(d, tls=False)
    assert c["auth_rejected_namespace"] >= 2
    assert c["control_auth_rejected_namespace"] >= 7


def test_read_only_token_cannot_write(secure_daemon):
    d = secure_daemon(tls=False)
    with client(d, "rw") as rw:
        rw.put(b"blk", b"r" * 10000)
    with client(d, "ro") as ro:  # stored in the tokens file as a sha256 digest
        assert ro.get(b"blk") == b"r" * 10000
        assert ro.lookup([b"blk"]) == 1 and ro.exists([b"blk"]) == [True]
        assert ro.list().total == 1
        for call in (lambda: ro.put(b"blk2", b"w" * 5000),
                     lambda: ro.put(b"blk", b"w" * 10000, overwrite=True),
                     lambda: ro.control_put(b"blk3", b"w"),
                     lambda: ro.pin([b"blk"]),
                     lambda: ro.unpin([b"blk"]),
                     lambda: ro.delete([b"blk"])):
            denied(call, "'ro'", "lacks the 'write' scope")
        assert ro.get(b"blk") == b"r" * 10000
        assert ro.exists([b"blk2", b"blk3"]) == [False, False]
    c = counters(d, tls=False)
    assert c["auth_rejected_scope"] >= 2
    assert c["control_auth_rejected_scope"] >= 4


def test_admin_only_operations(secure_daemon):
    d = secure_daemon(tls=False)
    with client(d, "rw") as rw:
        rw.batch_put([(f"k{i}", b"x" * 100) for i in range(5)])
    with client(d, "other", namespace="team-b") as other:
        other.put(b"k", b"y")
    with client(d, "rw") as rw:
        denied(lambda: rw.delete_all(), "lacks the 'admin' scope")
        denied(lambda: rw.reload(), "not valid for namespace '*'")
        assert rw.lookup([f"k{i}" for i in range(5)]) == 5
    with client(d, "ns-admin") as na:  # admin of team-a only
        denied(lambda: na.delete_all(namespace=""), "namespace '*'")
        denied(lambda: na.delete_all(namespace="team-b"), "not valid for namespace 'team-b'")
        denied(lambda: na.reload(), "namespace '*'")
        assert na.delete_all() == 5  # its own namespace: fine
        assert na.lookup(["k0"]) == 0
    with client(d, "admin") as admin:
        assert admin.reload() == []  # nothing changed on disk
        assert admin.delete_all(namespace="") == 1  # team-b's object
        assert admin.stats().namespaces == {}
    c = counters(d, tls=False)
    assert c["control_auth_rejected_scope"] >= 1
    assert c["control_auth_rejected_namespace"] >= 4


def test_reload_adds_and_revokes_tokens(secure_daemon):
    d = secure_daemon(tls=False)
    rw = client(d, "rw")
    admin = client(d, "admin")
    try:
        rw.put(b"k", b"v" * 1000)  # the data connection is now bound to "rw"
        tokens = {k: v for k, v in TOKENS.items() if k != "rw"}
        tokens["ci"] = ("ci-token-0123456789abcdef", ["team-a"], ["read"])
        write_tokens(d.tokens_file, tokens)
        changed = admin.reload()
        assert "tokens: added ci" in changed and "tokens: removed rw" in changed, changed
        denied(lambda: rw.get(b"k"), "revoked")  # the open connection loses its grant
        denied(lambda: rw.lookup([b"k"]), "invalid token")
        with kvstore.Client(d.control, namespace="team-a", timeout=10,
                            token="ci-token-0123456789abcdef") as ci:
            assert ci.get(b"k") == b"v" * 1000
        # a broken tokens file: reported, and the loaded tokens stay in force
        d.tokens_file.write_text("[[token]]\nname = 1\n")
        with pytest.raises(errors.InvalidArgument, match="reload failed.*'name' must be"):
            admin.reload()
        assert admin.lookup([b"k"]) == 1
        # SIGHUP does the same as Reload: bring "rw" back
        write_tokens(d.tokens_file)
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while True:
            try:
                with client(d, "rw") as again:
                    assert again.get(b"k") == b"v" * 1000
                break
            except errors.PermissionDenied:
                assert time.monotonic() < deadline, "SIGHUP did not reload the tokens"
                time.sleep(0.05)
        assert counters(d, tls=False)["auth_rejected_revoked"] >= 1
    finally:
        rw.close()
        admin.close()


def test_auth_off_accepts_and_ignores_tokens(start_daemon):
    d = start_daemon()
    with kvstore.Client(d.control, namespace="t", timeout=10, token="whatever-token-1234") as c:
        c.put(b"k", b"v")
        assert c.get(b"k") == b"v" and c.lookup([b"k"]) == 1
        assert c.delete_all() == 1


def _kvstored(*args: str) -> subprocess.CompletedProcess:
    import os
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root / "client"), str(root)]))
    return subprocess.run([sys.executable, "-m", "kvstored", *args], capture_output=True,
                          text=True, timeout=30, env=env)


@pytest.mark.parametrize("tokens, expect", [
    ('[[token]]\nname = "x"\ntoken = "short"\nnamespaces = ["a"]\nscopes = ["read"]\n', "16-4096 bytes"),
    ('[[token]]\nname = "x"\ntoken = "long-enough-token-123"\nnamespaces = ["a"]\nscopes = ["rw"]\n',
     "'scopes' must be"),
    ('[[token]]\nname = "x"\nsha256 = "abc"\nnamespaces = ["a"]\nscopes = ["read"]\n', "64 hex digits"),
    ('[[token]]\nname = "x"\ntoken = "long-enough-token-123"\nnamespaces = ["bad ns"]\nscopes = ["read"]\n',
     "invalid namespace"),
])
def test_bad_tokens_file_stops_the_start(tmp_path, tokens, expect):
    tf = tmp_path / "tokens.toml"
    tf.write_text(tokens)
    cfg = tmp_path / "kv.toml"
    cfg.write_text(f'[auth]\nenabled = true\ntokens_file = "{tf}"\n')
    r = _kvstored("--config", str(cfg), "--print-config")
    assert r.returncode == 2
    assert r.stderr.startswith("kvstored: error: auth.tokens_file: ") and expect in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1
    assert "long-enough-token-123" not in r.stderr  # never echo a token


def test_security_settings_are_validated(tmp_path, certs):
    for body, expect in (
            ("[auth]\nenabled = true\n", "auth.tokens_file: set it"),
            (f'[tls]\ncert_file = "{certs.server.cert}"\n', "set both"),
            (f'[tls]\ncert_file = "{certs.server.cert}"\nkey_file = "{certs.client.key}"\n',
             "cannot load"),
            (f'[tls]\ncert_file = "{certs.server.cert}"\nkey_file = "{certs.server.key}"\n'
             'min_version = "1.1"\n', "tls.min_version"),
            ("[server]\nmax_connections_per_client = 0\n", "must be positive")):
        cfg = tmp_path / "kv.toml"
        cfg.write_text(body)
        r = _kvstored("--config", str(cfg), "--print-config")
        assert r.returncode == 2 and expect in r.stderr, (body, r.stderr)
