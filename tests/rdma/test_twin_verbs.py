"""The verbs twin honours what RDMA hardware would: keys, bounds, access, ordering,
completion statuses, the error state. Two devices in one process here (their NIC
threads are independent); tests/rdma/test_rdma_daemon.py runs two processes."""
from __future__ import annotations

import os
import select
import socket
import time

import pytest

from kvstore.rdma import twin
from kvstore.rdma.verbs import (LOCAL_WRITE, QPS_ERR, REMOTE_READ, REMOTE_WRITE, WC_LOC_LEN_ERR,
                                WC_LOC_PROT_ERR,
                                WC_REM_ACCESS_ERR, WC_RETRY_EXC_ERR, WC_SUCCESS, WC_WR_FLUSH_ERR,
                                WR, WR_RDMA_READ, WR_RDMA_WRITE, WR_SEND_WITH_IMM, Endpoint, RecvWR,
                                VerbsError, buffer_address)

DEADLINE = 5.0


@pytest.fixture
def pair():
    a, b = twin.TwinDevice("a"), twin.TwinDevice("b")
    cqa, cqb = a.create_cq(64), b.create_cq(64)
    qa, qb = a.create_qp(cqa, 32, 4), b.create_qp(cqb, 32, 4)
    qb.connect(a.endpoint(qa))
    qa.connect(b.endpoint(qb))
    yield a, b, cqa, cqb, qa, qb
    a.close()
    b.close()
    for cq in (cqa, cqb):
        cq.close()


def wait_wcs(cq, n: int) -> list:
    """Completions through the eventfd, as the event loop gets them (bounded in time)."""
    out: list = []
    cq.arm()
    for _ in range(1000):
        out += cq.poll(64)
        if len(out) >= n:
            return out
        r, _, _ = select.select([cq.fd], [], [], DEADLINE)
        assert r, f"no completion within {DEADLINE}s ({len(out)} of {n})"
        cq.consume_event()
        cq.arm()
    raise AssertionError("completion loop bound reached")


def addr(buf, off=0):
    return buffer_address(buf)[0] + off


def test_read_and_write_between_registrations(pair):
    a, b, cqa, _, qa, _ = pair
    src = bytearray(os.urandom(1 << 20))
    dst = bytearray(1 << 20)
    remote_src = b.reg_mr(src, REMOTE_READ)
    remote_dst = b.reg_mr(dst, LOCAL_WRITE | REMOTE_WRITE)
    local = bytearray(1 << 20)
    lmr = a.reg_mr(local, LOCAL_WRITE)
    qa.post_send([WR(1, WR_RDMA_READ, addr(local), len(local), lmr.lkey, addr(src), remote_src.rkey)])
    assert [w.status for w in wait_wcs(cqa, 1)] == [WC_SUCCESS]
    assert local == src
    local[:10] = b"0123456789"
    qa.post_send([WR(2, WR_RDMA_WRITE, addr(local), len(local), lmr.lkey, addr(dst), remote_dst.rkey)])
    wcs = wait_wcs(cqa, 1)
    assert wcs[0].wr_id == 2 and wcs[0].status == WC_SUCCESS and wcs[0].byte_len == len(local)
    assert dst == local


def test_many_wrs_one_doorbell_complete_in_order(pair):
    a, b, cqa, _, qa, _ = pair
    remote = bytearray(os.urandom(64 << 10))
    rmr = b.reg_mr(remote, REMOTE_READ)
    local = bytearray(64 << 10)
    lmr = a.reg_mr(local, LOCAL_WRITE)
    wrs = [WR(i, WR_RDMA_READ, addr(local, i * 2048), 2048, lmr.lkey, addr(remote, i * 2048), rmr.rkey)
           for i in range(32)]
    qa.post_send(wrs)
    wcs = wait_wcs(cqa, 32)
    assert [w.wr_id for w in wcs] == list(range(32))
    assert all(w.status == WC_SUCCESS for w in wcs)
    assert local == remote
    with pytest.raises(VerbsError, match="send queue full"):  # bounded in-flight work requests
        qa.post_send(wrs + [wrs[0]])


