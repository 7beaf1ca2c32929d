"""Association with the anchor: REGISTER outside the tunnels, the key exchange, rekeys (sans-IO).

REGISTER goes from one interface at a time (a socket bound to it, with the
client's mark so it bypasses the TUN); if an interface gets no answer the
next is tried. One Call-ID and From tag serve every REGISTER, CSeq counts up
(RFC 3261 §10.2.4). Each association runs the key exchange of
`signalling.handshake` (see `signalling.association`): the anchor's stateless
401 gives a cookie and its key, the second REGISTER carries our offer, the
200 OK the anchor's confirmation. A refresh is a new association, hence a
rekey: it happens every `--rekey-interval` (or sooner when a key has been
used too much, `request_rekey`).

At start-up a refusal (403, 488, a mismatched anchor key) ends the client with
a clear message. Once associated, nothing unauthenticated can tear it down: a
refusal or a forged answer to a refresh is logged, the association in force
stays, and the refresh is tried again.

With several anchors the owner decides where to go next: when no interface
reached this anchor (`on_unreachable`), or when it answered `302` with other
anchors' contacts (`on_redirect`, only while no association is in force:
a redirect of a refresh is unauthenticated and ignored); it then points the
association at another anchor (`retarget`) and starts it again.

The process is driven by its owner (`upmt_client.host.MobileHost`): it asks
for a REGISTER socket on an interface (an `OpenSocket` event through
`emit`), is told when one is open (`socket_opened`) and sends through the
owner's `ClientTransactions` on the channel ``register:<interface>``.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from sipmessage import Response

from ground.constants import Addr
from ground.errors import ConfigError, MalformedError, SetupError
from signalling.association import AnchorMismatch, AssociationAttempt, Dialog
from signalling.handshake import MAX_SLOTS, SessionKeys, StaticKey
from signalling.message import new_call_id, new_tag
from tunnel.addr import format_hostport
from upmt_client.config import ClientConfig, parse_anchor
from upmt_client.host_events import CloseSocket, Failed, HostEvent, OpenSocket, SocketKind
from upmt_client.transactions import ClientTransactions

__all__ = [
    "AnchorRefused",
    "Associated",
    "Association",
    "Registration",
    "redirect_contacts",
    "register_channel",
]

log = logging.getLogger("upmt.client")
RETRY_DELAY = 5.0
MAX_CHALLENGES = 3


class AnchorRefused(SetupError):
    """The anchor answered with an error that retrying will not fix."""


@dataclass
class Registration:
    dialog: Dialog = field(default_factory=lambda: Dialog(new_call_id(), new_tag()))
    vipa: str | None = None
    expires: int = 0
    registered_at: float = 0.0
    via: str = ""
    # The association's keys (in-tunnel MESSAGE signing, tunnel roots) and the
    # sequence counter of in-tunnel MESSAGEs.
    keys: SessionKeys | None = None
    seq: int = 0

    @property
    def signing_key(self) -> bytes:
        assert self.keys is not None
        return self.keys.signing

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def expires_in(self, now: float) -> float:
        return max(0.0, self.registered_at + self.expires - now)


@dataclass(frozen=True)
class Associated:
    """The outcome of a successful association, for the owner to act on."""

    vipa: str
    previous_vipa: str | None
    keys: SessionKeys
    interface: str
    # The anchor key to remember (trust on first use), when none was pinned.
    learned_anchor_key: bytes | None


def new_index_base() -> int:
    """A random receiver-index base for the next association's tunnel slots."""
    return (secrets.randbelow((1 << 32) // MAX_SLOTS - 1) + 1) * MAX_SLOTS


def register_channel(interface: str) -> str:
    return f"register:{interface}"


@dataclass
class _Try:
    """The association attempt on one interface."""

    interface: str
    via_host: str
    deadline: float = 0.0
    attempt: AssociationAttempt | None = None
    rounds: int = 0
    port: int = 0


class Association:
    def __init__(
        self,
        config: ClientConfig,
        transactions: ClientTransactions,
        *,
        static: StaticKey,
        pinned_anchor_key: Callable[[], bytes | None],
        on_associated: Callable[[Associated, float], None],
        emit: Callable[[HostEvent], None],
        anchor: Addr | None = None,
        on_unreachable: Callable[[str, float], bool] | None = None,
        on_redirect: Callable[[list[Addr], float], bool] | None = None,
    ) -> None:
        self.config = config
        self.anchor_sip: Addr = anchor or (config.anchor, config.sip_port)
        self.registration = Registration()
        # The owner's say when this anchor cannot be had; True: it took over.
        self._on_unreachable = on_unreachable
        self._on_redirect = on_redirect
        self.static = static
        self._pinned = pinned_anchor_key
        self._transactions = transactions
        self._on_associated = on_associated
        self._emit = emit
        self.associations = 0
        self._queue: list[tuple[str, str]] = []  # (interface, its address) still to try
        self._current: _Try | None = None
        self._initial = False
        self.last_error = ""
        self._retry_at: float | None = None
        self._rekey_now = False

    @property
    def in_progress(self) -> bool:
        return self._current is not None

    @property
    def initial(self) -> bool:
        """Whether the association under way is the start-up's (a refusal ends the client)."""
        return self._initial

    def retarget(self, anchor: Addr, now: float) -> None:
        """Associate with `anchor` from now on: what runs stops, the association in force goes.

        The VIPA held is kept as a hint (`VIpAddr`): anchors sharing a lease
        store give it back.
        """
        if self._current is not None:
            self._end(self._current, now)
        self._queue = []
        self.anchor_sip = anchor
        self.registration = Registration(vipa=self.registration.vipa)
        self._retry_at = None
        self._rekey_now = False

    def request_rekey(self) -> None:
        """Associate again at the next timer (a key used too much)."""
        self._rekey_now = True

    def start(self, accesses: list[tuple[str, str]], now: float, *, initial: bool = False) -> None:
        """REGISTER over each (interface, address) in turn until the anchor accepts us."""
        if self._current is not None:
            return  # one association at a time; the one under way brings new keys
        self._queue = list(accesses)
        self._initial = initial
        self.last_error = "no usable interface"
        self._next(now)

    def due(self) -> float | None:
        """When the next refresh (or retry) starts; None while one runs."""
        if self._current is not None:
            return None
        reg = self.registration
        if reg.keys is None and self._retry_at is None:
            return None
        if self._rekey_now:
            return -1.0
        if self._retry_at is not None:
            return self._retry_at
        return reg.registered_at + min(reg.expires / 2, self.config.rekey_interval)

    def get_timer(self) -> float | None:
        if self._current is not None:
            return self._current.deadline if self._current.attempt is not None else None
        return self.due()

    def handle_timer(self, now: float, accesses: Callable[[], list[tuple[str, str]]]) -> None:
        due = self.due()
        if due is not None and now >= due:
            self._rekey_now = False
            self._retry_at = None
            self.start(accesses(), now)

    # -- one interface ------------------------------------------------------------
    def socket_opened(self, interface: str, port: int, now: float) -> None:
        current = self._current
        if current is None or current.interface != interface or current.attempt is not None:
            return
        cfg = self.config
        current.deadline = now + cfg.register_timeout
        current.attempt = AssociationAttempt(
            dialog=self.registration.dialog,
            static=self.static,
            terminal_id=cfg.terminal_id,
            an_host=self.anchor_sip[0],
            an_port=self.anchor_sip[1],
            expires=cfg.expires,
            vipa=self.registration.vipa,
            index=new_index_base(),
            encryption=cfg.encryption,
            pinned_anchor_key=self._pinned(),
            password=cfg.password,
        )
        current.port = port
        self._send(current, now)

    def socket_failed(self, interface: str, reason: str, now: float) -> None:
        current = self._current
        if current is not None and current.interface == interface:
            self._fail(current, reason, now)

    def _send(self, current: _Try, now: float) -> None:
        assert current.attempt is not None
        request = current.attempt.register(current.via_host, current.port)
        self._transactions.request(
            register_channel(current.interface),
            request,
            self.anchor_sip,
            now,
            lambda response, at: self._answer(current, response, at),
            timeout=max(0.0, current.deadline - now),
        )

    def _answer(self, current: _Try, response: Response | None, now: float) -> None:
        if current is not self._current:
            return
        attempt = current.attempt
        assert attempt is not None
        if response is None:
            self._fail(current, f"no answer within {self.config.register_timeout:g} s", now)
        elif response.code == 401:
            self._challenged(current, attempt, response, now)
        elif response.code in (301, 302):
            self._redirected(current, response, now)
        elif response.code >= 500:
            self._fail(current, f"{response.code} {response.phrase}", now, quiet=True)
        elif response.code != 200:
            self._refused(current, _refusal(response), f"{response.code} {response.phrase}", now)
        else:
            self._accepted(current, attempt, response, now)

    def _challenged(
        self, current: _Try, attempt: AssociationAttempt, response: Response, now: float
    ) -> None:
        current.rounds += 1
        if current.rounds >= MAX_CHALLENGES:
            self._fail(current, "still challenged after answering", now)
            return
        try:
            attempt.on_challenge(response)
        except AnchorMismatch as exc:
            self._refused(current, str(exc), str(exc), now)
            return
        except MalformedError as exc:
            self._fail(current, f"unusable challenge: {exc}", now)
            return
        self._send(current, now)

    def _redirected(self, current: _Try, response: Response, now: float) -> None:
        contacts = redirect_contacts(response, self.config.sip_port)
        where = ", ".join(format_hostport(c) for c in contacts) or "nowhere"
        if self.registration.keys is not None:
            # Unauthenticated, and the association in force works: not a reason to leave.
            log.warning("the anchor redirected a refresh to %s: ignored", where)
            self._fail(current, f"redirected to {where}", now, quiet=True)
            return
        log.info(
            "anchor %s redirects to %s (%d %s)",
            format_hostport(self.anchor_sip),
            where,
            response.code,
            response.phrase,
        )
        self._end(current, now)
        self._queue = []
        if self._on_redirect is not None and self._on_redirect(contacts, now):
            return
        self.last_error = f"redirected to {where}, not followed"
        self._next(now)

    def _accepted(
        self, current: _Try, attempt: AssociationAttempt, response: Response, now: float
    ) -> None:
        try:
            vipa, expires, keys = attempt.on_ok(response)
            if keys is None:
                raise MalformedError("the anchor granted no lifetime")
        except MalformedError as exc:
            log.warning("answer to REGISTER via %s unusable: %s", current.interface, exc)
            self._fail(current, f"bad answer (forged?): {exc}", now, quiet=True)
            return
        self._end(current, now)
        reg = self.registration
        previous = reg.vipa
        reg.vipa = vipa
        reg.expires = max(expires, 1)
        reg.registered_at = now
        reg.via = current.interface
        reg.keys = keys
        self.associations += 1
        self._queue = []
        self._initial = False  # associated: from now on nothing ends the client
        learned = attempt.anchor_key if attempt.pinned is None else None
        log.info(
            "associated as %s with anchor %s via %s: VIPA %s, expires %d s, keys %s",
            self.config.terminal_id,
            format_hostport(self.anchor_sip),
            current.interface,
            vipa,
            expires,
            "new" if self.associations == 1 else f"renewed ({self.associations})",
        )
        self._on_associated(
            Associated(
                vipa, previous if previous != vipa else None, keys, current.interface, learned
            ),
            now,
        )

    def _refused(self, current: _Try, why: str, error: str, now: float) -> None:
        if self._initial:
            self._end(current, now)
            self._queue = []
            self._emit(Failed(AnchorRefused(why)))
            return
        # Unauthenticated: it may be forged. The association in force stays.
        log.warning("the anchor refused a refresh (%s): keeping the association, retrying", why)
        self._fail(current, error, now, quiet=True)

    def _fail(self, current: _Try, reason: str, now: float, *, quiet: bool = False) -> None:
        if not quiet:
            log.warning("REGISTER via %s failed: %s", current.interface, reason)
        self.last_error = f"{current.interface}: {reason}"
        self._end(current, now)
        self._next(now)

    def _end(self, current: _Try, now: float) -> None:
        self._current = None  # first: what the close answers finds nothing current
        self._transactions.close(register_channel(current.interface), now)
        self._emit(CloseSocket(SocketKind.REGISTER, current.interface))

    def _next(self, now: float) -> None:
        if self._queue:
            interface, address = self._queue.pop(0)
            self._current = _Try(interface, address)
            self._transactions.open(register_channel(interface))
            self._emit(OpenSocket(SocketKind.REGISTER, interface))
            return
        message = (
            f"cannot reach the anchor at {format_hostport(self.anchor_sip)} ({self.last_error})"
        )
        if self._on_unreachable is not None and self._on_unreachable(message, now):
            return
        if self._initial:
            self._emit(Failed(SetupError(message)))
        else:
            log.warning("re-association failed: %s; retrying in %g s", message, RETRY_DELAY)
            self._retry_at = now + RETRY_DELAY


def redirect_contacts(response: Response, default_port: int) -> list[Addr]:
    """The anchors a 3xx names (`Contact: <sip:ADDR:PORT>`, in order); others are skipped."""
    out: list[Addr] = []
    for value in response.headers.getlist("Contact"):
        for part in value.split(","):
            uri = part.strip().strip("<>").split(">", 1)[0].split(";", 1)[0]
            if not uri.lower().startswith("sip:"):
                continue
            hostport = uri[4:].rsplit("@", 1)[-1]
            try:
                addr = parse_anchor(hostport, default_port)
            except ConfigError:
                continue
            if addr not in out:
                out.append(addr)
    return out


def _refusal(response: Response) -> str:
    if response.code == 403:
        return f"the anchor refused the association (403 {response.phrase}): wrong password?"
    return f"the anchor refused the association: {response.code} {response.phrase}"
