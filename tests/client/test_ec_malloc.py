"""layout.tune_malloc: the SDK raises glibc's mmap / trim thresholds once per process for
EC (pyeclib allocates every fragment afresh), unless told not to or the environment chose
its own. Each case runs in a fresh interpreter: malloc settings are per process."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytest.importorskip("pyeclib")

from daemonutil import ROOT

PROBE = r"""
import json, os, resource, sys, threading
from kvstore import layout
p = layout.Policy.parse("ec:4+2")
seen = []  # eight threads' first EC calls at once: one answer for all
threads = [threading.Thread(target=lambda: seen.append(layout.tune_malloc())) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join(30)
assert len(seen) == 8 and len(set(seen)) == 1, seen
tuned = seen[0]
again = layout.tune_malloc()
v = os.urandom(1 << 20)
layout.encode_parts(p, v, 1)  # first-use allocations
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    layout.encode_parts(p, v, 1)
print(json.dumps({"tuned": tuned, "again": again,
                  "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0}))
"""


def probe(**env_over) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "KVSTORE_TUNE_MALLOC")}
    env.update(env_over)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "client"), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")
def test_tuned_once_and_encodes_stop_faulting():
    r = probe()
    assert r["tuned"] is True and r["again"] is True
    # untuned, each 1 MiB encode grows and trims the heap: ~700 page faults a call here;
    # tuned, the heap keeps its pages
    assert r["faults"] < 40 * 50, r


def test_opt_out_and_environment_win():
    assert probe(KVSTORE_TUNE_MALLOC="0")["tuned"] is False
    assert probe(KVSTORE_TUNE_MALLOC="off")["tuned"] is False
    # both thresholds chosen by the process's environment: nothing left to set
    r = probe(MALLOC_MMAP_THRESHOLD_=str(32 << 20), MALLOC_TRIM_THRESHOLD_=str(64 << 20))
    assert r["tuned"] is False and r["faults"] < 40 * 50
