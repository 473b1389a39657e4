"""Dedup costs a lookup (issue 11): a put of bytes already stored, overwrite or not, is
answered from the index before any slot is reserved; its payload is skipped.

Shown against a real daemon whose DRAM is full of pinned objects: a new put finds no slot
(NoSpace after put_wait_timeout), while re-puts of stored bytes answer at once, because
they never ask the allocator.
"""
from __future__ import annotations

import threading
import time
import urllib.request

import pytest
from daemonutil import Daemon

import kvstore
from kvstore.errors import NoSpace

MiB = 1 << 20


def _metric(daemon, name: str) -> float:
    with urllib.request.urlopen(daemon.metrics_url + "/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


def _val(i: int, n: int) -> bytes:
    return (i.to_bytes(4, "little") * (n // 4 + 1))[:n]


@pytest.fixture(scope="module")
def _filled(tmp_path_factory):
    """A daemon whose DRAM holds only pinned 1 MiB objects: no put of new bytes fits. Filled
    once for the module: no test here stores, frees or unpins anything."""
    d = Daemon(tmp_path_factory.mktemp("dedup")).start()  # put_wait_timeout: the default 2 s
    try:
        stored = []
        with kvstore.Client(d.control, namespace="t", timeout=10.0, transport="tcp") as c:
            for i in range(200):  # bounded: 64 MiB of DRAM holds far fewer than 200 x 1 MiB
                k = f"k{i}".encode()
                try:
                    c.put(k, _val(i, MiB))
                except NoSpace:
                    break
                c.pin([k], ttl=600)
                stored.append(k)
            else:
                pytest.fail("DRAM never filled")
        assert len(stored) >= 8
        yield d, stored
    finally:
        d.stop()


@pytest.fixture
def full(_filled):
    """The filled daemon, and a connection of the test's own (a refused put changes how
    its connection answers the next ones)."""
    d, stored = _filled
    assert d.alive(), d.log()
    with kvstore.Client(d.control, namespace="t", timeout=10.0, transport="tcp") as c:
        assert c.exists(stored) == [True] * len(stored)
        yield d, c, stored


@pytest.mark.parametrize("overwrite", [False, True])
def test_dedup_answers_without_a_slot(full, overwrite):
    d, c, stored = full
    took = []
    for i, k in enumerate(stored[:8]):
        v = _val(i, MiB)
        t = time.monotonic()
        assert c.put(k, v, overwrite=overwrite) is False  # deduplicated
        took.append(time.monotonic() - t)
    # a reservation would have waited put_wait_timeout (2 s) for a slot and failed: no put
    # waited that long (each is timed alone, so a loaded machine's delays do not add up)
    assert max(took) < 2.0, took
    # the store is really full: new bytes wait, then NoSpace
    with pytest.raises(NoSpace):
        c.put(b"new", _val(999, MiB))
    # after the refused put the connection refuses puts without space at once, but a
    # dedup is still answered: it needs no space
    assert c.put(stored[0], _val(0, MiB), overwrite=True) is False
    assert c.get(stored[0]) == _val(0, MiB)


def test_dedup_counts_and_keeps_stream_in_step(full):
    d, c, stored = full
    n0 = _dedup_count(d)
    # batches mixing dedups (payload skipped) with gets: answers stay in order and whole
    items = [(k, _val(i, MiB)) for i, k in enumerate(stored[:6])]
    assert c.batch_put(items, overwrite=True) == [False] * 6
    got = c.batch_get(stored[:6])
    assert [bytes(g) for g in got] == [v for _, v in items]
    assert _dedup_count(d) - n0 == 6


def test_same_checksum_other_size_is_not_a_dedup(full):
    """Identity is (size, checksum): a different size is a different object (here refused
    as a conflict without overwrite; with overwrite it would need a slot)."""
    d, c, stored = full
    from kvstore.errors import Conflict
    with pytest.raises(Conflict):
        c.put(stored[0], _val(0, MiB - 4096))


def test_concurrent_dedups(full):
    d, c, stored = full
    errors: list = []
    results: list = []

    def worker(j: int) -> None:
        try:
            with kvstore.Client(d.control, namespace="t", timeout=10.0, transport="tcp") as cj:
                for r in range(5):
                    i = (j + r) % len(stored)
                    results.append(cj.put(stored[i], _val(i, MiB), overwrite=True))
        except Exception as e:  # reported below
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(j,)) for j in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert not errors, errors
    assert results == [False] * 20


def _dedup_count(d) -> float:
    for name in ("kvstored_dedups_total", "kvstored_dedups"):
        try:
            return _metric(d, name)
        except AssertionError:
            continue
    raise AssertionError("no dedup metric")
