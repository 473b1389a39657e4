"""ClusterClient's fanned-out batch put (writes._Fanout: every node's requests sent from the
calling thread) against real kvstored processes: the same records as the thread-pool path,
more unanswered requests than its window, a stalled node, refused and oversized puts, and
threads sharing one client."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("pyeclib")

import kvstore  # noqa: E402
from clusterutil import FANOUT_POLICIES, FANOUT_SIZES, fanout_cluster, random_objects  # noqa: E402
from kvstore import errors  # noqa: E402
from kvstore.cluster import ClusterClient, writes  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "security"))
from secutil import token, write_tokens  # noqa: E402
from threadutil import run_threads  # noqa: E402

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20
POLICIES, SIZES = FANOUT_POLICIES, FANOUT_SIZES
cluster, objects = fanout_cluster, random_objects


@pytest.fixture
def nodes(module_daemons):
    return module_daemons.group([f"f{i}" for i in range(5)])


@pytest.mark.parametrize("ns", list(POLICIES))
def test_fanout_stores_what_the_pool_path_stores(nodes, ns):
    """Both paths store every object (True), a repeat is a no-op (False) and reads give
    the bytes back; over plain TCP the fanned-out path hands nothing to the pool."""
    for fanout in (True, False):
        objs = objects(f"{ns}-{fanout}", 18)
        with cluster(nodes, fanout_puts=fanout) as cc:
            assert cc.batch_put(list(objs.items()), namespace=ns) == [True] * len(objs)
            assert cc.batch_put(list(objs.items()), namespace=ns) == [False] * len(objs)
            assert [bytes(b) for b in cc.batch_get(list(objs), namespace=ns)] == list(objs.values())
            assert cc.pooled_put_jobs == 0


def test_more_requests_than_the_window_to_one_node(nodes):
    """One node gets more puts in a batch than FANOUT_WINDOW: its answers are read before
    the rest is queued, and every put is acknowledged."""
    n = writes.FANOUT_WINDOW * 2 + 37
    objs = objects("win", n, sizes=[2048, 100, 9000])
    with ClusterClient([nodes[0].control], policy="none", node_timeout=10.0, shm=False) as cc:
        assert cc.batch_put(list(objs.items())) == [True] * n
        got = cc.batch_get(list(objs))
        assert all(bytes(g) == v for g, v in zip(got, objs.values()))
        assert cc.pooled_put_jobs == 0


def test_stalled_node_is_written_around_within_the_node_timeout(nodes):
    """A node that stops reading (SIGSTOP) under a batch: after about the node timeout it
    is marked down and the batch is written again over the other nodes, as for a node that
    refuses connections; every object reads back, then and after the node runs again."""
    objs = objects("stall", 24, sizes=[MIB])
    with cluster(nodes, node_timeout=1.5, fragment_timeout=0.5, down_s=60.0) as cc:
        cc.batch_put([(b"warm", os.urandom(300_000))], namespace="ec")  # connections exist
        victim = nodes[3]
        victim.proc.send_signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            assert cc.batch_put(list(objs.items()), namespace="ec") == [True] * len(objs)
            took = time.monotonic() - t0
            assert took < 10.0, f"a stalled node held the put for {took:.1f}s"
            down = {m.node_id for m in cc.members() if m.address == victim.control}
            assert down <= set(cc._down_now()) and down, "the stalled node is not marked down"
            assert [bytes(b) for b in cc.batch_get(list(objs), namespace="ec")] == list(objs.values())
        finally:
            victim.proc.send_signal(signal.SIGCONT)
        assert [bytes(b) for b in cc.batch_get(list(objs), namespace="ec")] == list(objs.values())


def test_oversized_value_is_refused_and_the_rest_undone(nodes):
    """A value over the daemons' max_value_size (4 MiB here) in a batch: InvalidArgument,
    and the batch's other objects are not left stored."""
    small = objects("small", 6, sizes=[1000, MIB])
    items = list(small.items()) + [(b"huge", os.urandom(4 * MIB + 1))]
    with cluster(nodes) as cc:
        for ns in ("plain", "rep"):
            with pytest.raises(errors.InvalidArgument, match="max_value_size"):
                cc.batch_put(items, namespace=ns)
            assert cc.exists(list(small) + [b"huge"], namespace=ns) == [False] * 7


