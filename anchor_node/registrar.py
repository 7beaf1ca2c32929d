"""The anchor's association logic, and the one object the daemon drives (sans-IO).

Theory of operation. A terminal associates with REGISTER (outside the
tunnels): `Admission` screens and checks it (address cookie, digest,
key exchange, pinned key), then the registrar hands out the sticky VIPA and
answers with its half of the key exchange. The session keys sign in-tunnel
MESSAGEs and, with encryption on, become the tunnels' AEAD keys
(`TunnelSessions`). The terminal then sets up its tunnels and moves its
flows with MESSAGEs inside them, which the `TunnelBroker` answers. The data
path reads three dicts of the `TerminalTable` (tunnel → packed VIPA, VIPA →
default tunnel, the PAFT) and, with encryption, the sessions' tables; the
registrar also ages all of them out, and hands them over in an in-place
restart (`restart_state`).

With `max_terminals`, a REGISTER of a terminal not associated here while
that many are is answered `302 Moved Temporarily` with the `redirect_to`
anchors as Contacts (rotated at each answer, so the load spreads), or
`503` when there are none. The answer comes after admission, once the
source is proven and the key exchange checked, and takes no lease: the
terminal's VIPA is asked of the anchor it goes to. The client decides
whether to follow (see `upmt_client.anchors`).

The store (`anchor_node.store`) is the only state outside memory: leases
and pinned keys, and which anchor holds each terminal. Every REGISTER
writes its registration there; a terminal that registers at another
anchor sharing the store is dropped here (`on_moved`). Times in the store
are wall-clock times (`wall_clock`), so that anchors can compare them. A
store that cannot be reached makes a REGISTER `503` with Retry-After,
never a crash; tunnel records are written on a best-effort basis.

Every method takes `now`; nothing here touches a socket or the clock.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

from sipmessage import Request, Response

from anchor_node import restart_state
from anchor_node.admission import Admission, Admitted
from anchor_node.pool import source_prefix
from anchor_node.sessions import TunnelSessions
from anchor_node.store.api import (
    KeyConflict,
    PoolExhausted,
    PrefixCapReached,
    Store,
    StoreUnavailable,
)
from anchor_node.terminals import RegistrarCounters, Terminal, TerminalTable
from anchor_node.tunnel_broker import MAX_MOVES, TunnelBroker
from anchor_node.tunnel_log import StoreTunnelLog
from anchor_node.users import UserStore
from ground.constants import Addr
from paft.table import Paft
from signalling.cookies import CookieJar
from signalling.digest import ALGORITHMS
from signalling.handshake import KX_HEADER, SessionKeys, StaticKey, encode_key, respond
from signalling.message import build_response, new_tag
from signalling.register import build_register_ok
from signalling.transaction import OVERLOAD_RETRY_AFTER
from signalling.tunnelauth import TunnelAuthVerifier
from tunnel.addr import format_hostport

__all__ = ["Registrar"]

log = logging.getLogger("upmt.anchor.registrar")


class Registrar:
    def __init__(
        self,
        store: Store,
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
        max_terminals: int | None = None,
        redirect_to: Sequence[Addr] = (),
    ) -> None:
        self.max_terminals = max_terminals
        self.redirect_to = list(redirect_to)
        self._redirects = 0
        self.admission = Admission(
            static_key=static_key or StaticKey.generate(),
            leases=store,
            pool=store.shared_pool,
            encryption=encryption,
            users=users,
            cookies=cookies,
            wall_clock=wall_clock,
        )
        self.store = store
        self.wall_clock = wall_clock
        self.paft = paft
        self.encryption = encryption
        self.default_expires = default_expires
        self.min_expires = min_expires
        self.max_expires = max_expires
        self.sessions = TunnelSessions(max_tunnels)
        self.counters = RegistrarCounters()
        self.table = TerminalTable(
            paft, self.sessions, tunnel_log=StoreTunnelLog(store, self.counters, wall_clock)
        )
        self.broker = TunnelBroker(
            self.table,
            self.counters,
            pool=store.shared_pool,
            encryption=encryption,
            max_tunnels=max_tunnels,
            max_moves=max_moves,
            wall_clock=wall_clock,
        )

    @property
    def leases(self) -> Store:
        """The store, by the name of most of what it holds."""
        return self.store

    @property
    def users(self) -> UserStore | None:
        return self.admission.users

    @property
    def static_key(self) -> StaticKey:
        return self.admission.static_key

    # The table's dicts, which the daemon hands to the data path.
    @property
    def terminals(self) -> dict[str, Terminal]:
        return self.table.terminals

    @property
    def by_vipa(self) -> dict[bytes, Terminal]:
        return self.table.by_vipa

    @property
    def tunnel_vipa(self) -> dict[Addr, bytes]:
        return self.table.tunnel_vipa

    @property
    def default_tunnel(self) -> dict[bytes, Addr]:
        return self.table.default_tunnel

    def screen(self, request: Request, source: Addr, size: int, now: float) -> Response | bool:
        """The SIP port's screen: see `Admission.screen`."""
        return self.admission.screen(request, source, size, now)

    def on_plain_message(self, request: Request, source: Addr, now: float) -> Response:
        """A request on the SIP port that the screen let open a transaction."""
        if request.method == "REGISTER":
            return self.on_register(request, source, now)
        if request.method == "MESSAGE":
            return self._reject(request, 403, "UPMT messages travel inside a tunnel")
        if request.method == "OPTIONS":
            return build_response(request, 200, to_tag=new_tag())
        return self._reject(request, 405, f"{request.method} not allowed")

    # -- association --------------------------------------------------------
    def on_register(self, request: Request, source: Addr, now: float) -> Response:
        """A REGISTER whose source address is proven (its cookie passed the screen)."""
        try:
            return self._register(request, source, now)
        except StoreUnavailable:
            # Half a REGISTER done is harmless (a lease is sticky): the client comes back
            # after Retry-After and finds it.
            return self.store_unavailable(request)

    def store_unavailable(self, request: Request) -> Response:
        """`503 Store Unavailable`, Retry-After: what a REGISTER gets while the store is down."""
        self.counters.store_unavailable += 1
        self.counters.rejected += 1
        return build_response(
            request,
            503,
            "Store Unavailable",
            to_tag=new_tag(),
            headers=[("Retry-After", str(OVERLOAD_RETRY_AFTER))],
        )

    def _register(self, request: Request, source: Addr, now: float) -> Response:
        admitted = self.admission.admit(request, source, now)
        if isinstance(admitted, Response):
            self.counters.rejected += 1
            return admitted
        info = admitted.info
        wall = self.wall_clock()
        expires = self.default_expires if info.expires is None else info.expires
        if expires == 0:
            vipa = self.store.lookup(info.terminal_id) or "0.0.0.0"
            self.store.unregister(info.terminal_id)
            self.table.remove(info.terminal_id)
            self.counters.unregisters += 1
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
        if self._full(info.terminal_id):
            return self._elsewhere(request, info.terminal_id)
        pin = None if admitted.pinned else admitted.proven.offer.static
        try:
            vipa = self.store.acquire(
                info.terminal_id,
                wall,
                in_use=self._in_use,
                prefix=source_prefix(source[0]),
                pin=pin,
            )
        except PoolExhausted as exc:
            return self._reject(request, 503, str(exc))
        except PrefixCapReached as exc:
            return self._reject(request, 403, f"too many terminals from here: {exc}")
        except KeyConflict:
            self.admission.auth_failures += 1
            return self._reject(request, 403, "terminal id belongs to another key")
        if pin is not None:
            log.info(
                "terminal %s pinned to key %s (first use)",
                info.terminal_id,
                encode_key(admitted.proven.offer.static),
            )
        previous = self.store.register(info.terminal_id, wall + expires, wall)
        if previous is not None:
            log.info("terminal %s moved here from anchor %s", info.terminal_id, previous)
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

    def _full(self, terminal_id: str) -> bool:
        """Whether a terminal not associated here must go elsewhere (`max_terminals`)."""
        return (
            self.max_terminals is not None
            and terminal_id not in self.terminals
            and len(self.terminals) >= self.max_terminals
        )

    def _elsewhere(self, request: Request, terminal_id: str) -> Response:
        """302 to the other anchors (the next first each time), or 503 with none."""
        if not self.redirect_to:
            self.counters.full += 1
            return build_response(
                request,
                503,
                "Anchor Full",
                to_tag=new_tag(),
                headers=[("Retry-After", "60")],
            )
        self.counters.redirected += 1
        start = self._redirects % len(self.redirect_to)
        self._redirects += 1
        order = self.redirect_to[start:] + self.redirect_to[:start]
        log.info(
            "terminal %s redirected to %s: %d terminals here",
            terminal_id,
            format_hostport(order[0]),
            len(self.terminals),
        )
        return build_response(
            request,
            302,
            "Moved Temporarily",
            to_tag=new_tag(),
            headers=[("Contact", f"<sip:{format_hostport(a)}>") for a in order],
        )

    def _terminal(self, admitted: Admitted, vipa: str, source: Addr, now: float) -> Terminal:
        terminal_id = admitted.info.terminal_id
        terminal = self.terminals.get(terminal_id)
        if terminal is not None and terminal.vipa == vipa:
            return terminal
        if terminal is not None:
            self.table.remove(terminal_id)
        terminal = Terminal(terminal_id, vipa, socket.inet_aton(vipa), now, source)
        self.table.add(terminal)
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
        self.table.touched.add(terminal.terminal_id)

    def _in_use(self, terminal_id: str) -> bool:
        return terminal_id in self.terminals

    def on_moved(self, terminal_id: str, anchor_id: str) -> bool:
        """The terminal registered at anchor `anchor_id` (the store says): its registration,
        tunnels, keys and flows here go. Whether it was here."""
        if terminal_id not in self.terminals or anchor_id == self.store.anchor_id:
            return False
        log.info(
            "terminal %s moved to anchor %s: its registration, tunnels and flows here are dropped",
            terminal_id,
            anchor_id,
        )
        self.table.remove(terminal_id)
        self.counters.moved_away += 1
        return True

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
            self.table.remove(terminal_id)
            self.counters.users_removed += 1
            gone.append(terminal_id)
        return gone

    # -- requests inside tunnels: the broker's ----------------------------------
    def screen_tunnel(
        self, request: Request, tunnel: Addr, size: int, now: float
    ) -> Response | bool:
        """The tunnel port's screen: see `TunnelBroker.screen`."""
        return self.broker.screen(request, tunnel, size, now)

    def on_tunnel_message(self, request: Request, tunnel: Addr, now: float) -> Response | None:
        """A MESSAGE inside a tunnel (see `TunnelBroker.on_message`); None: drop it."""
        return self.broker.on_message(request, tunnel, now)

    # -- restart in place -----------------------------------------------------
    def export_state(self, now: float) -> dict[str, Any]:
        """Associations, tunnels, keys and flows, for the process that replaces this one."""
        return restart_state.export_state(self.table, now)

    def import_state(self, state: dict[str, Any], now: float, mono: float) -> int:
        """Take over what `export_state` wrote; the number of terminals restored."""
        return restart_state.import_state(self.table, state, now, mono)

    # -- time --------------------------------------------------------------
    def expire(self, now: float, last_heard: dict[Addr, float], tunnel_idle: float) -> None:
        """Forget registrations past their Expires, tunnels silent for `tunnel_idle`, old keys."""
        for terminal in list(self.terminals.values()):
            if terminal.expires_at <= now:
                self.counters.expired_terminals += 1
                self.table.remove(terminal.terminal_id)
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
                    self.table.drop_tunnel(terminal, addr)
        if self.encryption:
            for terminal_id in self.sessions.expire(now):
                log.warning(
                    "terminal %s did not rekey in time: its tunnels are closed", terminal_id
                )
                keyless = self.terminals.get(terminal_id)
                if keyless is not None:
                    for addr in list(keyless.tunnels):
                        self.table.drop_tunnel(keyless, addr)

    # -- answers -------------------------------------------------------------
    def _reject(self, request: Request, code: int, reason: str) -> Response:
        self.counters.rejected += 1
        return self.admission.reject(request, code, reason)

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
