"""``import kvstore`` must not import torch; ``import kvstore.torch`` does (needs no daemon)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from daemonutil import ROOT


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "client"), str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def test_import_kvstore_does_not_import_torch():
    r = _run("import sys, kvstore, kvstore.keys; "
             "assert 'torch' not in sys.modules, 'kvstore imported torch'; print('ok')")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_import_kvstore_torch_imports_torch():
    r = _run("import sys, kvstore.torch as kt; assert 'torch' in sys.modules; "
             "assert kt.KVLayout and kt.put_tensor and kt.StagingPool; print('ok')")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"
