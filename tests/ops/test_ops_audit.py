"""What an operator's audit of a real kvstored found (session 12), each held by a test:
a SIGHUP during start-up, a tier refused for room, a storm of broken frames in the log,
`kvstore-cli status` on an auth-enabled node without a token, start-up messages that
name the setting to change, and the start-up line saying what runs."""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from daemonutil import Daemon, config
from kvstored import logs
from opsutil import kv_fields, scrape, value, wait_for_log

MiB = 1 << 20
CLI_TIMEOUT = 60  # seconds: a CLI run on a loaded machine (imports grpc)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "kvstore.cli", *args], capture_output=True,
                          text=True, timeout=CLI_TIMEOUT, env=e)


def _daemon_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "kvstored", "--host", "127.0.0.1", "--port", "0",
            "--data-port", "0", "--metrics-port", "0", "--dram-size", "64MiB",
            "--slab-size", "4MiB", "--max-value-size", "4MiB", *args]


def _start_error(*args: str) -> str:
    """The one stderr line of a start that must fail with exit status 2."""
    r = subprocess.run(_daemon_argv(*args), capture_output=True, text=True, timeout=CLI_TIMEOUT)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    errors = [line for line in r.stderr.splitlines() if line.startswith("kvstored: error: ")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    return errors[0]


# ---------------------------------------------------------------- SIGHUP during start-up

def test_sighup_during_start_up_is_applied_once_ready(tmp_path):
    """A SIGHUP before the node is ready (a `systemctl reload` or a config tool during a
    long NVMe recovery or prefault) used to end the process at once: no drain, no flush
    of what was already put, the shm socket file left behind. It is now applied once
    ready. The ready file's temporary name is a FIFO here, so the daemon holds still at
    its last start-up step, listening and serving, until the test reads it."""
    cfg = config(tmp_path, '[server]\nmax_batch_keys = 65536\n')
    d = Daemon(tmp_path, "--config", cfg)
    fifo = str(d.ready_file) + ".tmp"
    os.mkfifo(fifo)
    d.launch()
    try:
        wait_for_log(d, 'msg="kvstored ready"', timeout=60)  # the next step opens the FIFO
        with open(cfg, "w") as f:
            f.write('[server]\nmax_batch_keys = 1000\n')
        d.proc.send_signal(signal.SIGHUP)
        with pytest.raises(subprocess.TimeoutExpired):
            d.proc.wait(1.0)  # before: killed by the signal within milliseconds
        with open(fifo) as f:  # lets the daemon finish its start
            d.info = json.loads(f.read())
        line = wait_for_log(d, "msg=\"reloaded ", timeout=30)
        assert kv_fields(line)["applied"] == "server.max_batch_keys=1000", line
        text = d.log_path.read_text()
        assert text.count('msg="reloaded ') == 1, text[-3000:]
        assert d.alive()
        import kvstore
        with kvstore.Client(d.control, namespace="t", shm=False, timeout=10) as c:
            c.put(b"k", b"v" * 100)
            assert c.get(b"k") == b"v" * 100
        assert d.stop() == 0
    finally:
        d.stop(signal.SIGKILL)


def test_sighup_while_warming_is_applied_once_ready(tmp_path):
    """The same while the arena is prefaulted (the planes already serve): the signal is
    remembered and the reload runs once the node is ready. A fast machine may finish the
    prefault first; then it is an ordinary reload, still exactly one."""
    cfg = config(tmp_path, '[server]\nmax_batch_keys = 65536\n')
    d = Daemon(tmp_path, "--config", cfg, "--dram-size", "1GiB")
    d.launch()
    try:
        first = wait_for_log(d, 'msg="kvstored ', timeout=60)  # listening (warming) or ready
        with open(cfg, "w") as f:
            f.write('[server]\nmax_batch_keys = 1000\n')
        d.proc.send_signal(signal.SIGHUP)
        line = wait_for_log(d, 'msg="reloaded ', timeout=120)
        assert kv_fields(line)["applied"] == "server.max_batch_keys=1000", line
        d.wait_ready(60)
        text = d.log_path.read_text()
        assert text.count('msg="reloaded ') == 1, text[-3000:]
        if 'msg="kvstored listening"' in first and "SIGHUP arrived during start-up" in text:
            # the early path: the reload follows the ready line
            assert text.index('msg="kvstored ready"') < text.index('msg="reloaded '), text
        assert d.stop() == 0
    finally:
        d.stop(signal.SIGKILL)


def test_ctrl_c_during_start_up_is_one_line_not_a_traceback(monkeypatch, capsys):
    """SIGINT before serve() takes it over (the imports, an NVMe recovery: Python's own
    handler raises KeyboardInterrupt there) printed a traceback and died by the signal.
    (Raised where the start spends its first second, importing the SDK and grpc: a real
    signal's moment cannot be aimed from outside, and before main() it is the
    interpreter's own start.)"""
    import kvstored.__main__ as entry

    def interrupted() -> bool:
        raise KeyboardInterrupt

    monkeypatch.setattr(entry, "_tune_malloc", interrupted)
    monkeypatch.setenv("GRPC_VERBOSITY", os.environ.get("GRPC_VERBOSITY", "NONE"))  # restored
    hup = signal.getsignal(signal.SIGHUP)  # main() ignores SIGHUP: this process's, restored
    try:
        assert entry.main(["--port", "0"]) == 130
    finally:
        signal.signal(signal.SIGHUP, hup)
    assert capsys.readouterr().err == "kvstored: interrupted during start-up\n"


# ---------------------------------------------------------------- a tier refused for room

FSIZE_LIMIT = 1 * MiB
# the interpreter under a file-size limit (RLIMIT_FSIZE stands in for a full file system;
# CPython ignores SIGXFSZ, so the reserve fails with EFBIG instead of killing the process)
_LIMITED = [sys.executable, "-c",
            "import os, resource, sys; "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({FSIZE_LIMIT}, {FSIZE_LIMIT})); "
            "os.execv(sys.argv[1], sys.argv[1:])"]


