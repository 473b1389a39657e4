"""ClusterClient's fanned-out batch get (reads._GetFanout: every node's GETs sent, and every
answer read, from the calling thread) against real kvstored processes: the same results
as the thread-pool path, more requests than the window to one node, a stalled and a
killed node, refused tokens, buffers too small and corrupt checksums, threads sharing one
client, and same-host shm going through the pool."""
from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest
from threadutil import run_threads

pytest.importorskip("pyeclib")

import kvstore  # noqa: E402
from clusterutil import (FANOUT_POLICIES, FANOUT_SIZES, fanout_cluster, random_objects,  # noqa: E402
                         wait_for)
from etcdutil import TTL, needs_etcd  # noqa: E402
from kvstore import channel, errors  # noqa: E402
from kvstore.cluster import ClusterClient, writes  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "security"))
from secutil import token, write_tokens  # noqa: E402

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20
POLICIES, SIZES = FANOUT_POLICIES, FANOUT_SIZES
cluster, objects = fanout_cluster, random_objects


@pytest.fixture
def nodes(module_daemons):
    return module_daemons.group([f"g{i}" for i in range(5)])


def outcome(fn):
    """What a call gives: its value, or the type of the error it raised."""
    try:
        return fn()
    except errors.KVStoreError as e:
        return type(e)


def get_into(cc, keys, ns, room=None):
    bufs = [bytearray(room or 3 * MIB) for _ in keys]
    sizes = cc.batch_get_into(keys, bufs, namespace=ns)
    return [bytes(b[:n]) for b, n in zip(bufs, sizes)]


@pytest.mark.parametrize("ns", list(POLICIES))
def test_fanout_reads_what_the_pool_path_reads(nodes, ns):
    """get, get_into, batch_get and batch_get_into give the same bytes fanned out and on
    the pool; an absent object is NotFound on both; over plain TCP nothing goes to the pool."""
    objs = objects(ns, 18)
    objs[f"{ns}-empty".encode()] = b""
    keys = list(objs)
    with cluster(nodes) as w:
        assert all(w.batch_put(list(objs.items()), namespace=ns))
    seen = {}
    for fanout in (True, False):
        with cluster(nodes, fanout_gets=fanout) as cc:
            assert [bytes(b) for b in cc.batch_get(keys, namespace=ns)] == list(objs.values())
            assert get_into(cc, keys, ns) == list(objs.values())
            k = keys[4]
            assert bytes(cc.get(k, namespace=ns)) == objs[k]
            buf = bytearray(len(objs[k]) + 10)
            assert cc.get_into(k, buf, namespace=ns) == len(objs[k]) and bytes(buf[:len(objs[k])]) == objs[k]
            seen[fanout] = (
                outcome(lambda: cc.batch_get(keys[:3] + [b"absent"] + keys[3:6], namespace=ns)),
                outcome(lambda: get_into(cc, [b"absent", keys[0]], ns)),
                outcome(lambda: cc.get(b"absent", namespace=ns)),
            )
            # a batch with an absent key still returns the present ones intact afterwards
            assert [bytes(b) for b in cc.batch_get(keys[:6], namespace=ns)] == [objs[k] for k in keys[:6]]
            assert cc.pooled_get_jobs == 0
            assert not cc._down_now()
    assert seen[True] == seen[False] == (errors.NotFound,) * 3


