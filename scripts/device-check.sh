#!/usr/bin/env bash
# Device check: what needs a GPU or an RDMA NIC, in one run of at most 8 minutes.
#
#   scripts/device-check.sh            (from anywhere; logs go to $OUT or a temp dir)
#
# Checks, one summary line each ("DEVICE-CHECK <check>: PASS|FAIL|SKIP <detail>"):
#   python   the interpreter and the modules the tests need (missing ones are installed
#            from ./wheels with --no-index when that directory exists: there is no network)
#   gpu      nvidia-smi and torch.cuda
#   daemon   a kvstored started on this machine answers a put and a get
#   cuda     the CUDA tests of kvstore.torch (tests/client/test_torch.py -k cuda)
#   rdma-dev an RDMA device: ibv_devices, else soft-RoCE (rdma link add rxe0 type rxe netdev
#            <if>) where the kernel and our privileges allow it
#   rdma     tests/rdma: the transport over the verbs twin (always) and the pyverbs layer
#            and the daemon over pyverbs (only with a device)
#   ib_write_bw  the link's raw RDMA write bandwidth, to compare with the rdma line's rates
# Exit status: 0 when no check failed (SKIP is not a failure), else 1.
set -u
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
START=$(date +%s)
BUDGET=${DEVICE_CHECK_BUDGET:-450}  # seconds; the whole run must end within 8 minutes
OUT=${OUT:-$(mktemp -d /tmp/device-check.XXXXXX)}
mkdir -p "$OUT"
SUMMARY=()

say() { SUMMARY+=("DEVICE-CHECK $1: $2${3:+ $3}"); echo "== $1: $2${3:+ $3}"; }
left() { local l=$(( BUDGET - ($(date +%s) - START) )); [ "$l" -gt 5 ] && echo "$l" || echo 5; }
cap() { local want=$1 l; l=$(left); [ "$want" -lt "$l" ] && echo "$want" || echo "$l"; }
tail_of() { tail -n "${2:-15}" "$1" | sed 's/^/    /'; }
pytest_counts() { grep -Eo '[0-9]+ (passed|failed|skipped|error|errors)' "$1" | paste -sd, -; }

# ---------------------------------------------------------------- python
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ] && .venv/bin/python -c 'import grpc' 2>/dev/null; then PY=.venv/bin/python
  else PY=$(command -v python3 || command -v python); fi
fi
export PYTHONPATH="$ROOT/client:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
need_mods="grpc google.protobuf xxhash uvloop prometheus_client pytest"
missing=$("$PY" - $need_mods <<'PYEOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
PYEOF
)
if [ -n "$missing" ] && [ -d wheels ]; then
  # install into a venv that sees the system packages (CUDA torch stays the system's)
  "$PY" -m venv --system-site-packages "$OUT/venv" >"$OUT/venv.log" 2>&1 \
    && "$OUT/venv/bin/python" -m pip install --no-index --find-links wheels \
         $(echo "$missing" | sed 's/google.protobuf/protobuf/; s/prometheus_client/prometheus-client/') \
         pytest-timeout >>"$OUT/venv.log" 2>&1 && PY="$OUT/venv/bin/python"
  missing=$("$PY" - $need_mods <<'PYEOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
PYEOF
)
fi
PYV=$("$PY" -c 'import sys; print(".".join(map(str, sys.version_info[:3])))' 2>/dev/null)
if [ -n "$missing" ]; then
  say python FAIL "$PY $PYV: missing $missing (put their wheels in ./wheels)"
else
  say python PASS "$PY $PYV"
fi
PYTEST=("$PY" -m pytest -q -rs -p no:cacheprovider)

# ---------------------------------------------------------------- gpu
if command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(timeout 20 nvidia-smi -L 2>&1 | head -n 4 | paste -sd';' -)
else
  gpus="no nvidia-smi"
fi
cuda=$(timeout 60 "$PY" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' 2>&1 | tail -n1)
case "$cuda" in
  *" True "*) HAVE_CUDA=1; say gpu PASS "torch ${cuda}; $gpus" ;;
  *) HAVE_CUDA=0; say gpu SKIP "no CUDA here (torch: ${cuda:-not importable}; $gpus)" ;;
esac

# ---------------------------------------------------------------- daemon
if [ -z "$missing" ]; then
  timeout "$(cap 60)" "$PY" - >"$OUT/daemon.log" 2>&1 <<'PYEOF'
import os, sys, tempfile
from pathlib import Path
sys.path.insert(0, "tests")
from daemonutil import Daemon
import kvstore
d = Daemon(Path(tempfile.mkdtemp())).start()
try:
    with kvstore.Client(d.control, namespace="device-check", timeout=20) as c:
        data = os.urandom(1 << 20)
        c.put("k", data)
        assert c.get("k") == data
        print("daemon ok over", c.transport, "rdma:", [l for l in d.log().splitlines() if "ready" in l][-1].split("rdma=")[-1].split(" metrics")[0])
finally:
    d.stop()
PYEOF
  if [ $? -eq 0 ]; then say daemon PASS "$(tail -n1 "$OUT/daemon.log")"
  else say daemon FAIL "see $OUT/daemon.log"; tail_of "$OUT/daemon.log"; fi
else
  say daemon SKIP "python modules missing"
fi

