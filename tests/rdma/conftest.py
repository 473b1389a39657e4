"""RDMA tests run the real daemon with the verbs twin (KVSTORE_RDMA_VERBS=twin on both sides)."""
from __future__ import annotations

import pytest

TWIN = {"KVSTORE_RDMA_VERBS": "twin"}


@pytest.fixture
def twin_env(monkeypatch):
    monkeypatch.setenv("KVSTORE_RDMA_VERBS", "twin")
    monkeypatch.delenv("KVSTORE_TWIN_LINK_BPS", raising=False)


@pytest.fixture
def rdma_daemon(module_daemons, twin_env):
    """The module's daemon on the twin, shared by its tests and emptied before each
    (conftest.module_daemons): tests read its event counters as differences."""
    return module_daemons("twin", env=TWIN)
