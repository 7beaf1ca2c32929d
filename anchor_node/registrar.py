"""The anchor's association and tunnel broker logic (sans-IO).

Theory of operation: a terminal associates with REGISTER (outside the
tunnels) and gets its sticky VIPA from the lease store. It then sends, inside
each new tunnel, a MESSAGE with a TunnelSetupRequest; the tunnel's identity
is the source address and port the anchor observes (after the terminal's
NATs), and the answer tells the terminal what that was. The data path reads
three dicts this object keeps up to date: tunnel → packed VIPA (which
tunnels may carry which source), VIPA → default tunnel (the last heard), and
the PAFT. HandoverRequests move flows of the requesting terminal only.

Every method takes `now`; nothing here touches a socket or the clock.
"""

import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sipmessage import Request, Response

from anchor_node.leases import LeaseStore, PoolExhausted
from anchor_node.users import UserStore
from paft.flow import FiveTuple, proto_number
from paft.table import FlowSelector, Paft
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
from signalling.digest import NonceStore, Outcome, challenge_values, verify
from signalling.message import build_response, new_tag
from signalling.register import build_register_ok, parse_register_untrusted
from signalling.tunnelauth import (
    KEY_HEADER,
    TunnelAuthVerifier,
    decode_key_untrusted,
    derive_key,
    encode_key,
    random_key,
)
from tunnel.addr import format_hostport
from upmt.errors import MalformedError

Addr = tuple[str, int]
JSON_TYPE = "application/json"
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
    # In-tunnel MESSAGEs must carry an HMAC under the association's key: the
    # current key's verifier first, the previous one kept across a refresh.
    verifiers: list[TunnelAuthVerifier] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)


@dataclass(slots=True)
class RegistrarCounters:
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


