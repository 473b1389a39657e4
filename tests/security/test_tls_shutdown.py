"""A TLS peer that never answers close_notify holds a closing connection for at most
kvstored.tls.SHUTDOWN_TIMEOUT, not asyncio's 30 s: SIGTERM with such a client connected
exits well inside the drain deadline (it waited the whole 10 s before)."""
from __future__ import annotations

import array
import fcntl
import signal
import socket
import termios
import ssl
import time

from kvstored.tls import SHUTDOWN_TIMEOUT


def _unread_bytes(s: socket.socket) -> int:
    """Bytes in the socket's receive buffer (FIONREAD): what has arrived, not yet read."""
    n = array.array("i", [0])
    fcntl.ioctl(s.fileno(), termios.FIONREAD, n)
    return n[0]


def _tls_socket(certs, port: int) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=certs.ca)
    ctx.load_cert_chain(certs.client.cert, certs.client.key)
    ctx.check_hostname = False
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    return ctx.wrap_socket(raw, server_hostname="localhost")  # handshake done here


def test_sigterm_is_not_held_by_a_silent_tls_client(secure_daemon, certs):
    d = secure_daemon(tls=True, mtls=True, auth=False)
    silent = [_tls_socket(certs, d.data_port) for _ in range(3)]  # never read, never close
    try:
        time.sleep(0.2)  # the daemon has taken the connections
        t0 = time.monotonic()
        rc = d.stop(signal.SIGTERM, timeout=30)
        took = time.monotonic() - t0
    finally:
        for s in silent:
            s.close()
    assert rc == 0, d.log_path.read_text()[-2000:]
    # drain_timeout is 10 s; the silent clients may cost SHUTDOWN_TIMEOUT (in parallel)
    assert took < SHUTDOWN_TIMEOUT + 4.0, f"SIGTERM took {took:.1f}s with silent TLS clients"


def test_a_late_reader_still_finds_its_answer_before_the_end(secure_daemon, certs):
    """The bounded close is still a close after the answers: a TLS client that sent a get
    and reads only after the daemon has exited finds its answer, then the end of the stream."""
    import kvstore
    from kvstore.wire import OP_GET, STATUS_OK, encode_request
    from secutil import client_tls, recv_exact, response

    d = secure_daemon(tls=True, mtls=True, auth=False)
    value = bytes(range(256)) * 64
    with kvstore.Client(d.control, tls=client_tls(certs), transport="tcp", timeout=10) as c:
        c.put(b"k", value)
    s = _tls_socket(certs, d.data_port)
    try:
        s.sendall(encode_request(OP_GET, 7, kvstore.wire.DEFAULT_NAMESPACE.encode(), b"k"))
        # answered (its TLS records, over len(value) bytes, wait in this socket's buffer),
        # unread; a fixed 0.3 s could send SIGTERM before a loaded daemon had read the get
        deadline = time.monotonic() + 15
        while _unread_bytes(s) <= len(value):
            assert time.monotonic() < deadline, "no answer to the get within 15 s"
            time.sleep(0.02)
        t0 = time.monotonic()
        rc = d.stop(signal.SIGTERM, timeout=30)
        assert rc == 0 and time.monotonic() - t0 < SHUTDOWN_TIMEOUT + 4.0
        req_id, status, payload = response(s)
        assert (req_id, status, payload) == (7, STATUS_OK, value)
        try:
            rest = recv_exact(s, 1)
        except (EOFError, ssl.SSLError, OSError):
            rest = None  # the stream ended (close_notify or EOF)
        assert rest is None
    finally:
        s.close()
