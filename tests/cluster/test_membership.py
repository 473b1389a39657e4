"""Cluster membership against a real etcd and real kvstored processes (no mocks).

Needs the ``etcd`` binary (``make test`` installs Debian's etcd-server) and the ``aetcd``
package; each is skipped with a reason when missing.
"""
from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from clusterutil import wait_left
from etcdutil import TTL, Etcd, _free_port, etcd_keys, needs_etcd

import kvstore

pytestmark = pytest.mark.timeout(120)


def _config(tmp: Path, fname: str, **cluster) -> str:
    lines = ["[cluster]", "enabled = true", f"lease_ttl = {TTL}"]
    for k, v in cluster.items():
        lines.append(f"{k} = {v!r}".replace("'", '"') if isinstance(v, str) else f"{k} = {v}")
    path = tmp / f"{fname}.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _members(d):
    with kvstore.Client(d.control, timeout=5.0) as c:
        return c.members()


def _wait(pred, timeout: float, what: str, step: float = 0.1):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(step)
    raise AssertionError(f"{what} not within {timeout}s (last: {last!r})")


def _ids(d) -> set[str]:
    return {m.node_id for m in _members(d).members}


def _health(d):
    with kvstore.Client(d.control, timeout=5.0) as c:
        return c.health()


@needs_etcd
def test_three_nodes_see_each_other_and_a_dead_one_leaves(etcd, start_daemon, tmp_path):
    ds = [start_daemon("--config", _config(tmp_path, f"n{i}", etcd_endpoints=etcd.endpoint,
                                           failure_domain=f"rack{i}", name="t3"))
          for i in range(3)]
    ids = {d.info["node_id"] for d in ds}
    t0 = time.monotonic()
    for d in ds:
        _wait(lambda d=d: _ids(d) == ids, 10, f"{d.info['node_id']} seeing all three")
    print(f"all three registered and seen in {time.monotonic() - t0:.2f}s")

    r = _members(ds[0])
    assert r.source == "etcd" and not r.degraded and r.cluster == "t3"
    by_id = {m.node_id: m for m in r.members}
    for i, d in enumerate(ds):
        m = by_id[d.info["node_id"]]
        assert m.control_address == d.control
        assert m.data_address == f"127.0.0.1:{d.data_port}"
        assert m.failure_domain == f"rack{i}"
        assert m.dram_capacity_bytes == 64 << 20
        assert m.health == "alive" and m.version
    assert [m.self for m in r.members].count(True) == 1
    assert _health(ds[0]).status == "serving"

    victim = ds[2]
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(5)
    gone = victim.info["node_id"]
    t0 = time.monotonic()
    # etcd drops the key when the lease runs out (its own latency, stretched by a loaded
    # disk); the nodes drop the member from their views within TTL + 4 s of that
    wait_left(etcd, "t3", gone, ds[:2], _ids, TTL + 4, f"{gone} leaving the views")
    print(f"killed node dropped after {time.monotonic() - t0:.2f}s (lease_ttl {TTL}s)")

    # a clean stop revokes the lease: the key is gone from etcd when the process has
    # exited, no TTL wait, and the others drop the node
    ds[1].stop()
    assert b"/kvstored/t3/members/" + ds[1].info["node_id"].encode() not in etcd_keys(etcd, b"/kvstored/t3/")
    _wait(lambda: ds[1].info["node_id"] not in _ids(ds[0]), TTL + 4, "SIGTERM'd node leaving")


@needs_etcd
def test_etcd_lost_and_back(etcd, start_daemon, tmp_path):
    ds = [start_daemon("--config", _config(tmp_path, f"n{i}", etcd_endpoints=etcd.endpoint))
          for i in range(2)]
    ids = {d.info["node_id"] for d in ds}
    for d in ds:
        _wait(lambda d=d: _ids(d) == ids, 10, "both registered")

    etcd.stop()
    for d in ds:
        _wait(lambda d=d: _members(d).degraded, TTL + 6, "degraded after etcd loss")
    h = _health(ds[0])
    assert h.ready and h.status == "degraded"
    r = _members(ds[0])
    assert {m.node_id for m in r.members} == ids  # last known list, kept
    assert {m.health for m in r.members if not m.self} == {"stale"}
    assert "etcd" in r.detail
    with kvstore.Client(ds[0].control, namespace="t", timeout=5.0) as c:  # still serving
        c.put(b"k", b"v" * 1000)
        assert bytes(c.get(b"k")) == b"v" * 1000

    etcd.start()  # same data dir and ports
    t0 = time.monotonic()
    for d in ds:
        _wait(lambda d=d: not _members(d).degraded and _ids(d) == ids, 20, "re-registered")
    print(f"re-registered {time.monotonic() - t0:.2f}s after etcd came back")
    assert _health(ds[1]).status == "serving"
    for d in ds:
        assert "registered in cluster" in d.log()


