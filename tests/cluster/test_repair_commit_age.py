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
        c.batch_put(list(objs.items()))  # on a0 only: written around a1
        put_at = time.time()
        # (repair copies a record once it is older than 2 s)
        wait_for(lambda: (pause / "paused").exists(), 30, "a0's copy held before its write")
        held = {bytes.fromhex(line.split()[1]) for line in (pause / "paused").read_text().splitlines()}
        assert held == set(objs), held
        assert c.delete(list(objs)) == len(objs)  # reaches a0 only
    deleted_at = time.time()
    (pause / "armed").unlink()
    wait_for(lambda: (pause / "resumed").exists(), 30, "a0's write let go")
    assert sorted(_held(a1, list(objs))) == sorted(objs)  # landed: a1 never saw the delete
    with kvstore.Client(a1.control, timeout=5, shm=False, namespace="rep") as c:
        ages = [h.committed_ago for h in c.heads(list(objs)).heads]
    # a1 answers the commit age a0's records had, not the age of the write
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
