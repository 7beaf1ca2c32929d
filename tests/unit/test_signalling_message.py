"""SIP message framing: hand-written vectors, RFC 4475-style bad cases, round trips."""

from __future__ import annotations

import pytest
from sipmessage import Request, Response

from ground.errors import MalformedError
from signalling.message import (
    MAX_MESSAGE_SIZE,
    build_request,
    build_response,
    new_branch,
    new_call_id,
    new_tag,
    parse_message_untrusted,
    reason_phrase,
    serialize,
    top_branch,
)

# A REGISTER as a terse peer could write it: compact names (v, f, t, i, m, l),
# names in odd case, a folded header, whitespace before a colon, and a body
# longer than its Content-Length (the tail must be cut off).
COMPACT_REGISTER = (
    b"REGISTER sip:198.51.100.1 SIP/2.0\r\n"
    b"v: SIP/2.0/UDP 198.18.0.2:5070;branch=z9hG4bKcompact1;rport\r\n"
    b"MAX-FORWARDS: 70\r\n"
    b"f: <sip:mh-1@198.51.100.1>;tag=fromtag\r\n"
    b"t : <sip:mh-1@198.51.100.1>\r\n"
    b"i: a84b4c76e66710\r\n"
    b"cseq: 7\r\n"
    b"  REGISTER\r\n"
    b"m: <sip:mh-1@198.18.0.2:5070>\r\n"
    b"expires: 3600\r\n"
    b"VIPADDR: 100.64.0.2\r\n"
    b"c: text/plain\r\n"
    b"l: 5\r\n"
    b"\r\n"
    b"hello, and some trailing junk"
)

VALID_MESSAGE = (
    b"MESSAGE sip:an.example SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.7:5060;branch=z9hG4bKabc\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.8:5060;branch=z9hG4bKdef\r\n"
    b"From: <sip:mh-1@an.example>;tag=1\r\n"
    b"To: <sip:an.example>\r\n"
    b"Call-ID: c1@192.0.2.7\r\n"
    b"CSeq: 2 MESSAGE\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: 2\r\n"
    b"\r\n"
    b"{}"
)


def test_compact_register_vector() -> None:
    message = parse_message_untrusted(COMPACT_REGISTER)
    assert isinstance(message, Request)
    assert message.method == "REGISTER"
    assert message.body == b"hello"
    assert message.call_id == "a84b4c76e66710"
    assert message.cseq.sequence == 7
    assert message.cseq.method == "REGISTER"
    assert message.from_address.parameters["tag"] == "fromtag"
    assert message.to_address.uri.user == "mh-1"
    assert message.via[0].host == "198.18.0.2"
    assert message.headers.get("VIpAddr") == "100.64.0.2"
    assert message.expires == 3600
    assert top_branch(message) == "z9hG4bKcompact1"
    assert [str(c.uri) for c in message.contact] == ["sip:mh-1@198.18.0.2:5070"]


def test_compact_register_reserializes_with_its_length() -> None:
    data = serialize(parse_message_untrusted(COMPACT_REGISTER))
    assert data.endswith(b"Content-Length: 5\r\n\r\nhello")
    again = parse_message_untrusted(data)
    assert again.body == b"hello"
    assert again.call_id == "a84b4c76e66710"


def test_valid_message_and_all_vias() -> None:
    message = parse_message_untrusted(VALID_MESSAGE)
    assert isinstance(message, Request)
    assert message.body == b"{}"
    assert [v.host for v in message.via] == ["192.0.2.7", "192.0.2.8"]


def test_leading_crlf_ignored() -> None:
    assert parse_message_untrusted(b"\r\n\r\n" + VALID_MESSAGE).body == b"{}"


def test_no_content_length_takes_the_rest() -> None:
    data = VALID_MESSAGE.replace(b"Content-Length: 2\r\n", b"") + b"xyz"
    assert parse_message_untrusted(data).body == b"{}xyz"


