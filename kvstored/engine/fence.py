"""The delete fence: keys deleted on this node lately, so a repair write cannot bring them back.

A cluster's repair agent reads an object's records, rebuilds or copies the missing ones
and writes them to other nodes. A client's delete of that object can land between the
read and the write; the write would then leave an orphan record of a deleted object
(one fragment of three: the get answers Unavailable instead of NotFound, forever).
Repair's writes therefore carry ``FLAG_REPAIR`` (kvstore/wire.py), and the node refuses
one (``errors.Deleted``) for a key deleted here within the last ``WINDOW_S`` seconds;
repair's own writes into its node's store make the same check. Client puts are never
fenced: a re-put after a delete is stored as usual.

No clock is compared across nodes: the fence measures a delete's age on this node's
monotonic clock, and the writer bounds how old what it decided from may be
(``MAX_WRITE_AGE_S``, on its own monotonic clock, from the Heads its pass asked). A
delete that reaches this node after those Heads is then at most MAX_WRITE_AGE_S old when
the write arrives; one that reached it before the Heads (the client's delete reaches the
object's nodes one after another) is refused as long as it reached the sources less than
WINDOW_S - MAX_WRITE_AGE_S after this node.

Bounded: at most ``MAX_KEYS`` keys (the oldest go first) and none older than
``WINDOW_S``. When keys must go before their window ended, the fence stays safe by
refusing every repair write until the newest of them would have expired (``floor``;
answered NoSpace, not Deleted: it proves no delete of that key): repair retries
later, nothing comes back. Deletes of whole namespaces (DeleteAll) are
one mark per namespace. Every key a delete names is recorded, present here or not (a
repair write may be filling exactly the record this node lacked).

Everything runs on the daemon's event loop thread (Store's rule): no locks.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable, Iterable

WINDOW_S = 60.0  # a key deleted this long ago is fenced no more
# a repair write is sent at most this long after the Heads it was decided from (the
# writer drops later ones for the pass); the rest of the window covers the spread of one
# delete over the object's nodes
MAX_WRITE_AGE_S = 20.0
# ~160 bytes a key besides the key's own bytes (tuple, float, the OrderedDict's entry
# and link; tracemalloc, 100k keys): 100k keys of 64 bytes ~ 23 MiB at most, enough for
# deletes of ~1,600 keys/s sustained over the window before the floor takes over
MAX_KEYS = 100_000
DELETED, OVERFLOW = "deleted", "overflow"  # DeleteFence.refusal's reasons


class DeleteFence:
    def __init__(self, window: float = WINDOW_S, max_keys: int = MAX_KEYS,
                 clock: Callable[[], float] = time.monotonic):
        self.window = window
        self.max_keys = max_keys
        self.clock = clock
        self._keys: OrderedDict[tuple[bytes, bytes], float] = OrderedDict()  # oldest first
        self._namespaces: dict[bytes | None, float] = {}  # DeleteAll: ns (None: all) -> when
        self.floor = float("-inf")  # newest delete forgotten before its window ended
        self.counters = {"recorded": 0, "refused": 0, "overflowed": 0}

    def __len__(self) -> int:
        return len(self._keys)

    def record(self, ns: bytes, keys: Iterable[bytes]) -> None:
        """``keys`` of ``ns`` were deleted now (whether this node held them or not)."""
        now = self.clock()
        ks = self._keys
        pop = ks.pop
        n = 0
        for k in keys:
            ns_key = (ns, k if type(k) is bytes else bytes(k))
            pop(ns_key, None)  # a key deleted again moves to the newest end
            ks[ns_key] = now
            n += 1
        self.counters["recorded"] += n
        # (the oldest key first: most deletes find nothing to trim and stop at one look)
        if (ks and (len(ks) > self.max_keys or next(iter(ks.values())) <= now - self.window)
                or self._namespaces):
            self._trim(now)

    def record_namespace(self, ns: bytes | None) -> None:
        """Every key of ``ns`` (None: of every namespace) was deleted now."""
        self._namespaces[ns] = self.clock()

    def refusal(self, ns: bytes, key: bytes) -> str | None:
        """Why a repair write of (ns, key) must be refused, or None: DELETED when the key
        (or its namespace) was deleted here within the window, OVERFLOW when keys were
        forgotten early (nothing is known of this one: the write waits, but it is no
        evidence of a delete)."""
        now = self.clock()
        since = now - self.window
        at = self._keys.get((ns, key))
        if ((at is not None and at > since) or self._namespaces.get(ns, since) > since
                or self._namespaces.get(None, since) > since):
            why = DELETED
        elif self.floor > since:
            why = OVERFLOW
        else:
            return None
        self.counters["refused"] += 1
        return why

    def deleted_ago(self, ns: bytes, key: bytes) -> float:
        """How many seconds ago (ns, key), or its namespace, was last deleted here; 0.0
        when not within the window (Heads: evidence that a record another node held back
        and wrote before then is a leftover of a delete, not a loss)."""
        now = self.clock()
        since = now - self.window
        at = max(self._keys.get((ns, key), since), self._namespaces.get(ns, since),
                 self._namespaces.get(None, since))
        return max(now - at, 1e-6) if at > since else 0.0

    def _trim(self, now: float) -> None:
        """Forget keys past the window, and the oldest over ``max_keys`` (raising floor)."""
        ks = self._keys
        since = now - self.window
        while ks:
            ns_key, at = next(iter(ks.items()))
            if at <= since:
                ks.popitem(last=False)
            elif len(ks) > self.max_keys:
                ks.popitem(last=False)
                self.floor = max(self.floor, at)
                self.counters["overflowed"] += 1
            else:
                break
        if self._namespaces:
            for ns in [n for n, at in self._namespaces.items() if at <= since]:
                del self._namespaces[ns]

    def stats(self) -> dict:
        """Keys held (expired ones included until the next delete trims them), and the
        counters (metrics: kvstored_delete_fence_*). Changes nothing: safe from any thread."""
        return {"keys": len(self._keys), **self.counters}
