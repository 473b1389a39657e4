"""The operations settings: [metrics], log.format, server.drain_timeout."""
from __future__ import annotations

import pytest

from kvstored.config import ConfigError, config_from_args, explicit_fields, load_config


def test_defaults():
    c = load_config()
    assert (c.metrics_enabled, c.metrics_host, c.metrics_port) == (True, "127.0.0.1", 9090)
    assert c.log_format == "kv" and c.drain_timeout == 10.0


@pytest.mark.parametrize("toml, message", [
    ("[metrics]\nport = 70000\n", "metrics.port: 70000 is out of range"),
    ("[metrics]\nport = 7070\n", "metrics.port: 7070 is also the control or data port"),
    ("[metrics]\nhost = \"\"\n", "metrics.host: must not be empty"),
    ("[metrics]\nenabled = \"yes\"\n", "metrics.enabled: expected true or false"),
    ("[log]\nformat = \"xml\"\n", "log.format: 'xml' is not one of kv, json"),
    ("[server]\ndrain_timeout = 0\n", "server.drain_timeout: must be a positive number"),
    ("[metrics]\nprot = 1\n", "unknown setting 'metrics.prot' (did you mean 'metrics.port'?)"),
])
def test_bad_values_are_one_clear_line(tmp_path, toml, message):
    p = tmp_path / "c.toml"
    p.write_text(toml)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_flags_and_round_trip(tmp_path):
    c, _ = config_from_args(["--metrics-port", "0", "--log-format", "JSON"])
    assert c.metrics_port == 0 and c.log_format == "json"
    p = tmp_path / "out.toml"
    p.write_text(c.to_toml())
    assert load_config(p) == c
    p.write_text("[metrics]\nenabled = false\nport = 7070\n")  # off: no clash to report
    assert load_config(p).metrics_enabled is False


def test_explicit_fields_names_what_file_and_flags_set(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[log]\nlevel = \"debug\"\n[dram]\nsize = \"auto\"\n")
    assert explicit_fields(p, {"metrics_port": 0, "host": None}) == {
        "log_level", "dram_size", "metrics_port"}
