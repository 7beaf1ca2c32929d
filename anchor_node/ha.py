"""One node of the HA pair: checkpoints while active, takeover from the store (sans-IO).

Theory of operation. The two nodes run the same anchor (same key, anchor id
and pool, one PostgreSQL store); keepalived moves one public address
between them, and conntrackd keeps the kernel's NAT entries of the
terminals' flows on both. The node that holds the address is active:

- after every signalling request that changed a terminal (association,
  rekey, tunnel set-up or removal, departure) and before its answer leaves,
  the terminal's record (`restart_state.export_terminal`, sealed by
  `ha_state.StateSeal`) is written under this node's epoch; so a terminal
  never uses keys the store does not hold;
- every `CHECKPOINT_INTERVAL` each terminal is written again, for its
  counters and replay windows (how stale the standby's replay floor can be).

When the address comes to the standby (the daemon watches for it), it takes
a new epoch (fencing out the old active's writes), loads every record and
installs it as a restart in place would, with the clocks shifted by the
record's age and the sending counters moved `HA_COUNTER_MARGIN` on for each
epoch since the record's: the counters of epoch e start at the record's
plus (e - its epoch) margins, so each holder has a range of its own even
when one of them took over and died before it wrote anything. A node
that loses the address, or finds its epoch taken, forgets its terminals
without writing anything: the store is the other node's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from anchor_node.ha_state import StateSeal
from anchor_node.restart_state import export_terminal, import_flows, import_terminal
from anchor_node.sessions import HA_COUNTER_MARGIN
from anchor_node.store.api import StoreUnavailable
from anchor_node.store.ha_api import Fenced, HaStore
from anchor_node.terminals import TerminalTable

__all__ = ["CHECKPOINT_INTERVAL", "HaCounters", "HaReplica"]

log = logging.getLogger("upmt.anchor.ha")

CHECKPOINT_INTERVAL: Final = 5.0


@dataclass(slots=True)
class HaCounters:
    ha_takeovers: int = 0
    ha_step_downs: int = 0
    ha_states_restored: int = 0
    ha_states_rejected: int = 0  # records that did not open or did not import
    ha_checkpoints: int = 0  # terminal records written
    ha_checkpoint_failures: int = 0  # writes the store could not take (retried)
    ha_fenced: int = 0  # writes refused: another node took a newer epoch


class HaReplica:
    def __init__(
        self,
        store: HaStore,
        table: TerminalTable,
        seal: StateSeal,
        *,
        node: str,
        wall_clock: Callable[[], float],
        checkpoint_interval: float = CHECKPOINT_INTERVAL,
    ) -> None:
        self.store = store
        self.table = table
        self.seal = seal
        self.node = node
        self.wall_clock = wall_clock
        self.checkpoint_interval = checkpoint_interval
        self.epoch: int | None = None  # ours, while active
        self.counters = HaCounters()
        self.last_takeover: dict[str, Any] | None = None
        self._written: dict[str, float] = {}  # terminal id → when last written (registrar clock)

    @property
    def active(self) -> bool:
        return self.epoch is not None

    # -- role changes ------------------------------------------------------------
    def take_over(self, now: float, mono: float) -> int:
        """Become the active: a new epoch, every terminal loaded from the store.

        `now` is the registrar's clock, `mono` the data path's. The number of
        terminals restored; `StoreUnavailable` leaves this node standby.
        """
        epoch = self.store.take_over(self.node)
        saved = self.store.load_states()
        wall = self.wall_clock()
        self.table.forget_all()
        self._written.clear()
        restored = 0
        for row in saved:
            record = self.seal.open(row.terminal_id, row.sealed)
            if record is None or record.get("terminal_id") != row.terminal_id:
                self.counters.ha_states_rejected += 1
                log.warning("HA: the stored state of %s does not open: skipped", row.terminal_id)
                continue
            # The record's times are relative to when it was written.
            then = now - max(0.0, wall - row.written_at)
            try:
                if then + float(record["expires_in"]) <= now:
                    continue  # its registration ran out meanwhile
                # Each epoch since the record's has its own range of counters,
                # used or not: a holder that never wrote still sent in its own.
                margin = HA_COUNTER_MARGIN * max(1, epoch - row.epoch)
                import_terminal(self.table, record, then, counter_margin=margin)
                import_flows(self.table, list(record.get("flows", [])), mono)
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                self.counters.ha_states_rejected += 1
                log.warning("HA: the stored state of %s is unusable (%r)", row.terminal_id, exc)
                self.table.remove(row.terminal_id)
                continue
            self._written[row.terminal_id] = now
            restored += 1
        self.table.touched.clear()
        self.epoch = epoch
        self.counters.ha_takeovers += 1
        self.counters.ha_states_restored += restored
        return restored

    def step_down(self, why: str) -> None:
        """Standby again: every terminal forgotten here, nothing written."""
        if self.epoch is not None:
            log.warning("HA: standing down (%s): terminals left to the other node", why)
            self.counters.ha_step_downs += 1
        self.epoch = None
        self.table.forget_all()
        self._written.clear()

    # -- checkpoints ---------------------------------------------------------------
    def flush(self, now: float, *, due: bool = False) -> bool:
        """Write the touched terminals (with `due`, also those not written for
        `checkpoint_interval`) and forget the departed ones, under our epoch.

        False when the store did not take them (they are tried again at the
        next flush) or another node holds the epoch now.
        """
        if self.epoch is None:
            self.table.touched.clear()
            return True
        ids = set(self.table.touched)
        if due:
            ids.update(
                tid
                for tid in self.table.terminals
                if now - self._written.get(tid, -1e18) >= self.checkpoint_interval
            )
        if not ids:
            return True
        present = [tid for tid in ids if tid in self.table.terminals]
        gone = [tid for tid in ids if tid not in self.table.terminals]
        rows = [
            (
                tid,
                self.seal.seal(
                    tid, export_terminal(self.table, self.table.terminals[tid], now, flows=True)
                ),
            )
            for tid in present
        ]
        try:
            self.store.save_states(self.epoch, rows, self.wall_clock())
            self.store.drop_states(self.epoch, gone)
        except StoreUnavailable as exc:
            self.counters.ha_checkpoint_failures += 1
            self.table.touched.update(ids)  # tried again at the next one
            log.warning("HA: terminal state not written (%s): retrying", exc)
            return False
        except Fenced as exc:
            self.counters.ha_fenced += 1
            log.error("HA: %s", exc)
            self.step_down("another node took over")
            return False
        self.table.touched.difference_update(ids)
        for tid in present:
            self._written[tid] = now
        for tid in gone:
            self._written.pop(tid, None)
        self.counters.ha_checkpoints += len(rows)
        return True

    def status(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "role": "active" if self.active else "standby",
            "epoch": self.epoch,
            "last_takeover": self.last_takeover,
        }
