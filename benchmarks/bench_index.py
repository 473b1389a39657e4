"""Bytes of daemon RAM per object held by the Store's index (issue 13).

Builds an in-process Store with a DRAM arena large enough for every object (no
eviction, so the ghost stays empty), puts N small objects through the public API
(``put_bytes``: reserve -> fill -> commit) and reports the growth of the process's
RssAnon per object. The arena is a memfd (shared memory: RssShmem), so RssAnon is
the Python heap: entries, keys, the index's dicts, the eviction links.

Each put gets its own namespace bytes object, as a request decoded off the wire
does, so the figure includes whatever the Store does (or does not) to share them.

    .venv/bin/python benchmarks/bench_index.py --objects 1000000
    .venv/bin/python benchmarks/bench_index.py --objects 1000000 --breakdown
    .venv/bin/python benchmarks/bench_index.py --objects 1000000 --resident 500000
    .venv/bin/python benchmarks/bench_index.py --objects 1000000 --index packed --breakdown
    .venv/bin/python benchmarks/bench_index.py --objects 4000000 --keyless --breakdown

``--index`` picks the Store's index (dram.index: dict, packed or auto); with
``packed`` the breakdown is the native index's own accounting (records, hash
table, key pools, slot map) beside the RssAnon slope.

``--keyless`` measures the packed index alone (no Store, no arena): N NVMe-only objects
indexed as recovery does, ``add(..., keyless=True)`` with packed Locations after
``use_nvme_geometry`` (64 MiB regions, 4 KiB records), so each costs its base record
and its table slot: the state of an object that is on NVMe only once the Store sheds
its key (``Index.shed_key``).

``--dram-keyless`` measures the packed index alone with N DRAM-resident objects as the
Store holds them once their keys live in the arena's key area: each inserted with its
DRAM offset (a 256 B slot in 64 MiB slabs), placed in the slot map, linked in the
eviction lists (NativePolicy.insert) and its key shed (``shed_key(e, dram=True)``), so
each costs its record, its table slot and its slot-map slot. ``--nvme-too``: each also
has a copy on NVMe (promoted and not evicted since), whose location the record's union
has no room for: it goes to the aside table.

    .venv/bin/python benchmarks/bench_index.py --objects 4000000 --dram-keyless --breakdown

``--resident`` makes the arena hold fewer objects than are put: the rest go through
eviction and the policy's ghost (one 64-bit digest per evicted key, up to as many as
are resident) shows in the figure. ``--ghost`` picks it: ``native``
(kvstored._index.Ghost: a ring of digests and a u32 probe table) or ``dict`` (the
Python dict it replaced, what a node without the extension runs); the line "ghost"
gives its own bytes per evicted key (native: what it allocated; dict: the dict plus
32 B per int), the RssAnon slope the whole difference.

    .venv/bin/python benchmarks/bench_index.py --objects 1000000 --resident 524288 --index packed --ghost dict

``--breakdown`` also prints sys.getsizeof of one entry's parts (what the RssAnon
slope is made of). Memory: about (bytes/object + object size) x N, e.g. ~0.6 GB
for 1 M x 256 B objects today.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

from kvstored.engine.eviction import make_ghost
from kvstored.engine.store import Store, StoreLimits
from kvstored.settings import default

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peers import rss_anon  # noqa: E402




def key_of(i: int) -> bytes:
    # a 32-byte key, like a chunk hash (LMCache / SGLang keys are hashes of this size)
    return i.to_bytes(8, "little") * 4


def _block(n: int) -> int:
    return (n + 15) // 16 * 16  # pymalloc hands out 16-byte multiples (64-bit CPython 3.11)


def packed_breakdown(ix, n: int) -> list[tuple[str, float]]:
    """Bytes per object of the packed index by part (its own accounting: what it
    allocated and wrote; the capacity beyond that is virtual until touched)."""
    fp = ix.footprint()
    return [(f"records ({fp['record_size']} B each)", fp["records"] / n),
            (f"keyed: DRAM forms ({fp['dram_part_size']} B each)", fp["dram_parts"] / n),
            ("hash table (4 B slots, grown at 3/4)", fp["table"] / n),
            ("keyed: keys (rounded to 8 B)", fp["keys"] / n),
            ("slot map (u32 per DRAM slot)", fp["slot_map"] / n),
            ("side tables (readers, NVMe aside)",
             (fp.get("refs_table", 0) + fp.get("aside_table", 0)) / n)]  # (none before session 18)



def report_index_alone(ix, a, names, n: int, grown: int, rows: int | None = None) -> None:
    """What the index-alone modes print after their first line: RSS per object, probes,
    then gets and the breakdown (its first ``rows`` rows) when asked."""
    print(f"RssAnon grew {grown / 2**20:.1f} MiB: {grown / n:.1f} bytes/object held")
    longest, hit, miss = ix.probes()
    print(f"probes: longest {longest}, mean hit {hit:.2f}, mean miss {miss:.2f} slots "
          f"(table load {n / (ix.footprint()['table'] / 4):.2f})")
    if a.gets:
        index_gets(ix, a, names)
    if a.breakdown:
        print_rows(packed_breakdown(ix, n)[:rows])

def index_gets(ix, a, names) -> None:
    """--gets with an index-alone mode: hits spread over the keys added, then misses."""
    step = max(1, a.objects // a.gets) | 1
    got = 0
    t0 = time.perf_counter()
    for i in range(a.gets):
        j = (i * step) % a.objects
        got += ix.get(names[j % a.namespaces][:-1], key_of(j)) is not None
    dt = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(a.gets):
        ix.get(names[0][:-1], b"absent-%025d" % i)  # 32-byte keys that are not there
    dm = time.perf_counter() - t0
    print(f"gets {a.gets}  found {got}  get {dt / a.gets * 1e6:.2f} us/op, "
          f"miss {dm / a.gets * 1e6:.2f} us/op")


def print_rows(rows) -> None:
    for name, v in rows:
        print(f"  {name:40s} {v:6.1f} B")
    print(f"  {'sum':40s} {sum(v for _, v in rows):6.1f} B")


def dram_keyless(a) -> None:
    """--dram-keyless: the packed index alone, N DRAM-resident objects, linked in the
    eviction lists, their keys shed (in the arena's key area once H2's Store lands)."""
    from kvstored.engine.arena import SizeClass
    from kvstored.engine.eviction import NativePolicy
    from kvstored.engine.nvmedevice import Location
    from kvstored.engine.packedindex import PackedIndex

    slab = default("slab_size")  # the daemon's: the slot map is laid out per slab
    slot = max(256, 1 << (a.size - 1).bit_length())
    region, start, per_region = 64 * 2**20, 2**20, 64 * 2**20 // 4096
    ix = PackedIndex(slab)
    ix.use_nvme_geometry(start, region)
    sc = SizeClass(0, slot, slab)
    pol = NativePolicy(1, ix)
    names = [f"model-{j}|".encode() for j in range(a.namespaces)]
    gc.collect()
    base = rss_anon()
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(a.objects):
        e = ix.Entry(names[i % a.namespaces][:-1], key_of(i), i * slot, a.size, i, sc)
        ix.insert(e)
        ix.place(e)
        pol.insert(e)
        if a.nvme_too:
            r, b = divmod(i, per_region)
            e.nvme = Location(r, start + r * region + b * 4096, a.size, i, 1)
        ix.shed_key(e, dram=True)
    del e
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    gc.collect()
    grown = rss_anon() - base
    n = len(ix)
    fp = ix.footprint()
    assert n == a.objects and fp["keyless"] == n and pol.resident == n
    print(f"index packed, DRAM-resident keyless{' + NVMe copy' if a.nvme_too else ''}  objects {n}  namespaces {a.namespaces}  "
          f"insert+place+link+shed {dt / n * 1e6:.2f} us/object (CPU {cpu / n * 1e6:.2f} us)")
    report_index_alone(ix, a, names, n, grown)


def keyless(a) -> None:
    """--keyless: the packed index alone, N NVMe-only objects without their keys."""
    from kvstored.engine.arena import SizeClass
    from kvstored.engine.nvmedevice import Location
    from kvstored.engine.packedindex import PackedIndex

    region, start, rec = 64 * 2**20, 2**20, 4096
    per_region = region // rec
    ix = PackedIndex(default("slab_size"))
    ix.use_nvme_geometry(start, region)
    sc = SizeClass(0, max(256, 1 << (a.size - 1).bit_length()), default("slab_size"))
    names = [f"model-{j}|".encode() for j in range(a.namespaces)]
    gc.collect()
    base = rss_anon()
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(a.objects):
        r, b = divmod(i, per_region)
        loc = Location(r, start + r * region + b * rec, a.size, i, 1)
        ix.add(names[i % a.namespaces][:-1], key_of(i), -1, a.size, i, sc, 1.0e9 + i, loc,
               keyless=not a.keep_keys)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    gc.collect()
    grown = rss_anon() - base
    n = len(ix)
    assert n == a.objects
    print(f"index packed, {'keyed' if a.keep_keys else 'keyless'} NVMe-only  objects {n}  namespaces {a.namespaces}  add "
          f"{dt / n * 1e6:.2f} us/object (CPU {cpu / n * 1e6:.2f} us)")
    report_index_alone(ix, a, names, n, grown, rows=4)


def breakdown(store: Store, ns: bytes, key: bytes, n: int) -> list[tuple[str, float]]:
    """Bytes per object by part: one entry's own objects (sys.getsizeof rounded to
    pymalloc's blocks) and the shared structures divided by ``n``."""
    if getattr(store.index, "kind", "dict") == "packed":
        return packed_breakdown(store.index, n)
    e = store.index.get(ns, key)
    rows: list[tuple[str, float]] = [("Entry object (slots + GC header)", _block(sys.getsizeof(e))),
                                     ("key bytes", _block(sys.getsizeof(e.key)))]
    for name in getattr(type(e), "__slots__", ()):
        v = getattr(e, name, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not -5 <= v <= 256:
            rows.append((f"{name} ({type(v).__name__} object)", _block(sys.getsizeof(v))))
    ix = store.index
    if hasattr(ix, "_map"):  # the layout before issue 13's first cuts
        rows.append(("ns bytes (one per entry)", _block(sys.getsizeof(e.ns))))
        rows.append(("(ns, key) tuple", _block(sys.getsizeof((e.ns, e.key)))))
        rows.append(("index dict, per object", sys.getsizeof(ix._map) / n))
        rows.append(("slot -> entry dict, per object", sys.getsizeof(ix._by_offset) / n))
    else:
        rows.append(("namespace dicts, per object",
                     sum(sys.getsizeof(sp.keys) for sp in ix._spaces.values()) / n))
        rows.append(("slot -> entry lists, per object",
                     sum(sys.getsizeof(r) for r in ix._slabs.values()) / n))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--objects", type=int, default=1_000_000)
    ap.add_argument("--size", type=int, default=256, help="object size in bytes (default 256)")
    ap.add_argument("--namespaces", type=int, default=1)
    ap.add_argument("--breakdown", action="store_true")
    ap.add_argument("--resident", type=int, default=0,
                    help="size the arena for this many objects (default: all); fewer puts the "
                         "rest through eviction, so the policy's ghost of evicted keys fills")
    ap.add_argument("--index", choices=("dict", "packed", "auto"), default="dict",
                    help="the Store's index (dram.index; default dict)")
    ap.add_argument("--ghost", choices=("native", "dict", "auto"), default="auto",
                    help="the eviction policy's ghost (default auto: native when built)")
    ap.add_argument("--gets", type=int, default=0,
                    help="then time this many gets (acquire + release, the Store's read path) "
                         "of keys put, spread over them")
    ap.add_argument("--keyless", action="store_true",
                    help="the packed index alone: NVMe-only objects without their keys in RAM")
    ap.add_argument("--keep-keys", action="store_true",
                    help="with --keyless: the same NVMe-only records with their keys (a peer)")
    ap.add_argument("--dram-keyless", action="store_true",
                    help="the packed index alone: DRAM-resident objects, linked, keys shed")
    ap.add_argument("--nvme-too", action="store_true",
                    help="with --dram-keyless: each also has a copy on NVMe")
    a = ap.parse_args()
    if a.keyless or a.dram_keyless:
        if a.objects < 1 or a.namespaces < 1 or a.size < 1:
            ap.error("--objects, --size and --namespaces must be positive")
        (dram_keyless if a.dram_keyless else keyless)(a)
        return
    if a.objects < 1 or a.size < 1 or a.namespaces < 1 or a.resident < 0:
        ap.error("--objects, --size and --namespaces must be positive")
    fit = a.resident or a.objects
    slab = default("slab_size")  # the daemon's (64 MiB): the slot map is laid out per slab
    slot = max(256, 1 << (a.size - 1).bit_length())
    from kvstored.engine.arena import SizeClass
    # a slot's arena bytes with its key record (dram.key_area_bytes: fewer slots per slab)
    slot = SizeClass(0, slot, slab, default("key_area_bytes")).footprint
    dram = (fit * slot // slab + (2 if fit == a.objects else 0)) * slab  # memfd: pages written count
    if dram < slab:
        ap.error(f"--resident {fit} x {slot} B is less than one slab of {slab} B")
    store = Store(StoreLimits(dram_size=dram, slab_size=slab, hugepages=False, prefault=False,
                              index=a.index))
    store.policy.ghost = make_ghost(a.ghost)  # still empty: nothing was put yet
    data = os.urandom(a.size)
    names = [f"model-{j}|".encode() for j in range(a.namespaces)]
    gc.collect()
    base = rss_anon()
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(a.objects):
        ns = names[i % a.namespaces][:-1]  # a fresh bytes object, as off the wire
        store.put_bytes(ns, key_of(i), data)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    gc.collect()
    grown = rss_anon() - base
    held = len(store.index)
    assert fit < a.objects or held == a.objects, "every put must be stored (no eviction)"
    print(f"index {getattr(store.index, 'kind', 'dict')}  objects put {a.objects}  held {held}  "
          f"size {a.size} B  namespaces {a.namespaces}  put {dt / a.objects * 1e6:.2f} us/object "
          f"(CPU {cpu / a.objects * 1e6:.2f} us)")
    ghost = store.policy.ghost
    print(f"ghost keys {len(ghost)}  RssAnon grew {grown / 2**20:.1f} MiB: "
          f"{grown / held:.1f} bytes/object held")
    if len(ghost):
        print(f"ghost {type(ghost).__name__}: {ghost.nbytes / 2**20:.1f} MiB, "
              f"{ghost.nbytes / len(ghost):.1f} bytes/evicted key")
    if a.gets:
        ns0 = names[0][:-1]
        step = max(1, a.objects // a.gets) | 1  # odd: spreads over the namespaces too
        keys = [key_of((i * step) % a.objects) for i in range(a.gets)]
        nss = [names[((i * step) % a.objects) % a.namespaces][:-1] for i in range(a.gets)]
        hit = 0
        t0, c0 = time.perf_counter(), time.process_time()
        for ns0, k in zip(nss, keys):
            try:
                e = store.acquire(ns0, k)
            except Exception:  # evicted (--resident): a miss
                continue
            store.release(e)
            hit += 1
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(f"gets {a.gets}  hits {hit}  get {dt / a.gets * 1e6:.2f} us/op "
              f"(CPU {cpu / a.gets * 1e6:.2f} us)")
    if a.breakdown:
        rows = breakdown(store, names[(a.objects - 1) % a.namespaces][:-1], key_of(a.objects - 1),
                         held)
        print_rows(rows)
    store.close()


if __name__ == "__main__":
    main()
