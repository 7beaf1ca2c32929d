"""The terminal's side of association (sans-IO): REGISTERs, challenges, keys.

One `AssociationAttempt` is one association (or refresh, which is a new
association: fresh ephemeral keys, hence new session keys — the rekey):

    attempt = AssociationAttempt(...)
    request = attempt.register(local_host, local_port)   # no cookie yet
    -> 401: attempt.on_challenge(response)               # cookie, anchor key, digest
    request = attempt.register(local_host, local_port)   # with UPMT-KX (+ Authorization)
    -> 200: vipa, expires, keys = attempt.on_ok(response)

`on_challenge` checks the anchor's announced key against the pinned one and
its encryption setting against ours and raises `AnchorMismatch` (a clear
refusal for the user) on a difference; a 401 the attempt cannot use raises
`MalformedError`. `on_ok` authenticates the anchor: the confirmation in its
`UPMT-KX` header must check under the session keys, otherwise the 200 is
forged or broken (`MalformedError`) and nothing of it is used.
"""

from __future__ import annotations

from dataclasses import dataclass

from sipmessage import Request, Response

from ground.errors import MalformedError
from signalling.digest import (
    DIGEST_SCHEME,
    ParsedChallenge,
    authorization_value,
    choose_challenge,
    ha1,
    new_cnonce,
    parse_auth_untrusted,
)
from signalling.handshake import (
    CHALLENGE_SCHEME,
    KX_HEADER,
    Acceptance,
    Binding,
    Challenge,
    Initiator,
    SessionKeys,
    StaticKey,
    encode_key,
)
from signalling.message import checked, new_branch
from signalling.register import build_register, parse_register_ok_untrusted
from signalling.tunnelauth import derive_key

__all__ = ["AnchorMismatch", "AssociationAttempt", "Dialog", "kx_challenge_untrusted"]


class AnchorMismatch(Exception):
    """The anchor is not the one this terminal expects, or wants what it will not do."""


@dataclass
class Dialog:
    """What every REGISTER of one terminal shares (RFC 3261 §10.2.4)."""

    call_id: str
    from_tag: str
    cseq: int = 0


def kx_challenge_untrusted(response: Response) -> Challenge:
    """The `UPMT-KX` challenge among a 401's `WWW-Authenticate` values."""
    found: Challenge | None = None
    for value in response.headers.getlist("WWW-Authenticate"):
        try:
            scheme, params = parse_auth_untrusted(value)
        except MalformedError:
            continue
        if scheme.lower() != CHALLENGE_SCHEME.lower():
            continue
        if found is not None:
            raise MalformedError(f"more than one {CHALLENGE_SCHEME} challenge")
        found = Challenge.from_params_untrusted(params)
    if found is None:
        raise MalformedError(f"401 without a {CHALLENGE_SCHEME} challenge")
    return found


class AssociationAttempt:
    def __init__(
        self,
        *,
        dialog: Dialog,
        static: StaticKey,
        terminal_id: str,
        an_host: str,
        an_port: int,
        expires: int,
        vipa: str | None,
        index: int,
        encryption: bool,
        pinned_anchor_key: bytes | None,
        password: str | None = None,
    ) -> None:
        self.dialog = dialog
        self.static = static
        self.terminal_id = terminal_id
        self.an_host = an_host
        self.an_port = an_port
        self.expires = expires
        self.vipa = vipa
        self.index = index
        self.encryption = encryption
        self.pinned = pinned_anchor_key
        self.password = password
        self.challenge: Challenge | None = None
        self.digest: ParsedChallenge | None = None
        self._initiator: Initiator | None = None
        self._sent: Binding | None = None

    @property
    def anchor_key(self) -> bytes | None:
        """The key this attempt authenticates the anchor with (pinned, or announced)."""
        if self.pinned is not None:
            return self.pinned
        return None if self.challenge is None else self.challenge.anchor_key

    def register(self, local_host: str, local_port: int) -> Request:
        """The next REGISTER: a bare one first, then one answering the last challenge."""
        d = self.dialog
        d.cseq += 1
        request = build_register(
            an_host=self.an_host,
            an_port=self.an_port,
            terminal_id=self.terminal_id,
            local_host=local_host,
            local_port=local_port,
            call_id=d.call_id,
            cseq=d.cseq,
            from_tag=d.from_tag,
            branch=new_branch(),
            expires=self.expires,
            vipa=self.vipa,
        )
        if self.challenge is None:
            return request
        psk: bytes | None = None
        if self.digest is not None:
            assert self.password is not None
            cnonce = new_cnonce()
            request.headers.add(
                "Authorization",
                authorization_value(
                    self.digest,
                    username=self.terminal_id,
                    password=self.password,
                    method="REGISTER",
                    uri=str(request.uri),
                    cnonce=cnonce,
                ),
            )
            secret = ha1(self.terminal_id, self.digest.realm, self.password, self.digest.algorithm)
            psk = derive_key(secret, self.digest.nonce, cnonce, self.terminal_id)
        anchor_key = self.anchor_key
        assert anchor_key is not None
        self._initiator = Initiator(
            self.static, anchor_key, index=self.index, encryption=self.encryption, psk=psk
        )
        self._sent = Binding(self.terminal_id, d.call_id, d.cseq, self.expires, self.vipa)
        offer = self._initiator.offer(self.challenge.cookie, self._sent)
        request.headers.set(KX_HEADER, offer.encode())
        return request

    def on_challenge(self, response: Response) -> None:
        """Take a 401's challenges; `AnchorMismatch` or `MalformedError` if unusable."""
        challenge = kx_challenge_untrusted(response)
        if self.pinned is not None and challenge.anchor_key != self.pinned:
            raise AnchorMismatch(
                f"the anchor's key {encode_key(challenge.anchor_key)} is not the pinned "
                f"key {encode_key(self.pinned)}"
            )
        if challenge.encryption != self.encryption:
            theirs = "on" if challenge.encryption else "off"
            raise AnchorMismatch(
                f"the anchor runs with tunnel encryption {theirs}: "
                f"start this client with --encryption {theirs}, or change the anchor"
            )
        values = response.headers.getlist("WWW-Authenticate")
        wants_digest = any(
            v.lstrip(" \t")[: len(DIGEST_SCHEME)].lower() == DIGEST_SCHEME.lower() for v in values
        )
        if wants_digest:
            if self.password is None:
                raise AnchorMismatch("the anchor requires authentication: give --password-file")
            self.digest = choose_challenge(values)
        self.challenge = challenge

    def on_ok(self, response: Response) -> tuple[str, int, SessionKeys | None]:
        """VIPA, granted expires and the session keys (None for an unregistration)."""
        vipa, expires = parse_register_ok_untrusted(response)
        if expires == 0:
            # Unauthenticated: only the answer to an unregistration may say so.
            if self.expires != 0:
                raise MalformedError("200 with Expires 0 to a registration")
            return vipa, 0, None
        if self._initiator is None or self._sent is None:
            raise MalformedError("200 to a REGISTER without a key exchange")
        values = response.headers.getlist(KX_HEADER)
        if len(values) != 1:
            raise MalformedError(f"200 without one {KX_HEADER}")
        acceptance = Acceptance.parse_untrusted(values[0])
        checked("CSeq", lambda: response.cseq)
        keys = self._initiator.finish(acceptance, vipa, expires)
        return vipa, expires, keys
