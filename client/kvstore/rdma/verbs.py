"""The few verbs the RDMA transport uses, behind one narrow interface.

Two implementations: ``ibverbs.PyverbsDevice`` (rdma-core's pyverbs, real
hardware or soft-RoCE) and ``twin.TwinDevice`` (two processes, a Unix socket
per queue pair, a thread per QP standing in for the NIC). The transport sees
only what is here: a ``Device`` (one protection domain), memory regions, one
completion queue with an fd for the event loop, RC queue pairs brought to RTS
from the peer's ``Endpoint``, and work requests / completions as tuples.

Constants keep libibverbs' values so both implementations speak the same.
"""
from __future__ import annotations

import ctypes
import struct
from typing import NamedTuple, Protocol

# ibv_access_flags
LOCAL_WRITE = 1
REMOTE_WRITE = 2
REMOTE_READ = 4

# ibv_wr_opcode
WR_RDMA_WRITE = 0
WR_RDMA_WRITE_WITH_IMM = 1
WR_SEND = 2
WR_SEND_WITH_IMM = 3
WR_RDMA_READ = 4

# ibv_wc_opcode (send side uses the wr opcode's value; receives are 128+)
WC_RECV = 128

# ibv_wc_status
WC_SUCCESS = 0
WC_LOC_LEN_ERR = 1
WC_LOC_QP_OP_ERR = 2
WC_LOC_PROT_ERR = 4
WC_WR_FLUSH_ERR = 5
WC_REM_INV_REQ_ERR = 9
WC_REM_ACCESS_ERR = 10
WC_REM_OP_ERR = 11
WC_RETRY_EXC_ERR = 12
WC_RNR_RETRY_EXC_ERR = 13
WC_STATUS_NAMES = {
    WC_SUCCESS: "success", WC_LOC_LEN_ERR: "local length error",
    WC_LOC_QP_OP_ERR: "local QP operation error", WC_LOC_PROT_ERR: "local protection error",
    WC_WR_FLUSH_ERR: "flushed (QP in error state)", WC_REM_INV_REQ_ERR: "remote invalid request",
    WC_REM_ACCESS_ERR: "remote access error", WC_REM_OP_ERR: "remote operation error",
    WC_RETRY_EXC_ERR: "transport retry counter exceeded (peer gone)",
    WC_RNR_RETRY_EXC_ERR: "receiver not ready (no receive posted)",
}

# ibv_qp_state
QPS_RESET, QPS_INIT, QPS_RTR, QPS_RTS, QPS_ERR = 0, 1, 2, 3, 6

# ibv_mtu enum <-> bytes
MTU_ENUM = {256: 1, 512: 2, 1024: 3, 2048: 4, 4096: 5}


class VerbsError(Exception):
    """A verbs call failed (registration refused, queue full, bad state)."""


class Unsupported(VerbsError):
    """No RDMA here: the module, a device, or an active port is missing (``str`` says which)."""


class WR(NamedTuple):
    """A send-queue work request: ``length`` bytes at local ``addr`` (``lkey``) and, for RDMA
    READ/WRITE, at the peer's ``remote_addr`` (``rkey``)."""

    wr_id: int
    opcode: int
    addr: int
    length: int
    lkey: int
    remote_addr: int = 0
    rkey: int = 0
    imm: int = 0


class RecvWR(NamedTuple):
    wr_id: int
    addr: int
    length: int
    lkey: int


class WC(NamedTuple):
    wr_id: int
    status: int
    opcode: int
    byte_len: int = 0
    imm: int = 0
    qp_num: int = 0


class MR(NamedTuple):
    addr: int
    length: int
    lkey: int
    rkey: int
    access: int
    handle: object = None  # the implementation's object (kept alive while registered)


# What one side tells the other to connect an RC queue pair (a session message).
ENDPOINT = struct.Struct("<4sIII16sHHII")  # magic, qpn, psn, mtu, gid, lid, port, max_msg, flags
ENDPOINT_MAGIC = b"KVRD"


