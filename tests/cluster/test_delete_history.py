"""The delete history (kvstored/engine/fence.py): deletes a cluster node remembers past
the delete fence's 60 s window, as (fingerprint, time) pairs bounded in age and count,
so Heads' ``deleted_ago`` keeps answering for a node back after a longer absence; and
kept across a clean restart. Mostly pure (a hand-moved clock); the last test runs real
etcd and kvstored processes: a delete a node missed while away stays deleted though
every peer restarted since."""
from __future__ import annotations

import os
import time

import pytest
from clusterutil import node_config, placement, placement_members, wait_for
from etcdutil import needs_etcd

from fakes import Clock
from kvstored.engine.fence import (MAX_TABLES, MIN_TABLE, TICK_S, WINDOW_S, DeleteFence, DeleteHistory,
                                   fingerprint)

HOUR = 3600.0


def _fence(clock, horizon: float = 24 * HOUR, max_keys: int = 100_000) -> DeleteFence:
    f = DeleteFence(clock=clock)
    f.history = DeleteHistory(horizon, max_keys, clock=clock)
    return f


def test_deleted_ago_answers_past_the_window_until_the_horizon():
    clock = Clock(1000.0)
    f = _fence(clock)
    f.record(b"ns", [b"a", b"b"])
    clock.advance(30.0)
    assert f.deleted_ago(b"ns", b"a") == pytest.approx(30.0)  # the fence's exact age
    clock.advance(3 * HOUR)  # far past the window: the history's, rounded up to a tick
    age = f.deleted_ago(b"ns", b"b")
    assert 3 * HOUR + 30.0 <= age <= 3 * HOUR + 30.0 + TICK_S
    assert f.deleted_ago(b"ns", b"never") == 0.0
    assert f.deleted_ago(b"other", b"a") == 0.0  # the namespace is part of the name
    assert f.refusal(b"ns", b"a") is None  # the history refuses no repair write
    clock.advance(21 * HOUR)  # past the horizon
    assert f.deleted_ago(b"ns", b"a") == 0.0


def test_without_a_history_the_fence_forgets_after_its_window():
    clock = Clock(0.0)
    f = DeleteFence(clock=clock)
    f.record(b"ns", [b"a"])
    clock.advance(WINDOW_S + 1)
    assert f.deleted_ago(b"ns", b"a") == 0.0 and "history_keys" not in f.stats()


def test_a_key_deleted_again_reports_its_latest_delete():
    clock = Clock(0.0)
    h = DeleteHistory(10 * HOUR, 10_000, clock=clock)
    h.add_many(b"ns", [b"k"], clock())
    clock.advance(2 * HOUR)  # the next table (span = horizon / 7)
    h.add_many(b"ns", [b"k", b"k"], clock())  # twice in one call: one entry
    clock.advance(60.0)
    assert clock() - h.deleted_at(b"ns", b"k") == pytest.approx(60.0, abs=TICK_S)
    assert len(h) == 2  # one per table


def test_namespace_deletes_are_remembered_too():
    clock = Clock(0.0)
    f = _fence(clock, horizon=HOUR)
    f.record_namespace(b"ns")
    f.record_namespace(None)  # DeleteAll of every namespace
    clock.advance(600.0)
    assert f.deleted_ago(b"ns", b"any") == pytest.approx(600.0)
    assert f.deleted_ago(b"x", b"any") == pytest.approx(600.0)
    clock.advance(HOUR)
    assert f.deleted_ago(b"ns", b"any") == 0.0


def test_count_bound_forgets_the_oldest_tables_and_says_so():
    clock = Clock(0.0)
    h = DeleteHistory(HOUR, 4096, clock=clock)
    for i in range(40):  # 40 x 512 keys, far over the bound
        h.add_many(b"ns", [b"k%d-%d" % (i, j) for j in range(512)], clock())
        clock.advance(1.0)
    s = h.stats()
    assert len(h) <= 4096 and s["keys"] == len(h) and s["tables"] <= MAX_TABLES
    assert s["overflowed"] == 40 * 512 - len(h) and h.floor > 0
    assert h.deleted_at(b"ns", b"k39-511") > float("-inf")  # the newest are kept
    assert h.deleted_at(b"ns", b"k0-0") == float("-inf")  # the oldest went early
    assert s["bytes"] <= 64 * len(h) + MAX_TABLES * MIN_TABLE * 12


