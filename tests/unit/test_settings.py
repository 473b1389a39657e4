"""The settings table is the one declaration of every setting (no sockets, no daemon):
the Config fields, defaults, flags, reload hooks and per-value checks all come from it."""
from __future__ import annotations

import dataclasses
import math

import pytest

from kvstored import config as cfgmod
from kvstored.config import Config, ConfigError, build_arg_parser, load_config
from kvstored.settings import RELOADABLE
from kvstored.settings import SETTINGS as ROWS


@pytest.fixture(autouse=True)
def fixed_host(monkeypatch):
    monkeypatch.setattr(cfgmod, "mem_available", lambda: 8 << 30)
    monkeypatch.setattr(cfgmod, "available_congestion_controls", lambda: ["reno", "cubic"])


def test_config_fields_are_the_rows_in_order_with_their_defaults():
    fields = dataclasses.fields(Config)
    assert [f.name for f in fields] == [s.field for s in ROWS]
    c = Config()
    for s in ROWS:
        assert getattr(c, s.field) == s.default, s.name
    assert len({s.name for s in ROWS}) == len(ROWS) == len({s.field for s in ROWS})


def test_flags_come_from_the_rows():
    options = {a.option_strings[-1]: a for a in build_arg_parser()._actions if a.option_strings}
    flagged = [s for s in ROWS if s.flag is not None]
    assert len(flagged) >= 14
    for s in flagged:
        assert s.flag.option in options, s.name
        assert "{default}" not in options[s.flag.option].help
    assert cfgmod._FLAG_FIELDS["port"] == "control_port"
    assert cfgmod._FLAG_FIELDS["kv_events"] == "events_endpoint"


def test_every_reload_hook_is_one_the_node_applies():
    from kvstored.node import RELOAD_HOOKS
    assert RELOADABLE and set(RELOADABLE.values()) <= set(RELOAD_HOOKS)
    # what SIGHUP applies is what the README promises (Operations, Signals)
    assert {"log_level", "log_format", "max_connections", "max_inflight_bytes", "max_batch_keys",
            "drain_timeout", "put_wait_timeout", "reservation_timeout", "max_pin_ttl",
            "high_watermark", "low_watermark"} <= set(RELOADABLE)
    assert "dram_size" not in RELOADABLE and "control_port" not in RELOADABLE


@pytest.mark.parametrize("field, bad, message", [
    ("max_queued_responses", 0, "server.max_queued_responses: must be positive, got 0"),
    ("idle_timeout", math.nan, "server.idle_timeout: must be a positive number of seconds"),
    ("metrics_port", 70000, "metrics.port: 70000 is out of range"),
    ("cluster_lease_ttl", 1, "cluster.lease_ttl: 1 is outside 2..3600 seconds"),
    ("cluster_name", "a/b", "cluster.name: 'a/b' must be 1-64 characters"),
    ("events_block_size", -1, "events.block_size: -1 is outside 0..1048576 tokens"),
    ("events_endpoint", "udp://x:1", "events.endpoint: 'udp://x:1' is not a tcp:// or ipc://"),
    ("events_endpoint", "off", "events.endpoint: 'off' is not a tcp:// or ipc://"),
    ("log_format", "xml", "log.format: 'xml' is not one of kv, json"),
    ("tls_min_version", "1.1", "tls.min_version: '1.1' is not '1.2' or '1.3'"),
    ("cluster_repair_rate", 1000, "cluster.repair_rate: 1000 bytes/s is below 1MiB/s"),
])
def test_a_rows_check_names_the_setting(field, bad, message):
    with pytest.raises(ConfigError) as ei:
        load_config(None, {field: bad})
    assert message in str(ei.value)


def test_choices_are_case_insensitive_and_replay_endpoint_may_be_off():
    c = load_config(None, {"log_level": "DEBUG", "log_format": "JSON",
                           "events_endpoint": "tcp://127.0.0.1:5557",
                           "events_replay_endpoint": "off"})
    assert (c.log_level, c.log_format, c.events_replay()) == ("debug", "json", "")