@needs_etcd
def test_etcd_unreachable_at_start(start_daemon, tmp_path):
    port = _free_port()  # nothing listens here
    d = start_daemon("--config", _config(tmp_path, "n", etcd_endpoints=f"127.0.0.1:{port}"))
    with kvstore.Client(d.control, namespace="t", timeout=5.0) as c:
        c.put(b"a", b"x" * 100)
        assert bytes(c.get(b"a")) == b"x" * 100
        h = c.health()
        assert h.ready and h.status == "degraded"
        r = c.members()
        assert r.degraded and r.source == "etcd"
        assert [m.node_id for m in r.members] == [d.info["node_id"]]
    _wait(lambda: "etcd unreachable" in d.log() and "retrying" in d.log(), 5, "retry log line")


@needs_etcd
def test_etcd_comes_up_after_the_daemon(tmp_path, start_daemon):
    e = Etcd(tmp_path)
    d = start_daemon("--config", _config(tmp_path, "n", etcd_endpoints=e.endpoint))
    assert _members(d).degraded
    e.start()
    try:
        _wait(lambda: not _members(d).degraded, 15, "registration once etcd is up")
        assert _health(d).status == "serving"
    finally:
        e.stop()


def test_static_peers(start_daemon, tmp_path):
    a = start_daemon()  # a standalone peer
    dead = f"127.0.0.1:{_free_port()}"
    d = start_daemon("--config", _config(tmp_path, "s", static_peers=f"{a.control}, {dead}"))
    r = _wait(lambda: (lambda r: r if any(m.health == "alive" and not m.self for m in r.members)
                       and any(m.health == "unreachable" for m in r.members) else None)(_members(d)),
              10, "static peers probed")
    assert r.source == "static" and not r.degraded
    by_addr = {m.control_address: m for m in r.members}
    assert by_addr[a.control].node_id == a.info["node_id"]
    assert by_addr[a.control].data_address == f"127.0.0.1:{a.data_port}"
    assert by_addr[dead].health == "unreachable"
    assert by_addr[d.control].self
    assert _health(d).status == "serving"
    assert _members(a).source == "standalone"


@pytest.mark.parametrize("toml, message", [
    ("[cluster]\nlease_ttl = 1\n", "cluster.lease_ttl: 1 is outside 2..3600"),
    ("[cluster]\nenabled = true\netcd_endpoints = \"nohost\"\n", "cluster.etcd_endpoints: 'nohost' is not host:port"),
    ("[cluster]\nenabled = true\netcd_endpoints = \"\"\n", "cluster.etcd_endpoints: empty"),
    ("[cluster]\nname = \"a/b\"\n", "cluster.name: 'a/b' must be"),
    ("[cluster]\nstatic_peers = \"h:0\"\n", "cluster.static_peers: 'h:0' is not host:port"),
    ("[cluster]\nenabled = \"yes\"\n", "cluster.enabled: expected true or false"),
    ("[cluster]\nlease = 5\n", "unknown setting 'cluster.lease' (did you mean 'cluster.lease_ttl'?)"),
])
def test_invalid_cluster_config_exits_2(tmp_path, toml, message):
    import os
    import sys

    from daemonutil import ROOT
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "client"), str(ROOT)]))
    p = subprocess.run([sys.executable, "-m", "kvstored", "--config", str(path)],
                       capture_output=True, text=True, timeout=30, env=env)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvstored: error: "), p.stderr
    assert message in lines[0]


