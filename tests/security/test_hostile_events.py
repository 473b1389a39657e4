"""Hostile clients against the descriptor budget: KV event subscribers without number, a
reload raising max_connections past what RLIMIT_NOFILE allows, TLS handshakes under a low
limit. Each test starts a real kvstored (real ZMQ sockets for events) and is bounded in
count and time (waits on conditions, never on fixed sleeps)."""
from __future__ import annotations

import os
import re
import signal
import socket
import time
import urllib.error
import urllib.request

import pytest

import kvstore

from test_hostile import closed_by_peer, connect_from, hostile_daemon, open_fds, stats, wait_for  # noqa: F401

zmq = pytest.importorskip("zmq")
msgpack = pytest.importorskip("msgpack")

KiB = 1 << 10


def metric(d, name: str) -> float | None:
    """One unlabelled sample of /metrics, None when the scrape is refused (rate limit)."""
    try:
        with urllib.request.urlopen(d.metrics_url + "/metrics", timeout=5) as r:
            text = r.read().decode()
    except urllib.error.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def _wait_metric(d, name: str, pred, timeout: float, what: str) -> float:
    def ok():
        v = metric(d, name)
        return v is not None and pred(v) and (v,)
    return wait_for(ok, timeout, what)[0]


def test_event_subscribers_are_bounded_and_a_router_keeps_its_stream(hostile_daemon):
    # events.max_subscribers = 4 on each endpoint. A router subscribes first; then a
    # flood: 150 raw TCP connections that never speak ZMTP and 30 real ZMQ SUB sockets
    # (which reconnect by themselves when closed) on the events endpoint, 40 raw ones on
    # the replay endpoint. The daemon closes every connection over the limit on accept:
    # its connection gauge never passes 4, refusals are counted and logged once (rate
    # limited, per endpoint), its descriptors settle near where they were; a data client is served and
    # the router receives the events of what is stored meanwhile.
    d = hostile_daemon({"events": {"endpoint": '"tcp://127.0.0.1:*"',  # any free port
                                   "replay_endpoint": '"tcp://127.0.0.1:*"',
                                   "max_subscribers": 4,
                                   # the total's test: the per-address cap is round 4's
                                   "max_subscribers_per_client": 4}})
    pid = d.info["pid"]
    pub_ep = d.info["events_endpoint"]  # as bound (the ready file): no port picked to race for
    rep_port = int(d.info["events_replay_endpoint"].rpartition(":")[2])
    ctx = zmq.Context()
    router = ctx.socket(zmq.SUB)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.SUBSCRIBE, b"")
    router.connect(pub_ep)
    hostile_subs, raw = [], []
    good = kvstore.Client(d.control, namespace="ev", timeout=10, shm=False, transport="tcp")

    def hashes_seen(keys: set[bytes], timeout: float) -> set[int]:
        from kvstored.events import block_hash
        want = {block_hash(b"ev", k) for k in keys}
        seen: set[int] = set()
        end = time.monotonic() + timeout
        while not want <= seen and time.monotonic() < end:
            if router.poll(200):
                _, _, payload = router.recv_multipart()
                for ev in msgpack.unpackb(payload)[1]:
                    if ev[0] == "BlockStored":
                        seen.update(ev[1])
        return want & seen

    try:
        # the router is in (a PUB drops what it sends before a subscription arrives)
        for i in range(50):
            k = b"join-%d" % i
            good.put(k, b"j" * 1024)
            if hashes_seen({k}, 0.5):
                break
        else:
            raise AssertionError("the router never received an event")
        assert _wait_metric(d, "kvstored_kv_event_subscribers", lambda v: v == 1, 10,
                            "one subscriber counted") == 1
        base = open_fds(pid)
        flood_start = time.monotonic()
        for i in range(150):
            try:
                raw.append(connect_from(f"127.0.0.{2 + i % 3}", int(pub_ep.rsplit(":", 1)[1]), 2))
            except OSError:
                break
        for i in range(40):
            try:
                raw.append(connect_from("127.0.0.5", rep_port, 2))
            except OSError:
                break
        for _ in range(30):
            s = ctx.socket(zmq.SUB)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SUBSCRIBE, b"")
            s.connect(pub_ep)
            hostile_subs.append(s)
        assert len(raw) >= 150, "the flood did not get going"
        # over the limit: closed by the daemon, all but the 3 + 4 places left
        closed = closed_by_peer(raw, keep=7, timeout=30)
        assert closed >= len(raw) - 7, (closed, len(raw))
        refused = _wait_metric(d, "kvstored_kv_event_subscribers_refused_total",
                               lambda v: v >= len(raw) - 7, 15, "refusals counted")
        for _ in range(10):  # sampled while the SUB sockets keep reconnecting
            n = metric(d, "kvstored_kv_event_subscribers")
            assert n is None or n <= 4, n
            time.sleep(0.05)
        # descriptors: the few let in, at most one per reconnecting SUB socket being
        # refused, a few of ZMQ's own
        bound = base + 7 + len(hostile_subs) + 8
        wait_for(lambda: open_fds(pid) <= bound, 20,
                 f"the daemon's descriptors settled (base {base}, now {open_fds(pid)})")
        log = d.log()
        most = 1 + int((time.monotonic() - flood_start) // 60)  # once a minute at most
        for endpoint in ("events.endpoint", "events.replay_endpoint"):
            assert 1 <= log.count(f"to {endpoint} refused: 4 at once at most "
                                  "(events.max_subscribers)") <= most, log
        # the data plane and the router are served beside the flood
        keys = {b"during-%d" % i for i in range(20)}
        for k in keys:
            good.put(k, b"d" * (4 * KiB))
        assert good.get(b"during-0") == b"d" * (4 * KiB)
        got = hashes_seen(keys, 20)
        assert len(got) == len(keys), f"the router got {len(got)} of {len(keys)} events"
        assert refused >= len(raw) - 7
    finally:
        good.close()
        for s in raw:
            s.close()
        for s in hostile_subs + [router]:
            s.close(0)
        ctx.term()
    assert d.alive()


def _budget_line(log: str, when: str) -> re.Match:
    m = None
    for line in log.splitlines():
        if "RLIMIT_NOFILE is" in line and f"when={when}" in line:
            m = re.search(r"serving at most (\d+) data connections \(server\.max_connections = "
                          r"(\d+)\).*?(\d+) TLS handshakes at once", line)
    assert m is not None, f"no {when} budget line:\n{log}"
    return m


def test_reload_raising_max_connections_keeps_the_descriptor_split(hostile_daemon, tmp_path):
    # Under RLIMIT_NOFILE 256 a SIGHUP raises server.max_connections from 8 to 1000. The
    # reload clamps it to the start-up split's share, naming the settings; a flood of 230
    # silent data connections from one peer is then refused past that share instead of
    # taking the process to its limit, and a connected client keeps being served.
    d = hostile_daemon({"server": {"max_connections": 8, "max_control_connections": 8,
                                   "max_connections_per_client": 1000}},
                       wrapper=["prlimit", "--nofile=256:256", "--"])
    pid = d.info["pid"]
    cfg = [a for a in d.args if a.endswith(".toml")][-1]
    good = kvstore.Client(d.control, namespace="good", timeout=10, shm=False, transport="tcp")
    flood: list[socket.socket] = []
    try:
        good.put(b"before", b"v" * 4096)
        text = open(cfg).read().replace("max_connections = 8", "max_connections = 1000", 1)
        with open(cfg, "w") as f:
            f.write(text)
        # offsets into the whole log: Daemon.log() is its last 4000 characters, whose start
        # moves once the log is longer (what follows ``start`` there is then cut short)
        def whole() -> str:
            return d.log_path.read_text(errors="replace")
        start = len(whole())
        os.kill(pid, signal.SIGHUP)
        wait_for(lambda: "reloaded" in whole()[start:], 15, "the reload applied")
        m = _budget_line(whole()[start:], "reload")
        share = int(m.group(1))
        assert int(m.group(2)) == 1000 and 8 <= share < 200, m.group(0)
        assert "server.max_control_connections" in m.string
        before = stats(d).get("rejected_connections", 0)
        for _ in range(230):
            try:
                flood.append(connect_from("127.0.0.2", d.data_port, 2))
            except OSError:
                break
        assert len(flood) >= 200, "the flood did not get going"
        wait_for(lambda: stats(d).get("rejected_connections", 0) - before
                 >= len(flood) - share, 20, "connections past the share refused")
        assert open_fds(pid) < 256
        c = stats(d)
        assert c.get("descriptor_limit_reached", 0) == 0, c
        assert good.get(b"before") == b"v" * 4096
    finally:
        for s in flood:
            s.close()
        good.close()
    assert d.alive()


def test_tls_handshakes_fit_the_descriptor_split_under_a_low_limit(hostile_daemon, certs):
    # TLS on, RLIMIT_NOFILE 256, default connection settings (they do not fit): the
    # split keeps fewer TLS handshakes in progress than the usual 128 (half the headroom
    # it keeps), said in the start-up warning. 80 silent connections (no ClientHello) from
    # one peer: those past that cap are closed at once, the process stays below its limit,
    # a TLS client connected before is served, and a new one once the flood is gone.
    d = hostile_daemon({"server": {"handshake_timeout": 30, "max_handshakes_per_client": 1000},
                        "tls": {"cert_file": f'"{certs.server.cert}"',
                                "key_file": f'"{certs.server.key}"'}},
                       wrapper=["prlimit", "--nofile=256:256", "--"])
    pid = d.info["pid"]
    tls = kvstore.TLSConfig(ca_file=certs.ca)
    cap = int(_budget_line(d.log(), "start").group(3))
    assert 1 <= cap < 64, cap
    good = kvstore.Client(d.control, namespace="t", timeout=10, shm=False, transport="tcp",
                          tls=tls)
    silent: list[socket.socket] = []
    try:
        good.put(b"before", b"v" * 1024)  # connected before the flood
        before = stats(d, tls=tls).get("rejected_connections", 0)
        for _ in range(80):
            try:
                silent.append(connect_from("127.0.0.2", d.data_port, 2))
            except OSError:
                break
        assert len(silent) == 80
        wait_for(lambda: stats(d, tls=tls).get("rejected_connections", 0) - before
                 >= 80 - cap, 20, f"silent connections past {cap} handshakes refused")
        assert open_fds(pid) < 256
        assert good.get(b"before") == b"v" * 1024  # served beside the held handshakes
        assert dict(good.stats().counters).get("descriptor_limit_reached", 0) == 0
    finally:
        for s in silent:
            s.close()
        good.close()
    # the handshake places free again once the silent connections are gone
    with kvstore.Client(d.control, namespace="t", timeout=10, shm=False, transport="tcp",
                        tls=tls) as c:
        c.put(b"after", b"w" * 1024)
        assert c.get(b"after") == b"w" * 1024
    assert d.alive()


def test_a_reload_lowering_max_connections_lowers_the_tls_handshake_cap(certs):
    # In process (a real TLS listener on loopback, real sockets): the listener's cap on
    # handshakes in progress is min(max_connections, the descriptor split's). It was read
    # once at start, so a SIGHUP lowering max_connections (node._set_max_connections sets
    # DataServer.max_connections) left 128 silent handshakes possible. After the change,
    # 6 silent connections: 2 are held, 4 refused at once.
    import asyncio

    from kvstored.dataplane.tcp import DataServer
    from kvstored.engine.store import Store, StoreLimits
    from kvstored.tls import ServerTLS

    store = Store(StoreLimits(dram_size=8 << 20, slab_size=1 << 20, max_value_size=1 << 20,
                              hugepages=False, prefault=False))
    srv = DataServer(store, max_connections=64, max_inflight_bytes=4 << 20,
                     tls=ServerTLS(certs.server.cert, certs.server.key))

    async def run():
        port = await srv.start("127.0.0.1", 0)
        assert srv.listener.max_handshakes == 64
        srv.max_connections = 2  # what the reload hook does
        assert srv.listener.max_handshakes == 2
        loop = asyncio.get_running_loop()
        socks = []
        try:
            for _ in range(6):
                s = socket.socket()
                s.setblocking(False)
                await loop.sock_connect(s, ("127.0.0.1", port))
                socks.append(s)
            deadline = time.monotonic() + 20
            while (srv.counters["rejected_connections"] < 4
                   and time.monotonic() < deadline):
                await asyncio.sleep(0.02)
            assert srv.counters["rejected_connections"] == 4, dict(srv.counters)
            assert len(srv.listener.handshakes) == 2
        finally:
            for s in socks:
                s.close()
            srv.stop_accepting()

    try:
        asyncio.run(run())
    finally:
        store.close()
