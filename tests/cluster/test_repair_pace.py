"""Repair yields to the node's clients while they wait (kvstored/cluster/repair/pace.py).

The pace rule on a scripted clock and load; then five real kvstored processes under a
real etcd: a client reading from n0 while n4's records are rebuilt makes n0's repair
wait, the survivors that serve only their peers' repair (its reads and writes carry
wire.FLAG_REPAIR) never wait, and full redundancy comes back.
"""
from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request

import pytest
from etcdutil import needs_etcd

from kvstored.cluster.repair import pace as pc
from kvstored.cluster.repair.pace import Pace, next_pace, wait_for


# ---------------------------------------------------------------- the rule

class Load:
    """A scripted NodeLoad: the loop's recent lag and when clients were last answered."""

    def __init__(self):
        self.lag_s, self.clients_at = 0.0, float("-inf")

    def lag(self) -> float:
        return self.lag_s


class Clock:
    def __init__(self):
        self.t, self.slept = 100.0, []

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.t += s


def _pace(load, clock, yield_lag=0.002, min_pace=0.2) -> Pace:
    return Pace(yield_lag, min_pace, load, clock=clock, sleep=clock.sleep)


def test_next_pace_halves_to_the_floor_and_recovers_over_time():
    assert next_pace(1.0, True, 0.0, 0.2) == 0.5
    assert next_pace(0.3, True, 0.0, 0.2) == 0.2  # never below the floor
    assert next_pace(0.2, False, pc.RECOVER_S / 2, 0.2) == pytest.approx(0.7)
    assert next_pace(0.9, False, 10.0, 0.2) == 1.0  # never above full speed
    assert next_pace(0.5, False, -1.0, 0.2) == 0.5  # a clock step back adds nothing


def test_wait_is_proportional_to_work_and_bounded():
    assert wait_for(1.0, 0.1) == 0.0
    assert wait_for(0.5, 0.01) == pytest.approx(0.01)  # half the time working
    assert wait_for(0.2, 0.01) == pytest.approx(0.04)
    assert wait_for(0.2, 10.0) == pc.MAX_WAIT_S
    assert wait_for(0.2, 0.0) == 0.0


def test_yields_only_while_clients_wait_and_lag():
    load, clock = Load(), Clock()
    p = _pace(load, clock)
    p.begin()
    # the loop lags (repair's own work, say) but no client asked: full speed
    load.lag_s = 0.050
    for _ in range(5):
        clock.t += 0.01
        assert p.step() == 0.0
    assert p.pace == 1.0 and p.yielded_s == 0.0
    # clients answered and the loop lags: the pace halves per step down to the floor, and
    # each step waits in proportion to the work before it
    waits = []
    for _ in range(5):
        load.clients_at = clock.t
        clock.t += 0.01
        waits.append(p.step())
    assert p.pace == 0.2
    assert waits[0] == pytest.approx(0.01) and waits[-1] == pytest.approx(0.04)
    assert p.yielded_s == pytest.approx(sum(waits))
    # clients still there, the loop no longer lags: back to full speed over RECOVER_S
    load.lag_s = 0.0005
    for _ in range(20):
        load.clients_at = clock.t
        clock.t += pc.RECOVER_S / 10
        p.step()
    assert p.pace == 1.0
    # clients gone for HOLD_S, the loop lagging again: no waits
    load.lag_s = 0.050
    clock.t += pc.HOLD_S
    assert p.step() == 0.0 and p.pace == 1.0


def test_waits_follow_the_work_clock_not_the_wall():
    """Time spent waiting on peers is no work of this node's: the wait follows the
    ``work`` clock (the agent's: its thread's CPU and its hops onto the loop)."""
    load, clock = Load(), Clock()
    load.lag_s = 0.050
    work = [0.0]
    p = Pace(0.002, 0.2, load, clock=clock, sleep=clock.sleep, work=lambda: work[0])
    p.begin()
    clock.t += 0.3  # 300 ms waiting on a peer...
    work[0] += 0.01  # ...and 10 ms of work
    load.clients_at = clock.t
    assert p.step() == pytest.approx(0.01)  # pace 0.5: as long as it worked


