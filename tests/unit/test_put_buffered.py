"""The put of a payload that came with its header (session 13, H1): one store call
(``Store.put_bytes``: copy into a free slot, verify the slot, index) with no Reservation,
and the eviction that finds its slot handing the victim's slot over (``DramTier.alloc``).

What must not change: nothing half-written or unverified is ever indexed, no slot leaks on
any failure, bounds and typed errors are those of the reservation path, and a put that
finds no space waits as before, then takes its payload from the buffer.
"""
from __future__ import annotations

import asyncio
import random

import pytest

from kvstore import errors
from kvstore.wire import FLAG_RESPONSE, HEADER_SIZE, OP_PING, OP_PUT, checksum, decode, encode_request
from kvstored.dataplane.ops import CORE_OPS
from kvstored.dataplane.session import DataSession, Plane
from kvstored.engine import Store, StoreLimits

MiB = 1 << 20
NS = b"ns"


def make_store(dram=4 * MiB, slab=1 * MiB) -> Store:
    return Store(StoreLimits(dram_size=dram, slab_size=slab, max_value_size=slab, hugepages=False,
                             prefault=False))


def put_frame(rid, key, data, csum=None):
    return encode_request(OP_PUT, rid, NS, key, len(data),
                          checksum(data) if csum is None else csum) + data


def replies(s: DataSession) -> list:
    out = b"".join(bytes(b) for b in s.take_output())
    got, pos = [], 0
    while pos < len(out):
        h = decode(out, pos)
        assert h.flags & FLAG_RESPONSE
        got.append((h.req_id, h.status, h.aux))
        pos += HEADER_SIZE + h.length
    return got


def test_put_bytes_failures_take_no_slot_and_index_nothing():
    store = make_store()
    arena = store.arena
    data = random.Random(1).randbytes(5000)
    assert store.put_bytes(NS, b"a", data) is True
    used = arena.used_bytes
    with pytest.raises(errors.ChecksumMismatch):  # declared checksum is not the bytes'
        store.put_bytes(NS, b"b", data, checksum(data) ^ 1)
    with pytest.raises(errors.Conflict):  # other bytes under a stored key, no overwrite
        store.put_bytes(NS, b"a", data[::-1])
    with pytest.raises(errors.InvalidArgument):
        store.put_bytes(NS, b"c", bytes(MiB + 1))
    assert arena.used_bytes == used and store.peek(NS, b"b") is None
    assert store.counters["checksum_failures"] == 1 and store.counters["conflicts"] == 1
    # the same bytes again: deduplicated, no slot taken
    assert store.put_bytes(NS, b"a", data) is False and arena.used_bytes == used
    # overwrite replaces, the old slot is freed (one object's slot in use, as before)
    assert store.put_bytes(NS, b"a", data[::-1], overwrite=True) is True
    assert arena.used_bytes == used and bytes(store.view(store.peek(NS, b"a"))) == data[::-1]
    assert not store.reservations and store.reserved_bytes == 0
    store.close()


def test_eviction_hands_the_victims_slot_over_and_frees_it_on_failure():
    store = make_store(dram=2 * MiB, slab=1 * MiB)
    arena = store.arena
    data = [random.Random(i).randbytes(100_000) for i in range(40)]
    keys = [f"k{i}".encode() for i in range(40)]
    for k, d in zip(keys, data):
        assert store.put_bytes(NS, k, d)
    ev = store.counters["evictions"]
    assert ev > 0
    used = arena.used_bytes
    # the next put evicts the oldest object of its class and lands in that very slot
    live = [k for k in keys if store.peek(NS, k) is not None]
    victim_off = store.policy.victim(arena.class_for(100_000).index, lambda e: True).offset
    assert store.put_bytes(NS, b"new", data[0][::-1])
    assert store.peek(NS, b"new").offset == victim_off and arena.used_bytes == used
    assert store.counters["evictions"] == ev + 1
    # every object still indexed is whole and verified
    for k, d in zip(keys, data):
        e = store.peek(NS, k)
        if e is not None:
            assert bytes(store.view(e)) == d
    assert sum(store.peek(NS, k) is not None for k in keys) == len(live) - 1

    # an eviction that fails after freeing its victim's slot: the slot is freed, not lost
    real = store.dram.evict

    def failing(e):
        real(e)
        raise RuntimeError("injected")

    store.dram.evict = failing
    with pytest.raises(RuntimeError):
        store.put_bytes(NS, b"fails", data[1][::-1])
    store.dram.evict = real
    assert arena.used_bytes == used - arena.class_for(100_000).footprint
    assert store.dram._claimed is None and not store.dram._claiming
    assert store.peek(NS, b"fails") is None
    assert store.put_bytes(NS, b"after", data[2][::-1])  # takes the freed slot
    assert arena.used_bytes == used
    store.close()


