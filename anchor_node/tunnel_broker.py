"""The anchor's answers to MESSAGEs inside tunnels: tunnel set-up and handover (sans-IO).

After REGISTER, a terminal sends, inside each new tunnel, a MESSAGE with a
TunnelSetupRequest; the tunnel's identity is the source address and port
the anchor observes (after the terminal's NATs) — with encryption, of a
frame that authenticated under one of the terminal's tunnel slots, which
binds that slot to the address. HandoverRequests move flows of the
requesting terminal only, at most `max_moves` per request, through the
PAFT's per-VIPA index. A move with ``redundantWith`` (another tunnel of the
same terminal) makes the flows redundant: their downstream goes on both
tunnels (`anchor_node.forwarder`); a move without it ends that.

Every method takes `now`; nothing here touches a socket, and the signatures'
time window is checked against the injected wall clock.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable

from sipmessage import Request, Response

from anchor_node.admission import Admission
from anchor_node.terminals import RegistrarCounters, Terminal, TerminalTable, TunnelRecord
from ground.constants import JSON_TYPE, Addr
from ground.errors import MalformedError
from paft.flow import FiveTuple, proto_number
from paft.table import FlowSelector
from signalling.bodies import (
    HandoverRequest,
    HandoverResponse,
    IptablesMatch,
    StructuredMatch,
    TunnelSetupRequest,
    TunnelSetupResponse,
    decode_body_untrusted,
    encode_body,
    parse_iptables_match,
)
from signalling.message import build_response, new_tag
from tunnel.addr import format_hostport

__all__ = ["MAX_MOVES", "TunnelBroker"]

# RFC 9000-style cap on the work one request buys: a HandoverRequest names at
# most this many flows (the client splits longer lists).
MAX_MOVES = 64
# Part of the registrar: its log lines keep the registrar's name.
log = logging.getLogger("upmt.anchor.registrar")


class TunnelBroker:
    """In-tunnel MESSAGEs of associated terminals, against the registrar's `TerminalTable`."""

    def __init__(
        self,
        table: TerminalTable,
        counters: RegistrarCounters,
        *,
        pool: ipaddress.IPv4Network,
        encryption: bool,
        max_tunnels: int,
        max_moves: int,
        wall_clock: Callable[[], float],
    ) -> None:
        self.table = table
        self.counters = counters
        self.pool = pool
        self.encryption = encryption
        self.max_tunnels = max_tunnels
        self.max_moves = max_moves
        self.wall_clock = wall_clock

    def screen(self, request: Request, tunnel: Addr, size: int, now: float) -> Response | bool:
        """The tunnel port's screen: no transaction for a MESSAGE no terminal could have sent.

        With encryption every SIGNAL frame authenticated already. Without it,
        a MESSAGE from an address that is no tunnel is let through only if it
        is a tunnel set-up (which must then pass its MAC).
        """
        if self.encryption or tunnel in self.table.tunnel_owner:
            return True
        if request.method != "MESSAGE":
            return False
        try:
            body = decode_body_untrusted(request.body)
        except MalformedError:
            return False
        if isinstance(body, TunnelSetupRequest):
            return True
        self.counters.unknown_tunnel_messages += 1
        return False

    def on_message(self, request: Request, tunnel: Addr, now: float) -> Response | None:
        """A MESSAGE inside a tunnel; None means drop it unanswered."""
        if request.method != "MESSAGE":
            return self._reject(request, 405, "only MESSAGE travels inside tunnels")
        try:
            body: object = decode_body_untrusted(request.body)
        except MalformedError as exc:
            body = exc
        # Whose key must have signed it: the named terminal's for a set-up, the
        # tunnel owner's for anything else. Messages on unknown tunnels are
        # dropped unanswered, so that forging them teaches nothing.
        if isinstance(body, TunnelSetupRequest):
            terminal = self.table.terminals.get(body.terminal_id)
            if terminal is None or terminal.expires_at <= now:
                return self._reject(request, 403, "terminal not associated")
        else:
            found = self.table.tunnel_owner.get(tunnel)
            if found is None:
                self.counters.unknown_tunnel_messages += 1
                return None
            terminal = found
        if self.encryption:
            origin = self.table.sessions.origin(tunnel)
            if origin is None or not self.table.sessions.live(origin):
                return None  # its key is gone: nothing can be answered under it
            if origin.terminal_id != terminal.terminal_id:
                # Under another terminal's key: its owner cannot speak for this one.
                self.counters.auth_failures += 1
                return self._reject(request, 403, "not this terminal's tunnel key")
        if not self._authentic(terminal, request):
            self.counters.auth_failures += 1
            return self._reject(request, 403, "authentication failed")
        if isinstance(body, MalformedError):
            return self._reject(request, 400, str(body))
        if isinstance(body, TunnelSetupRequest):
            return self._tunnel_setup(request, body, tunnel, now)
        if isinstance(body, HandoverRequest):
            return self._handover(request, body, tunnel)
        return self._reject(request, 400, f"unexpected {type(body).__name__}")

    def _authentic(self, terminal: Terminal, request: Request) -> bool:
        wall = self.wall_clock()
        for verifier in terminal.verifiers:
            try:
                verifier.verify(request, wall)
            except MalformedError:
                continue
            return True
        return False

    # -- tunnel set-up ----------------------------------------------------------
    def _tunnel_setup(
        self, request: Request, body: TunnelSetupRequest, tunnel: Addr, now: float
    ) -> Response:
        table, sessions = self.table, self.table.sessions
        terminal = table.terminals[body.terminal_id]
        if body.vipa != terminal.vipa:
            return self._reject(request, 403, "VIPA does not belong to this terminal")
        if self._in_pool(tunnel[0]):
            return self._reject(request, 403, "a tunnel address inside the VIPA pool")
        owner = table.tunnel_owner.get(tunnel)
        if owner is not None and owner is not terminal:
            # A NAT reused the address for another terminal: the old binding is stale.
            table.drop_tunnel(owner, tunnel)
        origin = sessions.origin(tunnel) if self.encryption else None
        if self.encryption:
            if origin is None or not sessions.live(origin):  # retired while it waited
                return self._reject(request, 403, "tunnel key retired: associate again")
            # The slot's tunnel moved (a NAT rebinding): its old address is gone.
            for addr in list(terminal.tunnels):
                if addr != tunnel and sessions.slot_of(terminal.terminal_id, addr) == origin.slot:
                    table.drop_tunnel(terminal, addr)
        if tunnel not in terminal.tunnels:
            if len(terminal.tunnels) >= self.max_tunnels:
                table.drop_oldest_tunnel(terminal)
            terminal.tunnels[tunnel] = TunnelRecord(tunnel, body.interface, now)
            log.info(
                "tunnel %s up for %s (%s)",
                format_hostport(tunnel),
                terminal.terminal_id,
                body.interface,
            )
        else:
            terminal.tunnels[tunnel].interface = body.interface
        if origin is not None:
            sessions.bind(origin, tunnel)  # live: checked above
        table.tunnel_owner[tunnel] = terminal
        table.tunnel_vipa[tunnel] = terminal.vipa_packed
        table.default_tunnel.setdefault(terminal.vipa_packed, tunnel)
        table.tunnel_set_up(terminal, terminal.tunnels[tunnel])
        self.counters.tunnel_setups += 1
        answer = TunnelSetupResponse(
            tunnel_id=format_hostport(tunnel), observed=format_hostport(tunnel)
        )
        return self._json_ok(request, encode_body(answer))

    def _in_pool(self, host: str) -> bool:
        try:
            return ipaddress.ip_address(host) in self.pool
        except ValueError:
            return False

    # -- handover -----------------------------------------------------------------
    def _handover(self, request: Request, body: HandoverRequest, tunnel: Addr) -> Response:
        terminal = self.table.tunnel_owner.get(tunnel)
        if terminal is None:
            return self._reject(request, 403, "unknown tunnel")
        if len(body.flows) > self.max_moves:
            return self._reject(
                request, 400, f"{len(body.flows)} moves in one request (at most {self.max_moves})"
            )
        plan: list[tuple[FlowSelector, Addr, Addr | None]] = []
        try:
            for move in body.flows:
                target = _target_tunnel(terminal, move.tunnel_id, tunnel)
                twin = None
                if move.redundant_with is not None:
                    twin = _target_tunnel(terminal, move.redundant_with, tunnel)
                match = move.match
                if isinstance(match, IptablesMatch):
                    match = parse_iptables_match(match.rule)
                plan.append((_selector(terminal, match), target, None if twin == target else twin))
        except MalformedError as exc:
            return self._reject(request, 400, str(exc))
        paft = self.table.paft
        moved: set[FiveTuple] = set()
        for selector, target, twin in plan:
            moved.update(paft.move(selector, target, twin=twin))
        self.counters.handovers += 1
        self.counters.flows_moved += len(moved)
        return self._json_ok(request, encode_body(HandoverResponse(moved=len(moved))))

    # -- answers ------------------------------------------------------------------
    def _reject(self, request: Request, code: int, reason: str) -> Response:
        self.counters.rejected += 1
        return Admission.reject(request, code, reason)

    @staticmethod
    def _json_ok(request: Request, body: bytes) -> Response:
        return build_response(request, 200, to_tag=new_tag(), body=body, content_type=JSON_TYPE)