class DataPlane:
    """The two things NodeLoad reads of the node's DataServer, with its real histograms."""

    def __init__(self):
        from kvstored.latency import LatencyHistogram
        self.hists = {op: LatencyHistogram() for op in ("get", "put", "shm_get", "auth", "ping")}
        self.counters: dict = {}

    def latency_by_name(self) -> dict:
        return self.hists

    def start_repair(self) -> None:  # a repair request is counted as such when it starts (ops.py)
        self.counters["repair_requests"] = self.counters.get("repair_requests", 0) + 1

    def answer(self, op: str) -> None:  # every request is counted when answered
        self.hists[op].observe(0.001)


def test_node_load_counts_clients_not_repair_requests():
    from kvstored.looplag import LoopLag
    from kvstored.cluster.repair.pace import NodeLoad
    lag, data = LoopLag(), DataPlane()
    data.answer("get")  # before the node's load is made: no client since
    load = NodeLoad(lag, data)
    assert load.tick in lag.ticks
    load.tick(10.0)
    assert load.clients_at == float("-inf")
    for t in range(20):  # peers' repair reads and writes (ticks in between), pings, auths
        data.start_repair()
        load.tick(11.0 + t)
        data.answer("get" if t % 2 else "put")
        data.answer("ping")
        data.answer("auth")
        load.tick(11.5 + t)
    assert load.clients_at == float("-inf")
    data.answer("shm_get")  # a client (same-host shm)
    load.tick(40.0)
    assert load.clients_at == 40.0
    lag.observe(0.004)
    assert load.lag() == 0.004


def test_off_and_bad_settings():
    load, clock = Load(), Clock()
    load.lag_s = 1.0
    off = _pace(load, clock, yield_lag=0.0)
    off.begin()
    clock.t += 1.0
    load.clients_at = clock.t
    assert off.step() == 0.0 and off.scale(64) == 64
    assert Pace(0.002, 0.2, None).step() == 0.0  # a node without a load never yields
    with pytest.raises(ValueError):
        Pace(-0.001, 0.2, load)
    with pytest.raises(ValueError):
        Pace(0.002, 0.01, load)
    with pytest.raises(ValueError):
        Pace(0.002, 1.5, load)


def test_settings_are_checked(tmp_path):
    from kvstored.config import load_config
    from kvstored.settings import ConfigError
    for line in ("repair_yield_lag = -1", "repair_yield_lag = 5", "repair_min_pace = 0.01",
                 "repair_min_pace = 2", 'repair_min_pace = "fast"'):
        path = tmp_path / "c.toml"
        path.write_text(f"[cluster]\n{line}\n")
        with pytest.raises(ConfigError, match="repair_"):
            load_config(str(path))
    path = tmp_path / "c.toml"
    path.write_text("[cluster]\nrepair_yield_lag = 0\nrepair_min_pace = 0.5\n")
    c = load_config(str(path))
    assert (c.cluster_repair_yield_lag, c.cluster_repair_min_pace) == (0.0, 0.5)


def test_cli_repair_line_shows_the_pace():
    from kvstore.cli import repair_line
    rep = {"state": "scanning", "passes": 3, "scanned": 120, "total": 500, "records_written": 12,
           "bytes_written": 48 << 20, "pending": 0, "dropped": 0, "failures": 0,
           "pass_seconds": 4.0, "rate": 1 << 20, "eta_seconds": 12.0, "pace": 0.2}
    assert repair_line(rep).endswith(", ETA 12s, yielding to clients (pace 0.20)")
    for pace in (1.0, 0.0):  # full speed; a node of an earlier version (no pace)
        assert "yielding" not in repair_line({**rep, "pace": pace})
    assert "yielding" not in repair_line({**rep, "state": "idle"})


