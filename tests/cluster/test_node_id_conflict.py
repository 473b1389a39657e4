"""Two nodes under one node.id (a config copied to a second host), against a real etcd:
the second does not take the first's registration (both logged "registered" and the
member list showed one of them, holding different data); it stays unregistered and
degraded with an error naming the id and the other node, and joins once the first is
gone and its lease has run out. A node restarted at its own address within its lease
takes its key over at once."""
from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from clusterutil import wait_for
from etcdutil import TTL, needs_etcd

import kvstore

pytestmark = pytest.mark.timeout(120)


def _config(tmp: Path, name: str, etcd, node_id: str) -> str:
    path = tmp / f"{name}.toml"
    lines = ["[node]", f'id = "{node_id}"', "[cluster]", "enabled = true", f"lease_ttl = {TTL}",
             f'etcd_endpoints = "{etcd.endpoint}"', 'name = "dup"']
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _members(d):
    with kvstore.Client(d.control, timeout=5.0) as c:
        return c.members()


@needs_etcd
def test_second_node_with_the_same_id_stays_out(etcd, start_daemon, tmp_path):
    a = start_daemon("--config", _config(tmp_path, "a", etcd, "same-id"))
    wait_for(lambda: not _members(a).degraded, 15, "the first node registered")
    with kvstore.Client(a.control, namespace="n", timeout=5.0) as c:
        c.put(b"on-a", b"a's data")
    b = start_daemon("--config", _config(tmp_path, "b", etcd, "same-id"))
    # b serves its local data but is not in the cluster; it says why
    r = wait_for(lambda: (lambda r: r if "same-id" in r.detail else None)(_members(b)), 15,
              "the second node saying its id is taken")
    assert r.degraded and a.control in r.detail and "node.id" in r.detail, r.detail
    with kvstore.Client(b.control, timeout=5.0) as c:
        assert c.health().status == "degraded"
    assert "is registered by another node" in b.log()
    # the first keeps its registration: the list others read names a's address
    time.sleep(TTL + 1)  # longer than a lease: a's renewals went on, b took nothing
    r = _members(a)
    assert not r.degraded
    assert [m.control_address for m in r.members] == [a.control]
    with kvstore.Client(a.control, namespace="n", timeout=5.0) as c:
        assert c.get(b"on-a") == b"a's data"
    # the first node goes (its key with its lease): the second joins
    a.stop(signal.SIGKILL)
    wait_for(lambda: not _members(b).degraded, TTL + 15, "the second node registered")
    r = _members(b)
    assert [m.control_address for m in r.members] == [b.control]


@needs_etcd
def test_restart_at_the_same_address_takes_its_key_over(etcd, start_daemon, tmp_path):
    a = start_daemon("--config", _config(tmp_path, "a", etcd, "restarted"))
    wait_for(lambda: not _members(a).degraded, 15, "the node registered")
    port = int(a.control.rsplit(":", 1)[1])
    a.stop(signal.SIGKILL)  # its key stays until its lease runs out
    t0 = time.monotonic()
    a2 = start_daemon("--config", _config(tmp_path, "a2", etcd, "restarted"),
                      "--port", str(port), "--data-port", str(a.data_port))
    wait_for(lambda: not _members(a2).degraded, 15, "the restarted node registered")
    # registered before the old lease could have run out: the key was taken over, not waited for
    assert time.monotonic() - t0 < TTL + 10
    assert "is registered by another node" not in a2.log()