def test_a_draining_slabs_slot_is_not_handed_over():
    store = make_store(dram=2 * MiB, slab=1 * MiB)
    arena = store.arena
    for i in range(40):
        assert store.put_bytes(NS, f"k{i}".encode(), random.Random(i).randbytes(100_000))
    sc = arena.class_for(100_000)
    victim = store.policy.victim(sc.index, lambda e: True)
    slab = arena.slab_of(victim.offset)
    arena.drain(slab)  # as reclaim_slab does: no more slots handed out from it
    store.dram._draining = slab
    used = arena.used_bytes
    try:
        store.put_bytes(NS, b"new", bytes(100_000))
    except errors.NoSpace:
        pass  # every slot of the class in the draining slab: nothing else to give
    e = store.peek(NS, b"new")
    assert e is None or arena.slab_of(e.offset) is not slab
    assert arena.used_bytes <= used
    store.close()


def test_buffered_put_without_space_waits_then_stores_from_the_buffer():
    store = make_store(dram=2 * MiB, slab=1 * MiB)
    held = []
    for i in range(40):  # fill the class, every object referenced: nothing evictable
        if store.put_bytes(NS, f"k{i}".encode(), random.Random(i).randbytes(100_000)):
            pass
    for i in range(40):
        e = store.peek(NS, f"k{i}".encode())
        if e is not None:
            held.append(store.acquire(NS, f"k{i}".encode()))
    s = DataSession(Plane(store, CORE_OPS), "unit", client="127.0.0.1")
    data = random.Random(99).randbytes(100_000)
    frames = put_frame(1, b"waits", data) + encode_request(OP_PING, 2, b"", b"")
    assert s.feed(frames) == len(frames)  # all of it buffered
    calls = s.take_calls()
    assert len(calls) == 1 and s.waiting is calls[0] and not s.reading
    assert replies(s) == []  # nothing answered ahead of the waiting put

    async def run():
        for e in held:  # space again: the wait ends with a reservation
            store.release(e)
        return await calls[0].fn(*calls[0].args)

    res = asyncio.run(run())
    s.call_done(calls[0], res, None)
    assert replies(s) == [(1, 0, 0), (2, 0, 0)]
    assert bytes(store.view(store.peek(NS, b"waits"))) == data
    assert s.reserved == 0 and not store.reservations and s.reader.buffered() == 0
    store.close()


def test_buffered_puts_of_a_pipelined_read_answer_in_order_with_typed_errors():
    store = make_store()
    s = DataSession(Plane(store, CORE_OPS), "unit", client="127.0.0.1")
    rng = random.Random(7)
    blobs = [rng.randbytes(rng.choice([1, 4096, 30_000])) for _ in range(12)]
    wire = b""
    want = []
    for i, d in enumerate(blobs):
        if i == 3:
            wire += put_frame(i + 1, b"k3", d, csum=checksum(d) ^ 1)
            want.append((i + 1, errors.ChecksumMismatch.code, 0))
        elif i == 5:
            wire += put_frame(i + 1, b"k0", blobs[0])  # same bytes as put 1: deduplicated
            want.append((i + 1, 0, 1))
        elif i == 7:
            wire += put_frame(i + 1, b"k0", d)  # other bytes under k0: a conflict
            want.append((i + 1, errors.Conflict.code, 0))
        else:
            wire += put_frame(i + 1, f"k{i}".encode(), d)
            want.append((i + 1, 0, 0))
    assert s.feed(wire) == len(wire)
    assert replies(s) == want
    for i, d in enumerate(blobs):
        if i not in (3, 5, 7):
            assert bytes(store.view(store.peek(NS, f"k{i}".encode()))) == d
    assert store.peek(NS, b"k3") is None and s.reader.buffered() == 0
    assert not store.reservations and s.reserved == 0
    store.close()