def test_a_tier_refused_for_room_starts_once_there_is_room(tmp_path):
    """The tier's file is reserved whole at start. A refusal for room used to leave the
    4 KiB superblock behind, and every later start (with room) refused the file as one
    that 'shrank': the operator had to find and delete it. Now the reserve comes first."""
    tier = tmp_path / "tier.dat"
    args = ("--nvme-path", str(tier), "--nvme-size", "48MiB", "--nvme-region-size", "16MiB")
    first = Daemon(tmp_path, *args, wrapper=_LIMITED).launch()
    try:
        assert first.proc.wait(60) == 2, first.log()
    finally:
        first.stop(signal.SIGKILL)
    assert "cannot reserve" in first.log() and "nvme.size" in first.log(), first.log()
    assert tier.stat().st_size < FSIZE_LIMIT  # nothing formatted: a plain empty file
    second = Daemon(tmp_path, *args).start(timeout=60)
    try:
        assert "shrank" not in second.log()
        assert tier.stat().st_size == 48 * MiB
        import kvstore
        with kvstore.Client(second.control, namespace="t", shm=False, timeout=10) as c:
            c.put(b"k", b"x" * 4096)
    finally:
        assert second.stop() == 0, second.log()
    third = Daemon(tmp_path, *args).start(timeout=60)  # and the tier it formatted is reused
    try:
        assert "NVMe tier: 1 objects recovered" in third.log(), third.log()
    finally:
        assert third.stop() == 0, third.log()


# ---------------------------------------------------------------- log storms

def test_rate_limit_bounds_repeats_and_counts_what_it_left_out():
    now = [0.0]
    f = logs.RateLimit(burst=3, window=10.0, clock=lambda: now[0])

    def rec(msg: str, level: int = logging.INFO, *args) -> logging.LogRecord:
        return logging.LogRecord("kvstored.tcp", level, __file__, 1, msg, args, None)

    passed = [r for r in (rec("closing: %s", logging.INFO, "bad magic") for _ in range(50))
              if f.filter(r)]
    assert len(passed) == 3 and "rate_limited" in vars(passed[-1])
    assert not f.filter(rec("closing: %s", logging.INFO, "other reason"))  # same template
    assert f.filter(rec("closed: %s", logging.INFO, "bad magic"))  # another kind
    assert f.filter(rec("closing: %s", logging.WARNING, "bad magic"))  # another level
    assert all(f.filter(rec("debug %d", logging.DEBUG, 1)) for _ in range(50))  # never dropped
    now[0] = 10.0  # the window is over: the next one says how many were left out
    r = rec("closing: %s", logging.INFO, "bad magic")
    assert f.filter(r) and r.suppressed == 48
    r = rec("closing: %s", logging.INFO, "bad magic")
    assert f.filter(r) and not hasattr(r, "suppressed")


