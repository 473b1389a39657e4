"""Structured logs: kv and JSON formats, request ids on data-path error lines, no secrets."""
from __future__ import annotations

import io
import json
import logging
import socket

import pytest

import kvstore
from kvstore import errors
from kvstored import logs
from opsutil import json_lines, put_frame, read_frame, wait_for_log


@pytest.fixture
def capture():
    """Route the root logger through kvstored.logs into a buffer; restore afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    buf = io.StringIO()

    def setup(fmt: str, level: str = "debug") -> io.StringIO:
        logs.setup(level, fmt, stream=buf)
        return buf

    yield setup
    for h in root.handlers[:]:
        if isinstance(h, logs._Handler):
            root.removeHandler(h)
    root.handlers[:], root.level = saved[0], saved[1]


def test_kv_format_quotes_and_extras(capture):
    buf = capture("kv")
    logging.getLogger("kvstored.tcp").info('closing: %s', 'bad "magic"\nnext',
                                           extra={"req_id": 7, "peer": "127.0.0.1:5", "ok": True,
                                                  "empty": ""})
    line = buf.getvalue().strip()
    assert "\n" not in line  # one event, one line
    assert line.startswith("ts=") and line.split()[0].endswith("Z")
    assert ' level=info logger=kvstored.tcp msg="closing: bad \\"magic\\"\\nnext" ' in line
    assert line.endswith('req_id=7 peer=127.0.0.1:5 ok=true empty=""')


def test_json_format_is_one_object_per_line(capture):
    buf = capture("json")
    log = logging.getLogger("kvstored")
    log.warning("hello %d", 5, extra={"req_id": 9})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed", extra={"req_id": 10})
    docs = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert [d["msg"] for d in docs] == ["hello 5", "failed"]
    assert docs[0]["level"] == "warning" and docs[0]["req_id"] == 9 and docs[0]["logger"] == "kvstored"
    assert docs[1]["level"] == "error" and "ValueError: boom" in docs[1]["exc"]


def test_levels_filter_and_change_live(capture):
    buf = capture("kv", level="warning")
    log = logging.getLogger("kvstored.x")
    log.info("hidden")
    logs.set_level("debug")
    log.debug("shown")
    logs.set_format("json")
    log.debug("as json")
    lines = buf.getvalue().splitlines()
    assert "hidden" not in buf.getvalue() and "shown" in lines[0]
    assert json.loads(lines[1])["msg"] == "as json"


@pytest.mark.parametrize("text, secret", [
    ("token=abc123def", "abc123def"),
    ("auth.tokens = \"s3cr3t-value\"", "s3cr3t-value"),
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.payload.sig", "eyJhbGciOiJIUzI1NiJ9"),
    ("password: 'hunter two'", "hunter two"),
    ("connecting with bearer abcdefghijklmnop", "abcdefghijklmnop"),
    ("x-kvstore-token=abcd&next=1", "abcd"),
    ("api_key=K123 rest", "K123"),
])
def test_redact_scrubs_credentials(text, secret):
    out = logs.redact(text)
    assert secret not in out and logs.REDACTED in out


def test_redact_keeps_ordinary_text():
    for text in ("key=value plain", "tokens_loaded=3", "put of 4096 bytes", "namespace llama3/8b"):
        assert logs.redact(text) == text


def test_secret_fields_and_messages_never_reach_the_log(capture):
    buf = capture("json")
    logging.getLogger("kvstored.auth").warning(
        "rejected token=supersecret1 from peer", extra={"token": "supersecret2",
                                                         "auth.tokens": ["supersecret3"],
                                                         "token_file": "/etc/kvstored/tokens"})
    capture("kv")
    logging.getLogger("kvstored.auth").warning("x", extra={"password": "supersecret4"})
    text = buf.getvalue()
    assert "supersecret" not in text
    doc = json.loads(text.splitlines()[0])
    assert doc["token"] == logs.REDACTED and doc["token_file"] == "/etc/kvstored/tokens"
    assert logs.is_sensitive("auth.tokens") and not logs.is_sensitive("tls.key_file")


# ---------------------------------------------------------------- a real daemon

def test_daemon_json_logs_carry_request_id_and_peer(start_daemon):
    d = start_daemon("--log-format", "json", "--log-level", "debug")
    wait_for_log(d, '"msg": "kvstored ready"')
    with kvstore.Client(d.control, namespace="t", shm=False) as c:
        with pytest.raises(errors.NotFound):
            c.get("nope")
    # a frame with a bad magic: the connection is closed, logged at info with its request id
    with socket.create_connection(("127.0.0.1", d.data_port), timeout=10) as s:
        local = "%s:%d" % s.getsockname()
        s.sendall(put_frame(42, b"k", b"", magic=b"XXXX"))
        op, rid, status, _ = read_frame(s)
        assert status == errors.ProtocolError.code
    wait_for_log(d, "closing data connection")
    docs = json_lines(d.log_path.read_text())
    miss = [x for x in docs if x.get("error") == "NotFound"]
    assert miss and miss[0]["level"] == "debug" and miss[0]["req_id"] > 0 and miss[0]["peer"]
    assert miss[0]["op"] == "get"
    fatal = [x for x in docs if x["msg"].startswith("closing data connection")]
    assert fatal[0]["level"] == "info" and fatal[0]["req_id"] == 42
    assert fatal[0]["peer"] == local
    ready = [x for x in docs if x["msg"] == "kvstored ready"][0]
    assert ready["data"].endswith(f":{d.data_port}") and ready["metrics"]


def test_daemon_default_format_is_key_value(start_daemon):
    d = start_daemon()
    line = wait_for_log(d, 'msg="kvstored ready"')
    assert " level=info logger=kvstored " in line and f"data=127.0.0.1:{d.data_port}" in line
