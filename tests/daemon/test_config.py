import socket

import pytest

from kvstored import config as cfgmod
from kvstored.config import (Config, ConfigError, build_arg_parser, config_from_args, fail,
                             format_size, load_config, parse_size)

MiB = 1 << 20
GiB = 1 << 30


@pytest.fixture(autouse=True)
def fixed_host(monkeypatch):
    """Make auto values independent of the machine running the tests."""
    monkeypatch.setattr(cfgmod, "mem_available", lambda: 8 * GiB)
    monkeypatch.setattr(cfgmod, "available_congestion_controls", lambda: ["reno", "cubic"])


def write(tmp_path, text, name="kvstored.toml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def error_of(fn, *args, **kw) -> str:
    with pytest.raises(ConfigError) as ei:
        fn(*args, **kw)
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------- defaults

def test_defaults():
    c = load_config(None, {})
    assert (c.host, c.control_port, c.data_port, c.tcp_congestion) == ("127.0.0.1", 7070, 7071, "")
    assert c.max_connections == 1024 and c.max_inflight_bytes == 256 * MiB
    assert c.slab_size == c.max_value_size == 64 * MiB
    assert (c.high_watermark, c.low_watermark, c.hugepages) == (0.95, 0.90, True)
    assert (c.reservation_timeout, c.put_wait_timeout, c.max_pin_ttl) == (30.0, 2.0, 86400.0)
    assert c.max_batch_keys == 65536 and c.max_control_value_size == 4 * MiB
    assert c.log_level == "info"
    assert c.node_id == f"{socket.gethostname()}:7070"
    assert c.dram_size == 2 * GiB  # 25% of the 8 GiB the fixture reports


@pytest.mark.parametrize("avail, slab, expected", [
    (64 * GiB, 64 * MiB, 4 * GiB),          # capped
    (100 * MiB, 64 * MiB, 64 * MiB),        # floor
    (1000 * MiB, 64 * MiB, 192 * MiB),      # 250 MiB rounded down to whole slabs
    (None, 64 * MiB, 64 * MiB),             # no /proc/meminfo: the floor
    (100 * MiB, 128 * MiB, 128 * MiB),      # never less than one slab
])
def test_auto_dram_size(monkeypatch, avail, slab, expected):
    monkeypatch.setattr(cfgmod, "mem_available", lambda: avail)
    c = load_config(None, {"slab_size": slab, "max_value_size": min(slab, 64 * MiB)})
    assert c.dram_size == expected


def test_node_id_follows_port():
    assert load_config(None, {"control_port": 9000}).node_id.endswith(":9000")
    assert load_config(None, {"node_id": "n1"}).node_id == "n1"


# ---------------------------------------------------------------- sizes

@pytest.mark.parametrize("text, expected", [
    (4096, 4096), ("4096", 4096), ("2GiB", 2 * GiB), ("512MiB", 512 * MiB), ("64KiB", 65536),
    ("1G", GiB), ("1GB", GiB), ("1gb", GiB), ("1T", 1 << 40), ("64 MiB", 64 * MiB),
    ("1.5GiB", 3 * GiB // 2), ("10B", 10), (0, 0), (4096.0, 4096),
])
def test_parse_size_good(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["2XB", "", "GiB", "-1", "-1GiB", -5, "1.5", "0.3KiB", 1.5,
                                  "1e9", "1 2", True, None, [1]])
def test_parse_size_bad(text):
    msg = error_of(parse_size, text, "dram.size")
    assert msg.startswith("dram.size: ")


def test_parse_size_message():
    assert error_of(parse_size, "2XB", "dram.size") == (
        "dram.size: cannot parse '2XB' as a size (use e.g. 2GiB, 512MiB, 1073741824)")


def test_format_size():
    assert format_size(2 * GiB) == "2GiB"
    assert format_size(1536 * MiB) == "1536MiB"
    assert format_size(4097) == 4097


# ---------------------------------------------------------------- precedence

def test_file_overrides_defaults_and_flags_override_file(tmp_path):
    path = write(tmp_path, """
[server]
host = "0.0.0.0"
control_port = 8000
max_inflight_bytes = "1GiB"

[dram]
size = "512MiB"
slab_size = "32MiB"
max_value_size = "16MiB"
hugepages = false

[engine]
put_wait_timeout = 5

[log]
level = "DEBUG"
""")
    c = load_config(path, {})
    assert (c.host, c.control_port, c.data_port) == ("0.0.0.0", 8000, 7071)
    assert (c.dram_size, c.slab_size, c.max_value_size) == (512 * MiB, 32 * MiB, 16 * MiB)
    assert c.max_inflight_bytes == GiB and c.hugepages is False
    assert c.put_wait_timeout == 5.0 and isinstance(c.put_wait_timeout, float)
    assert c.log_level == "debug"

    c = load_config(path, {"control_port": 9000, "dram_size": "1GiB", "host": None})
    assert (c.host, c.control_port, c.dram_size) == ("0.0.0.0", 9000, GiB)


def test_flags_override_file(tmp_path):
    path = write(tmp_path, '[server]\ncontrol_port = 8000\n[dram]\nsize = "512MiB"\n')
    c, args = config_from_args(["--config", path, "--port", "9001", "--dram-size", "256MiB",
                                "--log-level", "WARNING", "--ready-file", "/tmp/r"])
    assert (c.control_port, c.data_port, c.dram_size, c.log_level) == (9001, 7071, 256 * MiB,
                                                                       "warning")
    assert args.ready_file == "/tmp/r" and not args.print_config
    c, _ = config_from_args(["--config", path, "--dram-size", "auto"])
    assert c.dram_size == 2 * GiB


def test_bad_flags_exit_2(capsys):
    for argv in (["--port", "x"], ["--dram-size", "2XB"], ["--log-level", "loud"], ["--nope"]):
        with pytest.raises(SystemExit) as ei:
            build_arg_parser().parse_args(argv)
        assert ei.value.code == 2
    assert "cannot parse '2XB' as a size" in capsys.readouterr().err


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as ei:
        config_from_args(["--version"])
    assert ei.value.code == 0
    assert capsys.readouterr().out.startswith("kvstored ")


def test_fail(capsys):
    with pytest.raises(SystemExit) as ei:
        fail("dram.size: bad")
    assert ei.value.code == 2
    assert capsys.readouterr().err == "kvstored: error: dram.size: bad\n"


# ---------------------------------------------------------------- file errors

def test_unknown_key_suggests(tmp_path):
    msg = error_of(load_config, write(tmp_path, '[dram]\nsise = "1GiB"\n'), {})
    assert msg == "unknown setting 'dram.sise' (did you mean 'dram.size'?)"


def test_unknown_key_in_wrong_section(tmp_path):
    msg = error_of(load_config, write(tmp_path, '[engine]\nslab_size = "1GiB"\n'), {})
    assert "'engine.slab_size'" in msg and "dram.slab_size" in msg


def test_unknown_section_and_top_level_key(tmp_path):
    msg = error_of(load_config, write(tmp_path, '[sever]\nhost = "x"\n'), {})
    assert msg == "unknown section 'sever' (did you mean 'server'?)"
    msg = error_of(load_config, write(tmp_path, 'host = "x"\n'), {})
    assert msg == "unknown setting 'host' (did you mean 'server.host'?)"


def test_unknown_override():
    assert "unknown override 'dram_sise'" in error_of(load_config, None, {"dram_sise": 1})


@pytest.mark.parametrize("toml, expect", [
    ('[server]\ncontrol_port = "7070"', "server.control_port: expected an integer"),
    ('[server]\ncontrol_port = 7070.0', "server.control_port: expected an integer"),
    ("[dram]\nhugepages = 1", "dram.hugepages: expected true or false"),
    ("[dram]\nhigh_watermark = true", "dram.high_watermark: expected a number"),
    ("[dram]\nsize = true", "dram.size: expected a size"),
    ("[dram]\nslab_size = [1]", "dram.slab_size: expected a size"),
    ("[log]\nlevel = 3", "log.level: expected a string"),
    ("server = 3", "server: expected a table"),
])
def test_wrong_type(tmp_path, toml, expect):
    assert error_of(load_config, write(tmp_path, toml), {}).startswith(expect)


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.toml")
    msg = error_of(load_config, path, {})
    assert path in msg and "No such file" in msg


def test_unparseable_file(tmp_path):
    path = write(tmp_path, "[server\nhost = 1\n")
    msg = error_of(load_config, path, {})
    assert path in msg and "not valid TOML" in msg


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("overrides, expect", [
    ({"low_watermark": 0.96}, "must satisfy 0 < low_watermark <= high_watermark <= 1"),
    ({"high_watermark": 1.5}, "must satisfy 0 < low_watermark <= high_watermark <= 1"),
    ({"low_watermark": 0.0}, "must satisfy 0 < low_watermark <= high_watermark <= 1"),
    ({"low_watermark": float("nan")}, "must satisfy"),
    ({"control_port": 70000}, "server.control_port: 70000 is out of range"),
    ({"data_port": -1}, "server.data_port: -1 is out of range"),
    ({"host": " "}, "server.host: must not be empty"),
    ({"tcp_congestion": "bbr"}, "server.tcp_congestion: 'bbr' is not available"),
    ({"slab_size": "10000"}, "dram.slab_size: 10000 is not a multiple of 4096"),
    ({"slab_size": 0}, "dram.slab_size: must be positive"),
    ({"max_connections": 0}, "server.max_connections: must be positive"),
    ({"dram_size": "32MiB"}, "dram.size (32MiB) must hold at least one slab"),
    ({"log_level": "loud"}, "log.level: 'loud' is not one of debug, info, warning, error"),
    ({"put_wait_timeout": 0}, "engine.put_wait_timeout: must be a positive number of seconds"),
    ({"max_pin_ttl": float("inf")}, "engine.max_pin_ttl: must be a positive number of seconds"),
    # gRPC options in ms as a C int: the start failed with a bare OverflowError
    ({"control_connection_max_age": 1e7},
     "server.control_connection_max_age: must be at most 2147483 s"),
    ({"idle_timeout": 3e6}, "server.idle_timeout: must be at most 2147483 s"),
])
def test_validation(overrides, expect):
    assert expect in error_of(load_config, None, overrides)


def test_slab_smaller_than_max_value():
    msg = error_of(load_config, None, {"slab_size": "16MiB", "max_value_size": "32MiB"})
    assert msg.startswith("dram.slab_size (16MiB) must be >= dram.max_value_size (32MiB)")


def test_tcp_congestion_known_and_unreadable(monkeypatch):
    assert load_config(None, {"tcp_congestion": "cubic"}).tcp_congestion == "cubic"
    monkeypatch.setattr(cfgmod, "available_congestion_controls", lambda: None)
    assert load_config(None, {"tcp_congestion": "bbr"}).tcp_congestion == "bbr"


def test_port_zero_allowed():
    c = load_config(None, {"control_port": 0, "data_port": 0})
    assert (c.control_port, c.data_port) == (0, 0)


# ---------------------------------------------------------------- output

def test_round_trip(tmp_path):
    c = load_config(None, {"host": 'we"ird\\host\t', "control_port": 0, "dram_size": 3 * GiB,
                           "slab_size": "8MiB", "max_value_size": 4096 * 3,
                           "max_inflight_bytes": 12345 * 4096 + 1, "high_watermark": 0.875, "low_watermark": 0.1 + 0.2,
                           "hugepages": False, "tcp_congestion": "reno",
                           "reservation_timeout": 0.1, "log_level": "error",
                           "node_id": "nöde-\x7f-1"})
    text = c.to_toml()
    assert 'size = "3GiB"' in text and 'slab_size = "8MiB"' in text and 'max_value_size = "12KiB"' in text
    assert load_config(write(tmp_path, text), {}) == c


def test_round_trip_defaults(tmp_path):
    c = load_config(None, {})
    assert load_config(write(tmp_path, c.to_toml()), {}) == c


def test_to_toml_unresolved_is_auto(tmp_path):
    text = Config().to_toml()
    assert 'size = "auto"' in text and 'id = ""' in text
    assert load_config(write(tmp_path, text), {}) == load_config(None, {})


def test_engine_limits():
    c = load_config(None, {"dram_size": "256MiB", "slab_size": "16MiB", "max_value_size": "8MiB",
                           "hugepages": False, "put_wait_timeout": 1.5})
    lim = c.engine_limits()
    assert (lim.dram_size, lim.slab_size, lim.max_value_size) == (256 * MiB, 16 * MiB, 8 * MiB)
    assert (lim.high_watermark, lim.low_watermark) == (0.95, 0.90)
    assert (lim.reservation_timeout, lim.put_wait_timeout, lim.max_pin_ttl) == (30.0, 1.5, 86400.0)
    assert lim.hugepages is False
    assert Config().engine_limits().dram_size == 2 * GiB  # auto resolved on the fly
