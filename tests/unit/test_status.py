"""NodeStatus and ControlStats: what the planes, membership and /readyz read instead of
the node (no sockets, no daemon)."""
from __future__ import annotations

from types import SimpleNamespace

from kvstore import errors

from kvstored.control.stats import ControlStats
from kvstored.status import NodeStatus


def test_health_status_is_degraded_only_while_serving_without_membership():
    st = NodeStatus("n1:7070", "127.0.0.1")
    lost = [False]
    st.degraded = lambda: lost[0]
    assert (st.state, st.ready, st.health_status()) == ("starting", False, "starting")
    st.state, st.ready = "serving", True
    assert st.health_status() == "serving"
    lost[0] = True
    assert st.health_status() == "degraded"
    st.state = "draining"  # draining wins over degraded
    assert st.health_status() == "draining"
    assert st.uptime() >= 0


def test_readiness_reports_the_prefault_while_warming():
    arena = SimpleNamespace(prefaulted=48 << 20, size=64 << 20)
    st = NodeStatus("n1", "127.0.0.1", arena=arena)
    st.state = "warming"
    assert st.readiness() == "warming (arena prefaulted 48 of 64 MiB)"
    st.state = "serving"
    assert st.readiness() == "serving"
    assert NodeStatus("n2", "h").readiness() == "starting"  # no arena: the state alone


def test_control_stats_keep_the_names_stats_and_metrics_show():
    cs = ControlStats()
    cs.count_error(errors.NotFound("x"))
    cs.count_error(errors.NotFound("y"))
    cs.count_auth_rejected("scope")
    for s in (1e-5, 2e-3, 2e-3):
        cs.observe("Lookup", s)
    assert cs.counters == {"control_errors_NotFound": 2, "control_auth_rejected_scope": 1}
    h = cs.latency["Lookup"]
    assert h.count == 3 and abs(h.sum - 0.00401) < 1e-12
    assert h.buckets()[-1] == ("+Inf", 3)
