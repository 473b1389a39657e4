#!/usr/bin/env bash
# Replay docker/Dockerfile without Docker: its ENV / WORKDIR / COPY / RUN steps run
# under a scratch root in /tmp (every absolute path in the image becomes $ROOT/path),
# with a clean venv built by the same commands, then the image's ENTRYPOINT + CMD are
# started from that root and probed (ready file, /metrics, /readyz, SIGTERM -> exit 0).
#
#   docker/check-build.sh            # uses python3 (3.11, like python:3.11-slim)
#   PYTHON=/usr/bin/python3.11 KEEP=1 docker/check-build.sh
#
# What it cannot check: the base image itself, and RUN steps marked
# "check-build: skip" (account creation needs root); USER must not be root.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
ROOT=$(mktemp -d /tmp/kvstored-check-build.XXXXXX)
if [ -z "${KEEP:-}" ]; then trap 'rm -rf "$ROOT"' EXIT; fi
echo "check-build: replaying docker/Dockerfile under $ROOT"
"$PYTHON" - "$ROOT" <<'PY'
import json, os, re, shlex, shutil, signal, subprocess, sys, time, urllib.request

root = sys.argv[1]
repo = os.getcwd()
text = open("docker/Dockerfile").read()

def instructions(text):
    """(instruction, argument text, skip?) with continuation lines joined."""
    out, buf, skip = [], "", False
    for line in text.splitlines():
        stripped = line.strip()
        if not buf and stripped.startswith("#"):
            skip = skip or stripped.startswith("# check-build: skip")
            continue
        if not stripped and not buf:
            continue
        if stripped.startswith("#"):  # comment inside a continued instruction
            continue
        buf += (" " if buf else "") + stripped.rstrip("\\").strip()
        if stripped.endswith("\\"):
            continue
        op, _, arg = buf.partition(" ")
        out.append((op.upper(), arg.strip(), skip))
        buf, skip = "", False
    return out

def rooted(path):
    return os.path.join(root, path.lstrip("/")) if path.startswith("/") else path

def fail(msg):
    print(f"check-build: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)

py = sys.executable
if sys.version_info[:2] != (3, 11):
    print(f"check-build: warning: {py} is {sys.version.split()[0]}; the image uses 3.11")
# `python` inside RUN steps is the base image's interpreter: a shim for this one
shim = os.path.join(root, ".shim")
os.makedirs(shim)
for name in ("python", "python3"):
    os.symlink(py, os.path.join(shim, name))

env = {"PATH": f"{shim}:/usr/local/bin:/usr/bin:/bin", "HOME": os.path.join(root, "root"),
       "LANG": "C.UTF-8"}
for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "PIP_INDEX_URL",
          "PIP_EXTRA_INDEX_URL", "PIP_CACHE_DIR", "no_proxy", "NO_PROXY"):
    if k in os.environ:
        env[k] = os.environ[k]
os.makedirs(env["HOME"])
workdir = root
stage = 0
entrypoint, cmd, user, from_image = [], [], None, []

