"""The verbs interface over rdma-core's pyverbs (real NICs and soft-RoCE).

Imported only when RDMA is asked for. Nothing here has run on RDMA hardware
yet (see docs/architecture.md, "RDMA data path"): the transport above it is
tested over the twin, and this layer's tests skip where no device exists.
"""
from __future__ import annotations

import os

from .verbs import (LOCAL_WRITE, MR, MTU_ENUM, QPS_ERR, QPS_RESET, QPS_RTS, REMOTE_READ,
                    REMOTE_WRITE, WC, Endpoint, RecvWR, Unsupported, VerbsError, buffer_address)
from .verbs import WR as _WR

_MTU_BYTES = {v: k for k, v in MTU_ENUM.items()}
_PORT_ACTIVE = 4  # IBV_PORT_ACTIVE


def _pyverbs():
    # importing pyverbs (rdma-core 44) calls logging.basicConfig(level=INFO) on the root
    # logger: every INFO line of the host process would start appearing on its stderr. The
    # SDK lives in other people's processes, so put the root logger back as it was.
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        import pyverbs.device as d
        import pyverbs.enums as e
        from pyverbs import addr, cq, mr, pd, qp, wr
    except ImportError as err:
        raise Unsupported(f"pyverbs is not installed ({err}); install rdma-core's python3-pyverbs") from None
    finally:
        for h in root.handlers[:]:
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)
    return d, e, addr, cq, mr, pd, qp, wr


def probe(name: str | None = None) -> str:
    """The name of a device with an active port, or raise Unsupported saying why not."""
    d = _pyverbs()[0]
    try:
        devs = d.get_device_list()
    except Exception as err:  # a kernel without RDMA support raises instead of returning []
        raise Unsupported(f"no RDMA support in this kernel ({err})") from None
    if not devs:
        raise Unsupported("no RDMA device (ibv_devices lists none)")
    names = [x.name.decode() if isinstance(x.name, bytes) else str(x.name) for x in devs]
    if name and name not in names:
        raise Unsupported(f"RDMA device {name!r} not found (have: {', '.join(names)})")
    down = []
    for n in ([name] if name else names):
        try:
            with d.Context(name=n) as ctx:
                if ctx.query_port(1).state == _PORT_ACTIVE:
                    return n
        except Exception as err:
            down.append(f"{n}: {err}")
            continue
        down.append(f"{n}: port 1 not active")
    raise Unsupported("no RDMA port is up (" + "; ".join(down) + ")")


class PyverbsCQ:
    def __init__(self, dev: "PyverbsDevice", depth: int):
        _, _, _, cq, *_ = dev.mod
        self.channel = cq.CompChannel(dev.ctx)
        self.cq = cq.CQ(dev.ctx, depth, None, self.channel, 0)
        self.fd = self.channel.fd
        os.set_blocking(self.fd, False)  # read only when the loop says it is readable

    def poll(self, n: int = 64) -> list[WC]:
        _, wcs = self.cq.poll(n)
        return [WC(w.wr_id, w.status, w.opcode, w.byte_len, w.imm_data, w.qp_num) for w in wcs]

    def arm(self) -> None:
        self.cq.req_notify()

    def consume_event(self) -> None:
        try:
            self.channel.get_cq_event(self.cq)
        except Exception:  # no event pending (non-blocking fd)
            return
        self.cq.ack_events(1)

    def close(self) -> None:
        self.cq.close()
        self.channel.close()


class PyverbsQP:
    def __init__(self, dev: "PyverbsDevice", cq: PyverbsCQ, max_send_wr: int, max_recv_wr: int):
        d, e, addr, _, _, _, qp, _ = dev.mod
        self.dev, self.e = dev, e
        cap = qp.QPCap(max_send_wr=max_send_wr, max_recv_wr=max_recv_wr, max_send_sge=1,
                       max_recv_sge=1)
        init = qp.QPInitAttr(qp_type=e.IBV_QPT_RC, scq=cq.cq, rcq=cq.cq, cap=cap, sq_sig_all=1)
        self.qp = qp.QP(dev.pd, init)
        self.qpn = self.qp.qp_num
        self.psn = int.from_bytes(os.urandom(3), "little")
        self.state = QPS_RESET

    def connect(self, remote: Endpoint) -> None:
        d, e, addr, _, _, _, qp, _ = self.dev.mod
        attr = qp.QPAttr(port_num=self.dev.port, path_mtu=MTU_ENUM[min(remote.mtu, self.dev.mtu)])
        attr.qp_access_flags = LOCAL_WRITE | REMOTE_WRITE | REMOTE_READ
        attr.dest_qp_num = remote.qpn
        attr.rq_psn = remote.psn
        attr.sq_psn = self.psn
        attr.max_dest_rd_atomic = 16
        attr.max_rd_atomic = 16
        attr.min_rnr_timer = 12
        attr.timeout = 14
        attr.retry_cnt = 7
        attr.rnr_retry = 7
        if remote.gid != bytes(16):  # RoCE (and routed IB): a global route to the peer's GID
            gid = addr.GID(":".join(remote.gid[i:i + 2].hex() for i in range(0, 16, 2)))
            gr = addr.GlobalRoute(dgid=gid, sgid_index=self.dev.gid_index)
            attr.ah_attr = addr.AHAttr(port_num=self.dev.port, is_global=1, gr=gr,
                                       dlid=remote.lid)
        else:
            attr.ah_attr = addr.AHAttr(port_num=self.dev.port, is_global=0, dlid=remote.lid)
        try:
            self.qp.to_rts(attr)
        except Exception as err:
            raise VerbsError(f"cannot bring the QP to RTS: {err}") from None
        self.state = QPS_RTS

    def post_send(self, wrs: list[_WR]) -> None:
        _, e, _, _, _, _, _, wr = self.dev.mod
        head = prev = None
        for w in wrs:  # one linked list: one doorbell
            sge = wr.SGE(w.addr, w.length, w.lkey)
            s = wr.SendWR(wr_id=w.wr_id, opcode=w.opcode, num_sge=1, sg=[sge], imm_data=w.imm)
            if w.rkey:
                s.set_wr_rdma(w.rkey, w.remote_addr)
            if prev is None:
                head = s
            else:
                prev.next_wr = s
            prev = s
        if head is None:
            return
        try:
            self.qp.post_send(head)
        except Exception as err:
            raise VerbsError(f"post_send failed: {err}") from None

    def post_recv(self, wrs: list[RecvWR]) -> None:
        wr = self.dev.mod[7]
        for r in wrs:
            self.qp.post_recv(wr.RecvWR(r.wr_id, 1, [wr.SGE(r.addr, r.length, r.lkey)]))

    def to_error(self) -> None:
        qp = self.dev.mod[6]
        attr = qp.QPAttr()
        attr.qp_state = self.e.IBV_QPS_ERR
        try:
            self.qp.modify(attr, self.e.IBV_QP_STATE)
        except Exception:
            pass
        self.state = QPS_ERR

    def close(self) -> None:
        self.qp.close()


