"""ClusterClient over 5 real kvstored processes: policies, degraded reads, corruption, lookup."""
from __future__ import annotations

import os
import signal

import pytest

pytest.importorskip("pyeclib")

import kvstore
from kvstore.cluster import DEFAULT_MIN_EC_SIZE, ClusterClient, fragment_key
from kvstore.errors import InvalidArgument, NotFound
from kvstore.placement import place, place_positions

MIB = 1 << 20
T = DEFAULT_MIN_EC_SIZE
SIZES = [1, 4096, T - 1, T, T + 1, MIB, 2 * MIB + 7, 3 * MIB - 5]
POLICIES = {"plain": "none", "rep": "replicas:2", "ec": "ec:3+2"}


@pytest.fixture
def nodes(module_daemons):
    """Five standalone daemons shared by the module's tests, emptied before each; a node a
    test killed is replaced (on new ports: every test places by the addresses it gets)."""
    return module_daemons.group([f"n{i}" for i in range(5)])


def cluster(nodes, members=None, **kw):
    kw.setdefault("node_timeout", 2.0)
    kw.setdefault("fragment_timeout", 0.5)
    kw.setdefault("down_s", 60.0)
    return ClusterClient(members or [d.control for d in nodes], policy=dict(POLICIES), namespace="plain", **kw)


def blob(n: int, seed: int) -> bytes:
    return bytes([seed & 0xFF]) + os.urandom(n - 1)


def test_round_trips_every_policy(nodes):
    with cluster(nodes) as cc:
        objs = {f"obj-{i}".encode(): blob(n, i) for i, n in enumerate(SIZES)}
        objs[b"L" * 128] = blob(MIB, 99)  # longest key: EC record keys are hashed
        for ns in POLICIES:
            for k, v in objs.items():
                assert cc.put(k, v, namespace=ns) is True
                assert cc.put(k, v, namespace=ns) is False  # idempotent
            for k, v in objs.items():
                assert cc.get(k, namespace=ns) == v, (ns, len(v))
            got = cc.batch_get(list(objs), namespace=ns)
            assert [bytes(g) for g in got] == list(objs.values())
            with pytest.raises(NotFound):
                cc.get(b"absent", namespace=ns)
        # batch_put fans out per node
        items = [(f"b-{i}".encode(), blob(300_000 + i, i)) for i in range(8)]
        assert cc.batch_put(items, namespace="ec") == [True] * 8
        assert [bytes(x) for x in cc.batch_get([k for k, _ in items], namespace="ec")] == [v for _, v in items]
        # where things live: replicas on 2 distinct nodes, EC records on 5 (or M+1 for small)
        plain = {d.control: kvstore.Client(d.control, namespace="rep", timeout=5) for d in nodes}
        try:
            members = cc.members()
            k = b"obj-5"
            holders = [a for a, c in plain.items() if c.exists([k])[0]]
            assert sorted(holders) == sorted(m.address for m in place(k, members, 2, "rep"))
            ec_nodes = place_positions(fragment_key(k), members, 5, "ec")  # EC: by the record key, per position
            for i, m in enumerate(ec_nodes):
                assert plain[m.address].exists([fragment_key(k)], namespace="ec")[0]
            small = b"obj-2"  # below min_ec_size: whole copies under records 0..M
            sn = place_positions(fragment_key(small), members, 5, "ec")
            assert [plain[m.address].exists([fragment_key(small)], namespace="ec")[0]
                    for m in sn] == [True, True, True, False, False]
        finally:
            for c in plain.values():
                c.close()


def test_impossible_policy_rejected(nodes):
    with pytest.raises(InvalidArgument, match=r"needs 7 nodes for its 5\+2 fragments but the cluster has 5"):
        ClusterClient([d.control for d in nodes], policy="ec:5+2")
    with pytest.raises(InvalidArgument, match="invalid redundancy policy"):
        ClusterClient([d.control for d in nodes], policy="ec:3")
    with cluster(nodes) as cc:
        cc.set_policy("big", "replicas:6")
        with pytest.raises(InvalidArgument, match="needs 6 nodes"):
            cc.put(b"k", b"v", namespace="big")


