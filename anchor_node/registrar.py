"""The anchor's association and tunnel broker logic (sans-IO).

Theory of operation. A terminal associates with REGISTER (outside the
tunnels): `Admission` screens and checks it (address cookie, digest,
key exchange, pinned key), then the registrar hands out the sticky VIPA and
answers with its half of the key exchange. The session keys sign in-tunnel
MESSAGEs and, with encryption on, become the tunnels' AEAD keys
(`TunnelSessions`). The terminal then sends, inside each new tunnel, a
MESSAGE with a TunnelSetupRequest; the tunnel's identity is the source
address and port the anchor observes (after the terminal's NATs) — with
encryption, of a frame that authenticated under one of the terminal's tunnel
slots, which binds that slot to the address. The data path reads three dicts
kept here (tunnel → packed VIPA, VIPA → default tunnel, the PAFT) and, with
encryption, the sessions' tables. HandoverRequests move flows of the
requesting terminal only, at most `max_moves` per request, through the PAFT's
per-VIPA index.

Every method takes `now`; nothing here touches a socket or the clock.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sipmessage import Request, Response

from anchor_node.admission import Admission, Admitted
from anchor_node.leases import LeaseStore, PoolExhausted, PrefixCapReached, source_prefix
from anchor_node.sessions import TunnelSessions
from anchor_node.users import UserStore
from ground.constants import JSON_TYPE, Addr
from ground.errors import MalformedError
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
from signalling.cookies import CookieJar
from signalling.digest import ALGORITHMS
from signalling.handshake import (
    KX_HEADER,
    SessionKeys,
    StaticKey,
    decode_key_untrusted,
    encode_key,
    respond,
)
from signalling.message import build_response, new_tag
from signalling.register import build_register_ok
from signalling.tunnelauth import TunnelAuthVerifier
from tunnel.addr import format_hostport

# RFC 9000-style cap on the work one request buys: a HandoverRequest names at
# most this many flows (the client splits longer lists).
MAX_MOVES = 64
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


class Registrar:
    def __init__(
        self,
        leases: LeaseStore,
        paft: Paft[Addr],
        *,
        static_key: StaticKey | None = None,
        encryption: bool = True,
        default_expires: int = 600,
        min_expires: int = 30,
        max_expires: int = 86400,
        max_tunnels: int = 8,
        max_moves: int = MAX_MOVES,
        users: UserStore | None = None,
        cookies: CookieJar | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.admission = Admission(
            static_key=static_key or StaticKey.generate(),
            leases=leases,
            pool=leases.pool,
            encryption=encryption,
            users=users,
            cookies=cookies,
            wall_clock=wall_clock,
        )
        self.wall_clock = wall_clock
        self.leases = leases
        self.paft = paft
        self.encryption = encryption
        self.default_expires = default_expires
        self.min_expires = min_expires
        self.max_expires = max_expires
        self.max_tunnels = max_tunnels
        self.max_moves = max_moves
        self.terminals: dict[str, Terminal] = {}
        self.by_vipa: dict[bytes, Terminal] = {}
        # Shared with the data path, which only reads them (and, with encryption,
        # promotes senders in `sessions`).
        self.tunnel_vipa: dict[Addr, bytes] = {}
        self.default_tunnel: dict[bytes, Addr] = {}
        self.sessions = TunnelSessions(max_tunnels)
        self._tunnel_owner: dict[Addr, Terminal] = {}
        self.counters = RegistrarCounters()

    @property
    def users(self) -> UserStore | None:
        return self.admission.users

    @property
    def static_key(self) -> StaticKey:
        return self.admission.static_key

    def screen(self, request: Request, source: Addr, size: int, now: float) -> Response | bool:
        """The SIP port's screen: see `Admission.screen`."""
        return self.admission.screen(request, source, size, now)

    # -- association --------------------------------------------------------
    def on_register(self, request: Request, source: Addr, now: float) -> Response:
        """A REGISTER whose source address is proven (its cookie passed the screen)."""
        admitted = self.admission.admit(request, source, now)
        if isinstance(admitted, Response):
            self.counters.rejected += 1
            return admitted
        info = admitted.info
        expires = self.default_expires if info.expires is None else info.expires
        if expires == 0:
            self._unregister(info.terminal_id)
            self.counters.unregisters += 1
            vipa = self.leases.lookup(info.terminal_id) or "0.0.0.0"
            return build_register_ok(request, vipa=vipa, expires=0, to_tag=new_tag())
        if expires < self.min_expires:
            self.counters.rejected += 1
            return build_response(
                request,
                423,
                "Interval Too Brief",
                to_tag=new_tag(),
                headers=[("Min-Expires", str(self.min_expires))],
            )
        expires = min(expires, self.max_expires)
        pin = None if admitted.pinned else admitted.proven.offer.static
        try:
            vipa = self.leases.acquire(
                info.terminal_id,
                now,
                in_use=self._in_use,
                prefix=source_prefix(source[0]),
                pin=pin,
            )
        except PoolExhausted as exc:
            return self._reject(request, 503, str(exc))
        except PrefixCapReached as exc:
            return self._reject(request, 403, f"too many terminals from here: {exc}")
        if pin is not None:
            log.info(
                "terminal %s pinned to key %s (first use)",
                info.terminal_id,
                encode_key(admitted.proven.offer.static),
            )
        terminal = self._terminal(admitted, vipa, source, now)
        terminal.expires_at = now + expires
        terminal.registered_from = source
        acceptance, keys = respond(
            admitted.proven, index=self.sessions.new_base(), vipa=vipa, expires=expires
        )
        self._new_keys(terminal, keys, now)
        self.counters.registers += 1
        response = build_register_ok(request, vipa=vipa, expires=expires, to_tag=new_tag())
        response.headers.set(KX_HEADER, acceptance.encode())
        return response

    def _terminal(self, admitted: Admitted, vipa: str, source: Addr, now: float) -> Terminal:
        terminal_id = admitted.info.terminal_id
        terminal = self.terminals.get(terminal_id)
        if terminal is not None and terminal.vipa == vipa:
            return terminal
        if terminal is not None:
            self._unregister(terminal_id)
        terminal = Terminal(terminal_id, vipa, socket.inet_aton(vipa), now, source)
        self.terminals[terminal_id] = terminal
        self.by_vipa[terminal.vipa_packed] = terminal
        log.info(
            "terminal %s associated from %s: VIPA %s", terminal_id, format_hostport(source), vipa
        )
        return terminal

    def _new_keys(self, terminal: Terminal, keys: SessionKeys, now: float) -> None:
        # Beside the new keys, the previous ones stay for a while; when the
        # previous association's answer was lost (its keys never used), the
        # ones in use before it stay instead (as in `TunnelSessions.install`).
        keep = 0
        if len(terminal.verifiers) > 1 and not terminal.verifiers[0].used:
            keep = 1 if terminal.verifiers[1].used else 0
        terminal.keys = [keys, *terminal.keys[keep : keep + 1]]
        terminal.verifiers = [
            TunnelAuthVerifier(keys.signing),
            *terminal.verifiers[keep : keep + 1],
        ]
        if self.encryption:
            self.sessions.install(terminal.terminal_id, terminal.vipa_packed, keys, now)

    def reload_users(self, users: UserStore) -> list[str]:
        """New users in force; the associations of users removed or given a new password end.

        Their keys were derived from the old password hash, so they go too:
        the terminal must associate again, and cannot without the new password.
        """
        old = self.admission.users
        self.admission.users = users
        gone = []
        for terminal_id in list(self.terminals):
            hashes = [users.ha1(terminal_id, a) for a in ALGORITHMS]
            before = [old.ha1(terminal_id, a) for a in ALGORITHMS] if old is not None else None
            if all(h is not None for h in hashes) and hashes == before:
                continue
            self._unregister(terminal_id)
            self.counters.users_removed += 1
            gone.append(terminal_id)
        return gone

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
                    "keys": [_keys_json(k) for k in t.keys],
                    "sessions": self.sessions.export_terminal(t.terminal_id, now),
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

        Replay windows of in-tunnel MESSAGEs start afresh (a signed MESSAGE
        seen just before the restart could be replayed once within its time
        window, from the same tunnel's address only); those of the tunnels'
        AEAD keys start at the highest counter seen, and sending counters move
        on by a margin, so no nonce is ever used twice.
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
            keys = [_keys_from_json(k) for k in item["keys"]]
            terminal.keys = keys
            terminal.verifiers = [TunnelAuthVerifier(k.signing) for k in keys]
            self.terminals[terminal.terminal_id] = terminal
            self.by_vipa[terminal.vipa_packed] = terminal
            saved = item.get("sessions", [])
            for generation in saved:
                generation["keys"] = _keys_from_json(generation)
            self.sessions.import_terminal(terminal.terminal_id, terminal.vipa_packed, saved, now)
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
        self.sessions.drop_terminal(terminal_id)
        self.paft.remove_src(terminal.vipa_packed)
        log.info("terminal %s left (VIPA %s kept for it)", terminal_id, terminal.vipa)

    # -- requests inside tunnels ----------------------------------------------
    def screen_tunnel(
        self, request: Request, tunnel: Addr, size: int, now: float
    ) -> Response | bool:
        """The tunnel port's screen: no transaction for a MESSAGE no terminal could have sent.

        With encryption every SIGNAL frame authenticated already. Without it,
        a MESSAGE from an address that is no tunnel is let through only if it
        is a tunnel set-up (which must then pass its MAC).
        """
        if self.encryption or tunnel in self._tunnel_owner:
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
        if self.encryption:
            origin = self.sessions.origin(tunnel)
            if origin is None or not self.sessions.live(origin):
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

    def on_plain_message(self, request: Request, source: Addr, now: float) -> Response:
        """A request on the SIP port that the screen let open a transaction."""
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
        terminal = self.terminals[body.terminal_id]
        if body.vipa != terminal.vipa:
            return self._reject(request, 403, "VIPA does not belong to this terminal")
        if self._in_pool(tunnel[0]):
            return self._reject(request, 403, "a tunnel address inside the VIPA pool")
        owner = self._tunnel_owner.get(tunnel)
        if owner is not None and owner is not terminal:
            # A NAT reused the address for another terminal: the old binding is stale.
            self._drop_tunnel(owner, tunnel)
        origin = self.sessions.origin(tunnel) if self.encryption else None
        if self.encryption:
            if origin is None or not self.sessions.live(origin):  # retired while it waited
                return self._reject(request, 403, "tunnel key retired: associate again")
            # The slot's tunnel moved (a NAT rebinding): its old address is gone.
            for addr in list(terminal.tunnels):
                if addr != tunnel and self.sessions.slot_of(terminal.terminal_id, addr) == (
                    origin.slot
                ):
                    self._drop_tunnel(terminal, addr)
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
        if origin is not None:
            self.sessions.bind(origin, tunnel)  # live: checked above
        self._tunnel_owner[tunnel] = terminal
        self.tunnel_vipa[tunnel] = terminal.vipa_packed
        self.default_tunnel.setdefault(terminal.vipa_packed, tunnel)
        self.counters.tunnel_setups += 1
        answer = TunnelSetupResponse(
            tunnel_id=format_hostport(tunnel), observed=format_hostport(tunnel)
        )
        return self._json_ok(request, encode_body(answer))

    def _in_pool(self, host: str) -> bool:
        try:
            return ipaddress.ip_address(host) in self.leases.pool
        except ValueError:
            return False

    def _handover(self, request: Request, body: HandoverRequest, tunnel: Addr) -> Response:
        terminal = self._tunnel_owner.get(tunnel)
        if terminal is None:
            return self._reject(request, 403, "unknown tunnel")
        if len(body.flows) > self.max_moves:
            return self._reject(
                request, 400, f"{len(body.flows)} moves in one request (at most {self.max_moves})"
            )
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
        """Forget registrations past their Expires, tunnels silent for `tunnel_idle`, old keys."""
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
        if self.encryption:
            for terminal_id in self.sessions.expire(now):
                log.warning(
                    "terminal %s did not rekey in time: its tunnels are closed", terminal_id
                )
                keyless = self.terminals.get(terminal_id)
                if keyless is not None:
                    for addr in list(keyless.tunnels):
                        self._drop_tunnel(keyless, addr)

    def _expire_oldest_tunnel(self, terminal: Terminal) -> None:
        oldest = min(terminal.tunnels.values(), key=lambda r: r.created)
        self._drop_tunnel(terminal, oldest.address)

    def _drop_tunnel(self, terminal: Terminal, addr: Addr) -> None:
        terminal.tunnels.pop(addr, None)
        self._tunnel_owner.pop(addr, None)
        self.tunnel_vipa.pop(addr, None)
        self.sessions.unbind(addr)
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

    # -- answers -------------------------------------------------------------
    def _reject(self, request: Request, code: int, reason: str) -> Response:
        self.counters.rejected += 1
        return self.admission.reject(request, code, reason)

    @staticmethod
    def _json_ok(request: Request, body: bytes) -> Response:
        return build_response(request, 200, to_tag=new_tag(), body=body, content_type=JSON_TYPE)

    # -- status ----------------------------------------------------------------
    def statistics(self) -> dict[str, int]:
        out = {name: getattr(self.counters, name) for name in self.counters.__slots__}
        out["auth_failures"] += self.admission.auth_failures
        out["challenges"] += self.admission.challenges
        out["pool_sources"] += self.admission.pool_sources
        return out

    def terminals_json(self, now: float) -> list[dict[str, Any]]:
        out = []
        for t in self.terminals.values():
            age = self.sessions.key_age(t.terminal_id, now)
            out.append(
                {
                    "terminal_id": t.terminal_id,
                    "vipa": t.vipa,
                    "expires_in_s": max(0.0, t.expires_at - now),
                    "registered_from": format_hostport(t.registered_from),
                    "key_age_s": None if age is None else round(age, 1),
                    "flows": self.paft.count_of(t.vipa_packed),
                    "tunnels": [
                        {
                            "tunnel_id": r.tunnel_id,
                            "address": format_hostport(r.address),
                            "interface": r.interface,
                            "default": self.default_tunnel.get(t.vipa_packed) == r.address,
                            "encrypted": r.address in self.sessions.senders,
                        }
                        for r in t.tunnels.values()
                    ],
                }
            )
        return out


def _keys_json(keys: SessionKeys) -> dict[str, Any]:
    return {
        "up": encode_key(keys.up),
        "down": encode_key(keys.down),
        "signing": encode_key(keys.signing),
        "terminal_index": keys.terminal_index,
        "anchor_index": keys.anchor_index,
    }


def _keys_from_json(item: dict[str, Any]) -> SessionKeys:
    return SessionKeys(
        decode_key_untrusted(str(item["up"])),
        decode_key_untrusted(str(item["down"])),
        decode_key_untrusted(str(item["signing"])),
        int(item["terminal_index"]),
        int(item["anchor_index"]),
    )
