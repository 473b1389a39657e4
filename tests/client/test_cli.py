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
    assert doc["counters"]["hits"] >= 1 and doc["counters"]["object_bytes"] == 5000


def test_bench_small_cleans_up(cli, client):
    rc, out, err = cli("bench", "--count", "20", "--size", "64KiB")
    assert rc == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines()}
    assert rows["put"][1] == "20" and rows["get"][1] == "20"
    assert "deleted 20 bench keys" in out
    assert client.list(namespace="test").total == 0

    rc, out, err = cli("--json", "bench", "--count", "5", "--size", "4KiB", "--op", "get",
                       "--duration", "0.2")
    doc = json.loads(out)
    assert rc == 0, err
    assert set(doc["results"]) == {"get"} and doc["results"]["get"]["ops"] >= 5
    assert doc["results"]["get"]["p50_seconds"] <= doc["results"]["get"]["p99_seconds"]
    assert doc["deleted"] == 5 and client.list(namespace="test").total == 0


def test_bench_set_that_would_be_evicted_is_refused(cli):
    rc, _, err = cli("bench", "--count", "40", "--size", "1MiB")  # 40 MiB of a 64 MiB store
    assert rc == 1 and "--count" in one_error_line(err, "InvalidArgument")


# ---------------------------------------------------------------- errors and options

def test_unreachable_daemon_exit_3_within_timeout(capsys):
    t0 = time.monotonic()
    rc = main(["-a", f"127.0.0.1:{closed_port()}", "--timeout", "1", "status"])
    elapsed = time.monotonic() - t0
    _, err = capsys.readouterr()
    assert rc == 3
    assert elapsed < 5
    line = err.strip()
    assert line.startswith(("kvstore-cli: Timeout: ", "kvstore-cli: Unavailable: ")) and "\n" not in line


def test_unreachable_data_path_exit_3(daemon, capsys):
    # control reachable, data path not: the retry loop must still give up within --timeout
    rc = main(["-a", daemon.control, "--data-address", f"127.0.0.1:{closed_port()}",
               "--timeout", "1", "get", "k", "-o", "-"])
    _, err = capsys.readouterr()
    assert rc == 3 and err.startswith("kvstore-cli: Unavailable: ")


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