def test_node_failures_degraded_reads(nodes):
    with cluster(nodes) as cc:
        sizes = [100, T - 1, T + 1, MIB, 2 * MIB, 3 * MIB - 1]
        objs = {f"o-{i}".encode(): blob(n, i) for i, n in enumerate(sizes * 2)}
        for ns in ("rep", "ec"):
            cc.batch_put(list(objs.items()), namespace=ns)
        chain = [f"chain-{i}".encode() for i in range(12)]
        cc.batch_put([(k, b"x" * 10) for k in chain], namespace="rep")
        nodes[1].stop(signal.SIGKILL)
        for ns in ("rep", "ec"):
            for k, v in objs.items():
                assert cc.get(k, namespace=ns) == v, (ns, k)
        assert cc.lookup(chain, namespace="rep") == 12  # answered by the second replica
        # the dead node dropped from the member list (as etcd would): placement shifts,
        # records are found by their header index wherever they now sit
        live = [d.control for d in nodes if d.alive()]
        with cluster(nodes, members=lambda: live, refresh_s=0.0) as shifted:
            for ns in ("rep", "ec"):
                assert [bytes(x) for x in shifted.batch_get(list(objs), namespace=ns)] == list(objs.values())
            assert shifted.lookup(chain, namespace="rep") == 12
            with pytest.raises(InvalidArgument, match=r"needs 5 nodes for its 3\+2 fragments but the cluster has 4"):
                shifted.put(b"new", b"v", namespace="ec")
        nodes[3].stop(signal.SIGKILL)
        codec = cc._codec(cc.policy("ec"))
        real, calls = codec.decode, []
        codec.decode = lambda frags: calls.append(len(frags)) or real(frags)
        if codec.isal is not None:  # where attached, ISA-L decodes first (layout._IsalCodec)
            real_isal = codec.isal.decode_into
            codec.isal.decode_into = lambda frags, n, out: calls.append(len(frags)) or real_isal(frags, n, out)
        for k, v in objs.items():
            assert cc.get(k, namespace="ec") == v, k
        assert [bytes(x) for x in cc.batch_get(list(objs), namespace="ec")] == list(objs.values())
        assert calls and all(n >= 3 for n in calls)  # some objects had a data fragment on a dead node
        live = [d.control for d in nodes if d.alive()]
        with cluster(nodes, members=lambda: live, refresh_s=0.0) as shifted:
            for k, v in objs.items():
                assert shifted.get(k, namespace="ec") == v, k


def test_corrupt_fragment_is_detected_and_decoded(nodes):
    with cluster(nodes) as cc:
        codec_calls = []
        v = blob(MIB + 3, 1)
        k = b"victim"
        cc.put(k, v, namespace="ec")
        members = cc.members()
        placed = place_positions(fragment_key(k), members, 5, "ec")
        p = cc.policy("ec")
        codec = cc._codec(p)
        real = codec.decode
        codec.decode = lambda frags: codec_calls.append(len(frags)) or real(frags)
        if codec.isal is not None:  # where attached, ISA-L decodes first (layout._IsalCodec)
            real_isal = codec.isal.decode_into
            codec.isal.decode_into = lambda frags, n, out: codec_calls.append(len(frags)) or real_isal(frags, n, out)
        assert cc.get(k, namespace="ec") == v and not codec_calls  # healthy: no decode
        for index, bad in ((0, b"garbage" * 100), (1, None)):
            with kvstore.Client(placed[index].address, namespace="ec", timeout=5) as c:
                rec = bytearray(c.get(fragment_key(k)))
                if bad is None:  # valid header, one payload byte flipped
                    rec[-10] ^= 0xFF
                    bad = bytes(rec)
                c.put(fragment_key(k), bad, overwrite=True)
            assert cc.get(k, namespace="ec") == v
        assert len(codec_calls) == 2 and all(n >= 3 for n in codec_calls)
        assert bytes(cc.batch_get([k], namespace="ec")[0]) == v


