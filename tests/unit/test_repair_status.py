"""The repair status after a pass that skipped young records (agent.py): those written
around a membership change are pending until a pass has looked at them, and the agent
shows "waiting" for that pass, not "idle" with nothing pending. Fakes of the agent's
narrow inputs (the store's walk, the membership), no sockets: the pass sees only
young records, so it asks no peer."""
from __future__ import annotations

import time

from kvstore.placement import Member
from kvstored.cluster.repair.agent import RepairAgent, RepairSettings


class _Store:
    unverified = 0

    def __init__(self, rows):
        self.rows = rows

    def loop_thread(self):
        return None

    def walk(self, siblings=None):
        yield list(self.rows), 1.0  # (rows, share of the walk done), as LocalStore.walk


class _Membership:
    degraded = False
    draining = False
    epoch = 1

    def __init__(self, members):
        self.members = members
        self.policies = {"rep": "replicas:2"}

    def view(self):
        return []

    def placement_members(self):
        return list(self.members)


def _agent(members, rows) -> RepairAgent:
    return RepairAgent("me", _Store(rows), _Membership(members), RepairSettings(0.5, 300.0, 1 << 30))


def _row(key: bytes, at: float) -> tuple:
    # (ns, key, size, checksum, unverified, pinned, protected, reads, committed_at)
    return (b"rep", key, 100, 1, False, False, False, 0, at)


def test_young_records_written_around_a_change_are_pending_and_the_agent_waits_for_them():
    me, other, third = Member("me", "127.0.0.1:1"), Member("b", "127.0.0.1:2"), Member("c", "127.0.0.1:3")
    now = time.time()
    a = _agent([me, other], [_row(b"k%d" % i, now) for i in range(8)])
    try:
        a._passed(a._pass(), 0.1)  # the first pass: no change seen yet, young ones just wait
        assert a.st["state"] == "idle" and a.st["pending"] == 0
        a.membership.members = [me, other, third]  # a member joined
        a._passed(a._pass(), 0.1)
        # the 8 young records are left for later, and said to be
        assert a.st["state"] == "waiting" and a.st["pending"] == 8
        assert a._recheck_young  # a pass is due for them once they are old enough
    finally:
        a.stop()


def test_a_pass_with_no_young_records_left_is_idle():
    me = Member("me", "127.0.0.1:1")
    a = _agent([me], [])
    try:
        a._passed(a._pass(), 0.1)
        a.membership.members = [me, Member("b", "127.0.0.1:2")]
        a._passed(a._pass(), 0.1)
        assert a.st["state"] == "idle" and a.st["pending"] == 0 and a.st["passes"] == 2
    finally:
        a.stop()


def test_young_records_committed_after_the_pass_began_are_not_pending():
    """The streamed walk meets records written during the pass (many by the pass's own
    writes): young, so left for later, but written under the new member list, so not
    pending: they would only hold another pass due."""
    me, other, third = Member("me", "127.0.0.1:1"), Member("b", "127.0.0.1:2"), Member("c", "127.0.0.1:3")
    later = time.time() + 60  # committed after the pass began
    a = _agent([me, other], [_row(b"k%d" % i, later) for i in range(5)])
    try:
        a._passed(a._pass(), 0.1)
        a.membership.members = [me, other, third]
        a._passed(a._pass(), 0.1)
        assert a._skipped_young == 5  # seen, left for a later pass
        assert a.st["state"] == "idle" and a.st["pending"] == 0 and not a._recheck_young
    finally:
        a.stop()
