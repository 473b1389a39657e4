"""Every engine test runs against both indexes: the dict one and the packed one
(kvstored._index; skipped when the extension is not built). The Store picks its
index through KVSTORED_INDEX (kvstored/engine/entries.py make_index).

A test marked ``index_free`` builds no index (the NVMe tier, its scan and io_uring on
their own, no Store): both runs would be the same code, so it runs once. The mark is
enforced: building an index in such a test fails it."""
from __future__ import annotations

import importlib.util

import pytest

from kvstored.engine import entries, store
from kvstored.engine.entries import INDEX_ENV

HAVE_PACKED = importlib.util.find_spec("kvstored._index") is not None


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "index_free: builds no index (no Store): run once, not once per index kind")


@pytest.fixture(autouse=True, params=["dict", "packed"])
def index_kind(request, monkeypatch):
    if request.param == "packed" and not HAVE_PACKED:
        pytest.skip("kvstored._index is not built")
    monkeypatch.setenv(INDEX_ENV, request.param)
    if request.node.get_closest_marker("index_free"):
        def refuse(*args, **kwargs):
            raise AssertionError("an index_free test built an index: drop the mark "
                                 "(tests/engine/conftest.py), it must run on both kinds")
        monkeypatch.setattr(entries, "make_index", refuse)
        monkeypatch.setattr(store, "make_index", refuse)
    return request.param


def pytest_collection_modifyitems(config, items):
    """The packed run of an index_free test is left out (its dict run is the same code)."""
    same = [item for item in items if item.get_closest_marker("index_free")
            and getattr(item, "callspec", None) is not None
            and item.callspec.params.get("index_kind") == "packed"]
    if same:
        config.hook.pytest_deselected(items=same)
        drop = set(map(id, same))
        items[:] = [item for item in items if id(item) not in drop]
