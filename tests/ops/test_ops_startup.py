"""Start-up of a real kvstored: ready only once the arena is prefaulted (warming before),
and every way a start can fail is one line on stderr, exit 2, and no socket file left."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kvstore
from daemonutil import ROOT
from opsutil import http_get, kv_fields

GiB = 1 << 30


def _env(extra_path: str = "", **kw) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, str(ROOT / "client"), str(ROOT))
                                        if p)
    env.update(kw)
    return env


def _argv(tmp_path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "kvstored", "--host", "127.0.0.1", "--port", "0",
            "--data-port", "0", "--metrics-port", "0", "--dram-size", "64MiB",
            "--slab-size", "4MiB", "--max-value-size", "4MiB", *args]


def _wait_line(path: Path, needle: str, proc: subprocess.Popen, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in path.read_text(errors="replace").splitlines():
            if needle in line:
                return line
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    raise AssertionError(f"no {needle!r} in the log:\n{path.read_text(errors='replace')[-3000:]}")


# ---------------------------------------------------------------- warming

def test_ready_only_once_the_arena_is_prefaulted(tmp_path):
    """/readyz, Health, the ready file and READY=1 wait for the prefault; data is served
    meanwhile. 2 GiB takes ~1.6 s to prefault at the 808 us/MiB measured on the dev VM."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.setblocking(False)
    ready_file = tmp_path / "ready.json"
    log_path = tmp_path / "kvstored.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            _argv(tmp_path, "--dram-size", "2GiB", "--ready-file", str(ready_file)),
            stdout=log, stderr=subprocess.STDOUT,
            env=_env(NOTIFY_SOCKET=str(tmp_path / "notify")))
    messages: list[str] = []

    def drain_notify() -> None:
        for _ in range(1000):
            try:
                messages.append(notify.recv(4096).decode())
            except BlockingIOError:
                return

    try:
        first = kv_fields(_wait_line(log_path, "msg=\"kvstored", proc))
        control, metrics = first["control"], first["metrics"]
        seen_warming = []
        deadline = time.monotonic() + 120
        with kvstore.Client(control, namespace="t", shm=False, timeout=10) as c:
            while not ready_file.exists() and time.monotonic() < deadline:
                assert proc.poll() is None
                status, _, body = http_get(f"http://{metrics}/readyz")
                h = c.health()
                if status == 503:
                    assert body.startswith(b"not ready: warming (arena prefaulted "), body
                    # (asked just after /readyz: the prefault may have ended in between)
                    assert h.live and ((h.status == "warming" and not h.ready)
                                       or (h.status == "serving" and h.ready)), h
                    c.put(f"early-{len(seen_warming)}", b"x" * 4096)  # served meanwhile
                    if not seen_warming:  # the CLI shows it too (unless it ended meanwhile)
                        r = subprocess.run([sys.executable, "-m", "kvstore.cli", "-a", control,
                                            "status"], capture_output=True, text=True,
                                           timeout=60, env=_env())
                        assert r.returncode == 0, r.stderr
                        assert ("warming (live, not ready)" in r.stdout
                                or http_get(f"http://{metrics}/readyz")[0] == 200), r.stdout
                    seen_warming.append(body)
                drain_notify()
                time.sleep(0.02)
            assert ready_file.exists(), "not ready within 120 s"
            stats = c.stats().counters
            # the moment it says ready, the whole arena is faulted in
            assert stats["dram_prefaulted"] == stats["dram_capacity"] == 2 * GiB
            assert http_get(f"http://{metrics}/readyz")[0] == 200
            h = c.health()
            assert h.ready and h.status == "serving"
            for i in range(len(seen_warming)):
                assert c.get(f"early-{i}") == b"x" * 4096
        until = time.monotonic() + 10  # READY=1 follows the ready file
        while time.monotonic() < until and not any("READY=1" in m.split("\n") for m in messages):
            drain_notify()
            time.sleep(0.02)
        ready_at = [i for i, m in enumerate(messages) if "READY=1" in m.split("\n")]
        assert len(ready_at) == 1, messages
        warming = [m for m in messages[:ready_at[0]] if "STATUS=warming" in m]
        log_text = log_path.read_text()
        if first["msg"] == "kvstored listening":  # it listened before the prefault ended
            assert seen_warming or warming or "warm_s=" in log_text
            assert all("EXTEND_TIMEOUT_USEC=" in m for m in warming), warming
            assert re.search(r'msg="kvstored ready" .*warm_s=', log_text), log_text
        else:  # the prefault had already ended: nothing to wait for
            assert not seen_warming and not warming
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        notify.close()


