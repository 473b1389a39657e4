"""A cluster with TLS (mutual), tokens and etcd: repair still works (the agent presents the
node's certificate and cluster.token to its peers), and the cluster RPCs refuse callers
without the admin scope."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
from clusterutil import missing_redundancy, wait_for, wait_left
from etcdutil import TTL, needs_etcd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "security"))
pytest.importorskip("pyeclib")
pytest.importorskip("cryptography")

import kvstore  # noqa: E402
from kvstore import errors  # noqa: E402
from kvstore.cluster import ClusterClient  # noqa: E402
from kvstore.layout import Policy  # noqa: E402
from kvstore.placement import Member  # noqa: E402
from seccerts import make_certs  # noqa: E402
from secutil import client_tls, token, write_tokens  # noqa: E402

pytestmark = [needs_etcd, pytest.mark.timeout(180)]


def test_secure_cluster_repairs_and_refuses_non_admins(etcd, start_daemon, tmp_path):
    certs = make_certs(tmp_path / "certs")
    tokens = write_tokens(tmp_path / "tokens.toml")
    tls = client_tls(certs)
    ds = []
    for i in range(4):
        cfg = tmp_path / f"s{i}.toml"
        cfg.write_text(
            f'[node]\nid = "s{i}"\n'
            f'[tls]\ncert_file = "{certs.node.cert}"\nkey_file = "{certs.node.key}"\n'
            f'client_ca_file = "{certs.ca}"\n'
            f'[auth]\nenabled = true\ntokens_file = "{tokens}"\n'
            f'[cluster]\nenabled = true\nlease_ttl = {TTL}\netcd_endpoints = "{etcd.endpoint}"\n'
            f'repair_delay = 0.5\nrepair_interval = 3\npolicies = "team-a=ec:2+1"\n'
            f'token = "{token("admin")}"\n')
        ds.append(start_daemon("--config", str(cfg)))

    def admin(d):
        return kvstore.Client(d.control, token=token("admin"), tls=tls, timeout=5)

    def placed(d):
        with admin(d) as c:
            return {m.node_id for m in c.members().members if m.placement}

    wait_for(lambda: len(placed(ds[0])) == 4, 15, "four members")
    cc = ClusterClient.from_cluster(ds[0].control, namespace="team-a", token=token("rw"), tls=tls,
                                    node_timeout=3.0, refresh_s=0.5)
    objs = {f"s-{i}".encode(): os.urandom(300_000 + i) for i in range(16)}
    cc.batch_put(list(objs.items()))
    assert cc.pooled_put_jobs > 0  # TLS takes no MSG_DONTWAIT sends: the thread pool's path
    # the cluster RPCs are admin-only: a read/write token and no token are refused
    with kvstore.Client(ds[1].control, token=token("rw"), tls=tls, timeout=5) as rw:
        with pytest.raises(errors.PermissionDenied):
            rw.heads([b"s-0#ec"], namespace="team-a")
        with pytest.raises(errors.PermissionDenied):
            rw.drain()
        with pytest.raises(errors.PermissionDenied):
            rw.set_policy("team-a", "ec:3+1")
        assert len(rw.members().members) == 4  # the member list needs any valid token
    with kvstore.Client(ds[1].control, tls=tls, timeout=5) as anon:
        with pytest.raises(errors.PermissionDenied):
            anon.drain()
    # a node dies: the survivors rebuild over TLS with the cluster token
    ds[3].stop(signal.SIGKILL)
    wait_left(etcd, "default", "s3", ds[:1], placed, TTL + 5, "s3 leaving")
    assert len(placed(ds[0])) == 3

    def repaired():
        written = 0
        for d in ds[:3]:
            with admin(d) as c:
                r = c.members().repair
                if r.state != "idle" or r.pending:
                    return False
                written += r.records_written
        # and every object's records back on its slots (a pass still to come on one node
        # can look idle with nothing pending for a moment)
        with admin(ds[0]) as c:
            live = [Member(m.node_id, m.control_address, m.failure_domain)
                    for m in c.members().members if m.placement]
        return written > 0 and not missing_redundancy(
            live, "team-a", Policy.parse("ec:2+1"), objs, client_kw={"token": token("admin"), "tls": tls})
    wait_for(repaired, 60, "repair over TLS")
    for k, v in objs.items():
        assert cc.get(k) == v
    # redundancy is back: a second node can go
    ds[2].stop(signal.SIGKILL)
    for k, v in objs.items():
        assert cc.get(k) == v
    cc.close()
