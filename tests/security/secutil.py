"""Helpers shared by the security tests: tokens, TLS settings, counters."""
from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import kvstore
from kvstore.wire import FLAG_RESPONSE, HEADER_SIZE, decode
from seccerts import Certs, Pair

# name -> (token, namespaces, scopes). "ro" is stored as a digest, the rest in clear.
TOKENS = {
    "rw": ("rw-token-0123456789abcdef", ["team-a"], ["read", "write"]),
    "ro": ("ro-token-0123456789abcdef", ["team-a"], ["read"]),
    "other": ("other-token-0123456789abcd", ["team-b"], ["read", "write"]),
    "ns-admin": ("nsadmin-token-0123456789ab", ["team-a"], ["admin"]),
    "admin": ("admin-token-0123456789abcd", ["*"], ["admin"]),
}
DIGEST_ONLY = {"ro"}


def token(name: str) -> str:
    return TOKENS[name][0]


def write_tokens(path: Path, tokens: dict = TOKENS) -> Path:
    lines = []
    for name, (tok, nss, scopes) in tokens.items():
        lines.append("[[token]]")
        lines.append(f'name = "{name}"')
        if name in DIGEST_ONLY:
            lines.append(f'sha256 = "{hashlib.sha256(tok.encode()).hexdigest()}"')
        else:
            lines.append(f'token = "{tok}"')
        lines.append("namespaces = [" + ", ".join(f'"{n}"' for n in nss) + "]")
        lines.append("scopes = [" + ", ".join(f'"{s}"' for s in scopes) + "]")
        lines.append("")
    path.write_text("\n".join(lines))
    path.chmod(0o600)
    return path


def client_tls(certs: Certs, pair: Pair | None = None, ca: str | None = None) -> kvstore.TLSConfig:
    pair = certs.client if pair is None else pair
    return kvstore.TLSConfig(ca_file=ca or certs.ca, cert_file=pair.cert, key_file=pair.key)


def counters(d, certs: Certs | None = None, tls: bool = True) -> dict[str, int]:
    """The daemon's Stats counters, read with the admin token."""
    with kvstore.Client(d.control, token=token("admin"), timeout=10,
                        tls=client_tls(certs) if tls else None) as c:
        return dict(c.stats().counters)


def recv_exact(s: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes from a raw data-port socket (EOFError if it closes first)."""
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def response(s: socket.socket) -> tuple[int, int, bytes]:
    """The next response frame on a raw socket: (request id, status, payload)."""
    h = decode(recv_exact(s, HEADER_SIZE))  # checks magic and version
    assert h.flags & FLAG_RESPONSE
    return h.req_id, h.status, recv_exact(s, h.length)
