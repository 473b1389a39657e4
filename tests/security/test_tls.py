"""TLS and mutual TLS on both planes of a real kvstored (with tokens on).

Happy path: bytes come back identical through the sync and async SDK. Refusals
(expired or untrusted client certificate, no client certificate, a client that does
not trust the daemon, a plaintext client) come back as PermissionDenied with a message
that says what is wrong, and are counted.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl

import pytest

import kvstore
from kvstore import errors
from kvstore.cli import main as cli_main
from kvstore.wire import FLAG_RESPONSE, HEADER_SIZE, OP_PING, decode, encode_request

from seccerts import Pair
from secutil import client_tls, counters, recv_exact, token

KiB, MiB = 1 << 10, 1 << 20
SIZES = (1, 4 * KiB + 3, 256 * KiB, MiB, 4 * MiB)


def payload(i: int, size: int) -> bytes:
    return (os.urandom(64) * (size // 64 + 1))[:size] if size > 64 else os.urandom(size)


def tls_client(d, certs, pair=None, ca=None, name: str | None = "rw", **kw) -> kvstore.Client:
    return kvstore.Client(d.control, namespace="team-a", timeout=10, tls=client_tls(certs, pair, ca),
                          token=token(name) if name else None, **kw)


def data_only(c: kvstore.Client, d) -> kvstore.Client:
    """Make ``c`` use the data path without asking the control plane first."""
    c._info = kvstore._common.ServerInfo("n", "v", "127.0.0.1", d.data_port, 4 * MiB, MiB,
                                         128, 65536, "xxh3-64", 1)
    return c


def denied(fn, *words: str) -> errors.PermissionDenied:
    with pytest.raises(errors.PermissionDenied) as ei:
        fn()
    for w in words:
        assert w in ei.value.message, ei.value.message
    return ei.value


def test_tls_round_trip_sync(secure_daemon, certs):
    d = secure_daemon()
    with tls_client(d, certs) as c:
        objs = {f"obj-{i}": payload(i, n) for i, n in enumerate(SIZES)}
        for k, v in objs.items():
            assert c.put(k, v) is True
            assert c.put(k, v) is False  # dedup answer over TLS too
        for k, v in objs.items():
            assert c.get(k) == v
            buf = bytearray(len(v))
            assert c.get_into(k, buf) == len(v) and buf == v
        batch = [(f"b{i}", payload(i, 64 * KiB + i)) for i in range(40)]  # > one window of 32
        assert c.batch_put(batch) == [True] * 40
        assert [bytes(x) for x in c.batch_get([k for k, _ in batch])] == [v for _, v in batch]
        assert c.control_put(b"small", b"s" * 1000) and c.control_get(b"small") == b"s" * 1000
        assert c.lookup(list(objs) + ["missing"]) == len(objs)
        assert c.ping() > 0
    cnt = counters(d, certs)
    assert cnt["auth_ok"] >= 1 and cnt["control_tls_connections"] >= 1
    assert cnt.get("tls_handshake_failed", 0) == 0


def test_tls_round_trip_async(secure_daemon, certs):
    d = secure_daemon()

    async def run():
        async with kvstore.AsyncClient(d.control, namespace="team-a", timeout=10,
                                       tls=client_tls(certs), token=token("rw")) as c:
            objs = {f"obj-{i}": payload(i, n) for i, n in enumerate(SIZES)}
            assert await asyncio.gather(*(c.put(k, v) for k, v in objs.items())) == [True] * len(objs)
            got = await asyncio.gather(*(c.get(k) for k in objs))
            assert [bytes(g) for g in got] == list(objs.values())
            bufs = [bytearray(len(v)) for v in objs.values()]
            assert await c.batch_get_into(list(objs), bufs) == [len(v) for v in objs.values()]
            assert bufs == list(objs.values())
            assert await c.lookup(list(objs)) == len(objs)
            # the wrong namespace over an authenticated TLS connection
            with pytest.raises(errors.PermissionDenied, match="not valid for namespace 'team-b'"):
                await c.get("obj-0", namespace="team-b")
            assert bytes(await c.get("obj-1")) == objs["obj-1"]  # connection still fine

    asyncio.run(asyncio.wait_for(run(), 60))


def test_tls_without_client_certificates_or_tokens(secure_daemon, certs):
    d = secure_daemon(mtls=False, auth=False)
    tls = kvstore.TLSConfig(ca_file=certs.ca)  # server authentication only
    with kvstore.Client(d.control, namespace="t", timeout=10, tls=tls) as c:
        data = payload(0, 3 * MiB)
        c.put("k", data)
        assert c.get("k") == data
    # the CLI, with its TLS flags
    assert cli_main(["-a", d.control, "--tls-ca", certs.ca, "-n", "t", "lookup", "k"]) == 0
    # plaintext: refused, a credential to fix (PermissionDenied: exit 4, kvstore-cli --help)
    assert cli_main(["-a", d.control, "-n", "t", "lookup", "k"]) == 4


def test_expired_client_certificate(secure_daemon, certs):
    d = secure_daemon()
    with tls_client(d, certs, certs.expired_client) as c:
        denied(lambda: c.lookup([b"k"]), "rejected this client's certificate")
    with tls_client(d, certs, certs.expired_client,
                    data_address=f"127.0.0.1:{d.data_port}") as c:
        data_only(c, d)
        denied(lambda: c.get(b"k"), "rejected this client's certificate")
    cnt = counters(d, certs)
    assert cnt["tls_handshake_failed_cert_expired"] >= 1
    assert cnt["tls_handshake_failed"] >= cnt["tls_handshake_failed_cert_expired"]
    # gRPC does not say why a handshake failed; attempts that never made a call show it
    assert cnt["control_tls_handshakes"] > cnt["control_tls_connections"]


def test_untrusted_client_certificate(secure_daemon, certs):
    d = secure_daemon()
    with tls_client(d, certs, certs.untrusted_client) as c:
        denied(lambda: c.lookup([b"k"]), "rejected this client's certificate")
    with tls_client(d, certs, certs.untrusted_client,
                    data_address=f"127.0.0.1:{d.data_port}") as c:
        data_only(c, d)
        denied(lambda: c.put(b"k", b"v"), "rejected this client's certificate")
    no_cert = kvstore.TLSConfig(ca_file=certs.ca)  # no client certificate at all
    with kvstore.Client(d.control, timeout=10, tls=no_cert, token=token("rw"),
                        data_address=f"127.0.0.1:{d.data_port}") as c:
        denied(lambda: c.get(b"k"), "certificate")
    cnt = counters(d, certs)
    assert cnt["tls_handshake_failed_cert_untrusted"] >= 1
    assert cnt["tls_handshake_failed_no_cert"] >= 1
    with tls_client(d, certs) as c:  # the daemon still serves good clients
        c.put(b"k", b"v")
        assert c.get(b"k") == b"v"


def test_client_that_does_not_trust_the_daemon(secure_daemon, certs):
    d = secure_daemon()
    with tls_client(d, certs, ca=certs.untrusted_ca) as c:
        denied(lambda: c.lookup([b"k"]), "cannot verify kvstored's certificate")


def test_plaintext_client_against_tls_ports(secure_daemon, certs):
    d = secure_daemon()
    # gRPC control port
    with kvstore.Client(d.control, namespace="team-a", timeout=10, token=token("rw")) as c:
        denied(lambda: c.lookup([b"k"]), "expects TLS")
    # data port, through the SDK (data address given, so no control call comes first)
    with kvstore.Client(d.control, namespace="team-a", timeout=10, token=token("rw"),
                        data_address=f"127.0.0.1:{d.data_port}") as c:
        data_only(c, d)
        denied(lambda: c.put(b"k", b"v"), "requires TLS")
        denied(lambda: c.get(b"k"), "requires TLS")

    async def run():
        c = kvstore.AsyncClient(d.control, namespace="team-a", timeout=10, token=token("rw"))
        try:
            with pytest.raises(errors.PermissionDenied, match="expects TLS"):
                await c.lookup([b"k"])
        finally:
            await c.close()
    asyncio.run(asyncio.wait_for(run(), 30))
    # data port, raw bytes: a plaintext frame is answered by a plaintext error frame
    with socket.create_connection(("127.0.0.1", d.data_port), timeout=10) as s:
        s.sendall(encode_request(OP_PING, 1, b"", b""))
        h = decode(recv_exact(s, HEADER_SIZE))  # checks magic and version
        assert h.flags & FLAG_RESPONSE and h.req_id == 0
        assert h.status == errors.PermissionDenied.code
        assert b"requires TLS" in recv_exact(s, h.length)
    cnt = counters(d, certs)
    assert cnt["tls_handshake_failed_plaintext"] >= 3
    assert cnt["control_tls_handshakes"] > cnt["control_tls_connections"]


def test_tls_client_against_plaintext_daemon(start_daemon, certs):
    d = start_daemon()
    with kvstore.Client(d.control, timeout=10, tls=kvstore.TLSConfig(ca_file=certs.ca),
                        data_address=f"127.0.0.1:{d.data_port}") as c:
        data_only(c, d)
        denied(lambda: c.get(b"k"), "does not speak TLS")


def test_garbage_handshake_is_counted(secure_daemon, certs):
    d = secure_daemon()
    # a TLS-looking first byte followed by garbage: a failed handshake, not a crash
    with socket.create_connection(("127.0.0.1", d.data_port), timeout=10) as s:
        s.sendall(b"\x16\x03\x01\x00\x05hello" + b"\0" * 100)
        s.settimeout(10)
        try:
            while s.recv(4096):
                pass
        except (ConnectionResetError, ssl.SSLError):
            pass
    with tls_client(d, certs) as c:
        c.put(b"k", b"v")
    assert counters(d, certs)["tls_handshake_failed"] >= 1


def test_reload_swaps_certificates(secure_daemon, certs, tmp_path):
    crt, key = tmp_path / "server.crt", tmp_path / "server.key"
    shutil.copy(certs.server.cert, crt)
    shutil.copy(certs.server.key, key)
    d = secure_daemon(server_pair=Pair(str(crt), str(key)))
    with tls_client(d, certs) as c:
        c.put(b"k", b"before")
    # a new certificate, from another CA, lands on disk: nothing changes until a reload
    shutil.copy(certs.untrusted_server.cert, crt)
    shutil.copy(certs.untrusted_server.key, key)
    with tls_client(d, certs, name="admin") as admin:
        assert "tls: certificates reloaded" in admin.reload()
    with tls_client(d, certs) as old_trust:  # new handshakes present the new certificate
        denied(lambda: old_trust.lookup([b"k"]), "cannot verify kvstored's certificate")
    with tls_client(d, certs, ca=certs.untrusted_ca) as new_trust:
        assert new_trust.get(b"k") == b"before"  # both planes
        assert new_trust.lookup([b"k"]) == 1
