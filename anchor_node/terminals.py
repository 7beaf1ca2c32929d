"""The anchor's terminals and their tunnels: the state the registrar parts share (sans-IO).

Association (`Registrar`), the in-tunnel MESSAGEs (`TunnelBroker`) and the
in-place restart (`restart_state`) all change the same tables, and the data
path reads three of them from its own thread (tunnel → packed VIPA, VIPA →
default tunnel, the PAFT), with encryption also the `TunnelSessions`.
`TerminalTable` owns those tables and the two changes that must touch all
of them at once: a terminal leaving and a tunnel going away. Keeping them in
one place is what keeps the tables consistent with each other: no tunnel
address left pointing at a terminal that is gone, no flow left on a dead
tunnel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

from anchor_node.sessions import TunnelSessions
from ground.constants import Addr
from paft.table import FlowSelector, Paft
from signalling.handshake import SessionKeys
from signalling.tunnelauth import TunnelAuthVerifier
from tunnel.addr import format_hostport

__all__ = ["RegistrarCounters", "Terminal", "TerminalTable", "TunnelLog", "TunnelRecord"]

# Part of the registrar: its log lines keep the registrar's name.
log = logging.getLogger("upmt.anchor.registrar")


@dataclass
class TunnelRecord:
    address: Addr
    interface: str
    created: float

    @property
    def tunnel_id(self) -> str:
        return format_hostport(self.address)


@dataclass
class Terminal:
    terminal_id: str
    vipa: str
    vipa_packed: bytes
    expires_at: float
    registered_from: Addr
    tunnels: dict[Addr, TunnelRecord] = field(default_factory=dict)
    # In-tunnel MESSAGEs carry an HMAC under the association's signing key: the
    # current one's verifier first, the previous one kept across a rekey.
    verifiers: list[TunnelAuthVerifier] = field(default_factory=list)
    keys: list[SessionKeys] = field(default_factory=list)


@dataclass(slots=True)
class RegistrarCounters:
    """What the registrar and its tunnel broker did, for the status (one set for both)."""

    registers: int = 0
    unregisters: int = 0
    tunnel_setups: int = 0
    handovers: int = 0
    flows_moved: int = 0
    rejected: int = 0
    expired_terminals: int = 0
    expired_tunnels: int = 0
    auth_failures: int = 0
    challenges: int = 0
    unknown_tunnel_messages: int = 0
    pool_sources: int = 0
    users_removed: int = 0
    redirected: int = 0  # REGISTERs answered 302 (--max-terminals reached)
    full: int = 0  # REGISTERs answered 503 (--max-terminals reached, nowhere to redirect)
    moved_away: int = 0  # terminals that registered at another anchor of the store
    store_unavailable: int = 0  # REGISTERs answered 503 while the store was down
    tunnel_records_lost: int = 0  # tunnel records the store could not take


class TunnelLog(Protocol):
    """Where tunnels are recorded beyond this process (the store's tunnel records)."""

    def up(self, terminal_id: str, record: TunnelRecord) -> None: ...

    def down(self, terminal_id: str, tunnel_id: str) -> None: ...


class TerminalTable:
    """The associated terminals, their tunnels, and the tables built from them."""

    def __init__(
        self, paft: Paft[Addr], sessions: TunnelSessions, tunnel_log: TunnelLog | None = None
    ) -> None:
        self.paft = paft
        self.sessions = sessions
        self.tunnel_log = tunnel_log
        self.terminals: dict[str, Terminal] = {}
        self.by_vipa: dict[bytes, Terminal] = {}
        # Shared with the data path, which only reads them (and, with encryption,
        # promotes senders in `sessions`).
        self.tunnel_vipa: dict[Addr, bytes] = {}
        self.default_tunnel: dict[bytes, Addr] = {}
        self.tunnel_owner: dict[Addr, Terminal] = {}
        # Terminals whose association, keys or tunnels changed since the HA
        # replica last wrote them (`anchor_node.ha`); whoever reads it clears it.
        self.touched: set[str] = set()

    def add(self, terminal: Terminal) -> None:
        self.terminals[terminal.terminal_id] = terminal
        self.by_vipa[terminal.vipa_packed] = terminal
        self.touched.add(terminal.terminal_id)

    def forget_all(self) -> None:
        """Every terminal, tunnel, key and flow goes from memory, and nothing is recorded
        beyond it: an HA node that lost the shared address leaves the store to the other."""
        for terminal_id, terminal in list(self.terminals.items()):
            self.sessions.drop_terminal(terminal_id)
            self.paft.remove_src(terminal.vipa_packed)
        # In place: the data path holds these very dicts.
        for table in (self.terminals, self.by_vipa, self.tunnel_owner):
            table.clear()
        self.tunnel_vipa.clear()
        self.default_tunnel.clear()
        self.touched.clear()

    def remove(self, terminal_id: str) -> None:
        """The terminal leaves: its tunnels, keys and flows go; its lease stays for it."""
        terminal = self.terminals.pop(terminal_id, None)
        if terminal is None:
            return
        self.touched.add(terminal_id)
        for addr in list(terminal.tunnels):
            self.drop_tunnel(terminal, addr)
        self.by_vipa.pop(terminal.vipa_packed, None)
        self.default_tunnel.pop(terminal.vipa_packed, None)
        self.sessions.drop_terminal(terminal_id)
        self.paft.remove_src(terminal.vipa_packed)
        log.info("terminal %s left (VIPA %s kept for it)", terminal_id, terminal.vipa)

    def drop_oldest_tunnel(self, terminal: Terminal) -> None:
        oldest = min(terminal.tunnels.values(), key=lambda r: r.created)
        self.drop_tunnel(terminal, oldest.address)

    def tunnel_set_up(self, terminal: Terminal, record: TunnelRecord) -> None:
        """A tunnel of the terminal was set up (or again): record it beyond this process."""
        self.touched.add(terminal.terminal_id)
        if self.tunnel_log is not None:
            self.tunnel_log.up(terminal.terminal_id, record)

    def drop_tunnel(self, terminal: Terminal, addr: Addr) -> None:
        self.touched.add(terminal.terminal_id)
        record = terminal.tunnels.pop(addr, None)
        if record is not None and self.tunnel_log is not None:
            self.tunnel_log.down(terminal.terminal_id, record.tunnel_id)
        self.tunnel_owner.pop(addr, None)
        self.tunnel_vipa.pop(addr, None)
        self.sessions.unbind(addr, terminal.terminal_id)
        if self.default_tunnel.get(terminal.vipa_packed) == addr:
            if terminal.tunnels:
                self.default_tunnel[terminal.vipa_packed] = next(iter(terminal.tunnels))
            else:
                self.default_tunnel.pop(terminal.vipa_packed, None)
        # Flows learnt on the tunnel must not keep pointing at its address: it
        # is dead, or (NAT reuse) about to belong to another terminal. The
        # terminal's flows follow its default tunnel; anything else is forgotten.
        fallback = self.default_tunnel.get(terminal.vipa_packed)
        if fallback is not None:
            self.paft.move(
                FlowSelector(src=terminal.vipa_packed),
                fallback,
                only=lambda _key, entry: entry.tunnel == addr,
            )
        for key in self.paft.flows_of(terminal.vipa_packed):
            entry = self.paft.entries.get(key)
            if entry is not None and entry.tunnel == addr:
                self.paft.remove(key)
            elif entry is not None and entry.twin == addr:  # redundant on it: single now
                self.paft.set_twin(entry, None)