def test_response_vector() -> None:
    data = (
        b"SIP/2.0 200 OK\r\n"
        b"Via: SIP/2.0/UDP 192.0.2.7:5060;branch=z9hG4bKabc\r\n"
        b"From: <sip:mh-1@an.example>;tag=1\r\n"
        b"To: <sip:mh-1@an.example>;tag=2\r\n"
        b"Call-ID: c1\r\n"
        b"CSeq: 1 REGISTER\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    message = parse_message_untrusted(data)
    assert isinstance(message, Response)
    assert (message.code, message.phrase) == (200, "OK")
    assert message.cseq.method == "REGISTER"


def _replace(old: bytes, new: bytes) -> bytes:
    assert old in VALID_MESSAGE
    return VALID_MESSAGE.replace(old, new)


BAD_CASES = {
    "missing CSeq": _replace(b"CSeq: 2 MESSAGE\r\n", b""),
    "CSeq method mismatch": _replace(b"CSeq: 2 MESSAGE", b"CSeq: 2 REGISTER"),
    "non-numeric CSeq": _replace(b"CSeq: 2 MESSAGE", b"CSeq: two MESSAGE"),
    "CSeq beyond 2**31": _replace(b"CSeq: 2 MESSAGE", b"CSeq: 2147483648 MESSAGE"),
    "CSeq with non-ASCII digits": _replace(b"CSeq: 2 ", "CSeq: \u0662 ".encode()),
    "negative Content-Length": _replace(b"Content-Length: 2", b"Content-Length: -2"),
    "huge Content-Length": _replace(b"Content-Length: 2", b"Content-Length: 99999999999999"),
    "Content-Length beyond the datagram": _replace(b"Content-Length: 2", b"Content-Length: 3"),
    "two Content-Lengths": _replace(b"Content-Length: 2\r\n", b"Content-Length: 2\r\nl: 2\r\n"),
    "non-UTF-8 header": _replace(b"To: <sip:an.example>", b"To: \xff<sip:an.example>"),
    "missing Via": _replace(
        b"Via: SIP/2.0/UDP 192.0.2.7:5060;branch=z9hG4bKabc\r\n"
        b"Via: SIP/2.0/UDP 192.0.2.8:5060;branch=z9hG4bKdef\r\n",
        b"",
    ),
    "RFC 2543 branch": _replace(b"branch=z9hG4bKabc", b"branch=abc"),
    "no branch": _replace(b";branch=z9hG4bKabc", b""),
    "bad Via": _replace(b"SIP/2.0/UDP 192.0.2.7:5060", b"SIP/2.0/UDP"),
    "missing From": _replace(b"From: <sip:mh-1@an.example>;tag=1\r\n", b""),
    "missing To": _replace(b"To: <sip:an.example>\r\n", b""),
    "bad To": _replace(b"To: <sip:an.example>", b"To: <an.example>"),
    "missing Call-ID": _replace(b"Call-ID: c1@192.0.2.7\r\n", b""),
    "two Call-IDs": _replace(b"Call-ID: c1@192.0.2.7\r\n", b"Call-ID: a\r\ni: b\r\n"),
    "no empty line": VALID_MESSAGE.replace(b"\r\n\r\n", b"\r\n"),
    "bad version": _replace(b"SIP/2.0\r\nVia", b"SIP/7.0\r\nVia"),
    "bad Request-URI": _replace(b"sip:an.example SIP", b"http://an.example SIP"),
    "header without colon": _replace(b"Content-Type: application/json", b"Content-Type"),
    "bad header name": _replace(b"Content-Type:", b"Content Type:"),
    "continuation first": _replace(
        b"\r\nVia: SIP/2.0/UDP 192.0.2.7", b"\r\n Via: SIP/2.0/UDP 1.2.3.4"
    ),
    "NUL in header": _replace(b"c1@192", b"c1\x00@192"),
    "bare LF in header": _replace(b"c1@192", b"c1\n@192"),
    "bad Max-Forwards": _replace(
        b"CSeq: 2 MESSAGE\r\n", b"CSeq: 2 MESSAGE\r\nMax-Forwards: 256\r\n"
    ),
    "Via port out of range": _replace(b"192.0.2.7:5060", b"192.0.2.7:65536"),
    "empty": b"",
    "only CRLFs": b"\r\n\r\n\r\n\r\n",
    "status code out of range": b"SIP/2.0 700 Huh\r\n" + VALID_MESSAGE.split(b"\r\n", 1)[1],
    "too large": VALID_MESSAGE.replace(b"Content-Length: 2", b"")
    + b"x" * (MAX_MESSAGE_SIZE - len(VALID_MESSAGE) + 20),
}


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_bad_cases_raise_malformed(name: str) -> None:
    with pytest.raises(MalformedError):
        parse_message_untrusted(BAD_CASES[name])


def test_request_round_trip() -> None:
    branch, tag, call_id = new_branch(), new_tag(), new_call_id()
    request = build_request(
        "MESSAGE",
        "sip:an@198.51.100.1",
        via_host="2001:db8::2",
        via_port=5070,
        branch=branch,
        from_uri="sip:mh-1@198.51.100.1",
        from_tag=tag,
        to_uri="sip:an@198.51.100.1",
        call_id=call_id,
        cseq=42,
        contact="sip:mh-1@[2001:db8::2]:5070",
        headers=[("X-Extra", "1"), ("X-Extra", "2")],
        body=b'{"a":1}',
        content_type="application/json",
    )
    data = serialize(request)
    assert data.count(b"Content-Length") == 1
    parsed = parse_message_untrusted(data)
    assert isinstance(parsed, Request)
    assert parsed.method == "MESSAGE"
    assert str(parsed.uri) == "sip:an@198.51.100.1"
    assert top_branch(parsed) == branch
    assert parsed.via[0].host == "[2001:db8::2]"
    assert parsed.via[0].port == 5070
    assert parsed.from_address.parameters["tag"] == tag
    assert "tag" not in parsed.to_address.parameters
    assert parsed.call_id == call_id
    assert (parsed.cseq.sequence, parsed.cseq.method) == (42, "MESSAGE")
    assert parsed.max_forwards == 70
    assert parsed.headers.getlist("X-Extra") == ["1", "2"]
    assert parsed.headers.get("Content-Type") == "application/json"
    assert parsed.body == b'{"a":1}'
    assert serialize(parsed) == data


def test_response_copies_rfc3261_8_2_6_headers() -> None:
    request = parse_message_untrusted(VALID_MESSAGE)
    assert isinstance(request, Request)
    response = build_response(request, 200, to_tag="t0", body=b"{}", content_type="x/y")
    parsed = parse_message_untrusted(serialize(response))
    assert isinstance(parsed, Response)
    assert (parsed.code, parsed.phrase) == (200, "OK")
    assert [v.host for v in parsed.via] == ["192.0.2.7", "192.0.2.8"]
    assert parsed.headers.get("From") == request.headers.get("From")
    assert parsed.to_address.parameters["tag"] == "t0"
    assert parsed.call_id == request.call_id
    assert parsed.cseq == request.cseq
    assert parsed.body == b"{}"


def test_response_to_tag_rules() -> None:
    request = parse_message_untrusted(VALID_MESSAGE)
    assert isinstance(request, Request)
    # A fresh tag when none is given; none on a 100 (RFC 3261 §8.2.6.1).
    assert build_response(request, 400).to_address.parameters["tag"]
    assert "tag" not in build_response(request, 100).to_address.parameters
    # An existing tag is kept.
    tagged = parse_message_untrusted(VALID_MESSAGE.replace(b"<sip:an.example>", b"<sip:x.y>;tag=k"))
    assert isinstance(tagged, Request)
    assert build_response(tagged, 200, to_tag="other").to_address.parameters["tag"] == "k"


def test_reason_phrases() -> None:
    assert reason_phrase(200) == "OK"
    assert reason_phrase(481) == "Call/Transaction Does Not Exist"
    assert reason_phrase(499) == "Bad Request"
    assert reason_phrase(299) == "OK"


def test_serialize_refuses_header_injection() -> None:
    request = parse_message_untrusted(VALID_MESSAGE)
    request.headers.add("X-Evil", "a\r\nVia: SIP/2.0/UDP evil")
    with pytest.raises(ValueError):
        serialize(request)


def test_serialize_refuses_oversized() -> None:
    request = parse_message_untrusted(VALID_MESSAGE)
    request.body = b"x" * MAX_MESSAGE_SIZE
    with pytest.raises(ValueError):
        serialize(request)


def test_fresh_identifiers_differ_and_branch_has_cookie() -> None:
    assert new_branch().startswith("z9hG4bK")
    assert len({new_branch() for _ in range(100)}) == 100
    assert new_tag() != new_tag()
    assert new_call_id() != new_call_id()
