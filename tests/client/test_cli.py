"""kvstore-cli against a real kvstored: in-process through main(), plus the real entry point."""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from cliutil import one_error_line

from kvstore.cli import human_size, main, parse_size

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def daemon(shared_daemon):
    """The module's tests share one kvstored, emptied before each (conftest.shared_daemon);
    those that need other flags or a process of their own use start_daemon."""
    return shared_daemon


@pytest.fixture
def cli(daemon, capsys):
    """cli(*args) -> (exit code, stdout, stderr), talking to the test daemon in namespace "test"."""
    def run(*args: str):
        rc = main(["-a", daemon.control, "-n", "test", *args])
        out, err = capsys.readouterr()
        return rc, out, err
    return run


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused
    return port


# ---------------------------------------------------------------- put / get

def test_put_get_round_trip_is_byte_identical(cli, client, tmp_path):
    src = tmp_path / "block.bin"
    data = os.urandom(3 * 1024 * 1024 + 17)
    src.write_bytes(data)
    rc, out, err = cli("put", str(src))
    assert rc == 0, err
    assert out.startswith("stored 'block.bin' (3.0 MiB)")
    assert bytes(client.get("block.bin")) == data  # the key defaults to the file's base name

    dst = tmp_path / "copy.bin"
    rc, out, err = cli("get", "block.bin", "-o", str(dst))
    assert rc == 0, err
    assert dst.read_bytes() == data
    assert "wrote 'block.bin' (3.0 MiB)" in out


def test_put_same_bytes_again_says_already_stored(cli, tmp_path):
    src = tmp_path / "f"
    src.write_bytes(b"abc" * 1000)
    assert cli("put", str(src), "--key", "k")[0] == 0
    rc, out, _ = cli("put", str(src), "--key", "k")
    assert rc == 0
    assert out.startswith("already stored 'k' (2.9 KiB, identical bytes)")
    rc, out, _ = cli("--json", "put", str(src), "--key", "k")
    doc = json.loads(out)
    assert (doc["stored"], doc["deduplicated"], doc["size"], doc["key"]) == (False, True, 3000, "k")


def test_put_different_bytes_is_conflict_exit_1_unless_overwrite(cli, client, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"first")
    b.write_bytes(b"second")
    assert cli("put", str(a), "--key", "k")[0] == 0
    rc, out, err = cli("put", str(b), "--key", "k")
    assert rc == 1 and out == ""
    assert "--overwrite" in one_error_line(err, "Conflict")
    assert bytes(client.get("k")) == b"first"

    rc, out, err = cli("put", str(b), "--key", "k", "--overwrite")
    assert rc == 0, err
    assert bytes(client.get("k")) == b"second"


def test_get_missing_key_exit_1_and_no_file(cli, tmp_path):
    dst = tmp_path / "out"
    rc, out, err = cli("get", "no-such-key", "-o", str(dst))
    assert rc == 1 and out == ""
    line = one_error_line(err, "NotFound")
    assert "'no-such-key'" in line and "'test'" in line
    assert not dst.exists()


def test_get_to_stdout_is_raw_bytes(daemon, client, capsysbinary):
    data = bytes(range(256)) * 10  # not UTF-8: must pass through untouched
    client.put("bin", data)
    rc = main(["-a", daemon.control, "-n", "test", "get", "bin", "-o", "-"])
    out, _ = capsysbinary.readouterr()
    assert rc == 0 and out == data


def test_get_json_to_stdout_is_usage_error(cli):
    rc, out, err = cli("--json", "get", "k", "-o", "-")
    assert rc == 2 and out == "" and "--json" in err


def test_put_from_stdin_needs_key(cli, client, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"from stdin")))
    rc, out, err = cli("put", "-", "--key", "piped")
    assert rc == 0, err
    assert bytes(client.get("piped")) == b"from stdin"

    rc, out, err = cli("put", "-")
    assert rc == 2 and "--key" in err


def test_put_file_over_max_value_size_is_refused(cli, tmp_path):
    big = tmp_path / "big"
    big.write_bytes(b"\0" * (4 * 1024 * 1024 + 1))  # the fixture's daemon: --max-value-size 4MiB
    rc, _, err = cli("put", str(big))
    assert rc == 1
    assert "max_value_size" in one_error_line(err, "InvalidArgument")


