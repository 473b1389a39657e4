"""Chained block keys, the way inference engines name KV-cache blocks.

``key_i = H(key_{i-1} || len_i || tokens_i || extra)`` with ``key_{-1} = H(namespace)``, so a
block's key names the whole prefix before it: equal keys mean an equal prefix.
Tokens are hashed as little-endian uint32. Never Python's ``hash()``: it is salted
per process and keys must agree across hosts.
"""
from __future__ import annotations

import hashlib
import struct
from typing import Sequence

import xxhash

from .errors import InvalidArgument

ALGORITHMS = ("sha256", "xxh3-128")


def _hasher(algo: str):
    if algo == "sha256":
        return lambda data: hashlib.sha256(data).digest()
    if algo == "xxh3-128":
        return lambda data: xxhash.xxh3_128_digest(data)
    raise InvalidArgument(f"unknown key hash {algo!r}; use one of {', '.join(ALGORITHMS)}")


def chain(tokens: Sequence[int], block_size: int, *, namespace: str = "default",
          extra: bytes = b"", algo: str = "sha256", include_partial: bool = False) -> list[bytes]:
    """Keys of the consecutive ``block_size``-token blocks of ``tokens``.

    Only full blocks get a key unless ``include_partial``. ``extra`` mixes in
    anything else that changes the KV bytes (model, layout, dtype, LoRA id...).
    """
    if block_size <= 0:
        raise InvalidArgument(f"block_size must be positive, got {block_size}")
    h = _hasher(algo)
    if not isinstance(extra, (bytes, bytearray, memoryview)):
        raise InvalidArgument(f"extra must be bytes, not {type(extra).__name__}")
    extra = bytes(extra)
    prev = h(b"kvstore-chain-v1\0" + namespace.encode())
    out = []
    n = len(tokens)
    end = n if include_partial else n - n % block_size
    for start in range(0, end, block_size):
        block = tokens[start:start + block_size]
        try:
            packed = struct.pack(f"<{len(block)}I", *block)
        except struct.error as e:
            raise InvalidArgument(f"tokens must be integers in [0, 2**32): {e}") from None
        # prev has a fixed length and the block length is explicit, so the input is
        # unambiguous: no (block, extra) pair can collide with another
        prev = h(prev + struct.pack("<I", len(block)) + packed + extra)
        out.append(prev)
    return out
