"""Who may associate: the anchor's checks of a REGISTER, in the order that keeps them cheap.

1. `screen` (before any SIP transaction exists): a REGISTER without a valid
   address cookie gets a stateless 401 carrying a fresh cookie, the anchor's
   public key, its encryption setting and, with users, the digest challenges
   — no larger than three times the request (RFC 9000 §8.1), trimmed to the
   key-exchange challenge when the digest ones do not fit. Other methods get
   small stateless answers. Sources inside the VIPA pool are dropped: a
   tunnel must not run inside the overlay.
2. `admit` (inside the transaction, the source proven): encryption setting,
   digest credentials (with a users file), the key-exchange proof (see
   `signalling.handshake`), replay of an old offer, and, without a users
   file, the terminal id's pinned key (trust on first use). Only then may the
   registrar touch the lease store.

Everything is sans-IO: `now` is passed in, the lease store is the only
state outside this object (its pinned keys; a store that cannot be reached
raises `StoreUnavailable` out of `admit`, which the registrar answers).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from sipmessage import Request, Response

from anchor_node.store.api import Store
from anchor_node.users import UserStore
from ground.constants import Addr
from ground.errors import MalformedError
from signalling.cookies import CookieJar
from signalling.digest import NonceStore, Outcome, challenge_values, verify
from signalling.handshake import (
    KX_HEADER,
    Binding,
    Challenge,
    Offer,
    ProvenOffer,
    StaticKey,
    prove_offer,
)
from signalling.message import build_response, checked, new_tag, serialize
from signalling.register import RegisterInfo, parse_register_untrusted
from signalling.transaction import AMPLIFICATION_LIMIT
from signalling.tunnelauth import derive_key

__all__ = ["Admission", "Admitted"]

log = logging.getLogger("upmt.anchor.admission")
# Offers already used, per terminal: a REGISTER replayed after its transaction
# ended (32 s) must not re-associate the terminal under keys it does not hold.
_SEEN_OFFERS = 8
_MAX_TERMINALS_SEEN = 100_000


@dataclass(frozen=True, slots=True)
class Admitted:
    """A REGISTER that passed every check: the registrar may act on it."""

    info: RegisterInfo
    proven: ProvenOffer
    pinned: bool  # the terminal's key was pinned already (or users authenticate it)


class Admission:
    def __init__(
        self,
        *,
        static_key: StaticKey,
        leases: Store,
        pool: ipaddress.IPv4Network,
        encryption: bool,
        users: UserStore | None = None,
        cookies: CookieJar | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        # Digest nonces carry wall-clock time (they outlive a restart's clock).
        self.wall_clock = wall_clock
        self.static_key = static_key
        self.leases = leases
        self.pool = pool
        self.encryption = encryption
        self.users = users
        self.cookies = cookies or CookieJar()
        self.nonces = NonceStore()
        self._seen: OrderedDict[str, list[bytes]] = OrderedDict()
        self.auth_failures = 0
        self.challenges = 0
        self.pool_sources = 0

    # -- stateless ------------------------------------------------------------------
    def screen(self, request: Request, source: Addr, size: int, now: float) -> Response | bool:
        """The SIP port's screen (`signalling.transaction.Screen`)."""
        if self._in_pool(source[0]):
            self.pool_sources += 1
            return False
        method = request.method
        if method == "REGISTER":
            cookie = self._cookie_of(request)
            if cookie is not None and self.cookies.valid(cookie, source, now):
                return True
            return self._challenge(request, source, size, now)
        if method == "OPTIONS":
            return build_response(request, 200, to_tag=new_tag())
        if method == "MESSAGE":
            return build_response(request, 403, "UPMT messages travel inside a tunnel")
        return build_response(request, 405, to_tag=new_tag())

    def _in_pool(self, host: str) -> bool:
        try:
            return ipaddress.ip_address(host) in self.pool
        except ValueError:
            return False

    @staticmethod
    def _cookie_of(request: Request) -> bytes | None:
        values = request.headers.getlist(KX_HEADER)
        if len(values) != 1:
            return None
        return Offer.cookie_of_untrusted(values[0])

    def _challenge(self, request: Request, source: Addr, size: int, now: float) -> Response:
        """A 401 with the key-exchange challenge and, if they fit, the digest ones."""
        self.challenges += 1
        kx = Challenge(self.cookies.issue(source, now), self.static_key.public, self.encryption)
        headers = [("WWW-Authenticate", kx.encode())]
        answer = build_response(request, 401, to_tag=new_tag(), headers=headers)
        if self.users is None:
            return answer
        digest = challenge_values(self.users.realm, self.nonces, self.wall_clock())
        # Digest first: what a standard SIP peer answers (it takes the first it knows).
        full = build_response(
            request,
            401,
            to_tag=new_tag(),
            headers=[("WWW-Authenticate", v) for v in digest] + headers,
        )
        try:
            fits = len(serialize(full)) <= AMPLIFICATION_LIMIT * size
        except ValueError:
            fits = False
        # Trimmed: the client comes back with the cookie, and the digest
        # challenge then goes to a proven address, inside a transaction.
        return full if fits else answer

    # -- inside a transaction ---------------------------------------------------------
    def admit(self, request: Request, source: Addr, now: float) -> Admitted | Response:
        """The checks of a cookie-bearing REGISTER; the answer to send when one fails."""
        try:
            info = parse_register_untrusted(request)
            offer = Offer.parse_untrusted(request.headers.get(KX_HEADER) or "")
        except MalformedError as exc:
            return self.reject(request, 400, str(exc))
        if offer.encryption != self.encryption:
            mine = "on" if self.encryption else "off"
            return self.reject(
                request, 488, f"tunnel encryption is {mine} at this anchor: use --encryption {mine}"
            )
        psk: bytes | None = None
        if self.users is not None:
            outcome = self._digest(request, info.terminal_id, source, now)
            if isinstance(outcome, Response):
                return outcome
            psk = outcome
        binding = Binding(
            info.terminal_id,
            checked("Call-ID", lambda: request.call_id),
            checked("CSeq", lambda: request.cseq.sequence),
            info.expires,
            info.vipa,
        )
        try:
            proven = prove_offer(self.static_key, offer, binding, psk)
        except MalformedError:
            self.auth_failures += 1
            log.warning("REGISTER for %s refused: key exchange failed", info.terminal_id)
            return self.reject(request, 403, "key exchange failed")
        seen = self._seen.get(info.terminal_id, [])
        if offer.ephemeral in seen:
            self.auth_failures += 1
            return self.reject(request, 403, "key exchange replayed")
        pinned = True
        if self.users is None:
            known = self.leases.pinned_key(info.terminal_id)
            if known is not None and known != offer.static:
                self.auth_failures += 1
                log.warning(
                    "REGISTER for %s refused: the id belongs to another terminal key",
                    info.terminal_id,
                )
                return self.reject(request, 403, "terminal id belongs to another key")
            pinned = known is not None
        self._remember(info.terminal_id, offer.ephemeral)
        return Admitted(info, proven, pinned)

    def _remember(self, terminal_id: str, ephemeral: bytes) -> None:
        seen = self._seen.setdefault(terminal_id, [])
        seen.append(ephemeral)
        del seen[:-_SEEN_OFFERS]
        self._seen.move_to_end(terminal_id)
        while len(self._seen) > _MAX_TERMINALS_SEEN:
            self._seen.popitem(last=False)

    def _digest(
        self, request: Request, terminal_id: str, source: Addr, now: float
    ) -> bytes | Response:
        """The digest-derived pre-shared key of correct credentials, or the answer to send.

        RFC 3261 §22.2: no or stale credentials → 401 with a fresh challenge
        (one per algorithm, RFC 8760); wrong ones → 403; unparsable → 400. A
        user may only register its own terminal id.
        """
        assert self.users is not None
        wall = self.wall_clock()
        value = request.headers.get("Authorization")
        if value is None:
            return self._digest_challenge(request, source, now, wall, stale=False)
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
            return self._digest_challenge(request, source, now, wall, stale=True)
        if result.outcome is Outcome.MALFORMED:
            self.auth_failures += 1
            return self.reject(request, 400, f"bad Authorization: {result.reason}")
        if result.outcome is not Outcome.OK or result.username != terminal_id:
            self.auth_failures += 1
            log.warning("REGISTER for %s refused: wrong credentials", terminal_id)
            return self.reject(request, 403, "wrong credentials")
        secret = self.users.ha1(result.username, result.algorithm)
        assert secret is not None
        return derive_key(secret, result.nonce, result.cnonce, terminal_id)

    def _digest_challenge(
        self, request: Request, source: Addr, now: float, wall: float, *, stale: bool
    ) -> Response:
        assert self.users is not None
        self.challenges += 1
        kx = Challenge(self.cookies.issue(source, now), self.static_key.public, self.encryption)
        values = challenge_values(self.users.realm, self.nonces, wall, stale=stale)
        return build_response(
            request,
            401,
            to_tag=new_tag(),
            headers=[("WWW-Authenticate", kx.encode())] + [("WWW-Authenticate", v) for v in values],
        )

    @staticmethod
    def reject(request: Request, code: int, reason: str) -> Response:
        phrase = reason.replace("\r", " ").replace("\n", " ")[:120]
        return build_response(request, code, phrase, to_tag=new_tag())