def test_more_requests_than_the_window_to_one_node(nodes, monkeypatch):
    """One node gets more GETs in a batch than FANOUT_WINDOW: never more than that many
    are unanswered on its connection, the rest are sent as answers come in, and every
    object (get and get_into) comes back."""
    n = writes.FANOUT_WINDOW * 2 + 37
    objs = objects("win", n, sizes=[2048, 100, 9000, 0])
    most = [0]
    real = channel.GetReader.expect

    def expect(self, *a, **kw):
        real(self, *a, **kw)
        most[0] = max(most[0], self.pending())

    monkeypatch.setattr(channel.GetReader, "expect", expect)
    with ClusterClient([nodes[0].control], policy="none", node_timeout=10.0, shm=False) as cc:
        assert all(cc.batch_put(list(objs.items())))
        got = cc.batch_get(list(objs))
        assert [bytes(g) for g in got] == list(objs.values())
        bufs = [bytearray(9000) for _ in objs]
        assert cc.batch_get_into(list(objs), bufs) == [len(v) for v in objs.values()]
        assert all(bytes(b[:len(v)]) == v for b, v in zip(bufs, objs.values()))
        assert cc.pooled_get_jobs == 0
    assert most[0] == writes.FANOUT_WINDOW


@pytest.mark.parametrize("ns", ["ec", "rep"])
def test_stalled_node_is_read_around_within_the_node_timeout(nodes, ns):
    """A node that stops answering (SIGSTOP) under a batch get: after about the node
    timeout it is marked down and the batch reads around it (EC decodes from the other
    fragments, a replica comes from the other copy), get and get_into."""
    objs = objects(f"stall-{ns}", 20, sizes=[300_000, MIB])
    with cluster(nodes, node_timeout=1.5, fragment_timeout=0.5, down_s=60.0) as cc:
        assert all(cc.batch_put(list(objs.items()), namespace=ns))
        assert [bytes(b) for b in cc.batch_get(list(objs), namespace=ns)] == list(objs.values())
        # a node the batch reads from (see test_killed_node_is_read_around)
        m = cc._slots(next(iter(objs)), ns, cc.policy(ns), write=False)[0][0]
        victim = next(d for d in nodes if d.control == m.address)
        victim.proc.send_signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            got = cc.batch_get(list(objs), namespace=ns)
            took = time.monotonic() - t0
            assert [bytes(b) for b in got] == list(objs.values())
            assert took < 1.5 + 5.0, f"a stalled node held the get for {took:.1f}s"
            down = {m.node_id for m in cc.members() if m.address == victim.control}
            assert down and down <= set(cc._down_now()), "the stalled node is not marked down"
            assert get_into(cc, list(objs), ns) == list(objs.values())  # down: read around at once
            if ns == "ec":  # its fragments' slots still name it: those parts go the pool's way
                assert cc.pooled_get_jobs > 0
            else:  # a copy on a node marked down is read from the other node
                assert cc.pooled_get_jobs == 0
        finally:
            victim.proc.send_signal(signal.SIGCONT)


@pytest.mark.parametrize("ns", ["ec", "rep"])
def test_killed_node_is_read_around(nodes, ns):
    """A node killed after the client connected: its connection breaks under the batch
    (dropped, the pool tries it afresh and marks it down) and every object comes back."""
    objs = objects(f"kill-{ns}", 15, sizes=[70_000, MIB])
    with cluster(nodes, node_timeout=3.0) as cc:
        assert all(cc.batch_put(list(objs.items()), namespace=ns))
        assert [bytes(b) for b in cc.batch_get(list(objs), namespace=ns)] == list(objs.values())
        # a node the batch reads from (replicas: the first copy of the first object; a
        # fixed one, nodes[1], held none of the 15 first copies now and then: ~4 % of runs)
        first = next(iter(objs))
        m = cc._slots(first, ns, cc.policy(ns), write=False)[0][0]
        victim = next(d for d in nodes if d.control == m.address)
        victim.proc.kill()
        victim.proc.wait(10)
        assert [bytes(b) for b in cc.batch_get(list(objs), namespace=ns)] == list(objs.values())
        down = {m.node_id for m in cc.members() if m.address == victim.control}
        assert down <= set(cc._down_now())
        assert get_into(cc, list(objs), ns) == list(objs.values())