def test_memory_follows_the_delete_rate():
    clock = Clock(0.0)
    h = DeleteHistory(24 * HOUR, 2_000_000, clock=clock)
    assert h.stats()["bytes"] == 0  # nothing before the first delete
    h.add_many(b"ns", [b"a"], clock())
    assert h.stats()["bytes"] == MIN_TABLE * 12
    keys = [b"key-%032d" % i for i in range(200_000)]
    for j in range(0, len(keys), 512):
        h.add_many(b"ns", keys[j:j + 512], clock())
    per_key = h.stats()["bytes"] / len(h)
    assert len(h) == 200_001 and 12 <= per_key <= 64, per_key
    assert all(h.deleted_at(b"ns", k) > float("-inf") for k in keys[::997])


def test_bad_bounds_and_fingerprints():
    with pytest.raises(ValueError):
        DeleteHistory(0, 10)
    with pytest.raises(ValueError):
        DeleteHistory(float("nan"), 10)
    with pytest.raises(ValueError):
        DeleteHistory(10, 0)
    assert fingerprint(b"ns", b"k") != 0 and fingerprint(b"ns", b"k") != fingerprint(b"n", b"sk")


def test_config_bounds():
    from kvstored.config import ConfigError, load_config
    c = load_config(None)
    assert (c.cluster_delete_horizon, c.cluster_delete_history_keys) == (86400.0, 2_000_000)
    for field, bad in (("cluster_delete_horizon", 10.0), ("cluster_delete_history_keys", 10)):
        with pytest.raises(ConfigError, match="outside"):
            load_config(None, {field: bad})


def test_saved_and_loaded_ages_only_grow(tmp_path, monkeypatch):
    clock = Clock(5000.0)
    h = DeleteHistory(HOUR, 100_000, clock=clock)
    h.add_many(b"ns", [b"a", b"b"], clock())
    clock.advance(600.0)
    h.add_many(b"ns", [b"c"], clock())
    h.add_namespace(b"gone", clock())
    clock.advance(10.0)
    path = str(tmp_path / "h.deletes")
    assert h.save(path) > 0
    ages = {k: clock() - h.deleted_at(b"ns", k) for k in (b"a", b"c")}
    # a new process (its monotonic clock elsewhere), 30 s of wall time later
    wall = __import__("time").time
    monkeypatch.setattr("kvstored.engine.fence.time.time", lambda: wall() + 30.0)
    clock2 = Clock(77.0)
    g = DeleteHistory(HOUR, 100_000, clock=clock2)
    assert g.load(path) == 3 and len(g) == 3
    for k, age in ages.items():
        assert age + 30.0 <= clock2() - g.deleted_at(b"ns", k) <= age + 30.0 + 1.0
    assert clock2() - g.deleted_at(b"gone", b"x") == pytest.approx(40.0, abs=1.0)
    assert g.deleted_at(b"ns", b"zz") == float("-inf")
    g.add_many(b"ns", [b"d"], clock2())  # goes on recording
    assert clock2() - g.deleted_at(b"ns", b"d") <= TICK_S and len(g) == 4
    # past the horizon at load: skipped
    monkeypatch.setattr("kvstored.engine.fence.time.time", lambda: wall() + 2 * HOUR)
    assert DeleteHistory(HOUR, 100_000, clock=Clock(1.0)).load(path) == 0


def test_a_damaged_history_file_is_refused(tmp_path):
    path = tmp_path / "h.deletes"
    h = DeleteHistory(HOUR, 1000, clock=Clock(1.0))
    h.add_many(b"ns", [b"a"], 1.0)
    h.save(str(path))
    data = path.read_bytes()
    for bad in (data[:-1], data[:10], b"", data[:20] + bytes([data[20] ^ 1]) + data[21:],
                b"XXXX" + data[4:]):
        path.write_bytes(bad)
        with pytest.raises(ValueError):
            DeleteHistory(HOUR, 1000, clock=Clock(1.0)).load(str(path))
    with pytest.raises(FileNotFoundError):
        DeleteHistory(HOUR, 1000).load(str(tmp_path / "none"))