def test_lookup_prefix_across_nodes(nodes):
    with cluster(nodes) as cc:
        keys = kvstore.keys.chain(list(range(64 * 16)), 64)  # 16 chained block keys
        for ns in POLICIES:
            cc.batch_put([(k, b"kv" * 1000) for k in keys[:10]], namespace=ns)
            cc.put(keys[12], b"gap", namespace=ns)
            assert cc.lookup(keys, namespace=ns) == 10
            assert cc.exists(keys, namespace=ns) == [True] * 10 + [False, False, True, False, False, False]
            assert cc.lookup(keys[10:], namespace=ns) == 0
        primaries = {place(k, cc.members(), 1, "plain")[0].node_id for k in keys[:10]}
        assert len(primaries) > 1  # the prefix really spans nodes
        assert cc.delete(keys[:3], namespace="ec") == 3
        assert cc.lookup(keys, namespace="ec") == 0


def test_put_over_a_leftover_fragment_of_the_same_object(nodes):
    """An earlier attempt's record (another fragment index of the same object) left on a
    node where the undo did not reach: a new put of that object replaces it; a different
    object under the key is still a Conflict."""
    from kvstore.errors import Conflict
    from kvstore.layout import parse_record
    with cluster(nodes) as cc:
        k, v = b"leftover", blob(MIB, 5)
        cc.put(k, v, namespace="ec")
        placed = place_positions(fragment_key(k), cc.members(), 5, "ec")
        c0 = kvstore.Client(placed[0].address, namespace="ec", timeout=5)
        c1 = kvstore.Client(placed[1].address, namespace="ec", timeout=5)
        try:
            rec1 = bytes(c1.get(fragment_key(k)))
            c0.put(fragment_key(k), rec1, overwrite=True)  # node 0 now holds index 1 too
            c1.delete([fragment_key(k)])
            assert cc.put(k, v, namespace="ec") is True  # records restored, leftover replaced
            assert parse_record(c0.get(fragment_key(k)))[0][3] == 0
            assert cc.get(k, namespace="ec") == v
            with pytest.raises(Conflict):
                cc.put(k, blob(MIB, 6), namespace="ec")
        finally:
            c0.close()
            c1.close()


def test_killed_node_costs_under_a_second_and_is_used_again(nodes, start_daemon):
    """A node killed under the client: every call still answers within a second or two
    (a loaded machine's share) even with a 30 s node timeout (a refused connection fails
    fast; the node is skipped for ``down_s``), and once a node answers there again it
    gets its writes back."""
    import time

    with cluster(nodes, node_timeout=30.0, down_s=1.0) as cc:
        objs = {f"k-{i}".encode(): blob(300_000 + i, i) for i in range(10)}
        for ns in ("rep", "ec"):
            cc.batch_put(list(objs.items()), namespace=ns)
        victim = nodes[2]
        cport, dport = victim.info["control_port"], victim.data_port
        victim.stop(signal.SIGKILL)
        for ns in ("rep", "ec"):
            for call in (lambda: cc.get(b"k-3", namespace=ns),
                         lambda: cc.batch_get(list(objs), namespace=ns),
                         lambda: cc.exists(list(objs), namespace=ns),
                         lambda: cc.put(f"new-{ns}".encode(), blob(300_000, 7), namespace=ns)):
                t0 = time.monotonic()
                call()
                assert time.monotonic() - t0 < 2.5, f"{ns}: {time.monotonic() - t0:.2f}s with a dead node"
        start_daemon("--port", str(cport), "--data-port", str(dport))
        time.sleep(1.0)  # down_s
        members = cc.members()
        back = next(m for m in members if m.address == victim.control)
        k = next(f"again-{i}".encode() for i in range(1000)
                 if back in place(f"again-{i}".encode(), members, 2, "rep"))
        t0 = time.monotonic()
        while True:
            cc.put(k, b"v", namespace="rep", overwrite=True)
            with kvstore.Client(victim.control, namespace="rep", timeout=5) as c:
                if c.exists([k])[0]:
                    break
            assert time.monotonic() - t0 < 10.0, "the node that came back gets no writes"  # down_s 1 s
            time.sleep(0.1)
