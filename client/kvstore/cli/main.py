"""The argument parser and the entry point: one Client per invocation, typed errors
turned into one stderr line and an exit code."""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import Callable, Sequence

from .. import __version__, errors
from ..client import Client
from .admin import (DRAIN_POLL_SECONDS, DRAIN_WAIT_TIMEOUT, PROBE_TIMEOUT, cmd_drain, cmd_nodes,
                    cmd_policy_ls, cmd_policy_rm, cmd_policy_set, cmd_reload, cmd_stats,
                    cmd_status)
from .bench import cmd_bench
from .common import (EXIT_DENIED, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_UNAVAILABLE, EXIT_USAGE,
                     PROG, one_line, tls_config)
from .data import (cmd_delete_all, cmd_exists, cmd_get, cmd_lookup, cmd_ls, cmd_pin, cmd_put,
                   cmd_rm, cmd_unpin)

DEFAULT_ADDRESS = "127.0.0.1:7070"
DEFAULT_NAMESPACE = "default"

_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(?:i?b)?\s*", re.IGNORECASE)
_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}


def parse_size(text: str) -> int:
    """``"64KiB"``, ``"1M"``, ``"4096"`` -> bytes. All units binary (K = KB = KiB),
    matching kvstored's own size settings so the same strings mean the same sizes."""
    m = _SIZE_RE.fullmatch(text)
    if not m:
        raise argparse.ArgumentTypeError(f"cannot parse {text!r} as a size (e.g. 4096, 64KiB, 1MiB)")
    n = float(m.group(1)) * (1 << _SHIFT[m.group(2).lower()])
    if n < 1 or n != int(n):
        raise argparse.ArgumentTypeError(f"size {text!r} must be a whole number of bytes >= 1")
    return int(n)


