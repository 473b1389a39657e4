"""Admin DeleteAll and List over NVMe-only (keyless) objects through a real kvstored.

The tier file is written first (records as a node's disk holds them), so the daemon
starts with thousands of NVMe-only objects, indexed keyless. DeleteAll must remove them
(and they stay removed after a restart), keep the data path answering meanwhile, and be
refused to a token without the admin scope; List must name their keys.
"""
from __future__ import annotations

import asyncio
import hashlib
import mmap
import signal
import threading
import time

import pytest

import kvstore
from kvstore import errors
from kvstore.wire import checksum

from daemonutil import config
from threadutil import unqueued_clock

N_A = 10000  # the old DeleteAll read these keys synchronously: ~1 s with the loop stopped
N_B = 500
REGION = 16 << 20
SIZE = 512


def tier_size() -> int:
    from kvstored.engine.nvme import BLOCK, DATA_START
    per_region = (REGION - 2 * BLOCK) // (2 * BLOCK) - 8
    n = N_A + N_B
    return DATA_START + (-(-n // per_region) + -(-n * BLOCK // REGION) + 4) * REGION


def fill(path) -> None:
    from kvstored.engine.nvme import NvmeDevice, NvmeTier, align_up

    async def run():
        tier = NvmeTier(NvmeDevice(str(path), tier_size(), REGION, "threads", 32))
        buf = mmap.mmap(-1, align_up(SIZE))  # page-aligned: the tier may write O_DIRECT
        buf[:SIZE] = hashlib.sha256(b"x").digest() * (SIZE // 32)
        view = memoryview(buf)
        cs = checksum(view[:SIZE])
        todo = iter([(b"team-a", i) for i in range(N_A)] + [(b"team-b", i) for i in range(N_B)])
        past = time.time() - 60

        async def writer():
            for ns, i in todo:
                await tier.append(ns, b"key-%06d" % i, view, SIZE, cs, align_up(SIZE), past)
        try:
            await asyncio.gather(*(writer() for _ in range(16)))
        finally:
            tier.close()
    asyncio.run(run())


TOKENS = """
[[token]]
name = "admin"
token = "admin-token-0123456789abcd"
namespaces = ["*"]
scopes = ["admin"]

[[token]]
name = "rw"
token = "rw-token-0123456789abcdef"
namespaces = ["team-a"]
scopes = ["read", "write"]
"""


@pytest.fixture
def nvme_daemon(start_daemon, tmp_path):
    path = tmp_path / "tier.dat"
    fill(path)
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(TOKENS)
    tokens.chmod(0o600)
    cfg = config(tmp_path, f'[auth]\nenabled = true\ntokens_file = "{tokens}"\n')
    args = ["--config", cfg, "--nvme-path", str(path), "--nvme-size", str(tier_size()),
            "--nvme-region-size", str(REGION)]
    return start_daemon(*args), args


def admin(d, ns: str = "team-a") -> kvstore.Client:
    return kvstore.Client(d.control, namespace=ns, timeout=60, token="admin-token-0123456789abcd")


def rw(d) -> kvstore.Client:
    return kvstore.Client(d.control, namespace="team-a", timeout=10, token="rw-token-0123456789abcdef")


def test_delete_all_of_keyless_objects_serves_the_data_path_and_stays_deleted(nvme_daemon, start_daemon):
    d, args = nvme_daemon
    with admin(d) as a, rw(d) as c:
        assert a.list(namespace="").total == N_A + N_B
        # List names keyless objects' keys (read in bulk from NVMe), tier "nvme"
        got = c.list(limit=200)
        assert len(got.entries) == 200 and got.total == N_A
        for e in got.entries:
            assert e.key.startswith(b"key-") and e.tier == "nvme" and e.size == SIZE
        assert c.exists([e.key for e in got.entries[:20]]) == [True] * 20

        # a token without the admin scope is refused, and nothing is deleted
        with pytest.raises(errors.PermissionDenied):
            c.delete_all()
        assert c.list(limit=1).total == N_A

        # the data path keeps answering while DeleteAll walks N_A keyless objects
        stop = threading.Event()
        worst = [0.0, 0.0]  # put+get: with the run-queue waits left out, and wall time
        fresh: list[bytes] = []
        failures: list[BaseException] = []

        def pinger():
            try:
                # a loaded machine (CI) stretches each op by the time the daemon's loop and
                # this thread wait for a CPU (0.5 s and more at load 10): left out, while a
                # loop that walks the keys instead of serving still counts in full
                clock = unqueued_clock(d.info["pid"])
                with rw(d) as p:
                    for i in range(100000):  # bounded; ends with the DeleteAll
                        if stop.is_set():
                            return
                        k = b"ping-%05d" % i
                        t0, w0 = clock(), time.perf_counter()
                        p.put(k, b"p" * 2000)
                        assert p.get(k) == b"p" * 2000
                        worst[0] = max(worst[0], clock() - t0)
                        worst[1] = max(worst[1], time.perf_counter() - w0)
                        fresh.append(k)
                        time.sleep(0.002)
            except BaseException as e:  # reported by the main thread
                failures.append(e)

        t = threading.Thread(target=pinger)
        t.start()
        try:
            time.sleep(0.1)
            n = a.delete_all(namespace="team-a")
        finally:
            stop.set()
            t.join(30)
        assert not failures, failures
        assert len(fresh) > 3
        assert worst[0] < 0.5, f"a data-path put+get took {worst[0]:.3f} s during DeleteAll (wall {worst[1]:.3f} s)"
        assert N_A <= n <= N_A + len(fresh)
        # every original object is gone; the other namespace is untouched
        assert c.exists([b"key-%06d" % i for i in range(0, N_A, 101)]) == [False] * len(range(0, N_A, 101))
        assert a.list(namespace="team-b").total == N_B
        survivors = c.list(limit=10000)
        assert all(e.key.startswith(b"ping-") for e in survivors.entries)

        assert a.delete_all(namespace="") == N_B + survivors.total
        assert a.list(namespace="").total == 0
    assert d.stop(signal.SIGTERM) == 0
    d2 = start_daemon(*args)
    with admin(d2) as a:
        assert a.list(namespace="").total == 0, "deleted objects came back after a restart"