def test_put_missing_file_exit_1(cli, tmp_path):
    rc, _, err = cli("put", str(tmp_path / "absent"))
    assert rc == 1
    assert "absent" in one_error_line(err, "FileNotFoundError")


# ---------------------------------------------------------------- key commands

def test_exists_and_lookup_exit_0_whatever_they_find(cli, client):
    client.batch_put([("k0", b"0"), ("k1", b"1"), ("k3", b"3")])
    rc, out, _ = cli("exists", "k0", "k2", "k3")
    assert rc == 0
    rows = [line.split() for line in out.splitlines()[1:-1]]
    assert rows == [["yes", "k0"], ["no", "k2"], ["yes", "k3"]]
    assert out.splitlines()[-1].startswith("2/3 exist")

    rc, out, _ = cli("--json", "exists", "nope")
    assert rc == 0
    doc = json.loads(out)
    assert doc["found"] == 0 and doc["results"] == [{"key": "nope", "key_hex": "6e6f7065", "exists": False}]

    rc, out, _ = cli("lookup", "k0", "k1", "k2", "k3")
    assert rc == 0
    assert out.startswith("prefix hit 2/4") and "first missing: 'k2'" in out
    rc, out, _ = cli("lookup", "--json", "k9", "k0")
    assert rc == 0
    assert json.loads(out)["hit"] == 0 and json.loads(out)["total"] == 2


def pinned(cli, key: str) -> bool:
    rc, out, _ = cli("--json", "ls")
    assert rc == 0
    return {e["key"]: e["pinned"] for e in json.loads(out)["entries"]}[key]


def test_pin_unpin(cli, client):
    client.put("p", b"x")
    rc, out, _ = cli("pin", "p", "absent", "--ttl", "30")
    assert rc == 0 and out.startswith("pinned 1/2 keys") and "30s" in out
    assert pinned(cli, "p")
    rc, out, _ = cli("unpin", "p")
    assert rc == 0 and out.startswith("unpinned 1/1")
    assert not pinned(cli, "p")

    assert cli("pin", "p", "--ttl", "0")[0] == 2  # rejected by the parser, before the daemon
    rc, _, err = cli("pin", "p", "--ttl", "1e9")  # over the daemon's max_pin_ttl
    assert rc == 1 and one_error_line(err, "InvalidArgument")


def test_rm(cli, client):
    client.batch_put([("a", b"1"), ("b", b"2")])
    rc, out, _ = cli("rm", "a", "b", "c")
    assert rc == 0 and out.startswith("deleted 2/3 keys")
    assert client.exists(["a", "b"]) == [False, False]
    rc, out, _ = cli("--json", "rm", "a")
    assert rc == 0 and json.loads(out)["deleted"] == 0


def test_ls_shows_keys_and_total(cli, client, daemon):
    client.batch_put([(f"key-{i}", b"v" * (i + 1) * 1000) for i in range(5)])
    client.put(b"\x00\xffbin", b"z")
    rc, out, _ = cli("ls")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split() == ["KEY", "SIZE", "PINNED", "TIER", "AGE"]
    for i in range(5):
        assert any(line.startswith(f"key-{i} ") for line in lines)
    assert any(line.startswith("0x00ff62696e ") for line in lines)  # not printable: shown as hex
    assert "6 shown of 6 objects in namespace 'test'" in lines[-1]

    rc, out, _ = cli("ls", "--limit", "2", "--json")
    doc = json.loads(out)
    assert rc == 0 and len(doc["entries"]) == 2 and doc["total"] == 6

    import kvstore
    with kvstore.Client(daemon.control, namespace="other") as other:
        other.put("elsewhere", b"1")
    rc, out, _ = cli("ls", "-A")
    assert rc == 0
    assert "NAMESPACE" in out.splitlines()[0] and "elsewhere" in out and "7 objects" in out
    rc, out, _ = cli("ls")
    assert "elsewhere" not in out


def test_ls_empty(cli):
    rc, out, _ = cli("ls")
    assert rc == 0 and out.strip() == "no objects in namespace 'test'"


