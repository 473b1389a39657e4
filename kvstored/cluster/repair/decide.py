"""What repair does with one object: a pure function of what its slots hold.

``decide(obj, got, peers)`` takes the object (its policy, slots and the records this node
holds of it), the heads its peers reported and what the pass knows about those peers
(settled, start times, draining), and returns a list of actions. It performs no I/O, so
every rule below is unit-tested without a socket (tests/unit/test_repair_decide.py); the
agent (agent.py) executes the actions in bulk.

* **verify** a record recovered at restart (or held back after the cluster dropped this
  node): kept (``Verify``) when a verified peer holds the same version; dropped
  (``Drop``) when verified peers hold only another version, or when none holds it and a
  peer says a client deleted it there after the record was written (its delete fence,
  then its delete history for up to ``cluster.delete_horizon``: ``Head.deleted_ago``);
  left pending when no peer answered. Otherwise kept: a peer that
  merely lacks it proves nothing (it may not have been one of its homes when it was
  written), and losing an acknowledged object is worse than keeping a deleted one.
* **rebuild** (the *leader*: a node that gets a missing EC index and holds a current
  record on another of its slots, else the first slot holding a verified current record,
  see ``leader``): slots that
  lack a record get one: replicas are copied (``Copy``); missing EC indices are rebuilt
  (``Reconstruct``: from K fragments, or re-indexed copies of a whole-object record).
  Indices a draining node still holds are left to it.
* **move** (this node is not a slot, or holds a lap outside its slots): the record is
  written to a slot lacking its index, then deleted here (``HandOver``); a record whose
  index a slot already holds, or an older version, is deleted (``DeleteLocal``).
* ``Pending``: something is unknown or failed; the object is looked at again next pass.
  An EC object of which fewer than K distinct fragments are known is pending without
  reading any source; with every slot answering it is ``UNRECOVERABLE``: nothing can
  rebuild it (the agent reports it once, not every pass). Its records are kept: a
  delete and a loss look the same here (a node that died with the other fragments may
  come back with them from NVMe), so nothing is dropped on this evidence alone.

An object is finished when its actions hold no ``Pending`` and all of them succeed.
Decisions assume the actions they emit succeed (a hand-over fills its slot); when one
fails, the object stays pending and the next pass decides again from fresh heads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, NamedTuple, Sequence

from kvstore.layout import KIND_FRAGMENT, Policy, lap_key, parse_head


class Local(NamedTuple):
    """One record of the object held by this node."""
    key: bytes
    size: int
    checksum: int
    unverified: bool
    head: bytes  # the record's first bytes (EC header); b"" for replicated records
    committed_at: float


@dataclass
class Obj:
    """One object this node holds a record (or records) of."""
    ns: bytes
    base: bytes  # the placement key (lap-0 key of EC records)
    policy: Policy | None
    ec: bool
    mine: dict[int, Local] = field(default_factory=dict)  # lap -> record
    slots: list = field(default_factory=list)  # [(Member, lap)], layout.slots()


class Head(NamedTuple):
    """A peer's Heads answer for one record, as repair uses it (``answered``: from pb.Head)."""
    present: bool
    unverified: bool = False
    checksum: int = 0
    head: bytes = b""
    deleted_ago: float = 0.0  # seconds since a client deleted the key there (0: not lately)
    committed_at: float | None = None  # present: its commit time on this node's clock; None: unknown


def answered(h, at: float, aged: bool) -> Head:
    """``Head`` of a pb.Head that arrived at ``at`` (time.time()). ``aged``: the peer sets
    ``committed_ago`` (its put_flags has wire.FLAG_COMMIT_AGE); the age becomes a time on
    this node's clock (taken as the answer arrived: the record looks newer by the call's
    latency, never older)."""
    return Head(h.present, h.unverified, h.checksum, h.head, h.deleted_ago,
                at - h.committed_ago if aged and h.present else None)


