"""What the adapters share, tested without any engine installed: option parsing,
the batched prefix lookup, and clear import errors when an engine is missing."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import kvstore
from daemonutil import ROOT
from kvstore import errors
from kvstore.integrations import ClientOptions, client_from_options, lookup_prefix
from kvstore.integrations._breaker import Breaker, is_outage


def test_options_from_prefixed_strings():
    opts, rest = ClientOptions.from_mapping(
        {"p.address": "kvstore://10.0.0.5:7070", "p.timeout": "2.5", "p.verify_checksums": "false",
         "p.namespace": "llama", "p.workers": "8", "p.module_path": "x", "other": "ignored"},
        prefix="p.", ignore=("module_path",))
    assert opts.address == "10.0.0.5:7070"
    assert opts.timeout == 2.5 and opts.verify_checksums is False and opts.namespace == "llama"
    assert rest == {"workers": "8"}  # the adapter's own settings; unprefixed keys are not read


def test_options_defaults_and_errors():
    opts, rest = ClientOptions.from_mapping(None, defaults={"namespace": "sglang"})
    assert (opts.address, opts.namespace, opts.timeout, rest) == ("127.0.0.1:7070", "sglang", 5.0, {})
    assert opts.tls_config() is None
    for bad in ({"timeout": "0"}, {"timeout": "soon"}, {"verify_checksums": "maybe"}):
        with pytest.raises(kvstore.InvalidArgument):
            ClientOptions.from_mapping(bad)


def test_token_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("KVSTORE_TOKEN", raising=False)
    assert ClientOptions().resolved_token() is None
    f = tmp_path / "token"
    f.write_text("s3cret\n")
    assert ClientOptions(token_file=str(f)).resolved_token() == "s3cret"
    monkeypatch.setenv("KVSTORE_TOKEN", "from-env")
    assert ClientOptions().resolved_token() == "from-env"
    assert ClientOptions(token="explicit").resolved_token() == "explicit"
    assert "s3cret" not in ClientOptions(token_file=str(f)).describe()
    with pytest.raises(kvstore.InvalidArgument):
        ClientOptions(token_file=str(tmp_path / "missing")).resolved_token()


def test_tls_options_make_a_tls_config():
    opts, _ = ClientOptions.from_mapping({"tls_ca_file": "/ca.pem", "tls_server_name": "kv"})
    tls = opts.tls_config()
    assert tls.ca_file == "/ca.pem" and tls.server_name == "kv" and tls.cert_file is None


def test_lookup_prefix_in_rounds(daemon):
    opts, _ = ClientOptions.from_mapping({"address": daemon.control, "namespace": "lk", "timeout": 10})
    with client_from_options(opts) as c:
        keys = [f"k{i}".encode() for i in range(10)]
        c.batch_put([(k, b"x") for k in keys[:7]])
        assert lookup_prefix(c, keys, batch=3) == 7
        assert lookup_prefix(c, keys[:6], batch=3) == 6
        assert lookup_prefix(c, [b"absent"] + keys, batch=3) == 0
        assert lookup_prefix(c, [], batch=3) == 0


@pytest.mark.parametrize("module,engine,words", [
    ("lmcache", "lmcache", "LMCache 0.5.x"),
    ("sglang", "sglang", "SGLang with HiCache"),
    ("vllm", "vllm", "vLLM with the V1 KV connector API"),
])
def test_missing_engine_is_a_clear_import_error(module, engine, words):
    """``import kvstore.integrations`` never needs an engine; an adapter without its
    engine says which engine it needs."""
    code = (f"import sys; sys.modules[{engine!r}] = None\n"
            "import kvstore, kvstore.integrations\n"
            f"try:\n    import kvstore.integrations.{module}\n"
            "except ImportError as e:\n    print('IMPORTERROR', e)\n")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT / "client")},
                       capture_output=True, text=True, timeout=120)
    assert "IMPORTERROR" in r.stdout and words in r.stdout, r.stdout + r.stderr


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_breaker_opens_on_outage_backs_off_and_probes():
    clock = FakeClock()
    b = Breaker("t", backoff=1.0, max_backoff=4.0, clock=clock)
    calls = []

    def down():
        calls.append(clock.t)
        raise errors.Unavailable("refused")

    assert b.call(down, default="miss") == "miss" and not b.closed and b.trips == 1
    assert b.call(down, default="miss") == "miss" and len(calls) == 1, "asked while open"
    clock.t += 1.0
    assert b.call(down, default="miss") == "miss" and len(calls) == 2  # the probe
    clock.t += 1.5  # back-off doubled to 2 s: still open
    assert b.call(down, default="miss") == "miss" and len(calls) == 2
    for _ in range(5):  # doubling stops at max_backoff
        clock.t += 4.0
        b.call(down, default="miss")
    assert b._wait == 4.0 and b.skipped >= 2
    clock.t += 4.0
    assert b.call(lambda: "hit", default="miss") == "hit" and b.closed
    assert b.call(lambda: "hit", default="miss") == "hit"


def test_breaker_passes_answers_through():
    b = Breaker("t")
    with pytest.raises(errors.NotFound):  # an answer, not an outage: the caller decides
        b.call(lambda: (_ for _ in ()).throw(errors.NotFound("no")))
    assert b.closed
    assert is_outage(errors.Timeout("t")) and is_outage(ConnectionRefusedError())
    assert not is_outage(errors.Redirect("r")) and not is_outage(errors.Conflict("c"))
    with pytest.raises(errors.InvalidArgument):
        Breaker("t", backoff=0)


def test_breaker_one_probe_at_a_time():
    """While a probe is in flight, concurrent callers are answered without asking."""
    import threading

    clock = FakeClock()
    b = Breaker("t", backoff=1.0, clock=clock)
    b.failure(errors.Unavailable("down"))
    clock.t += 2.0
    entered, release, asked = threading.Event(), threading.Event(), []

    def slow():
        asked.append(1)
        entered.set()
        release.wait(5)
        return "ok"

    t = threading.Thread(target=lambda: b.call(slow))
    t.start()
    assert entered.wait(5)
    others = [b.call(slow, default="skipped") for _ in range(20)]
    release.set()
    t.join(5)
    assert others == ["skipped"] * 20 and len(asked) == 1 and b.closed


def test_dead_daemon_costs_adapters_milliseconds(start_daemon):
    """The shared client factory against a daemon that was killed: a call fails well
    within its timeout, and through the breaker later calls are not even made."""
    import signal
    import time

    d = start_daemon()
    opts, _ = ClientOptions.from_mapping({"address": d.control, "namespace": "dead"})
    with client_from_options(opts) as c:
        c.put(b"k", b"v")
        d.stop(signal.SIGKILL)
        b = Breaker("t")
        t0 = time.monotonic()
        assert b.call(lookup_prefix, c, [b"k"], default=0) == 0
        # refused at once, not after the client's 5 s timeout (the margin is for CI's load)
        assert time.monotonic() - t0 < 2.5 and not b.closed
        t0 = time.monotonic()
        for _ in range(100):
            assert b.call(c.get, b"k", default=None) is None
        # the breaker answered: the calls were not made (skipped), and together they took
        # less than the one timeout a call to the daemon could have cost
        assert b.skipped >= 99 and time.monotonic() - t0 < 2.5
        # back on the same ports: the next probe (after at most max_backoff) finds it
        d2 = start_daemon("--port", str(d.info["control_port"]), "--data-port", str(d.data_port))
        c2_put = None
        t0 = time.monotonic()
        while c2_put is None:
            assert time.monotonic() - t0 < b.max_backoff + 2, "the store is back but never probed"
            c2_put = b.call(c.put, b"k2", b"v2", default=None)
            time.sleep(0.05)
        assert b.closed and c.get(b"k2") == b"v2" and d2.alive()


def test_breaker_probes_in_the_background():
    """With a probe, the engine's calls never probe: a background thread does, after
    each back-off, and closes the breaker once the store answers."""
    import time

    state = {"up": False, "calls": 0}

    def probe():
        if not state["up"]:
            raise errors.Unavailable("still down")

    def work():
        state["calls"] += 1
        raise errors.Unavailable("down")

    b = Breaker("t", backoff=0.05, max_backoff=0.2, probe=probe)
    try:
        assert b.call(work, default="miss") == "miss"
        for _ in range(50):
            assert b.call(work, default="miss") == "miss"
        assert state["calls"] == 1, "an engine call was used as a probe"
        # probes after 0.05 and 0.1 s more: waited for, as the prober thread may get no
        # CPU for a while on a loaded machine
        deadline = time.monotonic() + 10
        while b.probes < 2:
            assert time.monotonic() < deadline, f"{b.probes} background probe(s) in 10 s"
            time.sleep(0.01)
        assert not b.closed and state["calls"] == 1
        state["up"] = True
        deadline = time.monotonic() + 10
        while not b.closed:
            assert time.monotonic() < deadline, "the probe never closed the breaker"
            time.sleep(0.01)
        assert b.call(lambda: "hit", default="miss") == "hit"
    finally:
        b.close()


def test_hung_daemon_costs_one_timeout(start_daemon):
    """A daemon that accepts and never answers (SIGSTOP): the first call waits out its
    timeout, later calls are answered at once while probes time out in the background,
    and the breaker closes by itself once the daemon answers again."""
    import signal
    import time

    d = start_daemon()
    opts, _ = ClientOptions.from_mapping({"address": d.control, "namespace": "hung", "timeout": 1})
    with client_from_options(opts) as c:
        c.put(b"k", b"v")
        b = Breaker("t", backoff=0.2, max_backoff=0.5, probe=c.ping)
        d.proc.send_signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            assert b.call(c.get, b"k", default=None) is None
            assert 0.8 < time.monotonic() - t0 < 3.0, time.monotonic() - t0
            time.sleep(1.5)  # probes run and time out meanwhile
            # the first probe starts 0.2 s after the breaker opened: waited for (bounded), as
            # the prober thread may get no CPU for a while on a loaded machine
            deadline = time.monotonic() + 10
            while b.probes < 1:
                assert time.monotonic() < deadline, "no background probe in 10 s"
                time.sleep(0.01)
            t0 = time.monotonic()
            for _ in range(50):
                assert b.call(c.get, b"k", default=None) is None
            # 50 s if they had waited; under one call's 1 s timeout if none did
            assert time.monotonic() - t0 < 0.9, "calls waited on a hung daemon"
            assert not b.closed
        finally:
            d.proc.send_signal(signal.SIGCONT)
        # a probe in flight (1 s) + back-off (0.5 s), then the resumed daemon's answer:
        # generous, for a loaded machine (closing by itself is the point, not how fast)
        deadline = time.monotonic() + 30.0
        while not b.closed:
            assert time.monotonic() < deadline, "the daemon answers again but the breaker stays open"
            time.sleep(0.02)
        assert b.call(c.get, b"k") == b"v"
        b.close()
