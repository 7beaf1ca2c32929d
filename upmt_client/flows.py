"""What the client knows about its flows beyond the PAFT (pure).

Short flow ids for the CLI (`handover --flow ID`), each flow's application
(process name, executable, command line), and the history of handovers that
`status` shows. Only the control plane writes here, except `apps`, which the
classifier thread fills (single dict assignments).
"""

import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from paft.flow import FiveTuple
from paft.table import FlowEntry
from upmt_client.procscan import AppInfo

HISTORY = 100
log = logging.getLogger("upmt.client")


@dataclass(frozen=True, slots=True)
class HandoverRecord:
    at: float  # wall-clock time
    app: str
    flows: int
    source: str
    target: str
    reason: str  # "user", "link down", "probe loss", "return", "policy", "pin", "quality", "cost"
    anchor: str = ""  # the anchor's answer, filled in when it arrives
    anchor_ms: float | None = None
    detail: str = ""  # the figures behind an automatic move
    twin: str = ""  # redundant flows: their second interface

    def to_json(self) -> dict[str, Any]:
        return {
            "at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.at)),
            "at_unix": round(self.at, 3),
            "app": self.app,
            "flows": self.flows,
            "from": self.source,
            "to": self.target,
            "reason": self.reason,
            "anchor": self.anchor,
            "anchor_ms": self.anchor_ms,
            "detail": self.detail,
            "twin": self.twin or None,
        }


class FlowBook:
    def __init__(self) -> None:
        self.ids: dict[FiveTuple, int] = {}
        self.by_id: dict[int, FiveTuple] = {}
        self.apps: dict[FiveTuple, AppInfo] = {}
        self.history: deque[HandoverRecord] = deque(maxlen=HISTORY)
        self.recorded = 0  # handovers ever recorded (the history keeps the last HISTORY)
        # Redundant flows: the twin the anchor was last told of.
        self.twins: dict[FiveTuple, str] = {}
        self._next = 1

    def id_of(self, key: FiveTuple) -> int:
        found = self.ids.get(key)
        if found is None:
            found = self._next
            self._next += 1
            self.ids[key] = found
            self.by_id[found] = key
        return found

    def forget_missing(self, live: Iterable[FiveTuple]) -> None:
        """Drop what belongs to flows the PAFT no longer has."""
        alive = set(live)
        for key in [k for k in self.ids if k not in alive]:
            self.by_id.pop(self.ids.pop(key), None)
        for key in [k for k in self.apps if k not in alive]:
            del self.apps[key]
        for key in [k for k in self.twins if k not in alive]:
            del self.twins[key]

    def told_twins(self, keys: Iterable[FiveTuple], twin: str) -> None:
        """The anchor was told that `keys` are redundant on `twin` ("": on one tunnel)."""
        for key in keys:
            if twin:
                self.twins[key] = twin
            else:
                self.twins.pop(key, None)

    def names(self, key: FiveTuple, entry: FlowEntry[str]) -> tuple[str | None, str | None]:
        """(process name, executable basename) of the flow's application, if known."""
        app = self.apps.get(key)
        if app is not None:
            return app.name, app.exe_name
        return entry.app, None

    def record(self, record: HandoverRecord) -> int:
        self.history.append(record)
        self.recorded += 1
        return len(self.history) - 1

    def record_move(self, group: tuple[str, str, str, str, str, str], flows: int, at: float) -> int:
        """Log and keep the handover of one re-evaluation group; its index in the history."""
        app, source, target, reason, detail, twin = group
        log.info(
            "handover: %s, %d flows, %s -> %s%s (%s%s)",
            app,
            flows,
            source,
            target,
            f" + {twin}" if twin else "",
            reason,
            f": {detail}" if detail else "",
        )
        return self.record(
            HandoverRecord(at, app, flows, source, target, reason, detail=detail, twin=twin)
        )

    def flow_json(
        self, key: FiveTuple, entry: FlowEntry[str], tunnel_id: str | None, now: float
    ) -> dict[str, Any]:
        flow = key.to_json()
        app = self.apps.get(key)
        return {
            "id": self.id_of(key),
            "proto": flow["proto"],
            "vipa": flow["src"],
            "sport": flow["sport"],
            "dst": flow["dst"],
            "dport": flow["dport"],
            "app": app.name if app else entry.app,
            "exe": app.exe if app else None,
            "pid": app.pid if app else None,
            "interface": entry.tunnel,
            "twin": entry.twin,
            "tunnel_id": tunnel_id,
            "movable": entry.movable,
            "bytes": entry.bytes_up + entry.bytes_down,
            "bytes_up": entry.bytes_up,
            "bytes_down": entry.bytes_down,
            "idle_s": round(max(0.0, now - entry.last_seen), 1),
        }

    @staticmethod
    def app_totals(flows: list[dict[str, Any]]) -> dict[tuple[str, str], tuple[int, int, int]]:
        """Live flows, bytes up and bytes down per (application, interface), from `flow_json`."""
        totals: dict[tuple[str, str], tuple[int, int, int]] = {}
        for f in flows:
            key = (f["app"] or "(unknown)", f["interface"])
            n, up, down = totals.get(key, (0, 0, 0))
            totals[key] = (n + 1, up + f["bytes_up"], down + f["bytes_down"])
        return totals

    @staticmethod
    def apps_json(flows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Flows grouped by application, for `upmt-client apps`."""
        grouped: dict[str, dict[str, Any]] = {}
        for f in flows:
            name = f["app"] or "(unknown)"
            app = grouped.setdefault(
                name,
                {
                    "app": name,
                    "exe": f["exe"],
                    "pids": [],
                    "flows": [],
                    "interfaces": [],
                    "bytes": 0,
                },
            )
            if f["pid"] is not None and f["pid"] not in app["pids"]:
                app["pids"].append(f["pid"])
            if f["interface"] not in app["interfaces"]:
                app["interfaces"].append(f["interface"])
            app["flows"].append(f["id"])
            app["bytes"] += f["bytes"]
        return sorted(grouped.values(), key=lambda a: str(a["app"]))
