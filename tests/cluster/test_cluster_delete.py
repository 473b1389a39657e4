"""ClusterClient.delete against real kvstored processes: one call per node and chunk of
records (DeleteResponse answers for each key), the count of keys that had something
deleted, a killed node, a node that answers only a count, and two clients at once."""
from __future__ import annotations

import signal

import pytest
from threadutil import run_threads

pytest.importorskip("pyeclib")

import kvstore  # noqa: E402
from clusterutil import FANOUT_POLICIES, fanout_cluster, random_objects  # noqa: E402
from kvstore import errors  # noqa: E402
from kvstore.cluster import control as cluster_control  # noqa: E402

pytestmark = pytest.mark.timeout(120)

SMALL = [1, 100, 4096]


@pytest.fixture
def nodes(module_daemons):
    return module_daemons.group([f"del{i}" for i in range(5)])


@pytest.mark.parametrize("ns", list(FANOUT_POLICIES))
def test_many_keys_counted_exactly(nodes, ns):
    # more records per node than one call carries, so several chunks per node
    n = 3 * cluster_control.KEYS_PER_CALL
    with fanout_cluster(nodes) as cc:
        objs = random_objects(f"{ns}-m", n, SMALL)
        keys = list(objs)
        stored = keys[::2]
        cc.batch_put([(k, objs[k]) for k in stored], namespace=ns)
        assert cc.delete(keys, namespace=ns) == len(stored)  # absent ones not counted
        assert not any(cc.exists(keys, namespace=ns))
        for c in (cc.client(m) for m in cc.members()):  # no record left anywhere
            assert c.list(namespace=ns).total == 0
        assert cc.delete(keys, namespace=ns) == 0  # idempotent


def test_a_node_answering_only_a_count(nodes):
    # a node of an older version answers Delete with a count only (delete_each gives
    # None): the client asks it key by key, and the count stays exact
    with fanout_cluster(nodes) as cc:
        objs = random_objects("old", 40, SMALL)
        cc.batch_put(list(objs.items()), namespace="ec")
        old = cc.client(cc.members()[0])
        old.delete_each = lambda keys, **kw: None
        assert cc.delete(list(objs) + [b"absent"], namespace="ec") == len(objs)
        assert not any(cc.exists(list(objs), namespace="ec"))


def test_killed_node_is_best_effort(start_daemon):
    ds = start_daemon.many(*[() for _ in range(5)])
    with fanout_cluster(ds, node_timeout=3.0) as cc:
        objs = random_objects("k", 60, SMALL)
        cc.batch_put(list(objs.items()), namespace="rep")
        ds[2].proc.send_signal(signal.SIGKILL)
        ds[2].proc.wait(10)
        # every key had a copy on a live node, so every key counts
        assert cc.delete(list(objs), namespace="rep") == len(objs)
        for d in ds[:2] + ds[3:]:
            with kvstore.Client(d.control, timeout=10) as c:
                assert c.list(namespace="rep").total == 0


def test_oversized_and_malformed_keys(nodes):
    with fanout_cluster(nodes) as cc:
        with pytest.raises(errors.InvalidArgument):
            cc.delete([b"x" * 100_000], namespace="rep")
        with pytest.raises(errors.InvalidArgument):
            cc.delete([b""], namespace="rep")
        assert cc.delete([], namespace="rep") == 0


def test_two_clients_delete_the_same_keys_at_once(nodes):
    with fanout_cluster(nodes) as a, fanout_cluster(nodes) as b:
        objs = random_objects("both", 600, SMALL)
        a.batch_put(list(objs.items()), namespace="ec")
        keys = list(objs)
        counts: dict[int, int] = {}

        def delete(i: int) -> None:
            counts[i] = (a, b)[i].delete(keys if i == 0 else keys[::-1], namespace="ec")
        run_threads(delete, [0, 1], timeout=60)
        counts = list(counts.values())
        assert len(counts) == 2
        # a key's records may be split between the two calls: each may count it
        assert all(c <= len(keys) for c in counts) and sum(counts) >= len(keys)
        assert not any(a.exists(keys, namespace="ec"))