# ---------------------------------------------------------------- status / stats / bench

def test_status_human_and_json(cli, daemon):
    rc, out, _ = cli("status")
    assert rc == 0
    assert ["control", daemon.control] in [line.split() for line in out.splitlines()]
    assert f":{daemon.data_port}" in out and "serving (live, ready)" in out
    assert "4.0 MiB data path" in out

    rc, out, _ = cli("status", "--json")  # global options work after the command too
    doc = json.loads(out)
    assert rc == 0 and doc["ready"] is True and doc["data_address"].endswith(f":{daemon.data_port}")
    assert doc["limits"]["max_value_size"] == 4 * 1024 * 1024


def test_stats_human_and_json(cli, client):
    hits = client.stats().counters["hits"]  # the shared daemon's counters are not reset
    client.put("s", b"x" * 5000)
    client.get("s")
    rc, out, _ = cli("stats")
    assert rc == 0
    dram = [line for line in out.splitlines() if line.startswith("dram ")]
    assert dram and "64.0 MiB" in dram[0]
    assert any(line.split() == ["test", "1"] for line in out.splitlines())
    assert "object_bytes" in out and "4.9 KiB" in out

    rc, out, _ = cli("--json", "stats")
    doc = json.loads(out)
    assert rc == 0 and doc["namespaces"] == {"test": 1}
    assert doc["tiers"][0]["name"] == "dram" and doc["tiers"][0]["objects"] == 1
    assert doc["counters"]["hits"] >= hits + 1 and doc["counters"]["object_bytes"] == 5000


def bench_rows(out: str) -> dict[str, list[str]]:
    """The OP rows of bench's table, split into words (sizes like "64.0 KiB" are two)."""
    return {line.split()[0]: line.split() for line in out.splitlines()
            if line.split() and line.split()[0] in ("put", "get")}


def test_bench_small_cleans_up(cli, client):
    rc, out, err = cli("bench", "--count", "20", "--size", "64KiB")
    assert rc == 0, err
    header = [line for line in out.splitlines() if line.startswith("OP ")]
    assert header and header[0].split()[:4] == ["OP", "TRANSPORT", "SIZE", "OPS"]
    rows = bench_rows(out)
    # every result line names its transport and payload size
    assert rows["put"][1:5] == ["tcp", "64.0", "KiB", "20"]
    assert rows["get"][1:5] == ["tcp", "64.0", "KiB", "20"]
    assert rows["put"][-1] == "0" and rows["get"][-1] == "-"  # DEDUP: puts only
    assert "20 x 64.0 KiB objects over tcp" in out and "every put stored new bytes" in out
    assert "deleted 20 bench keys" in out
    assert client.list(namespace="test").total == 0

    rc, out, err = cli("--json", "bench", "--count", "5", "--size", "4KiB", "--op", "get",
                       "--duration", "0.2")
    doc = json.loads(out)
    assert rc == 0, err
    assert set(doc["results"]) == {"get"} and doc["results"]["get"]["ops"] >= 5
    assert doc["results"]["get"]["p50_seconds"] <= doc["results"]["get"]["p99_seconds"]
    assert doc["deleted"] == 5 and client.list(namespace="test").total == 0


def test_bench_every_put_stores_new_bytes(cli, client):
    before = client.stats().counters
    rc, out, err = cli("--json", "bench", "--count", "4", "--size", "4KiB", "--op", "put",
                       "--duration", "0.3")  # several passes over the same 4 keys
    assert rc == 0, err
    put = json.loads(out)["results"]["put"]
    after = client.stats().counters
    assert put["ops"] > 4 and put["dedups"] == 0
    # the daemon's own counters agree: every put stored, none was an identical-bytes no-op
    assert after["dedups"] == before["dedups"]
    assert after["puts"] - before["puts"] >= put["ops"]


def test_bench_get_only_and_json_name_transport_and_size(cli):
    rc, out, err = cli("--json", "bench", "--count", "3", "--size", "1000", "--op", "get")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["transport"] == "tcp" and doc["size"] == 1000
    assert doc["results"]["get"]["transport"] == "tcp" and doc["results"]["get"]["size"] == 1000
    assert err == ""  # stderr is not a terminal here and --progress was not given


