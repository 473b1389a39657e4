"""What operators read: README's "Exported metrics" list is exactly what /metrics exports, and
the prefix-hit, namespace, size, pin and transport families count what a workload did."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import kvstore
from kvstored.metrics import MAX_NAMESPACE_LABELS
from opsutil import scrape, value

KiB = 1 << 10
ROOT = Path(__file__).resolve().parents[2]
SECTION = "## Exported metrics"


def readme_list() -> dict[str, str]:
    """``{PromQL name: its line}`` of the README section's list items."""
    text = (ROOT / "README.md").read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    out = {}
    for line in text[start:end if end >= 0 else None].splitlines():
        m = re.match(r"- `(kvstored_[a-z0-9_]+)`", line)
        if m:
            assert m.group(1) not in out, f"{m.group(1)} listed twice"
            out[m.group(1)] = line
    return out


def exported(metrics: dict) -> set[str]:
    return {name + ("_total" if fam["type"] == "counter" else "")
            for name, fam in metrics.items() if name.startswith("kvstored_")}


@pytest.fixture(scope="module")
def worked(tmp_path_factory):
    """A daemon with KV events on, after a workload whose counts are known."""
    from daemonutil import Daemon

    tmp = tmp_path_factory.mktemp("oplist")
    d = Daemon(tmp, "--kv-events", "ipc://" + str(tmp / "events")).start()
    try:
        with kvstore.Client(d.control, namespace="a", timeout=10.0, shm=False) as c:
            for i in range(10):
                assert c.put(f"k{i}", bytes([i]) * (64 * KiB))
            assert c.put("small", b"s" * 100)
            assert c.lookup([f"k{i}" for i in range(5)] + ["nope", "k6"]) == 5
            assert c.lookup(["nope"]) == 0
            assert c.lookup(["k0", "k1"], namespace="b") == 0
            assert c.pin(["k0", "k1"], ttl=60) == 2
            assert c.delete(["k9"]) == 1
            for i in range(MAX_NAMESPACE_LABELS + 6):  # more namespaces than labels
                assert c.put("x", b"x" * 10, namespace=f"n{i}")
        with kvstore.Client(d.control, namespace="a", timeout=10.0, shm=True) as c:
            assert c.get("k3") == bytes([3]) * (64 * KiB)
        yield d, scrape(d)
    finally:
        d.stop()


def test_readme_lists_exactly_what_is_exported(worked):
    _, m = worked
    listed = readme_list()
    have = exported(m)
    optional = {n for n, line in listed.items() if "only with" in line}
    assert not have - set(listed), f"exported but not in README's {SECTION!r}: {sorted(have - set(listed))}"
    assert not set(listed) - have - optional, \
        f"in README but not exported: {sorted(set(listed) - have - optional)}"
    assert len(listed) >= 60


def test_readme_names_each_familys_labels(worked):
    """The "(plane, op)" after each listed name is the family's label set, exactly (a
    family with none lists none), so a PromQL written from the README selects something."""
    _, m = worked
    listed = readme_list()
    compared = 0
    for family, fam in m.items():
        name = family + ("_total" if fam["type"] == "counter" else "")
        if name not in listed or not fam["samples"]:  # a labelled family with no child yet
            continue
        got = {k for (_, labels) in fam["samples"] for k, _ in labels} - {"le"}
        paren = re.match(r"- `[a-z0-9_]+`(?: \(([^)]*)\))?", listed[name]).group(1)
        want = {x.strip() for x in paren.split(",")} if paren else set()
        assert got == want, f"{name}: README lists labels {sorted(want)}, exported {sorted(got)}"
        compared += 1
    assert compared >= 60, compared


