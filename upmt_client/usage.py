"""Bytes per day on each interface, per application and per policy table (sans-IO).

Fed on every re-evaluation with the flows and their byte counters (the
PAFT's: the data path counts every inner packet): what a flow carried since
the last look is added to the interface it is on now, to its application
and to its policy table. The counts start again at local midnight (`day`
is the caller's local date). `capped` says which interfaces the policy's
caps close: an interface with ``cap_mb`` closes for everyone once that many
MB (10^6 bytes) would cross it by the next look (what crossed it today, plus
as much again as in the last period), and stays closed until midnight; an
application table with ``cap_mb``
closes every metered interface (one with a ``cap_mb`` of its own) to its
applications the same way, counting what they moved over all of them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, TypeVar

from paft.flow import FiveTuple
from paft.table import FlowEntry
from upmt_client.flows import FlowBook
from upmt_client.policy import Policy

__all__ = ["ANY_APP", "MB", "FlowUse", "Usage"]

MB: Final = 1_000_000
ANY_APP: Final = "*"  # in `capped`: the interface is closed to every application

# One flow as the usage sees it: its key, entry, application name and policy table.
FlowUse = tuple[FiveTuple, FlowEntry[str], str, str]


K = TypeVar("K")


def _add(counts: dict[K, int], where: K, moved: int) -> None:
    counts[where] = counts.get(where, 0) + moved


class Usage:
    def __init__(self) -> None:
        self.day: str | None = None
        self.interfaces: dict[str, int] = {}
        self.tables: dict[tuple[str, str], int] = {}  # (policy key, interface)
        self.apps: dict[tuple[str, str], int] = {}  # (application, interface)
        # What the last update added, per interface and per table: the next one's guess.
        self._last_interfaces: dict[str, int] = {}
        self._last_tables: dict[tuple[str, str], int] = {}
        self._closed: set[tuple[str, str]] = set()  # stays closed until the day ends
        self._seen: dict[FiveTuple, int] = {}

    def update(self, flows: Iterable[FlowUse], day: str) -> None:
        if day != self.day:
            self.day = day
            self.interfaces, self.tables, self.apps = {}, {}, {}
            self._closed = set()
        seen: dict[FiveTuple, int] = {}
        self._last_interfaces, self._last_tables = {}, {}
        for key, entry, app, table in flows:
            total = entry.bytes_up + entry.bytes_down
            seen[key] = total
            moved = total - self._seen.get(key, 0)
            if moved <= 0 or entry.tunnel.startswith("!"):
                continue
            # A redundant flow's bytes cross its twin's interface as well.
            for interface in (entry.tunnel, entry.twin) if entry.twin else (entry.tunnel,):
                _add(self.interfaces, interface, moved)
                _add(self._last_interfaces, interface, moved)
                _add(self.tables, (table, interface), moved)
                _add(self._last_tables, (table, interface), moved)
                _add(self.apps, (app, interface), moved)
        self._seen = seen  # flows gone are forgotten

    def reopen(self) -> None:
        """Forget which caps closed interfaces today (a new policy may have changed them)."""
        self._closed = set()

    def count(
        self,
        pairs: Iterable[tuple[FiveTuple, FlowEntry[str]]],
        book: FlowBook,
        policy: Policy,
        day: str,
    ) -> frozenset[tuple[str, str]]:
        """`update` with each flow's application and policy table; returns `capped`."""
        flows: list[FlowUse] = []
        for key, entry in pairs:
            name, exe = book.names(key, entry)
            flows.append((key, entry, name or "(unknown)", policy.for_app(name, exe).key))
        self.update(flows, day)
        return self.capped(policy)

    def capped(self, policy: Policy) -> frozenset[tuple[str, str]]:
        """(policy key or `ANY_APP`, interface) pairs closed by a cap for the rest of today."""
        closed = self._closed
        metered = {name for name, a in policy.interfaces.items() if a.cap_mb is not None}
        for name in metered:
            cap = policy.attributes(name).cap_mb
            coming = self.interfaces.get(name, 0) + self._last_interfaces.get(name, 0)
            if cap is not None and coming >= cap * MB:
                closed.add((ANY_APP, name))
        for pol in (policy.default, *policy.apps):
            if pol.cap_mb is None:
                continue
            used = sum(
                self.tables.get((pol.key, name), 0) + self._last_tables.get((pol.key, name), 0)
                for name in metered
            )
            if used >= pol.cap_mb * MB:
                closed.update((pol.key, name) for name in metered)
        return frozenset(closed)

    def to_json(self) -> dict[str, object]:
        return {
            "day": self.day,
            "interfaces_mb": {k: round(v / MB, 3) for k, v in sorted(self.interfaces.items())},
            "apps": [
                {"app": app, "interface": interface, "mb": round(used / MB, 3)}
                for (app, interface), used in sorted(self.apps.items())
            ],
        }
