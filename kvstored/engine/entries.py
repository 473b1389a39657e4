"""What the Store knows about each object: Entry, Reservation and the Index over them.

The Index is the one place that maps (namespace, key) to an Entry, and it keeps
the aggregates the daemon reports without walking it (objects and bytes per
namespace, held-back records, pinned entries) plus the reverse map from a DRAM
slot to its entry (slab reclaim reads it). Everything runs on the event loop
thread: no locks.
"""
from __future__ import annotations

import logging
import os
import time
from itertools import chain
from typing import TYPE_CHECKING, Callable, Iterator

from kvstored.settings import default

from .eviction import NONE

if TYPE_CHECKING:
    from .arena import SizeClass
    from .nvme import Location

COMMITTED = 1
DEAD = 2  # removed from the index (deleted / overwritten / evicted) while still referenced


# Pin counts and lease ends of the (few) pinned entries: entry -> [pins, pin_until].
# Kept beside the entries rather than in two slots of every one (16 B per object,
# issue 13); a record goes when both are back to zero or the entry leaves the index.
_PINS: dict["Entry", list] = {}


class Entry:
    """One committed object. While in DRAM, linked into its size class's eviction lists
    (``seg``, ``stamp``, ``newer``, ``older`` belong to eviction.Policy). ``pins`` and
    ``pin_until`` read and write like fields; they live in a side table (``_PINS``)."""

    __slots__ = ("ns", "key", "offset", "size", "checksum", "sc", "state", "refs",
                 "seg", "stamp", "newer", "older", "committed_at", "nvme",
                 "reads", "_unverified", "_index")
    key_in_ram = True  # always here; the packed index sheds NVMe-only keys (Index.shed_key)

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
        self._unverified = False
        self._index: "Index | None" = None  # the index holding it: keeps its held count

    @property
    def unverified(self) -> bool:
        return self._unverified

    @unverified.setter
    def unverified(self, held: bool) -> None:
        """Set directly, it keeps the holding index's ``unverified`` count true (as its
        ``mark_unverified`` / ``verify`` do), so a later remove never takes it below zero."""
        held = bool(held)
        if held != self._unverified:
            self._unverified = held
            if self._index is not None:
                self._index.unverified += 1 if held else -1

    def pinned(self, now: float) -> bool:
        r = _PINS.get(self)
        return r is not None and r[0] > 0 and r[1] > now

    @property
    def pins(self) -> int:
        r = _PINS.get(self)
        return 0 if r is None else r[0]

    @pins.setter
    def pins(self, n: int) -> None:
        self._set_pin(0, n)

    @property
    def pin_until(self) -> float:
        r = _PINS.get(self)
        return 0.0 if r is None else r[1]

    @pin_until.setter
    def pin_until(self, t: float) -> None:
        self._set_pin(1, t)

    def _set_pin(self, i: int, v) -> None:
        r = _PINS.get(self)
        if r is None:
            if v:
                r = _PINS[self] = [0, 0.0]
                r[i] = v
            return
        r[i] = v
        if not r[0] and not r[1]:
            del _PINS[self]

    def forget_pin(self) -> None:
        """Drop the pin record (the entry left the index: nothing asks it again)."""
        _PINS.pop(self, None)


class Reservation:
    """A slot being filled by a writer; invisible to readers until commit."""

    __slots__ = ("ns", "key", "offset", "size", "checksum", "sc", "overwrite", "deadline",
                 "view", "on_expire", "done", "held", "recommit", "committed_at")

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
        self.held = False  # counted in a data session's and its client's reserved bytes
        self.recommit = True  # a client's write: finding these bytes stored commits them again
        # a repair write's commit time (the source's: Store.commit), None: the commit's own
        self.committed_at: float | None = None


def _bytes_keys(ns, keys, call: str) -> list:
    """A batch call's keys as a list (any iterable, as the packed index's PySequence_Fast
    takes), each checked to be bytes; ns too. TypeError otherwise, with the packed index's
    words."""
    if not isinstance(ns, bytes):
        raise TypeError(f"{call}(ns: bytes, keys: list)")
    if keys.__class__ is not list and keys.__class__ is not tuple:
        try:
            keys = list(keys)  # a str or bytes gives str / int elements: refused below
        except TypeError:
            raise TypeError(f"{call}(ns, keys): keys must be a sequence") from None
    for k in keys:
        if k.__class__ is not bytes and not isinstance(k, bytes):
            raise TypeError(f"keys are bytes, not {type(k).__name__}")
    return keys