def _positive(kind: type) -> Callable[[str], float]:
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        if not (v > 0 and math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
        return v
    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def _address(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        # argparse checks the default too: say so when the bad value came from there
        env = " (from KVSTORE_ADDRESS)" if text == os.environ.get("KVSTORE_ADDRESS") else ""
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}{env}")
    return text


GLOBAL_GROUP = "global options (also accepted before the command)"


def _add_global_options(p, defaults: bool, timeout: bool = True) -> None:
    """The global options, on the main parser (with defaults) and again on every
    subcommand (default SUPPRESS, so they only override when given): both
    ``kvstore-cli --json stats`` and ``kvstore-cli stats --json`` work. ``p`` is a parser
    or an argument group (a subcommand's own group, listed after its own options)."""
    env = os.environ

    def d(value):
        return value if defaults else argparse.SUPPRESS

    p.add_argument("-a", "--address", type=_address,
                   default=d(env.get("KVSTORE_ADDRESS") or DEFAULT_ADDRESS),
                   help="control (gRPC) address HOST:PORT (env KVSTORE_ADDRESS; default %s)"
                        % DEFAULT_ADDRESS)
    p.add_argument("-n", "--namespace", default=d(env.get("KVSTORE_NAMESPACE") or DEFAULT_NAMESPACE),
                   help="namespace (env KVSTORE_NAMESPACE; default %s)" % DEFAULT_NAMESPACE)
    if timeout:
        p.add_argument("--timeout", type=_positive(float), default=d(10.0), metavar="SECONDS",
                       help="give up on an unreachable or silent daemon after this long "
                            "(default 10)")
    p.add_argument("--data-address", default=d(None), type=_address, metavar="HOST:PORT",
                   help="data-path address, when the one the daemon advertises is not reachable "
                        "from here (e.g. it listens on 0.0.0.0)")
    p.add_argument("--json", action="store_true", default=d(False),
                   help="print one JSON document on stdout")
    p.add_argument("--hex", action="store_true", default=d(False),
                   help="keys are given and shown as hex instead of UTF-8 text")
    # TCP by default: the shm path maps and prefaults the daemon's whole arena at connect
    # (~0.2 s per GiB), far more than one short command gains from it
    p.add_argument("--shm", action="store_true", default=d(False),
                   help="data commands use the same-host shared-memory path (required: exit 3 "
                        "if the daemon offers none here); it maps the daemon's whole arena at "
                        "connect, so it pays off only for large transfers (default: TCP)")
    p.add_argument("--no-shm", dest="shm", action="store_false", default=d(False),
                   help="data commands use TCP (the default)")
    p.add_argument("--rdma", action="store_true", default=d(False),
                   help="data commands use RDMA when this host and the daemon can (else TCP, "
                        "and `status` says why)")
    p.add_argument("--progress", action="store_true", default=d(None),
                   help="progress line on stderr for long commands (bench, drain --wait) "
                        "even when stderr is not a terminal (default: only on a terminal)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=d(None),
                   help="no progress line, even on a terminal")
    p.add_argument("--token", default=d(env.get("KVSTORE_TOKEN") or None), metavar="TOKEN",
                   help="auth token (env KVSTORE_TOKEN, which keeps it out of the process list)")
    p.add_argument("--tls", action="store_true", default=d(False),
                   help="talk TLS, trusting the system CAs (implied by --tls-ca/--tls-cert)")
    p.add_argument("--tls-ca", default=d(env.get("KVSTORE_TLS_CA") or None), metavar="FILE",
                   help="CA certificate that signed kvstored's certificate (env KVSTORE_TLS_CA)")
    p.add_argument("--tls-cert", default=d(env.get("KVSTORE_TLS_CERT") or None), metavar="FILE",
                   help="client certificate, for mutual TLS (env KVSTORE_TLS_CERT)")
    p.add_argument("--tls-key", default=d(env.get("KVSTORE_TLS_KEY") or None), metavar="FILE",
                   help="client private key (env KVSTORE_TLS_KEY; default: in --tls-cert)")
    p.add_argument("--tls-server-name", default=d(None), metavar="NAME",
                   help="name to verify in kvstored's certificate, when not the address's host")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Inspect and use a kvstored KV-block store.",
        # a usage error prints this line and the error, not all fifteen global options
        # (--help lists them)
        usage=f"{PROG} [global options] COMMAND [options] (COMMAND --help: its options)",
        epilog="data commands use TCP unless --shm is given. exit codes: 0 ok, 1 error "
               "reported by the store, 2 usage, 3 daemon unreachable (or no shm path for --shm), "
               "4 permission denied (token or certificate); on an error stdout stays empty, "
               "--json included, and stderr has one line (a usage error: the usage line, "
               "then the error)")
    _add_global_options(parser, defaults=True)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # prog: a command is "kvstore-cli drain" in its usage and errors (not the usage line above)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, prog=PROG)
    # every subcommand gets the global options too, added last (below) so that its help
    # and usage show the command's own options first
    commands: list[argparse.ArgumentParser] = []

    def command(name: str, fn, help: str, needs_parser: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        # a command's own usage errors (drain NODE unknown, put - without --key) show that
        # command's usage line, not the whole program's
        p.set_defaults(func=(lambda c, a: fn(c, a, a.command_parser)) if needs_parser else fn)
        commands.append(p)
        return p

    command("status", cmd_status, "node identity, addresses, health, uptime and limits")
    command("stats", cmd_stats, "counters, per-tier usage and per-namespace object counts")
    command("nodes", cmd_nodes, "cluster members as this daemon sees them (etcd, static or "
                                "standalone): draining/placement flags, each member's own repair "
                                "progress (asked of it, %gs timeout), the policies and the epoch"
                                % PROBE_TIMEOUT)

    p = command("drain", cmd_drain, "admin: take a node out of placement and move its records "
                                    "to the other members (or --cancel); --wait until it is "
                                    "empty and safe to stop", needs_parser=True)
    p.add_argument("node", metavar="NODE",
                   help="node id or control address, as `nodes` lists them (looked up in the "
                        "member list of the node at --address)")
    p.add_argument("--cancel", action="store_true",
                   help="stop draining: the node takes new placements again")
    p.add_argument("--wait", action="store_true",
                   help="poll the node every %gs, printing progress, until it holds no objects"
                        % DRAIN_POLL_SECONDS)
    p.add_argument("--timeout", dest="wait_timeout", type=_positive(float),
                   default=DRAIN_WAIT_TIMEOUT, metavar="SECONDS",
                   help="with --wait: give up (exit 1) when the node still holds objects after "
                        "this long (default %g; the drain itself goes on)" % DRAIN_WAIT_TIMEOUT)

    pol = sub.add_parser("policy", help="admin: cluster-wide redundancy policies per namespace "
                                        "(ls, set, rm)",
                         description="Cluster-wide redundancy policies per namespace, kept in "
                                     "etcd. POLICY is none, replicas:N (N copies) or ec:K+M "
                                     "(erasure coding: K data + M parity fragments); NAMESPACE * "
                                     "is the default for namespaces without their own policy.")
    polsub = pol.add_subparsers(dest="policy_command", metavar="ACTION", required=True)

    def policy_action(name: str, fn, help: str) -> argparse.ArgumentParser:
        q = polsub.add_parser(name, help=help, description=help)
        q.set_defaults(func=fn)
        commands.append(q)
        return q

    policy_action("ls", cmd_policy_ls, "the policies in force (namespace -> policy)")
    q = policy_action("set", cmd_policy_set, "set a namespace's policy; the daemon refuses one "
                                             "the cluster has too few members for")
    q.add_argument("policy_namespace", metavar="NAMESPACE", help='namespace; "*" = the default')
    q.add_argument("policy", metavar="POLICY", help="none | replicas:N | ec:K+M")
    q = policy_action("rm", cmd_policy_rm, "remove a namespace's own policy (it falls back to "
                                           "the default, \"*\")")
    q.add_argument("policy_namespace", metavar="NAMESPACE", help='namespace; "*" = the default')

    p = command("put", cmd_put, "store a file (or stdin) under a key", needs_parser=True)
    p.add_argument("file", metavar="FILE", help="file to store; - reads stdin (then --key is required)")
    p.add_argument("--key", "-k", help="key (default: the file's base name)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the object if the key holds different bytes (else: Conflict)")

    p = command("get", cmd_get, "fetch an object into a file (or stdout)", needs_parser=True)
    p.add_argument("key", metavar="KEY")
    p.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="where to write the bytes; - writes them to stdout")

    for name, fn, help in (
            ("exists", cmd_exists, "which of the keys are stored (exit 0 either way)"),
            ("lookup", cmd_lookup, "how many leading keys are stored: the prefix hit N/M"),
            ("pin", cmd_pin, "protect objects from eviction for --ttl seconds"),
            ("unpin", cmd_unpin, "release pins"),
            ("rm", cmd_rm, "delete objects (absent keys are not an error)")):
        p = command(name, fn, help)
        p.add_argument("keys", nargs="+", metavar="KEY")
        if name == "pin":
            p.add_argument("--ttl", type=_positive(float), default=60.0, metavar="SECONDS",
                           help="pin lease in seconds (default 60; the daemon refuses more than its "
                                "engine.max_pin_ttl, 86400 by default)")

    p = command("ls", cmd_ls, "a sample of stored objects and the total count")
    p.add_argument("--limit", type=_positive(int), default=50, metavar="N",
                   help="at most N entries (default 50; the daemon caps at 10000)")
    p.add_argument("--all-namespaces", "-A", action="store_true", help="list every namespace")

    p = command("delete-all", cmd_delete_all, "admin: delete every object of the namespace",
                needs_parser=True)
    p.add_argument("--all-namespaces", "-A", action="store_true", help="of every namespace")
    p.add_argument("--yes", action="store_true", help="really delete (required)")
    command("reload", cmd_reload, "admin: re-read config, tokens and certificates (like SIGHUP)")

    p = command("bench", cmd_bench, "throughput and latency of data-path put/get; "
                                    "deletes its keys afterwards")
    p.add_argument("--size", type=parse_size, default=1 << 20, metavar="SIZE",
                   help="object size, e.g. 64KiB, 1MiB (default 1MiB)")
    p.add_argument("--count", type=_positive(int), default=32, metavar="N",
                   help="distinct objects (default 32)")
    p.add_argument("--duration", type=_positive(float), default=None, metavar="SECONDS",
                   help="repeat passes over the objects for this long per op (default: one pass)")
    p.add_argument("--op", choices=("put", "get", "both"), default="both")

    for p in commands:
        _add_globals_last(p)
        p.set_defaults(command_parser=p)
    return parser


