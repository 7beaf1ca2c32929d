"""Digest authentication of REGISTER: RFC 7616 vectors, round trips, nonce state, bad input."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sipmessage import AuthCredentials, Request

from ground.errors import MalformedError
from signalling.digest import (
    ALGORITHMS,
    MAX_HEADER_VALUE,
    DigestResult,
    NonceCheck,
    NonceStore,
    Outcome,
    ParsedChallenge,
    authorization_value,
    challenge_values,
    choose_challenge,
    digest_response,
    ha1,
    is_valid_realm,
    new_cnonce,
    verify,
)
from signalling.message import new_branch, new_call_id, new_tag, parse_message_untrusted, serialize
from signalling.register import build_register

# RFC 7616 §3.9.1.
RFC_USER = "Mufasa"
RFC_PASSWORD = "Circle of Life"
RFC_REALM = "http-auth@example.org"
RFC_NONCE = "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v"
RFC_CNONCE = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ"
RFC_OPAQUE = "FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"
RFC_URI = "/dir/index.html"
RFC_RESPONSES = {
    "MD5": "8ca523f5e9506fed4657c9700eebdbec",
    "SHA-256": "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1",
}
# The two WWW-Authenticate values of the example, MD5 first as in the RFC.
RFC_CHALLENGES = [
    f'Digest realm="{RFC_REALM}", qop="auth, auth-int", algorithm={algorithm},'
    f' nonce="{RFC_NONCE}", opaque="{RFC_OPAQUE}"'
    for algorithm in ("MD5", "SHA-256")
]

REALM = "upmt"
USER = "mh-1"
PASSWORD = "correct horse"
AN_URI = "sip:198.51.100.1"
T0 = 1000.0


def rfc_credentials(algorithm: str) -> str:
    """The Authorization value of RFC 7616 §3.9.1 (its MD5 one has no algorithm)."""
    return (
        f'Digest username="{RFC_USER}", realm="{RFC_REALM}", uri="{RFC_URI}",'
        f' algorithm={algorithm}, nonce="{RFC_NONCE}", nc=00000001,'
        f' cnonce="{RFC_CNONCE}", qop=auth, response="{RFC_RESPONSES[algorithm]}",'
        f' opaque="{RFC_OPAQUE}"'
    )


def users_of(passwords: dict[str, str], realm: str = REALM) -> dict[tuple[str, str], str]:
    return {
        (user, algorithm): ha1(user, realm, password, algorithm)
        for user, password in passwords.items()
        for algorithm in ALGORITHMS
    }


USERS = users_of({USER: PASSWORD, "mh-2": "other"})


def ha1_of(username: str, algorithm: str) -> str | None:
    return USERS.get((username, algorithm))


def check(value: str, nonces: NonceStore, now: float = T0, **kwargs: str) -> DigestResult:
    return verify(
        value,
        method=kwargs.get("method", "REGISTER"),
        realm=kwargs.get("realm", REALM),
        ha1_of=ha1_of,
        nonces=nonces,
        now=now,
    )


def answer(
    nonces: NonceStore,
    *,
    algorithm: str = "SHA-256",
    password: str = PASSWORD,
    username: str = USER,
    nc: int = 1,
    now: float = T0,
    stale: bool = False,
) -> str:
    values = challenge_values(REALM, nonces, now, stale=stale)
    challenge = choose_challenge([v for v in values if v.endswith(f"algorithm={algorithm}")])
    assert challenge.algorithm == algorithm
    return authorization_value(
        challenge,
        username=username,
        password=password,
        method="REGISTER",
        uri=AN_URI,
        cnonce=new_cnonce(),
        nc=nc,
    )


def reanswer(credentials: str, *, nc: int) -> str:
    """The same credentials with another nonce count (and the response to match)."""
    params = dict(AuthCredentials.parse(credentials).parameters or {})
    challenge = ParsedChallenge(params["realm"], params["nonce"], params["algorithm"])
    return authorization_value(
        challenge,
        username=params["username"],
        password=PASSWORD,
        method="REGISTER",
        uri=params["uri"],
        cnonce=params["cnonce"],
        nc=nc,
    )


# --- RFC 7616 §3.9.1 ---------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["MD5", "SHA-256"])
def test_rfc7616_response_vectors(algorithm: str) -> None:
    response = digest_response(
        ha1(RFC_USER, RFC_REALM, RFC_PASSWORD, algorithm),
        algorithm=algorithm,
        nonce=RFC_NONCE,
        nc="00000001",
        cnonce=RFC_CNONCE,
        qop="auth",
        method="GET",
        uri=RFC_URI,
    )
    assert response == RFC_RESPONSES[algorithm]


@pytest.mark.parametrize("algorithm", ["MD5", "SHA-256"])
def test_rfc7616_client_answers_the_example_challenge(algorithm: str) -> None:
    challenge = choose_challenge([v for v in RFC_CHALLENGES if f"={algorithm}," in v])
    assert challenge == ParsedChallenge(RFC_REALM, RFC_NONCE, algorithm, opaque=RFC_OPAQUE)
    value = authorization_value(
        challenge,
        username=RFC_USER,
        password=RFC_PASSWORD,
        method="GET",
        uri=RFC_URI,
        cnonce=RFC_CNONCE,
    )
    params = AuthCredentials.parse(value).parameters
    assert params is not None
    assert params["response"] == RFC_RESPONSES[algorithm]
    assert params["opaque"] == RFC_OPAQUE
    # RFC 3261 §25.1: qop and nc are tokens in credentials, never quoted.
    assert "qop=auth," in value
    assert "nc=00000001," in value


def test_client_prefers_sha256_whatever_the_order() -> None:
    assert choose_challenge(RFC_CHALLENGES).algorithm == "SHA-256"
    assert choose_challenge(RFC_CHALLENGES[::-1]).algorithm == "SHA-256"


@pytest.mark.parametrize("algorithm", ["MD5", "SHA-256"])
def test_server_checks_the_rfc7616_example(algorithm: str) -> None:
    """The example's response is right; its nonce is not ours, so the answer is STALE."""

    def rfc_ha1(username: str, alg: str) -> str | None:
        return ha1(RFC_USER, RFC_REALM, RFC_PASSWORD, alg) if username == RFC_USER else None

    def run(password_ha1: Callable[[str, str], str | None]) -> Outcome:
        return verify(
            rfc_credentials(algorithm),
            method="GET",
            realm=RFC_REALM,
            ha1_of=password_ha1,
            nonces=NonceStore(),
            now=T0,
            request_uri=RFC_URI,
        ).outcome

    assert run(rfc_ha1) is Outcome.STALE
    assert run(lambda u, a: ha1(u, RFC_REALM, "Circle of Lies", a)) is Outcome.WRONG_CREDENTIALS


