"""kvstore-cli as a user meets it when something is wrong (session 17's audit): a usage error
is the command's usage line and one error line, never the whole program's usage; a TLS
client against a plaintext daemon is one line, not gRPC's log line besides it."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

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


def test_stats_shows_byte_counters_in_binary_units(daemon, capsys):
    assert main(["-a", daemon.control, "stats"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split(None, 1)[1] for line in out.splitlines()
            if line.startswith(("dram_prefaulted ", "dram_capacity "))}
    assert rows.keys() == {"dram_prefaulted", "dram_capacity"}, out
    assert all(v.endswith("MiB") for v in rows.values()), rows
