"""LMCache (0.5.6, CPU torch) against a real kvstored through our remote storage plugin.

LMCache lives in the engines environment (``make engines-env``: ``.venv/engines``)
because its pins collide with the daemon's (prometheus-client<=0.24.1 against the
daemon's 0.26.0) and it must be installed ``--no-deps`` (its declared requirements
pull CUDA packages). The daemon runs from this test's interpreter; the LMCache side
runs as subprocesses of the engines environment (see enginesutil.py).

Without that environment every test here is skipped with the reason and the fix.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from enginesutil import engine_installed, last_json, skip_unless_importable
from enginesutil import run as engine_run


# an engine's first import in a fresh environment can take tens of seconds on 2 cores
pytestmark = pytest.mark.timeout(600)

@pytest.fixture(scope="module")
def lmcache_python() -> str:
    py, why = engine_installed("lmcache")  # whether LMCache imports: the runs tell (run below)
    if py is None:
        pytest.skip(why)
    return py


def run(py: str, args: list[str], **env) -> subprocess.CompletedProcess:
    r = engine_run("lmcache", py, args, **env)
    skip_unless_importable("lmcache", r)
    return r


BASIC_CHECK_CONFIG = """\
chunk_size: 256
local_cpu: true
max_local_cpu_size: 1
remote_serde: naive
# LMCache's checker builds its RemoteBackend from remote_url: the placeholder names the
# plugin, the endpoint comes from extra_config
remote_url: "plugin://kvstore"
remote_storage_plugins: ["kvstore"]
extra_config:
  remote_storage_plugin.kvstore.module_path: kvstore.integrations.lmcache
  remote_storage_plugin.kvstore.class_name: KVStoreConnectorAdapter
  remote_storage_plugin.kvstore.address: "{address}"
  remote_storage_plugin.kvstore.namespace: lmcache-check
"""


def test_lmcache_basic_check_test_remote_passes(lmcache_python, daemon, client, tmp_path):
    """`python -m lmcache.v1.basic_check --mode test_remote`, LMCache's own checker."""
    cfg = tmp_path / "lmcache.yaml"
    cfg.write_text(BASIC_CHECK_CONFIG.format(address=daemon.control))
    r = run(lmcache_python, ["-m", "lmcache.v1.basic_check", "--mode", "test_remote"],
            LMCACHE_CONFIG_FILE=str(cfg))
    out = r.stdout + r.stderr
    detail = f"exit {r.returncode}\n{out[-6000:]}"
    assert r.returncode == 0 and "Test Failed" not in out, detail
    phases = re.findall(r"Validation: (\d+)/(\d+) passed", out)
    content = re.findall(r"Validation \(content correct\): (\d+)/(\d+) passed", out)
    # phase 1 exists (absent), 2 put, 3 exists (present); phase 4 get with content compare
    assert len(phases) == 3 and all(a == b == "5" for a, b in phases), detail
    assert content == [("5", "5")], detail
    assert "Performance Results" in out, detail
    # the five chunks really are in kvstored, in the namespace from extra_config
    assert client.stats().namespaces["lmcache-check"] == 5


def test_lmcache_engine_stores_then_retrieves_from_kvstored(lmcache_python, daemon, client, tmp_path):
    """LMCacheEngine stores a prompt (3.5 chunks), its local copy is dropped, and the
    prompt comes back from kvstored, in the same process and in a fresh one."""
    cfg = str(tmp_path / "engine.yaml")
    args = ["lmcache_engine_check.py", "--address", daemon.control, "--namespace", "engine", "--config", cfg]
    first = last_json(run(lmcache_python, [args[0], "store", *args[1:]]))
    assert first["stored_before"] == 0
    assert first["stored_after"] == first["chunks"] == 4, first
    assert first["object_sizes"][-1] * 2 == first["object_sizes"][0], "last chunk is half a chunk"
    assert first["local_cleared"] > 0 and first["local_has_first_chunk"] is False, first
    assert first["after_drop_lookup_tokens"] == first["tokens"], first
    assert first["after_drop_retrieved_tokens"] == first["tokens"], first
    assert first["after_drop_equal"] is True, "retrieved KV differs from what was stored"
    assert first["daemon_get_hits"] >= 4, "the chunks did not come from kvstored"

    second = last_json(run(lmcache_python, [args[0], "retrieve", *args[1:]]))
    assert second["stored_before"] == 4
    assert second["fresh_lookup_tokens"] == second["fresh_retrieved_tokens"] == second["tokens"], second
    assert second["fresh_equal"] is True
    assert second["daemon_get_hits"] >= 4
    assert client.stats().namespaces["engine"] == 4


CONNECTOR_CHECKS = [
    "batched_roundtrip", "prefix_lookup_and_pin", "misses_are_none_and_released",
    "non_blocking_get_returns_the_prefix", "partial_chunk",
    "conflict_keeps_first", "self_describing_objects", "legacy_remote_url",
    "placeholder_url_uses_extra_config", "generic_loader_with_connector_class", "remove_and_ping",
    "unreachable_daemon", "options_are_checked", "dead_daemon_costs_a_step_milliseconds",
    "kvstore_url_alone_is_reported_with_the_fix",
]


@pytest.fixture(scope="module")
def connector_results(lmcache_python, tmp_path_factory):
    """All connector checks in one LMCache process (importing LMCache takes seconds)."""
    from daemonutil import Daemon, start_all

    d, victim = start_all(Daemon(tmp_path_factory.mktemp("lmcache-connector")),
                          Daemon(tmp_path_factory.mktemp("lmcache-victim")))  # victim: killed by a check
    try:
        r = run(lmcache_python, ["lmcache_connector_check.py", "--address", d.control,
                                 "--victim-address", victim.control, "--victim-pid", str(victim.proc.pid)])
        for line in r.stdout.splitlines():
            if "steps, mean" in line:
                print(line)  # the step figures, for the test log (pytest -s)
        return last_json(r), r.stdout[-4000:] + r.stderr[-8000:]
    finally:
        victim.stop()
        d.stop()


