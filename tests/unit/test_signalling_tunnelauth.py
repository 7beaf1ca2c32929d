"""In-tunnel MESSAGE authentication: sign/verify across the wire, tampering, replay, keys."""

from __future__ import annotations

import contextlib
import json
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sipmessage import Request

from ground.errors import MalformedError
from signalling.message import (
    build_request,
    new_branch,
    parse_message_untrusted,
    serialize,
)
from signalling.tunnelauth import (
    AUTH_HEADER,
    KEY_SIZE,
    MAX_SEQ,
    TunnelAuthVerifier,
    decode_key_untrusted,
    derive_key,
    encode_key,
    random_key,
    sign,
)

KEY = bytes(range(KEY_SIZE))
NOW = 1_700_000_000.5
BODY = json.dumps(
    {
        "mType": "TunnelSetupRequest",
        "terminalId": "mh-1",
        "vipa": "100.64.0.2",
        "interface": "wlan0",
    }
).encode()


def make_request(body: bytes = BODY, call_id: str = "c0ffee01", cseq: int = 2) -> Request:
    return build_request(
        "MESSAGE",
        "sip:an@198.51.100.1",
        via_host="198.18.0.2",
        via_port=5070,
        branch=new_branch(),
        from_uri="sip:mh-1@198.51.100.1",
        from_tag="fromtag",
        to_uri="sip:an@198.51.100.1",
        call_id=call_id,
        cseq=cseq,
        body=body,
        content_type="application/json",
    )


def signed_wire(*, seq: int = 1, now: float = NOW, key: bytes = KEY) -> bytes:
    request = make_request()
    sign(request, key, now=now, seq=seq)
    return serialize(request)


def receive(data: bytes) -> Request:
    message = parse_message_untrusted(data)
    assert isinstance(message, Request)
    return message


def test_sign_verify_round_trip() -> None:
    request = receive(signed_wire())
    value = request.headers.get(AUTH_HEADER)
    assert value is not None
    assert re.fullmatch(r"ts=1700000000;seq=1;mac=[0-9a-f]{64}", value)
    TunnelAuthVerifier(KEY).verify(request, NOW)


def test_mac_survives_compact_names_and_case_changes() -> None:
    data = signed_wire()
    head, sep, body = data.partition(b"\r\n\r\n")
    for long, compact in (
        (b"Call-ID:", b"i:"),
        (b"From:", b"f:"),
        (b"To:", b"t:"),
        (b"Content-Type:", b"c:"),
        (b"Content-Length:", b"l:"),
        (b"Via:", b"v:"),
    ):
        assert b"\r\n" + long in head
        head = head.replace(b"\r\n" + long, b"\r\n" + compact)
    head = head.replace(b"\r\nCSeq:", b"\r\ncseq :").replace(b"UPMT-Auth:", b"upmt-AUTH:  ")
    rewritten = head + sep + body
    assert rewritten != data
    TunnelAuthVerifier(KEY).verify(receive(rewritten), NOW)


def test_unsigned_request_is_refused() -> None:
    request = receive(serialize(make_request()))
    with pytest.raises(MalformedError, match="no UPMT-Auth"):
        TunnelAuthVerifier(KEY).verify(request, NOW)


def test_wrong_key_is_refused() -> None:
    request = receive(signed_wire(key=random_key()))
    with pytest.raises(MalformedError, match="MAC mismatch"):
        TunnelAuthVerifier(KEY).verify(request, NOW)


# Each rewrite changes one covered field on the wire; the AUTH header stays.
TAMPERS = {
    "body byte": (b'"wlan0"', b'"wlan1"'),
    "Call-ID": (b"Call-ID: c0ffee01", b"Call-ID: c0ffee02"),
    "CSeq number": (b"CSeq: 2 MESSAGE", b"CSeq: 3 MESSAGE"),
    "From": (b"From: <sip:mh-1@", b"From: <sip:mh-2@"),
    "From tag": (b"tag=fromtag", b"tag=fromtah"),
    "To": (b"To: <sip:an@", b"To: <sip:xn@"),
    "Request-URI": (b"MESSAGE sip:an@198.51.100.1 SIP", b"MESSAGE sip:an@198.51.100.2 SIP"),
    "Content-Type": (b"Content-Type: application/json", b"Content-Type: application/jsox"),
    "ts": (b"ts=1700000000;", b"ts=1700000001;"),
    "seq": (b";seq=1;", b";seq=2;"),
}


@pytest.mark.parametrize("field", sorted(TAMPERS))
def test_tampered_field_is_refused(field: str) -> None:
    data = signed_wire()
    old, new = TAMPERS[field]
    assert data.count(old) == 1
    request = receive(data.replace(old, new))
    with pytest.raises(MalformedError, match="MAC mismatch"):
        TunnelAuthVerifier(KEY).verify(request, NOW)


def test_cseq_method_is_covered() -> None:
    # The parser insists that the CSeq method equals the request method, so
    # change both: a signed MESSAGE must not pass as another method.
    data = signed_wire().replace(b"MESSAGE", b"INFO")
    with pytest.raises(MalformedError, match="MAC mismatch"):
        TunnelAuthVerifier(KEY).verify(receive(data), NOW)


