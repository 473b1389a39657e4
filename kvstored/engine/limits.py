"""The engine's bounds, in a module of their own so the Store's parts (dram.py,
tiering.py) and the facade (store.py) all read them without importing each other."""
from __future__ import annotations

from dataclasses import dataclass

from kvstored.settings import default


@dataclass
class StoreLimits:
    """The engine's bounds; each default is its setting's row (kvstored/settings.py)."""

    dram_size: int
    slab_size: int = default("slab_size")
    max_value_size: int = default("max_value_size")
    high_watermark: float = default("high_watermark")
    low_watermark: float = default("low_watermark")
    reservation_timeout: float = default("reservation_timeout")
    put_wait_timeout: float = default("put_wait_timeout")
    max_pin_ttl: float = default("max_pin_ttl")
    hugepages: bool = default("hugepages")
    prefault: bool = default("prefault")
    index: str = default("index")  # auto | packed | dict (entries.make_index)
    key_area_bytes: int = default("key_area_bytes")  # per-slot key records (arena.py)