def test_prefix_hits_and_lookups_by_namespace(worked):
    _, m = worked
    assert value(m, "kvstored_lookups", namespace="a") == 2
    assert value(m, "kvstored_lookup_blocks", namespace="a") == 8
    assert value(m, "kvstored_prefix_hit_blocks", namespace="a") == 5
    assert value(m, "kvstored_prefix_hit_bytes", namespace="a") == 5 * 64 * KiB
    # a namespace that holds nothing still counts its lookups (a 0 % hit ratio)
    assert value(m, "kvstored_lookups", namespace="b") == 1
    assert value(m, "kvstored_prefix_hit_blocks", namespace="b") == 0


def test_objects_and_bytes_by_namespace_with_a_cap(worked):
    _, m = worked
    assert value(m, "kvstored_namespace_objects", namespace="a") == 10  # 11 put, 1 deleted
    assert value(m, "kvstored_namespace_bytes", namespace="a") == 9 * 64 * KiB + 100
    labels = {dict(k[1])["namespace"] for k in m["kvstored_namespace_objects"]["samples"]}
    assert len(labels) == MAX_NAMESPACE_LABELS + 1 and "other" in labels  # 64 named + other
    named = len(labels - {"a", "b", "other"})
    assert value(m, "kvstored_namespace_objects", namespace="other") == \
        MAX_NAMESPACE_LABELS + 6 - named
    total = sum(m["kvstored_namespace_objects"]["samples"].values())
    assert total == value(m, "kvstored_objects")


def test_object_sizes_pins_and_transports(worked):
    _, m = worked
    h = "kvstored_object_size_bytes"
    puts = 11 + MAX_NAMESPACE_LABELS + 6
    assert value(m, h, h + "_count") == puts
    assert value(m, h, h + "_sum") == 10 * 64 * KiB + 100 + (MAX_NAMESPACE_LABELS + 6) * 10
    assert value(m, h, h + "_bucket", le="4096.0") == puts - 10
    assert value(m, h, h + "_bucket", le="65536.0") == puts
    assert value(m, "kvstored_pinned_bytes") == 2 * 64 * KiB
    assert value(m, "kvstored_data_operations", transport="tcp", op="put") == puts
    assert value(m, "kvstored_data_operations", transport="shm", op="shm_get") == 1
    assert value(m, "kvstored_data_operations", transport="tcp", op="put") == \
        value(m, "kvstored_operations", plane="data", op="put")


def test_events_counted(worked):
    _, m = worked
    # AllBlocksCleared at start, every stored object, the delete; nobody subscribed
    assert value(m, "kvstored_kv_events_published") == 1 + 11 + MAX_NAMESPACE_LABELS + 6 + 1
    assert value(m, "kvstored_kv_events_dropped") == 0


def test_dashboard_nvme_and_prefix_panels_find_their_series(worked, start_daemon, tmp_path):
    """The dashboard's tier="nvme" queries name series an NVMe node exports, and its
    per-namespace queries series a node with lookups exports."""
    import json

    dash = json.loads((ROOT / "docker" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    titles = {p["title"] for p in dash["panels"]}
    assert {"Prefix hit ratio", "NVMe used / capacity", "Auth rejections/s by reason",
            "TLS handshake failures/s by reason"} <= titles
    d = start_daemon("--nvme-path", str(tmp_path / "nvme"), "--nvme-size", "64MiB",
                     "--nvme-region-size", "16MiB")
    nvme = scrape(d)
    wanted = {n for e in exprs for n in re.findall(r'\b(kvstored_[a-z_]+)\{[^}]*tier="nvme"', e)}
    assert wanted
    for sample in wanted:
        fam = nvme[max((name for name in nvme if sample.startswith(name)), key=len)]
        assert (sample, "nvme") in {(n, dict(lab).get("tier")) for n, lab in fam["samples"]}, sample
    _, m = worked
    have = {n for fam in m.values() for (n, _) in fam["samples"]}
    used = {n for e in exprs for n in re.findall(r"\b(kvstored_[a-z_]+)\b", e)}
    assert not used - have, sorted(used - have)
