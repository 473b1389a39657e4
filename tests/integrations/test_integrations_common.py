"""What the adapters share, tested without any engine installed: option parsing,
the batched prefix lookup, and clear import errors when an engine is missing."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import kvstore
from daemonutil import ROOT
from kvstore.integrations import ClientOptions, client_from_options, lookup_prefix


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
    assert (opts.address, opts.namespace, opts.timeout, rest) == ("127.0.0.1:7070", "sglang", 30.0, {})
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
