"""The anchors a client may associate with: one current, the others in reserve (pure).

The candidates come from `--anchor` (in the order given) and from DNS SRV
(`--anchor-srv`, ordered by `upmt_client.srv`), SRV first. The client uses
the current one until it stops answering, then takes the next in order,
wrapping around: an anchor that failed comes back into turn only after the
others, so an anchor that returns does not pull the client back (no
flapping) — it is tried again when the current one fails in turn.

Redirects (a `302` to REGISTER) are unauthenticated: they arrive before the
key exchange. `may_follow` is the rule: an address of the client's own list,
or one whose key the client already holds (`--anchor-key`, or remembered),
since the anchor there must then prove that key; never an address it would
have to trust on first use on the word of an unauthenticated answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ground.constants import Addr
from tunnel.addr import format_hostport

__all__ = ["MAX_REDIRECTS", "AnchorChange", "AnchorEntry", "AnchorSet"]

MAX_REDIRECTS = 3  # per association: enough for a pool full in a row, never a loop


@dataclass
class AnchorEntry:
    addr: Addr  # the anchor's SIP address
    origin: str  # "anchor" (--anchor), "srv" or "redirect"
    failed_at: float | None = None  # (the wall clock) when it last stopped answering
    reason: str = ""


@dataclass(frozen=True)
class AnchorChange:
    at: float  # wall clock
    old: str
    new: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "from": self.old, "to": self.new, "reason": self.reason}


class AnchorSet:
    def __init__(self, configured: Sequence[Addr], srv: Sequence[Addr] = ()) -> None:
        self.entries: list[AnchorEntry] = []
        self._configured = list(configured)
        self._merge(srv)
        if not self.entries:
            raise ValueError("no anchor to associate with")
        self.current: Addr = self.entries[0].addr
        self.changes: list[AnchorChange] = []

    def _merge(self, srv: Sequence[Addr]) -> None:
        """SRV answer first, then --anchor; an address once; kept failure marks."""
        old = {e.addr: e for e in self.entries}
        merged: list[AnchorEntry] = []
        for addr, origin in [(a, "srv") for a in srv] + [(a, "anchor") for a in self._configured]:
            if any(e.addr == addr for e in merged):
                continue
            entry = old.get(addr) or AnchorEntry(addr, origin)
            entry.origin = origin
            merged.append(entry)
        self.entries = merged

    def __len__(self) -> int:
        return len(self.entries)

    def listed(self, addr: Addr) -> bool:
        return any(e.addr == addr for e in self.entries)

    def update_srv(self, srv: Sequence[Addr]) -> None:
        """A new SRV answer (its TTL ran out, or a failover): the order it gives.

        The current anchor stays current even if the answer no longer names
        it: it is left once it fails, as any other.
        """
        current = next((e for e in self.entries if e.addr == self.current), None)
        self._merge(srv)
        if current is not None and not self.listed(self.current):
            self.entries.append(current)

    def next_after(self, addr: Addr) -> Addr:
        """The anchor to try after `addr`, in order, wrapping around."""
        for index, entry in enumerate(self.entries):
            if entry.addr == addr:
                return self.entries[(index + 1) % len(self.entries)].addr
        return self.entries[0].addr

    def mark_failed(self, addr: Addr, reason: str, wall: float) -> None:
        for entry in self.entries:
            if entry.addr == addr:
                entry.failed_at, entry.reason = wall, reason

    def switch(self, addr: Addr, reason: str, wall: float) -> None:
        """`addr` becomes current (an anchor of a redirect joins the list at the end)."""
        if not self.listed(addr):
            self.entries.append(AnchorEntry(addr, "redirect"))
        self.changes = [
            *self.changes[-9:],
            AnchorChange(wall, format_hostport(self.current), format_hostport(addr), reason),
        ]
        self.current = addr

    def adopt(self, addr: Addr) -> None:
        """`addr` is current already (a restart in place): no change to record."""
        if not self.listed(addr):
            self.entries.append(AnchorEntry(addr, "redirect"))
        self.current = addr

    def associated(self, addr: Addr) -> None:
        """An association with `addr` succeeded: it answers again."""
        for entry in self.entries:
            if entry.addr == addr:
                entry.failed_at, entry.reason = None, ""

    def may_follow(self, addr: Addr, key_known: Callable[[Addr], bool]) -> bool:
        """Whether a redirect to `addr` may be followed (see the module's rule)."""
        return (self.listed(addr) and self._entry(addr).origin != "redirect") or key_known(addr)

    def _entry(self, addr: Addr) -> AnchorEntry:
        return next(e for e in self.entries if e.addr == addr)

    def to_json(self) -> list[dict[str, Any]]:
        return [
            {
                "anchor": format_hostport(e.addr),
                "state": "current"
                if e.addr == self.current
                else ("failed" if e.failed_at is not None else "reserve"),
                "origin": e.origin,
                "failed_at": e.failed_at,
                "failure": e.reason or None,
            }
            for e in self.entries
        ]