class PyverbsDevice:
    kind = "pyverbs"

    def __init__(self, name: str | None = None, port: int = 1, gid_index: int | None = None):
        self.mod = _pyverbs()
        d, e, addr, cq, mr, pd, qp, wr = self.mod
        self.name = probe(name)
        self.port = port
        self.ctx = d.Context(name=self.name)
        self.pd = pd.PD(self.ctx)
        attr = self.ctx.query_device()
        pattr = self.ctx.query_port(port)
        self.max_mr_size = int(attr.max_mr_size)
        self.max_qp_wr = int(attr.max_qp_wr)
        self.max_msg = min(int(pattr.max_msg_sz), 1 << 31)
        self.mtu = _MTU_BYTES.get(int(pattr.active_mtu), 1024)
        self.lid = int(pattr.lid)
        # RoCE v2 puts the IPv4-mapped address at index 1 or 3; KVSTORE_RDMA_GID_INDEX overrides
        self.gid_index = gid_index if gid_index is not None else int(
            os.environ.get("KVSTORE_RDMA_GID_INDEX", "0"))
        raw = self.ctx.query_gid(port, self.gid_index).gid  # "fe80:0000:...": 8 groups
        self.gid = bytes.fromhex(raw.replace(":", "")) if raw else bytes(16)

    def endpoint(self, qp: PyverbsQP) -> Endpoint:
        return Endpoint(qp.qpn, qp.psn, self.mtu, self.gid, self.lid, self.port, self.max_msg)

    def reg_mr(self, buf, access: int) -> MR:
        addr, length, readonly = buffer_address(buf)
        if readonly and access & (LOCAL_WRITE | REMOTE_WRITE):
            raise VerbsError("a read-only buffer cannot be registered for writing")
        try:
            m = self.mod[4].MR(self.pd, length, access, address=addr)
        except Exception as err:
            raise VerbsError(f"ibv_reg_mr of {length} bytes failed: {err}") from None
        return MR(addr, length, m.lkey, m.rkey, access, (m, buf))

    def reg_gpu(self, ptr: int, length: int, access: int, dmabuf_fd: int | None = None,
                offset: int = 0) -> MR:
        """GPU memory: dma-buf (``ibv_reg_dmabuf_mr``) when the driver exports one, else the
        CUDA pointer through peer memory (nvidia-peermem). Never run on hardware yet."""
        mr = self.mod[4]
        if dmabuf_fd is not None:
            try:
                m = mr.DmaBufMR(self.pd, length, access, dmabuf=dmabuf_fd, offset=offset)
                return MR(ptr, length, m.lkey, m.rkey, access, m)
            except Exception:
                pass  # fall back to peer memory
        try:
            m = mr.MR(self.pd, length, access, address=ptr)
        except Exception as err:
            raise VerbsError(f"cannot register GPU memory (no dma-buf, no peer memory): {err}") from None
        return MR(ptr, length, m.lkey, m.rkey, access, m)

    def dereg_mr(self, mr: MR) -> None:
        m = mr.handle[0] if isinstance(mr.handle, tuple) else mr.handle
        m.close()

    def create_cq(self, depth: int) -> PyverbsCQ:
        return PyverbsCQ(self, depth)

    def create_qp(self, cq: PyverbsCQ, max_send_wr: int, max_recv_wr: int = 1) -> PyverbsQP:
        return PyverbsQP(self, cq, max_send_wr, max_recv_wr)

    def close(self) -> None:
        self.pd.close()
        self.ctx.close()


def open_device(name: str | None = None) -> PyverbsDevice:
    return PyverbsDevice(name)