def _node_args(tmp, etcd, name: str, extra: str = "") -> tuple[str, ...]:
    return node_config(tmp, etcd, name, "dh", {"rep": "replicas:2"}, repair_interval=2,
                       cluster_extra=extra, nvme=True)


@needs_etcd
@pytest.mark.timeout(180)
def test_delete_missed_while_away_stays_deleted_after_every_peer_restarted(etcd, start_daemon, tmp_path):
    """d0 goes away (SIGTERM) holding copies; they are deleted; then d1 and d2 restart
    (their delete fences, in memory, are gone); then d0 comes back. The peers' delete
    histories, saved at their shutdown and loaded at start, still say the keys were
    deleted after d0's copies were written: d0 drops them (before the history, nothing
    said so, and d0 kept and served them)."""
    import kvstore
    from kvstore import errors
    from kvstore.cluster import ClusterClient
    from kvstore.layout import Policy, placement_key, slots
    names = ["d0", "d1", "d2"]
    ds = dict(zip(names, start_daemon.many(*(_node_args(tmp_path, etcd, n) for n in names))))
    for d in ds.values():
        wait_for(lambda d=d: placement(d) == set(names), 20, "three nodes")
    rep = Policy.parse("replicas:2")
    members = placement_members(ds["d0"])
    on_d0 = [k for k in (f"x-{i}".encode() for i in range(400))
             if "d0" in {m.node_id for m, _ in slots(placement_key(k, rep), members, rep, "rep")}]
    objs = {k: os.urandom(1500 + i) for i, k in enumerate(on_d0[:10])}
    with ClusterClient.from_cluster([d.control for d in ds.values()], refresh_s=0.2) as cc:
        cc.batch_put(list(objs.items()), namespace="rep")
    time.sleep(2.5)  # older than the repair agent's young-record guard
    assert ds["d0"].stop(timeout=60) == 0  # away (a clean stop), its copies on NVMe
    rest = [ds["d1"], ds["d2"]]
    for d in rest:
        wait_for(lambda d=d: placement(d) == {"d1", "d2"}, 20, "d0 gone")
    gone = list(objs)[:6]
    with ClusterClient.from_cluster([d.control for d in rest], refresh_s=0.2) as cc:
        assert cc.delete(gone, namespace="rep") == len(gone)
    for n in ("d1", "d2"):  # every peer restarts (cleanly) while d0 is away
        assert ds[n].stop(timeout=60) == 0, ds[n].log()  # clean: SIGTERM, its history saved
        assert (tmp_path / f"{n}.nvme.deletes").exists(), ds[n].log()
        ds[n].start(30)
        with kvstore.Client(ds[n].control, timeout=5, shm=False, namespace="rep") as c:
            heads = c.heads(gone).heads
            assert all(not h.present and h.deleted_ago > 0 for h in heads), heads
            assert "kvstored_delete_history_keys" in _metrics(ds[n])
    ds["d0"].start(30)
    up = list(ds.values())
    for d in up:
        wait_for(lambda d=d: placement(d) == set(names), 30, "d0 back")
    with kvstore.Client(ds["d0"].control, timeout=5, shm=False, namespace="rep") as c:
        wait_for(lambda: c.stats().counters["unverified"] == 0, 60, "d0's records checked")
        rs = c.members().repair
        assert rs.dropped >= len(gone), (rs, ds["d0"].log())
        assert not any(h.present for h in c.heads(gone).heads)
    with ClusterClient.from_cluster([d.control for d in up], refresh_s=0.2) as cc:
        for k in gone:
            with pytest.raises(errors.NotFound):
                cc.get(k, namespace="rep")
        for k in list(objs)[6:]:
            assert cc.get(k, namespace="rep") == objs[k]


def _metrics(d) -> str:
    import urllib.request
    with urllib.request.urlopen(d.metrics_url + "/metrics", timeout=10) as r:
        return r.read().decode()


