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
check = subprocess.run([venv_py, "-c", "import kvstore, kvstored, kvstored.cluster, "
                        "kvstore.cluster, prometheus_client, uvloop, aetcd; "
                        "print(prometheus_client.__file__)"], env=env, capture_output=True,
                       text=True)
if check.returncode or not check.stdout.startswith(root):
    fail(f"the venv does not import its own packages: {check.stderr or check.stdout}")
args = [rooted(a) if a.startswith("/") else a for a in entrypoint[1:] + cmd]
run_env = dict(env)
run_env["PATH"] = env["PATH"].replace(shim + ":", "")
cli = os.path.join(os.path.dirname(exe), "kvstore-cli")
workdir = rooted("/var/lib/kvstored") if os.path.isdir(rooted("/var/lib/kvstored")) else root

# The image's config names absolute paths (the shm socket in /run/kvstored): re-root them
# like every other path of the image, and make the directories the skipped root-only RUN
# step creates (/run/kvstored).
import tomllib
config = args[args.index("--config") + 1] if "--config" in args else None
if config:
    text = open(config).read()
    for section in tomllib.loads(text).values():
        for value in (section.values() if isinstance(section, dict) else ()):
            if isinstance(value, str) and value.startswith("/"):
                text = text.replace(f'"{value}"', f'"{rooted(value)}"')
                os.makedirs(os.path.dirname(rooted(value)), exist_ok=True)
    open(config, "w").write(text)
    image_cfg = tomllib.loads(text)
else:
    image_cfg = {}
shm_path = image_cfg.get("shm", {}).get("socket_path", "")

def with_config(path):
    """ENTRYPOINT + CMD's arguments with another config file in place of the image's."""
    out = list(args)
    if "--config" in out:
        out[out.index("--config") + 1] = path
    else:
        out += ["--config", path]
    return out

def start(name, image_args, extra=()):
    """The image's command (+ extra flags) on free ports; (process, ready info, log file)."""
    ready = os.path.join(root, f"{name}-ready.json")
    argv = [exe, *image_args, "--host", "127.0.0.1", "--port", "0", "--data-port", "0",
            "--metrics-port", "0", "--dram-size", "64MiB", "--ready-file", ready, *extra]
    print(f"check-build: starting {name}:", " ".join(shlex.quote(a) for a in argv), flush=True)
    log = open(os.path.join(root, f"{name}.log"), "w+")
    proc = subprocess.Popen(argv, env=run_env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not os.path.exists(ready):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log.seek(0)
            fail(f"{name} did not become ready:\n{log.read()[-3000:]}")
        time.sleep(0.05)
    return proc, json.load(open(ready)), log

def stop(name, proc, log):
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = "a timeout"
    if rc != 0:
        log.seek(0)
        fail(f"{name} exited {rc} on SIGTERM:\n{log.read()[-3000:]}")

def image_run(*argv, timeout=60):
    return subprocess.run(list(argv), env=run_env, cwd=workdir, capture_output=True, text=True,
                          timeout=timeout)

# ---- a standalone node: /metrics, /readyz, the shm socket where the config puts it
proc, info, log = start("standalone", args)
try:
    base = f"http://127.0.0.1:{info['metrics_port']}"
    body = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
    for family in ("kvstored_build_info", "kvstored_tier_capacity_bytes", "process_open_fds"):
        if family not in body:
            fail(f"/metrics lacks {family}")
    if urllib.request.urlopen(base + "/readyz", timeout=5).status != 200:
        fail("/readyz is not 200")
    control = f"127.0.0.1:{info['control_port']}"
    r = image_run(venv_py, "-c", (
        "import sys, kvstore\n"
        "with kvstore.Client(sys.argv[1], namespace='check', shm=bool(sys.argv[2])) as c:\n"
        "    c.put('k', b'x' * 100000); assert c.get('k') == b'x' * 100000\n"
        "    print(c.transport, c.info().shm_socket)\n"), control, "1" if shm_path else "")
    if r.returncode:
        fail(f"SDK round trip from the image's venv failed:\n{r.stderr[-2000:]}")
    if shm_path and r.stdout.split() != ["shm", shm_path]:
        fail(f"the shm socket is not where the config puts it ({shm_path}): {r.stdout}")
    print(f"check-build:   standalone node serves /metrics, /readyz, put/get over {r.stdout.split()[0]}")
finally:
    if proc.poll() is None:
        stop("standalone", proc, log)
if shm_path and os.path.exists(shm_path):
    fail(f"the shm socket {shm_path} is left behind after SIGTERM")

# ---- a cluster node (kvstored.cluster must be in the install): registered in a real etcd
# when one is on PATH, else with a static peer list; kvstore-cli nodes must list it
import socket as _socket

def free_port():
    with _socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

etcd_bin, etcd = shutil.which("etcd"), None
cluster_toml = os.path.join(root, "cluster.toml")  # the image's config + [cluster]
base_toml = open(config).read() + "\n" if config else ""
if etcd_bin:
    cport, pport = free_port(), free_port()
    etcd = subprocess.Popen(
        [etcd_bin, "--name", "cb", "--data-dir", os.path.join(root, "etcd"),
         "--listen-client-urls", f"http://127.0.0.1:{cport}",
         "--advertise-client-urls", f"http://127.0.0.1:{cport}",
         "--listen-peer-urls", f"http://127.0.0.1:{pport}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{pport}",
         "--initial-cluster", f"cb=http://127.0.0.1:{pport}", "--log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    open(cluster_toml, "w").write(base_toml + f'[cluster]\nenabled = true\nname = "check-build"\n'
                                  f'etcd_endpoints = "127.0.0.1:{cport}"\nlease_ttl = 2\n')
    extra, mode = [], "etcd"
else:
    port = free_port()
    open(cluster_toml, "w").write(base_toml + f'[cluster]\nenabled = true\n'
                                  f'static_peers = "127.0.0.1:{port}"\n')
    extra, mode = ["--port", str(port)], "static peers (no etcd on PATH)"
try:
    proc, info, log = start("cluster", with_config(cluster_toml), extra)
    try:
        control = f"127.0.0.1:{info['control_port']}"
        deadline = time.monotonic() + 30
        while True:  # etcd registration runs in the background
            r = image_run(cli, "-a", control, "--json", "nodes")
            doc = json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip() else {}
            if any(n.get("node_id") == info["node_id"] for n in doc.get("nodes", ())):
                break
            if time.monotonic() > deadline:
                log.seek(0)
                fail(f"kvstore-cli nodes does not list the cluster node:\n{r.stdout}{r.stderr}"
                     f"\n{log.read()[-2000:]}")
            time.sleep(0.3)
        print(f"check-build:   cluster node listed by kvstore-cli nodes ({mode}, "
              f"source {doc.get('source')})")
    finally:
        if proc.poll() is None:
            stop("cluster", proc, log)
finally:
    if etcd is not None:
        etcd.terminate()
        etcd.wait(10)
print(f"check-build: OK (image runs as {user}, serves /metrics and shm, joins a cluster, "
      "drains and exits 0 on SIGTERM)")
PY
