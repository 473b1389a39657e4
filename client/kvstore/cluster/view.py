"""The member list as this client sees it, and calls on one node.

The list comes from a static list, a callable, or the cluster itself (a ClusterView read
from any node's Members RPC). Every put and get carries the list's epoch; a Redirect makes
the client re-read the list and re-send (bounded). A node that does not answer is marked
down for ``down_s`` and skipped meanwhile. An object's slots (``kvstore.layout.slots``)
are computed from the list and cached while it does not change.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from .. import errors
from ..client import Client
from ..layout import Policy, member_epoch, placement_key, slots
from ..placement import Member, place
from ..wire import namespace_bytes

SLOT_CACHE = 1 << 16  # keys whose slots are remembered (KV blocks are read again and again)
# A call answered Redirect re-reads the member list and is sent again, for up to the
# client's ``redirect_s`` seconds (nodes learn a membership change from etcd one after
# another: on a loaded host that spread took over a second, and a fixed 4 re-sends within
# 0.65 s failed puts in the middle of a node loss) and at most this many times
MAX_REDIRECTS = 64
_REDIRECT_BACKOFF = (0.0, 0.05, 0.1, 0.25, 0.5)  # then 0.5 s between re-reads


@dataclass
class ClusterView:
    """What a member-list source returns: the placement members (live, not draining), the
    cluster's namespace policies and the list's epoch (0: computed from the members)."""

    members: list
    policies: dict = field(default_factory=dict)
    epoch: int = 0


def _as_member(m) -> Member:
    if isinstance(m, Member):
        return m if m.address else Member(m.node_id, m.node_id, m.failure_domain)
    if isinstance(m, str):
        return Member(m, m, "")
    if isinstance(m, dict):
        addr = m.get("address") or m.get("control") or m["node_id"]
        return Member(m.get("node_id") or addr, addr, m.get("failure_domain", ""))
    addr = getattr(m, "address", "") or getattr(m, "control_address", "") or m.node_id
    return Member(m.node_id, addr, getattr(m, "failure_domain", ""))


def view_from_members_response(r) -> ClusterView:
    """A ClusterView from a Members RPC answer: members in the placement set only."""
    ms = [Member(m.node_id, m.control_address, m.failure_domain) for m in r.members
          if m.placement]
    return ClusterView(ms, dict(r.policies), r.epoch)



class MemberView:
    """ClusterClient's member list, policies, per-node clients and slots (a mixin: the
    state is set up in ClusterClient.__init__)."""

    @staticmethod
    def _check_members(members) -> list[Member]:
        out = [_as_member(m) for m in members]
        if len({m.node_id for m in out}) != len(out):
            raise errors.InvalidArgument("duplicate node_id in the member list")
        return out

    def _adopt(self, view: ClusterView) -> None:
        ms = self._check_members(view.members)
        # a fixed list sends no epoch (nodes do not redirect it); a source's list does
        epoch = view.epoch or (member_epoch(m.node_id for m in ms) if self._source else 0)
        pols = {k: Policy.parse(v) for k, v in view.policies.items()}
        stale = []
        if ms == self._members:
            ms = self._members  # unchanged: keep the object (the slot cache is tied to it)
        with self._lock:
            self._members, self._epoch, self._cluster_policies = ms, epoch, pols
            self._largest = max(self._largest, len(ms))
            self._members_at = time.monotonic()
            for m in ms:  # a node that came back on another address: a new client
                c = self._clients.get(m.node_id)
                if c is not None and c.address != m.address:
                    stale.append(self._clients.pop(m.node_id))
                    self._down.pop(m.node_id, None)
            for c in self._clients.values():
                c.epoch = epoch
        for c in stale:
            c.close()

    def _refresh(self) -> None:
        v = self._source()
        self._adopt(v if isinstance(v, ClusterView) else ClusterView(list(v)))

    def members(self) -> list[Member]:
        """The placement members (refreshed from the source every ``refresh_s``)."""
        if self._source is not None and time.monotonic() - self._members_at >= self.refresh_s:
            self._refresh()
        return self._members

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_policy(self, namespace: str, policy) -> None:
        """Set this client's policy of ``namespace`` ("*" = the default). The cluster's
        own policies (``kvstore-cli policy set``) are what the nodes repair by."""
        self._policies[namespace if namespace == "*" else namespace_bytes(namespace).decode()] = \
            Policy.parse(policy)

    def policy(self, namespace: str | None = None) -> Policy:
        ns = self._ns(namespace)
        for table in (self._policies, self._cluster_policies):
            p = table.get(ns) or table.get("*")
            if p is not None:
                return p
        return Policy("none", 1)

    def _ns(self, namespace: str | None) -> str:
        return self.namespace if namespace is None else namespace_bytes(namespace).decode()

    def _new_client(self, address: str) -> Client:
        kw = dict(self._client_kwargs)
        kw.setdefault("timeout", self.node_timeout)
        c = Client(address, namespace=self.namespace, **kw)
        c.epoch = self._epoch
        return c

    def client(self, member: Member) -> Client:
        """The plain Client of one node (created on first use)."""
        c = self._clients.get(member.node_id)
        if c is None:
            with self._lock:
                c = self._clients.get(member.node_id)
                if c is None:
                    c = self._clients[member.node_id] = self._new_client(member.address)
        return c

    def _seed_client(self, address: str) -> Client:
        key = "seed:" + address
        c = self._clients.get(key)
        if c is None:
            with self._lock:
                c = self._clients.get(key)
                if c is None:
                    c = self._clients[key] = self._new_client(address)
        return c

    def _node(self, member: Member, op: str, *args, **kw):
        """One call on one node; an unreachable node is marked down for ``down_s`` and
        skipped (Unavailable at once) until then."""
        if self._is_down(member):
            raise errors.Unavailable(f"node {member.node_id} marked down")
        try:
            return getattr(self.client(member), op)(*args, **kw)
        except (errors.Redirect, errors.NotVerified):  # answers: the node is up
            raise
        except errors.Unavailable:
            self._mark_down(member)
            raise
        except OSError as e:
            self._mark_down(member)
            raise errors.Unavailable(f"node {member.node_id}: {e}") from None

    def _is_down(self, member: Member) -> bool:
        """Whether the node is skipped now (a mark that expired is dropped)."""
        until = self._down.get(member.node_id)
        if until is None:
            return False
        if time.monotonic() < until:
            return True
        self._down.pop(member.node_id, None)
        return False

    def _mark_down(self, member: Member) -> None:
        """Skip the node for ``down_s``: it failed a call (or took a batch's requests too slowly)."""
        self._down[member.node_id] = time.monotonic() + self.down_s

    def _submit(self, member: Member, op: str, *args, **kw):
        return self._pool.submit(self._node, member, op, *args, **kw)

    def _redirected(self, fn, *args, **kw):
        """Run ``fn``; on Redirect re-read the member list and run it again, for up to
        ``redirect_s`` seconds and MAX_REDIRECTS times."""
        deadline = time.monotonic() + self.redirect_s
        for attempt in range(MAX_REDIRECTS + 1):
            try:
                return fn(*args, **kw)
            except errors.Redirect as e:
                left = deadline - time.monotonic()
                if self._source is None or attempt == MAX_REDIRECTS or left <= 0:
                    raise errors.Redirect(
                        f"{e} (the member list stayed out of date after {attempt} refresh(es) "
                        f"in {self.redirect_s - left:.1f}s; redirect_s={self.redirect_s:g})") from None
                self.redirects += 1
                time.sleep(min(left, _REDIRECT_BACKOFF[min(attempt, len(_REDIRECT_BACKOFF) - 1)]))
                before = self._epoch
                self._refresh()
                self._down.clear()  # a node marked down may be the new home
                if self._epoch == before:  # the node knows more than the source yet
                    time.sleep(0.1)

    def _slots(self, key: bytes, ns: str, p: Policy, write: bool) -> list[tuple[Member, int]]:
        """The object's slots under the current member list. Writes need ``p.min_live()``
        live members (Unavailable) and a policy the cluster can hold (InvalidArgument);
        reads only some member."""
        ms = self.members()
        if write:
            # a node this client just failed to reach is skipped: its records go to the
            # slots the layout gives without it, which is where they belong once it leaves
            # the member list (and where repair moves them from, if it comes back)
            if self._down:  # none marked down (the usual case): nothing to filter
                now = time.monotonic()
                ms = [m for m in ms if self._down.get(m.node_id, 0.0) <= now]
            # a policy this client was given must fit the biggest cluster it has seen; the
            # cluster's own policies were checked when set (kvstore-cli policy set)
            if p.nodes > self._largest and (ns in self._policies or "*" in self._policies):
                p.check_cluster(self._largest)
            if len(ms) < p.min_live():
                raise errors.Unavailable(
                    f"policy {p} takes writes with at least {p.min_live()} live node(s); "
                    f"{len(ms)} are live")
        elif not ms:
            raise errors.Unavailable("the member list is empty")
        full = len(ms) == len(self._members)
        ck = (ns, key, p)
        if full:  # the common case: every member up; placement costs tens of microseconds
            sl = self._slot_cache.get(ck)
            if sl is not None and self._slot_cache_of is self._members:
                return sl
        sl = slots(placement_key(key, p), ms, p, ns)
        if full:
            with self._lock:
                if self._slot_cache_of is not self._members or len(self._slot_cache) >= SLOT_CACHE:
                    self._slot_cache, self._slot_cache_of = {}, self._members
                self._slot_cache[ck] = sl
        return sl

    def _extra(self, key: bytes, ns: str, p: Policy, have: list[tuple[Member, int]],
               n: int) -> list[tuple[Member, int]]:
        """Up to ``n`` lap-0 positions after the slots in preference order: where records
        may still sit after a membership change that repair has not caught up with."""
        ms = self.members()
        taken = {m.node_id for m, _ in have}
        rest = [m for m in place(placement_key(key, p), ms, len(ms), ns) if m.node_id not in taken]
        return [(m, 0) for m in rest[:n]]

    def _down_now(self) -> set:
        """Nodes skipped now (an expired mark stays in ``_down`` until the node is asked)."""
        now = time.monotonic()
        return {n for n, until in list(self._down.items()) if until > now}
