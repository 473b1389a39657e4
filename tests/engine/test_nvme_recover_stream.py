"""Recovery streamed region by region into the index (issue 13, "restart" at fleet scale):
NvmeTier.recover_into decodes one region's summary at a time and finds duplicates through
the index, so the newest record of a key must win whatever order the regions are read
in, a tombstone must delete older records read before or after it, older records are
stale where they lie, and no more than one region's rows are ever decoded at once.

Each case checks the recovered keys against a model of what was written and the
per-region state (live counts, stale keys, tombstones) against the plain per-record
rules (test_nvme_scan._reference), through recovered_objects (a dict) and through the
Store's own index (dict and packed, conftest; packed also with fingerprints narrowed to
4 bits, so keyless twins of other keys are common).
"""
from __future__ import annotations

import asyncio
import mmap
import os
import random
import weakref

import pytest

from kvstored.engine import Store, StoreLimits, nvmescan
from kvstored.engine import store as store_mod
from kvstored.engine.nvme import DATA_START, NvmeDevice, NvmeTier, align_up
from kvstored.engine.nvmeformat import SEQ, parse_summary, summary_of_rows

from test_nvme_scan import _reference

MiB = 1 << 20
REGION = 16 * MiB
BIG = 60 * 1024  # ~250 records per region
SMALL = 8 * 1024
REGIONS = 10


def _open(path) -> NvmeTier:
    return NvmeTier(NvmeDevice(str(path), DATA_START + REGIONS * REGION, REGION, "threads", 32),
                    sync="none")


def _write(path, ops) -> dict:
    """Apply ``ops`` ((ns, key, "put" | "del", length)) in order; returns the model
    {(ns, key): (seq, length)} of the live records a restart must find."""
    from kvstore.wire import checksum
    buf = mmap.mmap(-1, align_up(BIG))
    buf[:] = os.urandom(len(buf))
    view = memoryview(buf)
    csums = {n: checksum(view[:n]) for n in (BIG, SMALL)}
    model: dict = {}

    async def run():
        tier = _open(path)
        try:
            for ns, key, op, n in ops:
                if op == "put":
                    await tier.append(ns, key, view[:n], n, csums[n], align_up(n), 1.0)
                    model[(ns, key)] = (tier.seq - 1, n)
                else:
                    await tier.append(ns, key, None, 0, 0, 0, 1.0, tombstone=True)
                    model.pop((ns, key), None)
        finally:
            tier.close()
    asyncio.run(run())
    return model


def _reorder(tier: NvmeTier, order: str) -> None:
    """Read the regions in another order than the scan found them."""
    items = tier.recovered.items
    if order == "reversed":
        items.reverse()
    elif order == "shuffled":
        random.Random(7).shuffle(items)


def _check_state(tier: NvmeTier, live, stale, tombs) -> None:
    for r in tier.regions:
        assert r.live_count == len(live.get(r.index, ())), r.index
        assert r.stale == stale.get(r.index, set()), r.index
        assert r.tombs == tombs.get(r.index, {}), r.index
    assert sum(tier.stale_count.values()) == sum(len(v) for v in stale.values())


def _recover_dict(path, order: str, model: dict) -> NvmeTier:
    """recovered_objects after reading the regions in ``order``: the model's keys, each at
    its newest record, and the per-record rules' region state. Returns the open tier."""
    tier = _open(path)
    _reorder(tier, order)
    live, stale, tombs = _reference(tier.recovered)
    objs = tier.recovered_objects()
    assert {(ns, key) for ns, key, _l, _a in objs} == set(model)
    assert len(objs) == len(model)
    for ns, key, loc, _at in objs:
        assert tier._record_row(loc)[SEQ] == model[(ns, key)][0], (ns, key)
    _check_state(tier, live, stale, tombs)
    return tier


def _fillers(tag: bytes, n: int) -> list:
    return [(b"ns", b"%s-%05d" % (tag, i), "put", BIG) for i in range(n)]


ORDERS = ["natural", "reversed", "shuffled"]


