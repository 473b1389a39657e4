"""The daemon with an NVMe tier on a CPU without AVX-512 (AMD EPYC Milan: x86-64-v3), emulated
with qemu-user: it must start, demote to NVMe and serve, never die with SIGILL. qemu-user has
no io_uring, so this also shows the loud fallback to threads on a real daemon (log line, the
tier's io_backend_fallback counter, the reason in Stats)."""
from __future__ import annotations

import hashlib
import os
import shutil
import time

import pytest

import kvstore

QEMU = shutil.which("qemu-x86_64")
pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-x86_64 not installed (Debian qemu-user; make test installs it)")


def value(i: int, size: int) -> bytes:
    seed = hashlib.sha256(b"p%d" % i).digest()
    return (seed * (size // len(seed) + 1))[:size]


@pytest.mark.timeout(240)
def test_nvme_daemon_on_epyc_milan(tmp_path):
    from daemonutil import Daemon

    d = Daemon(tmp_path, "--dram-size", "8MiB", "--slab-size", "1MiB", "--max-value-size", "1MiB",
               "--nvme-path", str(tmp_path / "tier.dat"), "--nvme-size", "64MiB",
               "--nvme-region-size", "16MiB",
               wrapper=[QEMU, "-cpu", "EPYC-Milan"])
    d.start(timeout=150)
    try:
        size = 256 * 1024
        with kvstore.Client(d.control, namespace="q", timeout=60, shm=False) as c:
            for i in range(60):  # 15 MiB into 8 MiB of DRAM: demotes to NVMe
                c.put(b"k%d" % i, value(i, size))
            deadline = time.monotonic() + 60
            nv = None
            while time.monotonic() < deadline:
                nv = next(t for t in c.stats().tiers if t.name == "nvme")
                if nv.counters["demotions"] > 0:
                    break
                time.sleep(0.2)
            assert nv is not None and nv.counters["demotions"] > 0
            for i in range(60):
                assert c.get(b"k%d" % i) == value(i, size)
            assert nv.io_backend in ("io_uring", "threads")
            if nv.io_backend == "threads":  # qemu-user 7.2 has no io_uring syscalls
                assert nv.counters["io_backend_fallback"] == 1
                assert nv.io_backend_reason
                assert "falls back to pread/pwrite threads" in d.log_path.read_text(errors="replace")
                # ... and kvstore-cli status says so
                import json
                import subprocess
                import sys

                from daemonutil import ROOT
                env = {**os.environ, "PYTHONPATH": f"{ROOT / 'client'}{os.pathsep}{ROOT}"}
                out = subprocess.run([sys.executable, "-m", "kvstore.cli", "-a", d.control, "status"],
                                     capture_output=True, text=True, timeout=60, env=env)
                assert out.returncode == 0, out.stderr
                assert "nvme io" in out.stdout and "threads (FALLBACK: " in out.stdout, out.stdout
                js = subprocess.run([sys.executable, "-m", "kvstore.cli", "-a", d.control, "status",
                                     "--json"], capture_output=True, text=True, timeout=60, env=env)
                doc = json.loads(js.stdout)
                assert doc["nvme_io_backend"] == "threads" and doc["nvme_io_backend_reason"]
        assert d.alive()
    finally:
        rc = d.stop(timeout=60)
    assert rc == 0, d.log()


@pytest.mark.timeout(120)
def test_native_placement_on_epyc_milan():
    """kvstore._placement (the SDK's placement in C, linked to the system libxxhash) on the
    same CPU: it loads, and its slots are the Python path's for a few hundred keys."""
    import subprocess
    import sys

    pytest.importorskip("kvstore._placement", reason="built without libxxhash headers")
    from daemonutil import ROOT
    code = (
        "import os\n"
        "from kvstore import layout, placement as pl\n"
        "assert pl._NATIVE, 'the C path is not in use'\n"
        "ms = [pl.Member(f'n{i}', f'127.0.0.1:{7000 + i}', f'd{i % 3}') for i in range(7)]\n"
        "p = layout.Policy.parse('ec:3+2')\n"
        "keys = [os.urandom(32) for _ in range(300)]\n"
        "c = [layout.slots(layout.placement_key(k, p), ms, p, 'ns') for k in keys]\n"
        "pl._NATIVE = False\n"
        "py = [layout.slots(layout.placement_key(k, p), ms, p, 'ns') for k in keys]\n"
        "assert c == py\n"
        "print('ok', len(keys))\n")
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'client'}{os.pathsep}{ROOT}"}
    r = subprocess.run([QEMU, "-cpu", "EPYC-Milan", sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=110, env=env)
    assert r.returncode == 0 and r.stdout.startswith("ok 300"), r.stderr[-2000:]
