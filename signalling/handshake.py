"""The association key exchange: X25519 keys, HKDF, carried in REGISTER (sans-IO).

Theory of operation. A terminal and the anchor each hold a static X25519 key
pair; the terminal knows the anchor's public key (pinned, or trusted on
first use) and each side makes a fresh ephemeral pair per association. The
exchange rides on the REGISTER round trips that association needs anyway:

1. ``REGISTER`` without a cookie. The anchor answers statelessly: ``401``
   with ``WWW-Authenticate: UPMT-KX cookie=…, key=…, encryption=…`` (a
   cookie bound to the source address, its static public key, whether its
   tunnels are encrypted) and, with a users file, the digest challenges.
2. ``REGISTER`` with ``UPMT-KX: cookie=…;e=…;s=…;idx=…;enc=…;mac=…``: the
   terminal's ephemeral and static public keys, the base of its receiver
   indexes, its encryption setting and a proof. The proof key comes from
   ``DH(e_c, S_a) ‖ DH(s_c, S_a) ‖ psk`` (psk: the digest-derived secret
   with users, else zeros), so only the holder of ``s_c`` (and of the
   password) can make it and only the anchor can check it — before any lease
   or key is handed out. It covers the REGISTER's identity fields (terminal
   id, Call-ID, CSeq, Expires, VIpAddr): ``Expires: 0`` needs it too.
3. ``200 OK`` with ``UPMT-KX: e=…;idx=…;mac=…``: the anchor's ephemeral key
   and receiver-index base, and a confirmation under the session keys, which
   come from HKDF over ``DH(e_c,S_a) ‖ DH(s_c,S_a) ‖ DH(e_c,E_a) ‖
   DH(s_c,E_a) ‖ psk`` salted with the transcript hash. A terminal that
   checks it knows it talks to the holder of ``s_a`` (and of the user's
   password hash): the anchor is authenticated.

That is Noise's IK pattern with a PSK (WireGuard's handshake), written as
one HKDF over the concatenated Diffie-Hellman outputs as X3DH does. The
ephemeral-ephemeral and static-ephemeral terms give forward secrecy: a
later theft of either static key does not reveal the session keys. No key
ever travels in clear. The session yields three 32-byte keys: terminal →
anchor and anchor → terminal (from which each tunnel slot derives its own
AEAD keys, `tunnel_keys`), and the HMAC key of in-tunnel MESSAGEs
(`signalling.tunnelauth`).

Every value is base64url without padding (RFC 4648 §5); decoders raise only
`MalformedError`. X25519 and HKDF come from `cryptography`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import struct
from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from ground.errors import MalformedError

__all__ = [
    "CHALLENGE_SCHEME",
    "KEY_SIZE",
    "KX_HEADER",
    "MAX_SLOTS",
    "Acceptance",
    "Binding",
    "Challenge",
    "Initiator",
    "Offer",
    "ProvenOffer",
    "SessionKeys",
    "StaticKey",
    "decode_key_untrusted",
    "encode_key",
    "prove_offer",
    "respond",
    "tunnel_keys",
]

KX_HEADER: Final = "UPMT-KX"
CHALLENGE_SCHEME: Final = "UPMT-KX"
KEY_SIZE: Final = 32
MAC_SIZE: Final = 16
COOKIE_SIZE: Final = 20
# Receiver indexes come in blocks of MAX_SLOTS, one per tunnel of a terminal;
# a block's base is a non-zero multiple of it.
MAX_SLOTS: Final = 64
_ZERO_PSK: Final = bytes(32)
_LABEL: Final = b"upmt-kx-v1\0"

_B64_LEN: Final = {16: 22, 20: 27, 32: 43}
_B64_RE: Final = re.compile(r"[A-Za-z0-9_-]{22,43}", re.ASCII)
_PARAM_RE: Final = re.compile(r"([a-z]{1,8})=([A-Za-z0-9_-]{1,43})", re.ASCII)


# --- encodings ------------------------------------------------------------------


def encode_key(raw: bytes) -> str:
    """`raw` (a key, MAC or cookie) as base64url without padding."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_key_untrusted(text: str, size: int = KEY_SIZE) -> bytes:
    """The `size` bytes `text` encodes; `MalformedError` unless it is their canonical spelling."""
    if len(text) != _B64_LEN.get(size, -1) or not _B64_RE.fullmatch(text):
        raise MalformedError(f"not {size} bytes of base64url")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error as exc:
        raise MalformedError("not base64url") from exc
    # Unused low bits of the last character must be zero: one spelling per value.
    if len(raw) != size or encode_key(raw) != text:
        raise MalformedError("not canonical base64url")
    return raw


