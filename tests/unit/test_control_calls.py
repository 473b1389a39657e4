"""kvstore.control without sockets: the table of control calls that Client and
AsyncClient share (request built, rpc named, response parsed, overrides passed on).

The calls against a real daemon are tests/client and tests/security; here ``_call``
is a recorder, which is all the table's own logic needs."""
from __future__ import annotations

import asyncio
import inspect

import pytest

import kvstore
from kvstore import control, errors
from kvstore._common import Namespaced
from kvstore.control import CALLS, AsyncControl, Call, SyncControl, epoch_metadata
from kvstore.v1 import control_pb2 as pb
from kvstore.wire import checksum


class Recorder(SyncControl, Namespaced):
    """A client whose _call records what would be sent and answers ``reply``."""

    def __init__(self, reply=None, verify: bool = True):
        super().__init__("mine")
        self.verify_checksums = verify
        self.reply = reply
        self.sent: list[tuple] = []

    def _call(self, rpc, request, timeout=None, epoch=None):
        self.sent.append((rpc, request, timeout, epoch))
        return self.reply


class AsyncRecorder(AsyncControl, Namespaced):
    def __init__(self, reply=None, verify: bool = True):
        super().__init__("mine")
        self.verify_checksums = verify
        self.reply = reply
        self.sent: list[tuple] = []

    async def _call(self, rpc, request, timeout=None, epoch=None):
        await asyncio.sleep(0)
        self.sent.append((rpc, request, timeout, epoch))
        return self.reply


SERVICE = pb.DESCRIPTOR.services_by_name["KVStore"].methods_by_name


def test_every_call_names_a_service_method_with_its_request_type():
    rec = Recorder()
    args = {"exists": ([b"a"],), "lookup": ([b"a"],), "pin": ([b"a"],), "unpin": ([b"a"],),
            "delete": ([b"a"],), "delete_each": ([b"a"],), "heads": ([b"a"],), "set_policy": ("ns", "replica:2"),
            "control_put": (b"k", b"v"), "control_get": (b"k",)}
    assert set(CALLS) >= set(args) | {"stats", "health", "members", "reload", "drain", "list", "delete_all"}
    for name, build in CALLS.items():
        c = build(rec, *args.get(name, ()))
        assert isinstance(c, Call)
        assert c.rpc in SERVICE, name
        assert type(c.request).DESCRIPTOR.full_name == SERVICE[c.rpc].input_type.full_name, name


def test_both_clients_get_every_call_sync_and_async():
    for name, build in CALLS.items():
        sync, aio = getattr(kvstore.Client, name), getattr(kvstore.AsyncClient, name)
        assert not inspect.iscoroutinefunction(sync) and inspect.iscoroutinefunction(aio), name
        assert sync.__name__ == aio.__name__ == name
        assert inspect.signature(sync) == inspect.signature(aio) == inspect.signature(build)
        assert sync.__doc__ == build.__doc__ and sync.__doc__, name


def test_requests_carry_namespace_and_keys():
    rec = Recorder(reply=pb.ExistsResponse(exists=[True, False]))
    assert rec.exists([b"a", "b"]) == [True, False]
    rpc, req, timeout, epoch = rec.sent[-1]
    assert (rpc, req.namespace, list(req.keys), timeout, epoch) == ("Exists", "mine", [b"a", b"b"], None, None)
    rec.reply = pb.LookupResponse(count=2)
    assert rec.lookup([b"x"], namespace="other") == 2
    assert rec.sent[-1][1].namespace == "other"
    rec.reply = pb.CountResponse(count=2)
    assert rec.pin([b"x"], 5.5) == 2 and rec.sent[-1][1].ttl_seconds == 5.5
    assert rec.unpin([b"x"]) == 2 and rec.sent[-1][0] == "Unpin"


