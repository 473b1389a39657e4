"""Lifecycle of a real kvstored: SIGTERM drains under load, SIGHUP reloads, health, sd_notify."""
from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest

import kvstore
from kvstore import errors
from kvstored import sdnotify
from opsutil import (http_get, kv_fields, log_size, put_frame, read_frame, scrape, value,
                     wait_for_log)

KiB, MiB = 1 << 10, 1 << 20


def _config(tmp_path, text: str, name: str = "kvstored.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def _stopped_line(d) -> dict[str, str]:
    return kv_fields(wait_for_log(d, 'msg=stopped'))


# ---------------------------------------------------------------- SIGTERM

def test_sigterm_under_load_loses_no_acknowledged_write(start_daemon, tmp_path):
    """Writers put as fast as they can; SIGTERM mid-stream.

    The store is DRAM only, so "nothing lost" is checked where it can be: every put
    that returned was answered OK (stored, not an error or a half write); the daemon
    committed every acknowledged put (its final count covers them, with at most one
    unacknowledged commit per writer: the one whose answer the close cut off); no
    put is acknowledged after the daemon exited; it exits 0 within the deadline.
    """
    drain = 5.0
    cfg = _config(tmp_path, f"[server]\ndrain_timeout = {drain}\n")
    d = start_daemon("--config", str(cfg), "--dram-size", "128MiB")
    writers = 4
    acks: list[list[float]] = [[] for _ in range(writers)]
    ends: list[BaseException | None] = [None] * writers
    blob = os.urandom(512 * KiB)
    go = threading.Event()

    def writer(w: int) -> None:
        with kvstore.Client(d.control, namespace="load", timeout=3.0) as c:
            go.wait()
            i = 0
            while True:
                size = (64 + 64 * (i % 4)) * KiB  # 64-256 KiB
                value_ = blob[i % 1024:i % 1024 + size]
                try:
                    stored = c.put(f"w{w}-{i}", value_)
                except BaseException as e:  # noqa: BLE001 - recorded and checked below
                    ends[w] = e
                    return
                assert stored is True, f"put w{w}-{i} answered {stored!r}"
                acks[w].append(time.time())
                i += 1

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    go.set()
    # real load first: 40 puts acknowledged (waited for, bounded, not assumed of a second)
    deadline = time.monotonic() + 30
    while sum(map(len, acks)) < 40 and time.monotonic() < deadline and not any(ends):
        time.sleep(0.05)
    before = sum(map(len, acks))
    t_term = time.time()
    d.proc.send_signal(signal.SIGTERM)
    rc = d.proc.wait(drain + 5)
    t_exit = time.time()
    for t in threads:
        t.join(15)
    assert rc == 0, d.log()
    assert t_exit - t_term < drain + 1, f"exit took {t_exit - t_term:.2f}s"
    acked = sum(map(len, acks))
    assert before >= 40, f"only {before} puts in 30 s: no real load ({ends})"
    # each writer ended on a connection-level error, never a typed refusal of its write
    for e in ends:
        assert isinstance(e, (errors.Unavailable, errors.ProtocolError, OSError)), repr(e)
    assert max(max(a) for a in acks if a) <= t_exit  # nothing acknowledged after the exit
    last = max(max(a) for a in acks if a)
    # still writing when SIGTERM came (2 s: a put's round trip on a loaded machine)
    assert last >= t_term - 2.0, "the writers were still writing when SIGTERM came"
    stopped = _stopped_line(d)
    committed = int(stopped["puts"])
    assert acked <= committed <= acked + writers, (acked, committed)
    assert float(stopped["drain_s"]) < drain


def test_drain_finishes_the_put_in_flight_and_starts_nothing_new(start_daemon, tmp_path):
    """A put mid-payload at SIGTERM completes and is answered; a new request is not."""
    cfg = _config(tmp_path, "[server]\ndrain_timeout = 20.0\n")
    d = start_daemon("--config", str(cfg))
    payload = os.urandom(2 * MiB)
    frame = put_frame(1, b"inflight", payload)
    cut = len(frame) - MiB
    busy = socket.create_connection(("127.0.0.1", d.data_port), timeout=10)
    idle = socket.create_connection(("127.0.0.1", d.data_port), timeout=10)
    busy.sendall(frame[:cut])  # header and half the payload
    with kvstore.Client(d.control, namespace="t") as c:
        h = c.health()
        assert (h.live, h.ready, h.status) == (True, True, "serving")
        assert c.stats().counters["reservations"] == 1
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    wait_for_log(d, "shutting down")
    # draining: not ready, still live; no new connections
    status, _, body = http_get(d.metrics_url + "/readyz")
    assert (status, body) == (503, b"not ready: draining\n")
    assert http_get(d.metrics_url + "/healthz")[::2] == (200, b"live\n")
    m = scrape(d)
    assert value(m, "kvstored_ready") == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", d.data_port), timeout=2).close()
    # the idle connection was closed without a word; a request sent on it is never answered
    try:
        idle.sendall(put_frame(2, b"late", b"x" * 100))
        assert idle.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        pass
    assert d.alive(), "the daemon must wait for the put in flight"
    busy.sendall(frame[cut:])
    op, rid, status, _ = read_frame(busy)
    assert (op, rid, status) == (1, 1, 0), "the put in flight is committed and acknowledged"
    assert busy.recv(1) == b"", "then the connection ends (FIN), nothing more"
    assert d.proc.wait(10) == 0
    assert time.monotonic() - t0 < 10
    stopped = _stopped_line(d)
    assert stopped["puts"] == "1"
    busy.close()
    idle.close()


def test_drain_deadline_bounds_a_stalled_put(start_daemon, tmp_path):
    """A writer that stalls mid-payload cannot hold shutdown past server.drain_timeout."""
    cfg = _config(tmp_path, "[server]\ndrain_timeout = 1.0\n")
    d = start_daemon("--config", str(cfg))
    s = socket.create_connection(("127.0.0.1", d.data_port), timeout=10)
    s.sendall(put_frame(1, b"stalled", os.urandom(MiB))[:-1000])
    time.sleep(0.2)
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(10) == 0
    assert time.monotonic() - t0 < 3.0
    assert _stopped_line(d)["puts"] == "0"  # the partial put never became an object
    s.close()


def test_health_reports_live_and_ready_separately(daemon):
    with kvstore.Client(daemon.control, namespace="t") as c:
        h = c.health()
    assert h.live and h.ready and h.status == "serving" and h.uptime_seconds > 0
    assert http_get(daemon.metrics_url + "/readyz")[0] == 200
    assert http_get(daemon.metrics_url + "/healthz")[0] == 200


# ---------------------------------------------------------------- SIGHUP

def test_sighup_applies_live_settings_and_names_the_rest(start_daemon, tmp_path):
    cfg = _config(tmp_path, "[server]\nmax_connections = 100\n"
                            "[engine]\nput_wait_timeout = 2.0\n[log]\nlevel = \"info\"\n")
    d = start_daemon("--config", str(cfg))
    with kvstore.Client(d.control, namespace="t") as c:
        with pytest.raises(errors.NotFound):
            c.get("before")  # at info: no debug line for this
        cfg.write_text("[server]\nmax_connections = 1\nmax_control_value_size = \"2MiB\"\n"
                       "[engine]\nput_wait_timeout = 0.5\n[log]\nlevel = \"debug\"\n"
                       "[dram]\nslab_size = \"8MiB\"\n")
        start = log_size(d)
        d.proc.send_signal(signal.SIGHUP)
        line = wait_for_log(d, 'msg="reloaded ', start=start)
        fields = kv_fields(line)
        applied = fields["applied"].split(",")
        assert {"log.level=debug", "server.max_connections=1",
                "engine.put_wait_timeout=0.5"} <= set(applied), line
        assert fields["needs_restart"] == "server.max_control_value_size=2097152", line
        assert "dram.slab_size" in fields["set_by_flags"]  # the test's --slab-size wins
        # the new level is live: a miss is now logged at debug, with its request id
        with pytest.raises(errors.NotFound):
            c.get("after")
        miss = wait_for_log(d, "no key 'after'", start=start)
        assert "level=debug" in miss and "req_id=" in miss and "peer=" in miss
        assert "no key 'before'" not in d.log_path.read_text()
        # the new limit is live: the client holds the one data connection allowed
        with socket.create_connection(("127.0.0.1", d.data_port), timeout=5) as s:
            op, rid, status, msg = read_frame(s)
            assert status == errors.Unavailable.code and b"max 1" in msg
        assert value(scrape(d), "kvstored_config_reloads", result="ok") == 1

        # a broken file changes nothing and the daemon keeps serving
        cfg.write_text("[server]\nmax_connections = \"many\"\n")
        start = log_size(d)
        d.proc.send_signal(signal.SIGHUP)
        line = wait_for_log(d, "reload failed", start=start)
        assert "level=error" in line and "server.max_connections" in line
        assert d.alive() and c.health().ready
        assert value(scrape(d), "kvstored_config_reloads", result="failed") == 1
        c.put("still-serving", b"x")


# ---------------------------------------------------------------- sd_notify

def _notify_socket(tmp_path, abstract: bool) -> tuple[socket.socket, str]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"@kvstored-test-{os.getpid()}-{time.monotonic_ns()}"
        s.bind("\0" + name[1:])
    else:
        name = str(tmp_path / "notify.sock")
        s.bind(name)
    s.settimeout(10)
    return s, name


def _expect(sock: socket.socket, needle: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = sock.recv(4096).decode()
        if needle in msg.split("\n"):
            return msg
    raise AssertionError(f"no {needle} from the daemon")


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_sd_notify_ready_reload_watchdog_stopping(start_daemon, tmp_path, abstract):
    sock, name = _notify_socket(tmp_path, abstract)
    with sock:
        d = start_daemon(env={"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "400000"})
        ready = _expect(sock, "READY=1")
        assert f"MAINPID={d.proc.pid}" in ready
        assert f"data=127.0.0.1:{d.data_port}" in ready and "STATUS=serving" in ready
        _expect(sock, "WATCHDOG=1", timeout=3)
        d.proc.send_signal(signal.SIGHUP)
        _expect(sock, "RELOADING=1")
        _expect(sock, "READY=1")
        d.proc.send_signal(signal.SIGTERM)
        _expect(sock, "STOPPING=1")
        assert d.proc.wait(10) == 0


def test_sd_notify_is_a_no_op_outside_systemd(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/dir/notify.sock")
    assert sdnotify.notify("READY=1") is False  # logged, never raised
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 1.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert sdnotify.watchdog_interval() is None