# --- round trips ---------------------------------------------------------------


def test_challenge_values_offer_sha256_then_md5_with_one_nonce() -> None:
    nonces = NonceStore()
    values = challenge_values(REALM, nonces, T0)
    assert [v.rsplit("algorithm=", 1)[1] for v in values] == ["SHA-256", "MD5"]
    parsed = [choose_challenge([v]) for v in values]
    assert parsed[0].nonce == parsed[1].nonce
    assert all(p.realm == REALM and not p.stale for p in parsed)
    assert all('qop="auth"' in v and "stale" not in v for v in values)
    stale = challenge_values(REALM, nonces, T0, stale=True)
    assert all(choose_challenge([v]).stale for v in stale)
    assert parsed[0].nonce != choose_challenge(stale).nonce


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_round_trip(algorithm: str) -> None:
    nonces = NonceStore()
    credentials = answer(nonces, algorithm=algorithm)
    result = check(credentials, nonces, T0 + 1)
    params = AuthCredentials.parse(credentials).parameters
    assert params is not None
    assert result == DigestResult(
        Outcome.OK,
        username=USER,
        algorithm=algorithm,
        nonce=params["nonce"],
        cnonce=params["cnonce"],
    )


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_round_trip_through_a_register_on_the_wire(algorithm: str) -> None:
    nonces = NonceStore()
    values = challenge_values(REALM, nonces, T0)
    request = build_register(
        an_host="198.51.100.1",
        an_port=5060,
        terminal_id=USER,
        local_host="198.18.0.2",
        local_port=5070,
        call_id=new_call_id(),
        cseq=2,
        from_tag=new_tag(),
        branch=new_branch(),
        expires=600,
        vipa=None,
    )
    challenge = choose_challenge([v for v in values if v.endswith(algorithm)])
    request.headers.set(
        "Authorization",
        authorization_value(
            challenge,
            username=USER,
            password=PASSWORD,
            method=request.method,
            uri=str(request.uri),
            cnonce=new_cnonce(),
        ),
    )
    received = parse_message_untrusted(serialize(request))
    assert isinstance(received, Request)
    value = received.headers.get("Authorization")
    assert value is not None
    result = verify(
        value,
        method=received.method,
        realm=REALM,
        ha1_of=ha1_of,
        nonces=nonces,
        now=T0 + 0.5,
        request_uri=str(received.uri),
    )
    assert (result.outcome, result.algorithm) == (Outcome.OK, algorithm)
    other_uri = verify(
        value,
        method=received.method,
        realm=REALM,
        ha1_of=ha1_of,
        nonces=nonces,
        now=T0 + 0.5,
        request_uri="sip:203.0.113.9",
    )
    assert other_uri.outcome is Outcome.MALFORMED


