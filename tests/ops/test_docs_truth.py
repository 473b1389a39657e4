"""What the docs name exists: every setting, metric, kvstored flag, kvstore-cli command and
flag, make target and repository path that README.md, docs/*.md, the systemd unit and the
Docker files mention is one the code has (test_readme.py holds README's configuration
table and test_metrics_list.py its metrics list against a running daemon; this holds the
prose of every document against those). No daemon: it reads files and parsers."""
from __future__ import annotations

import re

import pytest

from daemonutil import ROOT
from kvstore.cli import build_parser
from kvstored.config import SETTINGS, build_arg_parser

DOCS = ["README.md", "docs/architecture.md", "docs/cluster.md", "docs/integrations.md",
        "docs/scale.md", "systemd/kvstored.service", "systemd/kvstored.toml",
        "docker/Dockerfile", "docker/compose.yaml", "docker/kvstored.toml"]
SETTING_NAMES = {s.name: s for s in SETTINGS}
SECTIONS = {s.section for s in SETTINGS}


def _text(doc: str) -> str:
    return (ROOT / doc).read_text()


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _found(pattern: str, flags: int = 0):
    """``(doc:line, match)`` of ``pattern`` in every document."""
    for doc in DOCS:
        text = _text(doc)
        for m in re.finditer(pattern, text, flags):
            yield f"{doc}:{_line(text, m.start())}", m


def _options(parser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings}


def test_every_setting_named_exists():
    wrong, seen = [], 0
    for where, m in _found(r"`([a-z_]+)\.([a-z_]+)`"):
        section = m.group(1)
        if section in SECTIONS and not m.group(2) == "py":  # `node.py` is a file
            seen += 1
            if m.group(0).strip("`") not in SETTING_NAMES:
                wrong.append(f"{where} {m.group(0)}")
    assert not wrong, wrong
    assert seen >= 100, seen


def test_cluster_md_key_table_lists_every_cluster_setting_with_its_default():
    text = _text("docs/cluster.md")
    start = text.index("| key | default | meaning |")
    rows = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        m = re.match(r"\| `([a-z_]+)` \| `([^`]*)` \|", line)
        assert m, line
        rows[m.group(1)] = m.group(2)
    cluster = {s.key: s for s in SETTINGS if s.section == "cluster"}
    assert rows.keys() == cluster.keys(), (f"settings only: {sorted(cluster.keys() - rows.keys())}"
                                           f"; docs only: {sorted(rows.keys() - cluster.keys())}")
    for key, shown in rows.items():
        d = cluster[key].default
        if isinstance(d, bool):
            ok = shown == str(d).lower()
        elif isinstance(d, (int, float)) and not re.search(r"[A-Za-z]", shown):
            ok = float(shown) == d
        elif isinstance(d, int):  # a size: "256MiB"
            ok = shown == f"{d >> 20}MiB"
        else:
            ok = shown == (d if d else '""')
        assert ok, f"docs/cluster.md: {key} default {shown!r}, the setting's is {d!r}"


def test_every_metric_named_is_in_the_readme_list():
    """README's "Exported metrics" list is held against /metrics by test_metrics_list.py."""
    readme = _text("README.md")
    s = readme.index("## Exported metrics")
    e = readme.find("\n## ", s + 5)
    listed = set(re.findall(r"^- `(kvstored_[a-z0-9_]+)`", readme[s:e], re.M))
    assert len(listed) >= 60
    wrong, seen = [], 0
    for where, m in _found(r"\bkvstored_[a-z0-9_]*[a-z0-9]\b"):
        name = m.group(0)
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if name.startswith(("kvstored_repair_", "kvstored_index")) and name.endswith("_"):
            continue
        seen += 1
        if not {name, base, name + "_total"} & listed:
            wrong.append(f"{where} {name}")
    assert not wrong, wrong
    assert seen >= 80, seen


def test_every_kvstored_flag_named_exists():
    flags = _options(build_arg_parser())
    wrong, seen = [], 0
    for where, m in _found(r"(?<![-\w/])kvstored((?:[ \t]+(?:--[a-z][\w-]*|[^\s`|]+))+)"):
        for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", m.group(1)):
            if where.startswith("docker/Dockerfile") and flag in ("--home-dir", "--create-home"):
                continue  # useradd's, on a line that names the kvstored account
            seen += 1
            if flag not in flags:
                wrong.append(f"{where} {flag}")
    assert not wrong, wrong
    assert seen >= 10, seen


def test_every_kvstore_cli_command_and_flag_named_exists():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a.choices, dict))
    commands = sub.choices
    wrong, seen = [], 0
    # kvstore-cli [global flags] COMMAND [words]: a command directly after the name and
    # its flags; prose such as "kvstore-cli with pinned dependencies" is skipped
    pattern = (r"kvstore-cli((?:[ \t]+--?[a-z][\w-]*(?:[ \t]+[^\s`|)\]-][^\s`|)\]]*)?)*)"
               r"[ \t]+([a-z][a-z-]*)((?:[ \t]+[^\s`|)\],;]+)*)")
    for where, m in _found(pattern):
        before, command, rest = m.groups()
        if command not in commands:
            if not before and command in ("with", "and", "or", "as", "for", "is", "the"):
                continue
            wrong.append(f"{where} command {command!r}: {m.group(0)[:60]}")
            continue
        allowed = _options(parser) | _options(commands[command])
        for action in commands[command]._actions:  # policy ls / set / rm
            if isinstance(action.choices, dict):
                for p in action.choices.values():
                    allowed |= _options(p)
        seen += 1
        for flag in re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", before + " " + rest.split("#")[0]):
            if flag not in allowed:
                wrong.append(f"{where} {command} {flag}: {m.group(0)[:60]}")
    assert not wrong, wrong
    assert seen >= 30, seen


