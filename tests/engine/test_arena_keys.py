"""Keys of DRAM-resident objects in the arena's key areas (dram.key_area_bytes).

With the packed index a committed DRAM object's key is written into its slot's key
record and leaves daemon RAM; the index's key loader reads it back for walks, events,
repair and eviction. A same-host client maps the arena read-write, so a record may be
rewritten behind the daemon's back: that must only make that object's key refused
(it misses, and is left out of listings), never serve or name another object, never
break a walk or eviction. These tests write to the arena through a second mapping of
its memfd, as a shm client does. Every test runs with both indexes (conftest); the
dict one keeps every key in RAM and leaves the records unused.
"""
from __future__ import annotations

import asyncio
import mmap

import pytest

from kvstore.errors import Conflict, NotFound
from kvstore.wire import checksum
from kvstored.config import ConfigError, load_config
from kvstored.engine import Store, StoreLimits
from kvstored.engine.arena import Arena, size_classes
from kvstored.engine.entries import DEAD
from kvstored.engine.nvme import NvmeDevice, NvmeTier
from test_store import read  # (DRAM-resident objects, through a read reference)

KiB, MiB = 1 << 10, 1 << 20
NS = b"ns"
W = 40  # the default record width


def make_store(dram: int = 4 * MiB, nvme_path=None, **kw) -> Store:
    limits = StoreLimits(dram_size=dram, slab_size=MiB, max_value_size=MiB, prefault=False,
                         hugepages=False, put_wait_timeout=1.0, **kw)
    nvme = None
    if nvme_path is not None:
        nvme = NvmeTier(NvmeDevice(str(nvme_path), MiB + 4 * 16 * MiB, 16 * MiB, "threads", 32))
    return Store(limits, nvme=nvme)


def key(i: int) -> bytes:
    return b"%032d" % i  # a 32-byte key, as a sha256 chunk hash


def val(i: int, size: int = 4 * KiB) -> bytes:
    return bytes([i % 251]) * size


class Client:
    """The arena as a same-host client maps it: its own read-write mapping of the memfd."""

    def __init__(self, s: Store):
        self.s = s
        self.m = mmap.mmap(s.arena.fd, s.arena.size, mmap.MAP_SHARED,
                           mmap.PROT_READ | mmap.PROT_WRITE)

    def record(self, k: bytes) -> int:
        """Where the key record of ``k``'s slot is (computed as the arena lays it out)."""
        e = self.s.index.get(NS, k)
        a, off, sc = self.s.arena, e.offset, e.sc
        slab = off - off % a.slab_size
        assert sc.key_base, "its class has a key area"
        return slab + sc.key_base + (off - slab) // sc.slot_size * a.key_width

    def write(self, k: bytes, raw: bytes) -> None:
        at = self.record(k)
        self.m[at:at + len(raw)] = raw

    def close(self) -> None:
        self.m.close()


class Events:
    def __init__(self):
        self.stored_keys: list[bytes] = []
        self.removed_keys: list[bytes] = []

    def stored(self, e) -> None:
        self.stored_keys.append(e.key)

    def removed(self, e) -> None:
        self.removed_keys.append(e.key)

    def looked_up(self, ns, asked, hits, hit_bytes) -> None:
        pass


async def put_through(s: Store, ids) -> None:
    """Puts object i of ``ids`` (4 KiB each) with reserve_wait -> fill -> commit, letting
    the loop run every 50 puts so demotions keep up."""
    for i in ids:
        res = await s.reserve_wait(NS, key(i), 4 * KiB, checksum(val(i)))
        res.view[:] = val(i)
        s.commit(res)
        if i % 50 == 0:
            await asyncio.sleep(0)


def in_ram(s: Store, k: bytes) -> bool:
    return s.index.get(NS, k).key_in_ram


