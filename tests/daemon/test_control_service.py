"""The gRPC control plane of a real kvstored, called with the raw generated stub."""
from __future__ import annotations

import grpc
import pytest

import kvstore
from kvstore import errors
from kvstore.v1 import control_pb2 as pb
from kvstore.v1 import control_pb2_grpc as pb_grpc
from kvstore.wire import checksum

MiB = 1 << 20


@pytest.fixture
def daemon(shared_daemon):
    """The module's tests share one kvstored, emptied before each (conftest.shared_daemon):
    counters are read as differences."""
    return shared_daemon


@pytest.fixture
def stub(daemon):
    ch = grpc.insecure_channel(daemon.control)
    yield pb_grpc.KVStoreStub(ch)
    ch.close()


def code_of(e: grpc.RpcError) -> int:
    md = dict(e.trailing_metadata() or ())
    return int(md["kvstore-code"])


def call_error(fn, req) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as ei:
        fn(req, timeout=10)
    return ei.value


def test_info_and_health(daemon, stub):
    info = stub.Info(pb.InfoRequest(), timeout=10)
    assert info.data_port == daemon.data_port
    assert info.wire_version == 1 and info.max_key_length == 128
    assert info.max_value_size == 4 * MiB
    h = stub.Health(pb.HealthRequest(), timeout=10)
    assert h.live and h.ready and h.status == "serving" and h.uptime_seconds >= 0


def test_put_get_and_checksum(stub):
    v = b"hello control"
    assert stub.Put(pb.PutRequest(namespace="n", key=b"k", value=v), timeout=10).stored is True
    r = stub.Get(pb.GetRequest(namespace="n", key=b"k"), timeout=10)
    assert r.value == v and r.checksum == checksum(v)  # computed by the daemon when absent
    # a wrong checksum is refused and nothing is stored
    e = call_error(stub.Put, pb.PutRequest(namespace="n", key=b"bad", value=v, checksum=checksum(v) ^ 7))
    assert e.code() == grpc.StatusCode.DATA_LOSS and code_of(e) == errors.ChecksumMismatch.code
    e = call_error(stub.Get, pb.GetRequest(namespace="n", key=b"bad"))
    assert e.code() == grpc.StatusCode.NOT_FOUND and code_of(e) == errors.NotFound.code


@pytest.mark.parametrize("method, req, status, err", [
    ("Get", pb.GetRequest(namespace="n", key=b"missing"), grpc.StatusCode.NOT_FOUND, errors.NotFound),
    ("Get", pb.GetRequest(namespace="bad ns", key=b"k"), grpc.StatusCode.INVALID_ARGUMENT,
     errors.InvalidArgument),
    ("Get", pb.GetRequest(namespace="n", key=b""), grpc.StatusCode.INVALID_ARGUMENT,
     errors.InvalidArgument),
    ("Put", pb.PutRequest(namespace="n", key=b"k" * 129, value=b"v"), grpc.StatusCode.INVALID_ARGUMENT,
     errors.InvalidArgument),
    ("Put", pb.PutRequest(namespace="n", key=b"big", value=bytes(4 * MiB + 1)),
     grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument),
    ("Exists", pb.KeysRequest(namespace="", keys=[b"k"]), grpc.StatusCode.INVALID_ARGUMENT,
     errors.InvalidArgument),
    ("Lookup", pb.KeysRequest(namespace="n", keys=[b"ok", b""]), grpc.StatusCode.INVALID_ARGUMENT,
     errors.InvalidArgument),
    ("Pin", pb.PinRequest(namespace="n", keys=[b"k"], ttl_seconds=0), grpc.StatusCode.INVALID_ARGUMENT,
     errors.InvalidArgument),
    ("Pin", pb.PinRequest(namespace="n", keys=[b"k"], ttl_seconds=float("nan")),
     grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument),
    ("List", pb.ListRequest(namespace="no spaces"), grpc.StatusCode.INVALID_ARGUMENT,
     errors.InvalidArgument),
])
def test_typed_errors(stub, method, req, status, err):
    e = call_error(getattr(stub, method), req)
    assert e.code() == status
    assert code_of(e) == err.code
    assert e.details()


def test_conflict_code(stub):
    stub.Put(pb.PutRequest(namespace="n", key=b"c", value=b"1"), timeout=10)
    assert stub.Put(pb.PutRequest(namespace="n", key=b"c", value=b"1"), timeout=10).stored is False
    e = call_error(stub.Put, pb.PutRequest(namespace="n", key=b"c", value=b"2"))
    assert e.code() == grpc.StatusCode.ALREADY_EXISTS and code_of(e) == errors.Conflict.code


def test_max_batch_keys(daemon, stub):
    keys = [b"%06d" % i for i in range(65537)]
    e = call_error(stub.Exists, pb.KeysRequest(namespace="n", keys=keys))
    assert code_of(e) == errors.InvalidArgument.code
    r = stub.Exists(pb.KeysRequest(namespace="n", keys=keys[:65536]), timeout=30)
    assert len(r.exists) == 65536 and not any(r.exists)
    with kvstore.Client(daemon.control, namespace="n", timeout=30) as c:
        with pytest.raises(errors.InvalidArgument):
            c.lookup(keys)


def test_list_and_stats(stub):
    puts = stub.Stats(pb.StatsRequest(), timeout=10).counters["puts"]
    for ns in ("a", "b"):
        for i in range(3):
            stub.Put(pb.PutRequest(namespace=ns, key=b"%d" % i, value=b"x" * (i + 1)), timeout=10)
    stub.Pin(pb.PinRequest(namespace="a", keys=[b"0", b"missing"], ttl_seconds=60), timeout=10)
    allr = stub.List(pb.ListRequest(), timeout=10)
    assert allr.total == 6 and len(allr.entries) == 6
    ar = stub.List(pb.ListRequest(namespace="a", limit=2), timeout=10)
    assert ar.total == 3 and len(ar.entries) == 2 and all(e.namespace == "a" for e in ar.entries)
    full = stub.List(pb.ListRequest(namespace="a"), timeout=10)
    assert {(e.key, e.size, e.pinned) for e in full.entries} == {(b"0", 1, True), (b"1", 2, False),
                                                                 (b"2", 3, False)}
    st = stub.Stats(pb.StatsRequest(), timeout=10)
    assert dict(st.namespaces) == {"a": 3, "b": 3}
    assert st.counters["objects"] == 6 and st.counters["object_bytes"] == 12
    assert st.counters["pinned"] == 1 and st.counters["puts"] == puts + 6
    dram = st.tiers[0]
    assert dram.name == "dram" and dram.capacity_bytes == 64 * MiB and dram.objects == 6


def test_control_errors_are_counted(stub):
    before = stub.Stats(pb.StatsRequest(), timeout=10).counters["control_errors_NotFound"]
    call_error(stub.Get, pb.GetRequest(namespace="n", key=b"missing"))
    st = stub.Stats(pb.StatsRequest(), timeout=10)
    assert st.counters["control_errors_NotFound"] >= before + 1
