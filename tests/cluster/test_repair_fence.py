"""A delete racing a repair pass leaves nothing behind (the delete fence, kvstored/engine/fence.py).

The race is forced, not hoped for: every node runs with KVSTORED_REPAIR_PAUSE
(kvstored/cluster/repair/pause.py), so a pass that has read its sources and rebuilt (or
copied) the missing records stops before writing them until the test lets it go. The
test deletes objects in between. Without the fence the paused writes land after the
delete: a deleted EC object answers Unavailable ("1 of 3 records") and a deleted
replicated one is served again. Real kvstored processes and a real etcd.

Also the wire flag's own cases on one daemon with auth: a token without the admin scope
cannot set FLAG_REPAIR, undefined PUT flags are refused, and a client's re-put after a
delete is stored (only repair writes are fenced).
"""
from __future__ import annotations

import os
import re
import signal
import socket
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from clusterutil import missing_redundancy, placement, placement_members, wait_for, wait_left
from etcdutil import TTL, needs_etcd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "security"))
pytest.importorskip("pyeclib")

import kvstore  # noqa: E402
from kvstore import errors  # noqa: E402
from kvstore.cluster import ClusterClient  # noqa: E402
from kvstore.layout import Policy, lap_key, placement_key  # noqa: E402
from kvstore.placement import Member  # noqa: E402
from kvstore.wire import (COMMIT_AGE, FLAG_COMMIT_AGE, FLAG_OVERWRITE, FLAG_REPAIR, OP_AUTH,  # noqa: E402
                          OP_PING, OP_PUT, checksum, encode_request)
from kvstored.cluster.repair.peers import FENCED, PeerIO  # noqa: E402
from secutil import response, token, write_tokens  # noqa: E402

pytestmark = pytest.mark.timeout(240)

MIB = 1 << 20
POLICIES = {"ec": "ec:2+1", "rep": "replicas:2"}


def _record_keys(ns: str, key: bytes) -> list[bytes]:
    """Every key a record of ``key`` can have on a node (EC: each lap of its fragment key)."""
    p = Policy.parse(POLICIES[ns])
    if p.kind != "ec":
        return [key]
    return [lap_key(placement_key(key, p), lap) for lap in range(p.n)]


def _records_left(nodes, ns: str, key: bytes) -> list[str]:
    """``node: key`` of every record of ``key`` any of ``nodes`` still holds."""
    left = []
    for d in nodes:
        with kvstore.Client(d.control, timeout=5) as c:
            ks = _record_keys(ns, key)
            for k, h in zip(ks, c.heads(ks, namespace=ns).heads):
                if h.present:
                    left.append(f"{d.name}: {k!r}")
    return left