class Peers(NamedTuple):
    """What the pass knows about the other nodes."""
    me: str
    settled: Mapping[str, bool]  # node_id -> answered Heads holding no unverified records
    started: Mapping[str, float]  # node_id -> process start (unix s)
    draining: Sequence  # draining Members (asked beside the slots, lap 0)
    heads_at: float = 0.0  # when the Heads were asked (unix s, this node's clock)
    epochs: Mapping[str, int] = {}  # node_id -> the member-list epoch its last Heads answer had
    epoch: int = 0  # this node's epoch (0: unknown, nothing compared)


# ---- actions (executed in bulk by the agent)
class Verify(NamedTuple):
    key: bytes  # serve this recovered record


class Drop(NamedTuple):
    key: bytes  # delete this recovered record, if it is still the one with this checksum
    checksum: int


class Copy(NamedTuple):
    src: bytes  # local key
    slot: int  # position in obj.slots
    dst: bytes
    overwrite: bool


class HandOver(NamedTuple):
    src: bytes  # local key: written to every slot, then deleted here
    slots: tuple
    dst: bytes
    overwrite: bool


class Reconstruct(NamedTuple):
    kind: int  # KIND_FRAGMENT: decode from K sources; else re-index one whole copy
    version: tuple  # (olen, ocsum, K, M) the sources must hold
    targets: tuple  # ((index, slot, overwrite), ...)
    sources: tuple  # slot positions holding current records, in the order to read them


class DeleteLocal(NamedTuple):
    key: bytes


class Pending(NamedTuple):
    reason: str


UNRECOVERABLE = "unrecoverable"  # a Pending reason's start: fewer than K fragments are left


def version(ec: bool, head_or_checksum) -> tuple | int | None:
    """The version a record holds: (olen, ocsum, K, M) for EC, the checksum otherwise."""
    if ec:
        h = parse_head(head_or_checksum)
        return None if h is None else head_version(h)
    return head_or_checksum


def head_version(h: tuple) -> tuple:
    """(olen, ocsum, K, M) of a parsed EC record header: the version it belongs to."""
    return h[8], h[9], h[4], h[5]


def assign(indices: list[int], free: list[int]) -> list[tuple[int, int]]:
    """(index, slot) pairs: each index on its own position when that slot is free (so
    slot j holds fragment j and reads concatenate), the rest on the remaining free slots
    in order."""
    free = list(free)
    plan, rest = [], []
    for i in indices:
        if i in free:
            free.remove(i)
            plan.append((i, i))
        else:
            rest.append(i)
    plan += list(zip(rest, free))
    return plan


def decide(o: Obj, got: Mapping, peers: Peers) -> list:
    """The actions that bring ``o`` where the layout wants it, as far as this node is
    concerned. ``got``: {(node_id, lap): Head (present, unverified, checksum, head) or
    None when the peer did not answer}."""
    acts: list = []
    mine = dict(o.mine)
    if not _verify_mine(o, mine, got, peers, acts):
        acts.append(Pending("no peer answered about a recovered record, or one is on "
                            "another member list"))
        return acts
    _drop_leftovers(o, mine, got, peers, acts)
    if not mine:
        return acts
    done = _ec(o, mine, got, peers, acts) if o.ec else _replicated(o, mine, got, peers, acts)
    if not done and not any(isinstance(a, Pending) for a in acts):
        acts.append(Pending("not at full redundancy yet"))
    return acts


def _delete_evidence(o: Obj, got: Mapping, peers: Peers, within: float = float("inf")
                     ) -> tuple[set, float]:
    """(the versions peers hold verified records of, the latest time on this node's
    clock a peer says a client deleted the object there at most ``within`` seconds ago:
    -inf when none did).
    A peer that merely lacks it proves nothing: after a membership change it may never
    have been one of its homes (a node restarting in a roll is out of the list, and its
    place is taken by one that never held the object)."""
    versions, deleted_at = set(), float("-inf")
    for h in got.values():
        if h is None:
            continue
        if h.present:
            if not h.unverified:
                versions.add(version(o.ec, h.head if o.ec else h.checksum))
            continue
        ago = h.deleted_ago  # its delete fence or history: seconds since the delete (0: none)
        if 0 < ago <= within:
            deleted_at = max(deleted_at, peers.heads_at - ago)
    return versions, deleted_at


