"""UPMT JSON bodies: vectors from docs/architecture.md and the paper, bad cases, round trips."""

from __future__ import annotations

import ipaddress
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ground.errors import MalformedError
from signalling.bodies import (
    Body,
    FlowMove,
    HandoverRequest,
    HandoverResponse,
    IptablesMatch,
    StructuredMatch,
    TunnelSetupRequest,
    TunnelSetupResponse,
    UnknownMessageType,
    decode_body_untrusted,
    encode_body,
    format_endpoint,
    parse_endpoint_untrusted,
    parse_iptables_match,
)


def test_tunnel_setup_request_vector() -> None:
    data = (
        b'{"mType": "TunnelSetupRequest", "terminalId": "mh-1",'
        b' "vipa": "100.64.0.2", "interface": "wlan0"}'
    )
    assert decode_body_untrusted(data) == TunnelSetupRequest("mh-1", "100.64.0.2", "wlan0")


def test_tunnel_setup_response_vectors() -> None:
    v4 = b'{"mType":"TunnelSetupResponse","tunnelId":"7","observed":"203.0.113.9:40000"}'
    assert decode_body_untrusted(v4) == TunnelSetupResponse("7", "203.0.113.9:40000")
    v6 = b'{"mType":"TunnelSetupResponse","tunnelId":"t","observed":"[2001:DB8::1]:1800"}'
    assert decode_body_untrusted(v6) == TunnelSetupResponse("t", "[2001:db8::1]:1800")


def test_handover_request_paper_vector() -> None:
    data = json.dumps(
        {
            "mType": "HandoverRequest",
            "flows": [
                {
                    "match": {
                        "syntax": "IPTables",
                        "match": "-p tcp --destination 160.80.81.1 --destination-port 80",
                    },
                    "tunnelId": "any",
                },
                {"match": {"proto": "UDP", "dst": "100.64.0.9/10", "dport": 53}},
                {"match": {}, "tunnelId": "t1"},
            ],
        }
    ).encode()
    body = decode_body_untrusted(data)
    assert isinstance(body, HandoverRequest)
    first, second, third = body.flows
    assert first.tunnel_id is None
    assert isinstance(first.match, IptablesMatch)
    assert first.match.to_structured() == StructuredMatch(proto="tcp", dst="160.80.81.1", dport=80)
    assert second == FlowMove(StructuredMatch(proto="udp", dst="100.64.0.0/10", dport=53), None)
    assert third == FlowMove(StructuredMatch(), "t1")


def test_handover_response_vector() -> None:
    assert decode_body_untrusted(b'{"mType":"HandoverResponse","moved":3}') == HandoverResponse(3)


def test_encode_writes_any_for_none() -> None:
    body = HandoverRequest((FlowMove(StructuredMatch(proto="tcp", dport=22)),))
    assert json.loads(encode_body(body)) == {
        "mType": "HandoverRequest",
        "flows": [{"match": {"proto": "tcp", "dport": 22}, "tunnelId": "any"}],
    }


def test_unknown_top_level_keys_tolerated() -> None:
    data = b'{"mType":"HandoverResponse","moved":0,"note":"x"}'
    assert decode_body_untrusted(data) == HandoverResponse(0)


@pytest.mark.parametrize(
    "data",
    [
        b"{}",
        b'{"mType": 3}',
        b'{"mType": "Nonsense"}',
        b'{"mType": null}',
    ],
)
def test_unknown_message_type(data: bytes) -> None:
    with pytest.raises(UnknownMessageType):
        decode_body_untrusted(data)


def _handover(match: object, tunnel: object = "any") -> bytes:
    return json.dumps(
        {"mType": "HandoverRequest", "flows": [{"match": match, "tunnelId": tunnel}]}
    ).encode()


def _setup(**changes: object) -> bytes:
    fields: dict[str, object] = {
        "mType": "TunnelSetupRequest",
        "terminalId": "mh-1",
        "vipa": "100.64.0.2",
        "interface": "wlan0",
    }
    return json.dumps(fields | changes).encode()


