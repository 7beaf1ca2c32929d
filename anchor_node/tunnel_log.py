"""The terminals' tunnels as records in the store, for other anchors and operators.

Only metadata goes there (terminal, tunnel id, interface, anchor): the
tunnels' keys never leave the memory of the anchor that derived them.
The records are a view, not state this anchor needs: a write the store
cannot take is counted (`tunnel_records_lost`) and logged once per outage,
and the tunnel works on; the next set-up of that tunnel (each rekey sets
it up again) writes it anew.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from anchor_node.store.api import Store, StoreUnavailable
from anchor_node.terminals import RegistrarCounters, TunnelRecord

__all__ = ["StoreTunnelLog"]

log = logging.getLogger("upmt.anchor.registrar")


class StoreTunnelLog:
    def __init__(
        self, store: Store, counters: RegistrarCounters, wall_clock: Callable[[], float]
    ) -> None:
        self.store = store
        self.counters = counters
        self.wall_clock = wall_clock
        self._failing = False

    def up(self, terminal_id: str, record: TunnelRecord) -> None:
        self._write(
            lambda: self.store.put_tunnel(
                terminal_id, record.tunnel_id, record.interface, self.wall_clock()
            )
        )

    def down(self, terminal_id: str, tunnel_id: str) -> None:
        self._write(lambda: self.store.drop_tunnel(terminal_id, tunnel_id))

    def _write(self, write: Callable[[], None]) -> None:
        try:
            write()
        except StoreUnavailable as exc:
            self.counters.tunnel_records_lost += 1
            if not self._failing:
                log.warning("tunnel records not written while the store is down: %s", exc)
            self._failing = True
            return
        self._failing = False