def _target_tunnel(terminal: Terminal, tunnel_id: str | None, arrived_on: Addr) -> Addr:
    if tunnel_id is None or tunnel_id == "any":
        return arrived_on
    for addr, record in terminal.tunnels.items():
        if record.tunnel_id == tunnel_id:
            return addr
    raise MalformedError(f"tunnel {tunnel_id} is not one of this terminal's")


def _selector(terminal: Terminal, match: StructuredMatch) -> FlowSelector:
    """The match, confined to the terminal's own VIPA (absent source = its VIPA)."""
    vipa = ipaddress.IPv4Address(terminal.vipa)
    if match.src is not None:
        try:
            src_net = ipaddress.ip_network(match.src, strict=False)
        except ValueError:
            raise MalformedError(f"bad source {match.src!r}") from None
        if vipa not in src_net:
            raise MalformedError(f"source {match.src} is not this terminal's VIPA")
    dst: bytes | None = None
    dst_prefix: int | None = None
    if match.dst is not None:
        try:
            dst_net = ipaddress.ip_network(match.dst, strict=False)
        except ValueError:
            raise MalformedError(f"bad destination {match.dst!r}") from None
        dst = dst_net.network_address.packed
        dst_prefix = dst_net.prefixlen
    return FlowSelector(
        proto=None if match.proto is None else proto_number(match.proto),
        src=terminal.vipa_packed,
        sport=match.sport,
        dst=dst,
        dst_prefix=dst_prefix,
        dport=match.dport,
    )
