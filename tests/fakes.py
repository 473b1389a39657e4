"""Test doubles of plain values shared by unit tests (never of our daemon): a clock the
test moves by hand, and a peer's answer to Heads for one key."""
from __future__ import annotations

# a peer's answer to Heads for one key, as repair reads it (the agent makes these of pb.Head)
from kvstored.cluster.repair.decide import Head  # noqa: F401


class Clock:
    """A clock that reads ``t`` (seconds); the test sets or ``advance``s it."""

    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt
