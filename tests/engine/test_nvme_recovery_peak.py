"""Recovery's peak RAM is the index, not the summaries (issue 13, a node at fleet scale).

The scan verifies each region's summary and keeps only where it lies and what it
verified as (length, checksum, count, generation); indexing reads it again, a window of
a few regions at a time, just before decoding it. These tests check that no summary
body outlives the scan, that the window bounds what indexing holds, and that a summary
which fails the second read (other bytes, a read error, a short read) costs a scan of
its region and never indexes what it says: the recovered objects and every region's
state stay what the per-record rules give (test_nvme_scan._reference), in any region
order.
"""
from __future__ import annotations

import errno
import os
import random
import tracemalloc

import pytest

from kvstored.engine import Store, StoreLimits, nvmescan
from kvstored.engine.nvme import BLOCK, align_up
from kvstored.engine.nvmeformat import SEQ, parse_summary

from test_nvme_recover_stream import (MiB, _check_state, _fillers, _history, _open,
                                      _reorder, _write)
from test_nvme_scan import _reference

SUMMARIZED = 6  # sealed regions the filler history leaves (1500 records of 60 KiB)


def _summary_at(path, item) -> int:
    """File offset of the summary body of Found item ``item`` (region, body, count, len...)."""
    r, body_len = item[0], item[3]
    return r.base + r.size - BLOCK - align_up(max(body_len, 1))


def _flip(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


def _check_objects(tier, objs, model) -> None:
    """Exactly the model's keys, each at a record holding that key and its newest seq."""
    assert {(ns, key) for ns, key, _l, _a in objs} == set(model)
    assert len(objs) == len(model)
    for ns, key, loc, _at in objs:
        row = tier._record_row(loc)
        assert row is not None and (row[8], row[9]) == (ns, key), (ns, key)
        assert row[SEQ] == model[(ns, key)], (ns, key)


def _seqs(model: dict) -> dict:
    return {k: v[0] for k, v in model.items()}


@pytest.fixture
def fillers(tmp_path):
    path = tmp_path / "t.dat"
    model = _write(path, _fillers(b"p", 1500) + [(b"ns", b"p-00011", "del", 0)])
    return path, _seqs(model)


@pytest.mark.index_free
def test_the_scan_keeps_no_summary_body(fillers):
    """After the scan, every summarized region is a reference (no bytes), and what the
    scan still holds is far less than the summaries it verified."""
    path, model = fillers
    tracemalloc.start()
    try:
        tier = _open(path)
        # what the scan's own lines allocated and still hold (the regions' state is
        # allocated in nvmedevice): its references, not the bytes it read
        held = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(True, nvmescan.__file__)])
        grew = sum(stat.size for stat in held.statistics("filename"))
    finally:
        tracemalloc.stop()
    try:
        items = tier.recovered.items
        assert len(items) >= SUMMARIZED and tier.counters["restart_summaries"] >= SUMMARIZED
        assert all(item[1] is None for item in items)
        bodies = sum(item[3] for item in items)
        assert bodies > 60_000  # 1501 entries of 48 B
        assert grew < bodies // 8, (grew, bodies)
        _check_objects(tier, tier.recovered_objects(), model)
    finally:
        tier.close()


@pytest.mark.parametrize("window", [1, 2, None])
def test_indexing_holds_a_window_of_summaries_at_most(fillers, monkeypatch, window):
    """``window`` regions' summaries per batch (None: the default window, which holds all of
    these small ones). What indexing held at once (Found.peak_window, the bytes of the read
    buffers) stays within the window whatever the total (decoded rows: one region's,
    test_nvme_recover_stream)."""
    path, model = fillers
    tier = _open(path)
    found = tier.recovered
    sizes = [align_up(item[3]) for item in found.items]
    if window is not None:
        monkeypatch.setattr(nvmescan, "REREAD_WINDOW", window * max(sizes))
    s = Store(StoreLimits(dram_size=8 * MiB, slab_size=MiB, max_value_size=MiB, prefault=False),
              nvme=tier)
    try:
        assert len(s.index) == len(model)
        assert found.peak_window > 0 and not found.items
        if window is None:
            assert found.peak_window == sum(sizes) <= nvmescan.REREAD_WINDOW
        else:
            assert found.peak_window <= window * max(sizes) < sum(sizes)
        assert tier.counters["restart_scanned_regions"] == 0
    finally:
        s.close()


