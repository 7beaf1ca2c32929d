"""Association with the anchor: REGISTER outside the tunnels, the key exchange, rekeys.

REGISTER goes from one interface at a time (a socket bound to it, with the
client's mark so it bypasses the TUN); if an interface gets no answer the
next is tried. One Call-ID and From tag serve every REGISTER, CSeq counts up
(RFC 3261 §10.2.4). Each association runs the key exchange of
`signalling.handshake` (see `signalling.association`): the anchor's stateless
401 gives a cookie and its key, the second REGISTER carries our offer, the
200 OK the anchor's confirmation, and `on_new_keys` receives the session
keys. A refresh is a new association, hence a rekey: it happens every
`--rekey-interval` (or sooner when a key has been used too much).

At start-up a refusal (403, 488, a mismatched anchor key) ends the client with
a clear message. Once associated, nothing unauthenticated can tear it down: a
refusal or a forged answer to a refresh is logged, the association in force
stays, and the refresh is tried again.
"""

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

import trio
from sipmessage import Response

from ground.errors import MalformedError, SetupError
from signalling.association import AnchorMismatch, AssociationAttempt, Dialog
from signalling.handshake import MAX_SLOTS, SessionKeys, StaticKey
from signalling.message import new_call_id, new_tag
from tunnel.addr import format_hostport
from tunnel.sockets import open_tunnel_socket
from upmt.sipchannel import SipChannel, TransactionFailed
from upmt_client.config import ClientConfig
from upmt_client.interfaces import Access
from upmt_client.routing import FWMARK
from upmt_client.trust import AnchorTrust

log = logging.getLogger("upmt.client")
RETRY_DELAY = 5.0


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