def _cluster_store(clock=None):
    """A real Store as a cluster node has it: its fence with a delete history, on
    ``clock`` (monotonic; a fake one is moved by hand)."""
    from kvstored.engine import Store, StoreLimits
    s = Store(StoreLimits(dram_size=8 << 20, slab_size=1 << 20, max_value_size=1 << 20,
                          hugepages=False, prefault=False), clock=Clock())
    s.fence = DeleteFence(clock=clock or Clock())
    s.fence.history = DeleteHistory(2 * HOUR, 10_000, clock=s.fence.clock)
    return s


def _decide(me, peer, ns: bytes, keys) -> dict:
    """What repair on ``me`` decides for each replicated object of ``keys`` it holds, with
    ``peer`` (a Store) its other home: Heads asked of it as the control plane answers
    them (control/service.py Heads), ``me``'s records as repair's snapshot reads them."""
    import asyncio

    from kvstore.layout import Policy
    from kvstore.placement import Member
    from kvstored.cluster.repair import decide as d
    from fakes import Head
    rows = {r[1]: r for r in asyncio.run(me.repair_snapshot()) if r[0] == ns}
    out = {}
    for k in keys:
        _ns, key, size, csum, unverified, *_, at = rows[k]
        o = d.Obj(ns, key, Policy.parse("replicas:2"), False)
        o.mine[0] = d.Local(key, size, csum, unverified, b"", at)
        o.slots = [(Member("me", "127.0.0.1:1"), 0), (Member("peer", "127.0.0.1:2"), 0)]
        e = peer.peek(ns, key)
        head = (Head(False, deleted_ago=peer.fence.deleted_ago(ns, key)) if e is None
                else Head(True, e.unverified, e.checksum))
        out[k] = d.decide(o, {("peer", 0): head}, d.Peers("me", {"peer": True}, {"peer": 0.0},
                                                             [], time.time()))
    return out


def test_a_node_away_past_the_window_drops_deleted_objects_and_keeps_re_put_ones():
    """Real Stores, the peer's clock moved by hand. ``me`` was away for an hour (past the
    fence's 60 s window, within the history's horizon) while a client deleted "gone" and
    "again" on the peer; then the client put "again" once more (identical bytes: on me a
    dedup) and the peer lost its copy (evicted). Repair on me deletes "gone" (the
    history's evidence: the delete came after me's record was written) and keeps
    "again": the re-put refreshed its commit time, so the old delete is no evidence
    against it (before the refresh, this case is why verified records were deleted only
    on a delete within 60 s). An object the peer merely lost is copied back; past the
    horizon a delete is evidence no more."""
    from kvstored.cluster.repair import decide as d
    pclock = Clock(50_000.0)
    me, peer = _cluster_store(), _cluster_store(pclock)
    objs = {k: os.urandom(3000) for k in (b"gone", b"again", b"lost")}
    try:
        for s in (me, peer):
            for k, v in objs.items():
                assert s.put_bytes(b"ns", k, v)
        for k in objs:  # me's copies were written two hours ago (wall clock)
            me.index.get(b"ns", k).committed_at = time.time() - 2 * HOUR + 600
        assert peer.delete(b"ns", [b"gone", b"again"]) == 2  # while me was away
        pclock.advance(HOUR)  # an hour later: far past WINDOW_S
        assert peer.fence.deleted_ago(b"ns", b"gone") >= HOUR > WINDOW_S
        assert me.put_bytes(b"ns", b"again", objs[b"again"]) is False  # the client's re-put
        assert peer.put_bytes(b"ns", b"again", objs[b"again"]) is True
        for k in (b"again", b"lost"):  # the peer loses its copies (evicted)
            assert peer.tiering.evict(peer.index.get(b"ns", k))
        acts = _decide(me, peer, b"ns", objs)
        assert acts[b"gone"] == [d.DeleteLocal(b"gone")]
        assert acts[b"again"] == [d.Copy(b"again", 1, b"again", False)]
        assert acts[b"lost"] == [d.Copy(b"lost", 1, b"lost", False)]
        # past the peer's horizon its history is no evidence: kept, copied back
        pclock.advance(2 * HOUR)
        assert _decide(me, peer, b"ns", [b"gone"])[b"gone"] == [d.Copy(b"gone", 1, b"gone", False)]
    finally:
        me.close()
        peer.close()


