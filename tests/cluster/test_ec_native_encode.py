"""layout's encoder: liberasurecode_encode called through ctypes on pyeclib's own instance
(no GIL held, fragments used where liberasurecode wrote them) gives exactly pyeclib's
fragments for every input kind and size; the fragments' memory lives as long as any view
of them; KVSTORE_NATIVE_EC=0 and a failed probe leave pyeclib's encode in place; threads
encode at once. Pure layout, plus one fresh interpreter for the opt-out."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading

import pytest

pytest.importorskip("pyeclib")

from daemonutil import ROOT

from kvstore import layout
from kvstore.layout import Policy, assemble, encode_parts, encode_records

P = Policy.parse("ec:4+2")


@pytest.fixture(scope="module")
def codec():
    c = layout.codec(P)
    if c.native is None:
        pytest.skip("liberasurecode not reachable through ctypes here: pyeclib's encode is used")
    return c


@pytest.mark.parametrize("size", [1, 17, 4095, 256 << 10, (1 << 20) + 3, 4 << 20])
def test_same_fragments_as_pyeclib_for_every_buffer_kind(codec, size):
    v = os.urandom(size)
    want = codec.driver.encode(v)
    for value in (v, memoryview(v), bytearray(v), memoryview(bytearray(v)),
                  memoryview(b"xx" + v)[2:]):  # part of a bytes object: read-only, copied
        got = codec.encode(value)
        assert [bytes(f) for f in got] == want
        assert all(f.readonly for f in got)


def test_records_and_reads_unchanged(codec):
    v = os.urandom((1 << 20) + 11)
    parts = encode_parts(P, v, 256 << 10)
    recs = encode_records(P, v, 256 << 10)
    assert [h + bytes(f) for h, f in parts] == recs
    assert assemble(P, recs[:4]) == v and assemble(P, recs[2:]) == v  # concatenated / decoded


def test_fragments_outlive_the_call_and_are_freed(codec):
    v = os.urandom(1 << 20)
    want = codec.driver.encode(v)
    kept = codec.encode(v)[5]  # one parity view: its batch's memory stays
    gc.collect()
    for _ in range(50):  # other encodes reuse freed memory; the kept view must not change
        codec.encode(os.urandom(1 << 20))
    assert bytes(kept) == want[5]
    del kept

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    before = rss()
    for _ in range(400):  # 400 x 1.5 MiB of fragments: freed as they go, not kept
        codec.encode(v)
    assert rss() - before < 64 << 20


def test_concurrent_encodes(codec):
    objs = [os.urandom((1 << 20) + i) for i in range(4)]
    want = [codec.driver.encode(o) for o in objs]
    bad = []

    def work(i: int) -> None:
        for _ in range(10):
            if [bytes(f) for f in codec.encode(objs[i])] != want[i]:
                bad.append(i)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not bad and not any(t.is_alive() for t in threads)


def test_a_probe_that_differs_keeps_pyeclib(codec):
    probe = b"probe" * 1000
    wrong = [b"x" * len(f) for f in codec.driver.encode(probe)]
    assert layout._NativeEncoder.attach(codec.driver, 4, 2, probe, wrong) is None
    assert layout._NativeEncoder.attach(object(), 4, 2, probe, wrong) is None  # no pyeclib handle


def test_opt_out_uses_pyeclib():
    code = ("import os; from kvstore import layout; p = layout.Policy.parse('ec:4+2'); "
            "c = layout.codec(p); v = os.urandom(300000); "
            "assert c.native is None and [bytes(f) for f in c.encode(v)] == c.driver.encode(v); "
            "fr = c.driver.encode(v); "  # reconstruct: pyeclib, any buffers (copied to bytes for it)
            "assert c.reconstruct([memoryview(bytearray(f)) for f in fr[2:]], [1, 0]) == fr[:2]; print('ok')")
    env = dict(os.environ, KVSTORE_NATIVE_EC="0",
               PYTHONPATH=os.pathsep.join([str(ROOT / "client"), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_decode_reads_records_in_place_and_matches_pyeclib(codec):
    v = os.urandom((1 << 20) + 29)
    frags = codec.driver.encode(v)
    for sel in ([0, 1, 2, 3], [1, 2, 3, 4], [0, 2, 4, 5], [2, 3, 4, 5], [5, 4, 3, 2, 1]):
        for kind in (bytes, bytearray):
            got = codec.decode([memoryview(kind(b"h" * 36) + frags[i])[36:] for i in sel])
            assert bytes(got) == v == codec.driver.decode([frags[i] for i in sel[:4]])
    kept = codec.decode([bytearray(f) for f in frags[2:]])
    for _ in range(20):  # other decodes reuse freed memory; the kept result must not change
        codec.decode([bytearray(f) for f in codec.driver.encode(os.urandom(1 << 20))[:4]])
    assert bytes(kept) == v and kept.readonly


def test_decode_of_fragments_of_unequal_length_is_left_to_pyeclib(codec):
    frags = codec.driver.encode(os.urandom(300_000))
    short = [frags[0][:-1]] + frags[1:4]  # liberasurecode would read past the short one
    assert not layout._same_length(short) and not layout._same_length([])
    with pytest.raises(codec.errors):
        codec.decode(short)  # pyeclib's typed error, no read past a buffer
    recs = encode_records(P, os.urandom(300_000), 256 << 10)
    assert assemble(P, [recs[0][:-1], recs[2], recs[3], recs[4]]) is None  # 3 valid: not enough


# ------------------------------------------------------------------ repair's source check

def test_inner_index_is_each_fragments_own(codec):
    assert codec.indexed
    frags = codec.encode(os.urandom(100_000))
    assert [layout.inner_index(f) for f in frags] == list(range(6))
    assert layout.inner_index(b"abc") is None
