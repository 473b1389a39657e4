"""``kvstore-cli``: inspect and poke a kvstored from the shell.

    kvstore-cli -a 127.0.0.1:7070 status
    kvstore-cli put ./block.bin --key blk0
    kvstore-cli get blk0 -o - | xxd | head
    kvstore-cli bench --size 1MiB --count 64 --op both
    kvstore-cli nodes                      # members, flags, per-node repair, policies, epoch
    kvstore-cli drain node-b --wait        # empty node-b, then say it is safe to stop
    kvstore-cli policy set llama ec:4+2    # also: policy ls, policy rm NAMESPACE

Every command is a thin wrapper over the blocking :class:`kvstore.Client`, so what
the CLI sees is what an application sees. Output is aligned text for people, or
one JSON document on stdout with ``--json`` for scripts. Long commands (bench,
drain --wait) show a progress line on stderr when it is a terminal (``--progress``
forces it, ``--no-progress`` drops it); stdout only ever carries the result.

Data commands use TCP unless ``--shm`` is given: the same-host shared-memory path
maps and prefaults the daemon's whole arena when it connects (~0.2 s per GiB), which
a one-shot command never wins back. put, get and bench say which one they used.

Exit codes: 0 ok; 1 the store (or a local file) reported an error; 2 usage error;
3 the daemon is unreachable (connection refused is reported at once, not after
--timeout), did not answer in time, or offers no shm path to ``--shm``; 4 permission
denied (a token or certificate to fix). ``exists``
and ``lookup`` exit 0 whatever they find: their answer is data, not success or failure.
"""
from __future__ import annotations

# One module per job: common (exit codes, output, progress, keys), data (put/get/...),
# admin (status/stats/nodes/drain/policy/reload), bench, main (parser, entry point).
from .admin import repair_line
from .common import (EXIT_DENIED, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_UNAVAILABLE,
                     EXIT_USAGE, PROG, Progress, human_age, human_duration, human_size, parse_key, show_key)
from .main import build_parser, main, parse_size

__all__ = ["EXIT_DENIED", "EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_UNAVAILABLE", "EXIT_USAGE", "PROG",
           "Progress", "build_parser", "human_age", "human_duration", "human_size", "main",
           "parse_key", "parse_size", "repair_line", "show_key"]