def test_a_refreshed_commit_time_never_makes_identical_copies_differ():
    """Two homes hold the same bytes; one was re-put since (its commit time refreshed),
    the other not. Repair on either finds nothing to do, as before the refresh: versions
    are compared by checksum (EC: header), never by commit time. A held copy beside a
    verified one is verified, whichever is the newer; and a delete the peer saw before
    the re-put does not count against the re-put copy."""
    from kvstored.cluster.repair import decide as d
    a, b = _cluster_store(), _cluster_store()
    v = os.urandom(5000)
    try:
        for s in (a, b):
            assert s.put_bytes(b"ns", b"k", v)
        before = (_decide(a, b, b"ns", [b"k"]), _decide(b, a, b"ns", [b"k"]))
        assert before == ({b"k": []}, {b"k": []})
        b.index.get(b"ns", b"k").committed_at -= HOUR  # b's copy is an hour older ...
        assert a.put_bytes(b"ns", b"k", v) is False  # ... and a's re-put just now
        assert (_decide(a, b, b"ns", [b"k"]), _decide(b, a, b"ns", [b"k"])) == before
        # b restarted: its copy held; a's verified (refreshed) one vouches for it
        assert b.hold_all() == 1
        assert _decide(b, a, b"ns", [b"k"]) == {b"k": [d.Verify(b"k")]}
    finally:
        a.close()
        b.close()


def test_a_running_node_saves_its_history_while_it_changes(tmp_path):
    """keep_saving (the node's task): a crash loses at most one interval of deletes; an
    older snapshot never replaces a newer file (a periodic write still running when the
    shutdown's save is made)."""
    import asyncio

    from kvstored.cluster import history as hist
    path = tmp_path / "n.deletes"
    h = DeleteHistory(HOUR, 10_000)
    h.path = str(path)

    async def run():
        task = asyncio.get_running_loop().create_task(hist.keep_saving(h, 0.05))
        try:
            h.add_many(b"ns", [b"a"], h.clock())
            deadline = time.monotonic() + 30
            while not path.exists() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert path.exists()
        finally:
            task.cancel()
    asyncio.run(run())
    g = DeleteHistory(HOUR, 10_000)
    assert g.load(str(path)) == 1 and g.deleted_at(b"ns", b"a") > float("-inf")
    old = (h.snapshot(), h.changes)
    h.add_many(b"ns", [b"b"], h.clock())
    hist.save_history(h)  # the newest
    hist._write(h, *old)  # a late periodic write of an older snapshot: skipped
    g = DeleteHistory(HOUR, 10_000)
    assert g.load(str(path)) == 2
    # unwritable: logged, the node goes on
    h.path = str(tmp_path / "no-such-dir" / "x")
    hist.save_history(h)


def test_history_file_beside_the_nvme_tier_file(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from kvstored.cluster.history import history_file

    def cfg(nvme="", where="", port=7070):  # the settings it reads
        return SimpleNamespace(nvme_path=nvme, cluster_delete_history_file=where,
                               control_port=port)
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    nvme = str(tmp_path / "tier.nvme")
    assert history_file(cfg(nvme)) == f"{nvme}.deletes"  # created at start
    (tmp_path / "tier.nvme").write_bytes(b"")
    assert history_file(cfg(nvme)) == f"{nvme}.deletes"
    assert history_file(cfg(nvme, "off")) is None
    assert history_file(cfg("", str(tmp_path / "h"))) == str(tmp_path / "h")
    assert history_file(cfg()) is None  # no NVMe tier: memory only
    assert history_file(cfg("/dev/null")) is None  # a device: nothing beside it
    # under systemd (StateDirectory=): there, named after the control port
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path}:/elsewhere")
    assert history_file(cfg()) == str(tmp_path / "kvstored-7070.deletes")
    assert history_file(cfg("/dev/null")) == str(tmp_path / "kvstored-7070.deletes")
    assert history_file(cfg(nvme)) == f"{nvme}.deletes"  # beside the tier's file first
    assert history_file(cfg(port=0)) is None  # any free port: no name that lasts
    assert history_file(cfg(where="off")) is None
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "missing"))
    assert history_file(cfg()) is None


