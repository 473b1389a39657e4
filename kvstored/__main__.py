"""``kvstored`` / ``python -m kvstored``: the daemon's entry point."""
from __future__ import annotations

import logging
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
    logging.basicConfig(
        level=config.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s level=%(levelname)s logger=%(name)s msg=\"%(message)s\"")
    import uvloop

    from kvstored.node import serve
    try:
        return uvloop.run(serve(config, args.ready_file))
    except OSError as e:  # e.g. port in use: one clear line, not a traceback
        fail(f"cannot start: {e}")


if __name__ == "__main__":
    sys.exit(main())