def _setup_response(observed: str, tunnel: str = "t") -> bytes:
    fields = {"mType": "TunnelSetupResponse", "tunnelId": tunnel, "observed": observed}
    return json.dumps(fields).encode()


BAD_BODIES = {
    "not JSON": b"{",
    "not UTF-8": b'{"mType":"\xff"}',
    "not an object": b"[]",
    "NaN": b'{"mType":"HandoverResponse","moved":NaN}',
    "duplicate key": b'{"mType":"HandoverResponse","moved":1,"moved":2}',
    "deep nesting": b'{"mType":"HandoverResponse","x":' + b"[" * 5000 + b"]" * 5000 + b"}",
    "too large": b'{"mType":"HandoverResponse","moved":1,"x":"' + b"a" * 9000 + b'"}',
    "moved as bool": b'{"mType":"HandoverResponse","moved":true}',
    "moved as float": b'{"mType":"HandoverResponse","moved":1.0}',
    "moved negative": b'{"mType":"HandoverResponse","moved":-1}',
    "moved as string": b'{"mType":"HandoverResponse","moved":"1"}',
    "bad vipa": _setup(vipa="1.2.3"),
    "scoped vipa": _setup(vipa="fe80::1%eth0"),
    "vipa not a string": _setup(vipa=16843009),
    "bad terminal": _setup(terminalId="a b"),
    "long interface": _setup(interface="0123456789abcdef"),
    "slash interface": _setup(interface="a/b"),
    "dot interface": _setup(interface=".."),
    "observed without port": _setup_response("1.2.3.4"),
    "observed v6 unbracketed": _setup_response("::1:80"),
    "observed v4 bracketed": _setup_response("[1.2.3.4]:80"),
    "observed port range": _setup_response("1.2.3.4:65536"),
    "tunnel id any": _setup_response("1.2.3.4:1", tunnel="any"),
    "flows not a list": b'{"mType":"HandoverRequest","flows":{}}',
    "flow unknown key": json.dumps(
        {"mType": "HandoverRequest", "flows": [{"match": {}, "tunel": "x"}]}
    ).encode(),
    "match unknown key": _handover({"dprot": 80}),
    "port out of range": _handover({"dport": 65536}),
    "port as bool": _handover({"sport": True}),
    "proto unknown": _handover({"proto": "carrier-pigeon"}),
    "proto number": _handover({"proto": 6}),
    "bad prefix": _handover({"src": "10.0.0.0/33"}),
    "netmask prefix": _handover({"src": "10.0.0.0/255.0.0.0"}),
    "hostname": _handover({"dst": "example.com"}),
    "mixed families": _handover({"src": "10.0.0.1", "dst": "::1"}),
    "bad tunnel id": _handover({}, tunnel=7),
    "bad syntax": _handover({"syntax": "nft", "match": "tcp dport 80"}),
    "iptables extra key": _handover({"syntax": "IPTables", "match": "-p tcp", "x": 1}),
    "iptables bad rule": _handover({"syntax": "IPTables", "match": "-j DROP"}),
}


@pytest.mark.parametrize("name", sorted(BAD_BODIES))
def test_bad_bodies(name: str) -> None:
    with pytest.raises(MalformedError):
        decode_body_untrusted(BAD_BODIES[name])


def test_iptables_parser() -> None:
    assert parse_iptables_match(
        "-p tcp -m tcp -s 198.18.0.0/15 --sport 1024 -d 192.0.2.1 --dport 443"
    ) == StructuredMatch("tcp", "198.18.0.0/15", 1024, "192.0.2.1", 443)
    assert parse_iptables_match("") == StructuredMatch()
    assert parse_iptables_match("-p all --dst 10.1.2.3/8") == StructuredMatch(dst="10.0.0.0/8")
    assert parse_iptables_match("--protocol 17 --source-port 5") == StructuredMatch("udp", sport=5)
    assert parse_iptables_match("-p sctp -m sctp --dport 9") == StructuredMatch("132", dport=9)


