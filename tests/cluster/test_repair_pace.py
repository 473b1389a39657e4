"""Repair yields to the node's clients while they wait (kvstored/cluster/repair/pace.py),
and peers' repair requests wait their turn behind them (kvstored/dataplane/plane.py
RepairQueue).

The pace rule on a scripted clock and load; the data plane's repair queue with real
sessions over a real Store (bytes in, bytes out, its waits run on an event loop); then
five real kvstored processes under a real etcd: a client reading from n0 while n4's
records are rebuilt makes n0's repair wait and holds its peers' repair requests, the
survivors that serve only their peers' repair (its reads and writes carry
wire.FLAG_REPAIR) never wait nor hold, and full redundancy comes back.
"""
from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import urllib.request

import pytest
from etcdutil import needs_etcd

from kvstore import errors
from kvstore.wire import (FLAG_REPAIR, FLAG_RESPONSE, HEADER_SIZE, OP_GET, OP_PING, OP_PUT, checksum,
                          decode, encode_request)
from kvstored.cluster.repair import pace as pc
from kvstored.cluster.repair.pace import Pace, next_pace, wait_for
from kvstored.dataplane import plane as dataplane
from kvstored.dataplane.ops import CORE_OPS
from kvstored.dataplane.session import DataSession, Plane


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
    data.counters["control_client_calls"] = 1  # a client's control call (control/service.py)
    load.tick(41.0)
    assert load.clients_at == 41.0
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


# ------------------------------------------- the data plane: repair waits its turn

NS = b"ns"
VALUE = os.urandom(48 << 10)
order: list = []  # (connection name, request id) as answers arrive, over all connections


def _store():
    from fakes import Clock
    from kvstored.engine import Store, StoreLimits
    return Store(StoreLimits(dram_size=8 * MIB, slab_size=MIB, max_value_size=MIB,
                             hugepages=False, prefault=False, reservation_timeout=30.0,
                             put_wait_timeout=0.3), clock=Clock())


class Conn:
    """Plays the transport (connection.py) around one real session: bytes in, answers
    out, its store calls (a held repair request's wait among them) run as tasks."""

    def __init__(self, plane: Plane, name: str):
        self.s, self.name = DataSession(plane, name), name
        self.wire, self.rest, self.tasks, self.got = bytearray(), b"", [], []

    def send(self, data: bytes) -> None:
        self.rest += data
        self.pump()

    def pump(self) -> None:
        s = self.s
        for _ in range(100):  # bounded: each round feeds or flushes something, or stops
            if self.rest and s.reading and not s.closed:
                self.rest = self.rest[s.feed(self.rest):]
            if not s.out:
                break
            for b in s.take_output():
                self.wire += bytes(b)
            s.written(0)
        for call in s.take_calls():
            call.task = asyncio.get_running_loop().create_task(self._run(call))
            self.tasks.append(call.task)
        while len(self.wire) >= HEADER_SIZE:
            h = decode(self.wire)
            end = HEADER_SIZE + h.length
            if len(self.wire) < end:
                break
            assert h.flags & FLAG_RESPONSE
            self.got.append((h, bytes(self.wire[HEADER_SIZE:end])))
            order.append((self.name, h.req_id))
            del self.wire[:end]

    async def _run(self, call) -> None:
        try:
            r = await call.fn(*call.args)
        except errors.KVStoreError as e:
            self.s.call_done(call, None, e)
        else:
            self.s.call_done(call, r, None)
        self.pump()

    async def answers(self, n: int, timeout: float = 10.0) -> list:
        """Wait (bounded) until ``n`` answers came; returns them."""
        end = time.monotonic() + timeout
        while len(self.got) < n and time.monotonic() < end:
            await asyncio.sleep(0.005)
        assert len(self.got) >= n, f"{self.name}: {len(self.got)} of {n} answers"
        return self.got[:n]


def _get(rid: int, flags: int = 0) -> bytes:
    return encode_request(OP_GET, rid, NS, b"k", flags=flags)


def _queue(waiting: list) -> tuple:
    """A plane whose store holds NS/k, its repair queue asking ``waiting[0]``."""
    plane = Plane(_store(), CORE_OPS)
    q = plane.repair_queue
    q.clients_waiting = lambda now: waiting[0]
    order.clear()
    return plane, q