def new_index_base() -> int:
    """A random receiver-index base for the next association's tunnel slots."""
    return (secrets.randbelow((1 << 32) // MAX_SLOTS - 1) + 1) * MAX_SLOTS


class Associator:
    def __init__(
        self,
        config: ClientConfig,
        on_new_vipa: Callable[[str, str], None],
        *,
        static: StaticKey,
        trust: AnchorTrust,
        on_new_keys: Callable[[SessionKeys], None] = lambda _keys: None,
    ) -> None:
        self.config = config
        self.anchor_sip = (config.anchor, config.sip_port)
        self.registration = Registration()
        self.static = static
        self.trust = trust
        self._on_new_vipa = on_new_vipa
        self._on_new_keys = on_new_keys
        self._lock = trio.Lock()
        self._rekey_now = trio.Event()
        self.associations = 0
        self.last_error = ""

    def request_rekey(self) -> None:
        """Associate again now (a key used too much); the refresh loop does it."""
        self._rekey_now.set()

    async def associate(self, accesses: list[Access], *, initial: bool = False) -> str:
        """REGISTER over each interface in turn until the anchor accepts us; the VIPA."""
        async with self._lock:
            last_error = "no usable interface"
            for access in accesses:
                try:
                    attempt, response = await self._register_via(access)
                except (TransactionFailed, SetupError) as exc:
                    last_error = f"{access.name}: {exc}"
                    log.warning("REGISTER via %s failed: %s", access.name, exc)
                    continue
                except AnchorMismatch as exc:
                    self._refused(str(exc), initial)
                    last_error = str(exc)
                    continue
                if response.code >= 500:
                    last_error = f"{access.name}: {response.code} {response.phrase}"
                    continue
                if response.code != 200:
                    self._refused(_refusal(response), initial)
                    last_error = f"{response.code} {response.phrase}"
                    continue
                try:
                    vipa, expires, keys = attempt.on_ok(response)
                    self._associated(attempt, access, vipa, expires, keys)
                except MalformedError as exc:
                    last_error = f"bad answer (forged?): {exc}"
                    log.warning("answer to REGISTER via %s unusable: %s", access.name, exc)
                    continue
                return vipa
            self.last_error = last_error
            anchor = format_hostport(self.anchor_sip)
            message = f"cannot reach the anchor at {anchor} ({last_error})"
            if initial:
                raise SetupError(message)
            raise TransactionFailed(message)

    def _refused(self, why: str, initial: bool) -> None:
        if initial:
            raise AnchorRefused(why)
        # Unauthenticated: it may be forged. The association in force stays.
        log.warning("the anchor refused a refresh (%s): keeping the association, retrying", why)

    def _associated(
        self,
        attempt: AssociationAttempt,
        access: Access,
        vipa: str,
        expires: int,
        keys: SessionKeys | None,
    ) -> None:
        reg = self.registration
        if keys is None:
            raise MalformedError("the anchor granted no lifetime")
        if attempt.pinned is None and attempt.anchor_key is not None:
            self.trust.trust_on_first_use(attempt.anchor_key)
        if reg.vipa is not None and vipa != reg.vipa:
            self._on_new_vipa(reg.vipa, vipa)
        reg.vipa = vipa
        reg.expires = max(expires, 1)
        reg.registered_at = trio.current_time()
        reg.via = access.name
        reg.keys = keys
        self.associations += 1
        self.last_error = ""
        self._on_new_keys(keys)
        log.info(
            "associated as %s via %s: VIPA %s, expires %d s, keys %s",
            self.config.terminal_id,
            access.name,
            vipa,
            expires,
            "new" if self.associations == 1 else f"renewed ({self.associations})",
        )

    async def refresh_forever(self, accesses: Callable[[], list[Access]]) -> None:
        """Associate again every rekey interval (or half the lifetime); retry on failure."""
        retry_at: float | None = None
        while True:
            reg = self.registration
            due = reg.registered_at + min(reg.expires / 2, self.config.rekey_interval)
            with trio.move_on_at(due if retry_at is None else retry_at):
                await self._rekey_now.wait()
            self._rekey_now = trio.Event()
            try:
                await self.associate(accesses())
                retry_at = None
            except TransactionFailed as exc:
                log.warning("re-association failed: %s; retrying in %g s", exc, RETRY_DELAY)
                retry_at = trio.current_time() + RETRY_DELAY

    async def _register_via(self, access: Access) -> tuple[AssociationAttempt, Response]:
        """One association attempt over `access`: challenge, offer, final answer."""
        cfg = self.config
        attempt = AssociationAttempt(
            dialog=self.registration.dialog,
            static=self.static,
            terminal_id=cfg.terminal_id,
            an_host=cfg.anchor,
            an_port=cfg.sip_port,
            expires=cfg.expires,
            vipa=self.registration.vipa,
            index=new_index_base(),
            encryption=cfg.encryption,
            pinned_anchor_key=self.trust.pinned(),
            password=cfg.password,
        )
        sock = open_tunnel_socket(interface=access.name, mark=FWMARK, rcvbuf=None, sndbuf=None)
        outcome: Response | Exception = TransactionFailed(
            f"no answer within {cfg.register_timeout:g} s"
        )
        with sock:
            channel = SipChannel(f"register-{access.name}", lambda d, a: sock.sendto(d, a))
            tsock = trio.socket.from_stdlib_socket(sock)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(channel.run)
                nursery.start_soon(_receive_into, tsock, channel)
                with trio.move_on_after(cfg.register_timeout):
                    outcome = await self._exchange(
                        attempt, channel, access.address, sock.getsockname()[1]
                    )
                nursery.cancel_scope.cancel()
        # Raised here, outside the nursery, so that callers see it unwrapped.
        if isinstance(outcome, Exception):
            raise outcome
        return attempt, outcome

    async def _exchange(
        self, attempt: AssociationAttempt, channel: SipChannel, local_host: str, local_port: int
    ) -> Response | Exception:
        """A 401 with the cookie, maybe one more with a digest challenge (or a fresh
        cookie after an anchor restart), then the answer; or what went wrong."""
        for _round in range(3):
            request = attempt.register(local_host, local_port)
            try:
                response = await channel.request(request, self.anchor_sip)
            except TransactionFailed as exc:
                return exc
            if response.code != 401:
                return response
            try:
                attempt.on_challenge(response)
            except AnchorMismatch as exc:
                return exc
            except MalformedError as exc:
                return TransactionFailed(f"unusable challenge: {exc}")
        return TransactionFailed("still challenged after answering")


def _refusal(response: Response) -> str:
    if response.code == 403:
        return f"the anchor refused the association (403 {response.phrase}): wrong password?"
    return f"the anchor refused the association: {response.code} {response.phrase}"


async def _receive_into(sock: trio.socket.SocketType, channel: SipChannel) -> None:
    while True:
        try:
            data, addr = await sock.recvfrom(65535)
        except OSError:
            await trio.sleep(0.1)
            continue
        channel.feed(data, addr[:2])