@pytest.mark.parametrize(
    "rule",
    [
        "-p",
        "-p tcp -p udp",
        "! -p tcp",
        "-p tcp ! --dport 80",
        "--dport 1000:2000",
        "--dport http",
        "--dport 70000",
        "-p tcp -m udp --dport 1",
        "-m tcp --dport 1",
        "-p tcp -j ACCEPT",
        "-i eth0",
        "-s 10.0.0.1 -d ::1",
        "-s example.com",
        "-p tcp" + " " * 1100,
    ],
)
def test_iptables_parser_rejects(rule: str) -> None:
    with pytest.raises(MalformedError):
        parse_iptables_match(rule)


def test_endpoint_round_trip() -> None:
    for host, port in (("203.0.113.1", 0), ("2001:db8::5", 65535)):
        assert parse_endpoint_untrusted(format_endpoint(host, port)) == (host, port)


# --- property: decode(encode(x)) == x -----------------------------------------

terminal_ids = st.from_regex(r"\A[A-Za-z0-9._-]{1,64}\Z")
tunnel_ids = st.from_regex(r"\A[A-Za-z0-9._:\[\]-]{1,64}\Z").filter(lambda s: s != "any")
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
addresses = ipv4 | ipv6
ports = st.integers(0, 65535)


@st.composite
def prefixes(draw: st.DrawFn, v6: bool) -> str:
    address = draw(st.ip_addresses(v=6) if v6 else st.ip_addresses(v=4))
    length = draw(st.integers(0, 128 if v6 else 32))
    return ipaddress.ip_network(f"{address}/{length}", strict=False).with_prefixlen


@st.composite
def structured_matches(draw: st.DrawFn) -> StructuredMatch:
    v6 = draw(st.booleans())
    host = ipv6 if v6 else ipv4
    where = st.none() | host | prefixes(v6)
    return StructuredMatch(
        proto=draw(st.none() | st.sampled_from(["tcp", "udp", "icmp", "icmpv6", "47", "132"])),
        src=draw(where),
        sport=draw(st.none() | ports),
        dst=draw(where),
        dport=draw(st.none() | ports),
    )


iptables_matches = st.builds(
    IptablesMatch,
    st.sampled_from(["-p tcp --destination 160.80.81.1 --destination-port 80", "", "-p udp"]),
)
bodies: st.SearchStrategy[Body] = st.one_of(
    st.builds(TunnelSetupRequest, terminal_ids, addresses, st.from_regex(r"\A[a-z0-9]{1,15}\Z")),
    st.builds(TunnelSetupResponse, tunnel_ids, st.builds(format_endpoint, addresses, ports)),
    st.builds(
        HandoverRequest,
        st.lists(
            st.builds(FlowMove, structured_matches() | iptables_matches, st.none() | tunnel_ids),
            max_size=5,
        ).map(tuple),
    ),
    st.builds(HandoverResponse, st.integers(0, 2**40)),
)


@given(bodies)
def test_body_round_trip(body: Body) -> None:
    assert decode_body_untrusted(encode_body(body)) == body


@given(structured_matches())
def test_iptables_form_of_structured_match(match: StructuredMatch) -> None:
    options = [
        ("-p", match.proto),
        ("-s", match.src),
        ("--sport", match.sport),
        ("-d", match.dst),
        ("--dport", match.dport),
    ]
    rule = " ".join(f"{opt} {value}" for opt, value in options if value is not None)
    assert parse_iptables_match(rule) == match


def test_a_redundant_move_names_its_second_tunnel() -> None:
    body = HandoverRequest((FlowMove(StructuredMatch(dport=5004), None, "203.0.113.11:40000"),))
    data = encode_body(body)
    assert json.loads(data)["flows"][0]["redundantWith"] == "203.0.113.11:40000"
    assert decode_body_untrusted(data) == body
    # Without it the key is absent, as older peers send it.
    assert (
        "redundantWith"
        not in json.loads(encode_body(HandoverRequest((FlowMove(StructuredMatch()),))))["flows"][0]
    )
    for twin in ("any", 7, "", None.__class__.__name__ * 40):
        bad = json.dumps(
            {"mType": "HandoverRequest", "flows": [{"match": {}, "redundantWith": twin}]}
        )
        with pytest.raises(MalformedError):
            decode_body_untrusted(bad.encode())
