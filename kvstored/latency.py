"""Latency histograms recorded on the hot path (data sessions, control calls) and read
by the metrics collectors at scrape time: plain bucket counts, no locks (one event loop).
Why not prometheus_client's Histogram: see kvstored/metrics.py's docstring (timings)."""
from __future__ import annotations

from bisect import bisect_left

# Upper bounds (seconds) of the latency buckets: 25 us (a ping, a cache-hot get)
# to 5 s (a put that waited put_wait_timeout for space, a slow reader).
BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3,
           0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_LE = tuple(repr(b) for b in BUCKETS) + ("+Inf",)


class LatencyHistogram:
    """Bucket counts and a sum; ``observe`` is ~0.16 us (see kvstored/metrics.py)."""

    __slots__ = ("counts", "sum")

    def __init__(self):
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound falls in that bucket (Prometheus "le")
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def buckets(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for le, n in zip(_LE, self.counts):
            total += n
            out.append((le, total))
        return out