def _drop_leftovers(o: Obj, mine: dict, got: Mapping, peers: Peers, acts: list) -> None:
    """This node's verified records of an object a client deleted after they were written,
    which no peer holds any more: the delete missed this node (it reached the nodes of a
    member list without it: a node rejoining while clients and peers still used the old
    list, or one that did not answer). Deleted here too (``DeleteLocal``), instead of
    being served, and copied back once the peers' fences expire. A re-put since would be
    held verified by a peer.

    On a delete anywhere within the peers' delete histories (``cluster.delete_horizon``),
    as for held records: a client's re-put since the delete is newer than it here too,
    also when the peers that took it have lost their copies since (evicted), because an
    identical re-put refreshes the record's commit time (engine/store.py ``_same``). A
    held record was re-put by nobody since the restart (such a put verifies it, and it
    is then judged here)."""
    # (most objects: no peer says deleted; then no peer's head is parsed either)
    if not any(h is not None and not h.present and h.deleted_ago > 0 for h in got.values()):
        return
    versions, deleted_at = _delete_evidence(o, got, peers)
    if deleted_at == float("-inf"):
        return
    ver = (lambda v: version(True, v.head)) if o.ec else (lambda v: v.checksum)
    for lap, v in list(mine.items()):
        if not v.unverified and ver(v) not in versions and deleted_at > v.committed_at:
            acts.append(DeleteLocal(v.key))
            del mine[lap]


def _verify_mine(o: Obj, mine: dict, got: Mapping, peers: Peers, acts: list) -> bool:
    """Settle this node's unverified records (``mine`` updated as if done). False:
    undecided (no peer answered)."""
    unverified = {lap: v for lap, v in mine.items() if v.unverified}
    if not unverified:
        return True
    ver = (lambda v: version(True, v.head)) if o.ec else (lambda v: v.checksum)
    # a client deleted it on a peer after this record was written: a leftover this node
    # missed the delete of while it was away (restarted, or dropped while it hung)
    verified_versions, deleted_at = _delete_evidence(o, got, peers)
    answered = any(h is not None for h in got.values())
    for v in mine.values():  # this node's own verified records count too
        if not v.unverified:
            verified_versions.add(ver(v))
    others = {m.node_id for m, _ in o.slots} - {peers.me}
    # a record is served once kept: only when every peer that answered has this node's
    # member list. A peer still on an older list (one without this node, which was away)
    # takes deletes from clients on that list, which miss this node; once the peers are
    # on this list they redirect such clients, whose deletes then reach this node too
    lagging = peers.epoch != 0 and any(
        h is not None and peers.epochs.get(nid, peers.epoch) != peers.epoch
        for (nid, _lap), h in got.items())
    undecided = False
    for lap, v in unverified.items():
        if verified_versions:
            keep = ver(v) in verified_versions
        elif deleted_at > v.committed_at:
            keep = False  # deleted after it was written (a re-put since would be verified)
        elif not others:
            keep = True  # the only home: nothing to compare with
        elif not answered:
            return False
        else:
            keep = True  # nothing says it is stale (every peer restarted, or only lacks it)
        if keep and lagging:
            undecided = True  # held until the peers have this node's member list
        elif keep:
            acts.append(Verify(v.key))
            mine[lap] = v._replace(unverified=False)
        else:
            acts.append(Drop(v.key, v.checksum))
            del mine[lap]
    return not undecided


def _replicated(o: Obj, mine: dict, got: Mapping, peers: Peers, acts: list) -> bool:
    me = peers.me
    key, csum = mine[0].key, mine[0].checksum
    # per slot: holds the current version (verified) True, lacks it False, no answer None
    have = []
    for member, _lap in o.slots:
        if member.node_id == me:
            have.append(True)
            continue
        h = got.get((member.node_id, 0))
        have.append(None if h is None else (h.present and not h.unverified and h.checksum == csum))
    if any(m.node_id == me for m, _ in o.slots):
        leader = next((j for j, x in enumerate(have) if x), None)
        if leader is None or o.slots[leader][0].node_id != me:
            return True  # another home leads
        targets = [j for j, x in enumerate(have) if x is False]
        for j in targets:
            acts.append(Copy(key, j, key, False))
        return all(x is not None for x in have) if targets else all(have)
    # not a home of this object any more: hand it over, then let go
    if any(x is None for x in have):
        return False
    heads = [got.get((m.node_id, 0)) for m, _ in o.slots]
    if not any(have) and any(h is not None and h.present and not h.unverified for h in heads):
        acts.append(DeleteLocal(key))  # the homes hold a newer version: this one is stale
        return True
    missing = tuple(j for j, x in enumerate(have) if x is False)
    acts.append(HandOver(key, missing, key, False) if missing else DeleteLocal(key))
    return True


