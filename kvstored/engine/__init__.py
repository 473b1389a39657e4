"""The storage engine: no networking in here (servers are thin shells over Store)."""
from .store import Entry, Reservation, Store, StoreLimits

__all__ = ["Entry", "Reservation", "Store", "StoreLimits"]
