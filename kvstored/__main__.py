"""``kvstored`` / ``python -m kvstored``: the daemon's entry point."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from kvstored.config import ConfigError, config_from_args, fail

    try:
        config, args = config_from_args(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        fail(str(e))
    if args.print_config:
        sys.stdout.write(config.to_toml())
        return 0
    from kvstored import logs
    logs.setup(config.log_level, config.log_format)  # key=value or JSON lines on stderr
    import uvloop

    from kvstored.engine.nvme import NvmeError
    from kvstored.node import serve
    try:
        from kvstored.config import flag_overrides
        from kvstored.node import ConfigSource
        source = ConfigSource(args.config, flag_overrides(args))  # re-read on SIGHUP
        return uvloop.run(serve(config, args.ready_file, source=source))
    except NvmeError as e:  # device problems found at start: one clear line, exit 2
        fail(str(e))
    except OSError as e:  # e.g. port in use: one clear line, not a traceback
        fail(f"cannot start: {e}")


if __name__ == "__main__":
    sys.exit(main())
