"""Association: REGISTER / 200 OK with VIpAddr, and the refresh schedule."""

from __future__ import annotations

import pytest
from sipmessage import Request, Response

from ground.errors import MalformedError
from signalling.message import (
    build_response,
    new_branch,
    new_call_id,
    new_tag,
    parse_message_untrusted,
    serialize,
)
from signalling.register import (
    VIPADDR_HEADER,
    RegisterInfo,
    build_register,
    build_register_ok,
    parse_register_ok_untrusted,
    parse_register_untrusted,
)


def wire_request(request: Request) -> Request:
    parsed = parse_message_untrusted(serialize(request))
    assert isinstance(parsed, Request)
    return parsed


def wire_response(response: Response) -> Response:
    parsed = parse_message_untrusted(serialize(response))
    assert isinstance(parsed, Response)
    return parsed


def register(
    vipa: str | None = None, an_port: int = 5060, an_host: str = "198.51.100.1"
) -> Request:
    return build_register(
        an_host=an_host,
        an_port=an_port,
        terminal_id="mh-1",
        local_host="198.18.0.2",
        local_port=5070,
        call_id=new_call_id(),
        cseq=1,
        from_tag=new_tag(),
        branch=new_branch(),
        expires=3600,
        vipa=vipa,
    )


def test_register_shape() -> None:
    request = wire_request(register())
    assert str(request.uri) == "sip:198.51.100.1"
    assert str(request.to_address.uri) == "sip:mh-1@198.51.100.1"
    assert str(request.from_address.uri) == "sip:mh-1@198.51.100.1"
    assert [str(c.uri) for c in request.contact] == ["sip:mh-1@198.18.0.2:5070"]
    assert request.expires == 3600
    assert request.headers.get(VIPADDR_HEADER) is None
    assert parse_register_untrusted(request) == RegisterInfo("mh-1", 3600, None)


def test_register_refresh_carries_vipa_and_port() -> None:
    request = wire_request(register(vipa="100.64.0.2", an_port=5080, an_host="2001:db8::1"))
    assert str(request.uri) == "sip:[2001:db8::1]:5080"
    assert parse_register_untrusted(request) == RegisterInfo("mh-1", 3600, "100.64.0.2")


def test_register_from_sipp_style_text() -> None:
    data = (
        b"REGISTER sip:198.51.100.1 SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 192.0.2.5:5061;branch=z9hG4bK-1-0\r\n"
        b"From: sipp <sip:term_7@198.51.100.1>;tag=1\r\n"
        b"To: sipp <sip:term_7@198.51.100.1>\r\n"
        b"Call-ID: 1-1@192.0.2.5\r\n"
        b"CSeq: 1 REGISTER\r\n"
        b"Contact: sip:term_7@192.0.2.5:5061;expires=120\r\n"
        b"Expires: 3600\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    request = parse_message_untrusted(data)
    assert isinstance(request, Request)
    # The Contact parameter wins over the header (RFC 3261 §10.2.1.1).
    assert parse_register_untrusted(request) == RegisterInfo("term_7", 120, None)


def _with_header(name: str, value: str) -> Request:
    request = wire_request(register())
    request.headers.set(name, value)
    return request


@pytest.mark.parametrize(
    "request_",
    [
        _with_header("To", "<sip:198.51.100.1>"),
        _with_header("To", "<sip:bad%20id@198.51.100.1>"),
        _with_header("To", "<sip:" + "a" * 65 + "@198.51.100.1>"),
        _with_header(VIPADDR_HEADER, "100.64.0.300"),
        _with_header("Expires", "4294967296"),
        _with_header("Contact", "<sip:mh-1@198.18.0.2>;expires=x"),
        _with_header("Contact", "not a contact"),
    ],
)
def test_bad_registers(request_: Request) -> None:
    with pytest.raises(MalformedError):
        parse_register_untrusted(request_)


def test_not_register() -> None:
    request = wire_request(register())
    request.method = "MESSAGE"
    with pytest.raises(MalformedError):
        parse_register_untrusted(request)


def test_wildcard_contact_removal() -> None:
    request = _with_header("Contact", "*")
    request.headers.set("Expires", "0")
    assert parse_register_untrusted(request).expires == 0
    ok = wire_response(build_register_ok(request, vipa="100.64.0.2", expires=0, to_tag="t"))
    assert ok.contact == []


def test_register_ok_round_trip() -> None:
    request = wire_request(register())
    ok = wire_response(build_register_ok(request, vipa="100.64.0.2", expires=600, to_tag="an1"))
    assert ok.code == 200
    assert ok.to_address.parameters["tag"] == "an1"
    assert ok.contact[0].parameters["expires"] == "600"
    assert ok.headers.get(VIPADDR_HEADER) == "100.64.0.2"
    assert parse_register_ok_untrusted(ok) == ("100.64.0.2", 600)


@pytest.mark.parametrize("code", [401, 500])
def test_register_ok_parser_wants_200(code: int) -> None:
    request = wire_request(register())
    with pytest.raises(MalformedError):
        parse_register_ok_untrusted(wire_response(build_response(request, code)))


def test_register_ok_parser_wants_vipa_and_expires() -> None:
    request = wire_request(register())
    no_vipa = wire_response(build_response(request, 200, headers=[("Expires", "60")]))
    no_expires = wire_response(build_response(request, 200, headers=[(VIPADDR_HEADER, "::1")]))
    for response in (no_vipa, no_expires):
        with pytest.raises(MalformedError):
            parse_register_ok_untrusted(response)
