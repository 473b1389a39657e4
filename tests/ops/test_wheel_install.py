"""What a user gets from `pip install kvstored[server]`: the wheel built from this checkout,
installed non-editable into a fresh venv (no --system-site-packages), run with its cwd
outside the source tree and no PYTHONPATH. Every other test runs against the editable
install, which sees the whole tree: a package missing from the wheel (kvstored.cluster
once was) shows up only here.

The venvs are built once per session, both at once (~30-40 s with a warm pip cache),
under the session's tmp dir. KVSTORED_SKIP_BUILD_CHECK=1 skips this file like
docker/check-build.sh's test.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "cluster"))
from etcdutil import Etcd, needs_etcd  # noqa: E402
from opsutil import index_reachable  # noqa: E402

pytestmark = [pytest.mark.skipif(bool(os.environ.get("KVSTORED_SKIP_BUILD_CHECK")),
                                 reason="KVSTORED_SKIP_BUILD_CHECK is set"),
               # the fixtures build the wheel and pip-install fresh venvs (each up to
               # PIP_TIMEOUT): the suite's 120 s default would cut a slow CI's first test
               pytest.mark.timeout(900)]

SMALL = ["--host", "127.0.0.1", "--port", "0", "--data-port", "0", "--metrics-port", "0",
         "--dram-size", "64MiB", "--slab-size", "4MiB", "--max-value-size", "4MiB"]
PIP_TIMEOUT = 600


def _run(argv: list, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kw)
    return r


def _source_copy(dst: Path) -> Path:
    """The files a clone of this checkout has (tracked and new, not ignored): never the
    editable install's build leftovers."""
    r = _run(["git", "-C", ROOT, "ls-files", "-co", "--exclude-standard", "-z"], timeout=60)
    if r.returncode != 0:  # not a git checkout (a source tarball): copy all but caches
        shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(
            ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"))
        return dst
    for rel in filter(None, r.stdout.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    return dst


def _clean_env(venv: Path, home: Path) -> dict:
    """What a user's shell would have: the venv's bin first, no PYTHONPATH."""
    env = {"PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin", "HOME": str(home),
           "LANG": "C.UTF-8"}
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "no_proxy", "NO_PROXY",
              "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_CACHE_DIR",
              "XDG_CACHE_HOME", "PIP_CONFIG_FILE", "PIP_CERT"):
        if k in os.environ:
            env[k] = os.environ[k]
    if "PIP_CACHE_DIR" not in env:  # share the user's wheel cache: no downloads on re-runs
        env["PIP_CACHE_DIR"] = str(Path.home() / ".cache" / "pip")
    return env


class Install:
    def __init__(self, base: Path, wheel: Path, venv: Path):
        self.base, self.wheel, self.venv = base, wheel, venv
        self.cwd = base / "run"  # outside the source tree
        self.cwd.mkdir(exist_ok=True)
        self.env = _clean_env(venv, base)

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    def run(self, *argv, timeout: float = 60, input: str | None = None):
        return _run(list(argv), cwd=self.cwd, env=self.env, timeout=timeout, input=input,
                    stdin=None if input is not None else subprocess.DEVNULL)

    def python(self, code: str, *args, timeout: float = 60):
        return self.run(self.bin("python"), "-c", code, *args, timeout=timeout)


def _make_venv(base: Path, name: str, wheel: Path, extra: str) -> Path:
    venv = base / name
    # no pip of its own (ensurepip was ~5 s of CPU a venv, far more on a loaded machine):
    # this interpreter's pip installs into it (--python), resolving exactly as the venv's would
    r = _run([sys.executable, "-m", "venv", "--without-pip", venv], timeout=120)
    assert r.returncode == 0, r.stderr
    target = f"{wheel}[{extra}]" if extra else str(wheel)
    r = _run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install",
              "--disable-pip-version-check", "-q", target], timeout=PIP_TIMEOUT, cwd=base,
             env=_clean_env(venv, base))
    if r.returncode != 0:
        if not index_reachable():
            pytest.skip(f"pip cannot fetch the dependencies (index unreachable): {r.stderr[-300:]}")
        raise AssertionError(f"pip install {target} failed:\n{r.stdout[-2000:]}{r.stderr[-3000:]}")
    return venv


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("wheel")
    src = _source_copy(base / "src")
    dist = base / "dist"
    # the build needs setuptools>=68 and wheel (pyproject's build-system): this interpreter's
    # when it has them, else pip fetches them into an isolated build env
    try:
        import setuptools
        import wheel as _wheel  # noqa: F401
        isolation = [] if int(setuptools.__version__.split(".")[0]) >= 68 else None
    except ImportError:
        isolation = None
    argv = [sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check", "--no-deps",
            *(["--no-build-isolation"] if isolation is not None else []), "-w", dist, src]
    r = _run(argv, timeout=PIP_TIMEOUT, cwd=base)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    wheels = list(dist.glob("kvstored-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="session")
def venvs(wheel) -> dict:
    """Both venvs, installed at once: most of a pip install waits on the index and the
    disk (10-17 s of wall for ~6 s of CPU here), so the second overlaps the first. A skip
    or failure in either is raised here, in the test that asked for it."""
    from concurrent.futures import ThreadPoolExecutor
    base = wheel.parent.parent
    with ThreadPoolExecutor(2) as pool:
        jobs = {extra: pool.submit(_make_venv, base, f"venv-{extra or 'sdk'}", wheel, extra)
                for extra in ("server", "")}
    return jobs


@pytest.fixture(scope="session")
def server(wheel, venvs) -> Install:
    """`pip install 'kvstored-....whl[server]'` in a fresh venv."""
    return Install(wheel.parent.parent, wheel, venvs["server"].result())


@pytest.fixture(scope="session")
def sdk_only(wheel, venvs) -> Install:
    """`pip install kvstored-....whl` without extras: the SDK and kvstore-cli."""
    return Install(wheel.parent.parent, wheel, venvs[""].result())


def _packages_in_tree() -> set[str]:
    out = set()
    for top, pkg in ((ROOT / "client", "kvstore"), (ROOT, "kvstored")):
        for init in (top / pkg).rglob("__init__.py"):
            rel = init.parent.relative_to(top)
            if "__pycache__" not in rel.parts:
                out.add(".".join(rel.parts))
    return out


def test_wheel_holds_every_package_of_the_tree(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    in_wheel = {n[:-len("/__init__.py")].replace("/", ".") for n in names
                if n.endswith("/__init__.py")}
    assert _packages_in_tree() <= in_wheel, sorted(_packages_in_tree() - in_wheel)
    assert "kvstored.cluster" in in_wheel and "kvstore.integrations" in in_wheel
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
    # generated gRPC code and the typing marker travel too
    assert any(n.startswith("kvstore/v1/") and n.endswith("_pb2.py") for n in names)
    # the packed index's extension, wherever this machine builds it (the editable install)
    if importlib.util.find_spec("kvstored._index") is not None:
        assert any(n.startswith("kvstored/_index") and n.endswith(".so") for n in names)


def _start(inst: Install, *args: str, name: str = "node") -> tuple[subprocess.Popen, dict, Path]:
    ready = inst.cwd / f"{name}-{time.monotonic_ns()}.json"
    log_path = inst.cwd / f"{name}.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen([inst.bin("kvstored"), *SMALL, "--ready-file", str(ready), *args],
                            cwd=inst.cwd, env=inst.env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    log.close()
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"installed kvstored did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.05)
    return proc, json.loads(ready.read_text()), log_path


def _stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


_SDK_ROUND_TRIP = """
import sys, kvstore, kvstored
venv = sys.prefix
for m in (kvstore, kvstored):
    assert m.__file__.startswith(venv), (m.__name__, m.__file__, venv)
with kvstore.Client(sys.argv[1], namespace="wheel") as c:
    assert c.put("k", b"from the wheel" * 1000) in (True, False, None)
    assert c.get("k") == b"from the wheel" * 1000
    assert c.lookup(["k", "absent"]) == 1
    print("ok", c.transport)
"""


def test_standalone_node_from_the_installed_wheel(server):
    r = server.python("import kvstored.cluster, kvstored.cluster.repair, kvstore.cluster, "
                      "kvstore.cli, kvstore.integrations; print('imports ok')")
    assert r.returncode == 0 and "imports ok" in r.stdout, r.stderr
    proc, info, log = _start(server)
    try:
        control = f"127.0.0.1:{info['control_port']}"
        r = server.python(_SDK_ROUND_TRIP, control)
        assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout + r.stderr
        r = server.run(server.bin("kvstore-cli"), "-a", control, "--json", "status")
        assert r.returncode == 0, r.stdout + r.stderr
        doc = json.loads(r.stdout)
        assert doc["ready"] is True and doc["status"] == "serving", doc
    finally:
        assert _stop(proc) == 0, log.read_text()[-3000:]


@needs_etcd
def test_cluster_node_from_the_installed_wheel(server, tmp_path):
    etcd = Etcd(tmp_path).start()
    try:
        cfg = server.cwd / "cluster.toml"
        cfg.write_text(f'[cluster]\nenabled = true\nname = "wheel"\n'
                       f'etcd_endpoints = "{etcd.endpoint}"\nlease_ttl = 2\n'
                       f'policies = "*=none"\n')
        proc, info, log = _start(server, "--config", str(cfg), name="cluster")
        try:
            control = f"127.0.0.1:{info['control_port']}"
            deadline = time.monotonic() + 30
            while True:  # registration in etcd runs in the background
                r = server.run(server.bin("kvstore-cli"), "-a", control, "--json", "nodes")
                doc = json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip() else {}
                if doc.get("source") == "etcd" and any(
                        n["node_id"] == info["node_id"] for n in doc.get("nodes", ())):
                    break
                assert time.monotonic() < deadline, (r.stdout + r.stderr
                                                     + log.read_text()[-3000:])
                time.sleep(0.3)
            assert doc["cluster"] == "wheel" and not doc["degraded"], doc
            r = server.run(server.bin("kvstore-cli"), "-a", control, "nodes")
            assert r.returncode == 0 and info["node_id"] in r.stdout, r.stdout + r.stderr
            r = server.python(
                "import sys\nfrom kvstore.cluster import ClusterClient\n"
                "with ClusterClient.from_cluster(sys.argv[1]) as cc:\n"
                "    cc.batch_put([(b'a', b'1' * 5000)], namespace='w')\n"
                "    assert cc.batch_get([b'a'], namespace='w') == [b'1' * 5000]\n"
                "print('ok')\n", control)
            assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr
        finally:
            assert _stop(proc) == 0, log.read_text()[-3000:]
    finally:
        etcd.stop()


def test_sdk_only_install_says_what_the_daemon_needs(sdk_only):
    r = sdk_only.python("import kvstore, kvstore.cluster; print('sdk ok')")
    assert r.returncode == 0 and "sdk ok" in r.stdout, r.stderr
    r = sdk_only.run(sdk_only.bin("kvstore-cli"), "--help")
    assert r.returncode == 0 and "nodes" in r.stdout, r.stderr
    cfg = sdk_only.cwd / "cluster.toml"
    cfg.write_text('[cluster]\nenabled = true\n')
    for args in ([], ["--config", str(cfg)]):  # standalone: uvloop; cluster: aetcd
        r = sdk_only.run(sdk_only.bin("kvstored"), *SMALL, *args)
        lines = [line for line in r.stderr.splitlines() if not line.startswith("ts=")]
        assert r.returncode == 2, r.stderr
        assert len(lines) == 1 and lines[0].startswith("kvstored: error: "), r.stderr
        assert "pip install 'kvstored[server]'" in lines[0], lines
