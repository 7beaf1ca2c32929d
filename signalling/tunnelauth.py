"""Authentication of the SIP MESSAGEs a terminal sends inside its tunnels.

Threat model. The AN identifies a tunnel by the source address it observes
(docs/architecture.md, "Wire format") and acts on the TunnelSetupRequest and
HandoverRequest MESSAGEs that arrive in it ("Signalling"). Without protection,
any host that can send a UDP datagram to the AN could attach a tunnel of its
own to another terminal's association, or move that terminal's flows onto it,
by forging such a MESSAGE.
Each in-tunnel request therefore carries an HMAC-SHA256 under a key only the
terminal and the AN know, established with the association: the signing
key of the key exchange in REGISTER (`signalling.handshake`,
`SessionKeys.signing`), derived from the ephemeral and static X25519 keys
and, with digest authentication, from a key both ends derive from HA1, the
digest nonce and cnonce and the terminal id (`derive_key`); no key travels.
See docs/security.md.

A timestamp bounds how long a captured request stays usable, and a per-
association sequence number, remembered by the AN in a sliding window, stops
it being replayed within that time. Out of scope: an on-path attacker who
races a captured request from its own address before the original arrives.
The MAC cannot cover the tunnel's source address, which NATs rewrite; the
source address only says where the answer goes.

Header, RFC 3261 §25.1 syntax for its value:

    UPMT-Auth: ts=<unix seconds>;seq=<1..2**64-1>;mac=<64 lowercase hex digits>

The MAC input is a version label followed by eleven fields, each as a 4-byte
big-endian length and then its bytes (UTF-8 for text):

    b"upmt-tunnel-auth-v1\\0"
    method | Request-URI | Call-ID | CSeq number (decimal) | CSeq method |
    From | To | Content-Type | body | ts (decimal) | seq (decimal)

Length prefixes keep field boundaries unambiguous, so no bytes can move from
one field to the next. An absent Content-Type is written as the length
0xFFFFFFFF with no bytes, distinct from an empty one. Request-URI, From, To and
CSeq are taken in sipmessage's parsed form (what the AN acts on), Call-ID and
Content-Type as the header text; so compact header names, the case of names
and whitespace around values do not matter, and the MAC survives `serialize`
and `parse_message_untrusted`. Via is not covered: the AN answers to the
observed source address anyway (rport, RFC 3581).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import struct
from typing import Final

from sipmessage import Request

from ground.errors import MalformedError
from signalling.message import checked

__all__ = [
    "AUTH_HEADER",
    "KEY_HEADER",
    "KEY_SIZE",
    "MAX_SEQ",
    "TunnelAuthVerifier",
    "decode_key_untrusted",
    "derive_key",
    "encode_key",
    "random_key",
    "sign",
]

AUTH_HEADER: Final = "UPMT-Auth"
KEY_HEADER: Final = "UPMT-Key"

# HMAC-SHA256 gains nothing from a longer key, and a shorter one would be the
# weakest link.
KEY_SIZE: Final = 32
MAX_SEQ: Final = 2**64 - 1

_MAC_LABEL: Final = b"upmt-tunnel-auth-v1\0"
_KEY_LABEL: Final = b"upmt-tunnel-key\0"
_ABSENT: Final = struct.pack("!I", 0xFFFFFFFF)

# Digits are bounded so that int() never sees a huge string; 20 digits hold
# any u64. Lowercase hex only: one spelling per MAC.
_AUTH_RE: Final = re.compile(r"ts=([0-9]{1,20});seq=([0-9]{1,20});mac=([0-9a-f]{64})", re.ASCII)
_HEX_RE: Final = re.compile(r"(?:[0-9a-fA-F]{2})+", re.ASCII)
# base64url of KEY_SIZE bytes without padding is 43 characters.
_KEY_TEXT_RE: Final = re.compile(r"[A-Za-z0-9_-]{43}", re.ASCII)


def derive_key(ha1: str, nonce: str, cnonce: str, terminal_id: str) -> bytes:
    """The tunnel key of a digest-authenticated association.

    HMAC-SHA256 keyed with HA1 (its bytes when it is hex, as RFC 7616 writes
    it, else its UTF-8) over `"upmt-tunnel-key\\0" nonce "\\0" cnonce "\\0"
    terminal_id`. A fresh nonce or cnonce at every REGISTER gives a fresh key,
    and HA1 is not usable as a key for anything else. NUL in an input would
    make the separators ambiguous, so it raises `ValueError` (SIP header values
    cannot carry NUL, so this is a local bug).
    """
    for name, value in (("nonce", nonce), ("cnonce", cnonce), ("terminal_id", terminal_id)):
        if "\0" in value:
            raise ValueError(f"NUL in {name}")
    secret = bytes.fromhex(ha1) if _HEX_RE.fullmatch(ha1) else ha1.encode("utf-8")
    info = _KEY_LABEL + b"\0".join(s.encode("utf-8") for s in (nonce, cnonce, terminal_id))
    return hmac.new(secret, info, hashlib.sha256).digest()


def random_key() -> bytes:
    """A fresh key for an association registered without user authentication."""
    return secrets.token_bytes(KEY_SIZE)


def encode_key(key: bytes) -> str:
    """`key` as the value of `KEY_HEADER`: base64url without padding (RFC 4648 §5)."""
    _check_key(key)
    return base64.urlsafe_b64encode(key).rstrip(b"=").decode("ascii")


def decode_key_untrusted(text: str) -> bytes:
    """The key in a `KEY_HEADER` value; `MalformedError` unless it is a canonical encoding."""
    if not _KEY_TEXT_RE.fullmatch(text):
        raise MalformedError(f"{KEY_HEADER} is not {KEY_SIZE} bytes of base64url")
    try:
        key = base64.urlsafe_b64decode(text + "=")
    except binascii.Error as exc:
        raise MalformedError(f"{KEY_HEADER} is not base64url") from exc
    # The last character carries 2 unused bits; refusing non-zero ones keeps
    # one spelling per key.
    if encode_key(key) != text:
        raise MalformedError(f"{KEY_HEADER} is not canonical base64url")
    return key


def sign(request: Request, key: bytes, *, now: float, seq: int) -> None:
    """Set `AUTH_HEADER` on `request`, replacing any previous one.

    Sign last: any later change to a covered field invalidates the MAC. `seq`
    comes from the association's counter (1, 2, …); reusing one gets the
    request refused as a replay.
    """
    _check_key(key)
    if not 1 <= seq <= MAX_SEQ:
        raise ValueError(f"seq {seq} out of 1..{MAX_SEQ}")
    ts = int(now)
    if ts < 0:
        raise ValueError("time before the epoch")
    mac = _mac(key, request, ts, seq)
    request.headers.set(AUTH_HEADER, f"ts={ts};seq={seq};mac={mac.hex()}")


class TunnelAuthVerifier:
    """The AN's check of the in-tunnel requests of one terminal association.

    Replay state is the highest accepted seq and a bitmap of which of the
    `max_seen` seqs up to it were accepted (the anti-replay window of RFC 4303
    §3.4.3): memory stays bounded, requests reordered by the network within the
    window are accepted once each, and anything older is refused, since it can
    no longer be told apart from a replay.
    """

    def __init__(self, key: bytes, *, window: float = 120.0, max_seen: int = 1024) -> None:
        _check_key(key)
        if window <= 0:
            raise ValueError("window must be positive")
        if max_seen < 1:
            raise ValueError("max_seen must be at least 1")
        self._key = key
        self._window = window
        self._max_seen = max_seen
        self._mask = (1 << max_seen) - 1
        self._highest = 0
        # Bit i set: seq `_highest - i` was accepted.
        self._seen = 0

    @property
    def used(self) -> bool:
        """Whether a request ever verified under this key."""
        return self._highest > 0

    def verify(self, request: Request, now: float) -> None:
        """Accept `request` or raise `MalformedError` with the reason.

        State changes only once the MAC is good, so forged requests cannot move
        the replay window.
        """
        values = request.headers.getlist(AUTH_HEADER)
        if not values:
            raise MalformedError(f"no {AUTH_HEADER}")
        if len(values) > 1:
            raise MalformedError(f"more than one {AUTH_HEADER}")
        match = _AUTH_RE.fullmatch(values[0].strip(" \t"))
        if match is None:
            raise MalformedError(f"bad {AUTH_HEADER}")
        ts, seq = int(match.group(1)), int(match.group(2))
        if not 1 <= seq <= MAX_SEQ:
            raise MalformedError(f"{AUTH_HEADER} seq out of range")
        # A bounded clock skew is tolerated in both directions; beyond it the
        # request is stale (or forged for later use) whatever its MAC.
        if abs(now - ts) > self._window:
            raise MalformedError(f"{AUTH_HEADER} timestamp outside the window")
        expected = _mac(self._key, request, ts, seq)
        if not hmac.compare_digest(expected, bytes.fromhex(match.group(3))):
            raise MalformedError(f"{AUTH_HEADER} MAC mismatch")
        self._accept(seq)

    def _accept(self, seq: int) -> None:
        if seq > self._highest:
            shift = seq - self._highest
            self._seen = ((self._seen << shift) | 1) & self._mask if shift < self._max_seen else 1
            self._highest = seq
            return
        age = self._highest - seq
        if age >= self._max_seen:
            raise MalformedError(f"{AUTH_HEADER} seq below the replay window")
        bit = 1 << age
        if self._seen & bit:
            raise MalformedError(f"{AUTH_HEADER} seq replayed")
        self._seen |= bit


def _check_key(key: bytes) -> None:
    if len(key) != KEY_SIZE:
        raise ValueError(f"a tunnel key is {KEY_SIZE} bytes, not {len(key)}")


def _mac(key: bytes, request: Request, ts: int, seq: int) -> bytes:
    """HMAC-SHA256 of the byte layout in the module docstring."""
    cseq = checked("CSeq", lambda: request.cseq)
    from_ = checked("From", lambda: str(request.from_address))
    to = checked("To", lambda: str(request.to_address))
    uri = checked("Request-URI", lambda: str(request.uri))
    call_id = _single(request, "Call-ID")
    if call_id is None:
        raise MalformedError("no Call-ID")
    content_type = _single(request, "Content-Type")
    mac = hmac.new(key, _MAC_LABEL, hashlib.sha256)
    for text in (request.method, uri, call_id, str(cseq.sequence), cseq.method, from_, to):
        mac.update(_field(_utf8(text)))
    mac.update(_ABSENT if content_type is None else _field(_utf8(content_type)))
    mac.update(_field(bytes(request.body)))
    mac.update(_field(str(ts).encode("ascii")))
    mac.update(_field(str(seq).encode("ascii")))
    return mac.digest()


def _single(request: Request, name: str) -> str | None:
    # A second copy would leave open which one the MAC and the AN each read.
    values = request.headers.getlist(name)
    if len(values) > 1:
        raise MalformedError(f"more than one {name}")
    return values[0].strip(" \t") if values else None


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates
        raise MalformedError("header is not encodable as UTF-8") from exc


def _field(data: bytes) -> bytes:
    if len(data) >= 0xFFFFFFFF:
        raise MalformedError("field too long")
    return struct.pack("!I", len(data)) + data
