"""What the two nodes of an HA pair share in the store: the epoch and the terminals' state.

The pair is one anchor to its terminals: one public address, one anchor key,
one anchor id. The node that holds the address is *active*: it serves the
terminals and writes their state (keys, tunnels, flows; sealed by
`anchor_node.ha_state`) to the store as it changes. The other is *standby*:
when the address comes to it, it takes a new **epoch** and loads that state.

The epoch fences: a node writes only under the epoch it took, and a write
under an older one changes nothing (`Fenced`), so a node that lost the
address (or only believes it still holds it) can never overwrite what the
new active wrote, and what the new active loaded after taking its epoch is
everything the old one could write.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Fenced", "HaStore", "MemoryHaStore", "SavedState"]


class Fenced(Exception):
    """Another node took a newer epoch: this one is no longer the active."""


@dataclass(frozen=True, slots=True)
class SavedState:
    terminal_id: str
    sealed: bytes
    written_at: float  # wall clock of the node that wrote it
    epoch: int


class HaStore(Protocol):
    anchor_id: str

    def take_over(self, holder: str) -> int:
        """A new epoch for this anchor id, held by `holder` (a node name) from now on."""

    def current_epoch(self) -> tuple[int, str] | None:
        """(epoch, holder) in force; None before the first takeover."""

    def save_states(self, epoch: int, states: Iterable[tuple[str, bytes]], now: float) -> None:
        """Write (terminal id, sealed state) pairs in one transaction; `Fenced` if `epoch`
        is no longer current (nothing is written then)."""

    def drop_states(self, epoch: int, terminal_ids: Iterable[str]) -> None:
        """Forget the terminals' state (they left); `Fenced` as `save_states`."""

    def load_states(self) -> list[SavedState]:
        """Every terminal state of this anchor id."""


class MemoryHaStore:
    """`HaStore` in memory, for tests: one instance shared by the two nodes' objects."""

    def __init__(self, anchor_id: str = "pair") -> None:
        self.anchor_id = anchor_id
        self.epoch: tuple[int, str] | None = None
        self.states: dict[str, SavedState] = {}
        self.writes = 0
        self.available = True  # False: every call raises StoreUnavailable

    def _check(self) -> None:
        if not self.available:
            from anchor_node.store.api import StoreUnavailable

            raise StoreUnavailable("store down (test)")

    def take_over(self, holder: str) -> int:
        self._check()
        epoch = 1 if self.epoch is None else self.epoch[0] + 1
        self.epoch = (epoch, holder)
        return epoch

    def current_epoch(self) -> tuple[int, str] | None:
        self._check()
        return self.epoch

    def _fence(self, epoch: int) -> None:
        if self.epoch is None or self.epoch[0] != epoch:
            raise Fenced(f"epoch {epoch} is over (now {self.epoch})")

    def save_states(self, epoch: int, states: Iterable[tuple[str, bytes]], now: float) -> None:
        self._check()
        self._fence(epoch)
        for terminal_id, sealed in states:
            self.states[terminal_id] = SavedState(terminal_id, sealed, now, epoch)
            self.writes += 1

    def drop_states(self, epoch: int, terminal_ids: Iterable[str]) -> None:
        self._check()
        self._fence(epoch)
        for terminal_id in terminal_ids:
            self.states.pop(terminal_id, None)

    def load_states(self) -> list[SavedState]:
        self._check()
        return list(self.states.values())