# ---------------------------------------------------------------- cuda tests
if [ "$HAVE_CUDA" = 1 ] && [ -z "$missing" ]; then
  timeout "$(cap 240)" "${PYTEST[@]}" tests/client/test_torch.py -k cuda >"$OUT/cuda.log" 2>&1
  rc=$?
  counts=$(pytest_counts "$OUT/cuda.log")
  if [ $rc -eq 0 ]; then say cuda PASS "$counts"
  else say cuda FAIL "rc=$rc ${counts} (see $OUT/cuda.log)"; tail_of "$OUT/cuda.log" 25; fi
else
  say cuda SKIP "no CUDA (torch.cuda.is_available() is False) or python modules missing"
fi

# ---------------------------------------------------------------- rdma device
dev=""
if command -v ibv_devices >/dev/null 2>&1; then
  dev=$(timeout 10 ibv_devices 2>/dev/null | awk 'NR>2 && $1 != "" {print $1; exit}')
fi
if [ -z "$dev" ] && [ -d /sys/class/infiniband ]; then
  dev=$(ls /sys/class/infiniband 2>/dev/null | head -n1)
fi
how="ibv_devices"
if [ -z "$dev" ] && command -v rdma >/dev/null 2>&1; then
  # soft-RoCE: needs the rdma_rxe module and CAP_NET_ADMIN; lo first, then the default route's NIC
  timeout 10 modprobe rdma_rxe >/dev/null 2>&1
  for nd in lo $(ip route show default 2>/dev/null | awk '{print $5; exit}'); do
    if timeout 10 rdma link add rxe0 type rxe netdev "$nd" >"$OUT/rxe.log" 2>&1; then
      dev=rxe0; how="soft-RoCE on $nd"; break
    fi
  done
fi
if [ -n "$dev" ]; then
  export KVSTORE_RDMA_DEVICE="$dev"
  # RoCE v2 wants the IPv4-mapped GID: pick its index from sysfs when there is one
  gdir=/sys/class/infiniband/$dev/ports/1
  if [ -d "$gdir/gid_attrs/types" ]; then
    for t in "$gdir"/gid_attrs/types/*; do
      i=${t##*/}
      if [ "$(cat "$t" 2>/dev/null)" = "RoCE v2" ] && grep -q "0000:0000:0000:0000:0000:ffff" "$gdir/gids/$i" 2>/dev/null; then
        export KVSTORE_RDMA_GID_INDEX=$i; break
      fi
    done
  fi
  state=$(cat "$gdir/state" 2>/dev/null || echo "?")
  say rdma-dev PASS "$dev ($how, port 1: $state${KVSTORE_RDMA_GID_INDEX:+, gid index $KVSTORE_RDMA_GID_INDEX})"
else
  why="no device"
  command -v ibv_devices >/dev/null 2>&1 || why="$why; no ibv_devices (rdma-core)"
  [ -s "$OUT/rxe.log" ] && why="$why; rxe: $(head -n1 "$OUT/rxe.log")"
  "$PY" -c 'import pyverbs' 2>/dev/null || why="$why; no pyverbs"
  say rdma-dev SKIP "$why"
fi

# ---------------------------------------------------------------- rdma tests
if [ -z "$missing" ]; then
  timeout "$(cap 200)" "${PYTEST[@]}" tests/rdma -s >"$OUT/rdma.log" 2>&1
  rc=$?
  counts=$(pytest_counts "$OUT/rdma.log")
  rates=$(grep -Eo 'RDMA [0-9]+ MiB x[0-9]+: put [0-9.]+ GB/s, get [0-9.]+ GB/s' "$OUT/rdma.log" | paste -sd';' -)
  skips=$(grep -Eo 'SKIPPED \[[0-9]+\] [^:]+:[0-9]+: .*' "$OUT/rdma.log" | head -n1 | cut -c1-160)
  if [ $rc -eq 0 ]; then say rdma PASS "$counts${rates:+; $rates}${skips:+; $skips}"
  else say rdma FAIL "rc=$rc $counts (see $OUT/rdma.log)"; tail_of "$OUT/rdma.log" 25; fi
else
  say rdma SKIP "python modules missing"
fi

# ---------------------------------------------------------------- ib_write_bw
if [ -n "$dev" ] && command -v ib_write_bw >/dev/null 2>&1; then
  gidarg=${KVSTORE_RDMA_GID_INDEX:+-x $KVSTORE_RDMA_GID_INDEX}
  timeout "$(cap 40)" ib_write_bw -d "$dev" $gidarg -s 67108864 -n 50 --report_gbits >"$OUT/bw-server.log" 2>&1 &
  srv=$!
  sleep 1
  timeout "$(cap 40)" ib_write_bw -d "$dev" $gidarg -s 67108864 -n 50 --report_gbits 127.0.0.1 >"$OUT/bw.log" 2>&1
  wait "$srv" 2>/dev/null
  bw=$(awk '$1 == 67108864 {print $4 " Gb/s average"}' "$OUT/bw.log" | tail -n1)
  if [ -n "$bw" ]; then say ib_write_bw PASS "64 MiB messages: $bw"
  else say ib_write_bw FAIL "see $OUT/bw.log"; fi
else
  say ib_write_bw SKIP "${dev:+no ib_write_bw (perftest)}${dev:-no RDMA device}"
fi

echo
echo "device check summary ($(( $(date +%s) - START ))s, logs in $OUT):"
printf '%s\n' "${SUMMARY[@]}"
printf '%s\n' "${SUMMARY[@]}" | grep -q ": FAIL" && exit 1
exit 0
