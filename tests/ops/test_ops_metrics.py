"""The Prometheus endpoint of a real kvstored after a short workload: every family, sane values."""
from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import kvstore
from kvstore import errors
from kvstored.metrics import BUCKETS, LatencyHistogram, tier_stats
from opsutil import http_get, put_frame, read_frame, scrape, value

KiB, MiB = 1 << 10, 1 << 20
ROOT = Path(__file__).resolve().parents[2]

# every family the issue asks for -> the metric that carries it
REQUIRED = {
    "operations": "kvstored_operations",
    "bytes": "kvstored_network_bytes",
    "tier bytes": "kvstored_tier_written_bytes",
    "hits per tier": "kvstored_tier_hits",
    "misses per tier": "kvstored_tier_misses",
    "latency per op": "kvstored_request_duration_seconds",
    "capacity per tier": "kvstored_tier_capacity_bytes",
    "use per tier": "kvstored_tier_used_bytes",
    "evictions": "kvstored_tier_evictions",
    "pins": "kvstored_pinned_objects",
    "pin leases": "kvstored_pins",
    "connections": "kvstored_connections",
    "errors by type": "kvstored_errors",
    "checksum failures": "kvstored_checksum_failures",
    "repair progress": "kvstored_repair_pending_objects",
    "process": "process_resident_memory_bytes",
}


@pytest.fixture(scope="module")
def worked(tmp_path_factory):
    """A daemon (64 MiB DRAM, 4 MiB slabs) after a known workload, and what was done."""
    from daemonutil import Daemon

    d = Daemon(tmp_path_factory.mktemp("metrics")).start()
    done = {}
    try:
        # TCP: these tests count data-plane bytes and ops on the TCP port
        with kvstore.Client(d.control, namespace="t", timeout=10.0, shm=False) as c:
            small = [os.urandom(64 * KiB) for _ in range(40)]
            for i, v in enumerate(small):
                assert c.put(f"a{i}", v)
            assert c.put("a0", small[0]) is False  # dedup
            with pytest.raises(errors.Conflict):
                c.put("a1", b"other bytes")
            for i in range(40):
                assert c.get(f"a{i}") == small[i]
            for i in range(5):
                with pytest.raises(errors.NotFound):
                    c.get(f"missing{i}")
            # a payload whose declared checksum is wrong: ChecksumMismatch, nothing stored
            with socket.create_connection(("127.0.0.1", d.data_port), timeout=10) as s:
                s.sendall(put_frame(7, b"bad", b"x" * 1000, csum=12345))
                op, rid, status, _ = read_frame(s)
                assert (op, rid, status) == (1, 7, errors.ChecksumMismatch.code)
            assert c.pin(["a0", "a1"], ttl=60) == 2
            assert c.unpin(["a1"]) == 1
            assert c.delete(["a2"]) == 1
            with pytest.raises(errors.InvalidArgument):
                c.pin(["a0"], ttl=10**9)  # over engine.max_pin_ttl: a control-plane error
            big = os.urandom(4 * MiB)
            for i in range(20):  # 80 MiB into a 64 MiB arena: evictions
                assert c.put(f"b{i}", big[i:] + big[:i])
            c.ping()
            stats = c.stats()
            done["objects"] = stats.tiers[0].objects
            done["metrics"] = scrape(d)  # the client's data connection is still open
        done["curl"] = (subprocess.run(["curl", "-sf", d.metrics_url + "/metrics"],
                                       capture_output=True, text=True, timeout=10).stdout
                        if shutil.which("curl") else None)
        yield d, done
    finally:
        d.stop()


def test_every_family_is_exported(worked):
    _, done = worked
    m = done["metrics"]
    missing = {what: fam for what, fam in REQUIRED.items() if fam not in m}
    assert not missing, missing
    for fam in m:  # our families carry documentation
        if fam.startswith("kvstored_"):
            assert m[fam]["help"], fam


def test_curl_shows_the_families(worked):
    _, done = worked
    if done["curl"] is None:
        pytest.skip("curl is not installed")
    for fam in ("kvstored_operations_total", "kvstored_tier_used_bytes", "kvstored_errors_total",
                "kvstored_request_duration_seconds_bucket", "kvstored_repair_pending_objects"):
        assert fam in done["curl"], fam