def test_every_make_target_named_exists():
    targets = set(re.findall(r"^([a-z][\w-]*):", _text("Makefile"), re.M))
    named = list(_found(r"`make ([a-z][\w-]*)"))
    wrong = [f"{where} {m.group(0)}" for where, m in named if m.group(1) not in targets]
    # a floor: a pattern that stopped matching would pass with nothing checked
    assert len(named) >= 5 and {"run", "test"} <= targets, (len(named), sorted(targets))
    assert not wrong, wrong


def test_every_repository_path_named_exists():
    wrong, seen = [], 0
    top = "benchmarks|tests|kvstored|client|docs|scripts|native|docker|systemd|proto"
    for where, m in _found(rf"(?<![\w/.$<-])((?:{top})/[\w./-]*\w)"):
        path = m.group(1)
        if where.startswith("docker/Dockerfile:1"):  # "# syntax=docker/dockerfile:1"
            continue
        seen += 1
        if not (ROOT / path).exists() and not any((ROOT / path).parent.glob(
                (ROOT / path).name + "*")):  # "requirements-*.txt", "test_tier*.py"
            wrong.append(f"{where} {path}")
    assert not wrong, wrong
    assert seen >= 100, seen


@pytest.mark.parametrize("doc", ["README.md", "docs/cluster.md"])
def test_toml_examples_hold_only_real_settings(doc):
    import tomllib

    text = _text(doc)
    checked = 0
    for m in re.finditer(r"^```toml\n(.*?)^```", text, re.S | re.M):
        data = tomllib.loads(m.group(1))
        if "token" in data:  # README's tokens file, not a kvstored.toml
            continue
        for section, table in data.items():
            for key in table:
                assert f"{section}.{key}" in SETTING_NAMES, (
                    f"{doc}:{_line(text, m.start())}: [{section}] {key}")
                checked += 1
    assert checked >= 5, checked


def test_readme_sighup_list_is_what_reload_applies():
    """README's Signals paragraph names the settings a SIGHUP applies live: exactly those
    with a reload hook in kvstored/settings.py (it had lost two of them)."""
    readme = _text("README.md")
    m = re.search(r"SIGHUP: re-read the config file and apply\s+what can change live —(.*?)—",
                  readme, re.S)
    assert m, "README: the SIGHUP sentence moved"
    named = set(re.findall(r"`([a-z]+\.[a-z_]+)`", m.group(1)))
    reloadable = {s.name for s in SETTINGS if s.reload is not None}
    assert named & reloadable == reloadable, f"not named: {sorted(reloadable - named)}"
    assert named <= reloadable, f"not reloadable: {sorted(named - reloadable)}"


def test_integrations_md_lists_every_adapter_option_with_its_default():
    """docs/integrations.md's table of the options every adapter shares names each field of
    ClientOptions (it lacked `tls`), and the single-valued defaults agree."""
    import dataclasses

    from kvstore.integrations._config import ClientOptions

    text = _text("docs/integrations.md")
    start = text.index("| key | default | meaning |")
    rows = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        keys_cell, default_cell = line.split("|")[1:3]
        for key in re.findall(r"`([a-z_]+)`", keys_cell):
            rows[key] = default_cell.strip()
    fields = {f.name: f.default for f in dataclasses.fields(ClientOptions)}
    assert rows.keys() == fields.keys(), (f"options only: {sorted(fields.keys() - rows.keys())}; "
                                          f"docs only: {sorted(rows.keys() - fields.keys())}")
    for name, default in fields.items():
        shown = rows[name]
        if isinstance(default, bool):
            assert shown == f"`{str(default).lower()}`", (name, shown)
        elif isinstance(default, float):
            assert float(shown.strip("`")) == default, (name, shown)
        elif default is None:
            assert shown in ("none", "from the daemon"), (name, shown)


def test_readme_layout_names_every_test_directory_and_doc():
    readme = _text("README.md")
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    tests = {p.name for p in (ROOT / "tests").iterdir() if p.is_dir() and p.name != "__pycache__"}
    docs = {p.name for p in (ROOT / "docs").glob("*.md")}
    named = set(re.findall(r"([a-z_]+)/", layout)) | set(re.findall(r"([a-z_]+\.md)", layout))
    assert not tests - named, f"README Layout lacks tests/{sorted(tests - named)}"
    assert not docs - named, f"README Layout lacks docs/{sorted(docs - named)}"


def test_every_test_cited_as_evidence_exists():
    """Docs cite tests for what they claim ("`test_etcd_with_authentication` runs ..."):
    each named test function or file is in tests/ (a renamed test leaves the claim bare)."""
    defs, files = set(), set()
    for path in (ROOT / "tests").rglob("*.py"):
        files.add(path.name)
        defs |= set(re.findall(r"^\s*(?:async )?def (test_\w+)", path.read_text(), re.M))
    wrong, seen = [], 0
    for where, m in _found(r"(?<![\w/-])(test_\w+)(\.py)?"):
        name, is_file = m.group(1), m.group(2)
        if name == "test_remote":  # LMCache's basic_check mode, not ours
            continue
        seen += 1
        if not (name + ".py" in files if is_file else name in defs or name + ".py" in files):
            wrong.append(f"{where} {m.group(0)}")
    assert not wrong, wrong
    assert seen >= 20, seen


def test_benchmarks_readme_lists_every_script():
    """benchmarks/README.md's table names every script in benchmarks/ (12 were missing
    from it before session 17)."""
    table = (ROOT / "benchmarks" / "README.md").read_text()
    scripts = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py"))
    missing = [s for s in scripts if f"`{s}`" not in table]
    assert scripts and not missing, f"benchmarks/README.md does not list {missing}"