def test_rate_limit_reports_a_storm_that_stopped(caplog):
    """No later line of the kind to carry suppressed=N: the maintenance pass's report()
    writes the count once the window is over, once."""
    now = [0.0]
    f = logs.RateLimit(burst=2, window=10.0, clock=lambda: now[0])
    for i in range(30):
        f.filter(logging.LogRecord("kvstored.nvme", logging.ERROR, "", 1,
                                   "nvme write failed at offset %d", (i * 4096,), None))
    with caplog.at_level(logging.INFO, logger="kvstored.nvme"):
        f.report()  # the window is not over yet: nothing
        assert caplog.records == []
        now[0] = 10.0
        f.report()
        f.report()
    (r,) = caplog.records
    assert r.levelno == logging.ERROR and r.suppressed == 28
    assert r.getMessage() == ("28 more lines like this were left out in 10s: "
                              "nvme write failed at offset %d")


def test_rate_limit_memory_is_bounded_and_threads_share_it():
    f = logs.RateLimit(burst=5, window=60.0)
    for i in range(3 * logs._RATE_KINDS):  # every message distinct (a peer in the text)
        assert f.filter(logging.LogRecord("x", logging.INFO, "", 1, f"m{i}", (), None))
    assert len(f._kinds) <= logs._RATE_KINDS
    passed = []

    def hammer() -> None:
        for _ in range(500):
            if f.filter(logging.LogRecord("y", logging.ERROR, "", 1, "same", (), None)):
                passed.append(1)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(passed) == 5