def _history_config(tmp_path, where: str | None = None, nvme: str = ""):
    from types import SimpleNamespace
    return SimpleNamespace(cluster_delete_horizon=HOUR, cluster_delete_history_keys=10_000,
                           cluster_delete_history_file=str(tmp_path / "n.deletes")
                           if where is None else where, nvme_path=nvme)


def _files(tmp_path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("n.deletes"))


def test_journaled_deletes_survive_a_crash_up_to_a_torn_record(tmp_path):
    """Every delete call is appended to the journal as it is made: a process that dies
    without saving (nothing of save_history or keep_saving ran) leaves them on disk, and
    the next start replays them, then writes one snapshot holding them and removes the
    journals; a record a crash cut short is the end of what is read."""
    from kvstored.cluster.history import open_history, save_history
    cfg = _history_config(tmp_path)
    f = DeleteFence()
    f.history = h = open_history(cfg)
    assert _files(tmp_path) == ["n.deletes.journal-1"]  # nothing saved yet: no snapshot
    f.record(b"ns", [b"a", b"b"])
    f.record_namespace(b"gone")
    h.journal.append(b"\x01\x00\x00\x00\xff\xff")  # a record cut short (a torn write)
    # the process dies here: its journal descriptor is simply left behind
    g = open_history(cfg)
    assert g.deleted_at(b"ns", b"a") > float("-inf") and g.deleted_at(b"ns", b"b") > float("-inf")
    assert g.deleted_at(b"gone", b"any") > float("-inf") and g.deleted_at(b"ns", b"c") == float("-inf")
    assert g.clock() - g.deleted_at(b"ns", b"a") < 60.0  # aged by the wall clock since written
    assert _files(tmp_path) == ["n.deletes", "n.deletes.journal-2"]  # compacted at start
    g.add_many(b"ns", [b"c"], g.clock())
    k = open_history(cfg)  # a second crash: the snapshot, then journal 2
    assert all(k.deleted_at(b"ns", x) > float("-inf") for x in (b"a", b"b", b"c"))
    assert _files(tmp_path) == ["n.deletes", "n.deletes.journal-3"]
    save_history(k)  # a clean stop: all in the snapshot, no journal left
    assert _files(tmp_path) == ["n.deletes"]
    assert open_history(cfg).deleted_at(b"ns", b"c") > float("-inf")
    for j in (h.journal, g.journal):
        j.close()


def test_keep_saving_syncs_the_journal_and_compacts_it(tmp_path):
    import asyncio

    from kvstored.cluster.history import keep_saving, open_history, save_history
    cfg = _history_config(tmp_path)
    h = open_history(cfg)

    async def run():
        task = asyncio.get_running_loop().create_task(keep_saving(h, 0.2, 0.02))
        try:
            h.add_many(b"ns", [b"a"], h.clock())
            deadline = time.monotonic() + 30
            while h.journal.dirty and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert not h.journal.dirty  # fsynced by the task
            while "n.deletes" not in _files(tmp_path) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            while len(_files(tmp_path)) > 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)  # (the old journal goes once the snapshot is in)
        finally:
            task.cancel()
    asyncio.run(run())
    assert _files(tmp_path) == ["n.deletes", "n.deletes.journal-2"]
    h.add_many(b"ns", [b"b"], h.clock())  # in journal 2 only
    g = open_history(cfg)
    assert g.deleted_at(b"ns", b"a") > float("-inf") and g.deleted_at(b"ns", b"b") > float("-inf")
    for x in (h, g):
        save_history(x)
    assert _files(tmp_path) == ["n.deletes"]