def test_bench_set_that_would_be_evicted_is_refused(cli):
    rc, _, err = cli("bench", "--count", "40", "--size", "1MiB")  # 40 MiB of a 64 MiB store
    assert rc == 1 and "--count" in one_error_line(err, "InvalidArgument")


# ---------------------------------------------------------------- transport

def test_data_commands_use_tcp_unless_shm_is_asked(cli, daemon, tmp_path):
    rc, out, err = cli("--json", "status")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["cli_transport"] == "tcp"
    assert doc["shm_reachable"], doc  # the test daemon offers shm here: TCP is a choice
    rc, out, _ = cli("status")
    assert "data commands use TCP unless --shm" in out

    src = tmp_path / "f"
    src.write_bytes(b"x" * 100)
    rc, out, err = cli("put", str(src), "--key", "t")
    assert rc == 0 and " over tcp, " in out, err
    rc, out, err = cli("--json", "put", str(src), "--key", "t2")
    assert rc == 0 and json.loads(out)["transport"] == "tcp", err
    rc, out, err = cli("--json", "bench", "--count", "3", "--size", "4KiB")
    assert rc == 0, err
    assert {r["transport"] for r in json.loads(out)["results"].values()} == {"tcp"}

    # --shm opts in, on the same commands (before or after the command name)
    rc, out, err = cli("--shm", "--json", "bench", "--count", "3", "--size", "4KiB")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["transport"] == "shm" and {r["transport"] for r in doc["results"].values()} == {"shm"}
    rc, out, err = cli("get", "t", "-o", str(tmp_path / "g"), "--shm")
    assert rc == 0 and " over shm " in out, err
    assert (tmp_path / "g").read_bytes() == b"x" * 100
    rc, out, _ = cli("status", "--shm")
    assert "data commands use it: --shm" in out
    rc, out, err = cli("--shm", "--no-shm", "put", str(src), "--key", "t3")  # the last one wins
    assert rc == 0 and " over tcp, " in out, err


def test_shm_asked_but_not_offered_exit_3(start_daemon, tmp_path, capsys):
    conf = tmp_path / "noshm.toml"
    conf.write_text("[shm]\nenabled = false\n")
    d = start_daemon("--config", str(conf))
    rc = main(["-a", d.control, "--shm", "bench", "--count", "1", "--size", "1KiB"])
    out, err = capsys.readouterr()
    assert rc == 3 and out == ""
    assert "--shm" in one_error_line(err, "Unavailable")
    rc = main(["-a", d.control, "status"])  # without --shm: fine, and it says why TCP
    out, _ = capsys.readouterr()
    assert rc == 0 and "not offered by the daemon" in out


def test_shm_with_data_address_or_tls_is_a_usage_error(daemon, capsys):
    for extra in (["--data-address", f"127.0.0.1:{daemon.data_port}"], ["--tls"]):
        rc = main(["-a", daemon.control, "--shm", *extra, "exists", "k"])
        _, err = capsys.readouterr()
        assert rc == 2 and "--shm cannot be combined" in err, extra


# ---------------------------------------------------------------- progress

def test_progress_goes_to_stderr_only_when_asked_and_json_stays_clean(cli):
    rc, out, err = cli("--json", "bench", "--count", "5", "--size", "4KiB", "--duration", "1.2",
                       "--progress")
    assert rc == 0
    doc = json.loads(out)  # stdout is exactly one JSON document, no progress mixed in
    assert doc["results"]["put"]["ops"] >= 5
    lines = err.splitlines()
    assert lines and all(line.startswith("bench") for line in lines), err
    assert any(line.startswith("bench put over tcp: ") and "(of 1.2s)" in line for line in lines)
    assert any(line.startswith("bench get over tcp: ") for line in lines)
    # a line per second at most (plus the first of each phase): a log stays short
    assert len(lines) <= 8, err

    rc, out, err = cli("bench", "--count", "5", "--size", "4KiB", "--no-progress")
    assert rc == 0 and err == ""


