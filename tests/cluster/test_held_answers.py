"""A record held back (a cluster node back from a restart with its NVMe tier, not yet
checked by its repair) is answered NotVerified, not NotFound: "present, retry shortly",
not "gone, recompute". Real etcd and real kvstored processes: a node restarted while the
other home of some replicated objects hangs (SIGSTOP, listed: its lease is long) cannot
verify them, so they stay held until that peer answers again.

Checked on the held node: TCP and gRPC gets answer NotVerified to this SDK and NotFound to
a client that did not announce it knows the code (a raw frame without
wire.FLAG_NOT_VERIFIED_OK, a gRPC call without ``kvstore-accepts``); exists says False;
the cluster client raises NotVerified without marking the node down, while EC objects
with K verified fragments read as usual; repair's peer reads (PeerIO) do not take the
answer for a dead peer; and once the peer is back, the records are verified and served."""
from __future__ import annotations

import os
import signal
import socket

import grpc
import pytest
from clusterutil import placement, placement_members, wait_for
from etcdutil import needs_etcd

pytest.importorskip("pyeclib")

import kvstore  # noqa: E402
from kvstore import errors, wire  # noqa: E402
from kvstore.cluster import ClusterClient  # noqa: E402
from kvstore.layout import Policy, placement_key, slots  # noqa: E402
from kvstore.v1 import control_pb2 as pb  # noqa: E402
from kvstore.v1 import control_pb2_grpc as pb_grpc  # noqa: E402

from daemonutil import read_frame  # noqa: E402

POLICIES = {"rep": "replicas:2", "ec": "ec:2+1"}
LEASE = 60  # s: the hung peer stays listed (a peer that does not answer) for the whole test


def _args(tmp, etcd, name: str) -> tuple[str, ...]:
    cfg = tmp / f"{name}.toml"
    pols = ", ".join(f"{ns}={p}" for ns, p in POLICIES.items())
    cfg.write_text(f'[node]\nid = "{name}"\n[cluster]\nenabled = true\nlease_ttl = {LEASE}\nname = "nv"\n'
                   f'etcd_endpoints = "{etcd.endpoint}"\nrepair_delay = 0.5\nrepair_interval = 2\n'
                   f'policies = "{pols}"\n'
                   f'[nvme]\npath = "{tmp / (name + ".nvme")}"\nsize = "64MiB"\nregion_size = "16MiB"\n')
    return ("--config", str(cfg))