@pytest.mark.index_free
@pytest.mark.parametrize("order", ORDERS)
def test_a_key_in_two_regions_recovers_its_newer_record_in_either_read_order(tmp_path, order):
    k = (b"ns", b"twice")
    ops = [(*k, "put", BIG)] + _fillers(b"f", 300) + [(*k, "put", BIG)]
    model = _write(tmp_path / "t.dat", ops)
    tier = _recover_dict(tmp_path / "t.dat", order, model)
    try:
        assert [r.index for r in tier.regions if k in r.stale] == [0]  # the first put's
        assert tier.stale_count[k] == 1
    finally:
        tier.close()


@pytest.mark.index_free
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("again", [False, True])
def test_a_tombstone_deletes_the_record_read_before_or_after_it(tmp_path, order, again):
    """The tombstone lies in the tombstone region, the record in a data region: each read
    order puts one before the other. ``again``: a newer put after the delete wins."""
    k = (b"ns", b"deleted")
    ops = [(*k, "put", BIG)] + _fillers(b"f", 300) + [(*k, "del", 0)]
    if again:
        ops += _fillers(b"g", 260) + [(*k, "put", BIG)]
    model = _write(tmp_path / "t.dat", ops)
    assert (k in model) == again
    tier = _recover_dict(tmp_path / "t.dat", order, model)
    try:
        assert sum(k in r.tombs for r in tier.regions) == 1
        assert sum(k in r.stale for r in tier.regions) == 1  # the first put
    finally:
        tier.close()


@pytest.mark.index_free
@pytest.mark.parametrize("order", ORDERS)
def test_a_key_overwritten_in_four_regions_keeps_the_newest(tmp_path, order):
    k = (b"other", b"often")
    ops = []
    for i in range(4):
        ops += [(*k, "put", BIG)] + _fillers(b"f%d" % i, 260)
    model = _write(tmp_path / "t.dat", ops)
    tier = _recover_dict(tmp_path / "t.dat", order, model)
    try:
        assert tier.stale_count[k] == 3
    finally:
        tier.close()


def _history(seed: int) -> list:
    """A bounded random history: 200 keys of two namespaces put, overwritten, deleted and
    put again, big and small records mixed (~8 regions' worth)."""
    rnd = random.Random(seed)
    keys = [(rnd.choice([b"a", b"namespace-b"]), b"k%03d" % i) for i in range(200)]
    ops = []
    for _ in range(1100):
        ns, key = rnd.choice(keys)
        op = "del" if rnd.random() < 0.2 else "put"
        ops.append((ns, key, op, rnd.choice([BIG, SMALL]) if op == "put" else 0))
    return ops


@pytest.mark.index_free
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("seed", [3, 4])
def test_random_histories_recover_as_the_model_says(tmp_path, order, seed):
    model = _write(tmp_path / "t.dat", _history(seed))
    _recover_dict(tmp_path / "t.dat", order, model).close()


def _narrow_fingerprints(monkeypatch, bits: int) -> None:
    real = store_mod.make_index

    def make(kind, slab_size):
        ix = real(kind, slab_size)
        if hasattr(ix, "set_fingerprint_bits"):
            ix.set_fingerprint_bits(bits)  # test hook: keyless twins of other keys are common
        return ix
    monkeypatch.setattr(store_mod, "make_index", make)


