"""ClusterClient: the class, its settings and life cycle; the work is done by the mixins
of the package's other modules (view, writes, reads, control)."""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from .. import errors
from .._common import DEFAULT_NAMESPACE
from ..client import Client
from ..layout import DEFAULT_MIN_EC_SIZE, Policy
from ..placement import Member
from ..wire import namespace_bytes
from .control import Control
from .reads import Reads
from .view import ClusterView, MemberView, view_from_members_response
from .writes import Writes


class ClusterClient(MemberView, Writes, Reads, Control):
    """A blocking client over many kvstored nodes (thread-safe).

    ``members``: control addresses (``"host:port"``, each its own node and failure
    domain), ``Member`` objects / objects with ``node_id``, ``address``,
    ``failure_domain``, or a callable returning such a list or a ``ClusterView``
    (re-read every ``refresh_s`` seconds and on Redirect).
    ``policy``: one policy for every namespace, or ``{namespace: policy}`` with an
    optional ``"*"`` default; None = the cluster's policies (from a ClusterView), else none.
    """

    def __init__(self, members: Sequence | Callable[[], object], policy=None, *,
                 namespace: str = DEFAULT_NAMESPACE, min_ec_size: int = DEFAULT_MIN_EC_SIZE,
                 node_timeout: float = 10.0, fragment_timeout: float = 2.0, down_s: float = 1.0,
                 refresh_s: float = 5.0, redirect_s: float = 5.0, max_workers: int = 16,
                 fanout_puts: bool = True, fanout_gets: bool = True, **client_kwargs):
        self.namespace = namespace_bytes(namespace).decode()
        self.min_ec_size = int(min_ec_size)
        self.node_timeout = node_timeout
        self.fragment_timeout = fragment_timeout
        self.down_s = down_s
        self.refresh_s = refresh_s
        if not redirect_s >= 0:
            raise errors.InvalidArgument(f"redirect_s must be >= 0 seconds, got {redirect_s!r}")
        # how long one call keeps following Redirects (re-reading the member list) before
        # it raises Redirect: the spread of a membership change over the nodes
        self.redirect_s = float(redirect_s)
        # batch puts are sent from the calling thread (writes._Fanout); a node's part that
        # could not be (TLS, a broken connection, a Conflict to sort out) goes to the thread
        # pool and is counted here
        self.fanout_puts = bool(fanout_puts)
        self.pooled_put_jobs = 0
        # batch gets likewise (reads._GetFanout): a node's part on the pool is counted here
        self.fanout_gets = bool(fanout_gets)
        self.pooled_get_jobs = 0
        self._client_kwargs = client_kwargs
        self._source = members if callable(members) else None
        self._members: list[Member] = []
        self._cluster_policies: dict[str, Policy] = {}
        self._epoch = 0
        self._largest = 0  # the most members ever seen: a policy beyond it is impossible
        self._members_at = float("-inf")  # a source is read on first use
        self._clients: dict[str, Client] = {}
        self._down: dict[str, float] = {}
        self._lock = threading.Lock()
        # slots of recent keys under the current member list (dropped when it changes)
        self._slot_cache: dict[tuple, list] = {}
        self._slot_cache_of: list | None = None
        if self._source is None:
            self._adopt(ClusterView(self._check_members(members)))
        if policy is None:
            self._policies: dict[str, Policy] = {}
        elif isinstance(policy, dict):
            self._policies = {k: Policy.parse(v) for k, v in policy.items()}
        else:
            self._policies = {"*": Policy.parse(policy)}
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kvstore-cluster")
        self._closed = False
        self.redirects = 0  # how many Redirect answers this client followed
        if self._source is None:
            for p in self._policies.values():
                p.check_cluster(len(self._members))

    @classmethod
    def from_cluster(cls, addresses: str | Sequence[str], **kw) -> "ClusterClient":
        """A client that reads the member list and namespace policies from the cluster:
        ``addresses`` are control addresses of any nodes (seeds); later refreshes ask
        the known members first, then the seeds."""
        seeds = [addresses] if isinstance(addresses, str) else list(addresses)
        if not seeds:
            raise errors.InvalidArgument("from_cluster needs at least one node address")
        holder: list[ClusterClient] = []

        def source() -> ClusterView:
            cc = holder[0]
            tried = []
            for addr in [m.address for m in cc._members] + seeds:
                if addr in tried:
                    continue
                tried.append(addr)
                try:
                    r = cc._seed_client(addr).members()
                except errors.KVStoreError as e:
                    last = e
                    continue
                return view_from_members_response(r)
            raise errors.Unavailable(f"no node answered the member list ({', '.join(tried)}): {last}")

        cc = cls(source, **kw)
        holder.append(cc)
        cc.members()
        return cc

    # ------------------------------------------------------------ plumbing
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for c in clients:
            c.close()