def test_missing_algorithm_means_md5() -> None:
    nonces = NonceStore()
    credentials = answer(nonces, algorithm="MD5").replace(", algorithm=MD5", "")
    assert "algorithm" not in credentials
    assert check(credentials, nonces).outcome is Outcome.OK
    challenge = choose_challenge([f'Digest realm="{REALM}", nonce="n", qop="auth"'])
    assert challenge.algorithm == "MD5"


# --- refusals ----------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_wrong_password(algorithm: str) -> None:
    nonces = NonceStore()
    result = check(answer(nonces, algorithm=algorithm, password="guess"), nonces)
    assert result.outcome is Outcome.WRONG_CREDENTIALS
    assert result.username == USER


def test_unknown_user_looks_like_a_wrong_password() -> None:
    nonces = NonceStore()
    unknown = check(answer(nonces, username="nobody"), nonces)
    wrong = check(answer(nonces, password="guess"), nonces)
    assert unknown.outcome is wrong.outcome is Outcome.WRONG_CREDENTIALS


def test_other_realm_is_wrong_credentials() -> None:
    nonces = NonceStore()
    credentials = answer(nonces).replace(f'realm="{REALM}"', 'realm="elsewhere"')
    assert check(credentials, nonces).outcome is Outcome.WRONG_CREDENTIALS


def test_another_method_does_not_verify() -> None:
    nonces = NonceStore()
    assert check(answer(nonces), nonces, method="MESSAGE").outcome is Outcome.WRONG_CREDENTIALS


def test_expired_nonce_is_stale() -> None:
    nonces = NonceStore(lifetime=300)
    credentials = answer(nonces, now=T0)
    assert check(credentials, nonces, T0 + 300.5).outcome is Outcome.STALE
    # With a wrong password an expired nonce says nothing about staleness.
    wrong = answer(nonces, now=T0, password="guess")
    assert check(wrong, nonces, T0 + 301).outcome is Outcome.WRONG_CREDENTIALS


def test_nonce_from_the_future_is_stale() -> None:
    nonces = NonceStore()
    assert check(answer(nonces, now=T0), nonces, T0 - 1).outcome is Outcome.STALE


def test_nonce_count_replay() -> None:
    nonces = NonceStore()
    first = answer(nonces)
    assert check(first, nonces).outcome is Outcome.OK
    assert check(first, nonces).outcome is Outcome.REPLAY
    assert check(reanswer(first, nc=2), nonces).outcome is Outcome.OK
    assert check(reanswer(first, nc=5), nonces).outcome is Outcome.OK
    assert check(reanswer(first, nc=3), nonces).outcome is Outcome.REPLAY
    assert check(reanswer(first, nc=6), nonces).outcome is Outcome.OK


def test_wrong_response_does_not_consume_the_nonce_count() -> None:
    nonces = NonceStore()
    good = answer(nonces)
    params = dict(AuthCredentials.parse(good).parameters or {})
    flipped = "0" if params["response"][0] != "0" else "1"
    bad = good.replace(params["response"], flipped + params["response"][1:])
    assert check(bad, nonces).outcome is Outcome.WRONG_CREDENTIALS
    assert len(nonces) == 0
    assert check(good, nonces).outcome is Outcome.OK


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_nonce_of_another_process(algorithm: str) -> None:
    """After a restart the secret differs: right password → STALE, wrong → WRONG_CREDENTIALS."""
    before, after = NonceStore(), NonceStore()
    assert check(answer(before, algorithm=algorithm), after).outcome is Outcome.STALE
    wrong = answer(before, algorithm=algorithm, password="guess")
    assert check(wrong, after).outcome is Outcome.WRONG_CREDENTIALS