@pytest.mark.parametrize("case", ["foreign_key", "deregistered", "out_of_bounds", "no_access",
                                  "lkey_as_rkey"])
def test_remote_violations_error_the_qp_and_flush_the_rest(pair, case):
    a, b, cqa, _, qa, qb = pair
    remote = bytearray(8192)
    rmr = b.reg_mr(remote, REMOTE_READ)  # read only
    local = bytearray(8192)
    lmr = a.reg_mr(local, LOCAL_WRITE)
    other = a.reg_mr(bytearray(4096), LOCAL_WRITE | REMOTE_READ | REMOTE_WRITE)
    rkey, raddr, n, op = rmr.rkey, addr(remote), 4096, WR_RDMA_READ
    if case == "foreign_key":
        rkey = other.rkey  # a key of another device (our own)
    elif case == "deregistered":
        b.dereg_mr(rmr)
    elif case == "out_of_bounds":
        raddr = addr(remote, 8192 - 100)
    elif case == "no_access":
        op = WR_RDMA_WRITE
    elif case == "lkey_as_rkey":
        rkey = rmr.lkey
    good = WR(9, WR_RDMA_READ, addr(local), 16, lmr.lkey, addr(remote), rmr.rkey)
    qa.post_send([WR(1, op, addr(local), n, lmr.lkey, raddr, rkey), good])
    wcs = wait_wcs(cqa, 2)
    assert [(w.wr_id, w.status) for w in wcs] == [(1, WC_REM_ACCESS_ERR), (9, WC_WR_FLUSH_ERR)]
    assert qa.state == QPS_ERR
    qa.post_send([good])  # a QP in error still takes work requests: they complete flushed
    assert [w.status for w in wait_wcs(cqa, 1)] == [WC_WR_FLUSH_ERR]
    assert remote == bytearray(8192)


def test_local_protection_error(pair):
    a, b, cqa, _, qa, _ = pair
    remote = bytearray(4096)
    rmr = b.reg_mr(remote, REMOTE_READ)
    local = bytearray(4096)
    lmr = a.reg_mr(local, 0)  # no LOCAL_WRITE: a READ may not land here
    qa.post_send([WR(1, WR_RDMA_READ, addr(local), 4096, lmr.lkey, addr(remote), rmr.rkey)])
    assert wait_wcs(cqa, 1)[0].status == WC_LOC_PROT_ERR


def test_registration_checks_access_against_the_buffer():
    d = twin.TwinDevice("c")
    try:
        with pytest.raises(VerbsError, match="read-only"):
            d.reg_mr(b"immutable bytes", REMOTE_WRITE | LOCAL_WRITE)
        with pytest.raises(VerbsError, match="LOCAL_WRITE"):
            d.reg_mr(bytearray(10), REMOTE_WRITE)
        with pytest.raises(VerbsError, match="max_mr_size"):
            twin.TwinDevice("small", max_mr_size=4096).reg_mr(bytearray(8192), REMOTE_READ)
        mr = d.reg_mr(b"immutable bytes", REMOTE_READ)
        d.dereg_mr(mr)
        with pytest.raises(VerbsError, match="not registered"):
            d.dereg_mr(mr)
    finally:
        d.close()


def test_send_with_immediate_needs_a_posted_receive(pair):
    a, b, cqa, cqb, qa, qb = pair
    msg = bytearray(b"hello")
    lmr = a.reg_mr(msg, 0)
    inbox = bytearray(64)
    imr = b.reg_mr(inbox, LOCAL_WRITE)
    qb.post_recv([RecvWR(7, addr(inbox), 64, imr.lkey)])
    qa.post_send([WR(1, WR_SEND_WITH_IMM, addr(msg), 5, lmr.lkey, imm=42)])
    assert wait_wcs(cqa, 1)[0].status == WC_SUCCESS
    r = wait_wcs(cqb, 1)[0]
    assert (r.wr_id, r.status, r.byte_len, r.imm) == (7, WC_SUCCESS, 5, 42) and inbox[:5] == b"hello"


