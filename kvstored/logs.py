"""Structured logs: one line per event, ``key=value`` (``kv``, the default) or JSON.

Every line carries ``ts`` (UTC, ISO 8601, milliseconds), ``level``, ``logger``
and ``msg``; fields passed with ``extra=`` follow, so an error on the data
path reads::

    ts=2026-01-05T10:11:12.345Z level=info logger=kvstored.tcp msg="closing data connection: bad frame magic" req_id=7 peer=10.0.0.5:51234

and the same event as JSON is ``{"ts": ..., "level": "info", ..., "req_id": 7, "peer": "10.0.0.5:51234"}``.

No storms: a line repeated (same logger, level and message template: the arguments,
an offset, a key, a reason, and fields such as the peer may differ) is written at most
``RATE_BURST`` times per ``RATE_WINDOW`` seconds
at info and above; the first one after a quiet spell carries ``suppressed=N``, the
number left out (:class:`RateLimit`). Debug lines are never dropped: asking for them
is asking for everything.

No secrets: a field whose name looks like a credential (token, secret,
password, authorization, api key, private key) is written as ``[REDACTED]``,
and the message text is scrubbed of ``token=...``, ``Bearer ...`` and the like
(:func:`redact`). Code should still never pass a secret to a logger: the
scrubber is a safety net, not a licence.
"""
from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from typing import Any, TextIO

FORMATS = ("kv", "json")
REDACTED = "[REDACTED]"

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime",
                                                                         "taskName"}

_SECRET_WORDS = r"(?:token|secret|passw(?:or)?d|authorization|api[_-]?key|private[_-]?key|credential)s?"
# a name whose last word is a credential: `token`, `auth.tokens`, `x_api_key` (not `token_file`)
_SENSITIVE_NAME = re.compile(rf"(?i)(?:^|[_.\-]){_SECRET_WORDS}$")
# `token=abc`, `password: "x y"`, `Authorization: Bearer abc`, `Bearer abc`, `Basic abc`
_INLINE_SECRET = re.compile(
    rf"""(?ix)
    (?P<name>\b[\w.\-]*{_SECRET_WORDS}\b["']?\s*[=:]\s*)
        (?:(?:bearer|basic)\s+)?(?P<value>"[^"]*"|'[^']*'|[^\s,;&"']+)
    | \b(?P<scheme>bearer|basic)\s+(?P<cred>[A-Za-z0-9._~+/=\-]{{8,}})
    """)


def is_sensitive(name: str) -> bool:
    """True for field/setting names that hold credentials (``auth.tokens``, ``api_key``...)."""
    return bool(_SENSITIVE_NAME.search(name))


def redact(text: str) -> str:
    """``text`` with credential-looking values replaced by ``[REDACTED]``."""
    if not text:
        return text

    def sub(m: re.Match) -> str:
        if m.group("name") is not None:
            return m.group("name") + REDACTED
        return m.group("scheme") + " " + REDACTED

    return _INLINE_SECRET.sub(sub, text)


def redact_value(name: str, value: Any) -> Any:
    """``[REDACTED]`` when ``name`` is a credential's name, else ``value`` (strings scrubbed)."""
    if is_sensitive(name):
        return REDACTED
    if isinstance(value, str):
        return redact(value)
    return value


def _utc(created: float) -> str:
    t = time.gmtime(created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(created % 1 * 1000):03d}Z"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in vars(record).items():
        if k not in _STANDARD and not k.startswith("_"):
            out[k] = redact_value(k, v)
    return out


def _level(record: logging.LogRecord) -> str:
    return record.levelname.lower()