def _ec(o: Obj, mine: dict, got: Mapping, peers: Peers, acts: list) -> bool:
    me, p = peers.me, o.policy
    # what every slot holds: (index, kind, version) of a verified record, False, None
    held: list = []
    for member, lap in o.slots:
        if member.node_id == me:
            mv = mine.get(lap)
            h = parse_head(mv.head) if mv is not None and not mv.unverified else None
            held.append((h[3], h[2], head_version(h)) if h else False)
            continue
        h = got.get((member.node_id, lap))
        if h is None:
            held.append(None)
        elif not h.present or h.unverified:
            held.append(False)
        else:
            hh = parse_head(h.head)  # (each head parsed once: decide runs per object and slot)
            held.append((hh[3], hh[2], head_version(hh)) if hh is not None else False)
    mine_ok = [mv for mv in mine.values() if not mv.unverified and parse_head(mv.head)]
    current = _majority(held)
    if current is None and not mine_ok:
        return False
    if current is None:
        current = version(True, mine_ok[0].head)
    kind = next((x[1] for x in held if x and x[2] == current), None)
    if kind is None:
        kind = parse_head(mine_ok[0].head)[2]
    want = list(range(p.n)) if kind == KIND_FRAGMENT else list(range(p.m + 1))
    nslots = len(want)
    seen, right = _right(held[:nslots], current, want)
    my_laps = {lap for member, lap in o.slots[:nslots] if member.node_id == me}
    # draining nodes hand over their own records: leave their indices to them
    drains = set()  # (version, index)
    for d in peers.draining:
        if d.node_id == me:
            continue
        h = got.get((d.node_id, 0))
        if h is not None and h.present and not h.unverified:
            hh = parse_head(h.head)
            if hh is not None:
                drains.add((head_version(hh), hh[3]))
    drained = {i for v, i in drains if v == current}
    # the slots as every holder sees them: before this node's own hand-overs (which count
    # as done below), its records as its peers' Heads show them (one it verifies in this
    # pass held back, one it drops still there), and the version they make current: who
    # leads is chosen from these, so all holders agree
    held_all = [_as_seen(o, mine, me, y, x) for y, x in enumerate(held)]
    current_all = _majority(held_all)
    seen_all, right_all = _right(held_all[:nslots], current_all, want)
    done = _hand_over(o, mine, my_laps, current, held, right, seen, acts)
    if not my_laps:
        return done
    if not any(right):
        return done
    need = p.k if kind == KIND_FRAGMENT else 1
    plan_all = _plan(want, seen_all, right_all, {i for v, i in drains if v == current_all})
    if leader(o, me, plan_all, right_all, right, held_all, current_all, need) != me:
        return done
    missing = [i for i in want if i not in seen]
    # indices a draining holder still has are left to it (it writes them itself)
    todo = [i for i in missing if i not in drained]
    plan = _plan(want, seen, right, drained)
    if not todo:
        return done and not missing and None not in right
    if kind == KIND_FRAGMENT:
        # the fragments the slots that answered hold, this node's own (on its slots or
        # not) and those a draining node still has: fewer than K rebuild nothing, so no
        # source is read (and nothing is warned about every pass)
        have = {x[0] for x in held if x and x[2] == current} | drained
        for mv in mine.values():
            h = None if mv.unverified else parse_head(mv.head)
            if h is not None and head_version(h) == current:
                have.add(h[3])
        if len(have) < p.k:
            if None in right:  # a silent slot may hold more: look again next pass
                acts.append(Pending(f"{len(have)} of the {p.k} fragments needed answered"))
            else:  # every slot answered: that is all there is
                acts.append(Pending(f"{UNRECOVERABLE}: {len(have)} of the {p.k} fragments it "
                                    "needs are left, every slot answered"))
            return False
    if not plan:
        return False
    sources = [(j, x) for j, x in enumerate(held) if x and x[2] == current]
    sources.sort(key=lambda jx: (o.slots[jx[0]][0].node_id != me, jx[1][0]))  # local first
    acts.append(Reconstruct(kind, current,
                            tuple((i, j, held[j] not in (False, None)) for i, j in plan),
                            tuple(j for j, _x in sources)))
    return done and len(plan) == len(todo) and None not in right


