"""Shared entry point of the *_check.py scripts run in the engines venv: run every
check against a live daemon, report each one (not just the first failure) as one JSON line."""
from __future__ import annotations

import argparse
import json
import traceback


def main(checks: dict) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--address", required=True)
    ap.add_argument("--dead-address", default="127.0.0.1:1")
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
