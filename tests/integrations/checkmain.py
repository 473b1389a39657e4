"""Shared entry point of the *_check.py scripts run in the engines venv: run every
check against a live daemon, report each one (not just the first failure) as one JSON line.

``--victim-address`` / ``--victim-pid``: a second, expendable kvstored that a check may
kill (SIGKILL) to see how the adapter behaves once its store is dead."""
from __future__ import annotations

import argparse
import json
import os
import signal
import time
import traceback


def main(checks: dict) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--address", required=True)
    ap.add_argument("--dead-address", default="127.0.0.1:1")
    ap.add_argument("--victim-address", default=None)
    ap.add_argument("--victim-pid", type=int, default=None)
    ap.add_argument("--auth-address", default=None, help="a kvstored with auth on (tokens: $KVSTORE_TEST_TOKENS)")
    a = ap.parse_args()
    results = {}
    for name, fn in checks.items():
        try:
            fn(a)
            results[name] = "ok"
        except Exception as e:  # noqa: BLE001 - reported per check
            traceback.print_exc()
            results[name] = f"{type(e).__name__}: {e}"
    print(json.dumps(results), flush=True)
    return 0


def kill_victim(a) -> None:
    """SIGKILL the expendable daemon and wait (bounded) until it is gone."""
    if a.victim_pid is None or a.victim_address is None:
        raise RuntimeError("this check needs --victim-address and --victim-pid")
    os.kill(a.victim_pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:  # gone, or a zombie (its sockets are closed; the test's process reaps it)
            with open(f"/proc/{a.victim_pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except (FileNotFoundError, ProcessLookupError):
            return
        time.sleep(0.02)


def step_figures(label: str, times: list[float]) -> str:
    """One line with the step times (milliseconds), printed for the test log."""
    ms = sorted(t * 1000 for t in times)
    line = (f"{label}: {len(ms)} steps, mean {sum(ms) / len(ms):.2f} ms, "
            f"p50 {ms[len(ms) // 2]:.2f} ms, max {ms[-1]:.2f} ms")
    print(line, flush=True)
    return line