def test_removed_content_type_is_refused() -> None:
    request = receive(signed_wire())
    request.headers.remove("Content-Type")
    with pytest.raises(MalformedError, match="MAC mismatch"):
        TunnelAuthVerifier(KEY).verify(request, NOW)


def test_duplicate_auth_header_is_refused() -> None:
    request = receive(signed_wire())
    value = request.headers.get(AUTH_HEADER)
    assert value is not None
    request.headers.add(AUTH_HEADER, value)
    with pytest.raises(MalformedError, match="more than one"):
        TunnelAuthVerifier(KEY).verify(request, NOW)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "ts=1;seq=1",
        "ts=1700000000;seq=1;mac=" + "0" * 63,
        "ts=1700000000;seq=1;mac=" + "A" * 64,
        "seq=1;ts=1700000000;mac=" + "0" * 64,
        "ts=-1;seq=1;mac=" + "0" * 64,
        "ts=1700000000;seq=0;mac=" + "0" * 64,
        f"ts=1700000000;seq={MAX_SEQ + 1};mac=" + "0" * 64,
        "ts=1700000000;seq=1;mac=" + "0" * 64 + ";x=1",
        # Arabic-Indic digits: int() would take them, the header grammar does not.
        "ts=\u0661\u0667;seq=1;mac=" + "0" * 64,
    ],
)
def test_malformed_auth_header_is_refused(value: str) -> None:
    request = receive(signed_wire())
    request.headers.set(AUTH_HEADER, value)
    with pytest.raises(MalformedError):
        TunnelAuthVerifier(KEY).verify(request, NOW)


@pytest.mark.parametrize("offset", [-121.0, 121.0, -1e6, 1e6])
def test_timestamp_outside_window_is_refused(offset: float) -> None:
    request = receive(signed_wire(now=NOW + offset))
    with pytest.raises(MalformedError, match="timestamp"):
        TunnelAuthVerifier(KEY, window=120.0).verify(request, NOW)


@pytest.mark.parametrize("offset", [-119.0, 0.0, 119.0])
def test_timestamp_inside_window_is_accepted(offset: float) -> None:
    request = receive(signed_wire(now=NOW + offset))
    TunnelAuthVerifier(KEY, window=120.0).verify(request, NOW)


def test_replay_is_refused() -> None:
    data = signed_wire(seq=5)
    verifier = TunnelAuthVerifier(KEY)
    verifier.verify(receive(data), NOW)
    with pytest.raises(MalformedError, match="replayed"):
        verifier.verify(receive(data), NOW + 1)


def test_out_of_order_seqs_are_accepted_once_each() -> None:
    verifier = TunnelAuthVerifier(KEY, max_seen=16)
    order = [3, 1, 7, 2, 6, 4, 5, 20, 8]
    for seq in order:
        verifier.verify(receive(signed_wire(seq=seq)), NOW)
    # Seqs 1..4 are now below the window (highest 20, 16 remembered): refused too.
    for seq in order:
        with pytest.raises(MalformedError, match="replay"):
            verifier.verify(receive(signed_wire(seq=seq)), NOW)
    # 20 is the highest: 4 is now 16 behind, below the window.
    with pytest.raises(MalformedError, match="below the replay window"):
        verifier.verify(receive(signed_wire(seq=4)), NOW)
    verifier.verify(receive(signed_wire(seq=19)), NOW)


def test_forged_request_does_not_move_the_window() -> None:
    verifier = TunnelAuthVerifier(KEY, max_seen=8)
    verifier.verify(receive(signed_wire(seq=1)), NOW)
    # A forger's huge seq fails the MAC and must not push seq 2 out of the window.
    with pytest.raises(MalformedError, match="MAC mismatch"):
        verifier.verify(receive(signed_wire(seq=10_000, key=random_key())), NOW)
    verifier.verify(receive(signed_wire(seq=2)), NOW)


def test_seen_set_stays_bounded() -> None:
    max_seen = 1024
    verifier = TunnelAuthVerifier(KEY, max_seen=max_seen)
    request = make_request()
    last = 20_000  # about 20 windows
    rng = random.Random(7)
    for base in range(1, last + 1, 100):
        # Shuffled within blocks of 100, well inside the window.
        block = list(range(base, base + 100))
        rng.shuffle(block)
        for seq in block:
            sign(request, KEY, now=NOW, seq=seq)
            verifier.verify(request, NOW)
    assert verifier._seen.bit_length() <= max_seen
    assert verifier._highest == last
    for seq in (last, last - max_seen + 1):
        sign(request, KEY, now=NOW, seq=seq)
        with pytest.raises(MalformedError, match="replayed"):
            verifier.verify(request, NOW)
    for seq in (last - max_seen, 1):
        sign(request, KEY, now=NOW, seq=seq)
        with pytest.raises(MalformedError, match="below the replay window"):
            verifier.verify(request, NOW)
    # A jump far beyond the window resets the bitmap rather than growing it.
    sign(request, KEY, now=NOW, seq=MAX_SEQ)
    verifier.verify(request, NOW)
    assert verifier._seen == 1


