"""Repair writes carry the source's commit time (wire.FLAG_COMMIT_AGE, Head.committed_ago).

A record repair writes on a node takes the commit time of the record it was copied or
rebuilt from, not the time of the write: a copy is not a client's commit. Before, a
node that missed a client's delete and then got a peer's copy of the deleted object held
a record "written after the delete", kept it on the peers' delete evidence
(repair/decide.py drops only records older than a reported delete) and served it and
copied it back. Real kvstored processes and a real etcd; the interleaving is forced with
the repair pause point (kvstored/cluster/repair/pause.py), not hoped for.
"""
from __future__ import annotations

import os
import time

import pytest
from clusterutil import node_config, placement, wait_for
from etcdutil import needs_etcd

import kvstore
from kvstore import errors

pytestmark = pytest.mark.timeout(120)


def _repair(d):
    with kvstore.Client(d.control, timeout=5) as c:
        return c.members().repair


def _held(d, keys: list[bytes]) -> list[bytes]:
    with kvstore.Client(d.control, timeout=5, shm=False, namespace="rep") as c:
        return [k for k, h in zip(keys, c.heads(keys).heads) if h.present]


@needs_etcd
def test_a_copy_of_an_object_deleted_elsewhere_is_dropped_on_the_delete_evidence(
        etcd, start_daemon, tmp_path):
    """a0 holds objects a1 lacks (a put written around a1). a0's repair decides to copy
    them to a1 and is held before the write; a client deletes them on a0 only (a delete
    that missed a1: its member list lacked it); then the copies land on a1, which never
    saw the delete, so its fence lets them in. Carrying a0's commit time, they are older
    than the delete a0 reports: a1's repair drops them, and the cluster answers NotFound.
    (With the write's own time they were newer: a1 kept and served them, and copied them
    back to a0 once a0's fence expired.)"""
    pause = tmp_path / "pause"
    pause.mkdir()
    names = ["a0", "a1"]
    args = [node_config(tmp_path, etcd, n, "age", {"rep": "replicas:2"}, repair_interval=1)
            + ("--dram-size", "64MiB") for n in names]
    (pause / "armed").touch()  # a0's first pass that writes is held before its writes
    a0, a1 = start_daemon.many(*args, env={"KVSTORED_REPAIR_PAUSE": str(pause)})
    for d in (a0, a1):
        wait_for(lambda d=d: placement(d) == set(names), 20, "two nodes")
    objs = {f"g-{i}".encode(): os.urandom(2000 + i) for i in range(4)}
    with kvstore.Client(a0.control, timeout=5, shm=False, namespace="rep") as c:
        put_at = time.time()
        c.batch_put(list(objs.items()))  # on a0 only: written around a1
        # (repair copies a record once it is older than 2 s)
        wait_for(lambda: (pause / "paused").exists(), 30, "a0's copy held before its write")
        held = {bytes.fromhex(line.split()[1]) for line in (pause / "paused").read_text().splitlines()}
        assert held and held <= set(objs), held  # (all four, unless a pass met some young)
        assert c.delete(list(objs)) == len(objs)  # reaches a0 only
    deleted_at = time.time()
    written = _repair(a0).records_written
    (pause / "armed").unlink()
    # stored on a1 (a1 never saw the delete: its fence let them in)
    wait_for(lambda: _repair(a0).records_written >= written + len(held), 30, "a0's copies written")
    with kvstore.Client(a1.control, timeout=5, shm=False, namespace="rep") as c:
        ages = [h.committed_ago for h in c.heads(list(objs)).heads if h.present]
    # a1 answers the commit age a0's records had, not the age of the write (those its
    # repair has not dropped yet)
    assert all(time.time() - deleted_at < age <= time.time() - put_at + 1.0 for age in ages), ages
    passes = _repair(a1).passes
    wait_for(lambda: not _held(a1, list(objs)), 30, "a1 dropping the copies of deleted objects")
    wait_for(lambda: _repair(a1).passes >= passes + 2, 30, "two more passes on a1")
    assert _held(a1, list(objs)) == [] and _held(a0, list(objs)) == []
    from kvstore.cluster import ClusterClient
    with ClusterClient.from_cluster([a0.control, a1.control], refresh_s=0.2, shm=False) as cc:
        for k in objs:
            with pytest.raises(errors.NotFound):
                cc.get(k, namespace="rep")


# ------------------------------------------------------------------ the wire flag
HOUR_MS = 3_600_000