@pytest.mark.parametrize("ns", list(POLICIES))
def test_buffer_too_small_is_invalid_argument_and_the_connection_stays_usable(nodes, ns):
    """An object larger than its buffer: InvalidArgument naming its size, fanned out as on
    the pool; the payload is discarded, so the same connections serve the next batch."""
    objs = objects(f"small-{ns}", 6, sizes=[5000, 200_000])
    keys = list(objs)
    with cluster(nodes) as w:
        assert all(w.batch_put(list(objs.items()), namespace=ns))
    for fanout in (True, False):
        with cluster(nodes, fanout_gets=fanout) as cc:
            bufs = [bytearray(250_000) for _ in keys]
            bufs[3] = bytearray(100)
            with pytest.raises(errors.InvalidArgument, match="bytes"):
                cc.batch_get_into(keys, bufs, namespace=ns)
            assert get_into(cc, keys, ns, room=250_000) == list(objs.values())
            assert not cc._down_now()
            if fanout:
                assert cc.pooled_get_jobs == 0
    with cluster(nodes) as cc:
        with pytest.raises(errors.InvalidArgument):
            cc.batch_get_into(keys, [bytearray(10)], namespace=ns)  # malformed: counts differ
        with pytest.raises(errors.InvalidArgument):
            cc.batch_get_into(keys, [bytes(250_000)] * len(keys), namespace=ns)  # read-only
        with pytest.raises(errors.InvalidArgument):
            cc.batch_get([b"k" * 4096], namespace=ns)  # a key over the limit


class _Trickle:
    """A client socket whose reads return a few bytes at a time, and now and then nothing
    yet (EAGAIN) though bytes are waiting: every split of a header or payload (and of an
    EC record's head) is met by the incremental parser."""

    def __init__(self, sock, seed: int):
        import random
        self._sock, self._rnd, self.calls = sock, random.Random(seed), 0
        self.split = 0  # reads that returned less than a header (1-39 bytes)

    def recv_into(self, buf, nbytes=0, flags=0):
        import socket
        self.calls += 1
        if flags & socket.MSG_DONTWAIT and self._rnd.random() < 0.2:
            raise BlockingIOError
        cap = self._rnd.choice([1, 2, 7, 39, 40, 41, 117, 4096, 100_000])
        n = self._sock.recv_into(buf, min(nbytes or len(buf), cap), flags)
        self.split += 0 < n < 40
        return n

    def __getattr__(self, name):
        return getattr(self._sock, name)


@pytest.mark.parametrize("ns", list(POLICIES))
def test_answers_arriving_in_pieces(nodes, ns):
    """Answers read a few bytes at a time (headers, payloads, error messages and EC heads
    split anywhere) still give every object, NotFound for an absent one, and leave the
    connections usable."""
    objs = objects(f"trickle-{ns}", 8, sizes=[0, 1, 4096, 300_001, MIB])
    keys = list(objs)
    with cluster(nodes) as cc:
        assert all(cc.batch_put(list(objs.items()), namespace=ns))
        socks = []
        for i, m in enumerate(cc.members()):
            conn = cc.client(m)._channel_here()
            conn.sock = _Trickle(conn.sock, i)
            socks.append(conn.sock)
        assert [bytes(b) for b in cc.batch_get(keys, namespace=ns)] == list(objs.values())
        assert get_into(cc, keys, ns) == list(objs.values())
        with pytest.raises(errors.NotFound):
            cc.batch_get(keys[:2] + [b"absent"], namespace=ns)
        assert [bytes(b) for b in cc.batch_get(keys[::-1], namespace=ns)] == list(objs.values())[::-1]
        assert cc.pooled_get_jobs == 0 and not cc._down_now()
        # the trickle was met (how many reads in all depends on timing: ~500, and 492 was
        # seen, so the bound is on the reads that split a header, ~1/3 of them)
        assert sum(s.split for s in socks) >= 30


