"""Config -> StoreLimits: every engine limit is a setting, and a config passes each one on."""
from dataclasses import fields

import pytest

from kvstored.config import Config
from kvstored.engine.limits import StoreLimits
from kvstored.settings import _BY_FIELD


def test_every_store_limit_is_a_setting():
    missing = [f.name for f in fields(StoreLimits) if f.name not in _BY_FIELD]
    assert missing == [], f"StoreLimits fields with no settings row: {missing}"


def test_engine_limits_pass_every_field_from_the_config():
    c = Config()
    c.dram_size = 1 << 30
    c.high_watermark, c.low_watermark = 0.91, 0.83
    c.reservation_timeout = 7.5
    lim = c.engine_limits()
    for f in fields(StoreLimits):
        assert getattr(lim, f.name) == getattr(c, f.name), f.name


def test_engine_limits_resolves_auto_dram_size():
    c = Config()
    c.dram_size = None
    lim = c.engine_limits()
    assert lim.dram_size > 0 and lim.dram_size % c.slab_size == 0


def test_config_rejects_crossed_watermarks():
    # crossed watermarks are refused with an error that names them
    c = Config()
    c.dram_size = 1 << 30
    c.high_watermark, c.low_watermark = 0.5, 0.9
    with pytest.raises(Exception) as ei:
        c.validate()
    assert "watermark" in str(ei.value)