async def _stored(plane: Plane) -> None:
    c = Conn(plane, "writer")
    c.send(encode_request(OP_PUT, 1, NS, b"k", len(VALUE), checksum(VALUE)) + VALUE)
    (h, _), = await c.answers(1)
    assert h.status == 0
    order.clear()


def test_a_repair_request_waits_behind_clients_and_keeps_its_connections_order():
    """While the node's clients wait, a peer's repair read waits for its turn (nothing
    after it on its connection is parsed); a client's read meanwhile is answered at once;
    at its turn the repair read and what followed it are answered, in order."""
    async def main():
        waiting = [True]
        plane, q = _queue(waiting)
        await _stored(plane)
        q.next_turn = time.monotonic() + 3600  # a turn was just taken (the next: below)
        peer, client = Conn(plane, "peer"), Conn(plane, "client")
        peer.send(_get(1, FLAG_REPAIR) + _get(2) + encode_request(OP_PING, 3, b"", b""))
        assert peer.got == [] and len(q.held) == 1 and not peer.s.reading
        assert plane.counters["repair_requests_held"] == 1
        client.send(_get(7))
        (h, v), = await client.answers(1)
        assert h.req_id == 7 and v == VALUE
        q.next_turn = time.monotonic()  # the next turn is now
        got = await peer.answers(3)
        assert [h.req_id for h, _ in got] == [1, 2, 3] and got[0][1] == got[1][1] == VALUE
        assert order == [("client", 7), ("peer", 1), ("peer", 2), ("peer", 3)]
        assert plane.counters["repair_requests"] == 1 and not q.held  # counted once
        assert plane.counters["repair_held_us"] > 0
    asyncio.run(main())


def test_a_repair_request_starts_by_its_deadline_when_turns_never_come():
    """Clients that never stop waiting and no turn free: the request still starts once it
    waited REPAIR_MAX_HOLD_S (repair finishes, however busy the node's clients are)."""
    async def main():
        plane, q = _queue([True])
        await _stored(plane)
        q.next_turn = time.monotonic() + 3600
        peer = Conn(plane, "peer")
        peer.send(_get(1, FLAG_REPAIR))
        assert peer.got == [] and q.held
        (h, v), = await peer.answers(1)
        assert h.req_id == 1 and v == VALUE and not q.held
        assert plane.counters["repair_held_us"] >= dataplane.REPAIR_MAX_HOLD_S * 1e6
    asyncio.run(main())


def test_held_repair_requests_start_oldest_first_one_per_turn_or_all_once_clients_stop():
    """Concurrent peers: held requests start in the order they came, one per turn while
    clients wait; once clients stop waiting, every held request starts."""
    async def main():
        waiting = [True]
        plane, q = _queue(waiting)
        await _stored(plane)
        q.next_turn = time.monotonic() + 3600
        peers = [Conn(plane, f"p{i}") for i in range(3)]
        for i, p in enumerate(peers):
            p.send(_get(i, FLAG_REPAIR))
        assert len(q.held) == 3 and not any(p.got for p in peers)
        q.next_turn = time.monotonic()  # turns from now on
        for p in peers:
            await p.answers(1)
        assert order == [("p0", 0), ("p1", 1), ("p2", 2)]
        q.next_turn = time.monotonic() + 3600  # no turn for the next ones...
        order.clear()
        for i, p in enumerate(peers):
            p.send(_get(10 + i, FLAG_REPAIR))
        assert len(q.held) == 3
        waiting[0] = False  # ...but clients stop waiting
        for p in peers:
            await p.answers(2, timeout=dataplane.REPAIR_MAX_HOLD_S / 2 + 5)
        assert order == [("p0", 10), ("p1", 11), ("p2", 12)] and not q.held
    asyncio.run(main())