@pytest.mark.parametrize("ns", ["plain", "ec"])
def test_broken_connection_is_dropped_and_its_part_read_on_the_pool(nodes, ns):
    """This thread's connection to a node breaks (shut down under the client): the node's
    part goes to the pool on a new connection, once; the node is not marked down and the
    next batch is fanned out again over a fresh connection."""
    import socket

    objs = objects(f"broken-{ns}", 12, sizes=[5000, 300_001, MIB])
    with cluster(nodes) as cc:
        assert all(cc.batch_put(list(objs.items()), namespace=ns))
        assert [bytes(b) for b in cc.batch_get(list(objs), namespace=ns)] == list(objs.values())
        first = next(iter(objs))
        m = cc._slots(first, ns, cc.policy(ns), write=False)[0][0]
        old = cc.client(m)._channel_here()
        old.sock.shutdown(socket.SHUT_RDWR)
        assert get_into(cc, list(objs), ns) == list(objs.values())
        assert cc.pooled_get_jobs == 1 and not cc._down_now()
        assert cc.client(m)._channel_here() is not old
        assert [bytes(b) for b in cc.batch_get(list(objs), namespace=ns)] == list(objs.values())
        assert cc.pooled_get_jobs == 1


def test_corrupt_checksum_is_caught_and_read_around(nodes, monkeypatch):
    """Responses from one node whose checksum does not match their bytes (the header's
    checksum altered as it is parsed, client side): ChecksumMismatch on the fanned-out
    path as on the pool path; replicas then come from the other copy, EC objects from
    other fragments, and a single copy cannot be read (Unavailable) on both paths."""
    objs = {ns: objects(f"csum-{ns}", 8, sizes=[3000, 600_000, 2 * MIB]) for ns in POLICIES}
    with cluster(nodes) as w:
        for ns, o in objs.items():
            assert all(w.batch_put(list(o.items()), namespace=ns))
    bad_port = {}
    real = channel.TcpChannel.header_response

    def corrupted(self, *args):
        r = real(self, *args)
        if self.address[1] in bad_port and r.op == 2 and not r.status and r.length:
            r.checksum ^= 1
            bad_port[self.address[1]] += 1
        return r

    monkeypatch.setattr(channel.TcpChannel, "header_response", corrupted)
    seen = {}
    for fanout in (True, False):
        with cluster(nodes, fanout_gets=fanout) as cc:
            first = next(iter(objs["plain"]))  # its single copy's node answers corrupted
            victim = cc.client(cc._slots(first, "plain", cc.policy("plain"), write=False)[0][0])
            bad_port.clear()
            bad_port[victim._channel_here().address[1]] = 0
            for ns in ("rep", "ec"):
                assert [bytes(b) for b in cc.batch_get(list(objs[ns]), namespace=ns)] == list(objs[ns].values())
                assert get_into(cc, list(objs[ns]), ns) == list(objs[ns].values())
            seen[fanout] = outcome(lambda: cc.batch_get(list(objs["plain"]), namespace="plain"))
            assert next(iter(bad_port.values())) > 0, "no corrupted response was read"
    assert seen[True] == seen[False] == errors.Unavailable


def test_ec_data_fragments_land_in_place_and_a_missing_one_is_decoded(nodes, monkeypatch):
    """Healthy EC reads receive the data fragments at their offsets in the object's buffer
    (reads._Placer: the whole object comes from there, checked by its checksum); with a
    data fragment deleted from its node, the landed ones become records again and the
    object is decoded with a parity fragment, get and get_into, as on the pool path."""
    from kvstore.cluster import reads
    from kvstore.layout import fragment_key, lap_key

    objs = objects("place", 6, sizes=[300_001, MIB, 2 * MIB + 7])
    keys = list(objs)
    wholes: list = []
    real = reads._Placer.whole
    monkeypatch.setattr(reads._Placer, "whole", lambda self: wholes.append(real(self)) or wholes[-1])
    with cluster(nodes) as cc:
        assert all(cc.batch_put(list(objs.items()), namespace="ec"))
        assert [bytes(b) for b in cc.batch_get(keys, namespace="ec")] == list(objs.values())
        assert get_into(cc, keys, "ec") == list(objs.values())
        assert len(wholes) == 2 * len(keys) and all(w is not None for w in wholes)
        p = cc.policy("ec")
        for k in keys[::2]:  # data fragment 0 (slot 0) gone from its node
            m, lap = cc._slots(k, "ec", p, write=False)[0]
            cc.client(m).delete([lap_key(fragment_key(k), lap)], namespace="ec")
        wholes.clear()
        for fanout in (True, False):
            cc.fanout_gets = fanout
            assert [bytes(b) for b in cc.batch_get(keys, namespace="ec")] == list(objs.values())
            assert get_into(cc, keys, "ec") == list(objs.values())
        assert sum(w is None for w in wholes) == 2 * len(keys[::2])  # fanned out: decoded
        assert cc.pooled_get_jobs == 0


