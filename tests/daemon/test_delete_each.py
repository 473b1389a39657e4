"""Delete answers for each key (DeleteResponse.deleted), on a real kvstored.

A batch delete used to answer only a count, so ClusterClient.delete sent one call per
record to learn which keys had something deleted (2000 keys under ec:4+2 took 5.5 s);
now one call per node and chunk does.
"""
from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

import kvstore
from daemonutil import config
from threadutil import run_threads
from kvstore import errors
from kvstore.v1 import control_pb2 as pb
from kvstore.v1 import control_pb2_grpc as pb_grpc


def test_each_key_answered_in_order(daemon):
    with kvstore.Client(daemon.control, namespace="d", timeout=10) as c:
        for k in (b"a", b"c", b"e"):
            c.put(k, k * 100)
        # absent keys, a repeated one (gone by its second mention), all in request order
        assert c.delete_each([b"a", b"b", b"c", b"c", b"zz", b"e"]) == \
            [True, False, True, False, False, True]
        assert c.exists([b"a", b"c", b"e"]) == [False, False, False]
        assert c.delete_each([]) == []
        # the count form is unchanged, and reads the same response
        c.put(b"f", b"f")
        assert c.delete([b"f", b"g"]) == 1
        st = dict(c.stats().counters)
        assert st["deletes"] >= 4


def test_raw_response_carries_count_and_flags(daemon):
    # the field an older client reads (count, field 1) and the new one, in one reply
    with kvstore.Client(daemon.control, namespace="raw", timeout=10) as c:
        c.put(b"x", b"1")
    with grpc.insecure_channel(daemon.control) as ch:
        r = pb_grpc.KVStoreStub(ch).Delete(pb.KeysRequest(namespace="raw", keys=[b"x", b"y"]),
                                           timeout=10)
    assert isinstance(r, pb.DeleteResponse)
    assert r.count == 1 and list(r.deleted) == [True, False]
    # an older client's parse of the same bytes (CountResponse) sees the count
    assert pb.CountResponse.FromString(r.SerializeToString()).count == 1


def test_malformed_and_oversized(start_daemon, tmp_path):
    d = start_daemon("--config", config(tmp_path, """
        [server]
        max_batch_keys = 8
    """))
    with kvstore.Client(d.control, namespace="m", timeout=10) as c:
        c.put(b"k", b"v")
        with pytest.raises(errors.InvalidArgument, match="limit is 8"):
            c.delete_each([b"k%d" % i for i in range(9)])
        with pytest.raises(errors.InvalidArgument):
            c.delete_each([b""])  # an empty key
        with pytest.raises(errors.InvalidArgument):
            c.delete_each([b"x" * 100_000])  # over the key length limit
        assert c.exists([b"k"]) == [True]  # nothing was deleted by the refused calls
        assert c.delete_each([b"k"]) == [True]


def test_unauthorised(start_daemon, tmp_path):
    tokens = tmp_path / "tokens.toml"
    tokens.write_text('[[token]]\nname = "rw"\ntoken = "rw-token-0123456789abcdef"\n'
                      'namespaces = ["a"]\nscopes = ["read", "write"]\n\n'
                      '[[token]]\nname = "ro"\ntoken = "ro-token-0123456789abcdef"\n'
                      'namespaces = ["a"]\nscopes = ["read"]\n')
    tokens.chmod(0o600)
    d = start_daemon("--config", config(tmp_path, f"""
        [auth]
        enabled = true
        tokens_file = "{tokens}"
    """))
    with kvstore.Client(d.control, namespace="a", timeout=10, token="rw-token-0123456789abcdef") as rw:
        rw.put(b"k", b"v")
        with kvstore.Client(d.control, namespace="a", timeout=10,
                            token="ro-token-0123456789abcdef") as ro:
            with pytest.raises(errors.PermissionDenied):
                ro.delete_each([b"k"])
        with kvstore.Client(d.control, namespace="a", timeout=10) as anon:
            with pytest.raises(errors.PermissionDenied):
                anon.delete_each([b"k"])
        with pytest.raises(errors.PermissionDenied):
            rw.delete_each([b"k"], namespace="b")  # a namespace the token does not name
        assert rw.exists([b"k"]) == [True]
        assert rw.delete_each([b"k"]) == [True]


def test_concurrent_deletes_each_key_counted_once(daemon):
    # four threads delete the same 400 keys at once: every key is reported deleted by
    # exactly one of them
    keys = [b"c%d" % i for i in range(400)]
    with kvstore.Client(daemon.control, namespace="cc", timeout=10) as c:
        for k in keys:
            c.put(k, k)
    results: list[list[bool]] = []
    lock = threading.Lock()

    def worker(order: int) -> None:
        with kvstore.Client(daemon.control, namespace="cc", timeout=20) as c:
            ks = keys if order % 2 == 0 else keys[::-1]
            got = c.delete_each(ks)
            with lock:
                results.append(got if order % 2 == 0 else got[::-1])

    run_threads(worker, range(4), timeout=60)
    assert len(results) == 4
    for j in range(len(keys)):
        assert sum(r[j] for r in results) == 1, keys[j]


def test_async_client(daemon):
    async def run() -> list[bool]:
        c = kvstore.AsyncClient(daemon.control, namespace="as", timeout=10)
        try:
            await c.put(b"p", b"q")
            return await c.delete_each([b"p", b"nope"])
        finally:
            await c.close()
    assert asyncio.run(run()) == [True, False]