def _frame(rid: int, key: bytes, record: bytes, flags: int, age_ms: int | None = None,
           ns: bytes = b"ns", csum: int | None = None) -> bytes:
    """A PUT whose payload is the COMMIT_AGE prefix (when ``age_ms`` is given) and ``record``;
    the header's checksum is the record's (``csum`` overrides it)."""
    from kvstore.wire import COMMIT_AGE, OP_PUT, checksum, encode_request
    prefix = b"" if age_ms is None else COMMIT_AGE.pack(age_ms)
    return encode_request(OP_PUT, rid, ns, key, len(prefix) + len(record),
                          checksum(record) if csum is None else csum, flags) + prefix + record


def _answer(s) -> tuple[int, int, int, bytes]:
    """(request id, status, aux, payload) of the next response on raw socket ``s``."""
    from kvstore.wire import HEADER_SIZE, decode

    def exact(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            got = s.recv(n - len(buf))
            assert got, "connection closed"
            buf += got
        return buf
    h = decode(exact(HEADER_SIZE))
    return h.req_id, h.status, h.aux, exact(h.length)


def _ages(d, keys: list[bytes], ns: str = "ns") -> list[float | None]:
    """Heads' committed_ago of each key on ``d`` (None: absent)."""
    with kvstore.Client(d.control, timeout=5, shm=False, namespace=ns) as c:
        return [h.committed_ago if h.present else None for h in c.heads(keys).heads]


def test_commit_age_flag_stores_the_age_and_refuses_malformed_puts(start_daemon):
    """One daemon (auth off: no scope needed for FLAG_REPAIR), raw frames. An aged repair
    put is stored with its age (Heads' committed_ago), also when the age arrives split
    across sends; a plain one with the write's time. The flag without FLAG_REPAIR, a
    payload shorter than the age, a negative or absurd age: InvalidArgument, nothing
    stored, the stream in step. A repair put of bytes stored already keeps their time;
    a client's re-put refreshes it (engine/store.py _same)."""
    import socket

    from kvstore.wire import (FLAG_COMMIT_AGE, FLAG_REPAIR, MAX_COMMIT_AGE_MS, OP_PING, OP_PUT,
                              encode_request)
    d = start_daemon("--dram-size", "64MiB")
    rec = os.urandom(3000)
    aged, rep = FLAG_REPAIR | FLAG_COMMIT_AGE, FLAG_REPAIR
    bad = [(FLAG_COMMIT_AGE, b"no-repair", rec, HOUR_MS),  # the age flag on a client's put
           (aged, b"short", b"", None),  # a payload shorter than the age: 5 bytes
           (aged, b"negative", rec, -1), (aged, b"absurd", rec, MAX_COMMIT_AGE_MS + 1)]
    with socket.create_connection(("127.0.0.1", d.data_port), timeout=10) as s:
        s.sendall(_frame(1, b"aged", rec, aged, 2 * HOUR_MS))
        s.sendall(_frame(2, b"plain", rec, rep))
        split = _frame(3, b"split", rec, aged, HOUR_MS)
        s.sendall(split[:40 + 2 + 5 + 3])  # the header, names and 3 of the age's 8 bytes
        time.sleep(0.05)  # (two sends: the daemon reads the age in two pieces)
        s.sendall(split[40 + 2 + 5 + 3:])
        assert [_answer(s)[:3] for _ in range(3)] == [(1, 0, 0), (2, 0, 0), (3, 0, 0)]
        for rid, (flags, key, record, age) in enumerate(bad, 10):
            if age is None:
                s.sendall(encode_request(OP_PUT, rid, b"ns", key, 5, 0, flags) + b"12345")
            else:
                s.sendall(_frame(rid, key, record, flags, age))
            got_rid, status, _aux, msg = _answer(s)
            assert (got_rid, status) == (rid, errors.InvalidArgument.code), (key, msg)
        # a record not matching its checksum: the typed error of any put, nothing stored
        s.sendall(_frame(20, b"corrupt", rec, aged, HOUR_MS, csum=1))
        assert _answer(s)[:2] == (20, errors.ChecksumMismatch.code)
        # bytes stored already: answered as deduplicated, their commit time kept
        s.sendall(_frame(21, b"plain", rec, aged, 5 * HOUR_MS))
        assert _answer(s)[:3] == (21, 0, 1)
        s.sendall(encode_request(OP_PING, 22, b"", b""))
        assert _answer(s)[:2] == (22, 0)
    keys = [b"aged", b"plain", b"split", b"no-repair", b"short", b"negative", b"absurd", b"corrupt"]
    got = dict(zip(keys, _ages(d, keys)))
    assert 7200 <= got[b"aged"] < 7200 + 60 and 3600 <= got[b"split"] < 3600 + 60, got
    assert got[b"plain"] < 60, got  # a repair put without the age: the write's time
    assert [got[k] for k in keys[3:]] == [None] * 5, got  # refused: nothing stored
    with kvstore.Client(d.control, timeout=5, shm=False, namespace="ns") as c:
        assert c.get(b"aged") == rec
        assert c.put(b"aged", rec) is False  # a client's re-put commits it again
    assert _ages(d, [b"aged"])[0] < 60


def test_peers_get_the_age_only_once_their_heads_say_they_take_it(start_daemon):
    """PeerIO (repair's writer) sends FLAG_COMMIT_AGE only to a node whose last Heads
    answer listed it in put_flags: none asked yet, or a node of an earlier version (its
    answer has no put_flags), gets the plain repair put it understands. Concurrent
    writers with different ages for the same keys: every put answered, each key kept
    with the age of the write that stored it, none refreshed by a later one."""
    import threading

    from kvstore.placement import Member
    from kvstore.wire import FLAG_COMMIT_AGE, PUT_FLAGS
    from kvstored.cluster.repair import decide
    from kvstored.cluster.repair.peers import PeerIO
    d = start_daemon("--dram-size", "64MiB")
    node = Member("n", d.control)
    rec = os.urandom(2000)
    old = time.time() - 3 * 3600.0
    io = PeerIO()
    try:
        assert io.put_many(node, b"ns", [(b"before", rec)], False, [old]) == [True]
        r = io.heads(node, b"ns", [b"before"], 0)
        assert r.put_flags == PUT_FLAGS and io.put_flags["n"] & FLAG_COMMIT_AGE
        h = decide.answered(r.heads[0], time.time(), True)
        assert h.present and time.time() - 60 < h.committed_at <= time.time()  # the write's time
        assert io.put_many(node, b"ns", [(b"after", (rec[:64], rec[64:])), (b"unknown", rec)], False,
                           [old, None]) == [True, True]
        io.put_flags["n"] = 0  # as a node of an earlier version answers Heads
        assert io.put_many(node, b"ns", [(b"old-peer", rec)], False, [old]) == [True]
        # an earlier version's Head says nothing of the age: unknown, not "just now"
        assert decide.answered(r.heads[0], time.time(), False).committed_at is None
    finally:
        io.close()
    before, after, unknown, old_peer = _ages(d, [b"before", b"after", b"unknown", b"old-peer"])
    assert before < 60 and unknown < 60 and old_peer < 60, (before, unknown, old_peer)
    assert 3 * 3600 <= after < 3 * 3600 + 60, after
    # concurrent repair writers (own connections), each its own age for the same keys
    keys = [b"c-%d" % i for i in range(40)]
    ages = [3600.0 * (n + 1) for n in range(4)]
    results: list = []

    def writer(age: float) -> None:
        w = PeerIO()
        try:
            w.heads(node, b"ns", keys[:1], 0)
            results.append(w.put_many(node, b"ns", [(k, rec) for k in keys], False,
                                      [time.time() - age] * len(keys)))
        finally:
            w.close()
    threads = [threading.Thread(target=writer, args=(a,)) for a in ages]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 4 and all(r is not None and None not in r for r in results), results
    assert [sum(r[i] is True for r in results) for i in range(len(keys))] == [1] * len(keys)
    for k, got in zip(keys, _ages(d, keys)):  # the age the one stored write carried
        assert any(a <= got < a + 60 for a in ages), (k, got)


def test_commit_age_codec_rounds_down_and_refuses_what_no_sender_writes():
    """encode_commit_age: whole ms rounded down (a copy looks newer, never older), a
    negative age (a clock stepped back) 0, capped; decode_commit_age refuses below 0 and
    over the cap with InvalidArgument."""
    from kvstore.wire import COMMIT_AGE, MAX_COMMIT_AGE_MS, decode_commit_age, encode_commit_age
    assert COMMIT_AGE.unpack(encode_commit_age(1.2349)) == (1234,)
    assert COMMIT_AGE.unpack(encode_commit_age(-5.0)) == (0,)
    assert COMMIT_AGE.unpack(encode_commit_age(1e12)) == (MAX_COMMIT_AGE_MS,)
    assert decode_commit_age(encode_commit_age(3600.0)) == 3600.0
    assert decode_commit_age(COMMIT_AGE.pack(MAX_COMMIT_AGE_MS)) == MAX_COMMIT_AGE_MS / 1000
    for bad in (-1, MAX_COMMIT_AGE_MS + 1, -(1 << 63)):
        with pytest.raises(errors.InvalidArgument):
            decode_commit_age(COMMIT_AGE.pack(bad))
