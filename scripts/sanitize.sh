#!/usr/bin/env bash
# The native extensions (native/*.c, as setup.py lists them) under AddressSanitizer and
# UndefinedBehaviorSanitizer, built into a scratch copy of the working tree (uncommitted
# edits included) so the checkout's own build is untouched; then random stresses of the
# packed index and the frame parser (scripts/stress_index.py, stress_frame.py) and the
# tests that run native code, daemons included, against that build. Not part of
# `make test`: ~15-20 min on 2 cores.
#
#   scripts/sanitize.sh                  (make sanitize) the default tests below
#   scripts/sanitize.sh tests/x.py -k y  these pytest arguments instead (make sanitize ARGS=...)
#   STRESS_SECONDS=300 scripts/sanitize.sh   longer stresses (default 60 s each)
#   KEEP=1 scripts/sanitize.sh           keep the scratch copy (its path is printed)
#
# Python is not ASan-built: libasan and libubsan are preloaded (children and daemons
# inherit them) and PYTHONMALLOC=malloc puts Python's own objects under ASan too, so an
# overrun of a bytes object or a buffer is caught. Leak checking is off (CPython does not
# free everything at exit). ASan's reports go to files too (a daemon's stderr is often a
# pipe), printed at the end; UBSan's go to stderr (pytest runs with --capture=sys so they
# reach the terminal) and end the process with status 1. Any report fails the run.
set -eu
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
SCRATCH=$(mktemp -d /tmp/kvstored-sanitize.XXXXXX)
cleanup() { [ "${KEEP:-0}" = 1 ] && echo "sanitize: kept $SCRATCH" || rm -rf "$SCRATCH"; }
trap cleanup EXIT

# The tracked tree plus uncommitted edits, without build outputs (no ./.venv, no old .so).
git ls-files -z --cached --others --exclude-standard | \
  (while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done) | \
  tar --null -T - -cf - | tar -xf - -C "$SCRATCH"
find "$SCRATCH/kvstored" -name '_*.so' -delete

SAN="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -O1 -g"
# Each extension setup.py declares, compiled here with the sanitizers (setup.py's own flags
# would put -O2 after ours); a missing library (liburing, libxxhash) skips that one, as
# setup.py does.
(cd "$SCRATCH" && "$PY" - "$SAN" <<'EOF'
import os, shlex, subprocess, sys, sysconfig
import setuptools
flags = shlex.split(sys.argv[1])
captured = {}
setuptools.setup = lambda **kw: captured.update(kw)
sys.argv = ["setup.py"]
exec(compile(open("setup.py").read(), "setup.py", "exec"))
inc = sysconfig.get_paths()["include"]
suffix = sysconfig.get_config_var("EXT_SUFFIX")
for ext in captured["ext_modules"]:
    pkg, mod = ext.name.rsplit(".", 1)  # kvstore lives in client/ (setup.py's package_dir)
    out = os.path.join(captured["package_dir"].get(pkg, pkg), mod + suffix)
    cmd = (["gcc", "-shared", "-fPIC", "-Wall", "-fno-strict-aliasing", f"-I{inc}"]
           + flags + ext.sources + ["-o", out]
           + [f"-l{lib}" for lib in ext.libraries])
    r = subprocess.run(cmd, capture_output=True, text=True)
    print(f"sanitize: {ext.name}: {'built' if r.returncode == 0 else 'NOT built'} -> {out}")
    if r.returncode:
        print(r.stderr[-2000:], file=sys.stderr)
        if ext.name not in ("kvstored._uring", "kvstore._placement"):  # optional: system libraries
            sys.exit(1)
EOF
)

for lib in "$(gcc -print-file-name=libasan.so)" "$(gcc -print-file-name=libubsan.so)"; do
  [ -f "$lib" ] || { echo "sanitize: no $lib (gcc's libasan / libubsan are needed)" >&2; exit 2; }
done
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
REPORTS=$SCRATCH/sanitizer-reports
mkdir -p "$REPORTS"
ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:strict_string_checks=1
export ASAN_OPTIONS=$ASAN_OPTIONS:detect_stack_use_after_return=1:log_path=$REPORTS/asan
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:log_path=$REPORTS/ubsan
export PYTHONMALLOC=malloc
# The scratch copy's packages come first (the venv's editable install points at ROOT); the
# tests' daemons and child processes inherit all of this.
export PYTHONPATH="$SCRATCH:$SCRATCH/client${PYTHONPATH:+:$PYTHONPATH}"
export KVSTORE_REQUIRE_NATIVE=1
cd "$SCRATCH"
"$PY" - "$SCRATCH" <<'EOF' || { echo "sanitize: an unsanitized extension was imported" >&2; exit 1; }
import glob, importlib, os, sys
bad = False
for so in sorted(glob.glob("kvstored/_*.so") + glob.glob("client/kvstore/_*.so")):
    pkg = "kvstore" if so.startswith("client/") else "kvstored"
    m = importlib.import_module(pkg + "." + os.path.basename(so).split(".")[0])
    print("sanitize: importing", m.__file__)
    bad |= not m.__file__.startswith(sys.argv[1] + "/")
sys.exit(bad)
EOF

rc=0
"$PY" scripts/stress_index.py --seconds "${STRESS_SECONDS:-60}" || rc=1
"$PY" scripts/stress_frame.py --seconds "${STRESS_SECONDS:-60}" || rc=1
if [ $# -eq 0 ]; then
  # the files that run native code (those absent from this tree are left out); the two
  # tests deselected assert the event loop's CPU time between requests, which a build
  # 3-5x slower under the sanitizers exceeds (their code runs in the rest of their files)
  set --
  for f in tests/unit/test_packed_index.py tests/unit/test_packed_index_review.py \
      tests/unit/test_index_keyless.py tests/unit/test_nvme_keys.py tests/unit/test_nvmeformat.py \
      tests/unit/test_policy.py tests/unit/test_store_dram.py tests/unit/test_store_entries.py \
      tests/unit/test_put_path_lookups.py tests/unit/test_frame_native.py tests/unit/test_wire.py \
      tests/unit/test_session.py tests/unit/test_put_native.py tests/unit/test_put_buffered.py \
      tests/unit/test_uring_threads.py tests/cluster/test_placement_equivalence.py \
      tests/engine tests/daemon/test_nvme_tier.py \
      tests/daemon/test_delete_all_nvme.py tests/daemon/test_dram_tier.py \
      tests/daemon/test_dedup.py tests/daemon/test_delete_each.py \
      tests/daemon/test_dataplane_bad_input.py; do
    if [ -e "$f" ]; then set -- "$@" "$f"; fi
  done
  set -- "$@" -k "not keeps_the_loop_serving and not serves_the_data_path_and_stays_deleted"
fi
"$PY" -m pytest -q -p no:cacheprovider -p no:xdist --capture=sys "$@" || rc=1
if compgen -G "$REPORTS/*" >/dev/null; then
  echo "sanitize: sanitizer reports:" >&2
  for f in "$REPORTS"/*; do echo "== $f" >&2; head -60 "$f" >&2; done
  rc=1
fi
# a failed test without a report is not a memory error (e.g. a time bound under the slow build)
echo "sanitize: $([ $rc = 0 ] && echo PASS || echo FAIL)"
exit $rc