class Endpoint(NamedTuple):
    qpn: int
    psn: int
    mtu: int  # bytes: 256..4096
    gid: bytes  # 16 bytes (RoCE needs it; IB may leave it zero and use the lid)
    lid: int
    port: int = 1
    max_msg: int = 1 << 30  # the largest message this side accepts in one work request

    def pack(self) -> bytes:
        return ENDPOINT.pack(ENDPOINT_MAGIC, self.qpn, self.psn, self.mtu, self.gid, self.lid,
                             self.port, self.max_msg, 0)

    @classmethod
    def unpack(cls, data: bytes) -> "Endpoint":
        """Parse and validate a peer's endpoint; raises ValueError saying what is wrong."""
        if len(data) != ENDPOINT.size:
            raise ValueError(f"an RDMA endpoint is {ENDPOINT.size} bytes, got {len(data)}")
        magic, qpn, psn, mtu, gid, lid, port, max_msg, _flags = ENDPOINT.unpack(data)
        if magic != ENDPOINT_MAGIC:
            raise ValueError("bad RDMA endpoint magic")
        if not 0 < qpn < 1 << 24:
            raise ValueError(f"QP number {qpn} outside 1..2^24-1")
        if not 0 <= psn < 1 << 24:
            raise ValueError(f"PSN {psn} outside 0..2^24-1")
        if mtu not in MTU_ENUM:
            raise ValueError(f"MTU {mtu} is not one of {sorted(MTU_ENUM)}")
        if gid == bytes(16) and lid == 0:
            raise ValueError("an RDMA endpoint needs a GID or a LID")
        if not 4096 <= max_msg <= 1 << 31:
            raise ValueError(f"max message size {max_msg} outside 4 KiB..2 GiB")
        return cls(qpn, psn, mtu, gid, lid, port, max_msg)


class CQ(Protocol):
    fd: int  # readable when a completion arrived after arm(); for loop.add_reader

    def poll(self, n: int = 64) -> list[WC]: ...
    def arm(self) -> None: ...
    def consume_event(self) -> None: ...
    def close(self) -> None: ...


class QP(Protocol):
    qpn: int
    psn: int
    state: int

    def connect(self, remote: Endpoint) -> None: ...  # RESET -> INIT -> RTR -> RTS
    def post_send(self, wrs: list[WR]) -> None: ...  # one doorbell for the whole list
    def post_recv(self, wrs: list[RecvWR]) -> None: ...
    def to_error(self) -> None: ...  # outstanding WRs complete with WC_WR_FLUSH_ERR
    def close(self) -> None: ...


class Device(Protocol):
    kind: str  # "pyverbs" / "twin"
    name: str
    max_mr_size: int
    max_qp_wr: int
    max_msg: int

    def endpoint(self, qp: QP) -> Endpoint: ...
    def reg_mr(self, buf, access: int) -> MR: ...
    def dereg_mr(self, mr: MR) -> None: ...
    def create_cq(self, depth: int) -> CQ: ...
    def create_qp(self, cq: CQ, max_send_wr: int, max_recv_wr: int = 1) -> QP: ...
    def close(self) -> None: ...


# ------------------------------------------------------------------ addresses

class _PyBuffer(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.py_object), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int),
                ("ndim", ctypes.c_int), ("format", ctypes.c_char_p),
                ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


# Our own handle on the interpreter: ctypes.pythonapi's function objects are shared by the
# whole process, and setting argtypes on them would change them for every other user.
_api = ctypes.PyDLL(None, handle=ctypes.pythonapi._handle)
_get_buffer = _api.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_release_buffer = _api.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_PyBUF_SIMPLE = 0


def buffer_address(buf) -> tuple[int, int, bool]:
    """(address, length, readonly) of a contiguous buffer. The caller keeps ``buf`` alive
    for as long as it uses the address (a registration holds a reference)."""
    pb = _PyBuffer()
    if _get_buffer(buf, ctypes.byref(pb), _PyBUF_SIMPLE) != 0:  # raises for non-contiguous
        raise VerbsError("not a contiguous buffer")
    try:
        return pb.buf or 0, pb.len, bool(pb.readonly)
    finally:
        _release_buffer(ctypes.byref(pb))