class _Space:
    """One namespace: its keys, counts, and the one bytes object its entries share as
    ``ns`` (a put decodes a fresh one per request; keeping it per entry cost 48 B)."""

    __slots__ = ("name", "keys", "objects", "bytes")

    def __init__(self, name: bytes):
        self.name = name
        self.keys: dict[bytes, Entry] = {}
        self.objects = 0
        self.bytes = 0


class Index:
    """(namespace, key) -> Entry, with the counts kept as it changes.

    The interface is kept narrow on purpose: it is the seam where a compact packed
    index (issue 13: at most 64 bytes per object, entries materialised on lookup)
    replaces the dict. Callers only ever

      * look up: ``get(ns, key)`` (and ``(ns, key) in index``);
      * change: ``insert(e)`` (a new key: the caller removed any old entry first),
        ``add(fields)`` (the same from fields, for recovery) and ``remove(e)``; ``mark_unverified`` / ``verify`` flip a held-back record (setting
        ``Entry.unverified`` on an entry in the index does the same: the count follows);
      * walk: ``iterate(ns)`` (entries, optionally of one namespace) and ``__iter__``
        (keys); walks are for admin calls, repair and shutdown, never per request;
      * count: ``len()``, ``count(ns)``, ``namespaces()``, ``object_bytes``,
        ``unverified``;
      * map a DRAM slot back to its entry: ``place`` / ``displace`` / ``at(offset)``;
      * learn the arena's and the NVMe tier's layout: ``use_slab_size``, ``use_nvme_geometry``,
        ``use_key_area(arena_buffer | None, key_width)`` (where slots' key records are);
      * ``get_read(ns, key)``: ``get`` for a read of the object's bytes (the packed index
        returns a keyless DRAM entry only if its slot's key record holds ``key``);
        ``keep_key_in_area(e)``: a DRAM entry's key into its slot's key record, out of RAM
        (the packed index; False here);
      * track pins: ``note_pin`` / ``drop_pin`` / ``live_pins(now)``;
      * keys out of RAM (the packed index; no-ops here, where every key stays in RAM):
        ``shed_key(e)`` (NVMe-only entries), ``shed_key(e, dram=True)`` (also one with
        a DRAM copy, linked in the eviction lists), ``restore_key(e, key)``,
        ``set_key_loader(fn)``, ``add(..., keyless=True)``, ``Entry.key_in_ram``.

    ``__getitem__``, ``items`` and ``values`` exist for tests and tools that read
    the index like the dict it was; the daemon's code does not use them.

    Layout, chosen for bytes per object (benchmarks/bench_index.py, docs/scale.md):
    one dict per namespace keyed by the key bytes (no (ns, key) tuple per entry),
    the namespace's bytes shared by its entries (``insert`` swaps ``e.ns`` for it),
    and the slot map a list per slab indexed by slot number (8 B per slot, where a
    dict cost ~40 B per object).
    """

    __slots__ = ("_spaces", "_n", "_slab_size", "_slabs", "_pinned", "object_bytes",
                 "unverified")
    Entry = Entry  # the entries this index takes (the Store and recovery build them)
    kind = "dict"

    def __init__(self, slab_size: int = default("slab_size")):
        if slab_size <= 0:
            raise ValueError(f"slab_size must be positive, not {slab_size}")
        self._spaces: dict[bytes, _Space] = {}
        self._n = 0
        self._slab_size = slab_size  # the arena's: a DRAM offset's slab is offset // it
        # slab number -> [slot size, entry or None per slot]; a slab that changed class
        # since (it was emptied first, so every slot is None) gets a fresh list
        self._slabs: dict[int, list] = {}
        self._pinned: set[Entry] = set()  # entries with a pin count (leases may have lapsed)
        self.object_bytes = 0
        self.unverified = 0  # entries hidden from clients until verified

    # ---------------------------------------------------------------- lookup
    # Lookups take bytes (subclasses too) and raise TypeError otherwise, as the packed
    # index does: a str key would only ever miss here, and a read-only memoryview could hit.
    def get(self, ns: bytes, key: bytes) -> Entry | None:
        sp = self._spaces.get(ns)
        if sp is None or key.__class__ is not bytes or ns.__class__ is not bytes:
            if not (isinstance(ns, bytes) and isinstance(key, bytes)):
                raise TypeError("get(ns: bytes, key: bytes)")
            return None if sp is None else sp.keys.get(key)
        return sp.keys.get(key)

    # A read's lookup (Store.acquire): the packed index's compares a keyless DRAM entry's
    # key record with the key; here every key is in RAM and compared by the dict.
    get_read = get

    def use_key_area(self, arena, key_width: int) -> None:
        """The packed index reads and writes slots' key records here (get_read,
        keep_key_in_area); this one keeps keys in RAM."""

    def keep_key_in_area(self, e: Entry) -> bool:
        """The packed index moves ``e``'s key into its slot's key record; here it stays."""
        return False

    def present(self, ns: bytes, keys: list) -> list[bool]:
        """For each key: stored and not held back (unverified). The packed index does it
        in C without building entries (Store.exists)."""
        keys = _bytes_keys(ns, keys, "present")
        keys_of = self._spaces.get(ns)
        if keys_of is None:
            return [False] * len(keys)
        got = keys_of.keys.get
        return [e is not None and not e.unverified for e in map(got, keys)]

    def prefix(self, ns: bytes, keys: list) -> tuple[int, int]:
        """How many leading keys are ``present``, and their objects' bytes (Store.lookup).
        Keys after the first one missing are not looked at (nor type-checked), as in C."""
        if not isinstance(ns, bytes):
            raise TypeError("prefix(ns: bytes, keys: list)")
        sp = self._spaces.get(ns)
        got = {}.get if sp is None else sp.keys.get
        n = nbytes = 0
        for k in keys:
            if not isinstance(k, bytes):
                raise TypeError(f"keys are bytes, not {type(k).__name__}")
            e = got(k)
            if e is None or e.unverified:
                break
            n += 1
            nbytes += e.size
        return n, nbytes

    def __contains__(self, k: tuple[bytes, bytes]) -> bool:
        return self.get(k[0], k[1]) is not None

    def __len__(self) -> int:
        return self._n

    # ---------------------------------------------------------------- change
    def insert(self, e: Entry) -> None:
        """Add ``e`` under its key, which must be free (remove the old entry first).
        ``e.ns`` becomes the namespace's shared bytes object (equal, maybe not the same)."""
        sp = self._spaces.get(e.ns)
        if sp is None:
            sp = self._spaces[e.ns] = _Space(e.ns)
        if sp.keys.setdefault(e.key, e) is not e:  # one dict operation on the put path
            raise KeyError(f"index already holds {(e.ns, e.key)!r}; remove the old entry first")
        e.ns = sp.name
        e._index = self
        sp.objects += 1
        sp.bytes += e.size
        self._n += 1
        self.object_bytes += e.size
        if e._unverified:
            self.unverified += 1

    def add(self, ns: bytes, key: bytes, offset: int, size: int, checksum: int, sc: "SizeClass",
            committed_at: float, nvme: "Location | None" = None, unverified: bool = False,
            keyless: bool = False) -> None:
        """``insert`` of an entry made from these fields (recovery at start: the packed
        index then builds no Python object per record). ``keyless``: an NVMe-only record
        whose key the packed index does not keep; this index keeps it anyway (the same
        checks, so a caller's mistake shows on either index)."""
        if keyless and (offset != -1 or nvme is None):
            raise ValueError("add(keyless=True) is for NVMe-only objects: offset -1 and an "
                             "NVMe location (nvme=)")
        e = Entry(ns, key, offset, size, checksum, sc)
        e.committed_at = committed_at
        e.nvme = nvme
        e.unverified = unverified
        self.insert(e)

    def remove(self, e: Entry) -> None:
        """Drop ``e`` (which must be the entry under its key) and its pin; a held-back
        record stops being counted as one."""
        sp = self._spaces.get(e.ns)
        if sp is None:
            raise KeyError((e.ns, e.key))
        del sp.keys[e.key]
        if sp.objects == 1:
            del self._spaces[e.ns]
        else:
            sp.objects -= 1
            sp.bytes -= e.size
        self._n -= 1
        self.object_bytes -= e.size
        e._index = None
        if e._unverified:
            e._unverified = False
            self.unverified -= 1
        self._pinned.discard(e)
        e.forget_pin()

    # ----------------------------------------- keys out of RAM (packed index)
    def shed_key(self, e: Entry, dram: bool = False) -> None:
        """No-op: this index keeps every key in RAM (the packed one sheds an NVMe-only
        entry's key, and with ``dram=True`` a DRAM-resident one's, whose key is then in
        the arena's key area)."""

    def restore_key(self, e: Entry, key: bytes) -> None:
        """No-op: the entry has its key."""

    def set_key_loader(self, fn) -> None:
        """Nothing to keep: ``Entry.key`` never needs loading here."""

    def mark_unverified(self, e: Entry) -> None:
        self._own(e)
        e.unverified = True  # (counted by the setter while ``e`` is in this index)

    def verify(self, e: Entry) -> None:
        self._own(e)
        e.unverified = False

    def _own(self, e: Entry) -> None:
        if e._index is not None and e._index is not self:  # would change another's count
            raise ValueError("entry belongs to another index")

    def mark_all_unverified(self) -> int:
        """Every entry held back (``mark_unverified`` of each); how many were not already.
        A flag changes no dict, so no snapshot of the walk."""
        n = 0
        for e in self.iterate():
            if not e._unverified:
                e._unverified = True
                n += 1
        self.unverified += n
        return n

    # ------------------------------------------------------------------ walk
    def iterate(self, ns: bytes | None = None) -> Iterator[Entry]:
        """Every entry, namespace by namespace (each in insertion order), or those of
        one namespace. Do not change the index while walking it: snapshot
        (``list(...)``) first."""
        if ns is None:
            return chain.from_iterable(sp.keys.values() for sp in self._spaces.values())
        sp = self._spaces.get(ns)
        return iter(()) if sp is None else iter(sp.keys.values())

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return ((sp.name, k) for sp in self._spaces.values() for k in sp.keys)

    # ----------------------------------------------------------------- count
    def count(self, ns: bytes) -> int:
        sp = self._spaces.get(ns)
        return sp.objects if sp else 0

    def namespaces(self) -> dict[bytes, tuple[int, int]]:
        """namespace -> (objects, bytes), held-back records included."""
        return {ns: (sp.objects, sp.bytes) for ns, sp in self._spaces.items()}

    # ------------------------------------------------------------- DRAM slots
    def use_slab_size(self, slab_size: int) -> None:
        """The arena's slab size (the DRAM tier tells it when it makes the arena)."""
        if slab_size <= 0:
            raise ValueError(f"slab_size must be positive, not {slab_size}")
        if self._slabs and slab_size != self._slab_size:
            raise ValueError("slots are placed already: the slab size cannot change")
        self._slab_size = slab_size

    def use_nvme_geometry(self, data_start: int, region_size: int) -> None:
        """Where the NVMe tier's regions lie (the packed index packs Locations by it; this
        one keeps each Location object as it is)."""

    def place(self, e: Entry) -> None:
        """``e`` now holds DRAM slot ``e.offset``."""
        slab, rel = divmod(e.offset, self._slab_size)
        size = e.sc.slot_size
        i, off = divmod(rel, size)
        if off:  # checked first: a refused place leaves the slab's map as it was
            raise ValueError(f"offset {e.offset} is not a slot of {size} bytes in a slab of "
                             f"{self._slab_size} (use_slab_size not called with the arena's?)")
        row = self._slabs.get(slab)
        if row is None or row[0] != size:
            # one spare slot at the end: an offset past a slab's last whole slot reads None
            row = self._slabs[slab] = [size] + [None] * (self._slab_size // size + 1)
        row[1 + i] = e

    def displace(self, e: Entry) -> None:
        """``e`` gave up its DRAM slot (call before ``e.offset`` changes)."""
        slab, rel = divmod(e.offset, self._slab_size)
        row = self._slabs.get(slab)
        if row is not None and rel % row[0] == 0 and row[1 + rel // row[0]] is e:
            row[1 + rel // row[0]] = None

    def at(self, offset: int) -> Entry | None:
        """The committed entry in the DRAM slot at ``offset``, if any."""
        slab, rel = divmod(offset, self._slab_size)
        row = self._slabs.get(slab)
        if row is None or rel % row[0]:
            return None  # no entry ever placed there, or the slab is of another class now
        return row[1 + rel // row[0]]

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
        e = self.get(k[0], k[1])
        if e is None:
            raise KeyError(k)
        return e

    def items(self) -> Iterator[tuple[tuple[bytes, bytes], Entry]]:
        return (((e.ns, e.key), e) for e in self.iterate())

    def values(self) -> Iterator[Entry]:
        return self.iterate()


# Set by tests to run the engine against one index whatever the config says
# (tests/conftest.py, tests/engine): auto | packed | dict.
INDEX_ENV = "KVSTORED_INDEX"


def make_index(kind: str = "auto", slab_size: int = default("slab_size")):
    """The Store's index: ``packed`` (kvstored._index, native records; docs/scale.md),
    ``dict`` (this module's Index) or ``auto`` (packed when the extension is built, else
    dict). ``KVSTORED_INDEX`` in the environment overrides ``kind``."""
    kind = os.environ.get(INDEX_ENV) or kind
    if kind not in ("auto", "packed", "dict"):
        raise ValueError(f"index must be auto, packed or dict, not {kind!r}")
    if kind != "dict":
        try:
            from .packedindex import PackedIndex
        except ImportError:
            if kind == "packed":
                raise ImportError("index = packed, but kvstored._index is not built (no C "
                                  "compiler at install?); use auto or dict") from None
            logging.getLogger("kvstored.store").info(
                "kvstored._index is not built: the Store uses its dict index (~3.7x the "
                "RAM per object of the packed one)")
        else:
            return PackedIndex(slab_size)
    return Index(slab_size)