@pytest.mark.parametrize("order", ["natural", "shuffled"])
@pytest.mark.parametrize("fp_bits", [None, 4])
@pytest.mark.parametrize("max_value", [MiB, 32 * 1024])
def test_the_store_index_built_by_streaming_matches_the_model(tmp_path, monkeypatch, order,
                                                              fp_bits, max_value):
    """Through Tiering.recover into the Store's index; ``max_value`` below BIG: a key whose
    newest record is too long is left out (and its record forgotten), as before."""
    ops = _history(5)
    model = _write(tmp_path / "t.dat", ops)
    ref_tier = _open(tmp_path / "t.dat")
    live, stale, tombs = _reference(ref_tier.recovered)
    ref_tier.close()
    want = {k: seq for k, (seq, n) in model.items() if n <= max_value}
    too_long = {k: seq for k, (seq, n) in model.items() if n > max_value}
    if fp_bits is not None:
        _narrow_fingerprints(monkeypatch, fp_bits)
    tier = _open(tmp_path / "t.dat")
    _reorder(tier, order)
    limits = StoreLimits(dram_size=8 * MiB, slab_size=MiB, max_value_size=max_value, prefault=False)
    s = Store(limits, nvme=tier)
    try:
        assert len(s.index) == len(want)
        for (ns, key), seq in want.items():
            e = s.index.get(ns, key)
            assert e is not None and e.offset == -1
            assert tier._record_row(e.nvme)[SEQ] == seq, (ns, key)
        for ns, key, _op, _n in ops:  # deleted or too long: absent (or another key's twin)
            if (ns, key) not in want:
                e = s.index.get(ns, key)
                row = None if e is None else tier._record_row(e.nvme)
                assert row is None or (row[8], row[9]) != (ns, key), (ns, key)
        # the per-record rules' state, less the too-long records: forgotten (dead, stale)
        for k, seq in too_long.items():
            for r in tier.regions:
                if k in live.get(r.index, ()):
                    live[r.index].discard(k)
                    stale.setdefault(r.index, set()).add(k)
        _check_state(tier, live, stale, tombs)
    finally:
        s.close()


def test_recovery_decodes_one_region_at_a_time(tmp_path, monkeypatch):
    """Memory: the rows of at most one region are alive at any moment of the recovery of
    ~1800 records over 8 regions (counted as the decoded lists come and go)."""
    model = _write(tmp_path / "t.dat", _fillers(b"m", 1800) + [(b"ns", b"m-00007", "del", 0)])
    alive = {"rows": 0, "peak": 0, "regions": 0, "largest": 0}

    class Rows(list):
        pass

    def gone(n):
        alive["rows"] -= n

    def counted(body, count):
        rows = Rows(parse_summary(body, count))
        alive["rows"] += len(rows)
        alive["regions"] += 1
        alive["peak"] = max(alive["peak"], alive["rows"])
        alive["largest"] = max(alive["largest"], len(rows))
        weakref.finalize(rows, gone, len(rows))
        return rows
    monkeypatch.setattr(nvmescan, "parse_summary", counted)
    tier = _open(tmp_path / "t.dat")
    assert tier.counters["restart_summaries"] >= 6
    s = Store(StoreLimits(dram_size=8 * MiB, slab_size=MiB, max_value_size=MiB, prefault=False),
              nvme=tier)
    try:
        assert len(s.index) == len(model) == 1799
        assert alive["regions"] >= 7 and alive["rows"] == 0
        assert alive["peak"] == alive["largest"] < 300  # one region's rows at a time
        assert not tier.recovered  # the summaries were let go too
    finally:
        s.close()


@pytest.mark.index_free
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_summary_facts_agree_with_parse_summary(seed):
    """nvmescan.summary_facts (what the scan keeps of a summary: its highest sequence number
    and last entry) against a full decode, for uniform and mixed key sizes, and refuses
    what parse_summary refuses (cut short, wrong count)."""
    rnd = random.Random(seed)
    for uniform in (True, False):
        rows = []
        for i in range(rnd.randrange(1, 300)):
            ns = b"ns" if uniform else rnd.choice([b"a", b"ns-long"])
            key = b"k%05d" % i if uniform else b"k" * rnd.randrange(1, 40)
            rows.append((rnd.randrange(1, 1 << 40), 8192 + i * 4096, rnd.randrange(1 << 20),
                         rnd.randrange(1 << 64), rnd.random(), rnd.choice([0, 1]), len(ns),
                         len(key), ns, key))
        body = summary_of_rows(rows)
        data, top, last = nvmescan.summary_facts(memoryview(body), len(rows))
        assert data == body and top == max(r[0] for r in rows)
        assert tuple(last[:8]) == rows[-1][:8]
        assert nvmescan.summary_facts(body[:-1], len(rows)) is None
        assert nvmescan.summary_facts(body, len(rows) + 1) is None
    assert nvmescan.summary_facts(b"", 0) == (b"", 0, None)
    assert nvmescan.summary_facts(b"x" * 10, 1) is None
