"""The control plane's own numbers: typed errors and auth refusals by kind, and the
service time of each gRPC method. Kept here (not on the data server) and read by the
metrics collector and the Stats call."""
from __future__ import annotations

import collections

from kvstore.errors import KVStoreError

from kvstored.latency import LatencyHistogram


class ControlStats:
    """``counters``: ``control_errors_<type>`` and ``control_auth_rejected_<reason>``
    (the names Stats and /metrics have always shown); ``latency``: method -> histogram."""

    def __init__(self):
        self.counters: collections.Counter = collections.Counter()
        self.latency: dict[str, LatencyHistogram] = {}
        self.running = 0  # calls in progress (gRPC refuses those over server.max_control_rpcs)

    def count_error(self, e: KVStoreError) -> None:
        self.counters["control_errors_" + e.name] += 1

    def count_auth_rejected(self, reason: str) -> None:
        self.counters["control_auth_rejected_" + reason] += 1

    def observe(self, method: str, seconds: float) -> None:
        h = self.latency.get(method)
        if h is None:
            h = self.latency[method] = LatencyHistogram()
        h.observe(seconds)