def _majority(held: list):
    """The version most slots hold a verified record of (``held``: (index, kind, version),
    False or None per slot), None when none holds one."""
    counts: dict = {}
    for x in held:
        if x:
            counts[x[2]] = counts.get(x[2], 0) + 1
    return max(counts.items(), key=lambda kv: kv[1])[0] if counts else None


def _right(held: list, current, want: list) -> tuple[set, list]:
    """(indices seen, per slot: True / False / None unanswered): slot j is right when it
    holds a current record with an index of ``want`` nobody before it holds."""
    seen: set[int] = set()
    right = []
    for x in held:
        ok = bool(x) and x[2] == current and x[0] in want and x[0] not in seen
        if ok:
            seen.add(x[0])
        right.append(ok if x is not None else None)
    return seen, right


def _plan(want: list, seen: set, right: list, drained: set) -> list:
    """(index, slot) pairs for the indices no slot holds rightly (``seen``), but those a
    draining node still holds, on the slots that lack a current record (``right`` False),
    the drained indices' own slots kept free for them."""
    missing = [i for i in want if i not in seen]
    todo = [i for i in missing if i not in drained]
    if not todo:
        return []
    free = [j for j, ok in enumerate(right) if ok is False]
    for i in missing:  # keep the drained indices' own slots for them
        if i in drained and i in free:
            free.remove(i)
    return assign(todo, free)


def leader(o: Obj, me: str, plan: list, right_all: list, right: list, held: list, current,
           need: int) -> str:
    """The node that rebuilds an EC object's missing indices (``plan``: (index, slot)
    pairs, ``held``, ``current`` and ``right_all``: the slots, the version that most of
    them hold and those holding a current record of their own index, all as every holder
    sees them; ``right``: the latter as this node sees them, after its hand-overs).

    * Where the slots alone hold enough fragments to rebuild from (``need``): the first
      node that gets a missing index on a slot holding no current record (none, an
      unverified one or another version) and holds a current record on another of its
      slots; else the node of the first slot that holds one. Every holder decides this
      alike from the same Heads (so its own hand-overs and the records it verifies in
      this pass do not count), and such a node looks at the object in full
      (``follower`` is None for it: one of its slots lacks its current record). Where
      placement wraps (a cluster of at most K+M-2 nodes, or a first slot that lost its
      record), the rebuilt record is then written into that node's own store: K-1
      transfers per record instead of K, and no peer serving the write.
    * Otherwise only a node that holds more (records off its slots it hands over, or of
      its own it verifies now) can rebuild: the first slot holding one counting those
      (``right``; the rule before: a node that got a slot and could not rebuild would
      call the object unrecoverable). The caller has checked that ``right`` has one."""
    here = o.slots[next(j for j, ok in enumerate(right) if ok)][0].node_id
    visible = {x[0] for x in held if x and x[2] == current}
    if len(visible) < need:
        return here
    for _i, j in plan:
        x = held[j]
        if x and x[2] == current:  # a current record with an index another slot holds
            continue  # (its node may skip the object: led_by_first)
        node = o.slots[j][0].node_id
        # a record there as every holder sees it (right_all: not one this node verifies
        # now, nor one it hands over to the slot in this decision)
        if any(ok and held[y] and o.slots[y][0].node_id == node for y, ok in enumerate(right_all)):
            return node
    first = next((j for j, ok in enumerate(right_all) if ok), None)
    return here if first is None else o.slots[first][0].node_id