def _params_untrusted(text: str, names: frozenset[str]) -> dict[str, str]:
    """`name=value;name=value` with exactly the given names, each once."""
    if len(text) > 512:
        raise MalformedError(f"{KX_HEADER} too long")
    params: dict[str, str] = {}
    for part in text.strip(" \t").split(";"):
        match = _PARAM_RE.fullmatch(part.strip(" \t"))
        if match is None:
            raise MalformedError(f"bad {KX_HEADER} parameter")
        name, value = match.groups()
        if name in params:
            raise MalformedError(f"repeated {KX_HEADER} parameter {name}")
        params[name] = value
    if set(params) != names:
        raise MalformedError(f"{KX_HEADER} needs {', '.join(sorted(names))}")
    return params


def _flag_untrusted(value: str) -> bool:
    if value not in ("on", "off"):
        raise MalformedError("encryption is neither on nor off")
    return value == "on"


def _index_untrusted(value: str) -> int:
    if not value.isdecimal() or len(value) > 10:
        raise MalformedError("bad receiver index")
    index = int(value)
    if index == 0 or index % MAX_SLOTS or index > 0xFFFF_FFFF - MAX_SLOTS + 1:
        raise MalformedError("receiver index base out of range")
    return index


# --- keys -------------------------------------------------------------------------


class StaticKey:
    """An X25519 key pair (a terminal's or the anchor's long-term key)."""

    __slots__ = ("_private", "public")

    def __init__(self, private: X25519PrivateKey) -> None:
        self._private = private
        self.public: Final = private.public_key().public_bytes_raw()

    @classmethod
    def generate(cls) -> StaticKey:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> StaticKey:
        if len(raw) != KEY_SIZE:
            raise ValueError(f"an X25519 private key is {KEY_SIZE} bytes")
        return cls(X25519PrivateKey.from_private_bytes(raw))

    def private_bytes(self) -> bytes:
        return self._private.private_bytes_raw()

    def dh(self, peer_public: bytes) -> bytes:
        """X25519 with `peer_public`; `MalformedError` for a low-order point (all-zero result)."""
        try:
            return self._private.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError as exc:
            raise MalformedError("unusable public key") from exc


# --- what travels -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Challenge:
    """The anchor's `WWW-Authenticate: UPMT-KX …` in its stateless 401."""

    cookie: bytes
    anchor_key: bytes
    encryption: bool

    def encode(self) -> str:
        flag = "on" if self.encryption else "off"
        return (
            f'{CHALLENGE_SCHEME} cookie="{encode_key(self.cookie)}", '
            f'key="{encode_key(self.anchor_key)}", encryption="{flag}"'
        )

    @classmethod
    def from_params_untrusted(cls, params: dict[str, str]) -> Challenge:
        """From the parsed auth-params of a `UPMT-KX` challenge."""
        if set(params) != {"cookie", "key", "encryption"}:
            raise MalformedError(f"{CHALLENGE_SCHEME} challenge needs cookie, key, encryption")
        return cls(
            decode_key_untrusted(params["cookie"], COOKIE_SIZE),
            decode_key_untrusted(params["key"]),
            _flag_untrusted(params["encryption"]),
        )


@dataclass(frozen=True, slots=True)
class Offer:
    """The terminal's `UPMT-KX` header in its second REGISTER."""

    cookie: bytes
    ephemeral: bytes
    static: bytes
    index: int
    encryption: bool
    mac: bytes

    def encode(self) -> str:
        return (
            f"cookie={encode_key(self.cookie)};e={encode_key(self.ephemeral)};"
            f"s={encode_key(self.static)};idx={self.index};"
            f"enc={'on' if self.encryption else 'off'};mac={encode_key(self.mac)}"
        )

    @classmethod
    def parse_untrusted(cls, text: str) -> Offer:
        p = _params_untrusted(text, frozenset({"cookie", "e", "s", "idx", "enc", "mac"}))
        return cls(
            decode_key_untrusted(p["cookie"], COOKIE_SIZE),
            decode_key_untrusted(p["e"]),
            decode_key_untrusted(p["s"]),
            _index_untrusted(p["idx"]),
            _flag_untrusted(p["enc"]),
            decode_key_untrusted(p["mac"], MAC_SIZE),
        )

    @staticmethod
    def cookie_of_untrusted(text: str) -> bytes | None:
        """Just the cookie of an offer (checked before anything else), or None if unusable."""
        try:
            return Offer.parse_untrusted(text).cookie
        except MalformedError:
            return None