def test_a_failed_put_keeps_the_new_copies_of_an_object_that_existed(nodes):
    """A failed batch undoes what it newly stored, but not the new copies of an object a
    node held already: "old" lost one of its two copies (deleted on that node by hand),
    then a batch re-puts it beside an oversized value. The home that kept it answers
    "stored already"; the other stores it again and keeps it after the failure (its
    delete would read, to the nodes' repair, as a client's delete of the object made
    after the older copy, which repair would then delete too: kvstored/cluster/repair/
    decide.py). The batch's new object is undone as before."""
    with cluster(nodes) as cc:
        p = cc.policy("rep")
        huge = (b"huge-2", os.urandom(4 * MIB + 1))
        bad = {m.node_id for m, *_ in cc._writes(huge[0], memoryview(huge[1]), "rep", p)}
        for i in range(200):  # an object none of whose homes is one of the oversized one's
            key, value = b"old-%d" % i, os.urandom(2000)
            homes = [m for m, *_ in cc._writes(key, memoryview(value), "rep", p)]
            if not bad & {m.node_id for m in homes}:
                break
        else:
            pytest.fail("no object placed away from the oversized one")
        assert cc.batch_put([(key, value)], namespace="rep") == [True]
        with kvstore.Client(homes[1].address, timeout=10, shm=False, namespace="rep") as c:
            assert c.delete([key]) == 1
        with pytest.raises(errors.InvalidArgument, match="max_value_size"):
            cc.batch_put([(key, value), (b"new-2", b"n" * 1000), huge], namespace="rep")
        for m in homes:
            with kvstore.Client(m.address, timeout=10, shm=False, namespace="rep") as c:
                assert c.get(key) == value, m.node_id
        assert cc.exists([b"new-2", huge[0]], namespace="rep") == [False, False]


def test_threads_share_one_client(nodes):
    """Four threads put through one ClusterClient at once (each its own channels): every
    object of every thread is stored and reads back."""
    stored: dict[bytes, bytes] = {}
    lock = threading.Lock()
    with cluster(nodes) as cc:
        def work(t: int) -> None:
            for b in range(4):
                objs = objects(f"t{t}-b{b}", 8, sizes=[70_000, 600_000])
                assert cc.batch_put(list(objs.items()), namespace="ec") == [True] * 8
                with lock:
                    stored.update(objs)

        run_threads(work, range(4), timeout=60)
        assert len(stored) == 4 * 4 * 8
        got = cc.batch_get(list(stored), namespace="ec")
        assert all(bytes(g) == v for g, v in zip(got, stored.values()))


@pytest.fixture
def auth_nodes(module_daemons, tmp_path_factory):
    d = tmp_path_factory.mktemp("fanout-auth")
    tokens = write_tokens(d / "tokens.toml")
    cfg = d / "auth.toml"
    cfg.write_text(f'[auth]\nenabled = true\ntokens_file = "{tokens}"\n')
    return module_daemons.group([f"a{i}" for i in range(3)], "--config", str(cfg))


def test_read_only_token_is_refused_and_nothing_stored(auth_nodes):
    """A token without the write scope: PermissionDenied from every node, nothing stored;
    the read/write token's batch goes through the fanned-out path."""
    objs = objects("auth", 9, sizes=[5000, 400_000])
    addrs = [d.control for d in auth_nodes]
    with ClusterClient(addrs, policy="ec:2+1", namespace="team-a", token=token("ro"), node_timeout=5.0,
                       shm=False) as ro:
        with pytest.raises(errors.PermissionDenied):
            ro.batch_put(list(objs.items()))
    with ClusterClient(addrs, policy="ec:2+1", namespace="team-a", token=token("rw"), node_timeout=5.0,
                       shm=False) as rw:
        assert rw.exists(list(objs)) == [False] * len(objs)
        assert rw.batch_put(list(objs.items())) == [True] * len(objs)
        assert rw.pooled_put_jobs == 0
        assert [bytes(b) for b in rw.batch_get(list(objs))] == list(objs.values())
    with ClusterClient(addrs, policy="ec:2+1", namespace="team-a", token="not-a-token", node_timeout=5.0,
                       shm=False) as bad:
        with pytest.raises(errors.PermissionDenied):  # an unknown token is refused at AUTH
            bad.batch_put(list(objs.items())[:2])
    with kvstore.Client(addrs[0], token=token("rw"), namespace="team-a", timeout=5) as c:
        assert c.ping() >= 0


def test_same_host_shm_channels_put_through_the_pool(nodes):
    """On the same host the nodes' channels are shm, which moves a batch's large objects
    outside the frames: those jobs go to the thread pool (counted), with the same results."""
    objs = objects("shm", 12, sizes=[300_000, MIB])
    with cluster(nodes, shm=None) as cc:
        assert cc.batch_put(list(objs.items()), namespace="ec") == [True] * len(objs)
        assert cc.pooled_put_jobs > 0
        assert [bytes(b) for b in cc.batch_get(list(objs), namespace="ec")] == list(objs.values())
