"""kvstore.keys.chain: the chained block keys inference engines use (no daemon needed)."""
from __future__ import annotations

import hashlib
import struct
import subprocess
import sys

import pytest
import xxhash

from kvstore import keys
from kvstore.errors import InvalidArgument
from kvstore.keys import chain

TOKENS = list(range(1000, 1000 + 1000))


def test_deterministic():
    assert chain(TOKENS, 16) == chain(list(TOKENS), 16)
    assert chain(tuple(TOKENS), 16) == chain(TOKENS, 16)


def test_deterministic_across_processes():
    """Never Python's salted hash(): another interpreter computes the same keys."""
    code = ("import sys; sys.path[:0] = sys.argv[1:]; from kvstore.keys import chain; "
            "print(chain(list(range(1000, 1100)), 16, namespace='m', extra=b'x')[-1].hex())")
    import kvstore
    import os
    client_dir = os.path.dirname(os.path.dirname(kvstore.__file__))
    out = subprocess.run([sys.executable, "-c", code, client_dir], capture_output=True, text=True,
                         timeout=30, env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == chain(list(range(1000, 1100)), 16, namespace="m", extra=b"x")[-1].hex()


def test_known_value_sha256():
    """The documented construction: key_i = H(key_{i-1} || len_i || tokens_i (u32 LE) || extra)."""
    toks = [1, 2, 3, 4, 5]
    prev = hashlib.sha256(b"kvstore-chain-v1\0" + b"ns").digest()
    k0 = hashlib.sha256(prev + struct.pack("<3I", 2, 1, 2) + b"E").digest()
    k1 = hashlib.sha256(k0 + struct.pack("<3I", 2, 3, 4) + b"E").digest()
    assert chain(toks, 2, namespace="ns", extra=b"E") == [k0, k1]


def test_known_value_xxh3():
    prev = xxhash.xxh3_128_digest(b"kvstore-chain-v1\0default")
    k0 = xxhash.xxh3_128_digest(prev + struct.pack("<4I", 3, 7, 8, 9))
    assert chain([7, 8, 9], 3, algo="xxh3-128") == [k0]


@pytest.mark.parametrize("algo, size", [("sha256", 32), ("xxh3-128", 16)])
def test_key_sizes(algo, size):
    ks = chain(TOKENS, 64, algo=algo)
    assert len(ks) == len(TOKENS) // 64
    assert all(isinstance(k, bytes) and len(k) == size for k in ks)
    assert len(set(ks)) == len(ks)


@pytest.mark.parametrize("algo", keys.ALGORITHMS)
def test_prefix_property(algo):
    long = chain(TOKENS, 16, algo=algo)
    for n in (0, 15, 16, 17, 100, 512, 999):
        short = chain(TOKENS[:n], 16, algo=algo)
        assert long[:len(short)] == short
        assert len(short) == n // 16
    # a different token anywhere changes that block's key and every one after it
    changed = list(TOKENS)
    changed[40] += 1
    other = chain(changed, 16, algo=algo)
    assert other[:2] == long[:2]
    assert all(a != b for a, b in zip(other[2:], long[2:]))


def test_namespace_extra_algo_block_size_separate_keys():
    base = chain(TOKENS, 16)
    assert chain(TOKENS, 16, namespace="other")[0] != base[0]
    assert not set(chain(TOKENS, 16, namespace="other")) & set(base)
    assert not set(chain(TOKENS, 16, extra=b"lora-1")) & set(base)
    assert not set(chain(TOKENS, 16, extra=b"lora-1")) & set(chain(TOKENS, 16, extra=b"lora-2"))
    assert not set(chain(TOKENS, 32)) & set(base)
    assert chain(TOKENS, 16, extra=bytearray(b"x")) == chain(TOKENS, 16, extra=b"x")
    assert chain(TOKENS, 16, extra=memoryview(b"x")) == chain(TOKENS, 16, extra=b"x")


def test_partial_blocks():
    toks = TOKENS[:50]
    full = chain(toks, 16)
    assert len(full) == 3
    with_partial = chain(toks, 16, include_partial=True)
    assert len(with_partial) == 4
    assert with_partial[:3] == full
    # the partial key is the key of exactly those 2 trailing tokens
    assert with_partial[3] != chain(TOKENS[:64], 16)[3]
    # a whole number of blocks: include_partial adds nothing
    assert chain(TOKENS[:48], 16, include_partial=True) == chain(TOKENS[:48], 16)
    # fewer tokens than a block
    assert chain(TOKENS[:5], 16) == []
    assert len(chain(TOKENS[:5], 16, include_partial=True)) == 1
    assert chain([], 16) == [] and chain([], 16, include_partial=True) == []


def test_token_range():
    assert len(chain([0, 2**32 - 1], 2)) == 1


@pytest.mark.parametrize("kwargs", [
    dict(tokens=[1, 2], block_size=0),
    dict(tokens=[1, 2], block_size=-4),
    dict(tokens=[1, 2], block_size=2, algo="md5"),
    dict(tokens=[1, 2], block_size=2, algo=""),
    dict(tokens=[1, -1], block_size=2),
    dict(tokens=[1, 2**32], block_size=2),
    dict(tokens=[1, "2"], block_size=2),
    dict(tokens=[1, 2.5], block_size=2),
    dict(tokens=[1, None], block_size=2),
    dict(tokens=[1, 2, 3], block_size=2, include_partial=True, algo="nope"),
])
def test_bad_input(kwargs):
    with pytest.raises(InvalidArgument):
        chain(**kwargs)


def test_bad_token_in_partial_block():
    with pytest.raises(InvalidArgument):
        chain([1, 2, -3], 2, include_partial=True)
    assert len(chain([1, 2, -3], 2)) == 1  # the bad token is not in a full block


def test_int_extra_is_rejected():
    with pytest.raises((InvalidArgument, TypeError)):
        chain([1, 2], 2, extra=5)


def test_block_boundary_and_extra_cannot_collide():
    """A token moved from a block into ``extra`` must not give the same key."""
    a = chain([1, 2], 2, extra=b"")[0]
    b = chain([1], 1, extra=struct.pack("<I", 2))[0]
    assert a != b
