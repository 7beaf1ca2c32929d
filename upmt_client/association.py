"""Association with the anchor: REGISTER outside the tunnels, refreshes, the VIPA.

REGISTER goes from one interface at a time (a socket bound to it, with the
client's mark so it bypasses the TUN); if an interface gets no answer the
next is tried. One Call-ID and From tag serve every refresh, CSeq counts up
(RFC 3261 §10.2.4). A 4xx answer ends the client (the anchor will not take
it); 5xx and silence are retried.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import trio
from sipmessage import Request, Response

from signalling.digest import (
    ParsedChallenge,
    authorization_value,
    choose_challenge,
    ha1,
    new_cnonce,
)
from signalling.message import new_branch, new_call_id, new_tag
from signalling.register import build_register, parse_register_ok_untrusted
from signalling.tunnelauth import KEY_HEADER, decode_key_untrusted, derive_key
from tunnel.addr import format_hostport
from tunnel.sockets import open_tunnel_socket
from upmt.errors import MalformedError, SetupError
from upmt.sipchannel import SipChannel, TransactionFailed
from upmt_client.config import ClientConfig
from upmt_client.interfaces import Access
from upmt_client.routing import FWMARK

log = logging.getLogger("upmt.client")


class AnchorRefused(SetupError):
    """The anchor answered with an error that retrying will not fix."""


@dataclass
class Registration:
    call_id: str = field(default_factory=new_call_id)
    from_tag: str = field(default_factory=new_tag)
    cseq: int = 0
    vipa: str | None = None
    expires: int = 0
    registered_at: float = 0.0
    via: str = ""
    # The association's key for signing in-tunnel MESSAGEs, and their counter.
    key: bytes = b""
    seq: int = 0

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def expires_in(self, now: float) -> float:
        return max(0.0, self.registered_at + self.expires - now)


class Associator:
    def __init__(self, config: ClientConfig, on_new_vipa: Callable[[str, str], None]) -> None:
        self.config = config
        self.anchor_sip = (config.anchor, config.sip_port)
        self.registration = Registration()
        self._on_new_vipa = on_new_vipa
        self._lock = trio.Lock()
        self._challenge: ParsedChallenge | None = None
        self._cnonce = ""

    async def associate(self, accesses: list[Access], *, initial: bool = False) -> str:
        """REGISTER over each interface in turn until the anchor answers; the VIPA."""
        async with self._lock:
            reg = self.registration
            last_error = "no usable interface"
            for access in accesses:
                try:
                    response = await self._register_via(access)
                except (TransactionFailed, SetupError) as exc:
                    last_error = f"{access.name}: {exc}"
                    log.warning("REGISTER via %s failed: %s", access.name, exc)
                    continue
                if response.code >= 500:
                    last_error = f"{access.name}: {response.code} {response.phrase}"
                    continue
                if response.code == 403:
                    raise AnchorRefused(
                        "the anchor refused the credentials (403 Forbidden): wrong password?"
                    )
                if response.code != 200:
                    raise AnchorRefused(
                        f"anchor refused association: {response.code} {response.phrase}"
                    )
                try:
                    vipa, expires = parse_register_ok_untrusted(response)
                    key = self._key_from(response)
                except MalformedError as exc:
                    last_error = f"bad answer: {exc}"
                    continue
                reg.key = key
                if reg.vipa is not None and vipa != reg.vipa:
                    self._on_new_vipa(reg.vipa, vipa)
                reg.vipa = vipa
                reg.expires = max(expires, 1)
                reg.registered_at = trio.current_time()
                reg.via = access.name
                log.info(
                    "registered as %s via %s: VIPA %s, expires %d s",
                    self.config.terminal_id,
                    access.name,
                    vipa,
                    expires,
                )
                return vipa
            anchor = format_hostport(self.anchor_sip)
            message = f"cannot reach the anchor at {anchor} ({last_error})"
            if initial:
                raise SetupError(message)
            raise TransactionFailed(message)

    async def refresh_forever(self, accesses: Callable[[], list[Access]]) -> None:
        """Re-REGISTER at half the granted lifetime; retry every 5 s on failure."""
        while True:
            reg = self.registration
            await trio.sleep_until(reg.registered_at + reg.expires / 2)
            try:
                await self.associate(accesses())
            except TransactionFailed as exc:
                log.warning("registration refresh failed: %s; retrying in 5 s", exc)
                reg.registered_at = trio.current_time() - reg.expires / 2 + 5

    async def _register_via(self, access: Access) -> Response:
        """One association attempt over `access`, answering a digest challenge once."""
        sock = open_tunnel_socket(interface=access.name, mark=FWMARK, rcvbuf=None, sndbuf=None)
        with sock:
            channel = SipChannel(f"register-{access.name}", lambda d, a: sock.sendto(d, a))
            tsock = trio.socket.from_stdlib_socket(sock)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(channel.run)
                nursery.start_soon(_receive_into, tsock, channel)
                try:
                    with trio.move_on_after(self.config.register_timeout):
                        for _attempt in range(2):
                            request = self._register_request(access, sock.getsockname()[1])
                            response = await channel.request(request, self.anchor_sip)
                            if response.code != 401 or not self._take_challenge(response):
                                return response
                        return response
                finally:
                    nursery.cancel_scope.cancel()
        raise TransactionFailed(f"no answer within {self.config.register_timeout:g} s")

    def _register_request(self, access: Access, local_port: int) -> Request:
        reg = self.registration
        reg.cseq += 1
        request = build_register(
            an_host=self.config.anchor,
            an_port=self.config.sip_port,
            terminal_id=self.config.terminal_id,
            local_host=access.address,
            local_port=local_port,
            call_id=reg.call_id,
            cseq=reg.cseq,
            from_tag=reg.from_tag,
            branch=new_branch(),
            expires=self.config.expires,
            vipa=reg.vipa,
        )
        if self._challenge is not None and self.config.password is not None:
            # Credentials for the latest challenge, with a fresh cnonce each time
            # (RFC 7616 §3.4): the anchor answers 401 stale when the nonce expired.
            self._cnonce = new_cnonce()
            request.headers.add(
                "Authorization",
                authorization_value(
                    self._challenge,
                    username=self.config.terminal_id,
                    password=self.config.password,
                    method="REGISTER",
                    uri=str(request.uri),
                    cnonce=self._cnonce,
                ),
            )
        return request

    def _take_challenge(self, response: Response) -> bool:
        """Remember a 401's challenge; False if answering it cannot help."""
        if self.config.password is None:
            raise AnchorRefused("the anchor requires authentication: give --password-file")
        try:
            challenge = choose_challenge(response.headers.getlist("WWW-Authenticate"))
        except MalformedError as exc:
            raise AnchorRefused(f"the anchor's challenge is unusable: {exc}") from None
        retry = self._challenge is None or challenge.stale or challenge != self._challenge
        self._challenge = challenge
        return retry

    def _key_from(self, response: Response) -> bytes:
        """The association key: handed out by an anchor without users, else derived."""
        handed = response.headers.get(KEY_HEADER)
        if handed is not None:
            return decode_key_untrusted(handed)
        if self._challenge is None or self.config.password is None:
            raise MalformedError("no association key in the answer")
        secret = ha1(
            self.config.terminal_id,
            self._challenge.realm,
            self.config.password,
            self._challenge.algorithm,
        )
        return derive_key(secret, self._challenge.nonce, self._cnonce, self.config.terminal_id)


async def _receive_into(sock: trio.socket.SocketType, channel: SipChannel) -> None:
    while True:
        try:
            data, addr = await sock.recvfrom(65535)
        except OSError:
            await trio.sleep(0.1)
            continue
        channel.feed(data, addr[:2])