def test_cli_nodes_and_async_members(start_daemon, capsys):
    import asyncio
    import json

    from kvstore.aio import AsyncClient
    from kvstore.cli import main
    d = start_daemon()
    assert main(["-a", d.control, "nodes"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "standalone membership" in out[0]
    assert out[1].split()[:3] == ["NODE", "CONTROL", "DATA"]
    assert out[2].startswith("* " + d.info["node_id"]) and d.control in out[2]
    assert main(["-a", d.control, "nodes", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["source"] == "standalone" and not doc["degraded"]
    assert [n["node_id"] for n in doc["nodes"]] == [d.info["node_id"]]

    async def amembers():
        async with AsyncClient(d.control) as c:
            return await c.members()
    r = asyncio.run(amembers())
    assert r.source == "standalone" and r.members[0].self


@needs_etcd
def test_etcd_with_authentication(etcd, start_daemon, tmp_path):
    from etcdutil import enable_auth
    enable_auth(etcd, "root", "s3cret")
    good = tmp_path / "pw"
    good.write_text("s3cret\n")
    bad = tmp_path / "bad"
    bad.write_text("wrong\n")
    a = start_daemon("--config", _config(tmp_path, "a", etcd_endpoints=etcd.endpoint,
                                         etcd_username="root", etcd_password_file=str(good)))
    _wait(lambda: not _members(a).degraded, 10, "registered with credentials")
    b = start_daemon("--config", _config(tmp_path, "b", etcd_endpoints=etcd.endpoint,
                                         etcd_username="root", etcd_password_file=str(bad)))
    c = start_daemon("--config", _config(tmp_path, "c", etcd_endpoints=etcd.endpoint))
    for d, why in ((b, "authentication failed"), (c, "user name is empty")):
        r = _wait(lambda d=d, why=why: (lambda r: r if why in r.detail else None)(_members(d)),
                  10, f"degraded with {why!r}")
        assert r.degraded
        assert _health(d).status == "degraded"
    assert {m.node_id for m in _members(a).members} == {a.info["node_id"]}  # only a got in
    # the password is never echoed: not in the log, not in --print-config
    assert "s3cret" not in a.log() and "wrong" not in b.log()
    # a password file that cannot be read is a config error at start (exit 2, one line)
    import os
    import sys

    from daemonutil import ROOT
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "client"), str(ROOT)]))
    p = subprocess.run([sys.executable, "-m", "kvstored", "--config",
                        _config(tmp_path, "d", etcd_endpoints=etcd.endpoint, etcd_username="root",
                                etcd_password_file=str(tmp_path / "missing"))],
                       capture_output=True, text=True, timeout=30, env=env)
    assert p.returncode == 2 and "cluster.etcd_password_file" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


@needs_etcd
def test_slow_etcd_reads_do_not_cost_the_lease(etcd, tmp_path, monkeypatch):
    """etcd answering renewals but slow to read (a loaded disk: a linearizable read waits
    for etcd's apply): the node keeps its lease and stays registered, and the watch keeps
    its member list current. Renewals used to start after registering and then wait behind
    each resync, so a read of 1.7 s let a 2 s lease expire (the node left its own cluster,
    rejoined, and while rejoining still placed on a dead member: a CI flake of
    test_repair); a read over the call timeout ended the session."""
    import asyncio
    import json

    import aetcd
    from etcdutil import etcd_delete, etcd_keys, etcd_put

    from kvstored.cluster.membership import ETCD_CALL_TIMEOUT, Membership
    from kvstored.config import load_config
    from kvstored.dataplane.policy import EpochGate
    from kvstored.status import NodeStatus

    cfg = load_config(None, {"cluster_enabled": True, "cluster_lease_ttl": TTL, "cluster_name": "slow",
                             "cluster_etcd_endpoints": etcd.endpoint})
    status = NodeStatus("s0", "127.0.0.1")
    status.control_port, status.data_port = 1, 2
    # the registering read, then the first resync: under, then over the call timeout
    delays = [TTL - 0.3, ETCD_CALL_TIMEOUT + 0.5]
    slow_reads, ended = [], []
    real_get_prefix = aetcd.Client.get_prefix

    async def slow_get_prefix(self, *a, **kw):
        if delays:
            slow_reads.append(delays[0])
            try:
                await asyncio.sleep(delays.pop(0))
            finally:
                ended.append(time.monotonic())  # answered, or given up by the caller
        return await real_get_prefix(self, *a, **kw)

    monkeypatch.setattr(aetcd.Client, "get_prefix", slow_get_prefix)
    m = Membership(cfg, status, EpochGate(), dram_capacity=1 << 20, tls=False)
    other = b"/kvstored/slow/members/s1"

    async def run() -> list[tuple[bool, int]]:
        m.start()
        seen = []
        try:
            t_end = time.monotonic() + 20
            while not m.registered and time.monotonic() < t_end:
                await asyncio.sleep(0.05)
            assert m.registered, m.detail
            lease = m._lease.id
            joined = False
            # until the second slow read has been given up, and one renewal interval more
            while (len(ended) < 2 or time.monotonic() < ended[-1] + 1.0) and time.monotonic() < t_end:
                seen.append((m.registered, m.registrations))
                if not joined and len(slow_reads) == 2:  # a member joins during the slow read
                    await asyncio.to_thread(etcd_put, etcd, other, json.dumps(
                        {"node_id": "s1", "control_address": "127.0.0.1:3",
                         "data_address": "127.0.0.1:4"}).encode())
                    joined = True
                await asyncio.sleep(0.1)
            assert joined and "s1" in m.members  # from the watch: that resync never answered
            await asyncio.to_thread(etcd_delete, etcd, other)
            t_gone = time.monotonic() + 5
            while "s1" in m.members and time.monotonic() < t_gone:
                await asyncio.sleep(0.05)
            assert "s1" not in m.members
            assert m._lease.id == lease and m.registered
        finally:
            await m.stop()
        return seen

    seen = asyncio.run(run())
    assert slow_reads == [TTL - 0.3, ETCD_CALL_TIMEOUT + 0.5] and len(ended) == 2
    assert seen and all(reg and n == 1 for reg, n in seen), [s for s in seen if not s[0] or s[1] != 1][:3]
    assert b"/kvstored/slow/members/s0" not in etcd_keys(etcd, b"/kvstored/slow/")  # stop revoked