def test_without_a_file_the_history_is_memory_only_and_start_up_says_so(tmp_path, caplog):
    import logging

    from kvstored.cluster.history import open_history
    with caplog.at_level(logging.WARNING, logger="kvstored.cluster"):
        h = open_history(_history_config(tmp_path, where=""))  # no NVMe tier, no path
    assert h.path is None and h.journal is None
    assert "cluster.delete_history_file" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kvstored.cluster"):
        assert open_history(_history_config(tmp_path, where="off")).path is None
    assert caplog.text == ""  # asked for: nothing to say


def test_a_session_13_snapshot_still_loads(tmp_path):
    from kvstored.engine import fence
    h = DeleteHistory(HOUR, 1000, clock=Clock(10.0))
    h.add_many(b"ns", [b"a"], 10.0)
    parts = h.snapshot()
    head = fence._FILE_HEAD.unpack(parts[0])
    parts[0] = fence._FILE_HEAD_V1.pack(head[0], 1, *head[2:5])  # no generation
    h.write(str(tmp_path / "v1"), parts)
    g = DeleteHistory(HOUR, 1000, clock=Clock(10.0))
    assert g.load(str(tmp_path / "v1")) == 1 and g.generation == 0


def test_a_node_without_nvme_keeps_its_deletes_through_sigkill(start_daemon, tmp_path):
    """A real daemon (a cluster node of static peers: no etcd needed; no NVMe tier, its
    history at cluster.delete_history_file) deletes keys and a namespace, is SIGKILLed,
    and answers Heads for them after its restart: the journal had them on disk."""
    import signal
    import socket

    import kvstore
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    cfg = tmp_path / "n.toml"
    cfg.write_text(f'[node]\nid = "solo"\n[cluster]\nenabled = true\nrepair = false\n'
                   f'static_peers = "{dead}"\n'
                   f'delete_history_file = "{tmp_path / "n.deletes"}"\n')
    d = start_daemon("--config", str(cfg))
    keys = [b"k%d" % i for i in range(5)]
    with kvstore.Client(d.control, timeout=10, shm=False, namespace="ns") as c:
        c.batch_put([(k, b"v" * 100) for k in keys])
        assert c.delete(keys[:3]) == 3
        c.put(b"x", b"y", namespace="gone")
        c.delete_all(namespace="gone")
    assert d.stop(signal.SIGKILL) == -signal.SIGKILL
    assert not (tmp_path / "n.deletes").exists()  # never saved: only the journal has them
    d.start(30)
    with kvstore.Client(d.control, timeout=10, shm=False, namespace="ns") as c:
        heads = c.heads(keys).heads
        assert [h.deleted_ago > 0 for h in heads] == [True] * 3 + [False] * 2, heads
        assert not any(h.present for h in heads)  # (no NVMe: the objects did not survive)
        assert c.heads([b"any"], namespace="gone").heads[0].deleted_ago > 0
    assert "delete journal replayed" in d.log()
    assert _files(tmp_path) == ["n.deletes", "n.deletes.journal-2"]


def test_a_journal_that_cannot_be_written_is_set_aside_until_the_next_snapshot(tmp_path, caplog):
    """A failed append (disk full, here a descriptor open for reading) is logged once,
    the journal closed; deletes go on in memory, and the next snapshot holds them and
    opens a new journal."""
    import logging

    from kvstored.cluster.history import open_history, save_history
    cfg = _history_config(tmp_path)
    h = open_history(cfg)
    j = h.journal
    good = j.fd
    j.fd = os.open(os.devnull, os.O_RDONLY)  # (the journal's own descriptor stays open meanwhile)
    with caplog.at_level(logging.WARNING, logger="kvstored.cluster"):
        h.add_many(b"ns", [b"a"], h.clock())
        h.add_many(b"ns", [b"b"], h.clock())
    assert j.fd is None and caplog.text.count("delete journal") == 1
    assert h.deleted_at(b"ns", b"b") > float("-inf")  # in memory
    j.sync()  # closes the descriptor set aside
    os.close(good)
    save_history(h)  # the snapshot holds them
    g = open_history(cfg)
    assert g.deleted_at(b"ns", b"a") > float("-inf") and g.journal.fd is not None
    g.journal.close()