def test_threads_share_one_client(nodes):
    """Four threads read through one ClusterClient at once (each its own channels), get
    and get_into, every policy: every object comes back."""
    objs = {ns: objects(f"thr-{ns}", 12, sizes=[70_000, 600_000]) for ns in POLICIES}
    with cluster(nodes) as cc:
        for ns, o in objs.items():
            assert all(cc.batch_put(list(o.items()), namespace=ns))

        def work(t: int) -> None:
            for r in range(3):
                for ns, o in objs.items():
                    keys = list(o)[t:] + list(o)[:t]
                    want = [o[k] for k in keys]
                    if (r + t) % 2:
                        assert [bytes(b) for b in cc.batch_get(keys, namespace=ns)] == want
                    else:
                        assert get_into(cc, keys, ns, room=600_000) == want
        run_threads(work, range(4))
        assert cc.pooled_get_jobs == 0


@needs_etcd
def test_old_member_list_is_redirected(etcd, start_daemon, tmp_path):
    """Nodes that joined after the client read its member list: the fanned-out gets are
    answered Redirect (read to the end, connections kept), the client re-reads the list
    and reads every object again from its current slots."""
    def start(name: str):
        cfg = tmp_path / f"{name}.toml"
        cfg.write_text("\n".join([
            "[node]", f'id = "{name}"', "[cluster]", "enabled = true", f"lease_ttl = {TTL}",
            'name = "gf"', f'etcd_endpoints = "{etcd.endpoint}"', "repair_delay = 30",
            'policies = "ec=ec:2+1, rep=replicas:2"']) + "\n")
        return start_daemon("--config", str(cfg), "--dram-size", "128MiB")

    def placement(d) -> int:
        with kvstore.Client(d.control, timeout=5) as c:
            return sum(1 for m in c.members().members if m.placement)

    ds = [start(f"n{i}") for i in range(3)]
    wait_for(lambda: all(placement(d) == 3 for d in ds), 15, "three nodes")
    objs = objects("redir", 10, sizes=[5000, 300_001, MIB])
    with ClusterClient.from_cluster(ds[0].control, refresh_s=3600, shm=False) as cc:
        for ns in ("ec", "rep"):
            assert all(cc.batch_put(list(objs.items()), namespace=ns))
        ds.append(start("n3"))
        wait_for(lambda: placement(ds[0]) == 4, 15, "n3 joined")
        before = cc.redirects
        assert [bytes(b) for b in cc.batch_get(list(objs), namespace="ec")] == list(objs.values())
        assert cc.redirects > before and len(cc.members()) == 4
        ds.append(start("n4"))
        wait_for(lambda: placement(ds[0]) == 5, 15, "n4 joined")
        before = cc.redirects
        assert get_into(cc, list(objs), "rep") == list(objs.values())
        assert cc.redirects > before and len(cc.members()) == 5
        assert cc.pooled_get_jobs == 0


@pytest.fixture(scope="module")
def auth_nodes(module_daemons, tmp_path_factory):
    d = tmp_path_factory.mktemp("getfan-auth")
    tokens = write_tokens(d / "tokens.toml")
    cfg = d / "auth.toml"
    cfg.write_text(f'[auth]\nenabled = true\ntokens_file = "{tokens}"\n')
    return module_daemons.group([f"ga{i}" for i in range(3)], "--config", str(cfg))


