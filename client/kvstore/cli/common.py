"""What every kvstore-cli command shares: exit codes, human-readable sizes and spans,
tables, JSON output, the progress line, keys as typed and shown, TLS from the options."""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from typing import Sequence

from .. import errors
from .._common import TLSConfig
from ..wire import key_bytes

PROG = "kvstore-cli"
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2  # argparse's own convention
EXIT_UNAVAILABLE = 3
EXIT_DENIED = 4  # PermissionDenied: a token or certificate to fix, not a store error
EXIT_INTERRUPTED = 130


def human_size(n: float) -> str:
    """``1536 -> "1.5 KiB"``: binary units, like the daemon's configuration."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    """Short spans (latencies) with a unit that keeps 2-3 significant digits."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"  # ASCII "us": stdout may not be UTF-8
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def human_age(seconds: float) -> str:
    """Long spans (uptime, object age): the two largest units are enough."""
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    s = int(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if s >= size or parts:
            parts.append(f"{s // size}{unit}")
            s %= size
    return " ".join(parts[:2])


def table(header: Sequence[str], rows: Sequence[Sequence], right: Sequence[int] = ()) -> str:
    """Columns padded to their widest cell; numeric columns (``right``) right-aligned."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for r in cells:
        line = "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(r, widths)))
        lines.append(line.rstrip())
    return "\n".join(lines)


def fields(pairs: Sequence[tuple[str, object]]) -> str:
    """``label  value`` lines with the values lined up."""
    w = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in pairs)


def emit_json(doc) -> None:
    json.dump(doc, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams (tests, daemons)
        return False


def _columns(stream) -> int:
    """Width of the terminal ``stream`` is on (stdout may be a pipe meanwhile)."""
    try:
        cols = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        cols = 0
    # 0: a terminal that never set its size (a fresh pty): $COLUMNS or 80
    return cols or shutil.get_terminal_size((80, 24)).columns


class Progress:
    """The progress line of a long command (bench, drain --wait), always on stderr so
    that stdout keeps only the result (--json: one document).

    On a terminal the line is rewritten in place, at most every TTY_INTERVAL seconds,
    and erased by ``done()``. Forced on elsewhere (--progress into a pipe or a log) it
    prints whole lines instead: a changed text at most every LINE_INTERVAL seconds, an
    unchanged one every LINE_REPEAT seconds, so a log stays short but shows it is alive.
    """

    TTY_INTERVAL = 0.1
    LINE_INTERVAL = 1.0
    LINE_REPEAT = 10.0

    def __init__(self, mode: bool | None, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _isatty(self.stream)
        self.enabled = self.tty if mode is None else mode
        self._last_time = -math.inf
        self._last_text = ""
        self._width = 0  # characters on the terminal line now (to erase)

    def update(self, text: str) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            if now - self._last_time < self.TTY_INTERVAL:
                return
            # one terminal line: a wrapped line could not be rewritten by "\r"
            cols = _columns(self.stream)
            text = text[:max(10, cols - 1)]
            pad = " " * max(0, self._width - len(text))
            self.stream.write(f"\r{text}{pad}")
            self._width = len(text)
        else:
            since = now - self._last_time
            if since < (self.LINE_INTERVAL if text != self._last_text else self.LINE_REPEAT):
                return
            self.stream.write(text + "\n")
        self.stream.flush()
        self._last_time, self._last_text = now, text

    def done(self) -> None:
        """Erase the terminal line (the result follows on stdout)."""
        if self.enabled and self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


def parse_key(text: str, hex_mode: bool) -> bytes:
    """A key from the command line, validated here so a bad one never reaches the daemon."""
    if hex_mode:
        try:
            k = bytes.fromhex(text)
        except ValueError as e:
            raise errors.InvalidArgument(f"invalid hex key {text[:80]!r}: {e}") from None
    else:
        # surrogateescape: argv bytes that were not UTF-8 come back exactly as typed
        k = text.encode("utf-8", "surrogateescape")
    try:
        return key_bytes(k)
    except errors.InvalidArgument as e:
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise errors.InvalidArgument(f"key {shown!r}: {e.message}") from None


def show_key(k: bytes, hex_mode: bool) -> str:
    """Text when the key is printable UTF-8 (the common case), else ``0x``-prefixed hex."""
    if hex_mode:
        return k.hex()
    try:
        s = k.decode("utf-8")
    except UnicodeDecodeError:
        return "0x" + k.hex()
    return s if s.isprintable() else "0x" + k.hex()


def key_doc(k: bytes) -> dict:
    """JSON form of a key: the exact bytes as hex, plus text when it decodes."""
    try:
        text = k.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    return {"key": text, "key_hex": k.hex()}


def arg_keys(args) -> list[bytes]:
    return [parse_key(k, args.hex) for k in args.keys]


def tls_config(args) -> TLSConfig | None:
    if args.tls or args.tls_ca or args.tls_cert or args.tls_key or args.tls_server_name:
        return TLSConfig(ca_file=args.tls_ca, cert_file=args.tls_cert, key_file=args.tls_key,
                         server_name=args.tls_server_name)
    return None


def one_line(text: str) -> str:
    return " ".join(str(text).split())  # gRPC details can span lines; the contract is one line
