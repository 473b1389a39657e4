"""Per-namespace tokens: who may read, write or administer which namespaces.

The tokens file is TOML, one ``[[token]]`` table per token::

    [[token]]
    name = "vllm-prod"                    # shown in logs and errors (never the token)
    sha256 = "5e884898da28047151d0e5..."   # hex SHA-256 of the token (preferred), or
    # token = "a-long-random-string"      # the token itself (at least 16 characters)
    namespaces = ["llama3-8b", "qwen2-7b"]  # "*" = every namespace
    scopes = ["read", "write"]            # read, write, admin (admin implies read and write)

Only SHA-256 digests are kept in memory, and tokens are never logged. A token
is checked by hashing what the client sent and looking the digest up, so the
cost does not depend on how many tokens there are.

Scopes: ``read`` = Get, Lookup, Exists, List; ``write`` = Put, Pin, Unpin,
Delete; ``admin`` = DeleteAll on its namespaces, and with ``"*"`` also Reload.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import tomllib
from dataclasses import dataclass

from kvstore import errors
from kvstore.wire import MAX_TOKEN_LEN, namespace_bytes

log = logging.getLogger("kvstored.auth")

READ, WRITE, ADMIN = 1, 2, 4
SCOPES = {"read": READ, "write": WRITE, "admin": ADMIN | READ | WRITE}
ALL = "*"
MIN_TOKEN_LEN = 16  # for tokens written in clear in the file; digests can't be checked
_HEX64 = re.compile(r"[0-9a-fA-F]{64}\Z")
_KEYS = {"name", "sha256", "token", "namespaces", "scopes"}
TOKEN_REQUIRED = ("authentication required: this kvstored needs a token "
                  "(kvstore.Client(token=...), kvstore-cli --token or KVSTORE_TOKEN)")


class TokensError(Exception):
    """The tokens file is unreadable or invalid; the message is one line."""


class Unauthenticated(errors.PermissionDenied):
    """No token, or one the daemon does not know (gRPC status UNAUTHENTICATED)."""


def digest(token: str | bytes) -> bytes:
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()


@dataclass(frozen=True)
class Grant:
    name: str
    namespaces: frozenset[bytes] | None  # None = every namespace
    scopes: int  # READ | WRITE | ADMIN bits (admin already expanded)

    def mask(self, ns: bytes) -> int:
        """The scope bits this token has on namespace ``ns`` (0 = none)."""
        return self.scopes if self.namespaces is None or ns in self.namespaces else 0

    def describe(self) -> tuple:
        ns = None if self.namespaces is None else tuple(sorted(self.namespaces))
        return ns, self.scopes


def scope_name(need: int) -> str:
    return "admin" if need & ADMIN else "write" if need & WRITE else "read"


def load_tokens(path: str, warn: bool = True) -> dict[bytes, Grant]:
    """``{sha256 digest: Grant}`` from a tokens file; raises TokensError."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise TokensError(f"cannot read tokens file '{path}': {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise TokensError(f"tokens file '{path}' is not valid TOML: {e}") from None
    extra = set(doc) - {"token"}
    if extra:
        raise TokensError(f"tokens file '{path}': unknown top-level key '{sorted(extra)[0]}' "
                          "(expected [[token]] tables)")
    entries = doc.get("token", [])
    if not isinstance(entries, list):
        raise TokensError(f"tokens file '{path}': 'token' must be an array of tables ([[token]])")
    out: dict[bytes, Grant] = {}
    names: set[str] = set()
    clear = False
    for i, t in enumerate(entries):
        where = f"tokens file '{path}', token #{i + 1}"
        if not isinstance(t, dict):
            raise TokensError(f"{where}: expected a table")
        unknown = set(t) - _KEYS
        if unknown:
            raise TokensError(f"{where}: unknown key '{sorted(unknown)[0]}' "
                              f"(allowed: {', '.join(sorted(_KEYS))})")
        name = t.get("name")
        if not isinstance(name, str) or not name.strip():
            raise TokensError(f"{where}: 'name' must be a non-empty string")
        where = f"tokens file '{path}', token '{name}'"
        if name in names:
            raise TokensError(f"{where}: duplicate name")
        names.add(name)
        if ("sha256" in t) == ("token" in t):
            raise TokensError(f"{where}: give exactly one of 'sha256' (hex digest) or 'token'")
        if "sha256" in t:
            h = t["sha256"]
            if not isinstance(h, str) or not _HEX64.match(h):
                raise TokensError(f"{where}: 'sha256' must be 64 hex digits")
            d = bytes.fromhex(h)
        else:
            tok = t["token"]
            if not isinstance(tok, str) or not MIN_TOKEN_LEN <= len(tok.encode()) <= MAX_TOKEN_LEN:
                raise TokensError(f"{where}: 'token' must be a string of {MIN_TOKEN_LEN}-"
                                  f"{MAX_TOKEN_LEN} bytes")
            d = digest(tok)
            clear = True
        nss = t.get("namespaces")
        if not isinstance(nss, list) or not nss or not all(isinstance(n, str) for n in nss):
            raise TokensError(f"{where}: 'namespaces' must be a non-empty list of strings "
                              '(namespaces, or "*" for all)')
        if ALL in nss:
            namespaces = None
        else:
            try:
                namespaces = frozenset(namespace_bytes(n) for n in nss)
            except errors.InvalidArgument as e:
                raise TokensError(f"{where}: {e.message}") from None
        scopes = t.get("scopes")
        if (not isinstance(scopes, list) or not scopes
                or not all(isinstance(s, str) and s in SCOPES for s in scopes)):
            raise TokensError(f"{where}: 'scopes' must be a non-empty list of "
                              f"{', '.join(SCOPES)}")
        bits = 0
        for s in scopes:
            bits |= SCOPES[s]
        if d in out:
            raise TokensError(f"{where}: same token as '{out[d].name}'")
        out[d] = Grant(name, namespaces, bits)
    if clear and warn:
        try:
            if os.stat(path).st_mode & 0o077:
                log.warning("tokens file %s holds tokens in clear and is readable by other "
                            "users: chmod 600 it, or store sha256 digests instead", path)
        except OSError:
            pass
    return out


class Auth:
    """The loaded token table; ``generation`` changes whenever ``reload`` changes it,
    so connections that cached a grant know to look it up again."""

    def __init__(self, tokens_file: str):
        self.path = tokens_file
        self.tokens = load_tokens(tokens_file)
        self.generation = 0

    def authenticate(self, token: bytes | str | None) -> tuple[bytes, Grant]:
        """The digest and grant of ``token``; raises Unauthenticated."""
        if not token:
            raise Unauthenticated(TOKEN_REQUIRED)
        d = digest(token)
        g = self.tokens.get(d)
        if g is None:
            raise Unauthenticated("invalid token: kvstored does not know it (revoked or mistyped?)")
        return d, g

    def reload(self) -> dict:
        """Re-read the tokens file. Returns what changed: ``{"added": [names], "removed":
        [...], "changed": [...], "tokens": count}``. On a bad file the old table stays
        and TokensError is raised."""
        new = load_tokens(self.path)
        old_by_name = {g.name: (d, g) for d, g in self.tokens.items()}
        new_by_name = {g.name: (d, g) for d, g in new.items()}
        added = sorted(set(new_by_name) - set(old_by_name))
        removed = sorted(set(old_by_name) - set(new_by_name))
        changed = sorted(n for n in set(new_by_name) & set(old_by_name)
                         if new_by_name[n][0] != old_by_name[n][0]
                         or new_by_name[n][1].describe() != old_by_name[n][1].describe())
        self.tokens = new
        if added or removed or changed:
            self.generation += 1
        log.info("tokens reloaded from %s: %d tokens (added %s, removed %s, changed %s)",
                 self.path, len(new), added or "none", removed or "none", changed or "none")
        return {"added": added, "removed": removed, "changed": changed, "tokens": len(new)}


def denial(grant: Grant, ns: bytes, need: int, mask: int) -> tuple[str, errors.PermissionDenied]:
    """The counter reason and the error for ``grant`` lacking ``need`` on ``ns``."""
    shown = ns.decode(errors="replace")
    if not mask:
        return "namespace", errors.PermissionDenied(
            f"token '{grant.name}' is not valid for namespace '{shown}'")
    scope = scope_name(need)
    verb = {"read": "read from", "write": "write to", "admin": "administer"}[scope]
    return "scope", errors.PermissionDenied(
        f"token '{grant.name}' may not {verb} namespace '{shown}' (it lacks the '{scope}' scope)")


__all__ = ["ADMIN", "ALL", "Auth", "Grant", "READ", "TOKEN_REQUIRED", "TokensError",
           "Unauthenticated", "WRITE", "denial", "digest", "load_tokens", "scope_name"]
