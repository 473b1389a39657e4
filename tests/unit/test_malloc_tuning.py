"""The daemon raises glibc's mmap/trim thresholds at start (kvstored/__main__.py): measured in
a child process, a 1 MiB buffer freed and allocated again no longer page-faults in fresh."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from daemonutil import ROOT

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc only")

CHILD = r"""
import os, resource, sys
if sys.argv[1] == "tuned":
    from kvstored.__main__ import _tune_malloc
    assert _tune_malloc()
from pyeclib.ec_iface import ECDriver
d = ECDriver(k=4, m=2, ec_type="isa_l_rs_vand")  # what repair and EC puts run
data = os.urandom(1 << 20)
for _ in range(5):
    d.encode(data)
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    d.encode(data)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 50)
"""


def faults(mode: str, env: dict | None = None) -> float:
    e = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    e.update(env or {}, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'client'}")
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True,
                         timeout=60, env=e, check=True)
    return float(out.stdout.strip())


def test_tuned_daemon_reuses_large_buffers():
    pytest.importorskip("pyeclib")
    assert faults("default") > 100  # measured: ~736 minor faults per 1 MiB ec:4+2 encode
    assert faults("tuned") < 5


def test_operator_environment_wins(monkeypatch):
    from kvstored import __main__ as m

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    calls = []

    class FakeLibc:
        def __init__(self, _):
            self.mallopt = lambda *a: calls.append(a) or 1

    monkeypatch.setattr("ctypes.CDLL", FakeLibc)
    assert m._tune_malloc() is True
    assert calls == []  # neither threshold overridden