def test_a_client_hammering_broken_frames_is_logged_a_bounded_number_of_times(start_daemon):
    """300 connections each sending garbage (an HTTP check pointed at the data port, a
    client of another protocol): each is closed and counted, the log gets at most the
    burst of lines about it instead of one per connection."""
    d = start_daemon()
    wait_for_log(d, 'msg="kvstored ready"')
    n, errs = 300, []

    def garbage(count: int) -> None:
        for _ in range(count):
            try:
                with socket.create_connection(("127.0.0.1", d.data_port), timeout=30) as s:
                    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 4)
                    while s.recv(4096):  # until the daemon closes it
                        pass
            except OSError as e:  # a reset instead of a close is fine too
                errs.append(e)

    threads = [threading.Thread(target=garbage, args=(n // 4,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # every connection closed and counted
        closed = value(scrape(d), "kvstored_errors", plane="data", type="ProtocolError")
        if closed >= n:
            break
        time.sleep(0.1)
    assert closed >= n
    lines = [x for x in d.log_path.read_text().splitlines() if "closing data connection" in x]
    assert 1 <= len(lines) <= logs.RATE_BURST, lines[:3]
    assert "rate_limited=" in lines[-1]
    assert d.alive()


# ---------------------------------------------------------------- kvstore-cli status and auth

def test_status_without_a_token_still_shows_health(start_daemon, tmp_path):
    """Info and Health need no token: `kvstore-cli status` (a health probe) works without
    one on an auth-enabled node and says what the token would show. A refusal exits 4 (a
    credential to fix), apart from a store error (1) or an absent daemon (3)."""
    tokens = tmp_path / "tokens.toml"
    tokens.write_text('[[token]]\nname = "ro"\ntoken = "ro-token-0123456789abcdef"\n'
                      'namespaces = ["default"]\nscopes = ["read"]\n')
    tokens.chmod(0o600)
    cfg = config(tmp_path, f'[auth]\nenabled = true\ntokens_file = "{tokens}"\n')
    d = start_daemon("--config", cfg)
    for env in ({}, {"KVSTORE_TOKEN": "wrong-token-0123456789abcdef"}):
        r = _cli("-a", d.control, "status", env=env)
        assert r.returncode == 0, r.stderr
        assert "health     serving (live, ready)" in r.stdout, r.stdout
        assert "nvme io    unknown (Stats refused: " in r.stdout, r.stdout
        assert "transport  refused: " in r.stdout, r.stdout
        r = _cli("-a", d.control, "--json", "status", env=env)
        doc = json.loads(r.stdout)
        assert r.returncode == 0 and doc["ready"] and doc["stats_denied"], r.stdout
        for args in (["stats"], ["--json", "stats"], ["put", cfg, "--key", "k"], ["ls"]):
            r = _cli("-a", d.control, *args, env=env)  # exit 4: a credential to fix
            assert r.returncode == 4 and r.stderr.startswith("kvstore-cli: PermissionDenied: ")
            assert len(r.stderr.splitlines()) == 1 and r.stdout == "", (args, r.stderr)
    ro = {"KVSTORE_TOKEN": "ro-token-0123456789abcdef"}
    r = _cli("-a", d.control, "--json", "status", env=ro)
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and doc["stats_denied"] is None and doc["cli_transport"] == "tcp"
    # a read-only token: bench's puts are refused; nothing was stored, so no clean-up warning
    r = _cli("-a", d.control, "bench", "--count", "2", "--size", "4KiB", env=ro)
    assert r.returncode == 4 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "lacks the 'write' scope" in r.stderr
    r = _cli("-a", d.control, "get", "nope", "-o", str(tmp_path / "o"), env=ro)
    assert r.returncode == 1 and r.stderr == ("kvstore-cli: NotFound: no key 'nope' in "
                                              "namespace 'default'\n"), r.stderr


def test_cli_pointed_at_the_data_or_metrics_port_says_so(daemon):
    """-a with the data or metrics port used to print gRPC's HTTP/2 parser error."""
    for port in (daemon.data_port, daemon.info["metrics_port"]):
        r = _cli("-a", f"127.0.0.1:{port}", "--timeout", "10", "status")
        assert r.returncode == 3 and r.stdout == "", r.stderr
        assert r.stderr == (f"kvstore-cli: Unavailable: 127.0.0.1:{port} answers, but not as "
                            "kvstored's control (gRPC) port: is it the data or metrics port? -a "
                            "takes the control port (127.0.0.1:7070 by default)\n"), r.stderr


# ---------------------------------------------------------------- start-up messages

def test_an_address_that_is_not_this_hosts_names_the_host_setting():
    line = _start_error("--host", "no-such-host.invalid")
    assert "server.host" in line and "no-such-host.invalid" in line, line
    assert "data_port" not in line  # the port was never the problem


def test_one_port_for_both_planes_is_a_config_error():
    """It failed at the second bind, blaming 'address already in use, or not an address
    of this host' on the control port."""
    line = _start_error("--port", "17999", "--data-port", "17999")
    assert line == ("kvstored: error: server.data_port: 17999 is also server.control_port; the "
                    "planes need two ports (or 0 for any free one)"), line


def test_a_dram_size_over_the_hosts_memory_is_refused_before_anything_starts():
    """1000 TiB: the arena's mmap used to fail with a bare '[Errno 12] Cannot allocate
    memory'; a size over the host's memory but within overcommit would have been
    prefaulted until the OOM killer ended the daemon (or a neighbour)."""
    line = _start_error("--dram-size", "1000TiB")
    assert line.startswith("kvstored: error: dram.size (1000TiB) is more than this host's "
                           "memory"), line
    r = subprocess.run(_daemon_argv("--dram-size", "1000TiB", "--print-config"),
                       capture_output=True, text=True, timeout=CLI_TIMEOUT)
    assert r.returncode == 2 and "dram.size" in r.stderr and not r.stdout


def test_the_ready_line_says_version_tiers_and_guards(start_daemon, tmp_path):
    from kvstored import __version__
    d = start_daemon("--nvme-path", str(tmp_path / "t.dat"), "--nvme-size", "20MiB",
                     "--nvme-region-size", "16MiB")
    f = kv_fields(wait_for_log(d, 'msg="kvstored ready"'))
    assert f["version"] == __version__
    assert f["nvme"].startswith(f"{tmp_path / 't.dat'} (16777216 bytes, "), f
    assert (f["tls"], f["auth"], f["cluster"]) == ("off", "off", "off")
    assert f["dram"] == str(64 * MiB) and f["data"].endswith(f":{d.data_port}")


@pytest.mark.parametrize("toml, message", [
    ('[nvme]\nsync = "alwyas"', "nvme.sync: 'alwyas' is not none, interval or always"),
    ('[nvme]\nqueue_depth = 0', "nvme.queue_depth: 0 is outside 1..4096"),
    ('[nvme]\nadmission = "reads"', "nvme.admission: 'reads' is not 'all' or 'read'"),
    ('[nvme]\nregion_size = "8MiB"',
     "nvme.region_size: 8MiB must be a multiple of 4KiB between 16MiB and 256MiB"),
])
def test_nvme_values_are_checked_with_the_tier_off(tmp_path, toml, message):
    """A typo in [nvme] used to wait, unnoticed, for the day nvme.path turns the tier on."""
    line = _start_error("--config", config(tmp_path, toml))
    assert line == f"kvstored: error: {message}", line


def test_auto_dram_size_and_the_memory_bound_follow_a_containers_limit(tmp_path, monkeypatch):
    """In a container /proc/meminfo is the host's: auto used to size the arena from it,
    over the container's memory.max, and the prefault ran into the OOM killer."""
    from kvstored import config as cfgmod
    GiB = 1 << 30
    meminfo, cgroup = tmp_path / "meminfo", tmp_path / "memory.max"
    meminfo.write_text(f"MemTotal: {64 * GiB // 1024} kB\nMemAvailable: {60 * GiB // 1024} kB\n")
    monkeypatch.setattr(cfgmod, "MEMINFO_PATH", str(meminfo))
    monkeypatch.setattr(cfgmod, "CGROUP_MEMORY_MAX", str(cgroup))
    cgroup.write_text("max\n")  # no limit: the host's figures
    assert cfgmod.load_config(None, {}).dram_size == 4 * GiB  # 25 % of 60 GiB, at most 4 GiB
    cgroup.write_text(f"{2 * GiB}\n")
    assert cfgmod.load_config(None, {}).dram_size == 512 * MiB  # 25 % of the 2 GiB limit
    assert cfgmod.load_config(None, {"dram_size": "2GiB"}).dram_size == 2 * GiB
    with pytest.raises(cfgmod.ConfigError, match=r"^dram\.size \(3GiB\) is more than this "
                                                 r"host's memory \(2\.0 GiB"):
        cfgmod.load_config(None, {"dram_size": "3GiB"})
    cgroup.unlink()  # no cgroup v2 file: the host's figures again
    assert cfgmod.load_config(None, {"dram_size": "3GiB"}).dram_size == 3 * GiB


def test_a_summary_write_cut_by_close_is_no_false_alarm(tmp_path, caplog):
    """A region sealed by the shutdown flush has its summary write in flight when the
    tier closes; close() writes that summary itself, but the cut write used to log
    'summary write failed ... a restart scans it' (and count an error) at every such
    shutdown. The restart reads the summary: no scan."""
    import asyncio

    from kvstore.wire import checksum
    from kvstored.engine.nvme import NvmeDevice, NvmeTier
    path = str(tmp_path / "t.dat")
    import mmap
    payload = memoryview(mmap.mmap(-1, 4096))  # page-aligned: the file may be O_DIRECT

    async def fill_and_close() -> dict:
        tier = NvmeTier(NvmeDevice(path, MiB + 2 * 16 * MiB, 16 * MiB, "auto", 32))
        await tier.append(b"ns", b"k", payload, 4096, checksum(payload), 4096, 0.0)
        (r,) = tier.open.values()
        tier._seal(r)  # its summary write is now a task of the loop...
        tier.close()  # ...that runs only after the device closed
        for _ in range(10):
            await asyncio.sleep(0)
        return tier.counters

    with caplog.at_level(logging.WARNING, logger="kvstored.nvme"):
        counters = asyncio.run(fill_and_close())
    assert not [r for r in caplog.records if "summary write failed" in r.getMessage()]
    assert counters["summary_errors"] == 0 and counters["summaries_written"] >= 1
    tier = NvmeTier(NvmeDevice(path, MiB + 2 * 16 * MiB, 16 * MiB, "auto", 32))
    try:
        assert [k for _ns, k, _loc, _t in tier.recovered_objects()] == [b"k"]
        assert tier.counters["restart_scanned_regions"] == 0, tier.counters
    finally:
        tier.close()


def test_environment_overrides_name_themselves_when_wrong(tmp_path):
    """A bad value from the environment named only the flag or a Python error."""
    r = subprocess.run(_daemon_argv(), capture_output=True, text=True, timeout=CLI_TIMEOUT,
                       env={**os.environ, "KVSTORED_INDEX": "bogus"})
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "kvstored: error: KVSTORED_INDEX (environment, overrides dram.index): 'bogus' is not "
        "one of auto, packed, dict"), r.stderr[-2000:]
    r = _cli("status", env={"KVSTORE_ADDRESS": "no-port-here"})
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith(
        "expected HOST:PORT, got 'no-port-here' (from KVSTORE_ADDRESS)"), r.stderr


def test_a_read_only_tier_directory_says_read_only(tmp_path, monkeypatch):
    """As root on a read-only mount the tier's line said 'not writable by this user'. (A
    read-only mount needs root to make, so the file system's answers are stood in for.)"""
    from collections import namedtuple

    from kvstored import config as cfgmod
    overrides = {"nvme_path": str(tmp_path / "t.dat"), "nvme_size": "20MiB",
                 "nvme_region_size": "16MiB", "max_value_size": "4MiB", "slab_size": "4MiB",
                 "dram_size": "64MiB"}
    monkeypatch.setattr(cfgmod.os, "access", lambda path, mode: False)
    vfs = namedtuple("vfs", "f_flag")
    monkeypatch.setattr(cfgmod.os, "statvfs", lambda path: vfs(os.ST_RDONLY))
    with pytest.raises(cfgmod.ConfigError, match=f"^nvme.path: {tmp_path} is on a read-only "
                                                 "file system$"):
        cfgmod.load_config(None, overrides)
    monkeypatch.setattr(cfgmod.os, "statvfs", lambda path: vfs(0))
    with pytest.raises(cfgmod.ConfigError, match="is not writable by this user$"):
        cfgmod.load_config(None, overrides)


def test_the_running_config_is_on_the_metrics_port(start_daemon, tmp_path):
    """--print-config shows what a start with these files and flags would run; /config
    shows what runs now, reloads included, with credentials redacted."""
    import tomllib

    from opsutil import http_get
    cfg = config(tmp_path, '[server]\nmax_batch_keys = 4096\n[cluster]\n'
                           'token = "repair-secret-0123456789"\n')
    d = start_daemon("--config", cfg)
    status, _, body = http_get(d.metrics_url + "/config")
    assert status == 200 and b"repair-secret" not in body
    doc = tomllib.loads(body.decode())
    assert doc["server"]["max_batch_keys"] == 4096 and doc["cluster"]["token"] == "[REDACTED]"
    assert doc["server"]["data_port"] == 0  # as configured; the bound port is in the ready line
    assert doc["dram"]["size"] == "64MiB" and doc["dram"]["max_value_size"] == "4MiB"
    with open(cfg, "w") as f:
        f.write('[server]\nmax_batch_keys = 1000\n[cluster]\ntoken = "repair-secret-0123456789"\n')
    d.proc.send_signal(signal.SIGHUP)
    wait_for_log(d, 'msg="reloaded ', timeout=30)
    status, _, body = http_get(d.metrics_url + "/config")
    assert status == 200 and tomllib.loads(body.decode())["server"]["max_batch_keys"] == 1000
    assert http_get(d.metrics_url + "/nope")[2].endswith(b"/config\n")


@pytest.mark.parametrize("tier", ["none", "flush", "no-flush"])
def test_the_exit_line_says_what_is_lost(start_daemon, tmp_path, tier):
    """'stopped ... not_kept=0' read as 'nothing lost' on a node without an NVMe tier (or
    with nvme.flush_on_shutdown = false), where every DRAM-only object is gone at exit."""
    import kvstore
    args = [] if tier == "none" else ["--nvme-path", str(tmp_path / "t.dat"), "--nvme-size",
                                      "20MiB", "--nvme-region-size", "16MiB"]
    if tier == "no-flush":
        args += ["--config", config(tmp_path, "[nvme]\nflush_on_shutdown = false\n")]
    d = start_daemon(*args)
    with kvstore.Client(d.control, namespace="t", shm=False, timeout=10) as c:
        for i in range(3):
            c.put(f"k{i}", b"x" * 5000)
    assert d.stop() == 0
    f = kv_fields(wait_for_log(d, "msg=stopped"))
    assert f["objects"] == "3" and f["not_kept"] == "0"
    assert f["lost_at_exit"] == ("0" if tier == "flush" else "3"), f


def test_print_config_is_a_starting_file_for_any_host(tmp_path):
    """--print-config wrote this host's auto-sized arena and its host-name node id as
    fixed values: the 'good starting file', copied to a fleet, gave every node one id."""
    import socket as _socket
    import tomllib

    def printed(*args: str) -> str:
        r = subprocess.run([sys.executable, "-m", "kvstored", "--print-config", *args],
                           capture_output=True, text=True, timeout=CLI_TIMEOUT, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        return r.stdout

    text = printed()
    doc = tomllib.loads(text)
    assert doc["dram"]["size"] == "auto" and doc["node"]["id"] == ""
    assert f'id = ""  # on this host: "{_socket.gethostname()}:7070"' in text
    start = tmp_path / "start.toml"
    start.write_text(text)

    def steady(t: str) -> str:  # "auto"'s size on this host is 25 % of MemAvailable at
        # the moment (capped): it moves when other processes take memory between the calls
        return re.sub(r'(size = "auto"  # on this host: )"[^"]*"', r"\1?", t)
    assert steady(printed("--config", str(start))) == steady(text)  # the same, still unresolved
    doc = tomllib.loads(printed("--config", config(tmp_path, '[node]\nid = "n1"\n'),
                                "--dram-size", "1GiB"))
    assert (doc["dram"]["size"], doc["node"]["id"]) == ("1GiB", "n1")  # set: kept as set


def _server_pair(tmp_path, *, expired: bool):
    """A CA and a server certificate for 127.0.0.1, valid or expired (tests/security's)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "security"))
    pytest.importorskip("cryptography")
    import seccerts
    tmp_path.mkdir(parents=True, exist_ok=True)
    ca, ca_key = seccerts._ca("audit CA")
    return (seccerts._write(tmp_path, "ca", ca),
            seccerts._write(tmp_path, "server", *seccerts._leaf("kvstored", ca, ca_key,
                                                                server=True, expired=expired)))


def test_an_expired_serving_certificate_is_said_and_exported(start_daemon, tmp_path):
    """An expired (or soon expiring) tls.cert_file: every TLS client refuses the node and
    nothing on the node said why. Now an error line at start and reload, and a gauge to
    alert on before the day."""
    import time as _time
    ca, server = _server_pair(tmp_path / "old", expired=True)
    cfg = config(tmp_path, f'[tls]\ncert_file = "{server.cert}"\nkey_file = "{server.key}"\n')
    d = start_daemon("--config", cfg)
    line = wait_for_log(d, "tls.cert_file")
    assert "level=error" in line and "expired at" in line and server.cert in line, line
    end = value(scrape(d), "kvstored_tls_cert_expiry_timestamp_seconds")
    assert end < _time.time()
    _, fresh = _server_pair(tmp_path / "new", expired=False)  # renewed in place, then SIGHUP
    Path(server.cert).write_bytes(Path(fresh.cert).read_bytes())
    Path(server.key).write_bytes(Path(fresh.key).read_bytes())
    start = len(d.log_path.read_text())
    d.proc.send_signal(signal.SIGHUP)
    wait_for_log(d, "TLS certificates reloaded", start=start, timeout=30)
    deadline = _time.monotonic() + 30
    while _time.monotonic() < deadline:  # the gauge follows the reload
        end = value(scrape(d), "kvstored_tls_cert_expiry_timestamp_seconds")
        if end > _time.time():
            break
        _time.sleep(0.1)
    assert _time.time() + 20 * 86400 < end < _time.time() + 40 * 86400  # the test CA's 30 days
    assert "tls.cert_file" not in d.log_path.read_text()[start:]  # not near its end: no line


def test_a_certificate_near_its_end_is_warned_about(tmp_path, caplog):
    import time as _time

    from kvstored.tls import CERT_EXPIRY_WARNING, ServerTLS
    _, server = _server_pair(tmp_path, expired=False)
    tls = ServerTLS(server.cert, server.key)
    with caplog.at_level(logging.INFO, logger="kvstored.tls"):
        tls.warn_expiry()  # 30 days left: nothing to say
        assert caplog.records == []
        tls.not_after = _time.time() + CERT_EXPIRY_WARNING / 2
        tls.warn_expiry()
    (r,) = caplog.records
    assert r.levelno == logging.WARNING and "in 7.0 days" in r.getMessage(), r.getMessage()
