"""The narrow policy objects a data session consults, instead of the node.

* ``EpochGate``: the node's cluster member-list epoch (membership sets it); a
  request stamped with another epoch is answered Redirect.
* ``AuthGuard``: one connection's identity under token auth: the token it
  showed (kept as a digest) and what it may do in which namespace.
* ``ConnectionBudget``: per-connection bounds. Today: unanswered requests and
  the response bytes one pipelined burst may queue; the reservation bound is
  the hook where issue 17's per-connection limits go (off by default).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from kvstore import errors

from kvstored.auth import TOKEN_REQUIRED, Unauthenticated, denial

if TYPE_CHECKING:
    from kvstored.auth import Auth, Grant

LOGIN = 0  # an op's scope: any authenticated connection (READ / WRITE from kvstored.auth)
_MASK_CACHE = 1024  # namespaces whose permission a connection remembers


class EpochGate:
    """The member-list epoch this node serves (0 = not in a cluster)."""

    __slots__ = ("epoch",)

    def __init__(self, epoch: int = 0):
        self.epoch = epoch

    def check(self, epoch: int) -> errors.Redirect | None:
        """A Redirect for a request sent with another (non-zero) epoch, else None."""
        mine = self.epoch
        if epoch and mine and epoch != mine:
            return errors.Redirect(f"member list epoch {epoch:08x} is not this node's "
                                   f"{mine:08x}: refresh the member list")
        return None


class AuthGuard:
    """One connection's authentication state against the daemon's token table."""

    __slots__ = ("auth", "grant", "digest", "generation", "masks")

    def __init__(self, auth: "Auth"):
        self.auth = auth
        self.grant: Grant | None = None
        self.digest = b""
        self.generation = 0
        self.masks: dict[bytes, int] = {}

    def login(self, token: bytes) -> None:
        """Bind the connection to ``token``; raises PermissionDenied (and forgets any
        earlier token) if the daemon does not know it."""
        try:
            self.digest, self.grant = self.auth.authenticate(token)
        except errors.PermissionDenied:
            self.grant = None
            raise
        self.generation = self.auth.generation
        self.masks.clear()

    def check(self, ns: bytes, need: int) -> tuple[str, errors.KVStoreError] | None:
        """None if this connection may ``need`` (READ/WRITE; LOGIN: just be authenticated)
        in ``ns``, else ``(counter reason, typed error)``."""
        grant = self.grant
        if grant is None:
            return "no_token", Unauthenticated(TOKEN_REQUIRED)
        if need == LOGIN:
            return None
        auth = self.auth
        if self.generation != auth.generation:  # tokens reloaded: look ours up again
            self.generation = auth.generation
            self.masks.clear()
            grant = self.grant = auth.tokens.get(self.digest)
            if grant is None:
                return "revoked", Unauthenticated(
                    "this connection's token was revoked: authenticate again")
        mask = self.masks.get(ns)
        if mask is None:
            mask = grant.mask(ns)
            if len(self.masks) < _MASK_CACHE:
                self.masks[ns] = mask
        if mask & need:
            return None
        return denial(grant, ns, need, mask)


class ConnectionBudget:
    """What one connection may hold. ``max_pipelined``: unanswered requests before it
    stops being read; ``burst``: response bytes queued by one burst of frames before
    they are flushed (and the transport's write-buffer limit, so back-pressure starts
    there); ``max_reserved_bytes``: space its unfinished puts may hold (0 = no bound)."""

    __slots__ = ("max_pipelined", "burst", "max_reserved_bytes")

    def __init__(self, max_pipelined: int, burst: int, max_reserved_bytes: int = 0):
        self.max_pipelined = max_pipelined
        self.burst = burst
        self.max_reserved_bytes = max_reserved_bytes

    def admit_reservation(self, held: int, size: int) -> errors.KVStoreError | None:
        """None if a connection holding ``held`` reserved bytes may reserve ``size`` more."""
        cap = self.max_reserved_bytes
        if cap and held + size > cap:
            return errors.NoSpace(f"this connection already holds {held} bytes of unfinished "
                                  f"puts (limit {cap} per connection)")
        return None
