"""kvstore-cli status names the data transport in use and, when RDMA is not used, why."""
from __future__ import annotations

import json

from kvstore.cli import main


def status(d, capsys, *extra: str):
    rc = main(["-a", d.control, "-n", "test", *extra, "status"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def test_status_shows_rdma_in_use(rdma_daemon, capsys):
    doc = json.loads(status(rdma_daemon, capsys, "--rdma", "--json"))
    assert doc["cli_transport"] == "rdma" and doc["cli_transport_reason"] is None
    line = [ln for ln in status(rdma_daemon, capsys, "--rdma").splitlines()
            if ln.strip().startswith("transport")]
    assert line and line[0].split()[-1] == "rdma", line

def test_status_shows_the_fallback_and_why(start_daemon, twin_env, capsys):
    d = start_daemon(env={"KVSTORE_RDMA_VERBS": "off"})  # this host has the twin; the daemon not
    doc = json.loads(status(d, capsys, "--rdma", "--json"))
    assert doc["cli_transport"] == "tcp"
    assert "does not offer RDMA" in doc["cli_transport_reason"]
    line = [ln for ln in status(d, capsys, "--rdma").splitlines() if ln.strip().startswith("transport")]
    assert line and "tcp (RDMA not used: kvstored does not offer RDMA" in line[0], line
