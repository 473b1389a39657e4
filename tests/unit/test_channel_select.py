"""kvstore.channel without sockets: which transports a client tries, in which order, and
what each channel's declared capabilities decide (inline frames or the transport's own
path). Data movement on each channel is tested against real daemons (tests/client,
tests/daemon/test_shm*.py, tests/rdma)."""
from __future__ import annotations

import pytest

import kvstore
from kvstore import errors
from kvstore.channel import (INLINE_ANY, SHM_INLINE_MAX, TRANSPORTS, DataChannel, TcpChannel,
                             transport_plan)
from kvstore.rdma.channel import RdmaConnection
from kvstore.shm import ShmConnection

CHANNELS = {"tcp": TcpChannel, "shm": ShmConnection, "rdma": RdmaConnection}


def bare(cls):
    """An instance without __init__ (no socket): only class-level declarations are read."""
    return cls.__new__(cls)


@pytest.mark.parametrize("choice, shm, tls, data_address, rdma_unusable, plan", [
    ("auto", None, False, False, False, ["shm", "rdma", "tcp"]),
    ("auto", None, False, False, True, ["shm", "tcp"]),  # RDMA fell back once: not retried
    ("auto", False, False, False, False, ["rdma", "tcp"]),
    ("auto", True, False, False, False, ["shm", "rdma", "tcp"]),  # shm's connector raises if unusable
    ("auto", None, True, False, False, ["tcp"]),  # TLS: only TCP can carry it
    ("auto", None, False, True, False, ["rdma", "tcp"]),  # an explicit data address is that TCP endpoint
    ("tcp", False, False, False, False, ["tcp"]),
    ("shm", True, False, False, False, ["shm", "tcp"]),
    ("rdma", False, False, False, True, ["rdma", "tcp"]),  # explicit: tried even after a fallback
    ("rdma", False, False, True, False, ["rdma", "tcp"]),
])
def test_transport_plan(choice, shm, tls, data_address, rdma_unusable, plan):
    assert transport_plan(choice, shm, tls, data_address, rdma_unusable) == plan


def test_transport_plan_refusals():
    with pytest.raises(errors.Unavailable, match="TLS"):
        transport_plan("rdma", False, True, False, False)
    for bad in ("", "udp", "TCP", None):
        with pytest.raises(errors.InvalidArgument):
            transport_plan(bad, None, False, False, False)


def test_every_transport_has_a_channel_and_a_connector():
    assert set(CHANNELS) == set(TRANSPORTS) == set(kvstore.Client._CONNECT)
    for name, cls in CHANNELS.items():
        assert issubclass(cls, DataChannel) and cls.transport == name
    assert [n for n, c in CHANNELS.items() if c.zero_copy_get] == ["shm"]


class _Declared(DataChannel):
    """Capabilities as a channel declares them (the rules of DataChannel.frames_put /
    frames_get); shm's own refinements of them are kvstore.shm's and tested there."""

    transport = "test"

    def __init__(self, inline_max, inline_batch_put=True):
        self.inline_max = inline_max
        self.inline_batch_put = inline_batch_put

    setup = close = put_batch = get_batch = ping = None


SMALL = 128 << 10


@pytest.mark.parametrize("sizes, any_size, small, small_single, never", [
    ([0], True, True, True, False),
    ([SMALL], True, True, True, False),
    ([SMALL + 1], True, False, False, False),
    ([1 << 20], True, False, False, False),
    ([10, 10], True, True, False, False),
    ([10, SMALL + 1], True, False, False, False),
    ([], True, True, True, False),
])
def test_which_puts_move_inside_frames(sizes, any_size, small, small_single, never):
    chans = [_Declared(INLINE_ANY), _Declared(SMALL), _Declared(SMALL, False), _Declared(-1)]
    assert [c.frames_put(sizes) for c in chans] == [any_size, small, small_single, never]


@pytest.mark.parametrize("sizes, any_size, small, never", [
    (None, True, False, False),  # new buffers, sizes unknown: only a channel that frames any size
    ([4096, 4096], True, True, False),
    ([SMALL, 1], True, True, False),
    ([1, SMALL + 1], True, False, False),
    ([1 << 22], True, False, False),
])
def test_which_gets_move_inside_frames(sizes, any_size, small, never):
    chans = [_Declared(INLINE_ANY), _Declared(SMALL), _Declared(-1)]
    assert [c.frames_get(sizes) for c in chans] == [any_size, small, never]


def test_tcp_frames_everything_and_rdma_nothing():
    tcp, rdma = bare(TcpChannel), bare(RdmaConnection)
    for sizes in ([0], [1 << 30], [1] * 32):
        assert tcp.frames_put(sizes) and tcp.frames_get(sizes)
        assert not rdma.frames_put(sizes) and not rdma.frames_get(sizes)
    assert tcp.frames_get(None) and not rdma.frames_get(None)
    assert ShmConnection.inline_max == SHM_INLINE_MAX


def test_capabilities_are_declared_not_probed():
    # the names Client used to probe for are gone from the TCP and RDMA channels
    assert not hasattr(TcpChannel, "shm") and not hasattr(RdmaConnection, "rdma")
    assert TcpChannel.inline_max == INLINE_ANY and RdmaConnection.inline_max < 0
    with pytest.raises(errors.Unavailable, match="shm path"):
        bare(TcpChannel).get_view(b"ns", b"k", True)


class _Fake:
    """Stands for a connected channel in the selection test (no bytes move through it)."""

    def __init__(self, name):
        self.transport = name
        self.epoch = 0

    def close(self):
        pass


def test_client_walks_the_plan_until_a_connector_answers(monkeypatch):
    c = kvstore.Client("127.0.0.1:1", transport="auto")  # the gRPC channel dials lazily: nothing is sent
    tried: list[str] = []

    def connector(name, answer):
        def connect(self):
            tried.append(name)
            return _Fake(name) if answer else None
        return connect

    try:
        monkeypatch.setattr(kvstore.Client, "_CONNECT", {
            "shm": connector("shm", False), "rdma": connector("rdma", False), "tcp": connector("tcp", True)})
        assert c.transport == "tcp" and tried == ["shm", "rdma", "tcp"]
        assert c.transport == "tcp" and len(tried) == 3  # kept per thread: chosen once
        c._drop(c._local.conn)
        c.transport_reason = "no device"  # RDMA fell back: auto goes shm -> tcp from now on
        tried.clear()
        assert c.transport == "tcp" and tried == ["shm", "tcp"]
        c._drop(c._local.conn)
        monkeypatch.setattr(kvstore.Client, "_CONNECT", {
            "shm": connector("shm", True), "rdma": connector("rdma", True), "tcp": connector("tcp", True)})
        tried.clear()
        assert c.transport == "shm" and tried == ["shm"]
    finally:
        c.close()
