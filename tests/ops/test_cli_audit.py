"""kvstore-cli as a user meets it when something is wrong (session 17's audit): a usage error
is the command's usage line and one error line, never the whole program's usage; a TLS
client against a plaintext daemon is one line, not gRPC's log line besides it."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

import kvstore
from kvstore.cli import main

CLI_TIMEOUT = 60  # seconds: a CLI run on a loaded machine (imports grpc)


@pytest.fixture
def daemon(shared_daemon):
    return shared_daemon


@pytest.mark.parametrize("argv, command, words", [
    (["drain", "no-such-node"], "drain", "unknown node 'no-such-node'; known nodes"),
    (["drain", "x", "--wait", "--cancel"], "drain", "--wait waits for a drain to finish"),
    (["put", "-"], "put", "--key is required when FILE is - (stdin)"),
    (["get", "k", "-o", "-", "--json"], "get", "--json cannot share stdout with -o -"),
    (["delete-all"], "delete-all", "add --yes"),
    (["policy", "set", "x"], "policy set", "required: POLICY"),
    (["frobnicate"], None, "invalid choice: 'frobnicate'"),
    ([], None, "required: COMMAND"),
])
def test_a_usage_error_is_the_commands_usage_line_and_the_error(daemon, capsys, argv, command,
                                                                words):
    """Errors found inside a command (drain's unknown node, put - without --key...) printed
    the whole program's usage, seven lines of global options, before the error."""
    assert main(["-a", daemon.control, *argv]) == 2
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert out == "" and len(lines) == 2, err
    prog = "kvstore-cli" + (f" {command}" if command else "")
    assert lines[0].startswith(f"usage: {prog} "), err
    assert lines[1].startswith(f"{prog}: error: ") and words in lines[1], err
    if command is None:  # the program's usage names where the options are, not all of them
        assert "--tls" not in lines[0] and "COMMAND --help" in lines[0], err


def test_tls_to_a_plaintext_daemon_is_one_line(daemon):
    """grpcio 1.85 wrote an INFO line of its own ("I1202 ... Handshake failed") on stderr
    before the CLI's error, unless GRPC_VERBOSITY was set before grpc was imported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVSTORE_", "GRPC_"))}
    r = subprocess.run([sys.executable, "-m", "kvstore.cli", "-a", daemon.control, "--tls",
                        "--timeout", "20", "status"], capture_output=True, text=True,
                       timeout=CLI_TIMEOUT, env=env)
    assert r.returncode == 4 and r.stdout == "", r.stderr
    assert r.stderr.startswith("kvstore-cli: PermissionDenied: ") and "does not speak TLS" in \
        r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    # ... set for grpc's import only: a process that imports kvstore and starts a kvstored
    # passes it no GRPC_VERBOSITY (the daemon's own default, NONE, keeps gRPC's lines out)
    r = subprocess.run([sys.executable, "-c", "import os, kvstore; print(os.environ.get("
                        "'GRPC_VERBOSITY'))"], capture_output=True, text=True,
                       timeout=CLI_TIMEOUT, env=env)
    assert r.returncode == 0 and r.stdout == "None\n", (r.stdout, r.stderr)


def test_stats_shows_byte_counters_in_binary_units(daemon, capsys):
    assert main(["-a", daemon.control, "stats"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split(None, 1)[1] for line in out.splitlines()
            if line.startswith(("dram_prefaulted ", "dram_capacity "))}
    assert rows.keys() == {"dram_prefaulted", "dram_capacity"}, out
    assert all(v.endswith("MiB") for v in rows.values()), rows


def _http2_not_found_server(stop: threading.Event) -> tuple[socket.socket, threading.Thread]:
    """An HTTP/2 server that is not gRPC (a proxy, a web server): every request on it is
    answered ':status 404' (HPACK static index 13), nothing else."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)

    def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
        return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") \
            + payload

    def serve(conn: socket.socket) -> None:
        conn.settimeout(0.2)
        buf = b""
        conn.sendall(frame(4, 0, 0))  # SETTINGS
        while not stop.is_set():
            try:
                data = conn.recv(65536)
            except socket.timeout:
                continue
            if not data:
                return
            buf += data
            if buf.startswith(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"):
                buf = buf[24:]
            while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
                n, kind, flags = int.from_bytes(buf[:3], "big"), buf[3], buf[4]
                stream = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
                buf = buf[9 + n:]
                if kind == 4 and not flags & 1:
                    conn.sendall(frame(4, 1, 0))  # SETTINGS ACK
                elif kind == 1:  # HEADERS: answer 404, END_HEADERS | END_STREAM
                    conn.sendall(frame(1, 0x5, stream, b"\x8d"))

    def accept() -> None:
        conns = []
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except socket.timeout:
                continue
            t = threading.Thread(target=serve, args=(conn,), daemon=True)
            t.start()
            conns.append((conn, t))
        for conn, t in conns:
            t.join(5)
            conn.close()
        srv.close()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    return srv, t


def test_an_http2_server_that_is_not_kvstored_is_exit_3(capsys):
    """A non-gRPC HTTP/2 server at -a (this sandbox's egress proxy answered 404) was
    `Internal: Received http2 header with status: 404`, exit 1 like a store error."""
    stop = threading.Event()
    srv, t = _http2_not_found_server(stop)
    address = "127.0.0.1:%d" % srv.getsockname()[1]
    try:
        rc = main(["-a", address, "--timeout", "20", "status"])
    finally:
        stop.set()
        t.join(10)
    out, err = capsys.readouterr()
    assert rc == 3 and out == "", err
    assert err.startswith(f"kvstore-cli: Unavailable: {address} answers, but not as kvstored's "
                          "control (gRPC) port") and len(err.splitlines()) == 1, err


def test_policy_rm_says_what_it_did_and_drain_names_the_node_it_cannot_reach(start_daemon,
                                                                              tmp_path, capsys):
    """`policy rm` said "policy removed" for a namespace that had none, and for the
    default the nodes' config (cluster.policies) keeps in force; `drain` of a member that
    is down said "cannot connect to kvstored at <the -a address>", which was up. One etcd,
    two nodes (a long lease keeps the killed one listed)."""
    import json
    import shutil

    from daemonutil import ROOT, config, wait_for

    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed (apt-get install etcd-server)")
    sys.path.insert(0, str(ROOT / "tests" / "cluster"))
    try:
        from etcdutil import Etcd
    finally:
        sys.path.remove(str(ROOT / "tests" / "cluster"))

    etcd = Etcd(tmp_path).start()
    try:
        cfg = config(tmp_path, f"""
            [cluster]
            enabled = true
            etcd_endpoints = "{etcd.endpoint}"
            policies = "*=replicas:1"
            lease_ttl = 60
            repair = false
            """)
        d, down = start_daemon.many(["--config", cfg], ["--config", cfg])

        def cli(*args: str) -> tuple[int, str, str]:
            rc = main(["-a", d.control, *args])
            out, err = capsys.readouterr()
            return rc, out, err

        def registered() -> bool:
            doc = json.loads(cli("--json", "nodes")[1])
            return doc["source"] == "etcd" and not doc["degraded"] and len(doc["nodes"]) == 2
        assert wait_for(registered, 30)
        rc, out, err = cli("policy", "rm", "nobody")
        assert rc == 0 and out.startswith("'nobody': had no policy of its own; nothing removed"), err
        assert cli("policy", "set", "llama", "none")[0] == 0
        rc, out, _ = cli("policy", "rm", "llama")
        assert rc == 0 and out.startswith("'llama': policy removed\n"), out
        assert cli("policy", "set", "*", "none")[0] == 0  # etcd's hides the config's
        rc, out, _ = cli("policy", "rm", "*")
        assert rc == 0 and out.startswith("* (default): replicas:1 from the nodes' config "
                                          "(cluster.policies) is in force"), out
        rc, out, _ = cli("--json", "policy", "ls")
        assert rc == 0 and json.loads(out)["policies"] == {"*": "replicas:1"}, out
        # drain: the node itself, empty, so safe to stop at once; then cancelled
        node = d.info["node_id"]
        rc, out, err = cli("--json", "drain", node, "--wait", "--timeout", "30")
        doc = json.loads(out)
        assert rc == 0 and doc["draining"] and doc["safe_to_stop"] and doc["objects"] == 0, err
        rc, out, _ = cli("drain", node, "--cancel")
        assert rc == 0 and out.startswith(f"{node}: drain cancelled"), out
        # a member that is down, still listed (its lease runs 60 s): exit 3, naming it
        down.stop(signal.SIGKILL)
        rc, out, err = cli("--timeout", "20", "drain", down.info["node_id"])
        assert rc == 3 and out == "" and len(err.splitlines()) == 1, err
        assert err.startswith(f"kvstore-cli: Unavailable: cannot reach {down.info['node_id']} at "
                              f"{down.control} to drain it"), err
        assert d.control not in err, err
        # etcd down: the node's "etcd is unreachable (... Connection refused)" was rewritten
        # into "cannot connect to kvstored at <-a>: connection refused (is kvstored running?)"
        etcd.stop()
        assert wait_for(lambda: json.loads(cli("--json", "nodes")[1])["degraded"], 30)
        rc, out, err = cli("policy", "set", "x", "none")
        assert rc == 3 and out == "" and len(err.splitlines()) == 1, err
        assert err.startswith("kvstore-cli: Unavailable: etcd is unreachable") and \
            "policy not changed" in err, err
    finally:
        etcd.stop()


def test_a_pin_over_the_daemons_longest_lease_is_refused_as_help_says(daemon, capsys):
    """`pin --help` said the daemon caps a longer --ttl; it refuses it (InvalidArgument)."""
    import io
    from contextlib import redirect_stdout

    help_text = io.StringIO()
    with redirect_stdout(help_text):
        assert main(["pin", "--help"]) == 0
    assert "refuses more than its engine.max_pin_ttl" in " ".join(help_text.getvalue().split())
    with kvstore.Client(daemon.control, timeout=10.0, shm=False) as c:
        c.put("pinned", b"v")
    assert main(["-a", daemon.control, "pin", "pinned", "--ttl", "86401"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("kvstore-cli: InvalidArgument: pin ttl 86401.0 outside "
                                        "(0, 86400.0] seconds") and len(err.splitlines()) == 1, err
    assert main(["-a", daemon.control, "pin", "pinned", "--ttl", "86400"]) == 0
    assert capsys.readouterr().out.startswith("pinned 1/1 keys in namespace 'default' for 86400s")
