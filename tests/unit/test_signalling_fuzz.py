"""Untrusted input: random bytes and mutated valid messages raise only MalformedError.

The invariant, as in h11's fuzz harness: a parse either succeeds or raises the
project's malformed-input error, never anything else; and the transaction
layer, which a daemon feeds every datagram, never raises at all.
"""

from __future__ import annotations

import contextlib
import json
import time

from hypothesis import given, settings
from hypothesis import strategies as st
from sipmessage import Request, Response

from ground.errors import MalformedError
from signalling.bodies import decode_body_untrusted, parse_iptables_match
from signalling.message import (
    MAX_MESSAGE_SIZE,
    build_response,
    parse_message_untrusted,
    serialize,
)
from signalling.register import (
    parse_register_ok_untrusted,
    parse_register_untrusted,
)
from signalling.transaction import TransactionLayer

VALID_REGISTER = (
    b"REGISTER sip:198.51.100.1 SIP/2.0\r\n"
    b"v: SIP/2.0/UDP 198.18.0.2:5070;branch=z9hG4bKfuzz;rport\r\n"
    b"Max-Forwards: 70\r\n"
    b'From: "MH" <sip:mh-1@198.51.100.1>;tag=f\r\n'
    b"To: <sip:mh-1@198.51.100.1>\r\n"
    b"i: cid@198.18.0.2\r\n"
    b"CSeq: 1 REGISTER\r\n"
    b"Contact: <sip:mh-1@198.18.0.2:5070>;expires=60\r\n"
    b"Expires: 3600\r\n"
    b"VIpAddr: 100.64.0.2\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)
VALID_OK = (
    b"SIP/2.0 200 OK\r\n"
    b"Via: SIP/2.0/UDP 198.18.0.2:5070;branch=z9hG4bKfuzz;rport=5070;received=203.0.113.4\r\n"
    b"From: <sip:mh-1@198.51.100.1>;tag=f\r\n"
    b"To: <sip:mh-1@198.51.100.1>;tag=t\r\n"
    b"Call-ID: cid@198.18.0.2\r\n"
    b"CSeq: 1 REGISTER\r\n"
    b"Contact: <sip:mh-1@198.18.0.2:5070>;expires=60\r\n"
    b"VIpAddr: 100.64.0.2\r\n"
    b"Expires: 60\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)
VALID_MESSAGE = (
    b"MESSAGE sip:198.51.100.1 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP [2001:db8::2]:5070;branch=z9hG4bKm\r\n"
    b"From: <sip:mh-1@198.51.100.1>;tag=f\r\n"
    b"To: <sip:198.51.100.1>\r\n"
    b"Call-ID: m1\r\n"
    b"CSeq: 9 MESSAGE\r\n"
    b"c: application/json\r\n"
    b"l: 75\r\n"
    b"\r\n"
    b'{"mType":"TunnelSetupRequest","terminalId":"mh-1","vipa":"100.64.0.2","interface":"wlan0"}'
)
VALID_BODIES = [
    b'{"mType":"TunnelSetupRequest","terminalId":"mh-1","vipa":"100.64.0.2","interface":"wlan0"}',
    b'{"mType":"TunnelSetupResponse","tunnelId":"t1","observed":"[2001:db8::9]:40000"}',
    b'{"mType":"HandoverRequest","flows":[{"match":{"syntax":"IPTables","match":'
    b'"-p tcp --destination 160.80.81.1 --destination-port 80"},"tunnelId":"any"},'
    b'{"match":{"proto":"udp","src":"100.64.0.0/10","sport":53}}]}',
    b'{"mType":"HandoverResponse","moved":2}',
]

# Tokens that steer mutations towards the parsers' edge cases.
INTERESTING = [
    b"\r\n",
    b"\r\n\r\n",
    b"\r\n ",
    b":",
    b";",
    b",",
    b"<",
    b">",
    b'"',
    b"\\",
    b"[",
    b"]",
    b"%",
    b"\x00",
    b"\xff",
    b"\xc3\xa9",
    b"-1",
    b"99999999999999999999",
    b"0",
    b"z9hG4bK",
    b"SIP/2.0",
    b"l: 9999\r\n",
    b"CSeq: 1 X\r\n",
    b"Via: x\r\n",
    b"Contact: *\r\n",
    b"{",
    b"}",
    b"[",
    b"null",
    b"true",
    b"1e999",
    b"\\ud800",
]


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        position = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["insert", "delete", "replace", "flip"]))
        if kind == "insert":
            data[position:position] = draw(st.sampled_from(INTERESTING) | st.binary(max_size=8))
        elif kind == "delete":
            del data[position : position + draw(st.integers(1, 12))]
        elif kind == "replace":
            end = position + draw(st.integers(1, 8))
            data[position:end] = draw(st.sampled_from(INTERESTING))
        elif data:
            index = min(position, len(data) - 1)
            data[index] ^= 1 << draw(st.integers(0, 7))
    return bytes(data)