def test_sigterm_while_warming_exits_0_never_ready(tmp_path):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(30)
    ready_file = tmp_path / "ready.json"
    log_path = tmp_path / "kvstored.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            _argv(tmp_path, "--dram-size", "4GiB", "--ready-file", str(ready_file)),
            stdout=log, stderr=subprocess.STDOUT,
            env=_env(NOTIFY_SOCKET=str(tmp_path / "notify")))
    try:
        line = _wait_line(log_path, "msg=\"kvstored", proc)
        if "kvstored listening" not in line:
            pytest.skip("4 GiB prefaulted before the planes listened: no warming to interrupt")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        msgs = []
        notify.settimeout(0.5)
        for _ in range(100):
            try:
                msgs.append(notify.recv(4096).decode())
            except (BlockingIOError, socket.timeout):
                break
        assert not any("READY=1" in m.split("\n") for m in msgs), msgs
        assert any("STOPPING=1" in m.split("\n") for m in msgs), msgs
        assert not ready_file.exists()
        assert 'msg="kvstored ready"' not in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        notify.close()


def test_sd_notify_never_blocks_on_a_full_queue(tmp_path):
    """A notify socket nobody reads (queue full) drops messages instead of stalling the
    daemon's event loop (the warming progress is sent every second)."""
    from kvstored import sdnotify

    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sink:
        sink.bind(str(path))
        os.environ["NOTIFY_SOCKET"] = str(path)
        try:
            t0 = time.monotonic()
            sent = [sdnotify.notify(f"STATUS=message {i}") for i in range(200)]
            assert time.monotonic() - t0 < 5
        finally:
            del os.environ["NOTIFY_SOCKET"]
        assert sent[0] and not sent[-1]  # the first ones queued, the rest dropped
        assert sink.recv(4096) == b"STATUS=message 0"


# ---------------------------------------------------------------- start-up errors

def _listener(kind=socket.SOCK_STREAM) -> tuple[socket.socket, int]:
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s, s.getsockname()[1]


def _fails_in_one_line(argv: list[str], env: dict | None = None, timeout: float = 60) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                       env=env or _env(), stdin=subprocess.DEVNULL)
    err = [line for line in r.stderr.splitlines() if not line.startswith("ts=")]  # log lines
    assert r.returncode == 2, r.stderr
    assert len(err) == 1 and err[0].startswith("kvstored: error: "), r.stderr
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr
    return err[0]


@pytest.mark.parametrize("argv, words", [
    (["--port", "abc"], "argument --port: invalid int value: 'abc'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--log-level", "verbose"], "argument --log-level: invalid choice: 'verbose'"),
    (["--dram-size"], "argument --dram-size: expected one argument"),
])
def test_a_bad_flag_is_one_line_like_any_start_up_failure(capsys, argv, words):
    """argparse wrote its six-line usage before the error: a journal's noise, and not the
    one line README promises for every start-up failure."""
    from kvstored.config import build_arg_parser
    with pytest.raises(SystemExit) as e:
        build_arg_parser().parse_args(argv)
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith(f"kvstored: error: {words}")
    assert err.endswith(" (kvstored --help lists the flags)\n"), err


def test_a_bad_flag_through_the_entry_point_is_one_line(tmp_path):
    line = _fails_in_one_line(_argv(tmp_path, "--metrics-port", "x"))
    assert "argument --metrics-port: invalid int value: 'x'" in line, line


