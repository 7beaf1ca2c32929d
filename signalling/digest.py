"""SIP digest authentication of REGISTER (RFC 3261 §22, RFC 7616, RFC 8760), without I/O.

The anchor answers an unauthenticated REGISTER with `401` and one
`WWW-Authenticate` value per algorithm in `ALGORITHMS` (`challenge_values`),
and checks the `Authorization` of the next REGISTER with `verify`, which never
raises. The terminal picks a challenge with `choose_challenge` and answers it
with `authorization_value`. Only qop `auth` is spoken: REGISTER carries no
body for `auth-int` to protect.

Nonces cost the anchor no state to issue: each one carries its issue time and
a MAC under a per-process secret (`NonceStore`). State is kept only for nonces
that were used, to refuse a replayed nonce count, and it is bounded.

The header values are parsed here with a linear tokenizer rather than
`sipmessage.AuthCredentials.parse`: that parser's regular expression backtracks
exponentially (a 110-character `Digest a="",a="",…,` takes a second, each
extra parameter doubles it) and splits quoted strings at commas, so it must not
see network input. `sipmessage` still formats the challenges.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import hashlib
import hmac
import re
import secrets
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from sipmessage import AuthChallenge, AuthParameters
from sipmessage.address import quote

from ground.errors import MalformedError

__all__ = [
    "ALGORITHMS",
    "DEFAULT_NONCE_CAPACITY",
    "DEFAULT_NONCE_LIFETIME",
    "DIGEST_SCHEME",
    "MAX_HEADER_VALUE",
    "QOP_AUTH",
    "DigestResult",
    "NonceCheck",
    "NonceStore",
    "Outcome",
    "ParsedChallenge",
    "authorization_value",
    "challenge_values",
    "choose_challenge",
    "digest_response",
    "ha1",
    "is_valid_realm",
    "new_cnonce",
    "parse_auth_untrusted",
    "verify",
]

# RFC 7616 §3.7 and RFC 8760 §2.4: the server sends one challenge per
# algorithm, most preferred first. SHA-512-256 is left out: hashlib has it only
# where OpenSSL provides it, and no UPMT peer needs it.
ALGORITHMS: Final = ("SHA-256", "MD5")
_HASHES: Final = {"SHA-256": "sha256", "MD5": "md5"}  # hashlib names
# RFC 7616 §3.3: a challenge or credentials without `algorithm` mean MD5.
_IMPLICIT_ALGORITHM: Final = "MD5"
# RFC 7616 §3.3 / RFC 3261 §22.4: the only quality of protection offered.
QOP_AUTH: Final = "auth"
DIGEST_SCHEME: Final = "Digest"  # RFC 3261 §25.1, compared case-insensitively

DEFAULT_NONCE_LIFETIME: Final = 300.0  # seconds a nonce is accepted after issue
DEFAULT_NONCE_CAPACITY: Final = 10_000  # used nonces remembered for nc checks

# A header value longer than this is refused unparsed; real credentials are
# around 300 characters, and the SIP message itself is capped at 8 KiB.
MAX_HEADER_VALUE: Final = 2048
# Bounds on the client-chosen strings, which are hashed and kept in results.
_MAX_FIELD: Final = 256

# Nonce layout: issue time (IEEE double, big-endian), random bytes so that two
# nonces issued at the same instant differ, and a truncated HMAC-SHA256 of both.
_TIME: Final = struct.Struct(">d")
_NONCE_RANDOM: Final = 12
_NONCE_MAC: Final = 16
_NONCE_BYTES: Final = _TIME.size + _NONCE_RANDOM + _NONCE_MAC
# Unpadded URL-safe base64 of _NONCE_BYTES (36 bytes: 48 characters).
_NONCE_RE: Final = re.compile(rf"[A-Za-z0-9_-]{{{_NONCE_BYTES * 4 // 3}}}")

# RFC 3261 §25.1: token; quoted-string with quoted-pair; LWS is reduced to
# spaces and tabs because the message parser has already unfolded lines.
# Every alternative is anchored on a distinct first character, so a match
# never backtracks more than one step.
_TOKEN: Final = r"[A-Za-z0-9\-.!%*_+`'~]+"
_SCHEME_RE: Final = re.compile(rf"[ \t]*({_TOKEN})[ \t]+")
_AUTH_PARAM_RE: Final = re.compile(
    rf"({_TOKEN})[ \t]*=[ \t]*"
    rf'(?:({_TOKEN})|"((?:[^"\\\x00-\x08\x0a-\x1f\x7f]|\\[^\x00-\x08\x0a-\x1f\x7f])*)")'
    r"[ \t]*(?:,[ \t]*|$)"
)
_QUOTED_PAIR_RE: Final = re.compile(r"\\(.)")
_NC_RE: Final = re.compile(r"[0-9A-Fa-f]{8}")  # RFC 7616 §3.4: 8LHEX (upper case tolerated)
_HEX_RE: Final = re.compile(r"[0-9a-f]+")
# What goes into our own challenges: printable ASCII that needs no escaping
# and holds no comma (which naive auth-param parsers split on).
_REALM_RE: Final = re.compile(r"[A-Za-z0-9._@:+/-]{1,128}")
# Client-chosen strings are hashed as sent; control characters have no business there.
_TEXT_RE: Final = re.compile(rf"[^\x00-\x1f\x7f]{{1,{_MAX_FIELD}}}")


def is_valid_realm(realm: str) -> bool:
    """Whether `realm` may be offered: 1..128 of `A-Z a-z 0-9 . _ @ : + / -`."""
    return _REALM_RE.fullmatch(realm) is not None


def _hash(algorithm: str, text: str) -> str:
    return hashlib.new(_HASHES[algorithm], text.encode("utf-8")).hexdigest()


def ha1(username: str, realm: str, password: str, algorithm: str) -> str:
    """RFC 7616 §3.4.2: H(username ":" realm ":" password), in lowercase hex."""
    if algorithm not in _HASHES:
        raise ValueError(f"unsupported digest algorithm {algorithm!r}")
    return _hash(algorithm, f"{username}:{realm}:{password}")


def digest_response(
    ha1_hex: str,
    *,
    algorithm: str,
    nonce: str,
    nc: str,
    cnonce: str,
    qop: str,
    method: str,
    uri: str,
) -> str:
    """RFC 7616 §3.4.1: KD(HA1, nonce:nc:cnonce:qop:H(method:uri)), lowercase hex."""
    ha2 = _hash(algorithm, f"{method}:{uri}")
    return _hash(algorithm, f"{ha1_hex}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")


def new_cnonce() -> str:
    """A fresh client nonce: 128 random bits (RFC 7616 §3.4 asks for unpredictability)."""
    return secrets.token_urlsafe(16)


def _canonical_algorithm(value: str | None) -> str | None:
    """The `ALGORITHMS` spelling of `value` (tokens compare case-insensitively), or None."""
    if value is None:
        return _IMPLICIT_ALGORITHM
    for name in ALGORITHMS:
        if value.upper() == name:
            return name
    return None


def parse_auth_untrusted(value: str) -> tuple[str, dict[str, str]]:
    """(scheme, {lowercased name: unquoted value}) of a challenge or credentials value.

    RFC 3261 §25.1: `scheme LWS auth-param *(COMMA auth-param)`. Names are
    case-insensitive (RFC 7616 §3.3); a repeated name is malformed rather than
    resolved one way here and maybe another way elsewhere.
    """
    if len(value) > MAX_HEADER_VALUE:
        raise MalformedError("authentication header too long")
    scheme_match = _SCHEME_RE.match(value)
    if scheme_match is None:
        raise MalformedError("no authentication scheme")
    params: dict[str, str] = {}
    pos = scheme_match.end()
    end = len(value.rstrip(" \t"))
    while pos < end:
        match = _AUTH_PARAM_RE.match(value, pos, end)
        if match is None:
            raise MalformedError("bad authentication parameter")
        name = match.group(1).lower()
        if name in params:
            raise MalformedError(f"repeated authentication parameter {name[:20]}")
        token, quoted = match.group(2), match.group(3)
        params[name] = token if token is not None else _QUOTED_PAIR_RE.sub(r"\1", quoted)
        pos = match.end()
    if not params:
        raise MalformedError("no authentication parameters")
    return scheme_match.group(1), params


def _format_param(name: str, value: str, *, quoted: bool) -> str:
    return f"{name}={quote(value) if quoted else value}"


# --- nonces -----------------------------------------------------------------


class NonceCheck(enum.Enum):
    OK = enum.auto()
    STALE = enum.auto()  # expired, or evicted from the nc memory: a fresh one will do
    FORGED = enum.auto()  # not issued by this process (or mangled)
    REPLAY = enum.auto()  # nonce count not above the highest already accepted


class NonceStore:
    """Issues nonces and remembers, for the ones in use, the highest nonce count.

    A nonce is `base64url(time ‖ random ‖ HMAC-SHA256(secret, time ‖ random)[:16])`:
    issuing it stores nothing, and a nonce that was never issued here is
    recognised without a lookup. The secret lives only in memory, so a restart
    makes the old nonces FORGED; `verify` turns that into a stale challenge
    when the credentials are right, and clients simply retry.

    Replay protection (RFC 7616 §3.4: the nonce count must grow) needs memory
    per used nonce: at most `capacity` entries, the oldest evicted first.
    An evicted nonce cannot be told from an unused one by its entry, so the
    store keeps the issue time of the newest evicted nonce as a floor and calls
    every unremembered nonce issued no later than that STALE — never OK, which
    would let an old nonce count start again from 1. UPMT clients keep one
    REGISTER transaction at a time, so requiring a strictly greater nc never
    refuses a legitimate request; the transaction layer absorbs retransmissions
    before they reach here.
    """

    def __init__(
        self,
        *,
        lifetime: float = DEFAULT_NONCE_LIFETIME,
        capacity: int = DEFAULT_NONCE_CAPACITY,
        secret: bytes | None = None,
    ) -> None:
        if lifetime <= 0 or capacity < 1:
            raise ValueError("nonce lifetime and capacity must be positive")
        self.lifetime: Final = lifetime
        self.capacity: Final = capacity
        self._secret: Final = secret if secret is not None else secrets.token_bytes(32)
        # nonce -> (issue time, highest nc accepted); insertion order = age of first use.
        self._used: dict[str, tuple[float, int]] = {}
        self._evicted_floor = float("-inf")

    def __len__(self) -> int:
        return len(self._used)

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, payload, hashlib.sha256).digest()[:_NONCE_MAC]

    def issue(self, now: float) -> str:
        """A fresh nonce, valid for `lifetime` seconds from `now`."""
        payload = _TIME.pack(now) + secrets.token_bytes(_NONCE_RANDOM)
        raw = payload + self._mac(payload)
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    def _issued_at(self, nonce: str) -> float | None:
        """The issue time sealed in `nonce`, or None if this process did not issue it."""
        if not _NONCE_RE.fullmatch(nonce):
            return None
        raw = base64.urlsafe_b64decode(nonce)
        payload, mac = raw[:-_NONCE_MAC], raw[-_NONCE_MAC:]
        if not hmac.compare_digest(mac, self._mac(payload)):
            return None
        issued: float = _TIME.unpack_from(payload)[0]
        return issued

    def validate(self, nonce: str, now: float) -> NonceCheck:
        """OK, STALE or FORGED, from the nonce alone; remembers nothing."""
        issued = self._issued_at(nonce)
        if issued is None:
            return NonceCheck.FORGED
        # A nonce from the future means the clock went back: ask for a new one.
        if not 0 <= now - issued <= self.lifetime:
            return NonceCheck.STALE
        return NonceCheck.OK

    def check(self, nonce: str, nc: int, now: float) -> NonceCheck:
        """Validate `nonce` and, if OK, accept `nc` as its new highest count.

        Call it only for credentials that were otherwise verified: every OK
        may take an entry.
        """
        state = self.validate(nonce, now)
        if state is not NonceCheck.OK:
            return state
        entry = self._used.get(nonce)
        if entry is None:
            issued = self._issued_at(nonce)
            assert issued is not None  # validate() said OK
            if issued <= self._evicted_floor:
                return NonceCheck.STALE
            if nc < 1:
                return NonceCheck.REPLAY  # counts start at 1 (RFC 7616 §3.4)
            self._make_room(now)
            self._used[nonce] = (issued, nc)
            return NonceCheck.OK
        issued, highest = entry
        if nc <= highest:
            return NonceCheck.REPLAY
        self._used[nonce] = (issued, nc)
        return NonceCheck.OK

    def _make_room(self, now: float) -> None:
        # Expired entries need no memory: validate() refuses their nonces by
        # time alone. First-use order roughly follows issue order, so looking
        # at the front only is enough to keep the dict small in steady state.
        while self._used:
            oldest = next(iter(self._used))
            if now - self._used[oldest][0] <= self.lifetime:
                break
            del self._used[oldest]
        while len(self._used) >= self.capacity:
            oldest = next(iter(self._used))
            issued, _ = self._used.pop(oldest)
            self._evicted_floor = max(self._evicted_floor, issued)


# --- anchor side --------------------------------------------------------------


class Outcome(enum.Enum):
    """What `verify` found, and how the registrar answers it.

    OK: go on with the REGISTER. STALE: `401` with `challenge_values(...,
    stale=True)` — the password was right, only the nonce is too old, unknown
    to this process or forgotten, so the client retries without asking its
    user (RFC 7616 §3.3 `stale`). REPLAY: right credentials with a nonce count
    already used — a captured request played again, or a confused client;
    answered like STALE (which tells a replayer nothing it did not send) and
    worth counting apart. WRONG_CREDENTIALS: unknown user, other realm or bad
    response, deliberately not told apart; `401` with a fresh challenge.
    MALFORMED: `400`.
    """

    OK = enum.auto()
    STALE = enum.auto()
    REPLAY = enum.auto()
    WRONG_CREDENTIALS = enum.auto()
    MALFORMED = enum.auto()


@dataclass(frozen=True, slots=True)
class DigestResult:
    """The outcome of `verify`, with what the association key is derived from.

    The strings are empty when the credentials did not parse that far.
    `reason` is for the log, never for the peer.
    """

    outcome: Outcome
    username: str = ""
    algorithm: str = ""
    nonce: str = ""
    cnonce: str = ""
    reason: str = ""


def challenge_values(
    realm: str, nonces: NonceStore, now: float, *, stale: bool = False
) -> list[str]:
    """The `WWW-Authenticate` values of a 401, one per algorithm, SHA-256 first.

    One nonce serves all of them (as in the RFC 7616 §3.9.1 example), so its
    nonce count is tracked once whichever algorithm the client picks.
    """
    if not is_valid_realm(realm):
        raise ValueError(f"bad realm {realm!r}")
    nonce = nonces.issue(now)
    values = []
    for algorithm in ALGORITHMS:
        params = AuthParameters(realm=realm, qop=QOP_AUTH, nonce=nonce, algorithm=algorithm)
        if stale:
            params = params.replace(stale="true")
        values.append(str(AuthChallenge(scheme=DIGEST_SCHEME, parameters=params)))
    return values


# A stand-in for an unknown user's HA1, so that the answer to an unknown user
# takes as long as the answer to a wrong password.
_DUMMY_HA1: Final = {name: "0" * len(_hash(name, "")) for name in ALGORITHMS}


def verify(
    credentials_header_value: str,
    *,
    method: str,
    realm: str,
    ha1_of: Callable[[str, str], str | None],
    nonces: NonceStore,
    now: float,
    request_uri: str | None = None,
) -> DigestResult:
    """Check an `Authorization` value against the users known through `ha1_of`.

    `ha1_of(username, algorithm)` gives the stored HA1 or None. With
    `request_uri` (the Request-URI as a string) the credentials' `uri` must
    equal it (RFC 3261 §22.4 item 3); a mismatch is MALFORMED. Never raises,
    whatever the value holds (unless `ha1_of` does).
    """
    try:
        scheme, params = parse_auth_untrusted(credentials_header_value)
    except MalformedError as exc:
        return DigestResult(Outcome.MALFORMED, reason=str(exc))
    if scheme.lower() != DIGEST_SCHEME.lower():
        return DigestResult(Outcome.MALFORMED, reason="not a Digest scheme")
    for name in ("username", "realm", "nonce", "uri", "response", "qop", "nc", "cnonce"):
        if name not in params:
            return DigestResult(Outcome.MALFORMED, reason=f"no {name}")
    for name in ("username", "realm", "nonce", "uri", "cnonce"):
        if not _TEXT_RE.fullmatch(params[name]):
            return DigestResult(Outcome.MALFORMED, reason=f"bad {name}")
    algorithm = _canonical_algorithm(params.get("algorithm"))
    if algorithm is None:
        return DigestResult(Outcome.MALFORMED, reason="algorithm not offered")
    if params["qop"].lower() != QOP_AUTH:
        return DigestResult(Outcome.MALFORMED, reason="qop not auth")
    nc_text = params["nc"]
    if not _NC_RE.fullmatch(nc_text):
        return DigestResult(Outcome.MALFORMED, reason="bad nc")
    response = params["response"].lower()
    if len(response) != len(_DUMMY_HA1[algorithm]) or not _HEX_RE.fullmatch(response):
        return DigestResult(Outcome.MALFORMED, reason="bad response")
    uri = params["uri"]
    if request_uri is not None and uri != request_uri:
        return DigestResult(Outcome.MALFORMED, reason="uri differs from the Request-URI")

    username, nonce, cnonce = params["username"], params["nonce"], params["cnonce"]
    result = DigestResult(
        Outcome.WRONG_CREDENTIALS,
        username=username,
        algorithm=algorithm,
        nonce=nonce,
        cnonce=cnonce,
    )

    stored = ha1_of(username, algorithm) if params["realm"] == realm else None
    expected = digest_response(
        stored if stored is not None else _DUMMY_HA1[algorithm],
        algorithm=algorithm,
        nonce=nonce,
        nc=nc_text,
        cnonce=cnonce,
        qop=params["qop"],
        method=method,
        uri=uri,
    )
    # compare_digest on ASCII strings: the time does not depend on where they differ.
    matches = hmac.compare_digest(expected, response)
    if stored is None or not matches:
        why = "other realm" if params["realm"] != realm else "unknown user or bad response"
        return _with(result, Outcome.WRONG_CREDENTIALS, why)

    # Only now, with the password proven, may the nonce state change.
    state = nonces.check(nonce, int(nc_text, 16), now)
    if state is NonceCheck.OK:
        return _with(result, Outcome.OK, "")
    if state is NonceCheck.REPLAY:
        return _with(result, Outcome.REPLAY, f"nonce count {nc_text} already used")
    why = "nonce not issued here" if state is NonceCheck.FORGED else "nonce expired"
    return _with(result, Outcome.STALE, why)


def _with(result: DigestResult, outcome: Outcome, reason: str) -> DigestResult:
    return dataclasses.replace(result, outcome=outcome, reason=reason)


# --- terminal side -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ParsedChallenge:
    """One usable `WWW-Authenticate` challenge, as `authorization_value` needs it."""

    realm: str
    nonce: str
    algorithm: str
    stale: bool = False
    opaque: str | None = None


def _usable_challenges(values: list[str]) -> Iterator[ParsedChallenge]:
    for value in values:
        try:
            scheme, params = parse_auth_untrusted(value)
        except MalformedError:
            continue
        if scheme.lower() != DIGEST_SCHEME.lower():
            continue
        algorithm = _canonical_algorithm(params.get("algorithm"))
        # RFC 7616 §3.3: qop is a quoted, comma-separated list of options.
        qops = {q.strip(" \t").lower() for q in params.get("qop", "").split(",")}
        realm, nonce, opaque = params.get("realm"), params.get("nonce"), params.get("opaque")
        if algorithm is None or QOP_AUTH not in qops or realm is None or nonce is None:
            continue
        if not (_TEXT_RE.fullmatch(realm) and _TEXT_RE.fullmatch(nonce)):
            continue
        if opaque is not None and not _TEXT_RE.fullmatch(opaque):
            continue
        stale = params.get("stale", "false").lower() == "true"
        yield ParsedChallenge(realm, nonce, algorithm, stale=stale, opaque=opaque)


def choose_challenge(values: list[str]) -> ParsedChallenge:
    """The challenge to answer among a 401's `WWW-Authenticate` values.

    The most preferred algorithm of `ALGORITHMS` wins whatever the order of the
    values (RFC 7616 §3.7). Raises `MalformedError` when none is a Digest
    challenge with qop `auth` and a supported algorithm.
    """
    usable = list(_usable_challenges(values))
    if not usable:
        raise MalformedError("no usable digest challenge")
    return min(usable, key=lambda c: ALGORITHMS.index(c.algorithm))


def authorization_value(
    challenge: ParsedChallenge,
    *,
    username: str,
    password: str,
    method: str,
    uri: str,
    cnonce: str,
    nc: int = 1,
) -> str:
    """The `Authorization` value answering `challenge` (RFC 7616 §3.4, RFC 3261 §22.4).

    `uri` is the Request-URI as sent. Formatted here, not by `sipmessage`,
    because the credentials grammar (RFC 3261 §25.1) wants `qop` and `nc`
    unquoted and `uri` always quoted.
    """
    if not 1 <= nc <= 0xFFFFFFFF:
        raise ValueError(f"nonce count {nc} out of range")
    nc_text = f"{nc:08x}"
    response = digest_response(
        ha1(username, challenge.realm, password, challenge.algorithm),
        algorithm=challenge.algorithm,
        nonce=challenge.nonce,
        nc=nc_text,
        cnonce=cnonce,
        qop=QOP_AUTH,
        method=method,
        uri=uri,
    )
    params = [
        _format_param("username", username, quoted=True),
        _format_param("realm", challenge.realm, quoted=True),
        _format_param("uri", uri, quoted=True),
        _format_param("algorithm", challenge.algorithm, quoted=False),
        _format_param("nonce", challenge.nonce, quoted=True),
        _format_param("nc", nc_text, quoted=False),
        _format_param("cnonce", cnonce, quoted=True),
        _format_param("qop", QOP_AUTH, quoted=False),
        _format_param("response", response, quoted=True),
    ]
    if challenge.opaque is not None:
        params.append(_format_param("opaque", challenge.opaque, quoted=True))
    return f"{DIGEST_SCHEME} " + ", ".join(params)
