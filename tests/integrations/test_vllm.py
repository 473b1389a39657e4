"""vLLM KV connector: interface-conformance tests against vLLM's own code.

vLLM (0.33.0) cannot serve here (it needs CUDA torch and its compiled kernels),
so these tests import its published V1 connector interface with the package
installed ``--no-deps`` (``make engines-env``): ``VllmConfig`` validating the
``kv_connector_module_path``, ``KVConnectorFactory`` building both roles,
``KVConnectorBase_V1`` and the scheduler's data types. The scheduler / model
runner call sequence and the paged KV cache are stand-ins (see vllm_check.py);
what was not run is listed in docs/integrations.md.
"""
from __future__ import annotations

import pytest

from daemonutil import Daemon, start_all
from enginesutil import engine_installed, last_json, run, skip_unless_importable

CHECKS = [
    "factory_builds_both_roles", "chunked_prefill_saves_complete_blocks", "another_instance_loads_the_prefix",
    "local_prefix_hit_is_not_loaded_again", "missing_block_is_a_load_error",
    "keys_depend_on_model_geometry_and_request", "finished_requests_are_forgotten",
    "unreachable_daemon_is_a_miss", "lookup_leases_the_hit_until_loaded", "dead_daemon_costs_a_step_milliseconds",
    "read_only_token_looks_up_without_a_lease",
]
RW, RO = "rw-token-0123456789abcdef", "ro-token-0123456789abcdef"


# an engine's first import in a fresh environment can take tens of seconds on 2 cores
pytestmark = pytest.mark.timeout(600)

@pytest.fixture(scope="module")
def vllm_results(tmp_path_factory):
    py, why = engine_installed("vllm")  # the check's own imports tell whether it imports
    if py is None:
        pytest.skip(why)
    # a daemon with auth: a read-only token may look up but not pin (lease)
    tmp = tmp_path_factory.mktemp("vllm-auth")
    (tmp / "tokens.toml").write_text(
        f'[[token]]\nname = "rw"\ntoken = "{RW}"\nnamespaces = ["vl-ro"]\nscopes = ["read", "write"]\n\n'
        f'[[token]]\nname = "ro"\ntoken = "{RO}"\nnamespaces = ["vl-ro"]\nscopes = ["read"]\n')
    (tmp / "tokens.toml").chmod(0o600)
    (tmp / "auth.toml").write_text(f'[auth]\nenabled = true\ntokens_file = "{tmp / "tokens.toml"}"\n')
    d, victim, secured = start_all(Daemon(tmp_path_factory.mktemp("vllm")),
                                   Daemon(tmp_path_factory.mktemp("vllm-victim")),  # killed by a check
                                   Daemon(tmp, "--config", str(tmp / "auth.toml")))
    try:
        r = run("vllm", py, ["vllm_check.py", "--address", d.control, "--victim-address", victim.control,
                              "--victim-pid", str(victim.proc.pid), "--auth-address", secured.control],
                KVSTORE_TEST_TOKENS=f"{RW},{RO}")
        skip_unless_importable("vllm", r)
        for line in r.stdout.splitlines():
            if "steps, mean" in line:
                print(line)  # the step figures, for the test log (pytest -s)
        return last_json(r), r.stdout[-3000:] + r.stderr[-8000:]
    finally:
        secured.stop()
        victim.stop()
        d.stop()


@pytest.mark.parametrize("name", CHECKS)
def test_vllm_interface_conformance(vllm_results, name):
    results, log = vllm_results
    assert name in results, f"check {name} did not run\n{log}"
    assert results[name] == "ok", f"{results[name]}\n{log}"


def test_vllm_checks_listed(vllm_results):
    assert sorted(vllm_results[0]) == sorted(CHECKS), "a check was added or removed: update the list"