# ------------------------------------------------------------------ layout
def test_key_areas_sit_after_the_slots_and_leave_slot_alignment_alone():
    a = Arena(8 * MiB, MiB, hugepages=False, key_width=W)
    try:
        keyed = 0
        for sc in a.classes:
            assert sc.slots_per_slab >= 1
            full = MiB // sc.slot_size
            if sc.key_base:
                keyed += 1
                # the records end the slab; the slots end before them
                assert sc.key_base + sc.slots_per_slab * W == MiB
                assert sc.slots_per_slab * sc.slot_size <= sc.key_base
                # costs at most twice the keys' own bytes
                assert (full - sc.slots_per_slab) * sc.slot_size <= 2 * sc.slots_per_slab * W
            else:
                assert sc.slots_per_slab == full
        assert keyed >= len(a.classes) // 2
        # slots are where they were: filling a slab of a keyed class never reaches its keys
        sc = a.class_for(4 * KiB)
        offs = [a.alloc(sc) for _ in range(sc.slots_per_slab)]
        assert all(o % 4096 == 0 for o in offs)
        slab = a.slab_of(offs[0])
        assert max(offs) + sc.slot_size <= slab.base + sc.key_base
        assert all(a.slab_of(o) is slab for o in offs)
        assert a.alloc(sc) is not None and a.slab_of(offs[-1]) is slab  # a second slab
    finally:
        a.close()
    plain = Arena(8 * MiB, MiB, hugepages=False)  # key_width 0: the arena as it was
    try:
        assert all(not c.key_base and c.slots_per_slab == MiB // c.slot_size for c in plain.classes)
    finally:
        plain.close()
    assert len(size_classes(MiB)) == len(plain.classes)


@pytest.mark.parametrize("bad", [8, 12, 41, 144, -8, 1 << 40, "40", 40.0, True, None])
def test_bad_key_area_widths_are_typed_errors(bad):
    with pytest.raises(ValueError, match="key area width"):
        Arena(4 * MiB, MiB, hugepages=False, key_width=bad)
    with pytest.raises(ValueError):
        make_store(key_area_bytes=bad)


@pytest.mark.parametrize("bad, message", [
    (12, "dram.key_area_bytes: must be 0 (keys stay in RAM) or a multiple of 8 from 16 to 136, got 12"),
    (4096, "got 4096"),
    (-40, "got -40"),
])
def test_bad_key_area_settings_name_the_setting(bad, message):
    with pytest.raises(ConfigError) as ei:
        load_config(None, {"key_area_bytes": bad})
    assert message in str(ei.value)


def test_a_key_area_setting_of_the_wrong_type_is_refused(tmp_path):
    p = tmp_path / "k.toml"
    p.write_text('[dram]\nkey_area_bytes = "forty"\n')
    with pytest.raises(ConfigError, match="key_area_bytes"):
        load_config(p)
    assert load_config(None, {"key_area_bytes": 0}).key_area_bytes == 0


# ------------------------------------------------------------- put and list
def test_dram_keys_leave_ram_and_every_walk_reads_them_back(index_kind):
    async def run():
        s = make_store()
        ev = Events()
        s.observer = ev
        try:
            short = [key(i) for i in range(40)]
            for i, k in enumerate(short[:20]):  # put_bytes (TCP bodies, control-plane puts)
                assert s.put_bytes(NS, k, val(i))
            for i, k in enumerate(short[20:], 20):  # reserve -> fill -> commit (shm, TCP)
                res = s.reserve(NS, k, 4 * KiB, None)
                res.view[:] = val(i)
                assert s.commit(res)
            long_key = b"L" * W  # a record holds W - 1 key bytes: stays in RAM
            big_key = b"big"  # its class (1 MiB slots in 1 MiB slabs) has no key area
            s.put_bytes(NS, long_key, val(1))
            s.put_bytes(NS, big_key, val(2, MiB))
            packed = index_kind == "packed"
            assert [in_ram(s, k) for k in short] == [not packed] * 40
            assert in_ram(s, long_key) and in_ram(s, big_key)
            everything = set(short) | {long_key, big_key}
            assert sorted(k for _, k in s.keys()) == sorted(everything)
            assert sorted(k for _, k in await s.keys_async()) == sorted(everything)
            assert {k for _, k in await s.sample_keys(NS, 100)} == everything
            assert {r[1] for r in await s.repair_snapshot()} == everything
            assert sorted(ev.stored_keys) == sorted(everything)
            for i, k in enumerate(short):
                assert read(s, k) == val(i)
            assert s.delete(NS, short[:5]) == 5
            assert ev.removed_keys == short[:5]
            assert s.exists(NS, short[:6]) == [False] * 5 + [True]
            assert len(s.keys()) == len(everything) - 5
        finally:
            s.close()
    asyncio.run(run())


def test_evictions_name_the_right_keys_and_reused_slots_never_name_old_objects(index_kind):
    """No NVMe: an eviction drops objects and reuses their slots. The policy's ghost and the
    KV event read the victim's key from its record; a view of an evicted object kept past
    its slot's reuse is refused its key (another's is in the record), never given it."""
    s = make_store(dram=MiB)
    ev = Events()
    s.observer = ev
    try:
        sc = s.arena.class_for(4 * KiB)
        n = sc.slots_per_slab
        for i in range(n):
            s.put_bytes(NS, key(i), val(i))
        first = s.index.get(NS, key(0))  # the oldest: the next victim
        assert s.put_bytes(NS, key(n), val(n))  # evicts key(0), takes its slot
        assert first.state == DEAD and s.index.get(NS, key(0)) is None
        newest = s.index.get(NS, key(n))
        assert newest.offset == first.offset
        assert ev.removed_keys == [key(0)]
        if index_kind == "packed":
            with pytest.raises(LookupError):
                first.key  # its record now holds key(n): refused, not returned
        assert newest.key == key(n) and read(s, key(n)) == val(n)
        for i in range(n + 1, n + 40):  # more evictions (the KV events read records)
            s.put_bytes(NS, key(i), val(i))
        assert len(ev.removed_keys) == 40 and len(set(ev.removed_keys)) == 40
        assert sorted(ev.removed_keys) == sorted(key(i) for i in range(40))
        assert sorted(k for _, k in s.keys()) == sorted(key(i) for i in range(40, n + 40))
        # an evicted key put again soon is a ghost hit
        hits = s.policy.counters["ghost_hits"]
        s.put_bytes(NS, key(39), val(39))
        assert s.policy.counters["ghost_hits"] == hits + 1
    finally:
        s.close()


# ------------------------------------------------- a client rewrites records
def test_a_rewritten_key_record_costs_only_its_object(index_kind):
    if index_kind == "dict":
        pytest.skip("the dict index keeps every key in RAM: the records are unused")
    async def run():
        s = make_store(dram=MiB)
        ev = Events()
        s.observer = ev
        c = Client(s)
        try:
            n = 30
            for i in range(n):
                s.put_bytes(NS, key(i), val(i))
            c.write(key(3), b"\x20" + key(5))  # another stored key
            c.write(key(4), b"\x20" + b"\xff" * 32)  # garbage
            c.write(key(6), b"\xff")  # a length past the record
            c.write(key(7), b"\x00")  # an empty key
            bad = {key(3), key(4), key(6), key(7)}
            for k in bad:  # refused: a miss, never another object
                with pytest.raises(NotFound):
                    s.acquire(NS, k)
                with pytest.raises(LookupError):
                    s.index.get(NS, k).key
            assert read(s, key(5)) == val(5)  # the object named in key(3)'s record: its own
            good = [key(i) for i in range(n) if key(i) not in bad]
            for k in good:
                assert read(s, k) == val(int(k))
            listed = [k for _, k in s.keys()]
            assert sorted(listed) == sorted(good)  # key(5) once: the rewritten one left out
            assert sorted(k for _, k in await s.keys_async()) == sorted(good)
            assert sorted(r[1] for r in await s.repair_snapshot()) == sorted(good)
            # a delete by the real key still finds and removes it (its fingerprint)
            assert s.delete(NS, [key(3)]) == 1 and s.index.get(NS, key(3)) is None
            assert ev.removed_keys == [key(3)]
            # evicting the others (no NVMe: dropped) never stops on them: every put goes in
            sc = s.arena.class_for(4 * KiB)
            for i in range(n, n + sc.slots_per_slab):
                assert s.put_bytes(NS, key(i), val(i))
            assert all(s.index.get(NS, k) is None for k in bad)
            assert bad.isdisjoint(k for _, k in s.keys())
            # their unreadable records did not keep them out of the ghost (its digests are
            # the records' fingerprints): put again, each is admitted protected
            evicted = bad - {key(3)}
            assert all(s.policy.in_ghost(NS, k) is not None for k in evicted)
            hits = s.policy.counters["ghost_hits"]
            for k in sorted(evicted):
                assert s.put_bytes(NS, k, val(int(k)))
                assert read(s, k) == val(int(k))
            assert s.policy.counters["ghost_hits"] == hits + len(evicted)
            # the unreadable ones left no KV event (none could name them); the rest did
            assert not (bad - {key(3)}) & set(ev.removed_keys)
            assert len(set(ev.removed_keys)) == len(ev.removed_keys)
        finally:
            c.close()
            s.close()
    asyncio.run(run())


def test_a_fingerprint_twin_of_a_dram_key_is_a_miss(index_kind):
    """With 4-bit fingerprints an absent key of the same length often matches a keyless
    DRAM record by fingerprint: the get compares the record's key and misses."""
    if index_kind == "dict":
        pytest.skip("the dict index compares whole keys: no fingerprint to collide")
    s = make_store()
    try:
        s.index.set_fingerprint_bits(4)  # test hook: collisions made common
        stored = {}
        for i in range(200):
            k = b"k%03d" % i
            fp = s.index.key_hash(NS, k) if stored else None
            if fp is None or fp not in stored:
                s.put_bytes(NS, k, val(i))
                stored[s.index.key_hash(NS, k)] = (k, i)
            if len(stored) == 16:
                break
        assert all(not in_ram(s, k) for k, _ in stored.values())
        misses = 0
        for i in range(200, 400):
            k = b"k%03d" % i
            twin = stored[s.index.key_hash(NS, k)]
            assert s.index.get(NS, k) is s.index.get(NS, twin[0])  # found by fingerprint
            with pytest.raises(NotFound):
                s.acquire(NS, k)
            misses += 1
            assert read(s, twin[0]) == val(twin[1])
        assert misses == 200
    finally:
        s.close()


# --------------------------------------------------------------- NVMe tier
def test_keys_follow_objects_through_demotion_and_promotion(tmp_path, index_kind):
    async def run():
        s = make_store(dram=2 * MiB, nvme_path=tmp_path / "t.dat")
        c = Client(s) if index_kind == "packed" else None
        try:
            n = 700  # 4 KiB each: ~2.8 MiB through 2 MiB of DRAM
            await put_through(s, range(n))
            await s.drain_tasks(10)
            cold = [e for e in s.index.iterate() if e.offset < 0]
            warm = [e for e in s.index.iterate() if e.offset >= 0]
            assert cold and warm
            packed = index_kind == "packed"
            assert all(e.key_in_ram != packed for e in cold + warm)
            assert sorted(k for _, k in s.keys()) == [key(i) for i in range(n)]
            assert sorted(k for _, k in await s.keys_async()) == [key(i) for i in range(n)]
            # a promoted object's key goes back to its new slot's record
            k0 = cold[0].key
            i0 = int(k0)
            e = await s.acquire_async(NS, k0)
            try:
                assert bytes(s.view(e)) == val(i0) and e.offset >= 0
                assert e.key_in_ram != packed and e.key == k0
            finally:
                s.release(e)
            if c is None:
                return
            # written to NVMe and still resident: a rewritten record falls back to the header
            await s.flush_to_nvme(10)
            both = next(e for e in s.index.iterate() if e.offset >= 0 and e.nvme is not None)
            kb = both.key
            c.write(kb, b"\x20" + b"\x00" * 32)
            assert both.key == kb
            assert kb in {k for _, k in await s.keys_async()}
            # a DRAM-only one whose record is rewritten cannot be demoted (no key for its
            # record): it is dropped when evicted, and the rest are demoted as usual
            fresh = key(n + 100)
            s.put_bytes(NS, fresh, val(n + 100))
            c.write(fresh, b"\x20" + b"\x11" * 32)
            await put_through(s, range(n + 101, n + 700))
            await s.drain_tasks(10)
            assert s.index.get(NS, fresh) is None  # dropped at its eviction, nothing raised
            assert s.nvme.counters["demotion_failures"] == 0
            assert read(s, key(n + 699)) == val(n + 699)
            got = await s.acquire_async(NS, key(n + 101))
            s.release(got)
        finally:
            await s.drain_tasks(10)
            if c is not None:
                c.close()
            s.close()
    asyncio.run(run())


# ------------------------------------------------------------- concurrency
def test_racing_puts_of_one_key_and_a_walk_during_puts_and_evictions(index_kind):
    async def run():
        s = make_store(dram=MiB)
        try:
            # two reservations of one key, committed in turn: the second dedups (same
            # bytes), conflicts (other bytes), or with overwrite replaces the first
            a = s.reserve(NS, b"race", 4 * KiB, checksum(val(1)))
            b = s.reserve(NS, b"race", 4 * KiB, checksum(val(1)))
            a.view[:] = val(1)
            b.view[:] = val(1)
            assert s.commit(a) and not s.commit(b)
            c = s.reserve(NS, b"race", 4 * KiB, checksum(val(2)), overwrite=True)
            d = s.reserve(NS, b"race2", 4 * KiB, checksum(val(3)))
            e2 = s.reserve(NS, b"race2", 4 * KiB, checksum(val(4)))
            c.view[:] = val(2)
            d.view[:] = val(3)
            e2.view[:] = val(4)
            assert s.commit(c) and s.commit(d)
            with pytest.raises(Conflict):
                s.commit(e2)
            assert read(s, b"race") == val(2) and read(s, b"race2") == val(3)
            assert sorted(k for _, k in s.keys()) == [b"race", b"race2"]

            # a walk over the index while another task puts (every put evicting one)
            put_keys = [key(i) for i in range(1200)]

            async def writer():
                for i, k in enumerate(put_keys):
                    s.put_bytes(NS, k, val(i))
                    if i % 16 == 0:
                        await asyncio.sleep(0)

            w = asyncio.ensure_future(writer())
            walks = 0
            while not w.done() and walks < 500:
                listed = [k for _, k in await s.keys_async()]
                rows = await s.repair_snapshot()
                assert len(listed) == len(set(listed))
                assert set(listed) <= set(put_keys) | {b"race", b"race2"}
                assert {r[1] for r in rows} <= set(put_keys) | {b"race", b"race2"}
                walks += 1
            await w
            assert walks >= 2
            held = {k for _, k in s.keys()}
            assert len(held) == len(s.index) and held <= set(put_keys) | {b"race", b"race2"}
            for k in held:
                i = put_keys.index(k) if k in put_keys else None
                if i is not None:
                    assert read(s, k) == val(i)
        finally:
            s.close()
    asyncio.run(run())


def test_a_reclaimed_region_leaves_resident_objects_keys_where_they_are(tmp_path, index_kind):
    """Objects with a DRAM copy and an NVMe copy, pinned in DRAM, whose region the tier
    reclaims: they lose the NVMe copy only; their keys stay out of RAM (in their slots'
    records) and read back right."""
    async def run():
        s = make_store(dram=40 * MiB, nvme_path=tmp_path / "t.dat")
        try:
            hot = [key(i) for i in range(4200)]  # more than a region of 4 KiB records
            for i, k in enumerate(hot):
                s.put_bytes(NS, k, val(i))
            await s.flush_to_nvme(10)  # each gets an NVMe copy and keeps its DRAM one
            assert all(s.index.get(NS, k).nvme is not None for k in hot)
            assert s.pin(NS, hot, 600) == len(hot)  # never evicted from DRAM meanwhile
            for i in range(5000, 5100):  # 1 MiB objects through 4 x 16 MiB regions
                res = await s.reserve_wait(NS, key(i), MiB, checksum(val(i, MiB)))
                res.view[:] = val(i, MiB)
                s.commit(res)
                await asyncio.sleep(0)
                if s.index.get(NS, hot[0]).nvme is None:
                    break
            await s.drain_tasks(10)
            assert s.nvme.counters["regions_reclaimed"] >= 1
            packed = index_kind == "packed"
            gone = 0
            for i, k in enumerate(hot):
                e = s.index.get(NS, k)
                gone += e.nvme is None
                assert e.offset >= 0
                assert e.key_in_ram != packed and e.key == k
                assert read(s, k) == val(i)
            assert gone >= 1000  # (a region's worth lost their NVMe copy)
            assert set(hot) <= {k for _, k in s.keys()}
        finally:
            await s.drain_tasks(10)
            s.close()
    asyncio.run(run())
