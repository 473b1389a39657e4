"""The control plane's own numbers: typed errors and auth refusals by kind, and the
service time of each gRPC method. Kept here (not on the data server) and read by the
metrics collector and the Stats call."""
from __future__ import annotations

import collections
import logging

from kvstore.errors import KVStoreError

from kvstored.latency import LatencyHistogram

log = logging.getLogger("kvstored.control")


class ControlStats:
    """``counters``: ``control_errors_<type>`` and ``control_auth_rejected_<reason>``
    (the names Stats and /metrics have always shown); ``latency``: method -> histogram."""

    def __init__(self):
        self.counters: collections.Counter = collections.Counter()
        self.latency: dict[str, LatencyHistogram] = {}
        # calls in progress, each from its start (kvstored/control/errors.py), before its
        # request message as gRPC counts it: gRPC refuses those over ``limit``
        # (server.max_control_rpcs) itself, unseen here
        self.running = 0
        self.limit = 0  # server.max_control_rpcs (0: not said)

    def began(self) -> None:
        """A call started: count it, and count and say when the limit is reached."""
        self.running += 1
        if self.running == self.limit:
            self.counters["control_rpc_limit_reached"] += 1
            log.warning("control calls at server.max_control_rpcs (%d): further calls get "
                        "RESOURCE_EXHAUSTED until some finish", self.limit)

    def ended(self) -> None:
        self.running -= 1

    def count_error(self, e: KVStoreError) -> None:
        self.counters["control_errors_" + e.name] += 1

    def count_auth_rejected(self, reason: str) -> None:
        self.counters["control_auth_rejected_" + reason] += 1

    def observe(self, method: str, seconds: float) -> None:
        h = self.latency.get(method)
        if h is None:
            h = self.latency[method] = LatencyHistogram()
        h.observe(seconds)