def _add_globals_last(p: argparse.ArgumentParser) -> None:
    """Give a subcommand the global options in a group of their own after its own options;
    its usage line names only its own options, then ``[global options]``."""
    own = p.format_usage().strip()
    if own.startswith("usage: "):
        own = own[len("usage: "):]
    p.usage = own.replace("%", "%%") + " [global options]"
    # drain has a --timeout of its own (how long --wait waits); the global one still works
    # before the command: kvstore-cli --timeout 5 drain NODE --wait --timeout 900
    has_timeout = any("--timeout" in a.option_strings for a in p._actions)
    _add_global_options(p.add_argument_group(GLOBAL_GROUP), defaults=False, timeout=not has_timeout)


_REFUSED = re.compile(r"connection refused|errno 111|econnrefused", re.IGNORECASE)
# gRPC's words for a peer that answers, but not in HTTP/2 (kvstored's data or metrics port)
_NOT_GRPC = re.compile(r"failed parsing http/2|http1\.x server", re.IGNORECASE)
# ... and one that answers in HTTP/2 but not as gRPC (a proxy or web server: "404")
_HTTP2_NOT_GRPC = re.compile(r"received http2 header with status", re.IGNORECASE)
_ADDRESSES = re.compile(r"(?<![\w.:])((?:\d{1,3}\.){3}\d{1,3}:\d+|\[[0-9a-fA-F:]+\]:\d+)")


