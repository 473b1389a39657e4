"""The RDMA transport against a real kvstored, over the verbs twin: set-up and its
validation, puts and gets with checksums verified, batching, the arena split into
several registrations, failures (bad keys, addresses outside a registration, replayed
ids, a client killed mid-transfer: nothing partial visible), the fallback and its metric."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request

import pytest

import kvstore
from kvstore import errors
from kvstore.client import DataConnection
from kvstore.rdma import fallbacks, twin
from kvstore.rdma.channel import RdmaConnection, RegistrationCache
from kvstore.rdma.verbs import ENDPOINT, LOCAL_WRITE, REMOTE_READ, REMOTE_WRITE, buffer_address
from kvstore.wire import (OP_RDMA_CONNECT, OP_RDMA_GET, OP_RDMA_PUT, RDMA_DESC, checksum,
                          encode_request)

from daemonutil import ROOT

MiB = 1 << 20


def metric(d, name: str, labels: str = "") -> float:
    text = urllib.request.urlopen(d.metrics_url + "/metrics", timeout=5).read().decode()
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def rdma_event(d, event: str) -> float:
    return metric(d, "kvstored_rdma_events_total", f'{{event="{event}"}}')


def raw_conn(d) -> RdmaConnection:
    """A set-up RDMA connection driven frame by frame (the Client's framing, our requests)."""
    conn = RdmaConnection("127.0.0.1", d.data_port, 10.0, twin.open_device())
    conn.setup(None)
    return conn


def answer(conn, rid: int):
    r = conn.read_response()
    assert r.rid == rid
    return conn.read_error(r) if r.status else r


# ------------------------------------------------------------------ round trips

@pytest.mark.parametrize("size", [1, 4095, 4096, 1 * MiB + 3, 4 * MiB])
def test_put_get_round_trip_verified(rdma_daemon, size):
    data = os.urandom(size)
    puts, gets = rdma_event(rdma_daemon, "puts"), rdma_event(rdma_daemon, "gets")
    with kvstore.Client(rdma_daemon.control, namespace="r", transport="rdma", timeout=10) as c:
        assert c.transport == "rdma"
        assert c.put("k", data) is True
        assert c.put("k", data) is False  # deduplicated, as on TCP
        buf = bytearray(4 * MiB)
        assert c.get_into("k", buf) == size and bytes(buf[:size]) == data
        assert c.get("k") == data  # without a destination: the size is unknown, TCP frames
    with kvstore.Client(rdma_daemon.control, namespace="r", transport="tcp", timeout=10) as c:
        assert c.get("k") == data  # what RDMA stored, TCP reads back (checksum verified)
    assert rdma_event(rdma_daemon, "puts") - puts == 1 and rdma_event(rdma_daemon, "gets") - gets == 1


def test_batches_post_many_work_requests_per_doorbell(rdma_daemon):
    items = [(f"b{i}", os.urandom(64 << 10)) for i in range(96)]
    wrs0, bells0 = rdma_event(rdma_daemon, "work_requests"), rdma_event(rdma_daemon, "doorbells")
    with kvstore.Client(rdma_daemon.control, namespace="r", transport="rdma", timeout=10) as c:
        assert c.batch_put(items) == [True] * 96
        bufs = [bytearray(64 << 10) for _ in items]
        assert c.batch_get_into([k for k, _ in items], bufs) == [64 << 10] * 96
        assert [bytes(b) for b in bufs] == [v for _, v in items]
    wrs = rdma_event(rdma_daemon, "work_requests") - wrs0
    bells = rdma_event(rdma_daemon, "doorbells") - bells0
    assert wrs == 192
    assert bells < wrs / 4, (bells, wrs)  # one doorbell per parsed burst, not per request


def test_arena_split_into_several_registrations(start_daemon, twin_env):
    d = start_daemon(env={"KVSTORE_RDMA_VERBS": "twin", "KVSTORE_TWIN_MAX_MR_SIZE": str(10 * MiB)})
    assert "8 MR(s)" in d.log()  # 64 MiB arena, 4 MiB slabs, regions of 2 slabs
    assert metric(d, "kvstored_rdma_registered_bytes") == 64 * MiB
    values = [os.urandom(3 * MiB + i) for i in range(12)]  # slots all over the arena
    with kvstore.Client(d.control, namespace="r", transport="rdma", timeout=10) as c:
        c.batch_put([(f"s{i}", v) for i, v in enumerate(values)])
        bufs = [bytearray(4 * MiB) for _ in values]
        sizes = c.batch_get_into([f"s{i}" for i in range(12)], bufs)
        assert [bytes(b[:n]) for b, n in zip(bufs, sizes)] == values


def test_concurrent_clients(rdma_daemon):
    code = ("import os,sys,kvstore\n"
            "c=kvstore.Client(sys.argv[1],namespace='c'+sys.argv[2],transport='rdma',timeout=20)\n"
            "vals=[os.urandom(200_000+i) for i in range(20)]\n"
            "c.batch_put([(str(i),v) for i,v in enumerate(vals)])\n"
            "bufs=[bytearray(300_000) for _ in vals]\n"
            "n=c.batch_get_into([str(i) for i in range(20)],bufs)\n"
            "assert [bytes(b[:k]) for b,k in zip(bufs,n)]==vals\nprint('ok',c.transport)\n")
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'client'}:{ROOT}"}
    procs = [subprocess.Popen([sys.executable, "-c", code, rdma_daemon.control, str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
             for i in range(4)]
    outs = [p.communicate(timeout=60)[0].decode() for p in procs]
    assert all(o.strip().endswith("ok rdma") for o in outs), outs


# ------------------------------------------------------------------ validation

def test_setup_validation(rdma_daemon):
    bad_setup = rdma_event(rdma_daemon, "bad_setup")
    conn = DataConnection("127.0.0.1", rdma_daemon.data_port, 10.0)
    try:
        rid = conn.next_id()  # an RDMA request before RDMA_CONNECT
        conn.send([encode_request(OP_RDMA_PUT, rid, b"r", b"k", RDMA_DESC.size, 0)
                   + RDMA_DESC.pack(0x1000, 10, 5)])
        err = answer(conn, rid)
        assert isinstance(err, errors.InvalidArgument) and "RDMA_CONNECT first" in err.message
        for body, why in [(b"x" * (ENDPOINT.size - 1), "endpoint"),
                          (b"XXXX" + bytes(ENDPOINT.size - 4), "magic")]:
            rid = conn.next_id()
            conn.send([encode_request(OP_RDMA_CONNECT, rid, b"", b"", len(body)), body])
            err = answer(conn, rid)
            assert isinstance(err, errors.InvalidArgument) and why in err.message, err.message
        rid = conn.next_id()  # a peer that cannot be reached: typed, and the connection lives on
        dev = twin.TwinDevice("gone")
        ep = dev.endpoint(dev.create_qp(dev.create_cq(4), 4)).pack()
        dev.close()
        conn.send([encode_request(OP_RDMA_CONNECT, rid, b"", b"", len(ep)), ep])
        err = answer(conn, rid)
        assert isinstance(err, errors.Unavailable) and "queue pair" in err.message
        conn.setup(None)  # still usable: a PING answers
    finally:
        conn.close()
    assert rdma_event(rdma_daemon, "bad_setup") - bad_setup == 2


def test_second_connect_and_bad_descriptors(rdma_daemon):
    conn = raw_conn(rdma_daemon)
    try:
        rid = conn.next_id()
        ep = conn.dev.endpoint(conn.qp).pack()
        conn.send([encode_request(OP_RDMA_CONNECT, rid, b"", b"", len(ep)), ep])
        assert "already" in answer(conn, rid).message
        buf = bytearray(os.urandom(1000))
        mr = conn.cache.get(buf, REMOTE_READ)
        a = buffer_address(buf)[0]
        for desc, why in [(RDMA_DESC.pack(a, 1000, mr.rkey)[:-1], "descriptor"),
                          (RDMA_DESC.pack(a, 0, mr.rkey), "bad RDMA buffer"),
                          (RDMA_DESC.pack(a, 1000, 0), "bad RDMA buffer"),
                          (RDMA_DESC.pack((1 << 64) - 10, 1000, mr.rkey), "bad RDMA buffer")]:
            rid = conn.next_id()
            conn.send([encode_request(OP_RDMA_PUT, rid, b"r", b"k", len(desc), checksum(buf))
                       + desc])
            err = answer(conn, rid)
            assert isinstance(err, errors.InvalidArgument) and why in err.message, err.message
        rid = conn.next_id()  # a checksum that does not match the buffer: nothing stored
        conn.send([encode_request(OP_RDMA_PUT, rid, b"r", b"k", RDMA_DESC.size, checksum(buf) ^ 1)
                   + RDMA_DESC.pack(a, 1000, mr.rkey)])
        assert isinstance(answer(conn, rid), errors.ChecksumMismatch)
        rid = conn.next_id()  # and the connection still works
        conn.send([encode_request(OP_RDMA_PUT, rid, b"r", b"k", RDMA_DESC.size, checksum(buf))
                   + RDMA_DESC.pack(a, 1000, mr.rkey)])
        assert answer(conn, rid).aux == 0
    finally:
        conn.close()


@pytest.mark.parametrize("case", ["foreign_rkey", "outside", "read_only_get", "deregistered"])
def test_remote_access_errors_are_typed_and_close_the_connection(rdma_daemon, case):
    wc_errors = rdma_event(rdma_daemon, "wc_errors")
    conn = raw_conn(rdma_daemon)
    try:
        buf = bytearray(os.urandom(8192))
        mr = conn.cache.get(buf, REMOTE_READ)
        a, rkey, op, n = buffer_address(buf)[0], mr.rkey, OP_RDMA_PUT, 8192
        if case == "foreign_rkey":
            rkey ^= 0x5A5A5A5A
        elif case == "outside":
            a += 4096  # 4 KiB past the end of the registration
        elif case == "read_only_get":
            op = OP_RDMA_GET  # the daemon would write into memory registered read-only
        elif case == "deregistered":
            conn.cache.clear()
        with kvstore.Client(rdma_daemon.control, namespace="r", transport="tcp") as c:
            c.put("there", b"x" * 8192)
        key = b"there" if op == OP_RDMA_GET else b"k"
        rid = conn.next_id()
        conn.send([encode_request(op, rid, b"r", key, RDMA_DESC.size, checksum(buf))
                   + RDMA_DESC.pack(a, n, rkey)])
        err = answer(conn, rid)
        assert isinstance(err, errors.InvalidArgument) and "not registered" in err.message, err
        with pytest.raises((ConnectionError, OSError, errors.ProtocolError)):
            for _ in range(3):  # the QP is in error: the daemon closed the connection
                conn.setup(None)
    finally:
        conn.close()
    with kvstore.Client(rdma_daemon.control, namespace="r", transport="tcp") as c:
        assert c.exists(["k"]) == [False]  # nothing partial became visible
        assert c.get("there") == b"x" * 8192
    assert rdma_event(rdma_daemon, "wc_errors") - wc_errors == 1


def test_replayed_request_id_is_refused(rdma_daemon, monkeypatch):
    monkeypatch.setenv("KVSTORE_TWIN_LINK_BPS", str(8 * MiB))  # our "NIC" serves the read slowly
    replayed = rdma_event(rdma_daemon, "replayed_ids")
    conn = raw_conn(rdma_daemon)
    try:
        buf = bytearray(os.urandom(4 * MiB))
        mr = conn.cache.get(buf, REMOTE_READ)
        frame = (encode_request(OP_RDMA_PUT, 77, b"r", b"slow", RDMA_DESC.size, checksum(buf))
                 + RDMA_DESC.pack(buffer_address(buf)[0], len(buf), mr.rkey))
        conn.send([frame, frame])  # the same id again while the first is in flight
        first = conn.read_response()
        err = conn.read_error(first)
        assert first.rid == 77 and isinstance(err, errors.InvalidArgument) and "in flight" in err.message
        second = conn.read_response()
        assert second.rid == 77 and second.status == 0  # the original completes
    finally:
        conn.close()
    assert rdma_event(rdma_daemon, "replayed_ids") - replayed == 1


def test_registration_cache_bounds_and_reuse():
    dev = twin.TwinDevice("cache")
    try:
        cache = RegistrationCache(dev, max_bytes=3 * 4096, max_entries=8)
        bufs = [bytearray(4096) for _ in range(4)]
        m0 = cache.get(bufs[0], REMOTE_READ)
        assert cache.get(bufs[0], REMOTE_READ) is m0 and cache.hits == 1
        assert cache.get(bufs[0], LOCAL_WRITE | REMOTE_WRITE) is not m0  # access is in the key
        for b in bufs[1:]:
            cache.get(b, REMOTE_READ)
        assert cache.bytes <= 3 * 4096 and cache.evictions == 2
        with pytest.raises(errors.InvalidArgument, match="limit"):
            cache.get(bytearray(4 * 4096), REMOTE_READ)
        with pytest.raises(errors.InvalidArgument, match="read-only"):
            cache.get(b"immutable", LOCAL_WRITE | REMOTE_WRITE)
        with pytest.raises(BufferError):  # the cache holds the buffer: it cannot move or shrink
            bufs[3].extend(b"x")
        cache.clear()
        assert cache.bytes == 0 and not cache.entries
        bufs[3].extend(b"x")  # released
    finally:
        dev.close()


# ------------------------------------------------------------------ failures

def test_client_killed_mid_transfer_leaves_nothing(start_daemon, twin_env):
    rdma_daemon = start_daemon(env={"KVSTORE_RDMA_VERBS": "twin"})  # its own: a transfer is cut off
    code = ("import os,sys,kvstore\n"
            "c=kvstore.Client(sys.argv[1],namespace='r',transport='rdma',timeout=60)\n"
            "print('connected',c.transport,flush=True)\n"
            "c.put('half',os.urandom(4<<20))\nprint('done',flush=True)\n")
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'client'}:{ROOT}", "KVSTORE_RDMA_VERBS": "twin",
           "KVSTORE_TWIN_LINK_BPS": str(1 * MiB)}  # 4 s for the daemon's read of 4 MiB
    p = subprocess.Popen([sys.executable, "-c", code, rdma_daemon.control], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert p.stdout.readline().decode().strip() == "connected rdma"
        deadline = time.monotonic() + 10
        while rdma_event(rdma_daemon, "work_requests") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # the read is under way
        p.kill()
    finally:
        p.wait(10)
    deadline = time.monotonic() + 10
    while rdma_event(rdma_daemon, "put_failures") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rdma_event(rdma_daemon, "put_failures") == 1
    with kvstore.Client(rdma_daemon.control, namespace="r", transport="rdma", timeout=10) as c:
        assert c.exists(["half"]) == [False]
        assert metric(rdma_daemon, "kvstored_reserved_bytes") == 0  # the slot was given back
        c.put("after", b"y" * 1000)  # the daemon serves on
        assert c.get("after") == b"y" * 1000


# ------------------------------------------------------------------ fallback

def test_explicit_rdma_without_daemon_support_is_unavailable(start_daemon, twin_env):
    d = start_daemon(env={"KVSTORE_RDMA_VERBS": "off"})
    with kvstore.Client(d.control, namespace="r", transport="rdma") as c:
        with pytest.raises(errors.Unavailable, match="does not offer RDMA"):
            c.put("k", b"v")


def test_auto_falls_back_to_tcp_loudly(start_daemon, monkeypatch, caplog):
    d = start_daemon(env={"KVSTORE_RDMA_VERBS": "off"})
    monkeypatch.setenv("KVSTORE_RDMA_VERBS", "twin")  # this host "has" RDMA; the daemon not
    before = sum(v for k, v in fallbacks.items() if "does not offer" in k)
    with caplog.at_level("INFO", logger="kvstore"):
        with kvstore.Client(d.control, namespace="r", shm=False) as c:
            c.put("k", b"v")
            assert c.transport == "tcp"
            assert "does not offer RDMA" in c.transport_reason
            with c._lock:  # a second thread's connection does not try again
                pass
            assert c.get("k") == b"v"
    assert sum(v for k, v in fallbacks.items() if "does not offer" in k) == before + 1
    assert [r for r in caplog.records if "RDMA not usable" in r.getMessage()
            and r.levelname == "WARNING"]


def test_no_pyverbs_is_reported_with_the_reason(daemon, monkeypatch):
    pytest.importorskip("xxhash")
    monkeypatch.delenv("KVSTORE_RDMA_VERBS", raising=False)
    # where pyverbs is installed, hide it from this process (None in sys.modules makes the
    # import raise ImportError), so the no-pyverbs path runs on every machine
    import sys
    for name in [m for m in sys.modules if m == "pyverbs" or m.startswith("pyverbs.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "pyverbs", None)
    with kvstore.Client(daemon.control, namespace="r", transport="rdma") as c:
        with pytest.raises(errors.Unavailable, match="pyverbs is not installed"):
            c.put("k", b"v")
    with kvstore.Client(daemon.control, namespace="r", shm=False) as c:
        c.put("k", b"v")
        assert c.transport == "tcp" and "pyverbs" in c.transport_reason
    assert any("pyverbs" in k for k in fallbacks)


def test_more_requests_than_the_send_queue_wait_in_the_backlog(rdma_daemon):
    """300 puts in one write: at most 256 work requests are posted at once (the QP's send
    queue), the rest wait and go out as completions free room; every put is answered."""
    wrs, bells = rdma_event(rdma_daemon, "work_requests"), rdma_event(rdma_daemon, "doorbells")
    conn = raw_conn(rdma_daemon)
    try:
        vals = [os.urandom(4096) for _ in range(300)]
        frames, rids = [], []
        for i, v in enumerate(vals):
            mr = conn.cache.get(v, REMOTE_READ)
            rid = conn.next_id()
            rids.append(rid)
            frames.append(encode_request(OP_RDMA_PUT, rid, b"r", f"q{i}".encode(), RDMA_DESC.size,
                                         checksum(v)) + RDMA_DESC.pack(buffer_address(v)[0], 4096,
                                                                       mr.rkey))
        conn.send([b"".join(frames)])
        got = sorted(answer_any(conn) for _ in rids)
        assert got == sorted(rids)
    finally:
        conn.close()
    assert rdma_event(rdma_daemon, "work_requests") - wrs == 300
    assert rdma_event(rdma_daemon, "doorbells") - bells >= 2  # the backlog needed a second post
    with kvstore.Client(rdma_daemon.control, namespace="r", transport="tcp") as c:
        assert c.batch_get([f"q{i}" for i in (0, 150, 299)]) == [vals[0], vals[150], vals[299]]


def answer_any(conn) -> int:
    r = conn.read_response()
    assert r.status == 0, conn.read_error(r)
    return r.rid


def test_batch_above_the_connection_reservation_bound_waits_not_fails(start_daemon, twin_env,
                                                                      tmp_path):
    """A batch of RDMA puts holds every slot while its reads are in flight; puts past the
    connection's reservation bound wait for earlier ones to finish instead of failing."""
    from kvstored.config import SETTINGS
    if "server.max_reserved_bytes_per_connection" not in {s.name for s in SETTINGS}:
        pytest.skip("this daemon has no per-connection reservation bound")
    cfg = tmp_path / "bound.toml"
    cfg.write_text('[server]\nmax_reserved_bytes_per_connection = "8MiB"\n')
    d = start_daemon("--config", str(cfg), env={"KVSTORE_RDMA_VERBS": "twin"})
    vals = [os.urandom(3 * MiB) for _ in range(10)]  # 30 MiB in one window
    with kvstore.Client(d.control, namespace="r", transport="rdma", timeout=20) as c:
        assert c.batch_put([(f"w{i}", v) for i, v in enumerate(vals)]) == [True] * 10
        bufs = [bytearray(3 * MiB) for _ in vals]
        c.batch_get_into([f"w{i}" for i in range(10)], bufs)
        assert [bytes(b) for b in bufs] == vals
    assert rdma_event(d, "deferred_puts") >= 1
    assert metric(d, "kvstored_reserved_bytes") == 0
