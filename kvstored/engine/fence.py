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

Beyond the window, a cluster node keeps a **delete history** (``DeleteHistory``): a
compact (fingerprint, time) record of every key deleted here over ``horizon`` seconds
(24 h by default, ``cluster.delete_horizon``), bounded in count
(``cluster.delete_history_keys``). It refuses no write; it only answers ``deleted_ago``
(Heads) for longer, so a node back after a longer absence drops its records of objects
deleted meanwhile (repair/decide.py) instead of serving them again. Its files (a
snapshot, and a journal each delete call is appended to), kept across restarts and
crashes: kvstored/cluster/history.py.

Everything runs on the daemon's event loop thread (Store's rule): no locks (but
``DeleteHistory.write``, which touches only the snapshot it is given).
"""
from __future__ import annotations

import os
import struct
import sys
import time
from array import array
from collections import OrderedDict
from typing import Callable, Iterable

import xxhash

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
        # deletes remembered past the window, for deleted_ago only (a cluster node's: the
        # node sets it from cluster.delete_horizon / delete_history_keys)
        self.history: DeleteHistory | None = None

    def __len__(self) -> int:
        return len(self._keys)

    def record(self, ns: bytes, keys: Iterable[bytes]) -> None:
        """``keys`` of ``ns`` were deleted now (whether this node held them or not)."""
        now = self.clock()
        ks = self._keys
        pop = ks.pop
        names = [] if self.history is not None else None
        n = 0
        for k in keys:
            ns_key = (ns, k if type(k) is bytes else bytes(k))
            pop(ns_key, None)  # a key deleted again moves to the newest end
            ks[ns_key] = now
            if names is not None:
                names.append(ns_key[1])
            n += 1
        if names:
            self.history.add_many(ns, names, now)
        self.counters["recorded"] += n
        # (the oldest key first: most deletes find nothing to trim and stop at one look)
        if (ks and (len(ks) > self.max_keys or next(iter(ks.values())) <= now - self.window)
                or self._namespaces):
            self._trim(now)

    def record_namespace(self, ns: bytes | None) -> None:
        """Every key of ``ns`` (None: of every namespace) was deleted now."""
        now = self._namespaces[ns] = self.clock()
        if self.history is not None:
            self.history.add_namespace(ns, now)

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
        if at <= since and self.history is not None:  # older: the history's (coarser) time
            at = self.history.deleted_at(ns, key, now)
            since = now - self.history.horizon
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
        counters (metrics: kvstored_delete_fence_*, kvstored_delete_history_*). Changes
        nothing: safe from any thread."""
        h = self.history
        return {"keys": len(self._keys), **self.counters,
                **({} if h is None else {"history_" + k: v for k, v in h.stats().items()})}


def fingerprint(ns: bytes, key: bytes) -> int:
    """A (namespace, key)'s 64-bit fingerprint, never 0 (an empty slot). Namespaces hold
    no NUL byte, so ns + NUL + key names one pair."""
    return xxhash.xxh3_64_intdigest(ns + b"\0" + key) or 1


TICK_S = 0.1  # the history's time unit: a delete's time is rounded down to it
_MAGIC, _VERSION = b"KVDH", 2  # a saved history (DeleteHistory.save); 2: its generation
_FILE_HEAD_V1 = struct.Struct("<4sIdII")  # (read still: generation 0)
_FILE_HEAD = struct.Struct("<4sIdIIQ")
# the journal of deletes since a snapshot (DeleteHistory.journal, cluster/history.py): a
# head (magic, version, generation), then one record per delete call: JOURNAL_RECORD
# (kind, count or name length, wall-clock time), its body (the keys' fingerprints, or
# the namespace's name), the xxh3-64 of both
_JOURNAL_MAGIC, _JOURNAL_VERSION = b"KVDJ", 1
JOURNAL_HEAD = struct.Struct("<4sIQ")
_JOURNAL_RECORD = struct.Struct("<BxxxId")
_J_KEYS, _J_NAMESPACE, _J_EVERY_NAMESPACE = 1, 2, 3
_CHECKSUM = struct.Struct("<Q")
_TABLE_HEAD = struct.Struct("<IIIddd")
_NS_HEAD = struct.Struct("<Bd")
HISTORY_TABLES = 8  # the horizon is spread over this many tables' time spans
MAX_TABLES = 32  # at most this many tables (a lookup looks in each, newest first)
MIN_TABLE = 1024  # slots of the smallest table


