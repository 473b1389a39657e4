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


@pytest.fixture(scope="module")
def module_daemons(tmp_path_factory):
    """Factory: module_daemons(name="default", *args, env=None) -> a kvstored shared by a
    module's tests (a start costs ~1 s, a few seconds on a loaded machine), emptied (admin
    DeleteAll, every namespace) on each call after the first, and started again when a
    test stopped or killed it. Its counters are not reset: tests read them as differences."""
    import kvstore

    held: dict[str, Daemon] = {}

    def get(name: str = "default", *args: str, env: dict | None = None) -> Daemon:
        d = held.get(name)
        if d is not None and not d.alive():
            d.stop()
            d = None
        if d is None:
            d = held[name] = Daemon(tmp_path_factory.mktemp(f"shared-{name}"), *args, env=env).start()
            return d
        with kvstore.Client(d.control, timeout=10.0, shm=False) as c:
            c.delete_all(namespace="")
            assert c.list(namespace="").total == 0
        return d

    yield get
    for d in held.values():
        d.stop()


@pytest.fixture
def shared_daemon(module_daemons) -> Daemon:
    """The ``daemon`` fixture's kvstored, shared by a module's tests and empty at the start
    of each (module_daemons). A module opts in by defining its own ``daemon`` fixture that
    returns this one (``client`` follows); a test there that needs a fresh process or
    other flags uses start_daemon."""
    return module_daemons()


@pytest.fixture
def client(daemon):
    import kvstore

    with kvstore.Client(daemon.control, namespace="test", timeout=10.0) as c:
        yield c