class KeyValueFormatter(logging.Formatter):
    """``ts=... level=... logger=... msg="..." key=value ...`` (logfmt)."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [f"ts={_utc(record.created)}", f"level={_level(record)}",
                 f"logger={record.name}", f"msg={_kv_quote(redact(record.getMessage()))}"]
        for k, v in _fields(record).items():
            parts.append(f"{k}={_kv_quote(v)}")
        if record.exc_info:
            parts.append(f"exc={_kv_quote(redact(self.formatException(record.exc_info)))}")
        elif record.stack_info:
            parts.append(f"stack={_kv_quote(record.stack_info)}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {"ts": _utc(record.created), "level": _level(record),
                               "logger": record.name, "msg": redact(record.getMessage())}
        for k, v in _fields(record).items():
            doc.setdefault(k, v)
        if record.exc_info:
            doc["exc"] = redact(self.formatException(record.exc_info))
        elif record.stack_info:
            doc["stack"] = record.stack_info
        return json.dumps(doc, default=str, ensure_ascii=False)


_SAFE = re.compile(r"[^\s=\"\\]+")


def _kv_quote(v: Any) -> str:
    if v is None:
        return '""'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v) if isinstance(v, float) else str(v)
    s = v if isinstance(v, str) else str(v)
    if s and _SAFE.fullmatch(s):
        return s
    s = s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{s}"'


def formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    if fmt == "kv":
        return KeyValueFormatter()
    raise ValueError(f"log format {fmt!r} is not one of {', '.join(FORMATS)}")


# A client hammering the data port with broken frames, or a failure repeating every
# maintenance pass, must not bury the log: this many lines of one kind per window.
RATE_BURST = 10
RATE_WINDOW = 60.0
_RATE_KINDS = 4096  # kinds remembered at once (a bound on the filter's memory)


class RateLimit(logging.Filter):
    """At most ``burst`` lines of one kind (logger, level, message template: a failing
    device's errors differ in their offsets, not in kind) per ``window``
    seconds at info and above. The last line let through says so (``rate_limited``);
    the first one of the kind after its window carries ``suppressed=N``, or, if none
    comes, :meth:`report` writes one line with the count once the window is over."""

    def __init__(self, burst: int = RATE_BURST, window: float = RATE_WINDOW,
                 clock=time.monotonic) -> None:
        super().__init__()
        self.burst, self.window, self.clock = burst, window, clock
        self._kinds: dict[tuple, list] = {}  # kind -> [window start, lines, suppressed]
        self._lock = threading.Lock()  # threads log too (prefault, NVMe I/O, gRPC)
        self._pending = False  # some kind has lines left out (report() has work)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.INFO:
            return True
        kind = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        with self._lock:
            st = self._kinds.get(kind)
            if st is None or now - st[0] >= self.window:
                if st is not None and st[2]:
                    record.suppressed = st[2]
                if st is None and len(self._kinds) >= _RATE_KINDS:
                    self._forget(now)
                self._kinds[kind] = [now, 1, 0]
                return True
            st[1] += 1
            if st[1] < self.burst:
                return True
            if st[1] == self.burst:
                record.rate_limited = (f"further lines like this are left out for "
                                       f"{self.window - (now - st[0]):.0f}s (the next one "
                                       "says how many)")
                return True
            st[2] += 1
            self._pending = True
            return False

    def report(self) -> None:
        """One line per kind whose window is over with lines left out (the daemon's
        maintenance pass calls this), so a storm that stopped still gets its count."""
        if not self._pending:
            return
        now, over = self.clock(), []
        with self._lock:
            for kind, st in list(self._kinds.items()):
                if st[2] and now - st[0] >= self.window:
                    over.append((kind, st[2]))
                    del self._kinds[kind]
            self._pending = any(st[2] for st in self._kinds.values())
        for (name, level, msg), n in over:
            logging.getLogger(name).log(level, "%d more lines like this were left out in %.0fs: %s",
                                        n, self.window, msg, extra={"suppressed": n})

    def _forget(self, now: float) -> None:
        """Drop the kinds whose window is over (their suppressed counts with them); all
        of them if none is, so the table stays bounded whatever the messages are."""
        old = [k for k, st in self._kinds.items() if now - st[0] >= self.window]
        for k in old or list(self._kinds):
            del self._kinds[k]


class _Handler(logging.StreamHandler):
    """Marks the handler we installed, so set-up and reload replace only ours."""


def setup(level: str = "info", fmt: str = "kv", stream: TextIO | None = None) -> None:
    """Route the root logger to ``stream`` (stderr) in format ``fmt`` at ``level``."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, _Handler):
            root.removeHandler(h)
    h = _Handler(stream or sys.stderr)
    h.setFormatter(formatter(fmt))
    h.addFilter(RateLimit())
    root.addHandler(h)
    set_level(level)
    logging.captureWarnings(True)
    # grpc's Cython layer logs a line per call at debug ("Loaded running loop"): noise
    logging.getLogger("grpc._cython.cygrpc").setLevel(logging.INFO)


def report_suppressed() -> None:
    """Write the counts of lines our handlers' rate limits left out (RateLimit.report)."""
    for h in logging.getLogger().handlers:
        if isinstance(h, _Handler):
            for f in h.filters:
                if isinstance(f, RateLimit):
                    f.report()


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())


def set_format(fmt: str) -> None:
    f = formatter(fmt)
    for h in logging.getLogger().handlers:
        if isinstance(h, _Handler):
            h.setFormatter(f)


__all__ = ["FORMATS", "JsonFormatter", "KeyValueFormatter", "REDACTED", "RateLimit", "formatter",
           "is_sensitive", "redact", "redact_value", "report_suppressed", "set_format", "set_level",
           "setup"]