def test_namespace_all_and_policy_default():
    rec = Recorder(reply=pb.CountResponse(count=7))
    assert rec.delete_all() == 7 and rec.sent[-1][1].namespace == "mine"
    assert rec.delete_all(namespace="") == 7 and rec.sent[-1][1].namespace == ""
    rec.reply = pb.ListResponse()
    rec.list(namespace="", limit=3)
    assert (rec.sent[-1][1].namespace, rec.sent[-1][1].limit) == ("", 3)
    rec.reply = pb.SetPolicyResponse(policies={"*": "ec:2+1"})
    assert rec.set_policy("*", "ec:2+1") == {"*": "ec:2+1"}
    assert rec.sent[-1][1].namespace == "*"


def test_overrides_timeout_and_epoch():
    rec = Recorder(reply=pb.CountResponse(count=1))
    rec.delete([b"k"])
    assert rec.sent[-1][3] is None  # the client's epoch
    rec.delete([b"k"], check_epoch=False)
    assert rec.sent[-1][3] == 0  # never redirected
    rec.reply = pb.HealthResponse(live=True)
    assert rec.health(2.5).live and rec.sent[-1][2] == 2.5


def test_epoch_metadata():
    assert epoch_metadata(None, 0) is None
    assert epoch_metadata((("authorization", "Bearer t"),), 0) == (("authorization", "Bearer t"),)
    assert epoch_metadata(None, 9) == (("kvstore-epoch", "9"),)
    assert epoch_metadata((("a", "b"),), 3) == (("a", "b"), ("kvstore-epoch", "3"))


def test_control_get_verifies_when_the_client_does():
    good = pb.GetResponse(value=b"abc", checksum=checksum(b"abc"))
    bad = pb.GetResponse(value=b"abc", checksum=checksum(b"abd"))
    assert Recorder(reply=good).control_get(b"k") == b"abc"
    with pytest.raises(errors.ChecksumMismatch):
        Recorder(reply=bad).control_get(b"k")
    assert Recorder(reply=bad, verify=False).control_get(b"k") == b"abc"
    rec = Recorder(reply=pb.PutResponse(stored=True))
    assert rec.control_put("k", memoryview(b"xyz"), overwrite=True) is True
    req = rec.sent[-1][1]
    assert (req.key, req.value, req.checksum, req.overwrite) == (b"k", b"xyz", checksum(b"xyz"), True)


@pytest.mark.parametrize("bad", [
    lambda c: c.exists("one-key-not-a-list"),
    lambda c: c.lookup([b""]),
    lambda c: c.pin([b"x" * 129]),
    lambda c: c.delete([b"k"], namespace="bad namespace!"),
    lambda c: c.control_put(b"", b"v"),
])
def test_bad_arguments_raise_before_anything_is_sent(bad):
    rec = Recorder()
    with pytest.raises(errors.InvalidArgument):
        bad(rec)
    assert rec.sent == []
    arec = AsyncRecorder()
    coro = bad(arec)  # AsyncClient: raised when awaited, as before
    with pytest.raises(errors.InvalidArgument):
        asyncio.run(coro)
    assert arec.sent == []


def test_async_calls_await_and_parse():
    async def main():
        rec = AsyncRecorder(reply=pb.ReloadResponse(changed=["tokens", "tls"]))
        assert await rec.reload() == ["tokens", "tls"]
        rec.reply = pb.LookupResponse(count=4)
        got = await asyncio.gather(*(rec.lookup([b"k%d" % i]) for i in range(50)))  # concurrent
        assert got == [4] * 50 and len(rec.sent) == 51
        rec.reply = pb.CountResponse(count=4)
        assert await rec.delete([b"k"], check_epoch=False) == 4 and rec.sent[-1][3] == 0

    asyncio.run(asyncio.wait_for(main(), 10))


def test_errors_from_the_call_pass_through_unchanged():
    class Failing(Recorder):
        def _call(self, rpc, request, timeout=None, epoch=None):
            raise errors.PermissionDenied("no")

    with pytest.raises(errors.PermissionDenied, match="no"):
        Failing().stats()


def test_builders_are_module_level_and_named_once():
    # one definition per call: the clients' classes hold generated methods, not copies
    for name in CALLS:
        assert name not in kvstore.Client.__dict__ and name not in kvstore.AsyncClient.__dict__
        assert getattr(kvstore.Client, name) is getattr(control.SyncControl, name)
        assert getattr(kvstore.AsyncClient, name) is getattr(control.AsyncControl, name)
