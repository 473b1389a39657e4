"""``KVLayout``: an engine's paged KV cache (vLLM, SGLang, or any planes of blocks) as the
store sees it, and the gather / scatter of blocks between the cache and contiguous
objects (memcpy of block rows on CPU, torch ops on the GPU).
"""
from __future__ import annotations

import ctypes
import math
from typing import Sequence

import torch

from .. import errors
from .hostmem import _buffer_address, _read_tensor
from .tensors import _tensor


class KVLayout:
    """A paged KV cache as the store sees it: ``planes`` of blocks, in object order.

    Plane ``2*l`` is layer l's K, plane ``2*l+1`` its V; each plane is a tensor view
    ``[num_blocks, *block_shape]`` of the engine's own memory (never a copy), and block
    ``b`` of the object is ``cat(plane[b].flatten() for plane in planes)``. All planes
    share dtype, device, block shape and block count (checked when the layout is made).

    Build one with ``KVLayout.vllm(kv_caches)`` or ``KVLayout.sglang(k_buffers,
    v_buffers, page_size)``; ``KVLayout(planes)`` takes any other layout whose blocks
    are indexable along a first dimension.
    """

    def __init__(self, planes: Sequence[torch.Tensor], *, engine: str = "custom", num_layers: int | None = None):
        planes = list(planes)
        if not planes:
            raise errors.InvalidArgument("a KV layout needs at least one layer")
        for i, p in enumerate(planes):
            if not isinstance(p, torch.Tensor):
                raise errors.InvalidArgument(f"plane {i} must be a torch.Tensor, not {type(p).__name__}")
        first = planes[0]
        per = 2 if num_layers is not None else 1
        name = (lambda i: f"layer {i // 2} {'KV'[i % 2]}") if per == 2 else (lambda i: f"plane {i}")
        for i, p in enumerate(planes):
            if p.dtype != first.dtype:
                raise errors.InvalidArgument(f"{name(i)} is {p.dtype} but {name(0)} is {first.dtype}")
            if p.device != first.device:
                raise errors.InvalidArgument(f"{name(i)} is on {p.device} but {name(0)} on {first.device}")
            if p.shape != first.shape:
                raise errors.InvalidArgument(
                    f"{name(i)} has blocks {tuple(p.shape)} but {name(0)} {tuple(first.shape)}")
        if first.dim() < 1 or first.shape[0] == 0:
            raise errors.InvalidArgument("a KV layout needs at least one block")
        _tensor(first, name(0))  # layout and device type
        self.planes = tuple(p.detach() for p in planes)
        self.engine = engine
        self.num_layers = num_layers if num_layers is not None else len(planes)
        self.num_blocks = int(first.shape[0])
        self.block_shape = tuple(int(s) for s in first.shape[1:])
        self.dtype = first.dtype
        self.device = first.device
        self.block_elems = math.prod(self.block_shape)
        self.block_nbytes = len(planes) * self.block_elems * first.element_size()
        if self.block_nbytes == 0:
            raise errors.InvalidArgument("KV blocks of 0 bytes")

    # ---------------------------------------------------------------- constructors
    @classmethod
    def vllm(cls, kv_caches, *, kv_first: bool = True) -> "KVLayout":
        """vLLM's per-layer caches: a list (or a ``{layer name: tensor}`` dict, in order)
        of tensors ``[2, num_blocks, block_size, num_kv_heads, head_size]`` (flash
        attention; ``kv_first=False`` for ``[num_blocks, 2, ...]``, FlashInfer). Block ids
        are vLLM's block table entries. The tensors may be strided views (e.g. an HND
        physical layout): objects are always in the logical [token][head][dim] order."""
        layers = list(kv_caches.values()) if isinstance(kv_caches, dict) else list(kv_caches)
        if not layers:
            raise errors.InvalidArgument("KVLayout.vllm: no layers")
        planes = []
        for i, t in enumerate(layers):
            if not isinstance(t, torch.Tensor):
                raise errors.InvalidArgument(f"layer {i} must be a torch.Tensor, not {type(t).__name__}")
            kv_dim = 0 if kv_first else 1
            if t.dim() != 5 or t.shape[kv_dim] != 2:
                want = "[2, num_blocks, block_size, heads, head_size]" if kv_first else \
                    "[num_blocks, 2, block_size, heads, head_size]"
                raise errors.InvalidArgument(f"layer {i}: shape {tuple(t.shape)} is not {want}")
            k, v = t.unbind(kv_dim)
            planes += [k, v]
        return cls(planes, engine="vllm", num_layers=len(layers))

    @classmethod
    def sglang(cls, k_buffers, v_buffers, page_size: int = 1) -> "KVLayout":
        """SGLang's MHA token pool: per-layer ``k_buffers[l]`` and ``v_buffers[l]`` shaped
        ``[num_tokens, num_kv_heads, head_size]``; block (page) ``p`` is token slots
        ``p*page_size .. (p+1)*page_size-1`` (``page_size``: SGLang's ``--page-size``).
        Trailing slots that do not fill a page are not addressable."""
        ks, vs = list(k_buffers), list(v_buffers)
        if not ks:
            raise errors.InvalidArgument("KVLayout.sglang: no layers")
        if len(ks) != len(vs):
            raise errors.InvalidArgument(f"{len(ks)} K buffers but {len(vs)} V buffers")
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise errors.InvalidArgument(f"page_size must be a positive int, not {page_size!r}")
        planes = []
        for i, (k, v) in enumerate(zip(ks, vs)):
            for name, t in (("K", k), ("V", v)):
                if not isinstance(t, torch.Tensor):
                    raise errors.InvalidArgument(f"layer {i} {name} must be a torch.Tensor, not {type(t).__name__}")
                if t.dim() != 3:
                    raise errors.InvalidArgument(
                        f"layer {i} {name}: shape {tuple(t.shape)} is not [num_tokens, heads, head_size]")
                pages = t.shape[0] // page_size
                if pages == 0:
                    raise errors.InvalidArgument(
                        f"layer {i} {name}: {t.shape[0]} token slots hold no page of {page_size}")
                planes.append(t[:pages * page_size].unflatten(0, (pages, page_size)))
        return cls(planes, engine="sglang", num_layers=len(ks))

    # ---------------------------------------------------------------- description
    @property
    def signature(self) -> bytes:
        """Names the object layout (geometry and dtype, not the engine): mix it into the
        key chain (``kvstore.keys.chain(..., extra=layout.signature)``) so that caches of
        other shapes never share keys."""
        dims = "x".join(str(d) for d in self.block_shape)
        dt = str(self.dtype).replace("torch.", "")
        return f"kvl1/P{len(self.planes)}/{dims}/{dt}".encode()

    def __repr__(self) -> str:
        return (f"KVLayout({self.engine}, layers={self.num_layers}, blocks={self.num_blocks}, "
                f"block_shape={self.block_shape}, dtype={self.dtype}, device={self.device}, "
                f"block_nbytes={self.block_nbytes})")

    # ---------------------------------------------------------------- gather / scatter
    def _typed(self, buf_u8: torch.Tensor, n: int) -> torch.Tensor:
        """``n`` objects back to back in ``buf_u8``, as ``[n, planes, block_elems]``."""
        return buf_u8[:n * self.block_nbytes].view(self.dtype).view(n, len(self.planes), self.block_elems)

    def _flat_planes(self) -> list:
        """Each plane as ``[num_blocks, block_elems]`` when its blocks are contiguous (the
        usual case), else as is."""
        flat = getattr(self, "_flat", None)
        if flat is None:
            flat = []
            for p in self.planes:
                try:
                    flat.append(p.view(p.shape[0], self.block_elems))
                except RuntimeError:  # strided blocks (e.g. an HND view): keep the block shape
                    flat.append(p)
            self._flat = flat
            self._rows_ok = self.device.type == "cpu" and all(f.dim() == 2 for f in flat)
        return flat

    def _rows(self) -> list[tuple[int, int]] | None:
        """CPU layouts whose blocks are contiguous: (address, bytes between blocks) per plane,
        for plain memcpy of each block row; None otherwise."""
        self._flat_planes()
        if not self._rows_ok:
            return None
        item = self.planes[0].element_size()
        return [(f.data_ptr(), f.stride(0) * item) for f in self._flat]

    def _row(self, plane: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        """``src`` (``[..., block_elems]``) shaped like ``plane``'s blocks."""
        return src if plane.dim() == 2 else src.unflatten(-1, self.block_shape)

    def _check_ids(self, block_ids) -> None:
        for b in block_ids:
            if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < self.num_blocks:
                raise errors.InvalidArgument(f"block id {b!r} is not an int in [0, {self.num_blocks})")

    def _check_buffer(self, buf: torch.Tensor, n: int) -> None:
        if not isinstance(buf, torch.Tensor) or buf.dtype != torch.uint8 or buf.dim() != 1 \
                or not buf.is_contiguous() or buf.device != self.device:
            raise errors.InvalidArgument(f"need a contiguous 1-D uint8 tensor on {self.device}")
        if buf.numel() < n * self.block_nbytes:
            raise errors.InvalidArgument(f"{n} blocks need {n * self.block_nbytes} bytes, "
                                         f"the buffer has {buf.numel()}")

    # On CPU, block rows are moved with memcpy (ctypes.memmove, which releases the GIL)
    # rather than torch ops: those split work over intra-op threads, and on a busy host
    # each of their parallel regions waits for a descheduled thread (index_copy_ fell
    # from ~5 GB/s to ~0.1 GB/s on the loaded 2-core dev machine; memcpy stayed ~6 GB/s).

    def gather_into(self, block_ids: Sequence[int], out: torch.Tensor) -> None:
        """Copy blocks (ids already checked) into ``out`` (contiguous uint8 on the layout's
        device, at least ``len(block_ids) * block_nbytes`` bytes) in object layout."""
        n = len(block_ids)
        self._check_ids(block_ids)
        self._check_buffer(out, n)
        rows = self._rows()
        if rows is not None:
            size = self.block_nbytes // len(self.planes)
            o = out.data_ptr()
            for b in block_ids:
                for ptr, stride in rows:
                    _memmove(o, ptr + b * stride, size)
                    o += size
            return
        dst = out[:n * self.block_nbytes].view(self.dtype).view(n * len(self.planes), *self.block_shape)
        torch.stack([p[b] for b in block_ids for p in self.planes], out=dst)

    def scatter_from(self, block_ids: Sequence[int], src: torch.Tensor) -> None:
        """Copy objects laid out back to back in ``src`` (contiguous uint8 on the layout's
        device) into blocks ``block_ids`` (checked, distinct)."""
        n = len(block_ids)
        self._check_ids(block_ids)
        self._check_buffer(src, n)
        rows = self._rows()
        if rows is not None:
            self._scatter_rows(block_ids, [src.data_ptr() + i * self.block_nbytes for i in range(n)], rows)
            return
        typed = self._typed(src, n)
        idx = torch.as_tensor(list(block_ids), dtype=torch.long)
        if self.device.type != "cpu":
            idx = idx.to(self.device, non_blocking=True)
        for j, p in enumerate(self._flat_planes()):
            p.index_copy_(0, idx, self._row(p, typed[:, j]))

    def _scatter_rows(self, block_ids, addresses, rows) -> None:
        size = self.block_nbytes // len(self.planes)
        for b, o in zip(block_ids, addresses):
            for ptr, stride in rows:
                _memmove(ptr + b * stride, o, size)
                o += size

    def scatter_views(self, block_ids: Sequence[int], views: Sequence[memoryview]) -> None:
        """Copy separate objects (byte views of exactly ``block_nbytes``, e.g. leased views of
        the shm arena) into blocks ``block_ids`` of a CPU layout."""
        self._check_ids(block_ids)
        if len(views) != len(block_ids):
            raise errors.InvalidArgument(f"{len(views)} objects for {len(block_ids)} blocks")
        for v in views:
            if v.nbytes != self.block_nbytes:
                raise errors.InvalidArgument(f"object of {v.nbytes} bytes for a {self.block_nbytes}-byte block")
        rows = self._rows()
        if rows is not None:
            self._scatter_rows(block_ids, [_buffer_address(v) for v in views], rows)
            return
        flat = self._flat_planes()
        for b, v in zip(block_ids, views):
            objs = _read_tensor(v).view(self.dtype).view(len(self.planes), self.block_elems)
            for j, p in enumerate(flat):
                p[b].copy_(self._row(p, objs[j]))


_memmove = ctypes.memmove