# ---------------------------------------------------------------- a real cluster

MIB = 1 << 20


def _yielded(d) -> float:
    with urllib.request.urlopen(d.metrics_url + "/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("kvstored_repair_yield_seconds_total "):
                return float(line.split()[1])
    raise AssertionError("no kvstored_repair_yield_seconds_total in /metrics")


@needs_etcd
@pytest.mark.timeout(120)
def test_repair_waits_for_a_nodes_clients_and_still_finishes(etcd, start_daemon, tmp_path):
    """With cluster.repair_yield_lag at 1 us (any lag counts: the rule fires wherever
    clients are answered), n0, which a client reads from, waits while it rebuilds n4's
    records; n1-n3 serve only their peers' repair and never wait; redundancy comes back."""
    pytest.importorskip("pyeclib")
    import kvstore
    from etcdutil import TTL
    from clusterutil import (missing_redundancy, node_config, placement, placement_members,
                             wait_for, wait_left)
    from kvstore.cluster import ClusterClient
    from kvstore.layout import Policy

    extra = "repair_yield_lag = 0.000001\nrepair_min_pace = 0.2\n"
    ds = start_daemon.many(*((*node_config(tmp_path, etcd, f"n{i}", "rp", {"ec": "ec:3+2"},
                                           repair_interval=30, cluster_extra=extra),
                              "--dram-size", "128MiB") for i in range(5)))
    ids = {f"n{i}" for i in range(5)}
    for d in ds:
        wait_for(lambda d=d: placement(d) == ids, 15, "five nodes registered")
    objs = {f"p-{i}".encode(): os.urandom(MIB) for i in range(24)}
    with ClusterClient.from_cluster([d.control for d in ds], node_timeout=3.0) as cc:
        for i in range(0, len(objs), 8):
            cc.batch_put(list(objs.items())[i:i + 8], namespace="ec")
    reads = [(b"r-%d" % i, os.urandom(64 << 10)) for i in range(16)]
    with kvstore.Client(ds[0].control, namespace="plain", transport="tcp", shm=False) as c:
        c.batch_put(reads)
    time.sleep(2.5)  # records old enough for a pass (repair's YOUNG_S)

    stop, got, failed = threading.Event(), [0], []

    def reader():  # a client of n0 (a namespace without a policy: repair leaves it alone)
        end = time.monotonic() + 60
        with kvstore.Client(ds[0].control, namespace="plain", transport="tcp", shm=False) as c:
            while not stop.is_set() and time.monotonic() < end:
                k, v = reads[got[0] % len(reads)]
                if c.get(k) != v:
                    failed.append(k)
                got[0] += 1
                time.sleep(0.002)

    survivors = ds[:4]
    passes = {d.control: _status(d).passes for d in survivors}
    before = {d.control: _yielded(d) for d in survivors}
    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        ds[4].stop(signal.SIGKILL)
        wait_left(etcd, "rp", "n4", survivors, placement, TTL + 5, "n4 leaving")

        def repaired() -> bool:
            return all(r.passes > passes[d.control] and r.state == "idle" and r.pending == 0
                       for d, r in ((d, _status(d)) for d in survivors))
        wait_for(repaired, 60, "repair done on every survivor")
        waited = {d.control: _yielded(d) - before[d.control] for d in survivors}
    finally:
        stop.set()
        t.join(10)
    print(f"reads {got[0]}, waited for clients (s): {waited}")
    assert got[0] > 0 and not failed
    assert waited[ds[0].control] > 0, waited
    assert _status(ds[0]).yield_seconds >= waited[ds[0].control] - 0.01  # (Members().repair)
    assert all(waited[d.control] == 0 for d in survivors[1:]), waited
    members = placement_members(survivors[0])
    assert missing_redundancy(members, "ec", Policy.parse("ec:3+2"), objs) == []


def _status(d):
    import kvstore
    with kvstore.Client(d.control, timeout=5) as c:
        return c.members().repair