def test_progress_line_on_a_terminal_is_rewritten_in_place(daemon):
    import pty
    import select
    import fcntl
    import struct
    import termios
    master, slave = pty.openpty()
    # a narrow terminal: the line is cut to fit (a wrapped line could not be rewritten)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 30, 0, 0))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "client"), ROOT]))
    p = subprocess.Popen([sys.executable, "-m", "kvstore.cli", "-a", daemon.control, "-n", "test",
                          "bench", "--count", "4", "--size", "4KiB", "--duration", "0.6"],
                         stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    tty = b""
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed its end
                    break
                if not chunk:
                    break
                tty += chunk
            elif p.poll() is not None:
                break
        out, _ = p.communicate(timeout=30)
    finally:
        os.close(master)
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, tty
    # one line, rewritten with "\r" and never ended with a newline, erased at the end
    assert tty.startswith(b"\rbench put over tcp: ") and b"\n" not in tty, tty
    assert tty.count(b"\r") >= 3 and tty.endswith(b"\r"), tty
    assert max(len(part) for part in tty.split(b"\r")) == 29, tty  # cut, not wrapped
    assert out.startswith(b"bench: 4 x 4.0 KiB objects over tcp") and b"\r" not in out


# ---------------------------------------------------------------- errors and options

def test_refused_connection_is_one_clear_line_exit_3_at_once(capsys):
    port = closed_port()
    for cmd in (["status"], ["exists", "k"], ["get", "k", "-o", "-"], ["bench"], ["nodes"]):
        t0 = time.monotonic()
        rc = main(["-a", f"127.0.0.1:{port}", *cmd])  # the default --timeout (10 s)
        elapsed = time.monotonic() - t0
        out, err = capsys.readouterr()
        assert rc == 3 and out == "", cmd
        line = one_error_line(err, "Unavailable")
        assert line == (f"kvstore-cli: Unavailable: cannot connect to kvstored at 127.0.0.1:{port}: "
                        "connection refused (is kvstored running?)"), cmd
        assert elapsed < 3, (cmd, elapsed)  # refused is known at once: no waiting out --timeout


def test_unresolvable_host_exit_3_one_line(capsys):
    rc = main(["-a", "no-such-host.invalid:7070", "--timeout", "2", "status"])
    _, err = capsys.readouterr()
    assert rc == 3 and "no-such-host.invalid:7070" in one_error_line(err, "Unavailable")


def test_unreachable_data_path_exit_3(daemon, capsys):
    # control reachable, data path not: the daemon runs, so the line points at the data port
    port = closed_port()
    rc = main(["-a", daemon.control, "--data-address", f"127.0.0.1:{port}",
               "--timeout", "1", "get", "k", "-o", "-"])
    _, err = capsys.readouterr()
    assert rc == 3
    line = one_error_line(err, "Unavailable")
    assert f"data path at 127.0.0.1:{port}: connection refused" in line and "--data-address" in line


@pytest.mark.parametrize("key", ["", "k" * 129, "é" * 65])  # 130 bytes of UTF-8
def test_invalid_key_is_invalid_argument(cli, key):
    rc, out, err = cli("exists", key)
    assert rc == 1 and out == ""
    assert "outside 1-128 bytes" in one_error_line(err, "InvalidArgument")


def test_longest_key_is_fine(cli, client):
    rc, out, _ = cli("exists", "k" * 128)
    assert rc == 0 and "no" in out


def test_invalid_hex_and_namespace(cli, daemon, capsys):
    rc, _, err = cli("--hex", "exists", "xyz")
    assert rc == 1 and "hex" in one_error_line(err, "InvalidArgument")
    rc = main(["-a", daemon.control, "-n", "bad namespace!", "ls"])
    _, err = capsys.readouterr()
    assert rc == 1 and "namespace" in one_error_line(err, "InvalidArgument")


def test_hex_keys(cli, client, tmp_path):
    src = tmp_path / "f"
    src.write_bytes(b"payload")
    key = bytes([0, 1, 2, 0xFE, 0xFF])
    rc, out, err = cli("--hex", "put", str(src), "--key", key.hex())
    assert rc == 0, err
    assert f"'{key.hex()}'" in out
    assert bytes(client.get(key)) == b"payload"

    rc, out, _ = cli("--hex", "exists", key.hex(), "6b")
    assert rc == 0 and out.splitlines()[1].split() == ["yes", key.hex()]
    rc, out, _ = cli("ls", "--hex")
    assert out.splitlines()[1].startswith(key.hex() + " ")
    dst = tmp_path / "g"
    assert cli("--hex", "get", key.hex(), "-o", str(dst))[0] == 0
    assert dst.read_bytes() == b"payload"
    assert cli("--hex", "rm", key.hex())[1].startswith("deleted 1/1")


def test_address_and_namespace_from_environment(daemon, client, capsys, monkeypatch):
    client.put("envkey", b"1")
    monkeypatch.setenv("KVSTORE_ADDRESS", daemon.control)
    monkeypatch.setenv("KVSTORE_NAMESPACE", "test")
    assert main(["exists", "envkey"]) == 0
    assert capsys.readouterr().out.startswith("EXISTS  KEY\nyes     envkey")


def test_usage_errors_exit_2(capsys):
    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["-a", "no-port", "status"]) == 2
    assert main(["bench", "--size", "lots"]) == 2
    assert main(["--help"]) == 0


