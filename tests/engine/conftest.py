"""Every engine test runs against both indexes: the dict one and the packed one
(kvstored._index; skipped when the extension is not built). The Store picks its
index through KVSTORED_INDEX (kvstored/engine/entries.py make_index)."""
from __future__ import annotations

import importlib.util

import pytest

from kvstored.engine.entries import INDEX_ENV

HAVE_PACKED = importlib.util.find_spec("kvstored._index") is not None


@pytest.fixture(autouse=True, params=["dict", "packed"])
def index_kind(request, monkeypatch):
    if request.param == "packed" and not HAVE_PACKED:
        pytest.skip("kvstored._index is not built")
    monkeypatch.setenv(INDEX_ENV, request.param)
    return request.param
