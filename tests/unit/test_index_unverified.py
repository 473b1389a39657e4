"""``Entry.unverified`` set directly on an entry in an index keeps that index's
``unverified`` count true (both indexes): a later remove never takes the count below
zero, and the index's own calls (mark_unverified / verify / mark_all_unverified /
remove) agree with the setter."""
import pytest

from kvstored.engine.arena import SizeClass
from kvstored.engine.entries import Entry as DictEntry, Index as DictIndex

SC = SizeClass(0, 4096, 1 << 20)


def indexes():
    out = [pytest.param((DictIndex, DictEntry), id="dict")]
    try:
        from kvstored.engine.packedindex import Entry, PackedIndex
        out.append(pytest.param((PackedIndex, Entry), id="packed"))
    except ImportError:
        out.append(pytest.param(None, id="packed",
                                marks=pytest.mark.skip(reason="kvstored._index not built")))
    return out


@pytest.mark.parametrize("kinds", indexes())
def test_a_direct_set_keeps_the_count(kinds):
    Index, Entry = kinds
    ix = Index()
    a, b = Entry(b"n", b"a", -1, 10, 1, SC), Entry(b"n", b"b", -1, 10, 2, SC)
    a.unverified = True  # before insert: counted by insert
    ix.insert(a)
    ix.insert(b)
    assert ix.unverified == 1
    b.unverified = True  # in the index: the setter counts it
    b.unverified = True  # (already so: no change)
    assert ix.unverified == 2
    a.unverified = False
    assert ix.unverified == 1
    ix.verify(b)  # the index's call and the setter agree
    ix.verify(b)
    assert ix.unverified == 0 and not b.unverified
    ix.mark_unverified(a)
    assert ix.unverified == 1
    ix.remove(a)  # counted off once, and no longer the index's
    assert ix.unverified == 0 and not a.unverified
    a.unverified = True  # removed: nothing to count
    assert ix.unverified == 0
    b.unverified = True
    ix.remove(b)
    assert ix.unverified == 0
    assert ix.mark_all_unverified() == 0 and ix.unverified == 0  # empty


@pytest.mark.parametrize("kinds", indexes())
def test_an_entry_of_another_index_is_refused(kinds):
    Index, Entry = kinds
    one, two = Index(), Index()
    e = Entry(b"n", b"k", -1, 10, 1, SC)
    one.insert(e)
    with pytest.raises(ValueError):
        two.mark_unverified(e)
    with pytest.raises(ValueError):
        two.verify(e)
    assert one.unverified == 0 and two.unverified == 0 and not e.unverified
    assert one.mark_all_unverified() == 1 and one.unverified == 1 and e.unverified
    e.unverified = False
    assert one.unverified == 0