SIP_SEEDS = [VALID_REGISTER, VALID_OK, VALID_MESSAGE]
sip_inputs = st.binary(max_size=600) | mutated(SIP_SEEDS)


def check_sip(data: bytes) -> None:
    try:
        message = parse_message_untrusted(data)
    except MalformedError:
        return
    # What parses must also survive the typed accessors the parser vouches
    # for, the register parsers, and a reply.
    assert message.cseq.method
    assert message.via and message.call_id
    message.from_address, message.to_address  # noqa: B018
    if isinstance(message, Request):
        with contextlib.suppress(MalformedError):
            parse_register_untrusted(message)
        response = build_response(message, 400)
        assert parse_message_untrusted(serialize(response)).call_id == message.call_id
    else:
        assert isinstance(message, Response)
        with contextlib.suppress(MalformedError):
            parse_register_ok_untrusted(message)


@settings(max_examples=1500)
@given(sip_inputs)
def test_parse_message_raises_only_malformed(data: bytes) -> None:
    check_sip(data)


@given(st.text(max_size=300))
def test_parse_message_text(text: str) -> None:
    check_sip(text.encode("utf-8", "surrogatepass"))


def test_seeds_are_valid() -> None:
    for seed in SIP_SEEDS:
        parse_message_untrusted(seed)
    for body in VALID_BODIES:
        decode_body_untrusted(body)


@settings(max_examples=1000)
@given(st.binary(max_size=300) | mutated(VALID_BODIES))
def test_decode_body_raises_only_malformed(data: bytes) -> None:
    with contextlib.suppress(MalformedError):
        decode_body_untrusted(data)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
        lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    ),
    st.sampled_from(
        ["TunnelSetupRequest", "TunnelSetupResponse", "HandoverRequest", "HandoverResponse"]
    ),
    st.sampled_from(
        ["terminalId", "vipa", "interface", "tunnelId", "observed", "flows", "moved", "match"]
    ),
)
def test_decode_body_wrong_types(value: object, m_type: str, key: str) -> None:
    data = json.dumps({"mType": m_type, key: value}).encode()
    with contextlib.suppress(MalformedError):
        decode_body_untrusted(data)


iptables_words = st.sampled_from(
    [
        "-p",
        "--protocol",
        "-s",
        "-d",
        "--sport",
        "--dport",
        "-m",
        "tcp",
        "udp",
        "all",
        "!",
        "80",
        "1:2",
        "10.0.0.0/8",
        "::1",
        "-1",
        "65536",
        "icmp",
        "--destination-port",
        "\u0663",
    ]
)


@given(st.lists(iptables_words, max_size=12).map(" ".join) | st.text(max_size=100))
def test_iptables_raises_only_malformed(rule: str) -> None:
    with contextlib.suppress(MalformedError):
        parse_iptables_match(rule)


@settings(max_examples=500)
@given(st.lists(sip_inputs, max_size=8))
def test_layer_never_raises(datagrams: list[bytes]) -> None:
    layer = TransactionLayer(max_transactions=3)
    for index, data in enumerate(datagrams):
        layer.receive_datagram(data, ("192.0.2.1", 5060), now=float(index))
        layer.handle_timer(float(index))
        layer.datagrams_to_send()
        while layer.next_event() is not None:
            pass
    stats = layer.statistics()
    assert stats.received == len(datagrams)


def test_pathological_inputs_are_fast() -> None:
    """Inputs shaped to make regular expressions backtrack stay cheap under the size cap."""
    head = VALID_MESSAGE.split(b"\r\n\r\n")[0].replace(b"l: 75\r\n", b"")
    room = MAX_MESSAGE_SIZE - len(head) - 40
    cases = [
        head + b"\r\nTo: <sip:" + b"a." * (room // 2) + b"!>\r\n\r\n",
        head + b"\r\nVia: SIP/2.0/UDP h;" + b"a=b;" * (room // 4) + b"\r\n\r\n",
        head + b'\r\nFrom: "' + b'\\"' * (room // 2) + b"\r\n\r\n",
        head + b"\r\nContact: " + b"<sip:a@b>," * (room // 10) + b"\r\n\r\n",
        head.replace(b"sip:198.51.100.1 SIP", b"sip:" + b"a" * room + b"! SIP") + b"\r\n\r\n",
    ]
    for data in cases:
        started = time.perf_counter()
        try:
            message = parse_message_untrusted(data)
            message.contact  # noqa: B018
        except (MalformedError, ValueError):
            pass
        assert time.perf_counter() - started < 0.5
