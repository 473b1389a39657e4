#!/usr/bin/env python3
"""LMCache engine store / retrieve per 1k tokens: kvstore plugin vs lmcache_server, one run.

    python benchmarks/bench_lmcache.py [--prompts 6] [--tokens 4096] [--rounds 2]

Starts one kvstored (python -m kvstored) and one ``lmcache_server`` on 127.0.0.1, then
runs benchmarks/lmcache_store.py with the engines venv's Python (.venv/engines, ``make
engines-env``) against each, ``--rounds`` times in turns (kvstore, lm, kvstore, lm, ...)
so the shared machine's load falls on both alike. The plugin's client uses its default
transport (same host: shared memory). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [HERE, REPO, os.path.join(REPO, "client")]

from bench_tcp import KvstoredDaemon  # noqa: E402
from peers import BenchError, free_port, kill_process  # noqa: E402

ENGINES = os.path.join(REPO, ".venv", "engines", "bin")


@contextlib.contextmanager
def lmcache_server():
    port = free_port()
    with tempfile.TemporaryFile() as logf:
        proc = subprocess.Popen([os.path.join(ENGINES, "lmcache_server"), "127.0.0.1", str(port)],
                                stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    raise BenchError(f"lmcache_server exited (rc={proc.returncode})")
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                    break
                if time.monotonic() > deadline:
                    raise BenchError("lmcache_server did not listen within 60 s")
                time.sleep(0.2)
            yield port
        finally:
            kill_process(proc)


def run_one(args, backend: str, target: str) -> dict:
    cmd = [os.path.join(ENGINES, "python"), os.path.join(HERE, "lmcache_store.py"),
           "--backend", backend, "--prompts", str(args.prompts), "--tokens", str(args.tokens)]
    cmd += ["--address", target] if backend == "kvstore" else ["--port", target]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(REPO, "client"), env.get("PYTHONPATH", "")])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if out.returncode != 0:
        raise BenchError(f"lmcache_store.py {backend} failed: {out.stderr[-1500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--markdown")
    args = ap.parse_args(argv)
    if not os.path.exists(os.path.join(ENGINES, "lmcache_server")):
        print("no LMCache: `make engines-env` installs it into .venv/engines", file=sys.stderr)
        return 2
    res: dict = {"kvstore": [], "lm": []}
    with KvstoredDaemon("", dram_size="2GiB") as d, lmcache_server() as port:
        for r in range(args.rounds):
            for backend, target in (("kvstore", d.address), ("lm", str(port))):
                print(f"round {r + 1}: {backend} ...", flush=True)
                res[backend].append(run_one(args, backend, target))
    med = lambda xs: sorted(xs)[(len(xs) - 1) // 2]  # noqa: E731 (lower median)
    rows = []
    for b, label in (("kvstore", "kvstore plugin (kvstored, shm)"), ("lm", "lmcache_server (lm://)")):
        st = [x["store_ms_per_1k_tokens"] for x in res[b]]
        rt = [x["retrieve_ms_per_1k_tokens"] for x in res[b]]
        got = sum(x["retrieved_tokens"] for x in res[b])
        want = sum(x["stored_tokens"] for x in res[b])
        rows.append((label, med(st), st, med(rt), rt, f"{got}/{want}"))
    kv, lm = rows[0], rows[1]
    bpt = res["kvstore"][0]["bytes_per_token"]
    lines = [f"LMCache engine, {args.prompts} prompts x {args.tokens} tokens per run, "
             f"{bpt} bytes per token (Qwen2-0.5B KV shape), chunk 256, local_cpu off; "
             f"median of {args.rounds} runs each, in turns.", "",
             "| backend | store ms / 1k tokens | runs | retrieve ms / 1k tokens | runs "
             "| tokens retrieved / stored |",
             "|---|---:|---|---:|---|---:|"]
    for label, s, ss, r, rr, hits in rows:
        lines.append(f"| {label} | {s:.1f} | {', '.join(f'{x:.1f}' for x in ss)} | {r:.1f} | "
                     f"{', '.join(f'{x:.1f}' for x in rr)} | {hits} |")
    lines.append("")
    lines.append(f"store: kvstore / lmcache_server = {kv[1] / lm[1]:.2f}x the time; "
                 f"retrieve: {kv[3] / lm[3]:.2f}x")
    report = "\n".join(lines)
    print(report)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
