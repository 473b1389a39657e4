# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip --disable-pip-version-check -q
ARGS   ?=

.PHONY: run install install-test test sanitize engines-env bench bench-nvme bench-deps proto clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# The NVMe tier's io_uring binding (native/uring.c) builds against the system liburing
# (Debian's liburing-dev), the SDK's placement (native/placement.c) against libxxhash
# (libxxhash-dev). Without them the install still works: the tier uses threads (loudly),
# placement hashes in Python. With both, every extension must build.
NATIVE_DEPS = /usr/include/liburing.h /usr/include/xxhash.h
# placement.c needs libxxhash >= 0.8 (XXH3 final; it #errors before: the extension is
# skipped and placement stays in Python), so an older header does not make it required
XXH_08 = awk '/define XXH_VERSION_(MAJOR|MINOR)[ \t]/ { v[$$2] = $$3 } \
  END { exit !(v["XXH_VERSION_MAJOR"] * 100 + v["XXH_VERSION_MINOR"] >= 8) }'

$(NATIVE_DEPS) &:
	@(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq liburing-dev libxxhash-dev >/dev/null) || \
	  echo "make: could not install liburing-dev/libxxhash-dev; the NVMe tier will use pread/pwrite threads, placement Python"

$(VENV)/.installed: pyproject.toml setup.py $(wildcard native/*.c) | $(VENV)/bin/python $(NATIVE_DEPS)
	KVSTORE_REQUIRE_NATIVE=$$(for h in $(NATIVE_DEPS); do test -f $$h || exit; done; \
	  $(XXH_08) /usr/include/xxhash.h || exit; echo 1) $(PIP) install -e '.[server]'
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PIP) install -e '.[server,test]'
	touch $@

install: $(VENV)/.installed

## make run: install and start kvstored with embedded defaults (ARGS="--dram-size 2GiB ...")
run: install
	$(VENV)/bin/kvstored $(ARGS)

install-test: $(VENV)/.installed-test

# The engines the adapters plug into, for tests/integrations (docs/integrations.md), in
# their own venv on CPU torch: LMCache 0.5.6 (its pins clash with the daemon's; torch first,
# then its runtime needs, then lmcache --no-deps), and SGLang's / vLLM's interface modules
# (--no-deps, each in a directory the tests put on PYTHONPATH; they pull CUDA torch otherwise).
ENGINES     = $(VENV)/engines
ENGINES_PIP = $(ENGINES)/bin/python -m pip --disable-pip-version-check -q

$(ENGINES)/bin/python:
	$(PYTHON) -m venv $(ENGINES)

$(ENGINES)/.torch: | $(ENGINES)/bin/python
	$(ENGINES_PIP) install 'torch==2.13.0'
	touch $@

$(ENGINES)/.lmcache: pyproject.toml $(ENGINES)/.torch
	$(ENGINES_PIP) install -e '.[lmcache]'
	$(ENGINES_PIP) install --no-deps 'lmcache==0.5.6'
	PYTHONPATH=client $(ENGINES)/bin/python -c 'import lmcache.v1.cache_engine, kvstore.integrations.lmcache'
	touch $@

$(ENGINES)/.%: tests/integrations/requirements-%.txt $(ENGINES)/.torch
	rm -rf $(ENGINES)/$*
	$(ENGINES_PIP) install --no-deps --target $(ENGINES)/$* -r $<
	touch $@

## make engines-env: LMCache, SGLang's and vLLM's interfaces for tests/integrations
engines-env: $(ENGINES)/.lmcache $(ENGINES)/.sglang $(ENGINES)/.vllm

# make test runs the suite in TEST_WORKERS processes (pytest-xdist), one test file per
# worker at a time (--dist loadfile: a module's shared daemons stay in its process). Most
# of a test's time is spent waiting on daemons, etcd and subprocesses, so two workers
# overlap that waiting on 2 cores. TEST_WORKERS=0: one process, as plain pytest runs.
TEST_WORKERS ?= 2

## make test: install what the tests need and run them
test: install-test
	@# tests/ops: systemd-analyze verifies the unit file, curl scrapes /metrics (skipped if absent)
	@command -v systemd-analyze >/dev/null && command -v curl >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd curl >/dev/null) || \
	  echo "make test: could not install systemd/curl; their checks will be skipped"
	@# tests/daemon/test_portable.py: the daemon on a CPU without AVX-512 (qemu-user, EPYC-Milan)
	@command -v qemu-x86_64 >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user >/dev/null) || \
	  echo "make test: could not install qemu-user; the portability test will be skipped"
	@# tests/rdma: rdma-core's user space and pyverbs (Debian's build, linked into the venv so the
	@# pyverbs layer is checked against the real module; without a device those tests skip)
	@test -d /usr/lib/python3/dist-packages/pyverbs || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rdma-core ibverbs-providers ibverbs-utils python3-pyverbs perftest >/dev/null) || \
	  echo "make test: could not install rdma-core/python3-pyverbs; the pyverbs checks will be skipped"
	@test ! -d /usr/lib/python3/dist-packages/pyverbs || \
	  ln -sfn /usr/lib/python3/dist-packages/pyverbs $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/pyverbs
	@# tests/cluster: a real etcd (Debian's etcd-server); the tests skip when it is missing
	@command -v etcd >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null) || \
	  echo "make test: could not install etcd-server; tests/cluster membership tests will be skipped"
	@$(MAKE) --no-print-directory -k engines-env || \
	  echo "make test: could not install every engine into $(ENGINES); tests/integrations says which tests skip and why"
	@# --durations: the slowest tests, in CI's log, to keep the suite near its ~10 minutes
	KVSTORE_ENGINES=$(abspath $(ENGINES)) $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=20 $(ARGS)

## make sanitize: native/*.c under ASan + UBSan, built in a scratch copy of the tree: a random
## stress of the packed index and the tests that run native code (not in `make test`: ~11 min)
sanitize: install-test
	PY=$(abspath $(PY)) scripts/sanitize.sh $(ARGS)

bench-deps: install
	$(PIP) install -e '.[server,bench]'
	command -v redis-server >/dev/null && command -v iperf3 >/dev/null && command -v fio >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server iperf3 fio >/dev/null)

## make bench: TCP put/get beside iperf3 and Redis (writes benchmarks/out/)
bench: bench-deps
	$(PY) benchmarks/bench_tcp.py $(ARGS)

## make bench-nvme: NVMe tier demotion and gets beside fio (files under benchmarks/out/)
bench-nvme: bench-deps
	$(PY) benchmarks/bench_nvme.py $(ARGS)

## make proto: regenerate client/kvstore/v1 from proto/
proto: install
	$(PIP) install 'grpcio-tools==1.85.1'
	$(PY) -m grpc_tools.protoc -I proto --python_out=client --grpc_python_out=client --pyi_out=client proto/kvstore/v1/control.proto

clean:
	rm -rf $(VENV) build *.egg-info client/*.egg-info
