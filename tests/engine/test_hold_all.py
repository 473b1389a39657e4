"""Index.mark_all_unverified (what Store.hold_all runs when the cluster dropped a live
node): every record in the index held back in one pass, counted once, on both kinds;
records removed but still held by a reader are not in the index and are not counted."""
from __future__ import annotations

import pytest

from kvstored.engine.arena import SizeClass
from kvstored.engine.entries import make_index
from kvstored.engine.nvmedevice import Location
from kvstored.settings import default

KINDS = ["packed", "dict"]


def _index(kind):
    try:
        return make_index(kind)
    except ImportError:
        pytest.skip("kvstored._index not built")


@pytest.mark.parametrize("kind", KINDS)
def test_marks_every_record_once(kind):
    ix = _index(kind)
    sc = SizeClass(0, 4096, default("slab_size"))
    for i in range(1000):
        ix.add(b"ns%d" % (i % 3), b"k%d" % i, i * 4096 if i < 100 else -1, 100, i, sc, 1.0e9 + i,
               Location(0, 1 << 20, 100, i, 1) if i >= 100 else None)
    held = ix.get(b"ns1", b"k1")
    ix.mark_unverified(held)
    gone = ix.get(b"ns2", b"k2")
    ix.remove(gone)  # removed while a reader holds its entry
    assert ix.unverified == 1
    assert ix.mark_all_unverified() == 998  # 1000, less the held one and the removed one
    assert ix.unverified == 999 == len(ix)
    assert all(e.unverified for e in ix.iterate())
    assert ix.mark_all_unverified() == 0 and ix.unverified == 999
    ix.verify(ix.get(b"ns0", b"k0"))
    assert ix.unverified == 998
    assert ix.mark_all_unverified() == 1


@pytest.mark.parametrize("kind", KINDS)
def test_empty_index(kind):
    ix = _index(kind)
    assert ix.mark_all_unverified() == 0 and ix.unverified == 0


def test_keyless_records_are_marked():
    ix = _index("packed")
    region, start = 64 << 20, 1 << 20
    ix.use_nvme_geometry(start, region)
    sc = SizeClass(0, 4096, default("slab_size"))
    for i in range(500):
        ix.add(b"ns", b"key-%06d" % i, -1, 4096, i, sc, 1.0e9 + i,
               Location(0, start + i * 4096, 4096, i, 1), keyless=True)
    assert ix.mark_all_unverified() == 500 and ix.unverified == 500