def _in_process_member(etcd, name: str):
    """A Membership on this test's event loop (no daemon): its gate, and the ``hold`` of
    each drop it reported."""
    from kvstored.cluster.membership import Membership
    from kvstored.config import load_config
    from kvstored.dataplane.policy import EpochGate
    from kvstored.status import NodeStatus
    cfg = load_config(None, {"cluster_enabled": True, "cluster_lease_ttl": TTL, "cluster_name": name,
                             "cluster_etcd_endpoints": etcd.endpoint})
    status = NodeStatus("s0", "127.0.0.1")
    status.control_port, status.data_port = 1, 2
    gate = EpochGate()
    m = Membership(cfg, status, gate, dram_capacity=1 << 20, tls=False)
    holds: list[bool] = []
    m.on_dropped.append(holds.append)
    return m, gate, holds


async def _until(pred, timeout: float, what: str):
    import asyncio
    t_end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < t_end, f"{what} not within {timeout}s"
        await asyncio.sleep(0.05)


@needs_etcd
def test_a_stall_past_the_lease_is_a_drop_before_the_next_request(etcd):
    """A process stopped past its lease wakes registered in its own view, and runs the
    requests in its sockets before any timer of membership's: the gate's deadline (the
    last answered renewal + the TTL, less slack) makes the first keyed request after it
    drop the node (redirected, records held back) before it is answered; with no request,
    the renewal task finds it on waking. The node then registers again under a fresh
    lease. Here the stall is the event loop blocked past the TTL, as SIGSTOP leaves it."""
    import asyncio
    import math

    from kvstore import errors
    from kvstored.cluster.membership import DROPPED_EPOCH
    m, gate, holds = _in_process_member(etcd, "stall")

    async def run() -> None:
        m.start()
        try:
            await _until(lambda: m.registered, 20, "registered")
            epoch, lease = m.epoch, m._lease.id
            assert gate.epoch == epoch and time.perf_counter() < gate.deadline < math.inf
            gate.check_lease(time.perf_counter())
            assert gate.check(epoch) is None and not holds
            time.sleep(TTL + 0.5)  # the whole loop stops: no renewal, no timer
            gate.check_lease(time.perf_counter())  # the first request after waking
            assert isinstance(gate.check(epoch), errors.Redirect)
            assert holds == [True] and gate.epoch == DROPPED_EPOCH and gate.deadline == math.inf
            await _until(lambda: m.registered and m.registrations == 2, 20, "registered again")
            assert m._lease.id != lease and gate.epoch == m.epoch and gate.deadline < math.inf
            # no request comes after the next stall: the renewal task finds it on waking
            time.sleep(TTL + 0.5)
            await _until(lambda: m.registrations == 3, 20, "registered a third time")
            assert holds == [True, True] and m.drops == 2
        finally:
            await m.stop()

    asyncio.run(run())


@needs_etcd
def test_etcd_hung_is_not_taken_for_a_stall(etcd):
    """etcd that stops answering (hung: renewals neither answered nor refused) while this
    process runs: the deadline is disarmed before it passes (a renewal unanswered shortly
    before it), so the node keeps serving its local data, degraded, as whenever etcd is
    down; when etcd is back and the lease is gone, the rejoin checks records against the
    peers' deletes without holding them back (hold False)."""
    import asyncio
    import math
    m, gate, holds = _in_process_member(etcd, "hung")

    async def run() -> None:
        m.start()
        try:
            await _until(lambda: m.registered, 20, "registered")
            epoch = m.epoch
            etcd.proc.send_signal(signal.SIGSTOP)
            try:
                t_end = time.monotonic() + 3 * TTL  # past the lease, checking as requests do
                while time.monotonic() < t_end:
                    gate.check_lease(time.perf_counter())
                    assert gate.check(epoch) is None, m.detail
                    await asyncio.sleep(0.02)
                assert m.degraded and gate.deadline == math.inf and gate.epoch == epoch
                assert holds == [] and m.drops == 0
            finally:
                etcd.proc.send_signal(signal.SIGCONT)
            await _until(lambda: m.registered, 30, "registered again")
            assert holds in ([], [False]) and gate.epoch == m.epoch and gate.deadline < math.inf
        finally:
            await m.stop()

    asyncio.run(run())