def test_operation_counts_and_latency_histograms(worked):
    _, done = worked
    m = done["metrics"]
    puts = 40 + 1 + 1 + 1 + 20  # stored, dedup, conflict, bad checksum, big
    assert value(m, "kvstored_operations", plane="data", op="put") == puts
    assert value(m, "kvstored_operations", plane="data", op="get") == 45
    pings = value(m, "kvstored_operations", plane="data", op="ping")
    assert pings >= 1  # ours, plus the SDK's handshake on each new connection
    assert value(m, "kvstored_operations", plane="control", op="Pin") == 2
    assert value(m, "kvstored_operations", plane="control", op="Stats") >= 0
    fam = m["kvstored_request_duration_seconds"]
    assert fam["type"] == "histogram"
    for op, n in (("put", puts), ("get", 45), ("ping", pings)):
        lab = {"plane": "data", "op": op}
        count = value(m, fam_name := "kvstored_request_duration_seconds",
                      fam_name + "_count", **lab)
        total = value(m, fam_name, fam_name + "_sum", **lab)
        assert count == n
        assert 0 < total / count < 1.0, (op, total / count)  # seconds, not hours
        cumulative = [value(m, fam_name, fam_name + "_bucket", le=le, **lab)
                      for le in [*(_le(b) for b in BUCKETS), "+Inf"]]
        assert cumulative == sorted(cumulative) and cumulative[-1] == n


def _le(b: float) -> str:
    return repr(float(b))


def test_tier_capacity_use_hits_misses_evictions(worked):
    _, done = worked
    m = done["metrics"]
    assert value(m, "kvstored_tier_capacity_bytes", tier="dram") == 64 * MiB
    used = value(m, "kvstored_tier_used_bytes", tier="dram")
    assert 4 * MiB <= used <= 64 * MiB
    assert value(m, "kvstored_tier_objects", tier="dram") == done["objects"]
    assert value(m, "kvstored_objects") == done["objects"]
    assert value(m, "kvstored_tier_hits", tier="dram") == 40
    assert value(m, "kvstored_tier_misses", tier="dram") == 5
    ev = value(m, "kvstored_tier_evictions", tier="dram")
    assert ev >= 4  # 80 MiB of 4 MiB objects into 16 slabs, one holding the small ones
    assert value(m, "kvstored_tier_evicted_bytes", tier="dram") == ev * 4 * MiB
    assert value(m, "kvstored_tier_read_bytes", tier="dram") == 40 * 64 * KiB
    assert value(m, "kvstored_tier_written_bytes", tier="dram") == 40 * 64 * KiB + 20 * 4 * MiB
    assert value(m, "kvstored_checksum_failures", tier="dram") == 1


def test_pins_errors_connections_bytes(worked):
    _, done = worked
    m = done["metrics"]
    assert value(m, "kvstored_pinned_objects") == 1
    assert value(m, "kvstored_pins") == 2
    assert value(m, "kvstored_unpins") == 1
    assert value(m, "kvstored_deletes") == 1
    assert value(m, "kvstored_dedups") == 1
    assert value(m, "kvstored_conflicts") == 1
    assert value(m, "kvstored_errors", plane="data", type="NotFound") == 5
    assert value(m, "kvstored_errors", plane="data", type="Conflict") == 1
    assert value(m, "kvstored_errors", plane="data", type="ChecksumMismatch") == 1
    assert value(m, "kvstored_errors", plane="data", type="NoSpace") == 0
    assert value(m, "kvstored_errors", plane="control", type="InvalidArgument") == 1
    assert value(m, "kvstored_connections", plane="data") == 1  # the client's, still open
    assert value(m, "kvstored_connections_accepted", plane="data") == 2  # + the raw socket
    assert value(m, "kvstored_connections_rejected", plane="data") == 0
    written = 40 * 64 * KiB + 20 * 4 * MiB
    rx = value(m, "kvstored_network_bytes", plane="data", direction="received")
    tx = value(m, "kvstored_network_bytes", plane="data", direction="sent")
    assert written < rx < written * 1.2
    assert 40 * 64 * KiB < tx < 40 * 64 * KiB * 1.2


