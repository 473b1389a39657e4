"""The shutdown flush walks the DRAM-only objects in bounded chunks (H9): every object is
written, most-read first, and no chunk holds more than about max(_FLUSH_CHUNK, objects /
_FLUSH_PASSES) entries, even when one read count holds most objects. Real NVMe tier on a
file; no sockets."""
import asyncio

import pytest

from kvstored.engine import Store, StoreLimits, tiering
from kvstored.engine.nvme import NvmeDevice, NvmeTier

MiB = 1 << 20
NS = b"ns"


@pytest.mark.parametrize("index", ["dict", "packed"])
def test_flush_writes_all_most_read_first_in_bounded_chunks(tmp_path, monkeypatch, index):
    if index == "packed":
        pytest.importorskip("kvstored._index")
    monkeypatch.setattr(tiering, "_FLUSH_CHUNK", 16)
    monkeypatch.setattr(tiering, "_FLUSH_PASSES", 4)

    async def run():
        dev = NvmeDevice(str(tmp_path / "f.dat"), MiB + 3 * 16 * MiB, 16 * MiB, "auto", 32)
        s = Store(StoreLimits(dram_size=8 * MiB, slab_size=MiB, max_value_size=MiB,
                              prefault=False, index=index),
                  nvme=NvmeTier(dev, admission="read"))
        try:
            n = 300
            for i in range(n):
                s.put_bytes(NS, b"k%03d" % i, bytes([i % 251]) * 4096)
            for i in range(100):  # 200 objects keep 0 reads: one count over the cap
                s.index.get(NS, b"k%03d" % i).reads = 1 + i % 30
            assert all(e.nvme is None for e in s.index.values())
            sizes, order = [], []
            real_chunk, real_append = s.tiering._flush_chunk, s.nvme.append_batch

            async def chunk(todo, deadline):
                sizes.append(len(todo))
                return await real_chunk(todo, deadline)

            async def append_batch(recs, *a):  # (the flush's batches, in the order issued)
                order.extend(s.index.get(r[0], r[1]).reads for r in recs)
                return await real_append(recs, *a)
            s.tiering._flush_chunk, s.nvme.append_batch = chunk, append_batch
            assert await s.flush_to_nvme(30) == n
            await s.drain_tasks(10)
            assert s.flush_not_kept == 0
            assert all(e.nvme is not None for e in s.index.values())
            assert order == sorted(order, reverse=True)  # most-read first, across chunks
            cap = max(16, -(-n // 4))  # 75
            assert max(sizes) <= 2 * cap and sum(sizes) == n
            assert len(sizes) <= 2 * 4 + 3  # bounded walks, plus the last sweep
        finally:
            s.close()
    asyncio.run(run())


def test_flush_past_its_deadline_walks_no_more_and_counts_what_is_lost(tmp_path, monkeypatch):
    monkeypatch.setattr(tiering, "_FLUSH_CHUNK", 8)
    monkeypatch.setattr(tiering, "_FLUSH_PASSES", 4)

    async def run():
        dev = NvmeDevice(str(tmp_path / "d.dat"), MiB + 3 * 16 * MiB, 16 * MiB, "auto", 32)
        s = Store(StoreLimits(dram_size=8 * MiB, slab_size=MiB, max_value_size=MiB,
                              prefault=False), nvme=NvmeTier(dev, admission="read"))
        try:
            for i in range(40):
                s.put_bytes(NS, b"k%02d" % i, bytes([i]) * 4096)
                s.index.get(NS, b"k%02d" % i).reads = i // 3  # (below 16: the packed index saturates there)
            walks = []
            real = s.tiering._flush_chunk

            async def chunk(todo, deadline):
                walks.append(len(todo))
                if len(walks) == 1:  # the deadline passes while the first chunk is written
                    deadline = asyncio.get_running_loop().time() + 60
                    out = await real(todo, deadline)
                    s.tiering.flush_deadline_passed = True
                    return out
                return await real(todo, deadline)
            s.tiering._flush_chunk = chunk
            real_time = asyncio.get_running_loop().time
            t0 = real_time()
            # the loop's clock jumps past the deadline once the first chunk is written
            asyncio.get_running_loop().time = lambda: real_time() + (
                1000 if getattr(s.tiering, "flush_deadline_passed", False) else 0)
            try:
                written = await s.flush_to_nvme(30)
            finally:
                del asyncio.get_running_loop().time
            assert written == walks[0] == 10 and walks[1:] == [0]  # no further walk
            assert s.flush_not_kept == 40 - written
            assert real_time() - t0 < 30
        finally:
            s.close()
    asyncio.run(run())
