"""``kvstored`` / ``python -m kvstored``: the daemon's entry point.

Every way a start can fail ends the same: one line, ``kvstored: error: ...``, on
stderr and exit status 2 (systemd's RestartPreventExitStatus=2: restarting will not
fix it). A bug's traceback goes to the log at debug level only.
"""
from __future__ import annotations

import os
import signal
import sys

# What `pip install 'kvstored[server]'` adds to the SDK's own dependencies: an install
# without the extra has the `kvstored` command but not these.
SERVER_EXTRA_MODULES = ("uvloop", "prometheus_client", "aetcd", "pyeclib")
SERVER_EXTRA_HINT = "pip install 'kvstored[server]'"


def _missing_extra(e: ModuleNotFoundError) -> str | None:
    """The one-line error for a module of the server extra that is not installed, else None."""
    top = (e.name or "").split(".")[0]
    if top not in SERVER_EXTRA_MODULES:
        return None
    return (f"the daemon needs the '{top}' package, which is not installed: "
            f"{SERVER_EXTRA_HINT} (the plain package is the SDK and kvstore-cli only)")


# glibc's malloc hands ~1 MiB buffers (EC fragments, repair batches, gRPC messages) back to
# the kernel on every free and page-faults them in again on the next allocation: a 1 MiB
# ec:4+2 encode measured 736 minor faults and 1.8 ms of system time per call, 0 and ~0.4 ms
# with these thresholds. Same effect as MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_, which
# win when the operator sets them. 32 MiB is glibc's largest mmap threshold on 64-bit.
MALLOC_MMAP_THRESHOLD = 32 << 20
MALLOC_TRIM_THRESHOLD = 256 << 20
SWITCH_INTERVAL = 0.0005  # seconds a thread may hold the GIL while another waits (see _main)


def _tune_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (the environment's win);
    False where not glibc or glibc refused."""
    from kvstore.malloc import raise_thresholds

    return raise_thresholds(MALLOC_MMAP_THRESHOLD, MALLOC_TRIM_THRESHOLD) is not False


def _settle_heap() -> None:
    """Once ready: what start-up built (modules, gRPC, the node's objects: ~34,000 objects
    the collector tracks) moves out of the collector's sight, so a full collection, which
    runs on the event loop's thread whenever enough new objects accumulate, no longer
    walks it: 3.6-5.6 ms a full collection before, ~0 after (measured with the daemon's
    imports). Objects made later are collected as before."""
    import gc
    gc.collect()
    gc.freeze()


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C before serve() took SIGINT over (imports, NVMe recovery)
        print("kvstored: interrupted during start-up", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    # SIGHUP's default action ends the process: ignored until serve() takes it over and
    # applies one that arrives during start-up once the node is ready (kvstored/node.py)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # gRPC's C core prints its own lines on stderr (a failed bind: "E1130 ... add_port.cc");
    # the daemon reports those errors itself. GRPC_VERBOSITY=debug brings them back. Set
    # before anything imports grpc (the kvstore package does, _tune_malloc included).
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    _tune_malloc()
    # Every request runs on the event loop's thread; the repair agent's threads run Python
    # beside it. The loop thread waits for the GIL at each wake-up while one of them holds
    # it, up to the switch interval: 5 ms by default, which a Python-busy thread made the
    # loop's p50 lag (5-7 ms); at 0.5 ms it is ~1 ms, and the busy thread did as much work
    # per second (benchmarks/bench_gil_switch.py; RESULTS.md "Tail latency").
    sys.setswitchinterval(SWITCH_INTERVAL)
    from kvstored.config import ConfigError, config_from_args, fail

    try:
        config, args = config_from_args(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        fail(str(e))
    if args.print_config:
        # a starting file for any host: what this host derives (the auto-sized arena, the
        # node id from its name) stays "auto" / "" unless the file or a flag set it; copied
        # as resolved, every node of a fleet would have had this one's id
        from kvstored.config import flag_overrides, unresolved_fields
        sys.stdout.write(config.to_toml(unresolved=unresolved_fields(args.config,
                                                                     flag_overrides(args))))
        return 0
    from kvstored import logs
    logs.setup(config.log_level, config.log_format)  # key=value or JSON lines on stderr
    try:
        import uvloop

        from kvstored.auth import TokensError
        from kvstored.config import flag_overrides
        from kvstored.engine.nvme import NvmeError
        from kvstored.node import ConfigSource, serve
    except ModuleNotFoundError as e:
        fail(_missing_extra(e) or f"cannot start: {e}")
    started = []  # set once ready: a later failure is a crash (traceback, exit 1, restart)
    try:
        source = ConfigSource(args.config, flag_overrides(args))  # re-read on SIGHUP
        return uvloop.run(serve(config, args.ready_file, source=source,
                                on_ready=lambda: (started.append(True), _settle_heap())))
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C before the signal handlers were set
        raise
    except Exception as e:
        if started:
            raise
        fail(_start_error(e, (ConfigError, NvmeError, TokensError)))


def _start_error(e: Exception, one_liners: tuple[type, ...]) -> str:
    """The line to print for an error before the daemon was ready."""
    if isinstance(e, one_liners):  # config, tokens, certificates, the NVMe device
        return str(e)
    if isinstance(e, OSError):  # e.g. a port in use
        return f"cannot start: {e}"
    if isinstance(e, ModuleNotFoundError):  # cluster.enabled without aetcd, ...
        return _missing_extra(e) or f"cannot start: {e}"
    # a bug: still one line on stderr; the traceback goes to the log at debug level
    import logging
    logging.getLogger("kvstored").debug("start failed", exc_info=e)
    return f"cannot start: {type(e).__name__}: {e} (--log-level debug logs the traceback)"


if __name__ == "__main__":
    sys.exit(main())