@pytest.mark.parametrize("policy", ["replicas:2", "ec:2+1"])
def test_tokens(auth_nodes, policy):
    """A read-only token reads (fanned out, nothing on the pool); a token of another
    namespace (refused per request) and an unknown one (refused at AUTH: that node's part
    goes the pool's way) get the same typed error on both paths, PermissionDenied for
    replicas."""
    objs = objects(f"auth-{policy}", 7, sizes=[5000, 400_000])
    addrs = [d.control for d in auth_nodes]

    def cc(tok, **kw):
        return ClusterClient(addrs, policy=policy, namespace="team-a", token=tok, node_timeout=5.0,
                             shm=False, **kw)

    with cc(token("rw")) as rw:
        assert all(rw.batch_put(list(objs.items())))
    with cc(token("ro")) as ro:
        assert [bytes(b) for b in ro.batch_get(list(objs))] == list(objs.values())
        assert get_into(ro, list(objs), None) == list(objs.values())
        assert ro.pooled_get_jobs == 0
    for tok in (token("other"), "not-a-token"):  # (admin scope includes read)
        seen = {}
        for fanout in (True, False):
            with cc(tok, fanout_gets=fanout) as c:
                seen[fanout] = (outcome(lambda: c.batch_get(list(objs))),
                                outcome(lambda: get_into(c, list(objs)[:2], None)))
        assert seen[True] == seen[False], (tok, seen)
        assert all(isinstance(x, type) and issubclass(x, errors.KVStoreError) for x in seen[True]), (tok, seen)
        if policy.startswith("replicas"):
            assert seen[True] == (errors.PermissionDenied,) * 2


@pytest.fixture(scope="module")
def tls_nodes(module_daemons, tmp_path_factory):
    pytest.importorskip("cryptography")
    from seccerts import make_certs
    d = tmp_path_factory.mktemp("getfan-tls")
    certs = make_certs(d / "certs")
    cfg = d / "tls.toml"
    cfg.write_text(f'[tls]\ncert_file = "{certs.node.cert}"\nkey_file = "{certs.node.key}"\n')
    return certs, module_daemons.group([f"gt{i}" for i in range(3)], "--config", str(cfg))


@pytest.mark.parametrize("policy", ["replicas:2", "ec:2+1"])
def test_tls_channels_get_through_the_pool(tls_nodes, policy):
    """TLS channels take no MSG_DONTWAIT reads or sends: every node's part goes to the
    thread pool (counted), with the same results and the same errors."""
    from secutil import client_tls
    certs, ds = tls_nodes
    objs = objects(f"tls-{policy}", 8, sizes=[5000, 300_001, MIB])
    with ClusterClient([d.control for d in ds], policy=policy, tls=client_tls(certs), node_timeout=5.0,
                       shm=False) as cc:
        assert all(cc.batch_put(list(objs.items())))
        assert [bytes(b) for b in cc.batch_get(list(objs))] == list(objs.values())
        assert get_into(cc, list(objs), None) == list(objs.values())
        with pytest.raises(errors.NotFound):
            cc.batch_get([b"absent"] + list(objs)[:2])
        assert cc.pooled_get_jobs >= 3  # a part (at least) of each batch


def test_same_host_shm_channels_get_through_the_pool(nodes):
    """On the same host the nodes' channels are shm (large objects move outside the
    frames): the parts go to the thread pool (counted), with the same results."""
    objs = objects("shm", 12, sizes=[300_000, MIB])
    with cluster(nodes, shm=None) as cc:
        assert all(cc.batch_put(list(objs.items()), namespace="ec"))
        assert [bytes(b) for b in cc.batch_get(list(objs), namespace="ec")] == list(objs.values())
        assert get_into(cc, list(objs), "ec") == list(objs.values())
        assert cc.pooled_get_jobs > 0