@pytest.mark.parametrize("clash", ["control", "data", "metrics"])
def test_port_clash_is_one_line_and_leaves_no_socket_file(tmp_path, clash):
    busy, port = _listener()
    sock = tmp_path / "shm.sock"
    cfg = tmp_path / "kvstored.toml"
    cfg.write_text(f'[shm]\nsocket_path = "{sock}"\n')
    flag = {"control": "--port", "data": "--data-port", "metrics": "--metrics-port"}[clash]
    with busy:
        line = _fails_in_one_line(_argv(tmp_path, "--config", str(cfg), flag, str(port)))
    assert f":{port}" in line and "cannot" in line, line
    assert not sock.exists()  # the metrics clash comes after the shm socket was made


def test_shm_socket_problems_are_one_line(tmp_path):
    missing = tmp_path / "no-such-dir" / "shm.sock"
    cfg = tmp_path / "a.toml"
    cfg.write_text(f'[shm]\nsocket_path = "{missing}"\n')
    line = _fails_in_one_line(_argv(tmp_path, "--config", str(cfg)))
    assert str(missing) in line and "shm.socket_path" in line, line

    live = tmp_path / "live.sock"  # another process listens there: never stolen
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(live))
    other.listen()
    cfg.write_text(f'[shm]\nsocket_path = "{live}"\n')
    with other:
        line = _fails_in_one_line(_argv(tmp_path, "--config", str(cfg)))
        assert "in use by another process" in line, line
        assert live.exists()


def test_unwritable_ready_file_is_one_line_and_cleans_up(tmp_path):
    sock = tmp_path / "shm.sock"
    cfg = tmp_path / "kvstored.toml"
    cfg.write_text(f'[shm]\nsocket_path = "{sock}"\n')
    line = _fails_in_one_line(_argv(tmp_path, "--config", str(cfg),
                                    "--ready-file", str(tmp_path / "nodir" / "ready.json")))
    assert "ready file" in line, line
    assert not sock.exists()


def _shadow(tmp_path: Path, module: str) -> str:
    """A directory that makes ``import module`` fail as if the package were not installed."""
    d = tmp_path / f"without-{module}"
    d.mkdir()
    (d / f"{module}.py").write_text(
        f"raise ModuleNotFoundError(\"No module named '{module}'\", name={module!r})\n")
    return str(d)


@pytest.mark.parametrize("module", ["uvloop", "prometheus_client"])
def test_missing_server_extra_names_the_install_command(tmp_path, module):
    """(A real install without the extra, aetcd included: tests/ops/test_wheel_install.py.)"""
    line = _fails_in_one_line(_argv(tmp_path), env=_env(_shadow(tmp_path, module)))
    assert f"'{module}'" in line and "pip install 'kvstored[server]'" in line, line


# ---------------------------------------------------------------- the shm socket

def test_shm_socket_defaults_to_the_runtime_directory(start_daemon, tmp_path):
    """Under systemd ($RUNTIME_DIRECTORY from RuntimeDirectory=) the default socket goes
    there, not into the unit's private /tmp; its mode lets only the owner's group in."""
    runtime = tmp_path / "run" / "kvstored"
    runtime.mkdir(parents=True)
    d = start_daemon(env={"RUNTIME_DIRECTORY": str(runtime)})
    with kvstore.Client(d.control, namespace="t", shm=True) as c:
        path = Path(c.info().shm_socket)
        assert path == runtime / f"kvstored-{d.info['control_port']}.sock"
        assert c.transport == "shm"
    assert path.stat().st_mode & 0o777 == 0o660
    d.stop()
    assert not path.exists()


def test_allowed_uids_can_reach_the_socket(start_daemon, tmp_path):
    """Listed uids share no group with a DynamicUser daemon: the socket is then
    connectable by all, and the per-peer uid check refuses the unlisted."""
    cfg = tmp_path / "kvstored.toml"
    sock = tmp_path / "shm.sock"
    cfg.write_text(f'[shm]\nsocket_path = "{sock}"\nallowed_uids = "4242"\n')
    d = start_daemon("--config", str(cfg))
    assert sock.stat().st_mode & 0o777 == 0o666
    with kvstore.Client(d.control, namespace="t", shm=True) as c:  # our own uid: allowed
        c.put("k", b"v")
        assert c.transport == "shm" and c.get("k") == b"v"
