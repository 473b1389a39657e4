"""How long a ClusterClient follows Redirects (``redirect_s``), against real cluster nodes and
etcd: nodes learn a membership change one after another, so a client's member-list source
can lag behind the node it writes to for a while. The client must ride through such a lag
(re-reading the list until it is current) and give up, with a Redirect that says so, only
once ``redirect_s`` has passed; a write it gave up on stores nothing.

The lag is made by the source itself: for its first seconds, and at least its first calls,
it returns the cluster's real member list with an epoch no node has, exactly what a source
still on the old list hands out (the nodes answer Redirect and skip the payload). Counted
as well as timed, so that what the tests count follows on a slow, loaded machine too: a
client (its periodic re-read, ``refresh_s``, out of the way) reads the list on first use,
once by each thread that finds it unread, then once per Redirect it follows; so a source
stale for its first n calls has seen at least n - k followed Redirects, k threads at first
use, before any write can go through."""
from __future__ import annotations

import os
import time

import pytest
from threadutil import run_threads

import kvstore
from clusterutil import start_nodes
from etcdutil import TTL, needs_etcd
from kvstore import errors
from kvstore.cluster import ClusterClient, ClusterView
from kvstore.cluster.view import view_from_members_response

pytestmark = [needs_etcd, pytest.mark.timeout(120)]


@pytest.fixture
def three(etcd, start_daemon, tmp_path):
    return start_nodes(start_daemon, tmp_path, etcd, "n", 3, "ec=ec:2+1, rep=replicas:2",
                       lease_ttl=TTL, cluster_extra="repair_delay = 30")


class LaggingSource:
    """A member-list source that hands out a stale epoch until ``lag_s`` after its first
    call (float('inf'): for ever) and for its first ``stale_calls`` calls at least; counts
    its calls, and the stale ones."""

    def __init__(self, node, lag_s: float, stale_calls: int = 5):
        self.node, self.lag_s, self.stale_calls = node, lag_s, stale_calls
        self.t0: float | None = None
        self.calls = self.stale = 0

    def __call__(self) -> ClusterView:
        self.calls += 1
        if self.t0 is None:
            self.t0 = time.monotonic()
        with kvstore.Client(self.node.control, timeout=5) as c:
            v = view_from_members_response(c.members())
        if time.monotonic() - self.t0 < self.lag_s or self.stale < self.stale_calls:
            self.stale += 1
            v = ClusterView(v.members, v.policies, v.epoch + 1000)  # an epoch no node has
        return v


def stored(node, keys: list[bytes], ns: str) -> list[bool]:
    """Whether the cluster holds ``keys`` (a client on the current list)."""
    with ClusterClient.from_cluster(node.control) as cc:
        return cc.exists(keys, namespace=ns)


@pytest.mark.parametrize("ns", ["ec", "rep"])
def test_a_source_lagging_for_a_second_and_a_half_is_ridden_through(three, ns):
    src = LaggingSource(three[0], lag_s=1.5, stale_calls=5)
    with ClusterClient(src, redirect_s=20, refresh_s=3600) as cc:
        objs = [(f"lag-{ns}-{i}".encode(), os.urandom(300_000 + i)) for i in range(4)]
        t0 = time.monotonic()
        assert all(cc.batch_put(objs, namespace=ns))
        took = time.monotonic() - t0
        # the puts were redirected while the source lagged, the list re-read after each
        # Redirect, then they went through (the source's first read is in the put: its
        # 1.5 s lag lies inside it)
        assert cc.redirects >= 4 and src.calls >= cc.redirects + 1, (cc.redirects, src.calls)
        assert src.calls > src.stale and took >= src.lag_s, (src.calls, src.stale, took)
        assert [bytes(b) for b in cc.batch_get([k for k, _ in objs], namespace=ns)] == \
            [v for _, v in objs]
    assert stored(three[1], [k for k, _ in objs], ns) == [True] * 4


def test_threads_sharing_a_client_all_ride_through_the_lag(three):
    src = LaggingSource(three[0], lag_s=1.5, stale_calls=8)  # 4 threads: >= 4 Redirects
    with ClusterClient(src, redirect_s=20, refresh_s=3600) as cc:
        def work(i: int) -> None:
            k, v = f"thr-{i}".encode(), os.urandom(100_000 + i)
            cc.put(k, v, namespace="ec")
            assert bytes(cc.get(k, namespace="ec")) == v
        run_threads(work, range(4))
        assert cc.redirects >= 4 and src.calls >= cc.redirects + 1, (cc.redirects, src.calls)
        assert src.calls > src.stale, (src.calls, src.stale)


def test_a_source_that_never_catches_up_fails_after_redirect_s_and_stores_nothing(three):
    src = LaggingSource(three[0], lag_s=float("inf"))
    with ClusterClient(src, redirect_s=1.0, refresh_s=3600) as cc:
        t0 = time.monotonic()
        with pytest.raises(errors.Redirect, match=r"redirect_s=1\b") as ei:
            cc.put(b"never", os.urandom(300_000), namespace="ec")
        took = time.monotonic() - t0
        assert 0.9 <= took < 15, took  # the budget, not a fixed count of re-sends
        assert "stayed out of date" in str(ei.value)
        # the list re-read once per Redirect followed, at most MAX_REDIRECTS times (how
        # many fit in 1 s is the machine's: a loaded one sent once; the ride-through tests
        # above show several)
        assert src.calls == cc.redirects + 1 <= 65, (cc.redirects, src.calls)
        assert f"after {cc.redirects} refresh(es)" in str(ei.value)
    assert stored(three[1], [b"never"], "ec") == [False]


def test_redirect_s_zero_gives_up_at_the_first_redirect(three):
    src = LaggingSource(three[0], lag_s=float("inf"))
    with ClusterClient(src, redirect_s=0) as cc:
        with pytest.raises(errors.Redirect, match="after 0 refresh"):
            cc.put(b"zero", b"x" * 1000, namespace="rep")
        assert cc.redirects == 0


@pytest.mark.parametrize("bad", [-1, float("nan")])
def test_a_negative_or_nan_budget_is_refused(bad):
    with pytest.raises(errors.InvalidArgument, match="redirect_s"):
        ClusterClient(["127.0.0.1:1"], policy="none", redirect_s=bad)
