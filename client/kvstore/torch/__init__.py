"""kvstore.torch: torch tensors and paged KV-cache blocks in and out of kvstored.

``import kvstore`` never imports torch; ``import kvstore.torch`` does.

Tensors
    ``put_tensor(client, key, t)`` stores the tensor's elements in row-major (C) order,
    nothing else: the object is exactly ``t.numel() * t.element_size()`` bytes, so any
    client can read it. ``get_tensor_into(client, key, t)`` fills ``t`` and requires the
    object to be exactly that size. dtype and shape are the caller's to know (an object
    of the right size but written as another dtype cannot be told apart).

    * A CPU tensor that is contiguous goes straight from / into its own memory (no copy
      in this module). A non-contiguous tensor (a slice, a transpose) is accepted: it
      goes through a staging buffer, one extra copy, and the object still holds its
      elements in row-major order of its shape.
    * A CUDA tensor goes through pinned staging buffers; copies run on a side CUDA
      stream, and batch calls overlap the copy of chunk i+1 with the transfer of chunk i.
    * Bad input (not a tensor, a sparse / quantized tensor, a device other than cpu or
      cuda, mismatched counts, a value over the daemon's ``max_value_size``) raises
      ``kvstore.InvalidArgument`` before any byte moves, so a failed batch stores nothing.

Paged KV blocks
    ``KVLayout.vllm(kv_caches)`` / ``KVLayout.sglang(k_buffers, v_buffers, page_size)``
    describe an engine's paged cache; ``put_blocks(client, layout, keys, block_ids)``
    gathers each block (every layer, K and V) into one contiguous object, and
    ``get_blocks`` scatters objects back into (possibly other) block ids. One object is::

        for layer in 0..L-1:          # the layout's layer order
            K[layer][block]           # block_size x num_kv_heads x head_size, row-major
            V[layer][block]

    i.e. a C array ``[L][2][block_size][num_kv_heads][head_size]`` of the cache dtype,
    ``block_nbytes = L * 2 * block_size * heads * head_size * itemsize`` bytes. vLLM and
    SGLang (page_size = block_size) produce the same bytes for the same geometry, so a
    block written by one can be read by the other. Objects are raw bytes: nothing in
    them names the layout; put ``layout.signature`` into the key chain's ``extra``.

Staging and overlap
    Objects move through staging in chunks (at most ``pool.chunk_bytes``, and at least
    4 chunks when a call has 4 or more blocks) and two slots: while chunk i is on the
    network, chunk i+1 is being packed (put) or chunk i-1 unpacked (get): on a worker
    thread for CPU tensors (block rows are moved with memcpy, which releases the GIL),
    on a side CUDA stream for GPU tensors. A ``StagingPool`` (one per process by
    default, ``default_pool()``) keeps those buffers and hands them out again: after the
    first call of a given shape no further buffer is allocated. It retains at most
    ``max_bytes``; a request it cannot meet within that bound while other callers hold
    its buffers gets a one-off buffer, freed after the call (``stats()["overflows"]``).
    Host buffers are pinned (page-locked) when CUDA is available.

Errors
    Argument errors are raised before any byte moves. A get checks every object of a
    chunk (present, exactly the expected size) before unpacking that chunk, so the
    failing chunk's destinations are untouched, but chunks before it have been
    written: after a failed ``get_blocks`` treat every destination block as undefined.
    A contiguous CPU tensor receives in place: an object too large is refused before
    its bytes arrive, but one too short has filled the tensor's first bytes when the
    size error is raised (an object's size is known only once it arrives).

CUDA (cannot be exercised on a host without a GPU; the tests skip it and say so)
    Copies run on a per-thread side stream that first waits for the caller's current
    stream (so KV written by the model is complete). A put gathers a chunk of blocks on
    the GPU into a device scratch buffer (``torch.stack``) and copies it to pinned
    staging; a get copies a chunk to device scratch and scatters it (``index_copy_``).
    Events mark each chunk; every call waits for its side stream before it returns, so
    results are visible to any stream afterwards.

Same-host shared memory
    When a ``kvstore.Client`` uses the shm data path and offers ``get_view``,
    ``get_blocks`` and staged tensor gets read each object where it lies in the
    daemon's arena (a leased, zero-copy view) instead of receiving it into staging: on
    CPU the scatter copies from the arena straight into the cache; with CUDA the arena
    mapping is registered as pinned memory (``register_host_memory``, once per mapping),
    so the GPU copies straight out of the store. Puts go through ``client.batch_put``
    (one copy from staging into the arena). ``AsyncClient`` has no shm path yet.

Package layout (one job per module): ``staging`` (StagingPool, default_pool),
``streams`` (side CUDA stream, copy threads), ``hostmem`` (byte views and addresses of
host memory), ``register`` (cudaHostRegister of host regions), ``plans`` (the staged
pipeline and its sync / async drivers), ``tensors`` (put / get of tensors), ``layout``
(KVLayout and block gather / scatter), ``blocks`` (put / get of paged KV blocks).
"""
from __future__ import annotations

from .blocks import aget_blocks, aput_blocks, get_blocks, put_blocks
from .hostmem import _buffer_address  # noqa: F401 - used by tests (address of a read-only view)
from .layout import KVLayout
from .register import cuda_available, register_host_memory, unregister_host_memory
from .staging import DEFAULT_CHUNK_BYTES, DEFAULT_STAGING_BYTES, StagingPool, default_pool
from .tensors import (abatch_get_tensors_into, abatch_put_tensors, aget_tensor, aget_tensor_into,
                      aput_tensor, batch_get_tensors_into, batch_put_tensors, get_tensor,
                      get_tensor_into, put_tensor)

__all__ = [
    "DEFAULT_CHUNK_BYTES", "DEFAULT_STAGING_BYTES", "KVLayout", "StagingPool",
    "abatch_get_tensors_into", "abatch_put_tensors", "aget_blocks", "aget_tensor",
    "aget_tensor_into", "aput_blocks", "aput_tensor", "batch_get_tensors_into",
    "batch_put_tensors", "cuda_available", "default_pool", "get_blocks", "get_tensor",
    "get_tensor_into", "put_blocks", "put_tensor", "register_host_memory",
    "unregister_host_memory",
]
