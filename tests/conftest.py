"""Shared fixtures: real kvstored processes on 127.0.0.1 (never a mock of the daemon)."""
from __future__ import annotations

import gc

import pytest

from daemonutil import ROOT, Daemon, start_all, stop_all  # noqa: F401  (ROOT re-exported for older imports)

# The longest files, longest first (each file's setup + call + teardown summed, a
# two-worker run of the whole suite, 2026-12-01): `make test` runs pytest-xdist with
# --dist loadfile, which hands out whole files, by default those with the most tests
# first. That left the few-test, long files (the chaos run, the wheel installs, repair,
# vLLM's import) for the end, one worker running them while the other had nothing left.
# Handed out first, the short files fill in around them and both workers end together.
# A file not named here runs after these, in collection order; the list only orders.
LONGEST_FILES = (
    "tests/cluster/test_repair.py",
    "tests/ops/test_wheel_install.py",
    "tests/cluster/test_chaos_rejoin.py",
    "tests/cluster/test_chaos.py",
    "tests/client/test_sdk.py",
    "tests/integrations/test_lmcache.py",
    "tests/cluster/test_repair_fence.py",
    "tests/engine/test_nvme.py",
    "tests/security/test_hostile_round2.py",
    "tests/engine/test_nvme_recovery_peak.py",
    "tests/cluster/test_membership.py",
    "tests/engine/test_nvme_recover_stream.py",
    "tests/ops/test_ops_packaging.py",
    "tests/daemon/test_nvme_tier.py",
    "tests/security/test_hostile.py",
    "tests/integrations/test_vllm.py",
    "tests/ops/test_ops_startup.py",
    "tests/cluster/test_placement_equivalence.py",
    "tests/engine/test_delete_all.py",
    "tests/cluster/test_redirect_budget.py",
    "tests/security/test_auth.py",
    "tests/daemon/test_dataplane_bad_input.py",
    "tests/ops/test_ops_audit.py",
    "tests/cluster/test_node_id_conflict.py",
    "tests/daemon/test_shm.py",
)


def pytest_configure(config):
    # xdist's own order (most tests first) would undo LONGEST_FILES' (no-op without xdist)
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(session, config, items):
    """LONGEST_FILES first, in that order; every other file after them, as collected.
    The sort is stable: a file's tests keep their order and stay together."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))


@pytest.fixture
def start_daemon(tmp_path):
    """Factory: start_daemon(*extra_args) -> a running Daemon, stopped after the test."""
    started: list[Daemon] = []

    def factory(*args: str, **kw) -> Daemon:
        d = Daemon(tmp_path, *args, **kw).start()
        started.append(d)
        return d

    def many(*arg_lists, **kw) -> list[Daemon]:
        """start_daemon.many(args1, args2, ...): several launched at once (their imports
        and arena prefaults overlap), each ready on return."""
        ds = [Daemon(tmp_path, *args, **kw) for args in arg_lists]
        started.extend(ds)
        return start_all(*ds)

    factory.many = many
    yield factory
    stop_all(started)


@pytest.fixture
def daemon(start_daemon) -> Daemon:
    """One kvstored: 64 MiB of DRAM, 4 MiB slabs, 4 MiB max value."""
    return start_daemon()


class ModuleDaemons:
    """Daemons shared by one module's tests, by name: see the module_daemons fixture."""

    def __init__(self, tmp_path_factory):
        self.tmp = tmp_path_factory
        self.held: dict[str, Daemon] = {}

    def __call__(self, name: str = "default", *args: str, env: dict | None = None) -> Daemon:
        return self.group([name], *args, env=env)[0]

    def group(self, names, *args: str, env: dict | None = None) -> list[Daemon]:
        """The daemons called ``names`` (same flags), those not running started together."""
        import kvstore

        fresh = []
        for name in names:
            d = self.held.get(name)
            if d is not None and not d.alive():
                d.stop()
                d = None
            if d is None:
                d = self.held[name] = Daemon(self.tmp.mktemp(f"shared-{name}"), *args, env=env)
                fresh.append(d)
            else:
                with kvstore.Client(d.control, timeout=10.0, shm=False) as c:
                    c.delete_all(namespace="")
                    assert c.list(namespace="").total == 0
        try:
            start_all(*fresh)
        except BaseException:
            for name in names:
                if self.held.get(name) in fresh:
                    del self.held[name]
            raise
        return [self.held[name] for name in names]

    def stop(self) -> None:
        stop_all(list(self.held.values()))


@pytest.fixture(scope="module")
def module_daemons(tmp_path_factory):
    """Factory: module_daemons(name="default", *args, env=None) -> a kvstored shared by a
    module's tests (a start costs ~1 s, a few seconds on a loaded machine), emptied (admin
    DeleteAll, every namespace) on each call after the first, and started again when a
    test stopped or killed it; .group(names, ...) -> several (a cluster). Counters are not
    reset: tests read them as differences."""
    held = ModuleDaemons(tmp_path_factory)
    yield held
    held.stop()


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


@pytest.fixture
def young_heap():
    """gc.collect() in the test scans only what the test made: the objects already alive
    (the whole suite's, by then) are frozen out of the collector for its duration. A test
    that collects often (to drop views of index records) took 18-28 s in the full suite
    instead of ~2 s alone, scanning every earlier test's objects each time."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