def test_tampered_nonce_is_forged() -> None:
    nonces = NonceStore()
    nonce = nonces.issue(T0)
    tampered = ("A" if nonce[0] != "A" else "B") + nonce[1:]
    assert nonces.validate(tampered, T0) is NonceCheck.FORGED
    assert nonces.check(tampered, 1, T0) is NonceCheck.FORGED
    assert nonces.validate("x" * len(nonce), T0) is NonceCheck.FORGED
    assert nonces.validate(nonce + "A", T0) is NonceCheck.FORGED
    assert nonces.validate(nonce, T0) is NonceCheck.OK
    assert len(nonces) == 0


def _malformations() -> list[str]:
    nonces = NonceStore(secret=b"k" * 32)
    good = answer(nonces, algorithm="SHA-256")
    params = dict(AuthCredentials.parse(good).parameters or {})

    def without(name: str) -> str:
        parts = good.removeprefix("Digest ").split(", ")
        return "Digest " + ", ".join(p for p in parts if not p.startswith(name + "="))

    return [
        "",
        "Digest",
        "Digest ",
        good.replace("Digest", "Basic", 1),
        "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==",
        *(
            without(name)
            for name in ("username", "realm", "nonce", "uri", "response", "qop", "nc", "cnonce")
        ),
        good.replace("algorithm=SHA-256", "algorithm=SHA-512-256"),
        good.replace("algorithm=SHA-256", "algorithm=MD5-sess"),
        good.replace("qop=auth", "qop=auth-int"),
        good.replace("nc=00000001", "nc=1"),
        good.replace("nc=00000001", "nc=0000000g"),
        good.replace("nc=00000001", "nc=000000001"),
        good.replace(params["response"], params["response"][:32]),
        good.replace(params["response"], "z" * 64),
        good.replace(f'cnonce="{params["cnonce"]}"', 'cnonce=""'),
        good.replace(f'uri="{AN_URI}"', 'uri="a\tb"'),
        good.replace(f'uri="{AN_URI}"', 'uri="a\x01b"'),
        good.replace(f'username="{USER}"', f'username="{"u" * 300}"'),
        good + ", nc=00000002",
        good + ', response="x"',
        good.replace(", ", " "),
        good + ', x="unterminated',
        good + ", " + ", ".join(f'p{i}="{"v" * 40}"' for i in range(60)),
    ]


@pytest.mark.parametrize("value", _malformations())
def test_malformed_credentials(value: str) -> None:
    nonces = NonceStore(secret=b"k" * 32)
    result = check(value, nonces)
    assert result.outcome is Outcome.MALFORMED
    assert result.reason
    assert len(nonces) == 0


def test_md5_response_must_be_32_hex_digits() -> None:
    nonces = NonceStore()
    good = answer(nonces, algorithm="MD5")
    params = dict(AuthCredentials.parse(good).parameters or {})
    assert check(good.replace(params["response"], "a" * 64), nonces).outcome is Outcome.MALFORMED


def test_case_insensitive_names_and_tokens() -> None:
    nonces = NonceStore()
    good = answer(nonces, algorithm="SHA-256")
    shouty = (
        good.replace("Digest", "DIGEST", 1)
        .replace("algorithm=SHA-256", "ALGORITHM=sha-256")
        .replace("qop=auth", "QOP=auth")
    )
    result = check(shouty, nonces)
    assert (result.outcome, result.algorithm) == (Outcome.OK, "SHA-256")


def test_quoted_pairs_and_commas_inside_quotes() -> None:
    challenge = choose_challenge(['Digest realm="a\\"b, c", nonce="n,1", qop="auth-int,auth"'])
    assert (challenge.realm, challenge.nonce) == ('a"b, c', "n,1")


def test_catastrophic_backtracking_input_is_quick() -> None:
    # sipmessage's own AuthCredentials.parse takes seconds on 22 of these.
    nonces = NonceStore()
    started = time.perf_counter()
    for value in ('Digest a="",' * 300, "Digest " + 'a="",' * 400, "Digest " + 'a="' * 600):
        assert check(value[:MAX_HEADER_VALUE], nonces).outcome is Outcome.MALFORMED
    assert check("Digest a=b" + ", a=b" * 1000, nonces).outcome is Outcome.MALFORMED
    assert time.perf_counter() - started < 0.5


