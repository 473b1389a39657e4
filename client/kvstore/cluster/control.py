"""ClusterClient's control calls: exists / lookup, delete, pin / unpin, ping, delete_all,
each asked of the nodes that hold the keys' records, grouped per node, all at once."""
from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import wait

from .. import errors
from ..layout import Policy, codec, fragment_key, lap_key
from ..placement import Member
from ..wire import key_bytes


# keys per control call to one node: well under a daemon's max_batch_keys (default
# 65536), and the calls of a large batch overlap across the pool
KEYS_PER_CALL = 512


def _chunks(items: list) -> list[list]:
    return [items[s:s + KEYS_PER_CALL] for s in range(0, len(items), KEYS_PER_CALL)]


class Control:
    """Control calls (a ClusterClient mixin)."""

    def _candidates(self, key: bytes, ns: str, p: Policy) -> list[tuple[Member, bytes]]:
        """Where to ask whether ``key`` is stored, best first: with K of K+M records
        present, at least one of any M+1 slots holds one."""
        sl = self._slots(key, ns, p, write=False)
        if p.kind == "ec":
            fk = fragment_key(key)
            return [(m, lap_key(fk, lap)) for m, lap in sl[:p.m + 1]]
        return [(m, key) for m, _ in sl]

    def exists(self, keys: Sequence, *, namespace: str | None = None) -> list[bool]:
        """Whether each key is stored: asked of its first slot, a "no" checked on the
        second, the next slots when a node does not answer; grouped per node, all nodes
        in parallel (a miss costs two rounds)."""
        return self._redirected(self._exists, keys, namespace)

    def _exists(self, keys: Sequence, namespace: str | None) -> list[bool]:
        ns = self._ns(namespace)
        p = self.policy(ns)
        ks = [key_bytes(k) for k in keys]
        cands = [self._candidates(k, ns, p) for k in ks]
        answer: list[bool | None] = [None] * len(ks)
        for rnd in range(max((len(c) for c in cands), default=0)):
            per_node: dict[str, tuple[Member, list]] = {}
            for j, c in enumerate(cands):
                # unanswered keys go on to the next slot; a "no" from the first slot is
                # checked once on the second (a node that just joined, or replaced a lost
                # one, takes over a slot before repair has filled it)
                if rnd < len(c) and (answer[j] is None or (rnd == 1 and answer[j] is False)):
                    m, sk = c[rnd]
                    per_node.setdefault(m.node_id, (m, []))[1].append((j, sk))
            if not per_node:
                break
            futs = []
            for m, items in per_node.values():
                for chunk in _chunks(items):
                    futs.append((chunk, self._submit(m, "exists", [sk for _, sk in chunk], namespace=ns)))
            wait([f for _, f in futs])
            for chunk, f in futs:
                if isinstance(f.exception(), errors.Redirect):
                    raise f.exception()
                if f.exception() is None:
                    for (j, _), e in zip(chunk, f.result()):
                        answer[j] = bool(e) or bool(answer[j])
        return [bool(a) for a in answer]

    def lookup(self, keys: Sequence, *, namespace: str | None = None) -> int:
        """How many of ``keys`` are stored, counting from the first (the prefix hit length)."""
        n = 0
        for e in self.exists(keys, namespace=namespace):
            if not e:
                break
            n += 1
        return n

    def delete(self, keys: Sequence, *, namespace: str | None = None) -> int:
        """Delete every copy / record of ``keys`` on its slots and the next nodes in its
        preference order (M for EC, max(1, N-1) for N copies: where records sit until
        repair moves them after a membership change, or after a put written around dead
        nodes). Returns how many keys had something deleted. A node that refuses
        connections is passed over; one that does not answer within ``node_timeout``
        (hung, cut off: it may serve its records again) makes the delete Unavailable, not
        acknowledged (retry: deletes are idempotent). Every node asked fences the keys
        against repair writes for a while (kvstored/engine/fence.py), so a repair pass
        that read the object before the delete cannot write it back."""
        return self._redirected(self._delete, keys, namespace)

    def _delete(self, keys: Sequence, namespace: str | None) -> int:
        ns = self._ns(namespace)
        p = self.policy(ns)
        hit = [False] * len(keys)
        per_node: dict[str, tuple[Member, list]] = {}
        for j, k in enumerate(keys):
            kb = key_bytes(k)
            sl = self._slots(kb, ns, p, write=False)
            if p.kind == "ec":
                fk = fragment_key(kb)
                where = sl + self._extra(kb, ns, p, sl, p.m)
                pairs = [(m, lap_key(fk, lap)) for m, lap in where]
            else:
                # the next nodes too: after a join, the home it displaced keeps the copy
                # until repair hands it over, which this delete's fence then refuses; a
                # put written around dead nodes left copies up to N-1 places further
                pairs = [(m, kb) for m, _ in sl + self._extra(kb, ns, p, sl, max(1, p.n - 1))]
            for m, sk in pairs:
                per_node.setdefault(m.node_id, (m, []))[1].append((j, sk))

        def each(m: Member, items: list) -> list[bool]:
            # asked even when marked down (a mark is a guess; a delete must know). A node
            # that does not run (refuses connections) is passed over: if it comes back,
            # its records are held back until checked against the peers' delete fences.
            # One that does not answer may be alive with its records (hung, cut off) and
            # serve them again: the delete is then not acknowledged
            sks = [sk for _, sk in items]
            c = self.client(m)
            try:
                hits = c.delete_each(sks, namespace=ns)
                if hits is None:  # a node older than this SDK answers only a count: key by key
                    hits = [bool(c.delete([sk], namespace=ns)) for sk in sks]
                return hits
            except errors.Timeout as e:
                self._mark_down(m)
                raise errors.Unavailable(
                    f"delete not acknowledged: node {m.node_id} ({m.address}) did not answer "
                    f"({e}); it may still hold records of these keys: retry") from None
            except errors.Redirect:
                raise
            except (errors.Unavailable, OSError):
                self._mark_down(m)
                return [False] * len(sks)

        futs = [(chunk, self._pool.submit(each, m, chunk)) for m, items in per_node.values()
                for chunk in _chunks(items)]
        wait([f for _, f in futs])
        failed = [f.exception() for _, f in futs if f.exception() is not None]
        for e in failed:
            if isinstance(e, errors.Redirect):
                raise e  # re-run over the current homes (deletes are idempotent)
        if failed:
            raise failed[0]
        for items, f in futs:
            for (j, _), gone in zip(items, f.result()):
                hit[j] = hit[j] or gone
        return sum(hit)

    def _records_per_node(self, keys: Sequence, ns: str) -> dict[str, tuple[Member, list]]:
        """Every record key of ``keys`` on its slots, grouped per node."""
        p = self.policy(ns)
        per_node: dict[str, tuple[Member, list]] = {}
        for k in keys:
            kb = key_bytes(k)
            for m, lap in self._slots(kb, ns, p, write=False):
                sk = lap_key(fragment_key(kb), lap) if p.kind == "ec" else kb
                per_node.setdefault(m.node_id, (m, []))[1].append(sk)
        return per_node

    def pin(self, keys: Sequence, ttl: float = 60.0, *, namespace: str | None = None) -> int:
        """Pin every record of ``keys`` on its node for ``ttl`` seconds; returns how many
        records were pinned (a key has one per copy or fragment)."""
        ns = self._ns(namespace)
        futs = [self._submit(m, "pin", chunk, ttl, namespace=ns)
                for m, sks in self._records_per_node(keys, ns).values() for chunk in _chunks(sks)]
        wait(futs)
        return sum(f.result() for f in futs if f.exception() is None)

    def unpin(self, keys: Sequence, *, namespace: str | None = None) -> int:
        ns = self._ns(namespace)
        futs = [self._submit(m, "unpin", chunk, namespace=ns)
                for m, sks in self._records_per_node(keys, ns).values() for chunk in _chunks(sks)]
        wait(futs)
        return sum(f.result() for f in futs if f.exception() is None)

    def ping(self) -> float:
        """The slowest data-path round trip over the members, in seconds; Unavailable
        when none answers."""
        futs = [self._submit(m, "ping") for m in self.members()]
        wait(futs)
        rtts = [f.result() for f in futs if f.exception() is None]
        if not rtts:
            raise errors.Unavailable(f"none of the {len(futs)} member(s) answered a ping")
        return max(rtts)

    def delete_all(self, *, namespace: str | None = None) -> int:
        """Admin: every object of the namespace on every member; returns records deleted."""
        ns = self._ns(namespace) if namespace != "" else ""
        futs = [self._submit(m, "delete_all", namespace=ns) for m in self.members()]
        wait(futs)
        for f in futs:
            if f.exception() is not None:
                raise f.exception()
        return sum(f.result() for f in futs)

    def _codec(self, p: Policy):
        return codec(p)