def test_lifecycle_repair_and_process_families(worked):
    _, done = worked
    m = done["metrics"]
    assert value(m, "kvstored_ready") == 1
    assert value(m, "kvstored_uptime_seconds") > 0
    assert value(m, "kvstored_config_reloads", result="ok") == 0
    assert value(m, "kvstored_repair_pending_objects") == 0
    assert value(m, "kvstored_repair_objects") == 0
    assert value(m, "kvstored_repair_unverified_objects") == 0  # standalone: nothing held back
    assert "repair" in m["kvstored_repair_pending_objects"]["help"]
    info = m["kvstored_build_info"]["samples"]
    assert len(info) == 1 and list(info.values()) == [1.0]
    assert value(m, "process_resident_memory_bytes") > 10 * MiB
    assert value(m, "process_open_fds") > 3


def test_health_endpoints_gzip_and_404(worked):
    d, _ = worked
    assert http_get(d.metrics_url + "/healthz")[::2] == (200, b"live\n")
    assert http_get(d.metrics_url + "/readyz")[::2] == (200, b"ready: serving\n")
    status, headers, body = http_get(d.metrics_url + "/metrics",
                                     headers={"Accept-Encoding": "gzip"})
    assert status == 200 and headers.get("Content-Encoding") == "gzip"
    assert b"kvstored_tier_used_bytes" in gzip.decompress(body)
    status, headers, _ = http_get(d.metrics_url + "/metrics",
                                  headers={"Accept": "application/openmetrics-text"})
    assert status == 200 and headers["Content-Type"].startswith("application/openmetrics-text")
    assert http_get(d.metrics_url + "/nope")[0] == 404


def test_dashboard_queries_only_exported_metrics(worked):
    """Every metric the Grafana dashboard queries exists on a running daemon."""
    _, done = worked
    dash = json.loads((ROOT / "docker" / "grafana-dashboard.json").read_text())
    exported = {name for fam in done["metrics"].values() for (name, _) in fam["samples"]}
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15
    used = {n for e in exprs for n in re.findall(r"\b((?:kvstored|process)_[a-z_]+)\b", e)}
    assert used and not (used - exported), sorted(used - exported)


def test_metrics_can_be_disabled(start_daemon, tmp_path):
    cfg = tmp_path / "off.toml"
    cfg.write_text("[metrics]\nenabled = false\n")
    d = start_daemon("--config", str(cfg))
    assert d.info["metrics_port"] is None
    with kvstore.Client(d.control, namespace="t", shm=False) as c:
        assert c.health().ready


def test_metrics_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "client"), str(ROOT)]))
        r = subprocess.run([sys.executable, "-m", "kvstored", "--port", "0", "--data-port", "0",
                            "--dram-size", "64MiB", "--slab-size", "4MiB", "--max-value-size",
                            "4MiB", "--metrics-port", str(port)],
                           capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 2, r.stderr
    assert "for metrics" in r.stderr and "metrics.port" in r.stderr, r.stderr


# ---------------------------------------------------------------- units (no daemon)

def test_latency_histogram_buckets_are_prometheus_le():
    h = LatencyHistogram()
    for v in (BUCKETS[0], BUCKETS[0] * 1.01, 100.0):
        h.observe(v)
    b = dict(h.buckets())
    assert b[repr(BUCKETS[0])] == 1  # a value equal to a bound is in that bucket
    assert b[repr(BUCKETS[1])] == 2
    assert b["+Inf"] == 3 and h.count == 3


def test_tier_stats_iterates_tiers_the_engine_reports():
    class Store:
        def tier_stats(self):
            return [{"name": "dram", "capacity": 10, "used": 4, "objects": 2, "hits": 1},
                    {"name": "nvme", "capacity": 100, "used": 50, "objects": 7,
                     "bytes_read": 3, "bytes_written": 9, "objects_dropped": 5}]

    t = tier_stats(Store(), {"get_bytes": 11, "put_bytes": 12})
    assert t["dram"]["capacity_bytes"] == 10 and t["dram"]["read_bytes"] == 11
    assert t["nvme"] == {"name": "nvme", "capacity_bytes": 100, "used_bytes": 50, "objects": 7,
                         "read_bytes": 3, "written_bytes": 9, "objects_dropped": 5,
                         "evictions": 5}
    fallback = tier_stats(object(), {"dram_capacity": 8, "dram_used": 1, "objects": 1})
    assert list(fallback) == ["dram"] and fallback["dram"]["capacity_bytes"] == 8