@pytest.mark.parametrize(
    "values",
    [
        [],
        ["Basic realm=x"],
        [f'Digest realm="{REALM}", nonce="n", qop="auth-int", algorithm=SHA-256'],
        [f'Digest realm="{REALM}", nonce="n", algorithm=SHA-256'],
        [f'Digest realm="{REALM}", nonce="n", qop="auth", algorithm=SHA-512-256'],
        [f'Digest realm="{REALM}", nonce="n", qop="auth", algorithm=MD5-sess'],
        ['Digest nonce="n", qop="auth"'],
        [f'Digest realm="{REALM}", qop="auth"'],
        [f'Digest realm="{REALM}", nonce="", qop="auth"'],
        ["Digest realm=", "garbage", 'Digest a="' * 100],
    ],
)
def test_no_usable_challenge(values: list[str]) -> None:
    with pytest.raises(MalformedError):
        choose_challenge(values)


def test_unusable_challenges_are_skipped() -> None:
    values = ["Basic realm=x", 'Digest realm="r", nonce="n", qop="auth", algorithm=MD5']
    assert choose_challenge(values).algorithm == "MD5"


def test_client_refuses_bad_nonce_counts() -> None:
    challenge = ParsedChallenge(REALM, "n", "MD5")
    for nc in (0, 2**32):
        with pytest.raises(ValueError):
            authorization_value(
                challenge, username=USER, password=PASSWORD, method="REGISTER", uri=AN_URI,
                cnonce="c", nc=nc,
            )  # fmt: skip


def test_realms() -> None:
    assert is_valid_realm("upmt") and is_valid_realm("an.example.org")
    for realm in ("", "a b", 'a"b', "a,b", "a" * 129, "é"):
        assert not is_valid_realm(realm)
        with pytest.raises(ValueError):
            challenge_values(realm, NonceStore(), T0)


# --- the nonce store ---------------------------------------------------------------


def test_nonce_store_stays_bounded() -> None:
    nonces = NonceStore(capacity=10_000)
    now = T0
    for _ in range(100_000):
        now += 0.001  # 100 s in all: no nonce expires, every one must be evicted
        nonce = nonces.issue(now)
        assert nonces.check(nonce, 1, now) is NonceCheck.OK
        assert len(nonces) <= 10_000
    assert len(nonces) == 10_000


def test_expired_entries_are_dropped() -> None:
    nonces = NonceStore(lifetime=10, capacity=10_000)
    for i in range(5_000):
        now = T0 + i
        nonces.check(nonces.issue(now), 1, now)
    assert len(nonces) <= 12


def test_evicted_nonce_is_stale_never_fresh() -> None:
    nonces = NonceStore(capacity=3)
    unused = nonces.issue(T0 - 0.5)
    first = nonces.issue(T0)
    assert nonces.check(first, 7, T0) is NonceCheck.OK
    later = nonces.issue(T0 + 0.5)
    for i in range(3):
        nonces.check(nonces.issue(T0 + 1 + i), 1, T0 + 1 + i)
    assert len(nonces) == 3
    # Forgotten: its count could start again, so it must be renewed instead.
    assert nonces.check(first, 1, T0 + 5) is NonceCheck.STALE
    assert nonces.check(first, 8, T0 + 5) is NonceCheck.STALE
    # Never used, but issued before a nonce that was forgotten: it cannot be
    # told from a forgotten one, so it is stale too.
    assert nonces.check(unused, 1, T0 + 5) is NonceCheck.STALE
    # Issued after every forgotten nonce: it cannot have been forgotten.
    assert nonces.check(later, 1, T0 + 5) is NonceCheck.OK


def test_nonce_count_zero_is_refused() -> None:
    nonces = NonceStore()
    nonce = nonces.issue(T0)
    assert nonces.check(nonce, 0, T0) is NonceCheck.REPLAY
    assert len(nonces) == 0