class _Table:
    """An open-addressing hash table fingerprint -> delete time (ticks since ``base``),
    at most half full: 12 bytes a slot, 24 per entry when full. Linear probing; never
    deletes (the history drops whole tables)."""

    __slots__ = ("fps", "ats", "mask", "n", "limit", "opened", "last", "base")

    def __init__(self, slots: int, limit: int, opened: float):
        self.fps = array("Q", bytes(8 * slots))
        self.ats = array("I", bytes(4 * slots))
        self.mask = slots - 1
        self.n = 0
        self.limit = min(limit, slots // 2)
        self.opened = self.last = self.base = opened  # first and newest entry, tick 0

    def nbytes(self) -> int:
        return (self.mask + 1) * 12


class DeleteHistory:
    """Which keys were deleted here over the last ``horizon`` seconds, at most ``max_keys``
    of them: (fingerprint, time) pairs in hash tables, each filled for ``horizon /
    (HISTORY_TABLES - 1)`` seconds or until full, then the next one opened. The oldest
    table is dropped whole when its newest delete is past the horizon, or early when the
    tables hold ``max_keys`` (deletes faster than that per horizon) or there are
    MAX_TABLES: ``overflowed`` counts the keys forgotten early, ``floor`` is the newest of
    them.

    Times are ticks of ``TICK_S`` rounded down, on this node's monotonic clock: an age
    read from it is at most one tick too long, which makes a delete look older, never
    newer, than it was (a record written just before it may be kept; one written after
    it is never taken for a leftover). A fingerprint shared by two keys (64 bits: a
    lookup finds a wrong one with odds of about keys remembered / 2^64) makes the other
    key look deleted.

    Memory follows the delete rate: a table is sized for twice what the previous one took
    in (MIN_TABLE slots at least, ``max_keys / HISTORY_TABLES`` entries at most), 24
    bytes per entry when full, 12-48 in between."""

    def __init__(self, horizon: float = 86400.0, max_keys: int = 2_000_000,
                 clock: Callable[[], float] = time.monotonic):
        if not horizon > 0 or max_keys < 1:
            raise ValueError("a delete history needs a horizon > 0 and max_keys >= 1")
        self.horizon = float(horizon)
        self.max_keys = max_keys
        self.clock = clock
        self.span = self.horizon / (HISTORY_TABLES - 1)
        self.per_table = max(MIN_TABLE // 2, -(-max_keys // HISTORY_TABLES))
        self._tables: list[_Table] = []  # oldest first; the last one takes new deletes
        self._namespaces: dict[bytes | None, float] = {}  # DeleteAll: ns (None: all) -> when
        self.total = 0  # keys in the tables
        self.floor = float("-inf")  # newest delete forgotten early (count bound)
        self.counters = {"overflowed": 0, "tables_opened": 0}
        self.path: str | None = None  # the file it is kept in across restarts (cluster/history.py)
        self.changes = 0  # calls that recorded something (cluster/history.py saves when it moved)
        self.saves = None  # cluster/history.py: keeps its writes of the file in order
        # cluster/history.py's Journal: each delete call appended to a file as it is made
        # (``append(bytes)``, on the loop thread), so a crash loses none; None: not kept
        self.journal = None
        self.generation = 0  # of the snapshot loaded (journals before it are in it)

    def add_many(self, ns: bytes, keys: Iterable[bytes], now: float) -> None:
        """Each of ``keys`` (bytes) of ``ns`` was deleted at ``now`` (this history's clock)."""
        self.changes += 1
        prefix = ns + b"\0"
        h = xxhash.xxh3_64_intdigest
        fps = [h(prefix + k) or 1 for k in keys]
        self._insert(fps, now)
        if self.journal is not None:
            body = array("Q", fps).tobytes()
            self.journal.append(_journal_record(_J_KEYS, len(fps), body))

    def _insert(self, new: list[int], now: float) -> None:
        """Fingerprints ``new`` deleted at ``now`` (not before the newest table's tick 0:
        a journal replayed after a wall clock stepped back is put there)."""
        t = self._tables[-1] if self._tables else None
        if t is None or now - t.opened >= self.span:
            t = self._open(now, t)
        fps, ats, mask, tick = t.fps, t.ats, t.mask, max(0, int((now - t.base) / TICK_S))
        for fp in new:
            if t.n >= t.limit:
                t.last = now
                t = self._open(now, t)
                fps, ats, mask, tick = t.fps, t.ats, t.mask, 0
            i = fp & mask
            while True:  # linear probing (inlined: once per deleted key)
                f = fps[i]
                if f == 0:
                    fps[i] = fp
                    t.n += 1
                    self.total += 1
                    break
                if f == fp:
                    break
                i = (i + 1) & mask
            ats[i] = tick
        if now > t.last:
            t.last = now

    def add_namespace(self, ns: bytes | None, now: float) -> None:
        self.changes += 1
        self._add_namespace(ns, now)
        if self.journal is not None:
            self.journal.append(_journal_record(_J_EVERY_NAMESPACE, 0, b"") if ns is None
                                else _journal_record(_J_NAMESPACE, len(ns), ns))

    def _add_namespace(self, ns: bytes | None, now: float) -> None:
        if now <= self._namespaces.get(ns, now - 1):
            return  # (a replayed journal: a later delete of it is known already)
        self._namespaces[ns] = now
        for n in [n for n, at in self._namespaces.items() if at <= now - self.horizon]:
            del self._namespaces[n]

    def deleted_at(self, ns: bytes, key: bytes, now: float | None = None) -> float:
        """When (ns, key), or its namespace, was last deleted here (this history's clock;
        rounded down to a tick), or -inf when not within the horizon."""
        now = self.clock() if now is None else now
        since = now - self.horizon
        at = max(self._namespaces.get(ns, since), self._namespaces.get(None, since))
        fp = fingerprint(ns, key)
        for t in reversed(self._tables):  # newest first: a key deleted again is found there
            if t.last <= since or t.last <= at:
                break  # older tables hold only older deletes
            fps, mask = t.fps, t.mask  # (probing inlined: Heads asks this per absent key)
            i = fp & mask
            while True:
                f = fps[i]
                if f == fp:
                    at = max(at, t.base + t.ats[i] * TICK_S)
                    return at if at > since else float("-inf")
                if f == 0:
                    break
                i = (i + 1) & mask
        return at if at > since else float("-inf")

    def _open(self, now: float, prev: "_Table | None") -> _Table:
        """A new table for deletes from ``now`` on; the oldest ones dropped when expired,
        or (counted as overflowed) when the tables hold max_keys or are MAX_TABLES."""
        want = min(self.per_table, max(MIN_TABLE // 2, 2 * (prev.n if prev is not None else 0)))
        tables = self._tables
        while tables and (tables[0].last <= now - self.horizon or len(tables) >= MAX_TABLES
                          or self.total + want > self.max_keys):
            old = tables.pop(0)
            self.total -= old.n
            if old.last > now - self.horizon:  # forgotten before its horizon
                self.counters["overflowed"] += old.n
                self.floor = max(self.floor, old.last)
        slots = MIN_TABLE
        while slots < 2 * want:
            slots *= 2
        t = _Table(slots, want, now)
        tables.append(t)
        self.counters["tables_opened"] += 1
        return t

    def __len__(self) -> int:
        """Keys remembered (some may be past the horizon until their table is dropped)."""
        return self.total

    # ------------------------------------------------------------ kept across restarts
    # A file: FILE_HEAD (magic, version, wall clock at save, table and namespace counts),
    # per table TABLE_HEAD (slots, entries, limit; ages at save of its first and newest
    # entry and of tick 0) then its fingerprints and ticks (native order: the file stays on
    # its host), per namespace NS_HEAD (length, 255 = every namespace; age) and its bytes;
    # then the xxh3-64 of all that. Ages, not times: a monotonic clock restarts with the
    # process. On load each age grows by the wall-clock time the node was down (never
    # less than 0), so a delete can only look older after a restart, never newer.

    def save(self, path: str) -> int:
        """Write the history to ``path`` (a temporary file renamed over it); its size."""
        return self.write(path, self.snapshot())

    def snapshot(self, generation: int = 0) -> list[bytes]:
        """The file's contents as of now, but its checksum (on the loop thread: a copy of
        the tables, 48 MiB at 2,000,000 deletes; ``write`` may then run anywhere).
        ``generation``: the first journal not in it (cluster/history.py)."""
        now = self.clock()
        parts = [b""]
        for t in self._tables:
            parts += [_TABLE_HEAD.pack(t.mask + 1, t.n, t.limit, now - t.opened, now - t.last,
                                       now - t.base), t.fps.tobytes(), t.ats.tobytes()]
        for ns, at in self._namespaces.items():
            name = b"" if ns is None else ns
            parts += [_NS_HEAD.pack(255 if ns is None else len(name), now - at), name]
        parts[0] = _FILE_HEAD.pack(_MAGIC, _VERSION if sys.byteorder == "little" else 0,
                                   time.time(), len(self._tables), len(self._namespaces),
                                   generation)
        return parts

    @staticmethod
    def write(path: str, parts: list[bytes]) -> int:
        """Write a ``snapshot`` to ``path`` with its checksum, fsynced, through a
        temporary file renamed over it; its size."""
        h = xxhash.xxh3_64()
        for p in parts:
            h.update(p)
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as f:
            for p in parts:
                f.write(p)
            f.write(struct.pack("<Q", h.intdigest()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        sync_dir(path)  # the rename too: the journals it replaces are removed after it
        return sum(len(p) for p in parts) + 8

    def load(self, path: str) -> int:
        """Add what ``save`` wrote to ``path`` (tables older than the horizon skipped);
        the deletes read. ValueError when the file is not a whole history of this
        format; OSError when it cannot be read."""
        with open(path, "rb") as f:
            data = f.read()
        if len(data) < _FILE_HEAD_V1.size + 8 or xxhash.xxh3_64_intdigest(data[:-8]) != \
                struct.unpack_from("<Q", data, len(data) - 8)[0]:
            raise ValueError("not a whole delete history (truncated, or its checksum differs)")
        magic, version = struct.unpack_from("<4sI", data)
        if magic != _MAGIC or version not in (1, _VERSION) or sys.byteorder != "little":
            raise ValueError(f"not a delete history of this version ({magic!r}, {version})")
        if version == 1:  # (session 13's: no journals)
            _m, _v, saved_wall, n_tables, n_ns = _FILE_HEAD_V1.unpack_from(data)
            pos, generation = _FILE_HEAD_V1.size, 0
        else:
            if len(data) < _FILE_HEAD.size + 8:
                raise ValueError("not a whole delete history (its head is cut short)")
            _m, _v, saved_wall, n_tables, n_ns, generation = _FILE_HEAD.unpack_from(data)
            pos = _FILE_HEAD.size
        now = self.clock()
        down = max(0.0, time.time() - saved_wall)  # wall time since the save (0 if stepped back)
        read = 0
        tables = []
        for _ in range(n_tables):
            slots, n, limit, opened, last, base = _TABLE_HEAD.unpack_from(data, pos)
            pos += _TABLE_HEAD.size
            if slots < MIN_TABLE or slots & (slots - 1) or not n <= limit <= slots // 2:
                raise ValueError(f"a table of {slots} slots, {n} entries, limit {limit}")
            t = _Table.__new__(_Table)
            t.fps = array("Q", data[pos:pos + 8 * slots])
            t.ats = array("I", data[pos + 8 * slots:pos + 12 * slots])
            pos += 12 * slots
            t.mask, t.n, t.limit = slots - 1, n, limit
            t.opened, t.last, t.base = now - opened - down, now - last - down, now - base - down
            if t.last > now - self.horizon:
                tables.append(t)
                read += n
        for _ in range(n_ns):
            length, age = _NS_HEAD.unpack_from(data, pos)
            pos += _NS_HEAD.size
            name = None if length == 255 else data[pos:pos + length]
            pos += 0 if name is None else length
            if now - age - down > now - self.horizon:
                self._namespaces[name] = max(self._namespaces.get(name, -1e300), now - age - down)
        if pos != len(data) - 8:
            raise ValueError("a delete history with bytes left over")
        self.generation = generation
        # older than what this process recorded meanwhile (nothing, when loaded at start)
        self._tables[:0] = tables
        self.total += read
        while len(self._tables) > MAX_TABLES or self.total > self.max_keys:
            old = self._tables.pop(0)
            self.total -= old.n
        return read

    def replay(self, data: bytes) -> tuple[int, int, bool]:
        """Add the deletes of a journal file's contents: (its generation, the deletes
        read, whether it ended with a whole record). Reading stops at the first record
        that is cut short or does not verify (the tail a crash left: nothing after it is
        trusted); deletes past the horizon are skipped. A record's age is the wall-clock
        time since it was written (never below 0), as a snapshot's ages grow on load.
        ValueError when the head is not a journal's of this version."""
        if len(data) < JOURNAL_HEAD.size:
            raise ValueError("a delete journal without its head")
        magic, version, generation = JOURNAL_HEAD.unpack_from(data)
        if magic != _JOURNAL_MAGIC or version != _JOURNAL_VERSION or sys.byteorder != "little":
            raise ValueError(f"not a delete journal of this version ({magic!r}, {version})")
        now, wall, since = self.clock(), time.time(), self.clock() - self.horizon
        pos, read, rec, end = JOURNAL_HEAD.size, 0, _JOURNAL_RECORD.size, len(data)
        while pos + rec + 8 <= end:
            kind, count, written = _JOURNAL_RECORD.unpack_from(data, pos)
            size = 8 * count if kind == _J_KEYS else count if kind == _J_NAMESPACE else 0
            stop = pos + rec + size
            if (kind not in (_J_KEYS, _J_NAMESPACE, _J_EVERY_NAMESPACE) or stop + 8 > end
                    or _CHECKSUM.unpack_from(data, stop)[0]
                    != xxhash.xxh3_64_intdigest(memoryview(data)[pos:stop])):
                break
            at = now - max(0.0, wall - written)
            if at > since:
                if kind == _J_KEYS:
                    self._insert(array("Q", data[pos + rec:stop]), at)
                else:
                    self._add_namespace(data[pos + rec:stop] if kind == _J_NAMESPACE else None, at)
                read += count if kind == _J_KEYS else 1
            pos = stop + 8
        return generation, read, pos == end

    def stats(self) -> dict:
        return {"keys": self.total, "bytes": sum(t.nbytes() for t in self._tables),
                "tables": len(self._tables), **self.counters}


def journal_head(generation: int) -> bytes:
    """The first bytes of the journal of ``generation`` (cluster/history.py)."""
    return JOURNAL_HEAD.pack(_JOURNAL_MAGIC, _JOURNAL_VERSION, generation)


def _journal_record(kind: int, count: int, body: bytes) -> bytes:
    rec = _JOURNAL_RECORD.pack(kind, count, time.time()) + body
    return rec + _CHECKSUM.pack(xxhash.xxh3_64_intdigest(rec))


def sync_dir(path: str) -> None:
    """fsync the directory holding ``path`` (a rename or a new file in it outlives a
    power loss); failures ignored (some file systems refuse it)."""
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
