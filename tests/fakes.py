"""Test doubles of plain values shared by unit tests (never of our daemon): a clock the
test moves by hand, and a peer's answer to Heads for one key."""
from __future__ import annotations

from typing import NamedTuple


class Clock:
    """A clock that reads ``t`` (seconds); the test sets or ``advance``s it."""

    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


class Head(NamedTuple):
    """A peer's answer to Heads for one key (the fields repair reads of pb.Head)."""
    present: bool
    unverified: bool = False
    checksum: int = 0
    head: bytes = b""
    deleted_ago: float = 0.0  # seconds since a client deleted the key there (0: not lately)
