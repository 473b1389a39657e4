"""bench_tcp's --repeat: each row reports its median round, rounds kept together."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import bench_tcp  # noqa: E402


def row(system, op, rate, rnd, **kw):
    return {"system": system, "op": op, "size": 1 << 20, "concurrency": 1, "bytes_s": rate,
            "p50_us": rate / 1e6, "round": rnd, **kw}


def test_median_round_of_each_row():
    rows = [row("kvstored", "get", 3e9, 1), row("kvstored", "get", 1e9, 2),
            row("kvstored", "get", 2e9, 3),
            row("redis", "get", 5e8, 1), row("redis", "get", 7e8, 2),  # even: the lower middle
            row("kvstored", "put", 0, 1, error="boom"), row("kvstored", "put", 4e9, 2),
            row("lmcache", "get", 0, 1, error="down"), row("lmcache", "get", 0, 2, error="down")]
    out = {(r["system"], r["op"]): r for r in bench_tcp.median_rows(rows)}
    kv = out[("kvstored", "get")]
    assert kv["bytes_s"] == 2e9 and kv["p50_us"] == 2e3 and kv["round"] == 3  # one round's figures
    assert kv["rounds_bytes_s"] == [3e9, 1e9, 2e9]
    assert out[("redis", "get")]["bytes_s"] == 5e8
    assert out[("kvstored", "put")]["bytes_s"] == 4e9  # a failed round does not count
    assert out[("lmcache", "get")]["error"] == "down"  # every round failed: the error stays
    assert len(out) == 4


def test_repeat_must_be_positive(capsys):
    assert bench_tcp.parse_args(["--repeat", "3"]).repeat == 3
    with pytest.raises(SystemExit):
        bench_tcp.parse_args(["--repeat", "0"])
    assert "--repeat must be >= 1" in capsys.readouterr().err
