"""Fixtures for the security tests: certificates and secured daemons.

Every daemon is a real kvstored started by tests/conftest.py's ``start_daemon`` with a
``--config`` file written here.
"""
from __future__ import annotations

import pytest

from seccerts import Certs, make_certs
from secutil import TOKENS, write_tokens


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def secure_daemon(start_daemon, tmp_path, certs):
    """Factory: secure_daemon(tls=True, mtls=True, auth=True, server={...}) -> Daemon."""
    def factory(*, tls: bool = True, mtls: bool = True, auth: bool = True,
                server: dict | None = None, tokens: dict = TOKENS, server_pair=None):
        pair = certs.server if server_pair is None else server_pair
        doc = []
        if server:
            doc.append("[server]")
            doc += [f"{k} = {v}" for k, v in server.items()]
        if tls:
            doc += ["[tls]", f'cert_file = "{pair.cert}"', f'key_file = "{pair.key}"']
            if mtls:
                doc.append(f'client_ca_file = "{certs.ca}"')
        if auth:
            tokens_file = write_tokens(tmp_path / "tokens.toml", tokens)
            doc += ["[auth]", "enabled = true", f'tokens_file = "{tokens_file}"']
        cfg = tmp_path / f"kvstored-{len(list(tmp_path.glob('kvstored-*.toml')))}.toml"
        cfg.write_text("\n".join(doc) + "\n")
        d = start_daemon("--config", str(cfg))
        d.tokens_file = tmp_path / "tokens.toml"
        return d
    return factory