def test_send_longer_than_the_posted_receive_is_a_length_error(pair):
    a, b, cqa, cqb, qa, qb = pair
    msg = bytearray(os.urandom(100))
    lmr = a.reg_mr(msg, 0)
    inbox = bytearray(64)
    imr = b.reg_mr(inbox, LOCAL_WRITE)
    qb.post_recv([RecvWR(7, addr(inbox), 16, imr.lkey), RecvWR(8, addr(inbox), 64, imr.lkey)])
    qa.post_send([WR(1, WR_SEND_WITH_IMM, addr(msg), 100, lmr.lkey, imm=1),
                  WR(2, WR_SEND_WITH_IMM, addr(msg), 64, lmr.lkey, imm=2)])
    assert [w.status for w in wait_wcs(cqa, 2)] == [WC_SUCCESS, WC_SUCCESS]
    first, second = wait_wcs(cqb, 2)
    assert (first.wr_id, first.status, first.byte_len) == (7, WC_LOC_LEN_ERR, 0)
    # the 100 bytes were drained, not written: the next SEND lands whole and in order
    assert (second.wr_id, second.status, second.byte_len) == (8, WC_SUCCESS, 64)
    assert inbox == msg[:64]


def test_a_peer_naming_a_huge_length_is_refused_before_anything_is_allocated(pair):
    """A local process speaking the twin's socket protocol as a connected peer: a SEND of
    2^62 bytes is answered INVALID at once and the QP goes to the error state; the
    responder never sizes a buffer by the peer's word."""
    a, b, cqa, cqb, qa, qb = pair
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(DEADLINE)
    try:
        sock.connect(twin._port_name(b.gid))
        sock.sendall(twin._HELLO.pack(twin._HELLO_MAGIC, qb.qpn, qa.qpn, qa.psn))
        assert twin._RESP.unpack(sock.recv(1)) == (twin._OK,)
        sock.sendall(twin._REQ.pack(WR_SEND_WITH_IMM, 0, 0, 1 << 62, 0))
        assert twin._RESP.unpack(sock.recv(1)) == (twin._INVALID,)
        assert sock.recv(1) == b""  # the responder closed the link
    finally:
        sock.close()
    for _ in range(int(DEADLINE / 0.01)):
        if qb.state == QPS_ERR:
            break
        time.sleep(0.01)
    assert qb.state == QPS_ERR


def test_peer_gone_is_retry_exceeded(pair):
    a, b, cqa, _, qa, qb = pair
    remote = bytearray(4096)
    rmr = b.reg_mr(remote, REMOTE_READ)
    local = bytearray(4096)
    lmr = a.reg_mr(local, LOCAL_WRITE)
    qb.close()  # the peer's QP is destroyed (its process died)
    qa.post_send([WR(1, WR_RDMA_READ, addr(local), 4096, lmr.lkey, addr(remote), rmr.rkey)])
    assert wait_wcs(cqa, 1)[0].status == WC_RETRY_EXC_ERR


def test_connect_to_an_unknown_qp_is_refused():
    a, b = twin.TwinDevice("a"), twin.TwinDevice("b")
    try:
        qa = a.create_qp(a.create_cq(4), 4)
        with pytest.raises(VerbsError, match="refused"):
            qa.connect(Endpoint(12345, 1, 4096, b.gid, 0))
        with pytest.raises(VerbsError, match="cannot reach"):
            a.create_qp(a.create_cq(4), 4).connect(Endpoint(1, 1, 4096, os.urandom(16), 0))
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("mutate, why", [
    (lambda e: e._replace(qpn=0), "QP number"), (lambda e: e._replace(psn=1 << 24), "PSN"),
    (lambda e: e._replace(mtu=1500), "MTU"), (lambda e: e._replace(gid=bytes(16), lid=0), "GID"),
    (lambda e: e._replace(max_msg=10), "max message"),
])
def test_endpoint_validation(mutate, why):
    e = Endpoint(5, 7, 4096, os.urandom(16), 0)
    assert Endpoint.unpack(e.pack()) == e
    with pytest.raises(ValueError, match=why):
        Endpoint.unpack(mutate(e).pack())
    with pytest.raises(ValueError, match="bytes"):
        Endpoint.unpack(e.pack()[:-1])
    with pytest.raises(ValueError, match="magic"):
        Endpoint.unpack(b"XXXX" + e.pack()[4:])