def test_sign_refuses_bad_arguments() -> None:
    request = make_request()
    with pytest.raises(ValueError):
        sign(request, KEY, now=NOW, seq=0)
    with pytest.raises(ValueError):
        sign(request, KEY, now=NOW, seq=MAX_SEQ + 1)
    with pytest.raises(ValueError):
        sign(request, b"short", now=NOW, seq=1)
    with pytest.raises(ValueError):
        TunnelAuthVerifier(b"short")


def test_sign_replaces_previous_header() -> None:
    request = make_request()
    sign(request, KEY, now=NOW, seq=1)
    sign(request, KEY, now=NOW, seq=2)
    assert len(request.headers.getlist(AUTH_HEADER)) == 1
    TunnelAuthVerifier(KEY).verify(receive(serialize(request)), NOW)


# Header values a datagram could carry: printable, no CR/LF.
header_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc")) | st.sampled_from("\t;=<>@:"),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from([AUTH_HEADER, "From", "To", "Call-ID", "CSeq", "Content-Type"]),
    value=header_text,
)
def test_random_header_values_raise_only_malformed(name: str, value: str) -> None:
    request = make_request()
    sign(request, KEY, now=NOW, seq=1)
    request.headers.set(name, value)
    with contextlib.suppress(MalformedError):
        TunnelAuthVerifier(KEY).verify(request, NOW)


@settings(max_examples=200, deadline=None)
@given(value=header_text)
def test_random_auth_header_on_the_wire_raises_only_malformed(value: str) -> None:
    data = signed_wire()
    start = data.index(AUTH_HEADER.encode())
    end = data.index(b"\r\n", start)
    data = data[:start] + f"{AUTH_HEADER}: {value}".encode() + data[end:]
    with contextlib.suppress(MalformedError):
        TunnelAuthVerifier(KEY).verify(receive(data), NOW)


DERIVE_ARGS = ("0123456789abcdef0123456789abcdef", "nonce-1", "cnonce-1", "mh-1")


def test_derive_key_is_deterministic() -> None:
    key = derive_key(*DERIVE_ARGS)
    assert len(key) == KEY_SIZE
    assert key == derive_key(*DERIVE_ARGS)
    # HA1 is hex: its case does not matter, the bytes are the secret.
    assert key == derive_key(DERIVE_ARGS[0].upper(), *DERIVE_ARGS[1:])


@pytest.mark.parametrize("index", range(len(DERIVE_ARGS)))
def test_derive_key_depends_on_every_input(index: int) -> None:
    changed = list(DERIVE_ARGS)
    changed[index] = changed[index][:-1] + ("0" if changed[index][-1] != "0" else "1")
    assert derive_key(*changed) != derive_key(*DERIVE_ARGS)


def test_derive_key_separators_are_unambiguous() -> None:
    ha1 = DERIVE_ARGS[0]
    assert derive_key(ha1, "ab", "c", "t") != derive_key(ha1, "a", "bc", "t")
    with pytest.raises(ValueError):
        derive_key(ha1, "a\0b", "c", "t")


def test_derive_key_accepts_non_hex_ha1() -> None:
    assert derive_key("not hex", "n", "c", "t") != derive_key("not hex!", "n", "c", "t")


def test_derived_key_signs_and_verifies() -> None:
    key = derive_key(*DERIVE_ARGS)
    TunnelAuthVerifier(key).verify(receive(signed_wire(key=key)), NOW)


def test_random_key() -> None:
    assert len(random_key()) == KEY_SIZE
    assert random_key() != random_key()


@pytest.mark.parametrize("key", [KEY, bytes(KEY_SIZE), b"\xff" * KEY_SIZE])
def test_key_encoding_round_trip(key: bytes) -> None:
    text = encode_key(key)
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", text)
    assert decode_key_untrusted(text) == key


def test_key_encoding_random_round_trip() -> None:
    for _ in range(100):
        key = random_key()
        assert decode_key_untrusted(encode_key(key)) == key


@pytest.mark.parametrize(
    "text",
    [
        "",
        encode_key(KEY) + "=",
        encode_key(KEY)[:-1],
        encode_key(KEY) + "A",
        encode_key(KEY)[:-1] + "+",
        encode_key(KEY)[:-1] + "/",
        " " + encode_key(KEY)[1:],
        # Same bytes, but the unused low bits of the last character set.
        encode_key(bytes(KEY_SIZE))[:-1] + "B",
        "é" * 43,
    ],
)
def test_bad_key_text_is_refused(text: str) -> None:
    with pytest.raises(MalformedError):
        decode_key_untrusted(text)


@given(st.text(max_size=60))
def test_random_key_text_raises_only_malformed(text: str) -> None:
    with contextlib.suppress(MalformedError):
        decode_key_untrusted(text)