class NaiveNonces:
    """Unbounded reference: every nonce ever used, with its highest count."""

    def __init__(self, store: NonceStore) -> None:
        self.store = store
        self.seen: dict[str, int] = {}

    def check(self, nonce: str, nc: int, now: float) -> NonceCheck:
        state = self.store.validate(nonce, now)
        if state is not NonceCheck.OK:
            return state
        if nc <= self.seen.get(nonce, 0):
            return NonceCheck.REPLAY
        self.seen[nonce] = nc
        return NonceCheck.OK


@settings(max_examples=200)
@given(
    capacity=st.integers(1, 8),
    ops=st.lists(
        st.tuples(st.integers(0, 15), st.integers(0, 6), st.floats(0, 40)), min_size=1, max_size=80
    ),
)
def test_nonce_store_against_naive_reference(
    capacity: int, ops: list[tuple[int, int, float]]
) -> None:
    """Bounded answers equal the unbounded ones, except that OK or REPLAY may become STALE.

    STALE is always safe (the client fetches a new nonce); an OK where the
    reference says REPLAY would be a replay let through.
    """
    secret = b"s" * 32
    bounded = NonceStore(lifetime=30, capacity=capacity, secret=secret)
    unbounded = NonceStore(lifetime=30, capacity=10**9, secret=secret)
    naive = NaiveNonces(NonceStore(lifetime=30, secret=secret))
    issued: list[str] = []
    now = T0
    for index, nc, step in ops:
        now += step
        if index >= len(issued):
            issued.append(bounded.issue(now))
            continue
        nonce = issued[index]
        expected = naive.check(nonce, nc, now)
        assert unbounded.check(nonce, nc, now) is expected
        got = bounded.check(nonce, nc, now)
        assert got is expected or got is NonceCheck.STALE
        assert len(bounded) <= capacity


# --- untrusted input -----------------------------------------------------------------


_NAMES = st.sampled_from(
    ["username", "realm", "nonce", "uri", "response", "qop", "nc", "cnonce", "algorithm", "x"]
)
_VALUES = st.one_of(
    st.text(max_size=70),
    st.text(alphabet="0123456789abcdefABCDEF", min_size=0, max_size=70),
    st.sampled_from(["auth", "MD5", "SHA-256", "00000001", REALM, USER, AN_URI, "", '"', "\\"]),
)
_PARAM = st.tuples(_NAMES, _VALUES, st.booleans()).map(
    lambda p: f'{p[0]}="{p[1]}"' if p[2] else f"{p[0]}={p[1]}"
)
_HEADERS = st.one_of(
    st.text(max_size=300),
    st.lists(_PARAM, max_size=12).map(lambda ps: "Digest " + ", ".join(ps)),
    st.lists(_PARAM, max_size=12).map(lambda ps: "Digest " + ",".join(ps) + ","),
)


@settings(max_examples=1000)
@given(_HEADERS)
def test_verify_never_raises(value: str) -> None:
    nonces = NonceStore(secret=b"k" * 32)
    result = check(value, nonces)
    assert result.outcome is not Outcome.OK
    assert isinstance(result.reason, str)


@settings(max_examples=300)
@given(st.data())
def test_verify_never_raises_on_mutated_credentials(data: st.DataObject) -> None:
    nonces = NonceStore(secret=b"k" * 32)
    good = answer(nonces, algorithm=data.draw(st.sampled_from(ALGORITHMS)))
    chars = list(good)
    for _ in range(data.draw(st.integers(1, 6))):
        position = data.draw(st.integers(0, len(chars) - 1))
        action = data.draw(st.sampled_from(["drop", "replace", "insert"]))
        char = data.draw(st.characters(codec="utf-8"))
        if action == "drop" and len(chars) > 1:
            del chars[position]
        elif action == "replace":
            chars[position] = char
        else:
            chars.insert(position, char)
    check("".join(chars), nonces)


@settings(max_examples=300)
@given(st.lists(_HEADERS, max_size=4))
def test_choose_challenge_raises_only_malformed(values: list[str]) -> None:
    try:
        challenge = choose_challenge(values)
    except MalformedError:
        return
    assert challenge.algorithm in ALGORITHMS


def test_random_nonce_strings_are_forged() -> None:
    nonces = NonceStore()
    rng = random.Random(7)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for _ in range(1000):
        nonce = "".join(rng.choice(alphabet) for _ in range(48))
        assert nonces.validate(nonce, T0) is NonceCheck.FORGED
