"""kvstore-cli nodes / drain / policy against a real standalone kvstored (no etcd: the
cluster flows themselves are tested under tests/cluster)."""
from __future__ import annotations

import json

import pytest
from cliutil import one_error_line

from kvstore.cli import main, repair_line


@pytest.fixture(scope="module")
def standalone(tmp_path_factory):
    """One standalone daemon shared by the module: every test here only reads it, or is
    refused by it, so sharing keeps the module fast."""
    from daemonutil import Daemon  # the conftest's own helper (tests/ is on sys.path)
    d = Daemon(tmp_path_factory.mktemp("cli_cluster")).start()
    yield d
    d.stop()


@pytest.fixture
def cli(standalone, capsys):
    """cli(*args) -> (exit code, stdout, stderr)."""
    def run(*args: str):
        rc = main(["-a", standalone.control, *args])
        out, err = capsys.readouterr()
        return rc, out, err
    return run


# ---------------------------------------------------------------- nodes

def test_nodes_text_shows_the_node_flags_epoch_policies_and_repair_off(cli, standalone):
    node_id = standalone.info["node_id"]
    rc, out, err = cli("nodes")
    assert rc == 0, err
    lines = out.splitlines()
    assert "standalone membership" in lines[0]
    assert lines[1].split() == ["NODE", "CONTROL", "DATA", "DOMAIN", "DRAM", "NVME", "HEALTH",
                                "SEEN", "FLAGS"]
    assert lines[2].startswith("* " + node_id) and standalone.control in lines[2]
    assert any(line.split()[:2] == ["epoch", "0x00000000"] for line in lines), out
    assert any(line.split()[:3] == ["policies", "none", "set"] for line in lines), out
    assert f"{node_id}  repair: off" in lines


def test_nodes_json_has_flags_repair_policies_and_epoch(cli, standalone):
    rc, out, err = cli("nodes", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["source"] == "standalone" and not doc["degraded"]
    assert (doc["epoch"], doc["epoch_hex"], doc["policies"]) == (0, "0x00000000", {})
    [n] = doc["nodes"]
    assert n["node_id"] == standalone.info["node_id"] and n["self"]
    assert n["draining"] is False and isinstance(n["placement"], bool)
    assert n["reachable"] is True and n["probe_error"] is None
    assert n["repair"]["state"] == "off"
    assert set(n["repair"]) >= {"passes", "scanned", "total", "records_written", "bytes_written",
                                "dropped", "failures", "pending"}
    assert isinstance(n["unverified"], int)


def test_repair_line_format():
    rep = {"state": "idle", "passes": 3, "scanned": 120, "total": 500, "records_written": 12,
           "bytes_written": 48 << 20, "verified": 0, "dropped": 2, "removed": 0, "failures": 0,
           "last_pass_seconds": 1.5, "pending": 0}
    assert repair_line(rep) == ("idle, pass 3, 120/500 scanned, 12 written (48.0 MiB), 0 pending, "
                                "2 dropped stale, 0 failures")
    assert repair_line(rep, 7).endswith(", 0 failures, 7 unverified")
    assert repair_line({**rep, "state": "off"}) == "off"


# ---------------------------------------------------------------- drain

def test_drain_own_node_on_standalone_is_refused_clearly(cli, standalone):
    for node in (standalone.info["node_id"], standalone.control):  # by id or by address
        rc, out, err = cli("drain", node)
        assert rc == 1 and out == ""
        assert "not in a cluster" in one_error_line(err, "InvalidArgument")


def test_drain_unknown_node_lists_the_known_ids(cli, standalone):
    rc, out, err = cli("drain", "no-such-node", "--wait", "--timeout", "5")
    assert rc == 2 and out == ""
    assert "unknown node 'no-such-node'" in err
    assert standalone.info["node_id"] in err.strip().splitlines()[-1]


def test_drain_wait_with_cancel_is_a_usage_error(cli, standalone):
    rc, _, err = cli("drain", standalone.info["node_id"], "--cancel", "--wait")
    assert rc == 2 and "--cancel" in err


# ---------------------------------------------------------------- policy

def test_policy_set_and_rm_on_standalone_are_refused_clearly(cli):
    for args in (("policy", "set", "llama", "ec:4+2"), ("policy", "set", "*", "replicas:2"),
                 ("policy", "rm", "llama")):
        rc, out, err = cli(*args)
        assert rc == 1 and out == "", args
        assert "not in a cluster" in one_error_line(err, "InvalidArgument")


@pytest.mark.parametrize("bad", ["ec:3", "replicas:0", "raid5", "ec:4+0"])
def test_policy_set_malformed_policy_fails_clearly(cli, bad):
    rc, out, err = cli("policy", "set", "ns", bad)
    assert rc == 1 and out == ""
    line = one_error_line(err, "InvalidArgument")
    assert f"invalid redundancy policy {bad!r}" in line and "ec:K+M" in line


def test_policy_ls_is_empty_on_standalone(cli):
    rc, out, err = cli("policy", "ls")
    assert rc == 0, err
    assert out.startswith("no redundancy policies set")
    rc, out, err = cli("policy", "ls", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["policies"] == {} and doc["source"] == "standalone"


def test_policy_needs_an_action(cli):
    rc, _, err = cli("policy")
    assert rc == 2 and "ACTION" in err


# ---------------------------------------------------------------- drain --wait (real etcd)

def test_drain_wait_progress_on_stderr_json_alone_on_stdout(start_daemon, tmp_path, capsys):
    """drain --wait --progress on a two-node etcd cluster: stdout carries the one JSON
    document, every progress line goes to stderr; without --progress (stderr not a
    terminal) no progress line at all."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "cluster"))
    from clusterutil import start_nodes
    from etcdutil import ETCD, HAVE_AETCD, Etcd

    from kvstore.cluster import ClusterClient
    if ETCD is None or not HAVE_AETCD:
        pytest.skip("needs the etcd binary and aetcd (make test installs both)")
    etcd = Etcd(tmp_path).start()
    try:
        # repair settles 1 s, not the default 10 s: the drain is still under way at the
        # first poll (so one progress line at least), and the test waits 10 s less
        ds = start_nodes(start_daemon, tmp_path, etcd, "dp", 2, "*=none", cluster_extra="repair_delay = 1")
        cc = ClusterClient.from_cluster([d.control for d in ds], node_timeout=3.0)
        try:
            cc.batch_put([(f"k{i}".encode(), bytes([i]) * 20_000) for i in range(40)])
        finally:
            cc.close()
        rc = main(["-a", ds[0].control, "--json", "drain", "dp1", "--wait", "--timeout", "60",
                   "--progress"])
        out, err = capsys.readouterr()
        assert rc == 0, err
        doc = json.loads(out)
        assert doc["node_id"] == "dp1" and doc["safe_to_stop"] and doc["objects"] == 0
        lines = err.splitlines()
        assert len(lines) >= 2 and lines[0].startswith("dp1: draining, "), err
        for line in lines[1:]:  # progress lines
            assert line.startswith("dp1: ") and " objects left after " in line, err

        rc = main(["-a", ds[0].control, "--json", "drain", "dp1", "--wait"])  # already empty
        out, err = capsys.readouterr()
        assert rc == 0 and json.loads(out)["safe_to_stop"]
        assert len(err.splitlines()) == 1 and "objects left after" not in err
    finally:
        etcd.stop()
