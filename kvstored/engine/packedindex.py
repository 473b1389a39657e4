"""The packed index: the Index's seam (kvstored/engine/entries.py) over native records.

``kvstored._index`` (native/index.c) keeps one 51-byte record per object that never
moves (a seeded 64-bit fingerprint of its namespace and key, checksum, commit time,
size, ids, flags, and a union: the DRAM form (DRAM offset, eviction stamp, read count,
links) for a keyless record in DRAM or in a list, else the NVMe form (packed location,
and a keyed record's chunk: its DRAM form followed by the key, in per-length pools);
small side tables hold the rare states (readers in flight; the NVMe location of a
keyless record that is also in DRAM), an open-addressing table of
u32 record numbers (probed from the record's fingerprint) and the DRAM slot map as u32
arrays per slab; an ``Entry`` is a view of one record, built on
lookup and shared by every lookup while anyone holds it (the Store and the eviction
policy compare entries with ``is``). Bytes per object: docs/scale.md, "The packed
index"; benchmarks/bench_index.py measures both indexes.

Differences from the dict index a caller can see, all within its documented
contract: walks go in record order (record numbers are reused), not namespace by
namespace in insertion order; keys are at most 255 bytes (the wire allows 128);
``Entry.size`` and ``Entry.checksum`` are read-only once inserted (nothing changes
them); ``Entry.reads`` saturates at 15 (the Store asks "read at all?" and orders the
shutdown flush by it); ``Entry.stamp`` keeps the eviction clock's low 28 bits and reads
back whole (the clock's window) while the entry is in an eviction list (an unlinked one
never stamped reads 0; one unlinked for 2**28 ticks or more reads wrong, and nothing
decides by it: a link stamps anew), an age past 2**27 ticks counting as 2**27 (as
``eviction.Policy`` counts it: ``STAMP_AGE_CAP``); a stamp set past the clock moves the
clock (the table's, shared with its ``Lru``); ``Entry.refs`` holds 24 bits (16 M readers of one object
are refused with ValueError); offsets below -1 are refused; a slab's row of the slot map holds its class's
``slots_per_slab`` (an offset past them is refused by ``place``); at most 65535 namespaces
hold objects at once (``IndexFull``, a NoSpace); a slot left by an offset change
without ``displace`` reads None from ``at`` (the dict index keeps the old entry there:
a freed record's number is reused, so the packed one must not point at it).

While a native eviction policy (``kvstored._index.Lru``, ``eviction.NativePolicy``)
lives over the index (one at a time: another is refused with ValueError), ``Entry.seg``
and the links (``newer``/``older``) are its lists':
a write from Python that changes one is a ValueError (it would put a record in a list
without linking it, or out of one it is still linked in); the Python ``Policy`` writes
them over an index no Lru is bound to. ``insert`` puts a record in no list (``seg``
-1, no links): the policy links it. A setter or call that fails for want of memory (a
side table's growth: the NVMe location of a keyless DRAM record, a Location or DRAM
offset that does not pack) raises MemoryError and leaves the entry as it was: the new
value is stored before the old one goes (``_index._fail_allocs(n, after=0)``, a test
hook, makes n such allocations fail past the next ``after``).

Keys of NVMe-only objects out of RAM (issue 13: <= 64 B per object). ``shed_key(e)``
(``e`` inserted, ``offset == -1``, ``nvme`` set; else ValueError) frees the key and
its chunk (read count and stamp go to 0; readers and links, if any, stay);
``add(..., keyless=True)`` indexes such a record at recovery. ``shed_key(e,
dram=True)`` also takes an entry with a DRAM copy and/or in the eviction lists (its
key is kept in the arena's key area, beside the copy; it needs a DRAM copy or an NVMe
location, else ValueError): every DRAM field stays (offset, readers, links, stamp,
reads), and the eviction policy needs no key (its ghost digest is the fingerprint).
When such an entry's copy goes (``drop_copy``: unlinked, offset -1, then
``shed_key(e)``), its stamp and read count go as for any NVMe-only one. A keyless record is
found by namespace, key length and fingerprint; a keyed one always by its bytes (a
probe goes on past a keyless record of equal fingerprint). Two keyless records of one
fingerprint could not be told apart, so the second keeps its key (``shed_key`` is then
a no-op, ``add(keyless=True)`` indexes it keyed). A lookup of a key that is not stored
may return a keyless record of equal 64-bit fingerprint (the seed is random per
table). Which paths compare the whole key of a keyless entry, and which match it by
fingerprint alone:

  * reads compare: a get (``get_read``: a keyless DRAM entry is returned only if its
    slot's key record, read in C from the arena given by ``use_key_area(buffer,
    key_width)``, holds the key; the Store's ``acquire``) and a promotion from NVMe
    (the record header's key, ``Tiering.load``). They must: a fingerprint match of
    another key would serve that object's bytes as this key's (another prompt's KV
    cache: silently wrong model output), and a client that rewrote a key record in
    its mapping of the arena would make a get serve bytes under a key they never had;
  * ``get`` and the calls built on it match by namespace, length and fingerprint:
    exists (``present``), lookup (``prefix``), pin, delete, ``touch_keys`` and
    repair's Heads. A false match there needs another stored key with the same seeded
    64-bit fingerprint, ~n/2**64 per call at n keyless objects, and costs a wrong
    hit (the get that follows misses), a pin or delete of the wrong cached block, or
    a wrong head compared by repair (which then reads the record): never wrong bytes.

The fingerprint starts from the namespace's name hash, not its id (ids are reused once a
namespace empties), so a key's fingerprint is fixed while the table lives: the native
eviction policy's ghost uses it as the evicted key's digest (``Lru.digest``), and
neither an insert nor an eviction reads a key.
``Entry.key`` of a keyless entry calls the loader of ``set_key_loader(fn)``
(``fn(entry) -> bytes | None``, checked against the length and fingerprint), else
raises LookupError; ``Entry.key_in_ram`` says which. ``restore_key(e, key)`` gives
the key back (ValueError if it is not the entry's); an entry may take a DRAM offset
while keyless (promotion) and stays keyless until then.
"""
from __future__ import annotations

