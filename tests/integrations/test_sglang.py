"""SGLang HiCache storage backend: interface-conformance tests against SGLang's own code.

SGLang (0.5.23) cannot run here (it needs CUDA torch and GPU kernels), so these
tests import its published interface with the package installed ``--no-deps``
(``make engines-env``): the ``HiCacheStorage`` ABC, its config dataclasses, and
the ``StorageBackendFactory`` that ``--hicache-storage-backend dynamic`` uses to
load us. The host memory pool is a stand-in with SGLang's page layouts (see
sglang_check.py); what was not run is listed in docs/integrations.md.
"""
from __future__ import annotations

import pytest

from daemonutil import Daemon, start_all
from enginesutil import engine_installed, last_json, run, skip_unless_importable

CHECKS = [
    "factory_loads_dynamic_backend", "v1_roundtrip_page_first", "v1_roundtrip_layer_first",
    "exists_is_a_prefix_of_whole_pages", "get_v1_reports_each_page", "set_v1_skips_stored_pages",
    "shards_and_models_are_separate", "mla_pages_are_shared_and_written_once", "per_key_interface",
    "unreachable_daemon", "clear_empties_the_namespace", "tensor_views_keep_their_tensor",
    "dead_daemon_costs_a_step_milliseconds",
]


# an engine's first import in a fresh environment can take tens of seconds on 2 cores
pytestmark = pytest.mark.timeout(600)

@pytest.fixture(scope="module")
def sglang_results(tmp_path_factory):
    py, why = engine_installed("sglang")  # the check's own imports tell whether it imports
    if py is None:
        pytest.skip(why)
    d, victim = start_all(Daemon(tmp_path_factory.mktemp("sglang")),
                          Daemon(tmp_path_factory.mktemp("sglang-victim")))  # victim: killed by a check
    try:
        r = run("sglang", py, ["sglang_check.py", "--address", d.control, "--victim-address", victim.control,
                              "--victim-pid", str(victim.proc.pid)])
        skip_unless_importable("sglang", r)
        for line in r.stdout.splitlines():
            if "steps, mean" in line:
                print(line)  # the step figures, for the test log (pytest -s)
        return last_json(r), r.stdout[-3000:] + r.stderr[-8000:]
    finally:
        victim.stop()
        d.stop()


@pytest.mark.parametrize("name", CHECKS)
def test_sglang_interface_conformance(sglang_results, name):
    results, log = sglang_results
    assert name in results, f"check {name} did not run\n{log}"
    assert results[name] == "ok", f"{results[name]}\n{log}"


def test_sglang_checks_listed(sglang_results):
    assert sorted(sglang_results[0]) == sorted(CHECKS), "a check was added or removed: update the list"
