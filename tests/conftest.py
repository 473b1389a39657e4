"""Shared fixtures: real kvstored processes on 127.0.0.1 (never a mock of the daemon)."""
from __future__ import annotations

import pytest

from daemonutil import ROOT, Daemon  # noqa: F401  (ROOT re-exported for older imports)


@pytest.fixture
def start_daemon(tmp_path):
    """Factory: start_daemon(*extra_args) -> a running Daemon, stopped after the test."""
    started: list[Daemon] = []

    def factory(*args: str, **kw) -> Daemon:
        d = Daemon(tmp_path, *args, **kw).start()
        started.append(d)
        return d

    yield factory
    for d in started:
        d.stop()


@pytest.fixture
def daemon(start_daemon) -> Daemon:
    """One kvstored: 64 MiB of DRAM, 4 MiB slabs, 4 MiB max value."""
    return start_daemon()


@pytest.fixture
def client(daemon):
    import kvstore

    with kvstore.Client(daemon.control, namespace="test", timeout=10.0) as c:
        yield c
