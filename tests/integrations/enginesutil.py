"""Where the engines live for tests/integrations, and how to run code inside them.

``make engines-env`` builds ``.venv/engines``: a venv on CPU torch with LMCache
installed, plus ``sglang/`` and ``vllm/`` directories holding those packages'
interface modules (installed ``--no-deps``; put on PYTHONPATH only for their own
tests). ``make test`` passes the location as ``KVSTORE_ENGINES``. The engine side
runs as a subprocess of that venv's Python with only the SDK (``client/``) on its
path, like an inference host; the daemon runs from the test's own interpreter.

When an engine is missing, its tests are skipped with the reason and the fix.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from daemonutil import ROOT

HERE = Path(__file__).resolve().parent
FIX = "run `make engines-env` (or set KVSTORE_ENGINES to such an environment)"

PROBES = {
    "lmcache": "import lmcache.v1.cache_engine, kvstore.integrations.lmcache",
    "sglang": "import sglang.srt.mem_cache.hicache_storage, kvstore.integrations.sglang",
    "vllm": "import vllm.distributed.kv_transfer.kv_connector.v1.base, kvstore.integrations.vllm",
}
_found: dict[str, tuple[str | None, str]] = {}


def engines_dir() -> Path:
    return Path(os.environ.get("KVSTORE_ENGINES") or ROOT / ".venv" / "engines")


def engine_env(engine: str, **extra) -> dict:
    env = dict(os.environ)
    path = [str(ROOT / "client")]  # the SDK only: no daemon code on an engine host
    if engine in ("sglang", "vllm"):
        path.append(str(engines_dir() / engine))
    env["PYTHONPATH"] = os.pathsep.join(path)
    # LMCache without vLLM hashes token chunks with Python's hash(): every process that
    # shares a store must use the same seed (docs/integrations.md)
    env["PYTHONHASHSEED"] = "0"
    env.setdefault("LMCACHE_LOG_LEVEL", "WARNING")
    # no engine may phone home from a test (LMCache and vLLM send usage reports by
    # default) or reach for a model hub
    env.update(LMCACHE_TRACK_USAGE="false", DO_NOT_TRACK="1", VLLM_NO_USAGE_STATS="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.update(extra)
    return env


def engine_installed(engine: str) -> tuple[str | None, str]:
    """(python, "") when the engines environment holds ``engine``'s files, else (None, why
    it is skipped). Imports nothing: a check that imports the engine anyway calls
    skip_unless_importable on its result instead of paying for the import twice (vLLM's
    takes 10-40 s on 2 cores)."""
    py = engines_dir() / "bin" / "python"
    if not py.exists():
        return None, f"no engines environment at {engines_dir()}: {FIX}"
    if engine in ("sglang", "vllm") and not (engines_dir() / engine).is_dir():
        return None, f"{engine} is not installed in {engines_dir()}: {FIX}"
    return str(py), ""


def engine_python(engine: str) -> tuple[str | None, str]:
    """(python, "") when ``engine`` imports there, else (None, why it is skipped)."""
    if engine in _found:
        return _found[engine]
    py, why = engine_installed(engine)
    if py is None:
        _found[engine] = (None, why)
        return _found[engine]
    r = subprocess.run([py, "-c", PROBES[engine]], env=engine_env(engine),
                       capture_output=True, text=True, timeout=180)
    if r.returncode:
        why = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        _found[engine] = (None, f"{engine} does not import in {engines_dir()} ({why}): {FIX}")
    else:
        _found[engine] = (py, "")
    return _found[engine]


def skip_unless_importable(engine: str, r: subprocess.CompletedProcess) -> None:
    """After a run in the engine's environment: when it failed on an import, skip (with
    engine_python's reason) if the engine does not even import there; a run that failed
    for any other reason is left to the test to report."""
    if r.returncode != 0 and ("ImportError" in r.stderr or "ModuleNotFoundError" in r.stderr):
        py, why = engine_python(engine)
        if py is None:
            pytest.skip(why)


def run(engine: str, python: str, args: list[str], *, timeout: float = 240, **env) -> subprocess.CompletedProcess:
    return subprocess.run([python, *args], env=engine_env(engine, **env), capture_output=True,
                          text=True, timeout=timeout, cwd=str(HERE))


def last_json(r: subprocess.CompletedProcess) -> dict:
    lines = [ln for ln in r.stdout.strip().splitlines() if ln.startswith("{")]
    assert r.returncode == 0 and lines, (
        f"exit {r.returncode}\n--- stdout ---\n{r.stdout[-3000:]}\n--- stderr ---\n{r.stderr[-5000:]}")
    return json.loads(lines[-1])