from typing import Iterator

from kvstore.errors import NoSpace
from kvstored import _index
from kvstored.settings import default

from .nvmedevice import Location

Entry = _index.Entry
RECORD_SIZE = _index.RECORD_SIZE


class IndexFull(NoSpace, OverflowError):
    """A fixed-width field of the packed index ran out: 65535 namespaces holding objects
    at once (a record's namespace id is 16 bits), or 2**32 records. A put that meets it
    fails as NoSpace (the client sees a typed error; the dict index has no such bound)."""


_index.set_full_error(IndexFull)
_table_remove = _index.Table.remove


class PackedIndex(_index.Table):
    """(namespace, key) -> Entry over native records; the same calls as entries.Index."""

    __slots__ = ("_pinned",)
    Entry = _index.Entry  # the entries this index takes (Store and recovery build them)
    kind = "packed"

    def __init__(self, slab_size: int = default("slab_size")):
        super().__init__(slab_size, Location)
        self._pinned: set = set()  # entries with a pin count (holds their views alive)

    def __contains__(self, k: tuple[bytes, bytes]) -> bool:
        return self.get(k[0], k[1]) is not None

    def remove(self, e) -> None:
        """Drop ``e`` (the entry under its key) and its pin; the record lives on while
        ``e`` (or another reference to its view) does."""
        _table_remove(self, e)  # (not super(): no super object built per call)
        if self._pinned:
            self._pinned.discard(e)

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return ((e.ns, e.key) for e in self.iterate())

    # ------------------------------------------------------------------ pins
    def note_pin(self, e) -> None:
        self._pinned.add(e)

    def drop_pin(self, e) -> None:
        self._pinned.discard(e)

    def live_pins(self, now: float) -> list:
        lapsed = [e for e in self._pinned if e.pin_until <= now]
        self._pinned.difference_update(lapsed)
        return list(self._pinned)

    # -------------------------------------------- dict-like reads (tests, tools)
    def __getitem__(self, k: tuple[bytes, bytes]):
        e = self.get(k[0], k[1])
        if e is None:
            raise KeyError(k)
        return e

    def items(self):
        return (((e.ns, e.key), e) for e in self.iterate())

    def values(self):
        return self.iterate()
