"""One kvstored node: wires the Store to the data and control servers and runs them."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time

import grpc

from kvstore.errors import KVStoreError
from kvstored.config import Config
from kvstored.control.service import add_to_server
from kvstored.dataplane.tcp import DataServer
from kvstored.engine import Store

log = logging.getLogger("kvstored")

MAINTENANCE_INTERVAL = 0.5  # seconds between reaping abandoned reservations


class Node:
    def __init__(self, config: Config):
        self.config = config
        self.store = Store(config.engine_limits())
        self.node_id = config.node_id
        self.data_server = DataServer(self.store, max_connections=config.max_connections,
                                      max_inflight_bytes=config.max_inflight_bytes,
                                      tcp_congestion=config.tcp_congestion)
        self.grpc_server: grpc.aio.Server | None = None
        self.control_port = 0
        self.data_port = 0
        self.ready = False
        self.started = time.monotonic()
        self._maintenance: asyncio.Task | None = None

    def uptime(self) -> float:
        return time.monotonic() - self.started

    def count_error(self, e: KVStoreError) -> None:
        self.data_server.counters["control_errors_" + e.name] += 1

    async def start(self) -> None:
        c = self.config
        self.data_port = await self.data_server.start(c.host, c.data_port)
        # room for the largest control-plane value plus the message around it
        msg_limit = c.max_control_value_size + (1 << 20)
        self.grpc_server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", msg_limit),
            ("grpc.max_send_message_length", msg_limit),
            ("grpc.so_reuseport", 0),
        ])
        add_to_server(self.grpc_server, self)
        self.control_port = self.grpc_server.add_insecure_port(f"{c.host}:{c.control_port}")
        if self.control_port == 0:
            raise OSError(f"cannot listen on {c.host}:{c.control_port} for the control plane")
        await self.grpc_server.start()
        if c.control_port == 0 and self.node_id.endswith(":0"):  # default id names the real port
            self.node_id = f"{self.node_id[:-2]}:{self.control_port}"
        self._maintenance = asyncio.get_running_loop().create_task(self._maintain())
        self.ready = True
        log.info("kvstored ready node=%s control=%s:%d data=%s:%d dram=%d hugepages=%s",
                 self.node_id, c.host, self.control_port, c.host, self.data_port,
                 self.store.arena.size, self.store.arena.hugepages)

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(MAINTENANCE_INTERVAL)
            try:
                self.store.reap()
                self.store.maybe_evict()
            except Exception:  # keep maintaining; a bug here must not stop the daemon
                log.exception("maintenance pass failed")

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, let in-flight requests finish (bounded), then close."""
        self.ready = False
        self.data_server.stop_accepting()
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace)
        await self.data_server.drain(grace)
        if self._maintenance is not None:
            self._maintenance.cancel()
        self.store.close()


async def serve(config: Config, ready_file: str | None = None) -> int:
    node = Node(config)
    await node.start()
    if ready_file:
        tmp = ready_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"pid": os.getpid(), "node_id": node.node_id, "host": config.host,
                       "control_port": node.control_port, "data_port": node.data_port}, f)
        os.replace(tmp, ready_file)  # atomic: readers never see half a file
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining in-flight requests")
    await node.stop()
    log.info("stopped")
    return 0