class Registrar:
    def __init__(
        self,
        leases: LeaseStore,
        paft: Paft[Addr],
        *,
        default_expires: int = 600,
        min_expires: int = 30,
        max_expires: int = 86400,
        max_tunnels: int = 8,
        users: UserStore | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.wall_clock = wall_clock
        self.users = users
        self.nonces = NonceStore()
        self.leases = leases
        self.paft = paft
        self.default_expires = default_expires
        self.min_expires = min_expires
        self.max_expires = max_expires
        self.max_tunnels = max_tunnels
        self.terminals: dict[str, Terminal] = {}
        self.by_vipa: dict[bytes, Terminal] = {}
        # Shared with the data path, which only reads them.
        self.tunnel_vipa: dict[Addr, bytes] = {}
        self.default_tunnel: dict[bytes, Addr] = {}
        self._tunnel_owner: dict[Addr, Terminal] = {}
        self.counters = RegistrarCounters()

    # -- association --------------------------------------------------------
    def on_register(self, request: Request, source: Addr, now: float) -> Response:
        try:
            info = parse_register_untrusted(request)
        except MalformedError as exc:
            return self._reject(request, 400, str(exc))
        key: bytes | None = None
        if self.users is not None:
            outcome = self._authenticate(request, info.terminal_id)
            if isinstance(outcome, Response):
                return outcome
            key = outcome
        expires = self.default_expires if info.expires is None else info.expires
        if expires == 0:
            self._unregister(info.terminal_id)
            self.counters.unregisters += 1
            vipa = self.leases.lookup(info.terminal_id) or "0.0.0.0"
            return build_register_ok(request, vipa=vipa, expires=0, to_tag=new_tag())
        if expires < self.min_expires:
            response = build_response(
                request,
                423,
                "Interval Too Brief",
                to_tag=new_tag(),
                headers=[("Min-Expires", str(self.min_expires))],
            )
            self.counters.rejected += 1
            return response
        expires = min(expires, self.max_expires)
        try:
            vipa = self.leases.acquire(info.terminal_id, now, in_use=self._in_use)
        except PoolExhausted as exc:
            return self._reject(request, 503, str(exc))
        terminal = self.terminals.get(info.terminal_id)
        if terminal is None or terminal.vipa != vipa:
            if terminal is not None:
                self._unregister(info.terminal_id)
            terminal = Terminal(
                info.terminal_id, vipa, socket.inet_aton(vipa), now + expires, source
            )
            self.terminals[info.terminal_id] = terminal
            self.by_vipa[terminal.vipa_packed] = terminal
            log.info(
                "terminal %s associated from %s: VIPA %s",
                info.terminal_id,
                format_hostport(source),
                vipa,
            )
        terminal.expires_at = now + expires
        terminal.registered_from = source
        self.counters.registers += 1
        response = build_register_ok(request, vipa=vipa, expires=expires, to_tag=new_tag())
        if key is None:
            # Without user authentication the key travels in the answer: it keeps
            # out whoever did not see this exchange, no more.
            key = random_key()
            response.headers.set(KEY_HEADER, encode_key(key))
        self._new_key(terminal, key)
        return response

    def _authenticate(self, request: Request, terminal_id: str) -> bytes | Response:
        """The association key of a correctly authenticated REGISTER, or the answer to send.

        RFC 3261 §22.2: no or stale credentials → 401 with a fresh challenge
        (one per algorithm, RFC 8760); wrong ones → 403; unparsable → 400. A
        user may only register its own terminal id.
        """
        assert self.users is not None
        wall = self.wall_clock()
        value = request.headers.get("Authorization")
        if value is None:
            return self._challenge(request, wall, stale=False)
        result = verify(
            value,
            method="REGISTER",
            realm=self.users.realm,
            ha1_of=self.users.ha1,
            nonces=self.nonces,
            now=wall,
            request_uri=str(request.uri),
        )
        if result.outcome in (Outcome.STALE, Outcome.REPLAY):
            return self._challenge(request, wall, stale=True)
        if result.outcome is Outcome.MALFORMED:
            self.counters.auth_failures += 1
            return self._reject(request, 400, f"bad Authorization: {result.reason}")
        if result.outcome is not Outcome.OK or result.username != terminal_id:
            self.counters.auth_failures += 1
            log.warning("REGISTER for %s refused: wrong credentials", terminal_id)
            return self._reject(request, 403, "wrong credentials")
        secret = self.users.ha1(result.username, result.algorithm)
        assert secret is not None
        return derive_key(secret, result.nonce, result.cnonce, terminal_id)

    def _challenge(self, request: Request, wall: float, *, stale: bool) -> Response:
        assert self.users is not None
        self.counters.challenges += 1
        values = challenge_values(self.users.realm, self.nonces, wall, stale=stale)
        return build_response(
            request, 401, to_tag=new_tag(), headers=[("WWW-Authenticate", v) for v in values]
        )

    @staticmethod
    def _new_key(terminal: Terminal, key: bytes) -> None:
        terminal.verifiers = [TunnelAuthVerifier(key), *terminal.verifiers[:1]]
        terminal.keys = [key, *terminal.keys[:1]]

    # -- restart in place -----------------------------------------------------
    def export_state(self, now: float) -> dict[str, Any]:
        """Associations, tunnels, keys and flows, for the process that replaces this one."""
        return {
            "terminals": [
                {
                    "terminal_id": t.terminal_id,
                    "vipa": t.vipa,
                    "expires_in": t.expires_at - now,
                    "registered_from": list(t.registered_from),
                    "keys": [encode_key(k) for k in t.keys],
                    "tunnels": [[a[0], a[1], r.interface] for a, r in t.tunnels.items()],
                    "default": list(self.default_tunnel.get(t.vipa_packed, ("", 0))),
                }
                for t in self.terminals.values()
            ],
            "flows": [
                [
                    k.proto,
                    k.src.hex(),
                    k.sport,
                    k.dst.hex(),
                    k.dport,
                    e.tunnel[0],
                    e.tunnel[1],
                    e.app,
                ]
                for k, e in self.paft
            ],
        }

    def import_state(self, state: dict[str, Any], now: float, mono: float) -> int:
        """Take over what `export_state` wrote; the number of terminals restored.

        Replay windows start afresh: a signed MESSAGE seen just before the
        restart could be replayed once within its time window, from the same
        tunnel's address only (it must pass as that tunnel's owner).
        """
        for item in state.get("terminals", []):
            vipa = str(item["vipa"])
            source = (str(item["registered_from"][0]), int(item["registered_from"][1]))
            terminal = Terminal(
                str(item["terminal_id"]),
                vipa,
                socket.inet_aton(vipa),
                now + float(item["expires_in"]),
                source,
            )
            for key in reversed([decode_key_untrusted(k) for k in item["keys"]]):
                self._new_key(terminal, key)
            self.terminals[terminal.terminal_id] = terminal
            self.by_vipa[terminal.vipa_packed] = terminal
            for host, port, interface in item["tunnels"]:
                addr = (str(host), int(port))
                terminal.tunnels[addr] = TunnelRecord(addr, str(interface), now)
                self._tunnel_owner[addr] = terminal
                self.tunnel_vipa[addr] = terminal.vipa_packed
            default = (str(item["default"][0]), int(item["default"][1]))
            if default in terminal.tunnels:
                self.default_tunnel[terminal.vipa_packed] = default
            elif terminal.tunnels:
                self.default_tunnel[terminal.vipa_packed] = next(iter(terminal.tunnels))
        for proto, src, sport, dst, dport, host, port, app in state.get("flows", []):
            flow = FiveTuple(
                int(proto), bytes.fromhex(src), int(sport), bytes.fromhex(dst), int(dport)
            )
            if (str(host), int(port)) in self.tunnel_vipa:
                self.paft.learn(flow, (str(host), int(port)), mono, app=app)
        return len(self.terminals)

    def _in_use(self, terminal_id: str) -> bool:
        return terminal_id in self.terminals

    def _unregister(self, terminal_id: str) -> None:
        terminal = self.terminals.pop(terminal_id, None)
        if terminal is None:
            return
        for addr in list(terminal.tunnels):
            self._drop_tunnel(terminal, addr)
        self.by_vipa.pop(terminal.vipa_packed, None)
        self.default_tunnel.pop(terminal.vipa_packed, None)
        for key, _entry in list(self.paft):
            if key.src == terminal.vipa_packed:
                self.paft.remove(key)
        log.info("terminal %s left (VIPA %s kept for it)", terminal_id, terminal.vipa)

    # -- requests inside tunnels ----------------------------------------------
    def on_tunnel_message(self, request: Request, tunnel: Addr, now: float) -> Response | None:
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
            terminal = self.terminals.get(body.terminal_id)
            if terminal is None or terminal.expires_at <= now:
                return self._reject(request, 403, "terminal not associated")
        else:
            found = self._tunnel_owner.get(tunnel)
            if found is None:
                self.counters.unknown_tunnel_messages += 1
                return None
            terminal = found
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

    def on_plain_message(self, request: Request, source: Addr, now: float) -> Response:
        """Anything but REGISTER on the SIP port."""
        if request.method == "REGISTER":
            return self.on_register(request, source, now)
        if request.method == "MESSAGE":
            return self._reject(request, 403, "UPMT messages travel inside a tunnel")
        if request.method == "OPTIONS":
            return build_response(request, 200, to_tag=new_tag())
        return self._reject(request, 405, f"{request.method} not allowed")

    def _tunnel_setup(
        self, request: Request, body: TunnelSetupRequest, tunnel: Addr, now: float
    ) -> Response:
        terminal = self.terminals.get(body.terminal_id)
        if terminal is None or terminal.expires_at <= now:
            return self._reject(request, 403, "terminal not associated")
        if body.vipa != terminal.vipa:
            return self._reject(request, 403, "VIPA does not belong to this terminal")
        owner = self._tunnel_owner.get(tunnel)
        if owner is not None and owner is not terminal:
            # A NAT reused the address for another terminal: the old binding is stale.
            self._drop_tunnel(owner, tunnel)
        if tunnel not in terminal.tunnels:
            if len(terminal.tunnels) >= self.max_tunnels:
                self._expire_oldest_tunnel(terminal)
            terminal.tunnels[tunnel] = TunnelRecord(tunnel, body.interface, now)
            log.info(
                "tunnel %s up for %s (%s)",
                format_hostport(tunnel),
                terminal.terminal_id,
                body.interface,
            )
        else:
            terminal.tunnels[tunnel].interface = body.interface
        self._tunnel_owner[tunnel] = terminal
        self.tunnel_vipa[tunnel] = terminal.vipa_packed
        self.default_tunnel.setdefault(terminal.vipa_packed, tunnel)
        self.counters.tunnel_setups += 1
        answer = TunnelSetupResponse(
            tunnel_id=format_hostport(tunnel), observed=format_hostport(tunnel)
        )
        return self._json_ok(request, encode_body(answer))

    def _handover(self, request: Request, body: HandoverRequest, tunnel: Addr) -> Response:
        terminal = self._tunnel_owner.get(tunnel)
        if terminal is None:
            return self._reject(request, 403, "unknown tunnel")
        plan: list[tuple[FlowSelector, Addr]] = []
        try:
            for move in body.flows:
                target = self._target_tunnel(terminal, move.tunnel_id, tunnel)
                match = move.match
                if isinstance(match, IptablesMatch):
                    match = parse_iptables_match(match.rule)
                plan.append((self._selector(terminal, match), target))
        except MalformedError as exc:
            return self._reject(request, 400, str(exc))
        moved: set[FiveTuple] = set()
        for selector, target in plan:
            moved.update(self.paft.move(selector, target))
        self.counters.handovers += 1
        self.counters.flows_moved += len(moved)
        return self._json_ok(request, encode_body(HandoverResponse(moved=len(moved))))

    @staticmethod
    def _target_tunnel(terminal: Terminal, tunnel_id: str | None, arrived_on: Addr) -> Addr:
        if tunnel_id is None or tunnel_id == "any":
            return arrived_on
        for addr, record in terminal.tunnels.items():
            if record.tunnel_id == tunnel_id:
                return addr
        raise MalformedError(f"tunnel {tunnel_id} is not one of this terminal's")

    @staticmethod
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

    # -- time --------------------------------------------------------------
    def expire(self, now: float, last_heard: dict[Addr, float], tunnel_idle: float) -> None:
        """Forget registrations past their Expires and tunnels silent for `tunnel_idle`."""
        for terminal in list(self.terminals.values()):
            if terminal.expires_at <= now:
                self.counters.expired_terminals += 1
                self._unregister(terminal.terminal_id)
                continue
            for addr, record in list(terminal.tunnels.items()):
                heard = last_heard.get(addr, record.created)
                if now - max(heard, record.created) > tunnel_idle:
                    self.counters.expired_tunnels += 1
                    log.info(
                        "tunnel %s of %s silent for %.0f s: removed",
                        record.tunnel_id,
                        terminal.terminal_id,
                        now - heard,
                    )
                    self._drop_tunnel(terminal, addr)

    def _expire_oldest_tunnel(self, terminal: Terminal) -> None:
        oldest = min(terminal.tunnels.values(), key=lambda r: r.created)
        self._drop_tunnel(terminal, oldest.address)

    def _drop_tunnel(self, terminal: Terminal, addr: Addr) -> None:
        terminal.tunnels.pop(addr, None)
        self._tunnel_owner.pop(addr, None)
        self.tunnel_vipa.pop(addr, None)
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
        self.paft.remove_tunnel(addr)

    # -- answers -------------------------------------------------------------
    def _reject(self, request: Request, code: int, reason: str) -> Response:
        self.counters.rejected += 1
        phrase = reason.replace("\r", " ").replace("\n", " ")[:120]
        return build_response(request, code, phrase, to_tag=new_tag())

    @staticmethod
    def _json_ok(request: Request, body: bytes) -> Response:
        return build_response(request, 200, to_tag=new_tag(), body=body, content_type=JSON_TYPE)

    # -- status ----------------------------------------------------------------
    def terminals_json(self, now: float) -> list[dict[str, Any]]:
        return [
            {
                "terminal_id": t.terminal_id,
                "vipa": t.vipa,
                "expires_in_s": max(0.0, t.expires_at - now),
                "registered_from": format_hostport(t.registered_from),
                "tunnels": [
                    {
                        "tunnel_id": r.tunnel_id,
                        "address": format_hostport(r.address),
                        "interface": r.interface,
                        "default": self.default_tunnel.get(t.vipa_packed) == r.address,
                    }
                    for r in t.tunnels.values()
                ],
            }
            for t in self.terminals.values()
        ]