def _metric(d, name: str) -> float:
    with urllib.request.urlopen(d.metrics_url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _paused(pause: Path) -> list[tuple[str, bytes]]:
    f = pause / "paused"
    if not f.exists():
        return []
    return [(ns, bytes.fromhex(k)) for ns, k in (line.split() for line in f.read_text().splitlines())]


def _object_of(ns: str, record_key: bytes, objs: dict) -> bytes | None:
    for k in objs[ns]:
        if record_key in _record_keys(ns, k):
            return k
    return None


def _race(nodes, pauses: dict, cc, objs: dict, kinds: tuple) -> tuple[dict, list]:
    """With every pause armed before a membership change: wait for passes that stopped
    before their writes (holding writes of each namespace in ``kinds``), delete every
    other object they hold through the cluster, then let them go. ({ns: deleted keys},
    the nodes that paused)."""
    def held_now() -> dict:
        return {d.name: _paused(pauses[d.name]) for d in nodes}

    def covered() -> bool:
        return {ns for recs in held_now().values() for ns, _k in recs} >= set(kinds)
    wait_for(covered, 60, f"passes paused before writing records of {kinds}")
    time.sleep(1.0)  # other passes pause too (each node leads its own objects)
    held = held_now()
    hit: dict[str, set] = {ns: set() for ns in objs}
    for recs in held.values():
        for ns, rk in recs:
            k = _object_of(ns, rk, objs)
            assert k is not None, (ns, rk)
            hit[ns].add(k)
    # every other held object is deleted between its pass's read and its write; the rest
    # are written as usual (the fence refuses only what was deleted)
    deleted = {ns: set(sorted(ks)[::2]) for ns, ks in hit.items()}
    for d in nodes:  # where each log stands at the deletes (_settled_without reads on from it)
        d.log_at_deletes = len(d.log_path.read_text(errors="replace"))
    for ns, ks in deleted.items():
        if ks:
            assert cc.delete(sorted(ks), namespace=ns) == len(ks)
            for k in ks:
                del objs[ns][k]
    for d in nodes:
        (pauses[d.name] / "armed").unlink()
    paused = [d for d in nodes if held[d.name]]
    wait_for(lambda: all((pauses[d.name] / "resumed").exists() for d in paused), 30,
             "the paused passes went on")
    return deleted, paused


def _settled_without(nodes, cc, deleted: dict, objs: dict) -> None:
    """Everything in ``objs`` back at full redundancy over ``nodes``, and what was deleted
    deleted for good: NotFound through the cluster, no record on any node, nothing left
    pending (no orphan looked at, and warned about, every pass)."""
    members = placement_members(nodes[0])
    for ns, kv in objs.items():
        wait_for(lambda ns=ns, kv=kv: not missing_redundancy(members, ns, Policy.parse(POLICIES[ns]), kv),
                 60, f"{ns} redundancy")
    passes = {d.name: _repair(d).passes for d in nodes}
    wait_for(lambda: all(_repair(d).passes >= passes[d.name] + 2 for d in nodes), 30, "two more passes")
    for ns, ks in deleted.items():
        for k in ks:
            with pytest.raises(errors.NotFound):
                cc.get(k, namespace=ns)
            assert _records_left(nodes, ns, k) == [], k
        assert cc.exists(sorted(ks), namespace=ns) == [False] * len(ks)
    # (a pass under load may leave something pending for a moment: a peer that timed out)
    wait_for(lambda: all((r := _repair(d)).pending == 0 and r.state == "idle" for d in nodes), 60,
             "nothing pending on any node")
    gone = [placement_key(k, Policy.parse(POLICIES[ns]))[:48].hex() for ns, ks in deleted.items() for k in ks]
    for d in nodes:  # no warning about a deleted object's fragments, once or every pass
        # (the log since the deletes, not Daemon.log(): its last 4000 characters are a few
        # repair passes', and a warning from the first passes after the deletes was out of sight)
        since = d.log_path.read_text(errors="replace")[d.log_at_deletes:]
        warned = [line for line in since.splitlines()
                  if ("fragments needed to rebuild" in line or "cannot rebuild" in line)
                  and any(g in line for g in gone)]
        assert warned == [], warned
    for ns, kv in objs.items():
        for k, v in kv.items():
            assert cc.get(k, namespace=ns) == v


@needs_etcd
def test_delete_between_a_passs_read_and_its_write_leaves_no_record(etcd, start_daemon, tmp_path):
    names = [f"f{i}" for i in range(5)]
    pauses = {n: tmp_path / f"pause-{n}" for n in names}
    args = {}
    for n in names:
        pauses[n].mkdir()
        cfg = tmp_path / f"{n}.toml"
        cfg.write_text(f'[node]\nid = "{n}"\n[cluster]\nenabled = true\nlease_ttl = {TTL}\n'
                       f'etcd_endpoints = "{etcd.endpoint}"\nrepair_delay = 0.5\nrepair_interval = 3\n'
                       f'policies = "ec={POLICIES["ec"]}, rep={POLICIES["rep"]}"\n')
        args[n] = ("--config", str(cfg), "--dram-size", "128MiB")

    def start(ns: list[str]) -> list:
        got = [start_daemon(*args[n], env={"KVSTORED_REPAIR_PAUSE": str(pauses[n])}) for n in ns]
        for d, n in zip(got, ns):
            d.name = n
        return got
    ds = start(names[:4])
    wait_for(lambda: all(len(placement(d)) == 4 for d in ds), 20, "four members")
    cc = ClusterClient.from_cluster([d.control for d in ds], node_timeout=3.0, refresh_s=0.2,
                                    down_s=1.0)
    objs = {"ec": {f"x-{i}".encode(): os.urandom(MIB + i) for i in range(16)},
            "rep": {f"r-{i}".encode(): os.urandom(50_000 + i) for i in range(16)}}
    for ns, kv in objs.items():
        cc.batch_put(list(kv.items()), namespace=ns)
    time.sleep(2.5)  # older than repair's young-record guard
    # 1. a node dies: the survivors rebuild its fragments (Reconstruct) and copy its
    # replicas (Copy); every pass stops before its first write, the deletes land there
    live = ds[1:]
    for d in live:
        (pauses[d.name] / "armed").touch()
    ds[0].stop(signal.SIGKILL)
    wait_left(etcd, "default", "f0", live[:1], placement, TTL + 5, "f0 leaving")
    deleted, paused = _race(live, pauses, cc, objs, ("ec", "rep"))
    assert deleted["ec"] and deleted["rep"]
    _settled_without(live, cc, deleted, objs)
    # the paused writes were refused by the fence (not deleted after they landed)
    assert sum(_metric(d, "kvstored_repair_fenced_total") for d in paused) >= 1
    assert sum(_metric(d, "kvstored_delete_fence_refused_total") for d in live) >= 1
    # 2. a node joins: the homes it displaces hand their records over (HandOver); the
    # deletes land between the read and the write again
    for d in live:
        for f in ("paused", "resumed"):
            (pauses[d.name] / f).unlink(missing_ok=True)
        (pauses[d.name] / "armed").touch()
    (pauses["f4"] / "armed").touch()
    fenced = sum(_metric(d, "kvstored_repair_fenced_total") for d in live)
    live += start(["f4"])
    wait_for(lambda: all(len(placement(d)) == 4 and "f4" in placement(d) for d in live), 20, "f4 placed")
    deleted2, paused2 = _race(live, pauses, cc, objs, ("ec",))
    assert deleted2["ec"]
    _settled_without(live, cc, deleted2, objs)
    assert sum(_metric(d, "kvstored_repair_fenced_total") for d in live) > fenced
    print(f"\nrebuilds and copies held on {[d.name for d in paused]}, hand-overs on "
          f"{[d.name for d in paused2]}; deleted meanwhile: {sorted(deleted['ec'])}, "
          f"{sorted(deleted['rep'])}, then {sorted(deleted2['ec'])}, {sorted(deleted2['rep'])}")
    # 3. a node drains: it hands everything over, and clients no longer ask it (a delete
    # does not reach it): a hand-over the fence refuses, of an object no slot holds any
    # more, is dropped there too
    drained = live[3]
    for d in live:
        for f in ("paused", "resumed"):
            (pauses[d.name] / f).unlink(missing_ok=True)
        (pauses[d.name] / "armed").touch()
    with kvstore.Client(drained.control, timeout=5) as c:
        assert c.drain().draining
    deleted3, _paused3 = _race(live, pauses, cc, objs, ("ec", "rep"))
    assert deleted3["ec"] and deleted3["rep"]
    with kvstore.Client(drained.control, timeout=5) as c:
        wait_for(lambda: c.stats().counters["objects"] == 0, 60, "the drained node empty")
    _settled_without(live[:3], cc, deleted3, objs)
    for ns, ks in deleted3.items():
        for k in ks:
            assert _records_left([drained], ns, k) == [], k
    # a client's re-put of a deleted key is stored at once (only repair writes are fenced)
    k = sorted(deleted2["ec"])[0]
    cc.put(k, b"again" * 100_000, namespace="ec")
    assert cc.get(k, namespace="ec") == b"again" * 100_000
    cc.close()


def _repair(d):
    with kvstore.Client(d.control, timeout=5) as c:
        return c.members().repair


# ------------------------------------------------------------------ the wire flag
def _send(s: socket.socket, op: int, rid: int, key: bytes = b"", payload: bytes = b"",
          flags: int = 0, ns: bytes = b"team-a") -> None:
    s.sendall(encode_request(op, rid, ns, key, len(payload), checksum(payload), flags) + payload)


def _login(d, name: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", d.data_port), timeout=10)
    tok = token(name).encode()
    s.sendall(encode_request(OP_AUTH, 1, b"", b"", len(tok), 0) + tok)
    assert response(s)[:2] == (1, 0)
    return s


def test_repair_flag_needs_admin_and_refuses_only_fenced_keys(start_daemon, tmp_path):
    tokens = write_tokens(tmp_path / "tokens.toml")
    cfg = tmp_path / "auth.toml"
    cfg.write_text(f'[auth]\nenabled = true\ntokens_file = "{tokens}"\n')
    d = start_daemon("--config", str(cfg))
    big = os.urandom(2 * MIB)
    # a read/write token cannot set the flag (it would let it probe and refuse puts of
    # keys others deleted); an undefined flag is refused; the stream stays in step
    with _login(d, "rw") as s:
        _send(s, OP_PUT, 2, b"k", big, FLAG_REPAIR)
        rid, status, msg = response(s)
        assert (rid, status) == (2, errors.PermissionDenied.code), msg
        _send(s, OP_PUT, 3, b"k", b"v", 0x0100)
        rid, status, msg = response(s)
        assert (rid, status) == (3, errors.InvalidArgument.code) and b"0x100" in msg
        _send(s, OP_PUT, 4, b"k", b"v", FLAG_REPAIR | 0x4000)
        assert response(s)[:2] == (4, errors.InvalidArgument.code)
        # a commit age (a repair write's too) needs the admin scope as well: refused
        # before its age is read, the stream in step
        _send(s, OP_PUT, 41, b"k", COMMIT_AGE.pack(1000) + b"v", FLAG_REPAIR | FLAG_COMMIT_AGE)
        assert response(s)[:2] == (41, errors.PermissionDenied.code)
        _send(s, OP_PING, 5)
        assert response(s)[:2] == (5, 0)
    with kvstore.Client(d.control, token=token("admin"), namespace="team-a", timeout=5) as admin:
        admin.put(b"gone", b"v1")
        assert admin.delete([b"gone", b"never-held"]) == 1  # both fenced, held or not
    with _login(d, "admin") as s:
        _send(s, OP_PUT, 6, b"gone", big, FLAG_REPAIR)  # refused before its payload is taken
        rid, status, msg = response(s)
        assert (rid, status) == (6, errors.Deleted.code) and b"deleted here lately" in msg
        assert isinstance(errors.error_for_code(status), errors.Conflict)  # a typed Conflict
        _send(s, OP_PUT, 7, b"never-held", b"v", FLAG_REPAIR | FLAG_OVERWRITE)
        assert response(s)[:2] == (7, errors.Deleted.code)
        _send(s, OP_PUT, 8, b"fresh", b"v", FLAG_REPAIR)  # a key not deleted: stored
        assert response(s)[:2] == (8, 0)
        _send(s, OP_PUT, 9, b"gone", b"v", FLAG_REPAIR, ns=b"team-b")  # another namespace
        assert response(s)[:2] == (9, 0)
    # a delete landing while a repair write's payload arrives: refused at the commit
    payload = os.urandom(MIB)
    with _login(d, "admin") as s:
        s.sendall(encode_request(OP_PUT, 10, b"team-a", b"inflight", len(payload), checksum(payload),
                                 FLAG_REPAIR) + payload[:4096])
        wait_for(lambda: _metric(d, "kvstored_reserved_bytes") >= MIB, 10, "the write's slot reserved")
        with kvstore.Client(d.control, token=token("admin"), namespace="team-a", timeout=5) as admin:
            assert admin.delete([b"inflight"]) == 0
            s.sendall(payload[4096:])
            rid, status, msg = response(s)
            assert (rid, status) == (10, errors.Deleted.code) and b"while this repair write arrived" in msg
            with pytest.raises(errors.NotFound):
                admin.get(b"inflight")
    assert _metric(d, "kvstored_reserved_bytes") == 0  # the slot went back
    # repair's own writer (PeerIO) gets the per-record outcome in one round
    io = PeerIO(token("admin"))
    try:
        got = io.put_many(Member("n", d.control), b"team-a",
                          [(b"gone", b"v2"), (b"other", (b"head", b"payload")), (b"fresh", b"v")], False)
        assert got == [FENCED, True, False]  # refused, stored, already there
    finally:
        io.close()
    # a client's re-put after the delete is stored: only repair writes are fenced
    with kvstore.Client(d.control, token=token("rw"), namespace="team-a", timeout=5) as rw:
        assert rw.put(b"gone", b"v3") is True
        assert rw.get(b"gone") == b"v3"
        assert rw.get(b"other") == b"headpayload"
    with kvstore.Client(d.control, token=token("admin"), timeout=5) as admin:
        counters = admin.stats().counters
    assert counters["errors_Deleted"] >= 3 and counters["errors_PermissionDenied"] >= 1
    assert _metric(d, "kvstored_delete_fence_refused_total") >= 3
    assert _metric(d, "kvstored_delete_fence_keys") >= 2