@pytest.mark.parametrize("name", CONNECTOR_CHECKS)
def test_lmcache_connector(connector_results, name):
    results, log = connector_results
    assert name in results, f"check {name} did not run\n{log}"
    assert results[name] == "ok", f"{results[name]}\n{log}"


def test_lmcache_connector_checks_listed(connector_results):
    results, _ = connector_results
    assert sorted(results) == sorted(CONNECTOR_CHECKS), "a check was added or removed: update the list"


def test_lmcache_engine_over_a_cluster(lmcache_python, start_daemon, tmp_path):
    """The same engine round trip with the adapter pointed at a three-node cluster
    (``kvstore+cluster://`` seeds; ec:2+1 from the cluster's policy, real etcd), from
    the engines environment as `make engines-env` installs it (pyeclib from the
    ``lmcache`` extra). Chunks of 640 KiB (the last one 320 KiB) are above the EC
    minimum (256 KiB), so every chunk is really erasure coded: three records of about
    half its size, on three nodes."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "cluster"))
    from clusterutil import start_nodes
    from etcdutil import ETCD, HAVE_AETCD, Etcd
    if ETCD is None or not HAVE_AETCD:
        pytest.skip("needs the etcd binary and aetcd (make test installs both)")
    etcd = Etcd(tmp_path).start()
    try:
        ds = start_nodes(start_daemon, tmp_path, etcd, "c", 3, "engine=ec:2+1")
        seeds = f"{ds[0].control},{ds[1].control}"
        cfg = str(tmp_path / "engine.yaml")
        args = ["lmcache_engine_check.py", "--address", seeds, "--namespace", "engine", "--config", cfg,
                "--cluster", "--heads", "10", "--head-size", "64"]
        first = last_json(run(lmcache_python, [args[0], "store", *args[1:]]))
        assert first["stored_after"] == first["chunks"] == 4, first
        chunk = first["chunk_bytes"]
        assert chunk == 640 << 10 and first["object_sizes"] == [chunk] * 3 + [chunk // 2], first
        assert first["after_drop_retrieved_tokens"] == first["tokens"] and first["after_drop_equal"], first
        second = last_json(run(lmcache_python, [args[0], "retrieve", *args[1:]]))
        assert second["fresh_retrieved_tokens"] == second["tokens"] and second["fresh_equal"], second
        assert second["daemon_get_hits"] >= 4
        import kvstore
        # erasure coded: every chunk is 2 data + 1 parity records, one per node, each
        # about half the chunk (objects under the EC minimum would be 2 whole copies)
        held, sizes = [], []
        for d in ds:
            with kvstore.Client(d.control, timeout=5) as c:
                held.append(c.stats().namespaces.get("engine", 0))
                sizes += [e.size for e in c.list(namespace="engine", limit=100).entries]
        assert held == [4, 4, 4], held
        assert all(chunk // 4 < s < chunk * 0.6 for s in sizes), sizes
    finally:
        etcd.stop()


# runs the checker as ``python -m`` does (runpy, as __main__) once per file in one
# interpreter: LMCache's import (most of a run's time) is paid once, not per file
CHECKER_RUNS = """\
import contextlib, io, json, runpy, sys
out = []
for path in sys.argv[1:]:
    sys.argv = ["kvstore.integrations.lmcache", path]
    so, se = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
        try:
            runpy.run_module("kvstore.integrations.lmcache", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code
    out.append({"code": code, "stdout": so.getvalue(), "stderr": se.getvalue()})
print(json.dumps(out))
"""


def test_config_checker_command(lmcache_python, tmp_path):
    """``python -m kvstore.integrations.lmcache FILE`` exits 2 and prints what to add
    for a bare ``remote_url: kvstore://``, 0 for the documented configuration, and 2 for a
    file it cannot read."""
    bare = tmp_path / "bare.yaml"
    bare.write_text('chunk_size: 256\nmax_local_cpu_size: 1\nremote_url: "kvstore://10.0.0.5:7070"\n')
    good = tmp_path / "good.yaml"
    good.write_text(BASIC_CHECK_CONFIG.format(address="10.0.0.5:7070").replace('remote_url: "plugin://kvstore"\n', ""))
    missing = tmp_path / "missing.yaml"
    runs = last_json_list(run(lmcache_python, ["-c", CHECKER_RUNS, str(bare), str(good), str(missing)]))
    r = runs[0]
    assert r["code"] == 2, r
    assert 'remote_storage_plugins: ["kvstore"]' in r["stderr"] and "class_name: KVStoreConnectorAdapter" in r["stderr"]
    assert "address: kvstore://10.0.0.5:7070" in r["stderr"]
    r = runs[1]
    assert r["code"] == 0 and "configured" in r["stdout"], r
    r = runs[2]
    assert r["code"] == 2 and "cannot read" in r["stderr"], r


def last_json_list(r: subprocess.CompletedProcess) -> list:
    import json
    lines = [ln for ln in r.stdout.strip().splitlines() if ln.startswith("[")]
    assert r.returncode == 0 and lines, (
        f"exit {r.returncode}\n--- stdout ---\n{r.stdout[-3000:]}\n--- stderr ---\n{r.stderr[-5000:]}")
    return json.loads(lines[-1])
