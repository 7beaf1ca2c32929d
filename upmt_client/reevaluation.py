"""Re-evaluation of every flow against the steering: which move, which to classify again (pure).

`plan_moves` runs under the PAFT's lock (the data path reads the entries it
changes): each flow that steering wants elsewhere switches its upstream at
once and joins the group of its (application, from, to, reason, twin), which
the caller announces to the anchor and logs as one handover. A redundant
flow whose twin is not the one the anchor was told of (`FlowBook.twins`: a
new flow, a pair formed again) is announced too, with reason "redundant". Flows whose owner
was not found get a few more lookups (`to_reexamine`).
"""

from __future__ import annotations

from paft.flow import FiveTuple
from paft.table import FlowEntry, Paft
from upmt_client.flows import FlowBook
from upmt_client.steering import Move, Steering

__all__ = ["CLASSIFIABLE", "REEXAMINE_TRIES", "plan_moves", "to_reexamine"]

CLASSIFIABLE = (6, 17)  # TCP, UDP: protocols with sockets sock_diag can find
REEXAMINE_TRIES = 3
# application, from, to, reason, detail, twin ("" for none)
Group = tuple[str, str, str, str, str, str]


def plan_moves(
    pairs: list[tuple[FiveTuple, FlowEntry[str]]],
    paft: Paft[str],
    book: FlowBook,
    steering: Steering,
    now: float,
) -> dict[Group, list[FiveTuple]]:
    """The moves of `pairs` (a snapshot of `paft`, which sets their twins)."""
    groups: dict[Group, list[FiveTuple]] = {}
    view = steering.view
    for key, entry in pairs:
        name, exe = book.names(key, entry)
        if entry.app is None and name is not None:
            entry.app = name
        move = steering.target(key, entry.tunnel, name, exe, entry.movable, now)
        target = entry.tunnel if move is None else move.target
        twin = view.twin(view.policy_for(name, exe), target)
        told = book.twins.get(key)
        if move is None:
            if twin == entry.twin == told:
                continue
            detail = f"on {target} and {twin}" if twin else f"on {target} alone"
            move = Move(target, "redundant", detail)
        group = (name or "(unknown)", entry.tunnel, target, move.reason, move.detail, twin or "")
        groups.setdefault(group, []).append(key)
        entry.tunnel = target
        if twin != entry.twin:
            paft.set_twin(entry, twin)
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