@pytest.mark.parametrize("argv, words", [
    (["put", "f", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["status", "extra"], ["unrecognized arguments: extra"]),
    (["bench", "--op", "delete"], ["invalid choice: 'delete'"]),
    (["bench", "--size", "0"], ["whole number of bytes >= 1"]),
    (["bench", "--size", "1.5"], ["whole number of bytes >= 1"]),
    (["bench", "--size=-4KiB"], ["cannot parse '-4KiB'"]),
    (["bench", "--size", "4XB"], ["cannot parse '4XB'"]),
    (["bench", "--size", "1e3"], ["cannot parse '1e3'"]),
    (["bench", "--count", "0"], ["positive"]),
    (["bench", "--count", "2.5"], ["invalid int value"]),
    (["bench", "--duration", "nan"], ["positive"]),
    (["--timeout", "-1", "status"], ["positive"]),
    (["--timeout", "inf", "status"], ["positive"]),
    (["-a", "host:99999", "status"], ["expected HOST:PORT"]),
    (["get", "k"], ["-o/--output"]),
    (["exists"], ["KEY"]),
])
def test_bad_flags_are_usage_errors_naming_the_command(capsys, argv, words):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert err.startswith("usage: kvstore-cli"), err
    last = err.strip().splitlines()[-1]
    assert last.startswith("kvstore-cli") and ": error: " in last, err
    for w in words:
        assert w in last, err
    if argv[0] in ("put", "bench", "get", "exists", "status"):  # the command's own usage,
        # unknown options included
        assert err.startswith(f"usage: kvstore-cli {argv[0]} "), err


@pytest.mark.parametrize("key, why", [
    ("abc", "hex"),         # odd length
    ("zz", "hex"),          # not hex digits
    ("", "outside 1-128 bytes"),
    ("00" * 129, "outside 1-128 bytes"),
])
def test_malformed_hex_keys_are_one_typed_line(cli, key, why):
    rc, out, err = cli("--hex", "exists", key)
    assert rc == 1 and out == ""
    assert why in one_error_line(err, "InvalidArgument")


def test_malformed_keys_in_put_and_get_never_reach_the_daemon(cli, client, tmp_path):
    src = tmp_path / "f"
    src.write_bytes(b"v")
    for args in (["--hex", "put", str(src), "--key", "0g"], ["put", str(src), "--key", "k" * 200],
                 ["--hex", "get", "xyz", "-o", str(tmp_path / "o")], ["get", "", "-o", "-"]):
        rc, out, err = cli(*args)
        assert rc == 1 and out == "", args
        one_error_line(err, "InvalidArgument")
    assert client.list(namespace="test").total == 0
    assert not (tmp_path / "o").exists()


def _help(*argv: str) -> str:
    import contextlib
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main([*argv, "--help"]) == 0
    return buf.getvalue()


@pytest.mark.parametrize("argv, own", [
    (["put"], ["--key", "--overwrite"]),
    (["get"], ["-o"]),
    (["bench"], ["--size", "--count", "--duration", "--op"]),
    (["drain"], ["--cancel", "--wait", "--timeout"]),
    (["pin"], ["--ttl"]),
    (["ls"], ["--limit", "--all-namespaces"]),
    (["delete-all"], ["--yes"]),
    (["policy", "set"], []),
    (["status"], []),
])
def test_subcommand_help_lists_its_own_options_first(argv, own):
    text = _help(*argv)
    lines = text.splitlines()
    # usage: own options, then one [global options] instead of the fourteen shared ones
    usage = text.split("\n\n", 1)[0]
    assert usage.startswith(f"usage: kvstore-cli {' '.join(argv)} ") and "[global options]" in usage
    assert "--address" not in usage and "--tls" not in usage
    for opt in own:
        assert opt in usage
    g = lines.index("global options (also accepted before the command):")
    for opt in own:  # the line that lists the option (not one that mentions it in a help text)
        first = next(i for i, line in enumerate(lines)
                     if line.strip().startswith("-") and opt in line.replace(",", " ").split())
        assert first < g, (opt, text)
    body = "\n".join(lines[g:])
    for opt in ("--address", "--namespace", "--json", "--shm", "--progress", "--tls-ca"):
        assert opt in body
    # drain keeps its own --timeout (how long --wait waits); the global one is not repeated
    if argv == ["drain"]:
        assert "--timeout" not in body
    else:
        assert "--timeout" in body


def test_global_options_work_after_the_command(cli, client):
    client.put("k", b"1")
    rc, out, _ = cli("exists", "k", "--json", "--no-shm")
    assert rc == 0 and json.loads(out)["found"] == 1


def test_parse_and_format_sizes():
    assert parse_size("64KiB") == parse_size("64k") == 65536
    assert parse_size("1MiB") == parse_size("1 mb") == 1 << 20
    assert parse_size("4096") == 4096 and parse_size("1.5K") == 1536
    assert (human_size(0), human_size(1023), human_size(1536), human_size(3 << 30)) == \
        ("0 B", "1023 B", "1.5 KiB", "3.0 GiB")


# ---------------------------------------------------------------- the real entry point

def test_python_m_entry_point(daemon, tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "client"), ROOT])
    env.pop("KVSTORE_ADDRESS", None)
    env.pop("KVSTORE_NAMESPACE", None)

    def run(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kvstore.cli", *args], env=env, input=input,
                              capture_output=True, timeout=60)

    data = os.urandom(100_000)
    p = run("-a", daemon.control, "put", "-", "--key", "sub", input=data)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(b"stored 'sub'")
    p = run("-a", daemon.control, "get", "sub", "-o", "-")
    assert p.returncode == 0 and p.stdout == data
    p = run("-a", daemon.control, "--json", "status")
    assert p.returncode == 0 and json.loads(p.stdout)["ready"] is True
    p = run("-a", daemon.control, "get", "missing", "-o", str(tmp_path / "x"))
    assert p.returncode == 1 and p.stderr.decode().startswith("kvstore-cli: NotFound: ")
    p = run("-a", f"127.0.0.1:{closed_port()}", "--timeout", "1", "stats")
    assert p.returncode == 3 and p.stderr.count(b"\n") == 1
    assert b"connection refused (is kvstored running?)" in p.stderr and b"Traceback" not in p.stderr
    p = run("put", "--bogus")
    assert p.returncode == 2 and b"Traceback" not in p.stderr


def test_concurrent_bench_runs_keep_apart(daemon, client):
    # two operators benchmarking one daemon at once: separate key prefixes, both clean up
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "client"), ROOT]))
    cmd = [sys.executable, "-m", "kvstore.cli", "-a", daemon.control, "-n", "test", "--json",
           "bench", "--count", "8", "--size", "16KiB", "--duration", "0.5"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
             for _ in range(2)]
    docs = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        docs.append(json.loads(out))
    assert docs[0]["prefix"] != docs[1]["prefix"]
    for d in docs:
        assert d["deleted"] == 8 and d["results"]["put"]["dedups"] == 0
        assert d["results"]["get"]["ops"] >= 8
    assert client.list(namespace="test").total == 0