def _error_text(e: errors.KVStoreError, args) -> str:
    """The one line for a typed error; a refused connection says where and what to check
    instead of gRPC's or the socket's wording."""
    text = one_line(e.message)
    # another member's address (drain, nodes probe the members themselves): its own words
    other = isinstance(e, errors.Unavailable) and args.address not in text and \
        "data path" not in text and any(a != args.data_address for a in _ADDRESSES.findall(text))
    if other:
        return text
    if isinstance(e, errors.Unavailable) and _REFUSED.search(text):
        if "data path" in text and args.address not in text:
            # the control address answered, so the daemon runs: its data port is what is missing
            where = args.data_address or f"the address kvstored at {args.address} advertises"
            return (f"cannot connect to the kvstored data path at {where}: connection refused "
                    "(is that port reachable from here? --data-address overrides it)")
        return (f"cannot connect to kvstored at {args.address}: connection refused "
                "(is kvstored running?)")
    if isinstance(e, errors.Unavailable) and _HTTP2_NOT_GRPC.search(text):
        return (f"{args.address} answers, but not as kvstored's control (gRPC) port ({text}): "
                f"-a takes kvstored's control port ({DEFAULT_ADDRESS} by default)")
    if isinstance(e, errors.Unavailable) and _NOT_GRPC.search(text):
        return (f"{args.address} answers, but not as kvstored's control (gRPC) port: is it the "
                f"data or metrics port? -a takes the control port ({DEFAULT_ADDRESS} by default)")
    # the SDK's wording for what the user asked as --shm
    return text.replace("shm=True but", "--shm given but")


def _transport(args) -> dict:
    """The Client arguments for the data path this invocation asked for: TCP by default,
    --shm requires shared memory, --rdma tries RDMA and falls back to TCP (with the reason)."""
    if args.shm:
        return {"transport": "shm"}
    if getattr(args, "rdma", False):
        return {"transport": "auto", "shm": False}  # auto without shm: RDMA, then TCP
    return {"transport": "tcp"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            # refused by the command's own parser, so the usage shown is that command's
            getattr(args, "command_parser", parser).error(
                "unrecognized arguments: " + " ".join(unknown))
        tls = tls_config(args)
        if args.shm and (tls is not None or args.data_address):
            # the shm path is a local socket: neither TLS nor a TCP data address applies to it
            getattr(args, "command_parser", parser).error(
                "--shm cannot be combined with --data-address or TLS options")
    except SystemExit as e:  # usage error (2) or --help/--version (0): return it, don't exit
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    try:
        # TCP unless --shm (a one-shot command gains nothing from mapping the arena or
        # registering RDMA memory); ride_out_restarts=False: a one-shot command has no
        # restart to wait out, so a refused connection is reported at once
        with Client(args.address, namespace=args.namespace, timeout=args.timeout,
                    data_address=args.data_address, tls=tls, token=args.token,
                    ride_out_restarts=False, **_transport(args)) as c:
            return args.func(c, args)
    except SystemExit as e:  # parser.error() from inside a command
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    except errors.KVStoreError as e:
        if not isinstance(e, errors.Unavailable) and _HTTP2_NOT_GRPC.search(e.message):
            # an HTTP/2 server that is not gRPC (a proxy, a web server) answered the call:
            # no kvstored there, so exit 3 like any address without one
            e = errors.Unavailable(e.message)
        print(f"{PROG}: {e.name}: {_error_text(e, args)}", file=sys.stderr)
        # Timeout is a subclass of Unavailable: both mean "no daemon to talk to"
        if isinstance(e, errors.Unavailable):
            return EXIT_UNAVAILABLE
        return EXIT_DENIED if isinstance(e, errors.PermissionDenied) else EXIT_ERROR
    except BrokenPipeError:
        # `kvstore-cli get k -o - | head`: the reader left; stay quiet like other tools do,
        # and point stdout at /dev/null so the interpreter's final flush does not complain
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_ERROR
    except OSError as e:  # local files: put FILE, get -o FILE
        where = f"{e.filename}: " if e.filename else ""
        print(f"{PROG}: {type(e).__name__}: {where}{one_line(e.strerror or e)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