def _as_seen(o: Obj, mine: dict, me: str, j: int, x):
    """``held[j]`` as this node's peers see it from their Heads: for a slot of this node,
    its record as walked (one unverified then is held back there, though this node counts
    it once verified by ``_verify_mine``; one ``_drop_leftovers`` deletes is still there),
    so a choice of leader made from these is the same on every holder."""
    member, lap = o.slots[j]
    if member.node_id != me:
        return x
    mv = o.mine.get(lap)
    if mv is mine.get(lap):
        return x  # neither verified nor dropped in this decision (most): as held shows it
    h = parse_head(mv.head) if mv is not None and not mv.unverified else None
    return (h[3], h[2], head_version(h)) if h else False


def _hand_over(o: Obj, mine: dict, my_laps: set, current, held: list, right: list, seen: set,
               acts: list) -> bool:
    """Records of mine outside my slots (draining, placement moved, an old lap): each goes
    to a slot lacking a record (its own position first) and is deleted here, or is
    deleted when a slot holds its index already. True when none is left."""
    extra = {lap: mv for lap, mv in mine.items() if lap not in my_laps and not mv.unverified}
    if not extra:
        return True
    if None in right:
        return False  # a slot did not answer: its state is unknown
    done = True
    readable = sum(1 for ok in right if ok) >= (o.policy.k if o.policy else 1)
    for lap, mv in extra.items():
        h = parse_head(mv.head)
        if h is None:
            continue
        if version(True, mv.head) != current:
            if readable:  # an older version, replaced while this record sat here
                acts.append(DeleteLocal(mv.key))
            continue
        idx = h[3]
        if idx in seen:
            acts.append(DeleteLocal(mv.key))
            continue
        plan = assign([idx], [j for j, ok in enumerate(right) if ok is False])
        if not plan:
            done = False
            continue
        j = plan[0][1]
        _member, tlap = o.slots[j]
        acts.append(HandOver(mv.key, (j,), lap_key(o.base, tlap), held[j] not in (False, None)))
        right[j] = True  # as if it succeeded: a failure leaves the object pending
        seen.add(idx)
    return done


def follower(o: Obj, me: str) -> tuple | None:
    """(version, kind) of this node's records of ``o`` when the Head of the object's first
    slot alone may show that ``decide`` has nothing for this node (``led_by_first``), else
    None. Holds for an EC object whose first slot is another node, every record of
    this node verified, of one version and kind, each on a lap of this node's own slots
    (so nothing to hand over). Saves a full pass asking every slot about every object:
    with K+M slots each object is looked at by every holder, and only one leads."""
    if not o.ec or o.policy is None or not o.mine or not o.slots or o.slots[0][0].node_id == me:
        return None
    got = None
    for mv in o.mine.values():
        h = parse_head(mv.head) if not mv.unverified else None
        if h is None:
            return None
        v = (*head_version(h), h[2])
        if got is not None and v != got:
            return None
        got = v
    p = o.policy
    nslots = p.n if got[4] == KIND_FRAGMENT else p.m + 1
    my_laps = {lap for m, lap in o.slots[:nslots] if m.node_id == me}
    # a slot of mine without my record: this node may be the one that rebuilds it (leader)
    if set(o.mine) != my_laps:
        return None
    return got[:4], got[4]


def led_by_first(mine: tuple, first) -> bool:
    """True when the first slot's Head ``first`` (None: no answer) shows that another node
    leads ``follower``'s object and this node has nothing to do: a verified record of the
    same version and kind as this node's. Then the first slot holds the current version
    (it is right, so it leads), or a majority holds another version (this node's records
    are not current: whoever leads rewrites them); this node's records sit on its own
    slots either way. (One exception converges a pass later: when that majority's records
    are of the other kind, a record of this node past that kind's slots is deleted only
    once the leader has rewritten the first slot.)"""
    if first is None or not first.present or first.unverified:
        return False
    h = parse_head(first.head)
    # an index outside its kind's range (K+M fragments, M+1 whole copies) is never right
    return (h is not None and (head_version(h), h[2]) == mine
            and h[3] < (h[4] + h[5] if h[2] == KIND_FRAGMENT else h[5] + 1))


def finished(actions: list) -> bool:
    """True when the object needs nothing more once ``actions`` succeed."""
    return not any(isinstance(a, Pending) for a in actions)