def test_held_repair_requests_malformed_disconnected_draining_and_off():
    """A malformed repair write waits like any and then gets its typed error (its payload
    skipped, the connection goes on); one whose member list moved on while it waited is
    redirected; a connection lost while held leaves nothing held;
    a draining server starts none; with no rule (no repair pace) none is ever held."""
    async def main():
        plane, q = _queue([True])
        await _stored(plane)
        q.next_turn = time.monotonic() + 3600  # no turn: each starts by its deadline
        bad = Conn(plane, "bad")
        bad.send(encode_request(OP_PUT, 1, NS, b"x", 10, 0, flags=FLAG_REPAIR | 0x100) + b"0123456789"
                 + encode_request(OP_PING, 2, b"", b""))
        assert bad.got == [] and q.held
        (h1, body), (h2, _) = await bad.answers(2)
        assert h1.status == errors.InvalidArgument.code and b"flags" in body and h2.req_id == 2

        plane.gate.epoch = 5  # a repair read sent with the node's member list...
        moved = Conn(plane, "moved")
        moved.send(encode_request(OP_GET, 1, NS, b"k", flags=FLAG_REPAIR, epoch=5))
        assert moved.got == [] and q.held
        plane.gate.epoch = 6  # ...which moved on while it waited: redirected at its turn
        (h, _), = await moved.answers(1)
        assert h.status == errors.Redirect.code
        plane.gate.epoch = 0

        gone = Conn(plane, "gone")
        gone.send(_get(1, FLAG_REPAIR))
        assert q.held
        for call in gone.s.connection_lost():  # (what connection.py does)
            call.task.cancel()
        await asyncio.gather(*gone.tasks, return_exceptions=True)
        for _ in range(1000):  # bounded (10 s): the queue's next tick lets it go
            if not q.held:
                break
            await asyncio.sleep(0.01)
        assert not q.held and gone.got == []

        drained = Conn(plane, "drained")
        drained.send(_get(1, FLAG_REPAIR))
        assert q.held
        plane.draining = True
        await asyncio.wait_for(asyncio.gather(*drained.tasks), 10)
        assert not q.held and drained.got == [] and drained.s.waiting is None
        plane.draining = False

        q.clients_waiting = None  # no repair pace on this node (or repair_yield_lag = 0)
        free = Conn(plane, "free")
        free.send(_get(5, FLAG_REPAIR))
        assert [h.req_id for h, _ in free.got] == [5] and not free.tasks
    asyncio.run(main())


# ---------------------------------------------------------------- a real cluster

MIB = 1 << 20


def _yielded(d) -> float:
    return _metric(d, "kvstored_repair_yield_seconds_total")


def _metric(d, name: str) -> float:
    with urllib.request.urlopen(d.metrics_url + "/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


def _counter(d, name: str) -> int:
    import kvstore
    with kvstore.Client(d.control, timeout=5, shm=False) as c:
        return c.stats().counters.get(name, 0)


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

    extra = "repair_yield_lag = 0.000001\nrepair_min_pace = 0.2\nrepair_hold_requests = true\n"
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
        held = {d.control: _metric(d, "kvstored_repair_requests_held_total") for d in survivors}
        held_s = _metric(ds[0], "kvstored_repair_held_seconds_total")
    finally:
        stop.set()
        t.join(10)
    print(f"reads {got[0]}, waited for clients (s): {waited}, peers' repair requests held: "
          f"{held} ({held_s:.3f} s on n0)")
    assert got[0] > 0 and not failed
    assert waited[ds[0].control] > 0, waited
    assert _status(ds[0]).yield_seconds >= waited[ds[0].control] - 0.01  # (Members().repair)
    assert all(waited[d.control] == 0 for d in survivors[1:]), waited
    # peers' repair requests waited their turns on n0 only, each started by its deadline
    # (give or take the lateness of the queue's timer on a loaded host)
    assert held[ds[0].control] > 0, held
    assert all(held[d.control] == 0 for d in survivors[1:]), held
    assert held_s / held[ds[0].control] <= dataplane.REPAIR_MAX_HOLD_S + 2.0
    # a client's control call counts as client activity, monitoring calls do not
    calls = _counter(survivors[1], "control_client_calls")
    with kvstore.Client(survivors[1].control, namespace="plain", shm=False) as c:
        c.members()
        assert c.exists([b"r-0"]) is not None
    assert _counter(survivors[1], "control_client_calls") == calls + 1
    members = placement_members(survivors[0])
    assert missing_redundancy(members, "ec", Policy.parse("ec:3+2"), objs) == []


def _status(d):
    import kvstore
    with kvstore.Client(d.control, timeout=5) as c:
        return c.members().repair
