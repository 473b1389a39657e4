"""The narrow policy objects a data session consults, instead of the node.

* ``EpochGate``: the node's cluster member-list epoch (membership sets it); a
  request stamped with another epoch is answered Redirect.
* ``AuthGuard``: one connection's identity under token auth: the token it
  showed (kept as a digest) and what it may do in which namespace.
* ``ConnectionBudget``: per-connection bounds: unanswered requests, the
  response bytes one pipelined burst may queue, copied response bytes and
  frames queued unsent, and reserved bytes.
* ``ClientSpace``: reserved bytes per client (peer IP / shm uid).
* ``DataLimits``: the configured bounds (timeouts, rates, caps) in one object.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

from kvstore import errors

from kvstored.auth import TOKEN_REQUIRED, Unauthenticated, denial
from kvstored.settings import default as setting_default

if TYPE_CHECKING:
    from kvstored.auth import Auth, Grant

LOGIN = 0  # an op's scope: any authenticated connection (READ / WRITE from kvstored.auth)
_MASK_CACHE = 1024  # namespaces whose permission a connection remembers


class EpochGate:
    """The member-list epoch this node serves (0 = not in a cluster), and the time by
    which its etcd lease may have lapsed.

    ``deadline``: ``time.perf_counter()`` (the data plane's clock, CLOCK_MONOTONIC on
    Linux: it runs while the process is stopped) past which this node's lease may have
    run out unrenewed; membership keeps it from its renewals, ``inf`` while there is no
    lease to keep (static or no cluster, not registered, etcd out of reach). A process
    that was stopped past it runs requests already in its sockets before any timer of
    membership's, so both planes call ``check_lease`` before they answer keyed requests
    (the data plane once per batch of frames): past the deadline, ``lapse()`` runs
    membership's ``on_lapse`` (the node treats itself as dropped) first."""

    __slots__ = ("epoch", "deadline", "on_lapse")

    def __init__(self, epoch: int = 0):
        self.epoch = epoch
        self.deadline = math.inf
        self.on_lapse: Callable[[], None] | None = None

    def check_lease(self, now: float) -> None:
        """``lapse()`` if ``now`` (perf_counter) is past the deadline."""
        if now >= self.deadline:
            self.lapse()

    def lapse(self) -> None:
        """The deadline passed: disarm it and tell membership (once)."""
        self.deadline = math.inf
        if self.on_lapse is not None:
            self.on_lapse()

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
    there); ``max_queued_bytes`` / ``max_queued_frames``: copied response bytes (every
    response but a get's arena view) and frames queued since the transport's buffer was
    last empty, before the connection stops being read until it is (a client that
    pipelines small requests and never reads costs at most this much memory);
    ``max_reserved_bytes``: space its unfinished puts may hold (0 = no bound)."""

    __slots__ = ("max_pipelined", "burst", "max_reserved_bytes", "max_queued_bytes",
                 "max_queued_frames")

    def __init__(self, max_pipelined: int, burst: int, max_reserved_bytes: int = 0,
                 max_queued_bytes: int = 1 << 62, max_queued_frames: int = 1 << 62):
        self.max_pipelined = max_pipelined
        self.burst = burst
        self.max_reserved_bytes = max_reserved_bytes
        self.max_queued_bytes = max_queued_bytes
        self.max_queued_frames = max_queued_frames

    def admit_reservation(self, held: int, size: int) -> errors.KVStoreError | None:
        """None if a connection holding ``held`` reserved bytes may reserve ``size`` more."""
        cap = self.max_reserved_bytes
        if cap and held + size > cap:
            return errors.NoSpace(f"this connection already holds {held} bytes of unfinished "
                                  f"puts (limit {cap} per connection)")
        return None


class ClientSpace:
    """Reserved bytes per client (peer IP on TCP, uid on shm), so one client's stalled
    or hoarded puts cannot take the whole arena from the others."""

    __slots__ = ("cap", "held")

    def __init__(self, cap: int = 0):
        self.cap = cap  # 0: no bound
        self.held: dict[str, int] = {}

    def admit(self, client: str, size: int) -> errors.KVStoreError | None:
        cap = self.cap
        if cap and client:
            held = self.held.get(client, 0)
            if held + size > cap:
                return errors.NoSpace(f"client {client} already holds {held} bytes of "
                                      f"unfinished puts (limit {cap} per client)")
        return None

    def add(self, client: str, n: int) -> None:
        if client:
            left = self.held.get(client, 0) + n
            if left > 0:
                self.held[client] = left
            else:
                self.held.pop(client, None)


class DataLimits:
    """The data plane's bounds against hostile and careless clients, from the config
    (issue 17); the defaults are what a DataServer built without a config gets."""

    def __init__(self, config=None, *, dram_size: int = 0):
        # without a config (or a field it lacks): the setting's default, from its row
        def get(name):
            return getattr(config, name) if hasattr(config, name) else setting_default(name)

        self.max_queued_bytes = get("max_queued_response_bytes")
        self.max_queued_frames = get("max_queued_responses")
        self.write_stall_timeout = get("write_stall_timeout")
        self.idle_timeout = get("idle_timeout")
        self.put_stall_timeout = get("put_stall_timeout")
        self.min_put_rate = get("min_put_rate")
        self.handshake_timeout = get("handshake_timeout")
        self.max_handshakes_per_client = get("max_handshakes_per_client")
        per_client = get("max_reserved_bytes_per_client")
        per_conn = get("max_reserved_bytes_per_connection")
        # only a config's sizes bound the per-client cap (a bare DataLimits() has no arena)
        dram = dram_size or getattr(config, "dram_size", 0) or 0
        largest = getattr(config, "max_value_size", 0) or 0
        if dram:  # at most half the arena (a small arena: 64 MiB, so batches still fit)
            per_client = min(per_client, max(dram // 2, 64 << 20, largest))
        self.max_reserved_per_client = per_client
        self.max_reserved_per_connection = min(per_conn, per_client)

    def put_deadline(self, now: float, size: int) -> float:
        """The latest a put of ``size`` bytes reserved at ``now`` may commit."""
        return now + self.put_stall_timeout + size / self.min_put_rate