for op, arg, skip in instructions(text):
    if op == "FROM":
        stage += 1
        from_image.append(arg.split()[0])
        workdir = root
        continue
    if skip:
        print(f"check-build: skipped (needs root): {op} {arg[:70]}...")
        continue
    if op == "ENV":
        for item in shlex.split(arg):
            k, _, v = item.partition("=")
            if k == "PATH":  # keep the shim first; re-root the image's own entries
                v = ":".join(rooted(p) if p.startswith("/opt") else p
                             for p in v.replace("$PATH", env["PATH"]).split(":"))
            elif v.startswith("/"):
                v = rooted(v)
            env[k] = v
    elif op == "WORKDIR":
        workdir = rooted(arg) if arg.startswith("/") else os.path.join(workdir, arg)
        os.makedirs(workdir, exist_ok=True)
    elif op == "COPY":
        words = shlex.split(arg)
        from_stage = any(w.startswith("--from=") for w in words)
        words = [w for w in words if not w.startswith("--")]
        *srcs, dst = words
        dst = rooted(dst) if dst.startswith("/") else os.path.join(workdir, dst)
        for src in srcs:
            s = rooted(src) if from_stage else os.path.join(repo, src)
            if not os.path.exists(s):
                fail(f"COPY source {src} does not exist")
            # Docker: a directory's contents go into dst; a file goes to dst, or into it
            # when dst ends with "/" or is a directory
            if os.path.isdir(s) or not (dst.endswith("/") or os.path.isdir(dst)):
                target = dst.rstrip("/") or dst
            else:
                target = os.path.join(dst, os.path.basename(src))
            if os.path.abspath(s) == os.path.abspath(target):
                continue  # COPY --from=build of the same path: already in place
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if os.path.isdir(s):
                shutil.copytree(s, target, dirs_exist_ok=True)
            else:
                shutil.copy2(s, target)
    elif op == "RUN":
        print(f"check-build: RUN {arg[:100]}{'...' if len(arg) > 100 else ''}", flush=True)
        t = time.monotonic()
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", arg], cwd=workdir, env=env)
        if r.returncode:
            fail(f"RUN exited {r.returncode}: {arg}")
        print(f"check-build:   ok in {time.monotonic() - t:.1f}s", flush=True)
    elif op == "USER":
        user = arg
    elif op == "ENTRYPOINT":
        entrypoint = json.loads(arg)
    elif op == "CMD":
        cmd = json.loads(arg)
    elif op in ("EXPOSE", "STOPSIGNAL", "HEALTHCHECK", "LABEL", "ARG", "VOLUME"):
        pass
    else:
        fail(f"unknown instruction {op}: teach check-build.sh about it")

# ---- static checks
if any(not img.startswith("python:3.11-slim") for img in from_image):
    fail(f"base images {from_image}: expected python:3.11-slim")
if user is None or user.split(":")[0] in ("root", "0"):
    fail(f"the image must run as a non-root USER (got {user!r})")
if not entrypoint:
    fail("no ENTRYPOINT")

# ---- the replayed image: run ENTRYPOINT + CMD (paths re-rooted), probe, SIGTERM
exe = shutil.which(entrypoint[0], path=env["PATH"].replace(shim + ":", ""))
if exe is None or not exe.startswith(root):
    fail(f"ENTRYPOINT {entrypoint[0]} is not installed in the image ({exe})")
venv_py = os.path.join(os.path.dirname(exe), "python")
check = subprocess.run([venv_py, "-c", "import kvstore, kvstored, prometheus_client, uvloop; "
                        "print(prometheus_client.__file__)"], env=env, capture_output=True,
                       text=True)
if check.returncode or not check.stdout.startswith(root):
    fail(f"the venv does not import its own packages: {check.stderr or check.stdout}")
args = [rooted(a) if a.startswith("/") else a for a in entrypoint[1:] + cmd]
ready = os.path.join(root, "ready.json")
run_env = dict(env)
run_env["PATH"] = env["PATH"].replace(shim + ":", "")
argv = [exe, *args, "--host", "127.0.0.1", "--port", "0", "--data-port", "0",
        "--metrics-port", "0", "--dram-size", "64MiB", "--ready-file", ready]
print("check-build: starting", " ".join(shlex.quote(a) for a in argv), flush=True)
log = open(os.path.join(root, "kvstored.log"), "w+")
proc = subprocess.Popen(argv, env=run_env, cwd=rooted("/var/lib/kvstored") if os.path.isdir(
    rooted("/var/lib/kvstored")) else root, stdout=log, stderr=subprocess.STDOUT)
try:
    deadline = time.monotonic() + 30
    while not os.path.exists(ready):
        if proc.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            fail(f"kvstored did not become ready:\n{log.read()[-3000:]}")
        time.sleep(0.05)
    info = json.load(open(ready))
    base = f"http://127.0.0.1:{info['metrics_port']}"
    body = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
    for family in ("kvstored_build_info", "kvstored_tier_capacity_bytes", "process_open_fds"):
        if family not in body:
            fail(f"/metrics lacks {family}")
    if urllib.request.urlopen(base + "/readyz", timeout=5).status != 200:
        fail("/readyz is not 200")
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(30)
    if rc != 0:
        log.seek(0)
        fail(f"kvstored exited {rc} on SIGTERM:\n{log.read()[-3000:]}")
finally:
    if proc.poll() is None:
        proc.kill()
print(f"check-build: OK (image runs as {user}, serves /metrics, drains and exits 0 on SIGTERM)")
PY
