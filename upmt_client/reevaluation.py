"""Re-evaluation of every flow against the steering: which move, which to classify again (pure).

`plan_moves` runs under the PAFT's lock (the data path reads the entries it
changes): each flow that steering wants elsewhere switches its upstream at
once and joins the group of its (application, from, to, reason), which the
caller announces to the anchor and logs as one handover. Flows whose owner
was not found get a few more lookups (`to_reexamine`).
"""

from __future__ import annotations

from paft.flow import FiveTuple
from paft.table import FlowEntry
from upmt_client.flows import FlowBook
from upmt_client.steering import Steering

__all__ = ["CLASSIFIABLE", "REEXAMINE_TRIES", "plan_moves", "to_reexamine"]

CLASSIFIABLE = (6, 17)  # TCP, UDP: protocols with sockets sock_diag can find
REEXAMINE_TRIES = 3
Group = tuple[str, str, str, str, str]  # application, from, to, reason, detail


def plan_moves(
    pairs: list[tuple[FiveTuple, FlowEntry[str]]], book: FlowBook, steering: Steering, now: float
) -> dict[Group, list[FiveTuple]]:
    groups: dict[Group, list[FiveTuple]] = {}
    for key, entry in pairs:
        name, exe = book.names(key, entry)
        if entry.app is None and name is not None:
            entry.app = name
        move = steering.target(key, entry.tunnel, name, exe, entry.movable, now)
        if move is None:
            continue
        group = (name or "(unknown)", entry.tunnel, move.target, move.reason, move.detail)
        groups.setdefault(group, []).append(key)
        entry.tunnel = move.target
    return groups


def to_reexamine(
    pairs: list[tuple[FiveTuple, FlowEntry[str]]], book: FlowBook, tries: dict[FiveTuple, int]
) -> list[FiveTuple]:
    """Flows not classified yet that deserve another lookup (`tries` counts them)."""
    out = []
    for key, entry in pairs:
        if entry.app is None and key.proto in CLASSIFIABLE and key not in book.apps:
            done = tries.get(key, 0)
            if done < REEXAMINE_TRIES:
                tries[key] = done + 1
                out.append(key)
    return out
