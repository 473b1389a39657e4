"""Who this node is, where it listens and how far it has got.

The node writes it (ports once bound, the life-cycle state); the control plane
(Info, Health, Members), membership (what the node registers about itself) and
the metrics endpoint (/readyz, kvstored_ready, uptime) read it. They get this
object, not the node, so none of them imports ``kvstored.node``.
"""
from __future__ import annotations

import time
from typing import Any, Callable


class NodeStatus:
    """States: starting -> warming (listening, arena still prefaulting) -> serving ->
    draining -> stopped; ``ready`` only while serving."""

    def __init__(self, node_id: str, host: str, arena: Any = None):
        self.node_id = node_id
        self.host = host
        self.control_port = 0
        self.data_port = 0
        self.shm_path = ""
        self.state = "starting"
        self.ready = False
        self.started = time.monotonic()
        self.arena = arena  # the DRAM arena, whose prefault progress "warming" reports
        # True while serving without cluster membership (etcd unreachable); set by the
        # node when it joins a cluster
        self.degraded: Callable[[], bool] = lambda: False

    def uptime(self) -> float:
        return time.monotonic() - self.started

    def health_status(self) -> str:
        """Health/readyz status: the state, or "degraded" while serving without cluster
        membership (local data is still served, ready stays true)."""
        if self.state == "serving" and self.degraded():
            return "degraded"
        return self.state

    def readiness(self) -> str:
        """The state, with the prefault's progress while warming (for /readyz and logs)."""
        if self.state != "warming" or self.arena is None:
            return self.state
        a = self.arena
        return f"warming (arena prefaulted {a.prefaulted >> 20} of {a.size >> 20} MiB)"