@dataclass(frozen=True, slots=True)
class Acceptance:
    """The anchor's `UPMT-KX` header in its 200 OK."""

    ephemeral: bytes
    index: int
    mac: bytes

    def encode(self) -> str:
        return f"e={encode_key(self.ephemeral)};idx={self.index};mac={encode_key(self.mac)}"

    @classmethod
    def parse_untrusted(cls, text: str) -> Acceptance:
        p = _params_untrusted(text, frozenset({"e", "idx", "mac"}))
        return cls(
            decode_key_untrusted(p["e"]),
            _index_untrusted(p["idx"]),
            decode_key_untrusted(p["mac"], MAC_SIZE),
        )


@dataclass(frozen=True, slots=True)
class Binding:
    """The REGISTER fields the proof covers, so that none can be changed on the way."""

    terminal_id: str
    call_id: str
    cseq: int
    expires: int | None
    vipa: str | None


@dataclass(frozen=True, slots=True)
class SessionKeys:
    """What one association yields at both ends."""

    up: bytes  # terminal -> anchor: the root of every tunnel's upstream key
    down: bytes  # anchor -> terminal
    signing: bytes  # HMAC key of in-tunnel MESSAGEs (UPMT-Auth)
    terminal_index: int  # base of the terminal's receiver indexes
    anchor_index: int  # base of the anchor's receiver indexes


def tunnel_keys(keys: SessionKeys, slot: int) -> tuple[bytes, bytes]:
    """(upstream, downstream) AEAD keys of tunnel `slot` (0..MAX_SLOTS-1)."""
    if not 0 <= slot < MAX_SLOTS:
        raise ValueError(f"tunnel slot {slot} out of 0..{MAX_SLOTS - 1}")

    def expand(root: bytes, label: bytes) -> bytes:
        info = b"upmt-tunnel-v1\0" + label + bytes((slot,))
        return HKDFExpand(hashes.SHA256(), KEY_SIZE, info).derive(root)

    return expand(keys.up, b"up"), expand(keys.down, b"down")


# --- the computation ----------------------------------------------------------------


def _fields(*items: bytes) -> bytes:
    return b"".join(struct.pack("!I", len(item)) + item for item in items)


def _text(value: str | int | None) -> bytes:
    return b"" if value is None else str(value).encode("utf-8", "surrogateescape")


def _offer_transcript(
    anchor_key: bytes, offer_cookie: bytes, e: bytes, s: bytes, index: int, enc: bool, b: Binding
) -> bytes:
    return hashlib.sha256(
        _LABEL
        + _fields(
            anchor_key,
            offer_cookie,
            e,
            s,
            _text(index),
            b"on" if enc else b"off",
            _text(b.terminal_id),
            _text(b.call_id),
            _text(b.cseq),
            _text(b.expires),
            _text(b.vipa),
        )
    ).digest()


