"""What the Store knows about each object: Entry, Reservation and the Index over them.

The Index is the one place that maps (namespace, key) to an Entry, and it keeps
the aggregates the daemon reports without walking it (objects and bytes per
namespace, held-back records, pinned entries) plus the reverse map from a DRAM
slot to its entry (slab reclaim reads it). Everything runs on the event loop
thread: no locks.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Iterator

from .eviction import NONE

if TYPE_CHECKING:
    from .arena import SizeClass
    from .nvme import Location

COMMITTED = 1
DEAD = 2  # removed from the index (deleted / overwritten / evicted) while still referenced


class Entry:
    """One committed object. While in DRAM, linked into its size class's eviction lists
    (``seg``, ``stamp``, ``newer``, ``older`` belong to eviction.Policy)."""

    __slots__ = ("ns", "key", "offset", "size", "checksum", "sc", "state", "refs",
                 "pins", "pin_until", "seg", "stamp", "newer", "older", "committed_at", "nvme",
                 "reads", "unverified")

    def __init__(self, ns: bytes, key: bytes, offset: int, size: int, checksum: int,
                 sc: "SizeClass"):
        self.ns = ns
        self.key = key
        self.offset = offset  # DRAM slot, or -1 when the object is on NVMe only
        self.size = size
        self.checksum = checksum
        self.sc = sc
        self.state = COMMITTED
        self.refs = 0
        self.pins = 0
        self.pin_until = 0.0
        self.seg = NONE
        self.stamp = 0
        self.newer: Entry | None = None
        self.older: Entry | None = None
        self.committed_at = time.time()
        self.nvme: Location | None = None  # the copy on the NVMe tier, if any
        self.reads = 0
        # Recovered at restart by a cluster node: it may have been deleted or replaced
        # while the node was away, so clients do not see it until the repair agent has
        # checked it against its peers (Store.verify / drop_unverified).
        self.unverified = False

    def pinned(self, now: float) -> bool:
        return self.pins > 0 and self.pin_until > now


class Reservation:
    """A slot being filled by a writer; invisible to readers until commit."""

    __slots__ = ("ns", "key", "offset", "size", "checksum", "sc", "overwrite", "deadline",
                 "view", "on_expire", "done")

    def __init__(self, ns, key, offset, size, checksum, sc, overwrite, deadline, view):
        self.ns = ns
        self.key = key
        self.offset = offset
        self.size = size
        self.checksum = checksum
        self.sc = sc
        self.overwrite = overwrite
        self.deadline = deadline
        self.view: memoryview = view
        # Called by the reaper before the slot is reclaimed, so the writer stops
        # writing into it (the TCP server closes the connection).
        self.on_expire: Callable[[Reservation], None] | None = None
        self.done = False


class Index:
    """(namespace, key) -> Entry, with the counts kept as it changes.

    The interface is kept narrow on purpose: it is the seam where a compact packed
    index (issue 13: at most 64 bytes per object, entries materialised on lookup)
    replaces the dict. Callers only ever

      * look up: ``get(ns, key)`` (and ``(ns, key) in index``);
      * change: ``insert(e)`` (a new key: the caller removed any old entry first)
        and ``remove(e)``; ``mark_unverified`` / ``verify`` flip a held-back record;
      * walk: ``iterate(ns)`` (entries, optionally of one namespace) and ``__iter__``
        (keys); walks are for admin calls, repair and shutdown, never per request;
      * count: ``len()``, ``count(ns)``, ``namespaces()``, ``object_bytes``,
        ``unverified``;
      * map a DRAM slot back to its entry: ``place`` / ``displace`` / ``at(offset)``;
      * track pins: ``note_pin`` / ``drop_pin`` / ``live_pins(now)``.

    ``__getitem__``, ``items`` and ``values`` exist for tests and tools that read
    the index like the dict it was; the daemon's code does not use them.
    """

    __slots__ = ("_map", "_ns", "_by_offset", "_pinned", "object_bytes", "unverified")

    def __init__(self):
        self._map: dict[tuple[bytes, bytes], Entry] = {}
        self._ns: dict[bytes, list[int]] = {}  # namespace -> [objects, bytes]
        self._by_offset: dict[int, Entry] = {}  # DRAM slot -> the entry stored in it
        self._pinned: set[Entry] = set()  # entries with a pin count (leases may have lapsed)
        self.object_bytes = 0
        self.unverified = 0  # entries hidden from clients until verified

    # ---------------------------------------------------------------- lookup
    def get(self, ns: bytes, key: bytes) -> Entry | None:
        return self._map.get((ns, key))

    def __contains__(self, k: tuple[bytes, bytes]) -> bool:
        return k in self._map

    def __len__(self) -> int:
        return len(self._map)

    # ---------------------------------------------------------------- change
    def insert(self, e: Entry) -> None:
        """Add ``e`` under its key, which must be free (remove the old entry first)."""
        k = (e.ns, e.key)
        if self._map.setdefault(k, e) is not e:  # one dict operation on the put path
            raise KeyError(f"index already holds {k!r}; remove the old entry first")
        row = self._ns.get(e.ns)
        if row is None:
            self._ns[e.ns] = [1, e.size]
        else:
            row[0] += 1
            row[1] += e.size
        self.object_bytes += e.size
        if e.unverified:
            self.unverified += 1

    def remove(self, e: Entry) -> None:
        """Drop ``e`` (which must be the entry under its key) and its pin; a held-back
        record stops being counted as one."""
        del self._map[(e.ns, e.key)]
        row = self._ns[e.ns]
        if row[0] == 1:
            del self._ns[e.ns]
        else:
            row[0] -= 1
            row[1] -= e.size
        self.object_bytes -= e.size
        if e.unverified:
            e.unverified = False
            self.unverified -= 1
        self._pinned.discard(e)

    def mark_unverified(self, e: Entry) -> None:
        if not e.unverified:
            e.unverified = True
            if (e.ns, e.key) in self._map:
                self.unverified += 1

    def verify(self, e: Entry) -> None:
        if e.unverified:
            e.unverified = False
            if (e.ns, e.key) in self._map:
                self.unverified -= 1

    # ------------------------------------------------------------------ walk
    def iterate(self, ns: bytes | None = None) -> Iterator[Entry]:
        """Every entry (dict order), optionally of one namespace. Do not change the
        index while walking it: snapshot (``list(...)``) first."""
        if ns is None:
            return iter(self._map.values())
        return (e for e in self._map.values() if e.ns == ns)

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return iter(self._map)

    # ----------------------------------------------------------------- count
    def count(self, ns: bytes) -> int:
        row = self._ns.get(ns)
        return row[0] if row else 0

    def namespaces(self) -> dict[bytes, tuple[int, int]]:
        """namespace -> (objects, bytes), held-back records included."""
        return {ns: (r[0], r[1]) for ns, r in self._ns.items()}

    # ------------------------------------------------------------- DRAM slots
    def place(self, e: Entry) -> None:
        """``e`` now holds DRAM slot ``e.offset``."""
        self._by_offset[e.offset] = e

    def displace(self, e: Entry) -> None:
        """``e`` gave up its DRAM slot (call before ``e.offset`` changes)."""
        self._by_offset.pop(e.offset, None)

    def at(self, offset: int) -> Entry | None:
        """The committed entry in the DRAM slot at ``offset``, if any."""
        return self._by_offset.get(offset)

    # ------------------------------------------------------------------ pins
    def note_pin(self, e: Entry) -> None:
        self._pinned.add(e)

    def drop_pin(self, e: Entry) -> None:
        self._pinned.discard(e)

    def live_pins(self, now: float) -> list[Entry]:
        """Entries under a live pin lease; lapsed ones are forgotten (O(pinned), not
        O(objects))."""
        lapsed = [e for e in self._pinned if e.pin_until <= now]
        self._pinned.difference_update(lapsed)
        return list(self._pinned)

    # -------------------------------------------- dict-like reads (tests, tools)
    def __getitem__(self, k: tuple[bytes, bytes]) -> Entry:
        return self._map[k]

    def items(self):
        return self._map.items()

    def values(self):
        return self._map.values()
