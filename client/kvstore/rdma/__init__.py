"""RDMA for the SDK and the daemon: verbs behind a narrow interface (``verbs``), the
pyverbs implementation (``ibverbs``), a twin for tests (``twin``), and the client's
channel (``channel``). The daemon imports this package; it never imports the daemon.

Which verbs implementation: ``KVSTORE_RDMA_VERBS`` = ``pyverbs`` (default) or ``twin``
(tests; both sides must use it). Detection is loud: ``open_device`` raises
``verbs.Unsupported`` saying why (no pyverbs, no device, no port up), and a client
that falls back to TCP logs the reason once and counts it in ``fallbacks`` (and in
the ``kvstore_client_transport_fallbacks_total`` Prometheus counter when
prometheus_client is installed).
"""
from __future__ import annotations

import collections
import logging
import os
import threading

from .verbs import Unsupported, VerbsError

log = logging.getLogger("kvstore")

KINDS = ("pyverbs", "twin")
fallbacks: collections.Counter = collections.Counter()  # "rdma->tcp: <reason>" -> count
_logged: set[str] = set()
_lock = threading.Lock()
_prom = None


def verbs_kind(kind: str | None = None) -> str:
    k = kind or os.environ.get("KVSTORE_RDMA_VERBS", "") or "pyverbs"
    if k not in KINDS:
        raise Unsupported(f"unknown verbs implementation {k!r} (one of {', '.join(KINDS)})")
    return k


def open_device(kind: str | None = None, name: str | None = None):
    """A ``verbs.Device``; raises ``Unsupported`` with the reason when RDMA cannot be used."""
    k = verbs_kind(kind)
    if k == "twin":
        from . import twin
        return twin.open_device(name)
    from . import ibverbs
    return ibverbs.open_device(name or os.environ.get("KVSTORE_RDMA_DEVICE") or None)


def probe(kind: str | None = None) -> str:
    """A one-line description of RDMA on this host: "pyverbs mlx5_0" or "unavailable: why"."""
    try:
        k = verbs_kind(kind)
        if k == "twin":
            return "twin (test verbs)"
        from . import ibverbs
        return f"pyverbs {ibverbs.probe(os.environ.get('KVSTORE_RDMA_DEVICE') or None)}"
    except Unsupported as e:
        return f"unavailable: {e}"


def note_fallback(reason: str, frm: str = "rdma", to: str = "tcp", quiet: bool = False) -> None:
    """Count a transport fallback; log it once per reason (never silent, never noisy):
    at INFO when this host simply has no RDMA (``quiet``), else at WARNING."""
    key = f"{frm}->{to}: {reason}"
    with _lock:
        fallbacks[key] += 1
        first = key not in _logged
        _logged.add(key)
    _prom_inc(frm, to, reason)
    if first:
        (log.info if quiet else log.warning)("kvstore: %s not usable (%s); using %s",
                                             frm.upper(), reason, to.upper())


def _prom_inc(frm: str, to: str, reason: str) -> None:
    global _prom
    try:
        if _prom is None:
            from prometheus_client import Counter
            _prom = Counter("kvstore_client_transport_fallbacks",
                            "Data connections that fell back to another transport, by reason",
                            ["from_transport", "to_transport", "reason"])
        _prom.labels(frm, to, _reason_label(reason)).inc()
    except Exception:  # no prometheus_client, or a registry that already has the name
        pass


def _reason_label(reason: str) -> str:
    r = reason.lower()
    for label in ("pyverbs", "kernel", "no rdma device", "port", "daemon", "tls"):
        if label in r:
            return label.replace(" ", "_")
    return "other"


__all__ = ["Unsupported", "VerbsError", "open_device", "probe", "note_fallback", "fallbacks",
           "verbs_kind"]