def _raw_get(port: int, key: bytes, flags: int) -> int:
    """The status code a hand-made GET frame (``flags``) is answered with."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(wire.encode_request(wire.OP_GET, 7, b"rep", key, flags=flags))
        got = read_frame(s)
    assert got is not None and got[0].req_id == 7
    return got[0].status


def _grpc_get(address: str, key: bytes, metadata: tuple) -> tuple[grpc.StatusCode, str]:
    """A control-plane Get sent by hand: (gRPC status, kvstore-code trailer)."""
    with grpc.insecure_channel(address) as ch:
        with pytest.raises(grpc.RpcError) as ei:
            pb_grpc.KVStoreStub(ch).Get(pb.GetRequest(namespace="rep", key=key), timeout=10,
                                        metadata=metadata)
    e = ei.value
    code = dict(e.trailing_metadata() or ()).get("kvstore-code", "")
    return e.code(), code


@needs_etcd
@pytest.mark.timeout(180)
def test_held_records_answer_not_verified_until_checked(etcd, start_daemon, tmp_path, capsys):
    names = ["v0", "v1", "v2"]
    ds = dict(zip(names, start_daemon.many(*(_args(tmp_path, etcd, n) for n in names))))
    for d in ds.values():
        wait_for(lambda d=d: placement(d) == set(names), 20, "three nodes")
    members = placement_members(ds["v0"])
    rep = Policy.parse(POLICIES["rep"])
    # replicated objects whose homes are v0 (to be restarted) and v1 (to hang)
    pair = [k for k in (f"r-{i}".encode() for i in range(2000))
            if {m.node_id for m, _ in slots(placement_key(k, rep), members, rep, "rep")} == {"v0", "v1"}]
    objs = {k: os.urandom(2000 + i) for i, k in enumerate(pair[:8])}
    ecs = {f"e-{i}".encode(): os.urandom(4000 + i) for i in range(6)}
    assert len(objs) == 8
    cc = ClusterClient.from_cluster([d.control for d in ds.values()], node_timeout=2.0,
                                    fragment_timeout=1.0, down_s=60.0, min_ec_size=0)
    hung = ds["v1"]
    try:
        cc.batch_put(list(objs.items()), namespace="rep")
        cc.batch_put(list(ecs.items()), namespace="ec")
        hung.proc.send_signal(signal.SIGSTOP)  # listed (long lease), answers nothing
        ds["v0"].stop()
        ds["v0"].start(30)
        v0 = ds["v0"]
        wait_for(lambda: placement(v0) == set(names), 30, "v0 back in placement")
        cc.close()  # one that knows v0's new address
        cc = ClusterClient.from_cluster([v0.control, ds["v2"].control], node_timeout=2.0,
                                        fragment_timeout=1.0, down_s=60.0, min_ec_size=0)
        with kvstore.Client(v0.control, timeout=10, shm=False, namespace="rep") as c:
            assert c.stats().counters["unverified"] >= len(objs)
            k = next(iter(objs))
            # this SDK: NotVerified over TCP and gRPC; exists says "not servable now"
            with pytest.raises(errors.NotVerified, match="held back"):
                c.get(k)
            with pytest.raises(errors.NotVerified):
                c.batch_get([k])
            with pytest.raises(errors.NotVerified):
                c.control_get(k)
            assert isinstance(errors.error_for_code(errors.NotVerified.code), errors.Unavailable)
            assert c.exists(list(objs)) == [False] * len(objs)
            from kvstore.cli import main as cli
            capsys.readouterr()
            assert cli(["-a", v0.control, "-n", "rep", "get", k.decode(), "-o", "-"]) == 3  # Unavailable
            out, err = capsys.readouterr()
            assert out == "" and err.startswith("kvstore-cli: NotVerified: ") and "retry" in err
            # clients that did not announce the code (older SDKs) get NotFound, as before
            assert _raw_get(v0.data_port, k, 0) == errors.NotFound.code
            assert _raw_get(v0.data_port, k, wire.FLAG_NOT_VERIFIED_OK) == errors.NotVerified.code
            assert _raw_get(v0.data_port, b"never-put", wire.FLAG_NOT_VERIFIED_OK) == errors.NotFound.code
            assert _grpc_get(v0.control, k, ()) == (grpc.StatusCode.NOT_FOUND, str(errors.NotFound.code))
            assert _grpc_get(v0.control, k, (("kvstore-accepts", "not-verified"),)) == \
                (grpc.StatusCode.UNAVAILABLE, str(errors.NotVerified.code))
            assert _grpc_get(v0.control, k, (("kvstore-accepts", "later-thing, not-verified"),))[1] == \
                str(errors.NotVerified.code)  # a list, as later SDKs may send
            assert _grpc_get(v0.control, k, (("kvstore-accepts", "not-verified-x"),))[1] == \
                str(errors.NotFound.code)  # an unknown word is no announcement

            # the cluster client: NotVerified (retry shortly), never NotFound; the held
            # node is an answer, not a dead node
            v0m = next(m for m in cc.members() if m.node_id == "v0")
            for k in objs:
                with pytest.raises(errors.NotVerified):
                    cc.get(k, namespace="rep")
            with pytest.raises(errors.NotVerified):
                cc.batch_get(list(objs), namespace="rep")
            assert not cc._is_down(v0m)
            # EC objects: v0's fragments are checked against v2's (which answers), and read
            # from K=2 verified fragments while v1 hangs
            wait_for(lambda: _all_read(cc, ecs, "ec"), 40, "ec objects read with v1 hung")

            # repair's peer reads: a held record is no source, and its node is not dead
            from kvstored.cluster.repair.peers import PeerIO
            peers = PeerIO()
            try:
                assert peers.get_many(v0m, b"rep", list(objs)[:3]) == [None] * 3
                assert "v0" not in peers.unreachable
                assert peers.heads(v0m, b"rep", list(objs)[:1], 0).heads[0].unverified
            finally:
                peers.close()
            # still held: nothing could check them (their other home hangs)
            assert c.stats().counters["unverified"] >= len(objs)
            with pytest.raises(errors.NotVerified):
                c.get(k)

            hung.proc.send_signal(signal.SIGCONT)
            wait_for(lambda: c.stats().counters["unverified"] == 0, 60, "v0's records checked")
            for k, v in objs.items():
                assert c.get(k) == v
        for k, v in objs.items():
            assert cc.get(k, namespace="rep") == v
        for k, v in ecs.items():
            assert cc.get(k, namespace="ec") == v
    finally:
        hung.proc.send_signal(signal.SIGCONT)
        cc.close()


def _all_read(cc, objs: dict, ns: str) -> bool:
    try:
        return all(cc.get(k, namespace=ns) == v for k, v in objs.items())
    except errors.Unavailable:
        return False


def test_not_verified_is_a_typed_unavailable():
    e = errors.error_for_code(13, "held")
    assert type(e) is errors.NotVerified and isinstance(e, errors.Unavailable)
    assert not isinstance(e, errors.NotFound) and e.message == "held"
    from kvstore._common import call_metadata, is_unreachable
    assert not is_unreachable(e)  # an answer: no ride-out retry loop, no TLS diagnosis
    from kvstore.integrations._breaker import is_outage
    assert not is_outage(e)  # the engine adapters' breaker stays closed: the store answered
    import kvstore
    assert kvstore.NotVerified is errors.NotVerified
    assert ("kvstore-accepts", "not-verified") in call_metadata(None)
    assert call_metadata("tok")[0] == ("authorization", "Bearer tok")
