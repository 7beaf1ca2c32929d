"""What the anchor keeps outside its memory, as one interface with two implementations.

The store holds four things, keyed by terminal id:

- leases: the sticky VIPA of every terminal that ever associated, handed
  out from this anchor's sub-pool (`pool`), valid anywhere in the shared
  pool (`shared_pool`), so a terminal that moves between anchors keeps it;
- pinned keys: the public key a terminal id belongs to (trust on first
  use), honoured by every anchor of the store;
- registrations: which anchor holds a terminal now, and until when (wall
  clock); a terminal registering at another anchor is a move, which the
  anchor it left learns through its `MoveWatcher`;
- tunnel records: the metadata of a terminal's tunnels (id, address as
  the anchor sees it, interface, anchor), for another anchor or an
  operator. No key material is ever stored: the tunnels' keys live only
  in the memory of the anchor that derived them.

`anchor_node.store.sqlite` is the embedded default (one anchor, one file);
`anchor_node.store.postgres` lets several anchors share one database.
Every method is synchronous and short; an implementation that can lose its
connection raises `StoreUnavailable` instead of blocking, and reconnects on
a later call.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ground.errors import UpmtError

__all__ = [
    "DEFAULT_PREFIX_CAP",
    "KeyConflict",
    "MoveWatcher",
    "Moved",
    "PoolExhausted",
    "PrefixCapReached",
    "Registration",
    "SchemaMismatch",
    "Store",
    "StoreUnavailable",
    "TunnelInfo",
    "nobody",
]

DEFAULT_PREFIX_CAP = 1024


def nobody(_terminal_id: str) -> bool:
    """The default `in_use` of `Store.acquire`: no terminal is associated here."""
    return False


class PoolExhausted(Exception):
    """No address left and none reclaimable."""


class PrefixCapReached(Exception):
    """The source prefix created `prefix_cap` leases already."""


class KeyConflict(Exception):
    """Another key was pinned to the terminal id first (at another anchor, meanwhile)."""


class StoreUnavailable(UpmtError):
    """The store cannot be reached now; the call changed nothing. Try again later."""


class SchemaMismatch(UpmtError):
    """The store's schema is not the one this anchor speaks (the message says what to do)."""


@dataclass(frozen=True, slots=True)
class Registration:
    terminal_id: str
    anchor_id: str
    expires_at: float  # wall clock


@dataclass(frozen=True, slots=True)
class TunnelInfo:
    """A tunnel as another anchor may learn of it: metadata only, never a key."""

    terminal_id: str
    tunnel_id: str  # "IP:port", the source the holding anchor observes
    interface: str  # the terminal's name for its access interface
    anchor_id: str
    created: float  # wall clock


@dataclass(frozen=True, slots=True)
class Moved:
    """A terminal registered at another anchor: the one it left drops its state."""

    terminal_id: str
    anchor_id: str  # where it is now


class MoveWatcher(Protocol):
    """Tells this anchor of the terminals that left it for another anchor."""

    def run(self, deliver: Callable[[Moved], None]) -> None:
        """Deliver moves until `stop`; runs in a thread of its own, survives store outages."""

    def stop(self) -> None:
        """Make `run` return soon (within about a second)."""


class Store(Protocol):
    pool: ipaddress.IPv4Network  # this anchor's sub-pool: new leases come from here
    shared_pool: ipaddress.IPv4Network  # every anchor's: a lease anywhere in it is valid
    prefix_cap: int
    anchor_id: str

    def close(self) -> None: ...

    # -- leases ----------------------------------------------------------------
    def lookup(self, terminal_id: str) -> str | None:
        """The terminal's VIPA, if it has a lease inside the shared pool."""

    def acquire(
        self,
        terminal_id: str,
        now: float,
        in_use: Callable[[str], bool] = nobody,
        *,
        prefix: str | None = None,
        pin: bytes | None = None,
    ) -> str:
        """The terminal's VIPA, allocated from `pool` on first association.

        A full sub-pool reclaims the lease seen longest ago of a terminal
        neither `in_use` here nor registered anywhere; none: PoolExhausted.
        `prefix`: the source network asking, which may create at most
        `prefix_cap` leases (PrefixCapReached). `pin`: the public key to pin
        the id to in the same durable transaction (KeyConflict if another
        got there first).
        """

    def all(self) -> dict[str, str]:
        """Every lease inside the shared pool: terminal id → VIPA."""

    # -- pinned keys -------------------------------------------------------------
    def pinned_key(self, terminal_id: str) -> bytes | None: ...

    def pin_key(
        self, terminal_id: str, public_key: bytes, now: float, *, prefix: str | None = None
    ) -> None:
        """Bind `terminal_id` to `public_key`; a binding that exists is kept."""

    def unpin_key(self, terminal_id: str) -> bool:
        """Forget the key of `terminal_id`; whether there was one."""

    # -- registrations -------------------------------------------------------------
    def register(self, terminal_id: str, expires_at: float, now: float) -> str | None:
        """This anchor holds the terminal until `expires_at`; the anchor it moved from, if
        another held it (that one is told, and this anchor drops the other's tunnel records)."""

    def unregister(self, terminal_id: str) -> None:
        """The terminal left this anchor (a registration held elsewhere is kept)."""

    def registration(self, terminal_id: str, now: float) -> Registration | None:
        """Who holds the terminal now (None: nobody, or expired)."""

    # -- tunnel records ----------------------------------------------------------------
    def put_tunnel(self, terminal_id: str, tunnel_id: str, interface: str, now: float) -> None:
        """Record (or update) a tunnel of the terminal at this anchor."""

    def drop_tunnel(self, terminal_id: str, tunnel_id: str) -> None: ...

    def tunnels(self, terminal_id: str) -> list[TunnelInfo]:
        """The terminal's tunnel records, at every anchor, oldest first."""

    def clear_tunnels(self) -> None:
        """Forget this anchor's tunnel records (a start without its predecessor's state)."""

    # -- notifications -------------------------------------------------------------------
    def watcher(self) -> MoveWatcher | None:
        """What tells this anchor of moves; None where no other anchor can exist."""