@pytest.mark.index_free
@pytest.mark.parametrize("order", ["natural", "reversed", "shuffled"])
@pytest.mark.parametrize("how", ["bit", "other_summary"])
def test_a_summary_changed_after_the_scan_costs_a_scan_of_its_region(tmp_path, monkeypatch,
                                                                    order, how):
    """Between the scan and the indexing, one region's summary body changes: a flipped bit,
    or another region's whole (well-formed) summary of the same length copied over it.
    Either would decode (the count matches); the second read's checksum refuses it, the
    region is scanned, and recovery gives what the per-record rules give."""
    monkeypatch.setattr(nvmescan, "REREAD_WINDOW", 1)  # one region per batch
    path = tmp_path / "t.dat"
    # full regions of one key length have summaries of one length: a copy passes every
    # check but the checksum
    ops = _history(11) if how == "bit" else _fillers(b"q", 1500) + [(b"ns", b"q-00003", "del", 0)]
    model = _seqs(_write(path, ops))
    tier = _open(path)
    try:
        _reorder(tier, order)
        live, stale, tombs = _reference(tier.recovered)
        items = tier.recovered.items
        assert tier.counters["restart_scanned_regions"] == 0
        by_len: dict = {}
        for item in items:
            by_len.setdefault(item[3], []).append(item)
        if how == "bit":
            victim = items[len(items) // 2]
            _flip(path, _summary_at(path, victim) + victim[3] // 3)
        else:
            pair = next(v for v in by_len.values() if len(v) >= 2)
            victim, donor = pair[0], pair[1]
            with open(path, "r+b") as f:
                f.seek(_summary_at(path, donor))
                body = f.read(donor[3])
                assert parse_summary(body, victim[2]) is not None  # it would decode
                f.seek(_summary_at(path, victim))
                f.write(body)
        objs = tier.recovered_objects()
        _check_objects(tier, objs, model)
        _check_state(tier, live, stale, tombs)
        assert tier.counters["summaries_corrupt"] == 1
        assert tier.counters["restart_scanned_regions"] == 1
    finally:
        tier.close()


@pytest.mark.index_free
@pytest.mark.parametrize("fault", ["errno", "short", "raises"])
def test_a_failed_second_read_scans_the_regions(fillers, monkeypatch, fault):
    """The second read of every summary fails (an error per request, a short read, or the
    backend raising): each region is scanned instead, and nothing is lost or invented."""
    path, model = fillers
    tier = _open(path)
    n = len(tier.recovered.items)

    def failing(reqs):
        if fault == "raises":
            raise OSError(errno.EIO, "injected")
        if fault == "errno":
            return [-errno.EIO] * len(reqs)
        return [len(buf) - BLOCK for _off, buf in reqs]
    monkeypatch.setattr(tier.dev, "read_many", failing)
    try:
        _check_objects(tier, tier.recovered_objects(), model)
        assert tier.counters["restart_scanned_regions"] == n
        assert tier.counters["summaries_corrupt"] == n
    finally:
        tier.close()


@pytest.mark.parametrize("through", ["dict", "store"])
def test_a_region_unreadable_at_the_second_read_is_counted_not_fatal(fillers, monkeypatch,
                                                                     through):
    """Its summary and then its record headers fail to read: its records are missing from
    the index (as for any unreadable region), the others recover, nothing raises
    (``store``: through Tiering.recover and the Store's index, with a max value length)."""
    path, model = fillers
    tier = _open(path)
    victim = tier.recovered.items[1][0]
    real_many, real_upto = tier.dev.read_many, tier.dev.read_upto
    lo, hi = victim.base, victim.base + victim.size

    def many(reqs):
        return [-errno.EIO if lo <= off < hi else n
                for (off, _b), n in zip(reqs, real_many(reqs))]

    def upto(buf, offset, n):
        return 0 if lo <= offset < hi else real_upto(buf, offset, n)
    monkeypatch.setattr(tier.dev, "read_many", many)
    monkeypatch.setattr(tier.dev, "read_upto", upto)
    s = None
    try:
        if through == "store":
            s = Store(StoreLimits(dram_size=8 * MiB, slab_size=MiB, max_value_size=MiB,
                                  prefault=False), nvme=tier)
            got = {(ns, key) for ns, key in model if s.index.get(ns, key) is not None}
            assert len(s.index) == len(got)
            assert all(e.nvme.region != victim.index for e in s.index.iterate())
        else:
            objs = tier.recovered_objects()
            got = {(ns, key) for ns, key, _l, _a in objs}
            assert all(loc.region != victim.index for _n, _k, loc, _a in objs)
        assert got < set(model) and len(model) - len(got) > 100
        assert victim.live_count == 0
        assert tier.counters["restart_scanned_regions"] == 1
    finally:
        if s is not None:
            s.close()
        else:
            tier.close()


@pytest.mark.index_free
def test_a_scanned_region_is_read_again_or_kept_when_its_summary_cannot_be_written(
        fillers, monkeypatch):
    """A region whose summary was corrupt at the scan is scanned and given a new summary:
    indexing reads that one again (a reference, like any other). When the new summary
    cannot be written, the scan keeps its body in RAM (the only copy), and indexing
    decodes it from there."""
    path, model = fillers
    tier = _open(path)
    victim = tier.recovered.items[2]
    tier.close()
    _flip(path, _summary_at(path, victim) + 7)
    for writable in (False, True):
        with monkeypatch.context() as m:
            if not writable:
                def refuse(*_a):
                    raise OSError(errno.ENOSPC, "injected")
                m.setattr(os, "pwritev", refuse)
            tier = _open(path)
        try:
            c = tier.counters
            assert c["summaries_corrupt"] == 1 and c["restart_scanned_regions"] == 1
            assert c["restart_summaries_written"] == int(writable)
            held = [item for item in tier.recovered.items if item[1] is not None]
            if writable:
                assert not held
            else:
                assert [item[0].index for item in held] == [victim[0].index]
            _check_objects(tier, tier.recovered_objects(), model)
            assert c["restart_scanned_regions"] == 1  # the new summary read back fine
        finally:
            tier.close()
    tier = _open(path)  # and the next start reads the summary the scan wrote
    try:
        assert tier.counters["restart_scanned_regions"] == 0
        _check_objects(tier, tier.recovered_objects(), model)
    finally:
        tier.close()


@pytest.mark.index_free
def test_a_region_reclaimed_before_indexing_gives_none_of_its_old_records(fillers):
    """Nothing writes between the scan and the indexing at a start; were a region reused
    (its generation moved on), its summary no longer describes it: skipped, not read."""
    path, model = fillers
    tier = _open(path)
    try:
        victim = tier.recovered.items[0][0]
        victim.generation += 1
        objs = tier.recovered_objects()
        assert objs and all(loc.region != victim.index for _n, _k, loc, _a in objs)
        assert len(objs) < len(model)
    finally:
        tier.close()


@pytest.mark.parametrize("seed", [21, 22, 23])
def test_random_orders_windows_and_a_changed_summary_recover_as_the_rules_say(tmp_path,
                                                                              monkeypatch, seed):
    """Random histories (overwrites, tombstones, mixed namespaces and sizes), a random
    region order, a random window, and one summary changed after the scan: the Store's
    index holds each live key at its newest record, every region's state is the rules'."""
    rnd = random.Random(seed)
    path = tmp_path / "t.dat"
    model = _seqs(_write(path, _history(seed)))
    tier = _open(path)
    items = tier.recovered.items
    rnd.shuffle(items)
    monkeypatch.setattr(nvmescan, "REREAD_WINDOW", rnd.choice([1, 64 * 1024, 4 * MiB]))
    live, stale, tombs = _reference(tier.recovered)
    victim = rnd.choice(items)
    _flip(path, _summary_at(path, victim) + rnd.randrange(victim[3]))
    s = Store(StoreLimits(dram_size=8 * MiB, slab_size=MiB, max_value_size=MiB, prefault=False),
              nvme=tier)
    try:
        assert len(s.index) == len(model)
        for (ns, key), seq in model.items():
            e = s.index.get(ns, key)
            assert e is not None and tier._record_row(e.nvme)[SEQ] == seq, (ns, key)
        _check_state(tier, live, stale, tombs)
        assert tier.counters["restart_scanned_regions"] == 1
    finally:
        s.close()



def _uniform_history(seed: int) -> list:
    """Puts, overwrites and deletes of 150 keys of one namespace and key length: every
    summary has entries of one size, so indexing decodes it in slices (ROWS_SLICE)."""
    rnd = random.Random(seed)
    ops = []
    for _ in range(1100):
        key = b"u%04d" % rnd.randrange(150)
        op = "del" if rnd.random() < 0.2 else "put"
        ops.append((b"ns", key, op, rnd.choice([60 * 1024, 8 * 1024]) if op == "put" else 0))
    return ops


@pytest.mark.parametrize("order", ["natural", "shuffled"])
@pytest.mark.parametrize("seed", [31, 32])
def test_a_region_decoded_in_slices_recovers_as_the_rules_say(tmp_path, monkeypatch, order, seed):
    """Slices of 7 entries: a key overwritten or deleted within one region has its records
    in different slices (the later slice finds the earlier one in the index, as a later
    region would). Same objects and region state as the per-record rules."""
    path = tmp_path / "t.dat"
    model = _seqs(_write(path, _uniform_history(seed)))
    tier = _open(path)
    _reorder(tier, order)
    live, stale, tombs = _reference(tier.recovered)
    monkeypatch.setattr(nvmescan, "ROWS_SLICE", 7)
    calls = {"n": 0, "largest": 0}
    real = nvmescan.parse_summary

    def counted(body, count):
        calls["n"] += 1
        calls["largest"] = max(calls["largest"], count)
        return real(body, count)
    monkeypatch.setattr(nvmescan, "parse_summary", counted)
    regions = len(tier.recovered.items)
    s = Store(StoreLimits(dram_size=8 * MiB, slab_size=MiB, max_value_size=MiB, prefault=False),
              nvme=tier)
    try:
        assert calls["n"] > 10 * regions and calls["largest"] == 7  # sliced, every region
        assert len(s.index) == len(model)
        for (ns, key), seq in model.items():
            e = s.index.get(ns, key)
            assert e is not None and tier._record_row(e.nvme)[SEQ] == seq, (ns, key)
        _check_state(tier, live, stale, tombs)
        assert tier.counters["restart_scanned_regions"] == 0
    finally:
        s.close()
