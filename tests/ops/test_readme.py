"""The README tells the truth: its Python snippets run as written against a real daemon,
and its flag list and configuration table agree with `kvstored --help` and
`kvstored --print-config` (names, flags and defaults)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib

import pytest

from daemonutil import ROOT
from kvstored.config import _FLAG_FIELDS, SETTINGS, build_arg_parser

README = (ROOT / "README.md").read_text()

# Snippets not run here, each with the reason and where the same calls are tested. Any
# other ```python block must run: a new snippet cannot go unexecuted by accident.
NOT_RUN = {
    "import torch, kvstore, kvstore.torch as kt":
        "needs CUDA and an engine's kv_caches (tests/client/test_torch.py runs these calls on CPU)",
    "tls = kvstore.TLSConfig(":
        "needs certificates and a token file (tests/security)",
    "from kvstore.cluster import ClusterClient":
        "needs etcd and several nodes (tests/cluster/test_cluster_client.py)",
}
ADDRESS = "127.0.0.1:7070"  # what the snippets dial; replaced by the test daemon's address


def _python_blocks() -> list[tuple[int, str]]:
    out = []
    for m in re.finditer(r"^```python\n(.*?)^```", README, re.S | re.M):
        out.append((README.count("\n", 0, m.start()) + 2, m.group(1)))
    return out


def _to_run() -> list[tuple[int, str]]:
    return [(line, code) for line, code in _python_blocks()
            if not any(marker in code for marker in NOT_RUN)]


def test_every_snippet_is_run_or_says_why_not():
    blocks = _python_blocks()
    assert len(blocks) >= 4
    for marker in NOT_RUN:  # the list of exceptions stays true to the README
        assert any(marker in code for _, code in blocks), f"no README snippet has {marker!r}"
    assert len(_to_run()) >= 2


@pytest.mark.parametrize("line,code", _to_run(), ids=lambda v: f"README.md:{v}"
                         if isinstance(v, int) else "")
def test_readme_python_snippet_runs_as_written(daemon, line, code):
    assert ADDRESS in code, "the snippet should dial the documented address"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "client"), env.get("PYTHONPATH", "")])
    for attempt in range(2):  # twice: the second run finds what the first one stored
        r = subprocess.run([sys.executable, "-c", code.replace(ADDRESS, daemon.control)],
                           capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
        assert r.returncode == 0, f"README.md line {line}, run {attempt + 1}:\n{r.stderr}"
    if "batch_put" in code:  # the SDK tour: the second run hits every block the first stored
        assert r.stdout.strip() == "4 of 4 blocks were stored", r.stdout
    if "get_view" in code:
        assert r.stdout.split()[-1] == "shm", r.stdout


# ---------------------------------------------------------------- flags and settings

def _help() -> str:
    return build_arg_parser().format_help()


def _help_flags() -> set[str]:
    options = _help().split("options:", 1)[1]
    return set(re.findall(r"^\s+(--[a-z][a-z-]*)", options, re.M)) - {"--help"}


def _readme_usage_flags() -> set[str]:
    m = re.search(r"^```\n(kvstored \[.*?)^```", README, re.S | re.M)
    assert m, "README: no kvstored usage block under 'Running the daemon'"
    return set(re.findall(r"\[(--[a-z][a-z-]*)", m.group(1)))


def _readme_table() -> dict[str, tuple[str, str]]:
    """``{setting: (flag, default cell)}`` from the Configuration reference table."""
    section = README.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| `([a-z_]+\.[a-z_]+)` \| *(`--[a-z-]+`)? *\|([^|]*)\|", line)
        if m:
            rows[m.group(1)] = ((m.group(2) or "").strip("`"), m.group(3).strip())
    return rows


def _print_config() -> dict[str, str]:
    """``{setting: value as text}`` from ``kvstored --print-config`` with no config file."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "client"), str(ROOT)])
    r = subprocess.run([sys.executable, "-m", "kvstored", "--print-config"], capture_output=True,
                       text=True, timeout=60, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    doc = tomllib.loads(r.stdout)
    return {f"{sec}.{key}": v for sec, table in doc.items() for key, v in table.items()}


def _same(readme: str, value) -> bool:
    if isinstance(value, bool):
        return readme == ("true" if value else "false")
    if isinstance(value, (int, float)):
        try:
            return float(readme) == float(value)
        except ValueError:
            return False
    return readme == value or (readme in ('""', "off") and value == "")


def test_usage_block_lists_every_flag():
    assert _readme_usage_flags() == _help_flags(), (
        f"in --help only: {sorted(_help_flags() - _readme_usage_flags())}; "
        f"in the README only: {sorted(_readme_usage_flags() - _help_flags())}")


def test_configuration_table_lists_every_setting_with_its_flag():
    table, printed = _readme_table(), _print_config()
    assert set(table) == set(printed), (f"--print-config only: {sorted(set(printed) - set(table))}; "
                                        f"README only: {sorted(set(table) - set(printed))}")
    assert set(table) == {s.name for s in SETTINGS}
    name_of = {s.field: s.name for s in SETTINGS}
    flag_of = {"--" + dest.replace("_", "-"): name_of[field] for dest, field in _FLAG_FIELDS.items()
               if field in name_of}
    flag_of["--port"] = "server.control_port"
    for flag, setting in flag_of.items():
        assert flag in _help_flags(), flag
        assert table[setting][0] == flag, f"README row {setting}: flag {table[setting][0]!r}, not {flag}"
    for setting, (flag, _) in table.items():
        assert not flag or flag_of.get(flag) == setting, f"README row {setting} names {flag}"


# defaults derived from the host (auto-sized arena, host name)
DERIVED = {"dram.size", "node.id"}


def test_defaults_agree_between_readme_help_and_print_config():
    table, printed = _readme_table(), _print_config()
    checked = 0
    for setting, (_, cell) in table.items():
        m = re.fullmatch(r"`([^`]*)`(?: \(.*\))?", cell)
        if setting in DERIVED or not m:  # prose ("kernel default", "(off)") is not compared
            continue
        assert _same(m.group(1), printed[setting]), (
            f"{setting}: README says {m.group(1)!r}, --print-config {printed[setting]!r}")
        checked += 1
    assert checked >= 50, checked
    # "(default X" in --help against --print-config
    name_of = {s.field: s.name for s in SETTINGS}
    by_flag = {"--" + d.replace("_", "-"): name_of.get(f) for d, f in _FLAG_FIELDS.items()}
    found = 0
    for action in build_arg_parser()._actions:  # each flag's own help text
        m = re.search(r"\(default ([^;),]+)", action.help or "")
        if not m:
            continue
        flag, default = action.option_strings[-1], m.group(1)
        setting = by_flag.get(flag)
        if setting is None or setting in DERIVED:
            continue
        assert _same(default.strip(), printed[setting]), (
            f"{flag} --help says default {default!r}, --print-config {setting} = {printed[setting]!r}")
        found += 1
    assert found >= 8, found
