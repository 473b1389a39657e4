"""RDMA tests run the real daemon with the verbs twin (KVSTORE_RDMA_VERBS=twin on both sides)."""
from __future__ import annotations

import pytest

TWIN = {"KVSTORE_RDMA_VERBS": "twin"}


@pytest.fixture
def twin_env(monkeypatch):
    monkeypatch.setenv("KVSTORE_RDMA_VERBS", "twin")
    monkeypatch.delenv("KVSTORE_TWIN_LINK_BPS", raising=False)


@pytest.fixture
def rdma_daemon(start_daemon, twin_env):
    return start_daemon(env=TWIN)