def _hkdf(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    return HKDF(hashes.SHA256(), length, salt, info).derive(ikm)


def _mac(key: bytes, transcript: bytes) -> bytes:
    return hmac.new(key, transcript, hashlib.sha256).digest()[:MAC_SIZE]


def _check_psk(psk: bytes | None) -> bytes:
    if psk is None:
        return _ZERO_PSK
    if len(psk) != 32:
        raise ValueError("a pre-shared key is 32 bytes")
    return psk


class Initiator:
    """The terminal's half: makes the offer, checks the acceptance, yields the keys."""

    def __init__(
        self,
        static: StaticKey,
        anchor_key: bytes,
        *,
        index: int,
        encryption: bool,
        psk: bytes | None = None,
        ephemeral: StaticKey | None = None,
    ) -> None:
        if len(anchor_key) != KEY_SIZE:
            raise ValueError("the anchor's public key is 32 bytes")
        _index_untrusted(str(index))  # a local bug otherwise: the same rule as the anchor's
        self._static = static
        # A fixed ephemeral key is for test vectors only.
        self._ephemeral = ephemeral if ephemeral is not None else StaticKey.generate()
        self.anchor_key = anchor_key
        self.index = index
        self.encryption = encryption
        self._psk = _check_psk(psk)
        self._transcript = b""
        self._dh_offer = b""

    def offer(self, cookie: bytes, binding: Binding) -> Offer:
        """The `UPMT-KX` header value of the REGISTER answering a challenge with `cookie`."""
        e, s = self._ephemeral.public, self._static.public
        self._transcript = _offer_transcript(
            self.anchor_key, cookie, e, s, self.index, self.encryption, binding
        )
        self._dh_offer = self._ephemeral.dh(self.anchor_key) + self._static.dh(self.anchor_key)
        proof = _hkdf(self._dh_offer + self._psk, self._transcript, b"offer", 32)
        return Offer(cookie, e, s, self.index, self.encryption, _mac(proof, self._transcript))

    def finish(self, acceptance: Acceptance, vipa: str, expires: int) -> SessionKeys:
        """The session keys, once the anchor's confirmation checks; `MalformedError` otherwise."""
        if not self._transcript:
            raise ValueError("finish() before offer()")
        dh = (
            self._dh_offer
            + self._ephemeral.dh(acceptance.ephemeral)
            + self._static.dh(acceptance.ephemeral)
        )
        return _session(dh, self._psk, self._transcript, acceptance, vipa, expires, self.index)


def _answer_transcript(
    offer_transcript: bytes, e: bytes, index: int, vipa: str, expires: int
) -> bytes:
    return hashlib.sha256(
        offer_transcript + _fields(e, _text(index), _text(vipa), _text(expires))
    ).digest()


def _session(
    dh: bytes,
    psk: bytes,
    offer_transcript: bytes,
    acceptance: Acceptance,
    vipa: str,
    expires: int,
    terminal_index: int,
) -> SessionKeys:
    transcript = _answer_transcript(
        offer_transcript, acceptance.ephemeral, acceptance.index, vipa, expires
    )
    okm = _hkdf(dh + psk, transcript, b"keys", 4 * 32)
    if not hmac.compare_digest(_mac(okm[96:], transcript), acceptance.mac):
        raise MalformedError(f"{KX_HEADER}: the anchor's confirmation does not check")
    return SessionKeys(okm[:32], okm[32:64], okm[64:96], terminal_index, acceptance.index)


@dataclass(frozen=True, slots=True)
class ProvenOffer:
    """An offer whose proof checked: the anchor may now spend state on it."""

    offer: Offer
    transcript: bytes
    dh_offer: bytes
    psk: bytes


def prove_offer(
    anchor: StaticKey, offer: Offer, binding: Binding, psk: bytes | None = None
) -> ProvenOffer:
    """The anchor's check of an offer; `MalformedError` if the proof fails."""
    psk = _check_psk(psk)
    transcript = _offer_transcript(
        anchor.public, offer.cookie, offer.ephemeral, offer.static, offer.index,
        offer.encryption, binding,
    )  # fmt: skip
    dh_offer = anchor.dh(offer.ephemeral) + anchor.dh(offer.static)
    proof = _hkdf(dh_offer + psk, transcript, b"offer", 32)
    if not hmac.compare_digest(_mac(proof, transcript), offer.mac):
        raise MalformedError(f"{KX_HEADER}: the proof does not check")
    return ProvenOffer(offer, transcript, dh_offer, psk)


def respond(
    proven: ProvenOffer,
    *,
    index: int,
    vipa: str,
    expires: int,
    ephemeral: StaticKey | None = None,
) -> tuple[Acceptance, SessionKeys]:
    """The anchor's answer to a proven offer: its `UPMT-KX` header and the session keys.

    `ephemeral` is for test vectors only: a fresh key pair per answer is the
    forward secrecy.
    """
    _index_untrusted(str(index))
    if ephemeral is None:
        ephemeral = StaticKey.generate()
    offer = proven.offer
    dh = proven.dh_offer + ephemeral.dh(offer.ephemeral) + ephemeral.dh(offer.static)
    transcript = _answer_transcript(proven.transcript, ephemeral.public, index, vipa, expires)
    okm = _hkdf(dh + proven.psk, transcript, b"keys", 4 * 32)
    acceptance = Acceptance(ephemeral.public, index, _mac(okm[96:], transcript))
    return acceptance, SessionKeys(okm[:32], okm[32:64], okm[64:96], offer.index, index)
