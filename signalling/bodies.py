"""UPMT's JSON message bodies, carried with `Content-Type: application/json`.

See docs/architecture.md, "Signalling".

`encode_body` and `decode_body_untrusted` are the symmetric pair. Decoding is
strict about types (strings are strings; integers are integers, not floats or
booleans), rejects duplicate keys and NaN/Infinity, and normalizes values so
that equal meanings compare equal: addresses in their compressed form,
prefixes as network/length, protocol names lower case (`"tcp"`, `"udp"`,
`"icmp"`, `"icmpv6"`, otherwise the decimal number), `"tunnelId": "any"` or
absent as None.

Unknown keys are tolerated at the top level of a body, leaving room for later
fields, and rejected inside `flows` entries and `match` objects: there an
unknown key (a misspelt `"dprot"`, say) would silently widen the set of flows
a handover moves.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from ground.errors import MalformedError

__all__ = [
    "ANY_TUNNEL",
    "MAX_BODY_SIZE",
    "Body",
    "FlowMove",
    "HandoverRequest",
    "HandoverResponse",
    "IptablesMatch",
    "Match",
    "StructuredMatch",
    "TunnelSetupRequest",
    "TunnelSetupResponse",
    "UnknownMessageType",
    "decode_body_untrusted",
    "encode_body",
    "format_endpoint",
    "parse_endpoint_untrusted",
    "parse_iptables_match",
    "validate_terminal_id",
]

# A body cannot be larger than the SIP message that carries it.
MAX_BODY_SIZE: Final = 8192
# An iptables rule longer than this is not a flow selector anyone wrote by hand.
MAX_IPTABLES_RULE: Final = 1024
ANY_TUNNEL: Final = "any"  # the tunnel the request arrived on
IPTABLES_SYNTAX: Final = "IPTables"  # paper Fig. 9

_TERMINAL_ID_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Tunnel ids are opaque to the terminal; the AN may use "IP:port" or "[v6]:port".
_TUNNEL_ID_RE: Final = re.compile(r"[A-Za-z0-9._:\[\]-]{1,64}")
# Linux dev_valid_name(): 1..15 bytes (IFNAMSIZ - 1), no '/', ':' or whitespace.
_INTERFACE_RE: Final = re.compile(r"[\x21-\x2e\x30-\x39\x3b-\x7e]{1,15}")
_PORT_TEXT_RE: Final = re.compile(r"[0-9]{1,5}")
_PROTO_TEXT_RE: Final = re.compile(r"[0-9]{1,3}")

# IANA protocol numbers of the names accepted on input.
_PROTOCOL_NUMBERS: Final[dict[str, int]] = {
    "icmp": 1,
    "tcp": 6,
    "udp": 17,
    "gre": 47,
    "esp": 50,
    "ah": 51,
    "icmpv6": 58,
    "ipv6-icmp": 58,
    "sctp": 132,
    "udplite": 136,
}
# The names written out: the ones the PAFT selector (`paft.flow.proto_name`)
# also uses, so that a decoded match converts without a table of its own.
_PROTOCOL_NAMES: Final[dict[int, str]] = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}


class UnknownMessageType(MalformedError):
    """A body whose `mType` is missing, not a string, or not one UPMT knows."""


@dataclass(frozen=True, slots=True)
class TunnelSetupRequest:
    terminal_id: str
    vipa: str
    interface: str


@dataclass(frozen=True, slots=True)
class TunnelSetupResponse:
    tunnel_id: str
    observed: str  # "IP:port", IPv6 as "[addr]:port": the tunnel's source as the AN saw it


@dataclass(frozen=True, slots=True)
class StructuredMatch:
    """A flow selector; None fields are wildcards. `src`/`dst` may be prefixes."""

    proto: str | None = None
    src: str | None = None
    sport: int | None = None
    dst: str | None = None
    dport: int | None = None


@dataclass(frozen=True, slots=True)
class IptablesMatch:
    """The paper's iptables-style selector; `rule` parses (`parse_iptables_match`)."""

    rule: str

    def to_structured(self) -> StructuredMatch:
        return parse_iptables_match(self.rule)


Match: TypeAlias = StructuredMatch | IptablesMatch


@dataclass(frozen=True, slots=True)
class FlowMove:
    match: Match
    tunnel_id: str | None = None  # None: the tunnel the request arrived on
    # A redundant flow: its downstream goes on this tunnel as well (None: on one).
    redundant_with: str | None = None


@dataclass(frozen=True, slots=True)
class HandoverRequest:
    flows: tuple[FlowMove, ...]


@dataclass(frozen=True, slots=True)
class HandoverResponse:
    moved: int


Body: TypeAlias = TunnelSetupRequest | TunnelSetupResponse | HandoverRequest | HandoverResponse


# --- values shared with register.py -----------------------------------------


def validate_terminal_id(value: object) -> str:
    """A terminal id: 1..64 characters of [A-Za-z0-9._-]."""
    if not isinstance(value, str) or not _TERMINAL_ID_RE.fullmatch(value):
        raise MalformedError("bad terminal id")
    return value


def validate_address(value: object, what: str) -> str:
    """An IPv4 or IPv6 address, returned in its compressed form."""
    if not isinstance(value, str) or "%" in value:
        # ipaddress accepts IPv6 scope ids ("fe80::1%eth0"); none belongs here.
        raise MalformedError(f"bad {what} address")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError as exc:
        raise MalformedError(f"bad {what} address") from exc


def format_endpoint(host: str, port: int) -> str:
    """ "IP:port", with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_endpoint_untrusted(value: object) -> tuple[str, int]:
    """Inverse of `format_endpoint`: (normalized address, port)."""
    if not isinstance(value, str):
        raise MalformedError("endpoint is not a string")
    host, colon, port_text = value.rpartition(":")
    if not colon or not _PORT_TEXT_RE.fullmatch(port_text) or int(port_text) > 0xFFFF:
        raise MalformedError("endpoint has no valid port")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    address = validate_address(host, "endpoint")
    if (":" in address) != bracketed:
        raise MalformedError("IPv6 endpoint address must be in brackets, IPv4 must not")
    return address, int(port_text)


# --- encoding ----------------------------------------------------------------


def encode_body(body: Body) -> bytes:
    """The JSON form of `body` (compact, ASCII)."""
    obj: dict[str, object]
    if isinstance(body, TunnelSetupRequest):
        obj = {
            "mType": "TunnelSetupRequest",
            "terminalId": body.terminal_id,
            "vipa": body.vipa,
            "interface": body.interface,
        }
    elif isinstance(body, TunnelSetupResponse):
        obj = {
            "mType": "TunnelSetupResponse",
            "tunnelId": body.tunnel_id,
            "observed": body.observed,
        }
    elif isinstance(body, HandoverRequest):
        obj = {
            "mType": "HandoverRequest",
            "flows": [_encode_move(flow) for flow in body.flows],
        }
    else:
        obj = {"mType": "HandoverResponse", "moved": body.moved}
    return json.dumps(obj, separators=(",", ":")).encode("ascii")


def _encode_move(flow: FlowMove) -> dict[str, object]:
    move: dict[str, object] = {
        "match": _encode_match(flow.match),
        "tunnelId": ANY_TUNNEL if flow.tunnel_id is None else flow.tunnel_id,
    }
    if flow.redundant_with is not None:
        move["redundantWith"] = flow.redundant_with
    return move


def _encode_match(match: Match) -> dict[str, object]:
    if isinstance(match, IptablesMatch):
        return {"syntax": IPTABLES_SYNTAX, "match": match.rule}
    fields = {
        "proto": match.proto,
        "src": match.src,
        "sport": match.sport,
        "dst": match.dst,
        "dport": match.dport,
    }
    return {key: value for key, value in fields.items() if value is not None}


# --- decoding ----------------------------------------------------------------


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise MalformedError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _reject_constant(name: str) -> object:
    raise MalformedError(f"{name} is not JSON")


def decode_body_untrusted(data: bytes) -> Body:
    """Parse a UPMT body; raises `MalformedError` (`UnknownMessageType` for a bad mType)."""
    if len(data) > MAX_BODY_SIZE:
        raise MalformedError(f"body of {len(data)} bytes exceeds {MAX_BODY_SIZE}")
    try:
        text = data.decode("utf-8")
        obj = json.loads(
            text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant
        )
    except (ValueError, RecursionError) as exc:
        # ValueError covers UnicodeDecodeError and JSONDecodeError; deep
        # nesting ("[[[[…") makes the decoder recurse past the limit.
        raise MalformedError("body is not UTF-8 JSON") from exc
    if not isinstance(obj, dict):
        raise MalformedError("body is not a JSON object")
    m_type = obj.get("mType")
    decoder = _DECODERS.get(m_type) if isinstance(m_type, str) else None
    if decoder is None:
        raise UnknownMessageType(f"unknown mType {str(m_type)[:40]!r}")
    return decoder(obj)


def _string(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise MalformedError(f"{key} is not a string")
    return value


def _integer(value: object, what: str) -> int:
    # bool is an int subclass; `true` is not a number here.
    if not isinstance(value, int) or isinstance(value, bool):
        raise MalformedError(f"{what} is not an integer")
    return value


def _tunnel_id(value: object) -> str:
    if not isinstance(value, str) or not _TUNNEL_ID_RE.fullmatch(value):
        raise MalformedError("bad tunnel id")
    return value


def _decode_tunnel_setup_request(obj: dict[str, Any]) -> Body:
    interface = _string(obj, "interface")
    if not _INTERFACE_RE.fullmatch(interface) or interface in (".", ".."):
        raise MalformedError("bad interface name")
    return TunnelSetupRequest(
        terminal_id=validate_terminal_id(obj.get("terminalId")),
        vipa=validate_address(obj.get("vipa"), "VIPA"),
        interface=interface,
    )


def _decode_tunnel_setup_response(obj: dict[str, Any]) -> Body:
    tunnel_id = _tunnel_id(obj.get("tunnelId"))
    if tunnel_id == ANY_TUNNEL:
        raise MalformedError(f"{ANY_TUNNEL!r} is not a tunnel id")
    host, port = parse_endpoint_untrusted(obj.get("observed"))
    return TunnelSetupResponse(tunnel_id=tunnel_id, observed=format_endpoint(host, port))


def _decode_handover_request(obj: dict[str, Any]) -> Body:
    flows = obj.get("flows")
    if not isinstance(flows, list):
        raise MalformedError("flows is not a list")
    return HandoverRequest(flows=tuple(_decode_flow(flow) for flow in flows))


def _decode_flow(flow: object) -> FlowMove:
    if not isinstance(flow, dict):
        raise MalformedError("flow is not an object")
    if unknown := set(flow) - {"match", "tunnelId", "redundantWith"}:
        raise MalformedError(f"unknown flow keys {sorted(unknown)[:5]}")
    tunnel = flow.get("tunnelId")
    tunnel_id = None if tunnel is None or tunnel == ANY_TUNNEL else _tunnel_id(tunnel)
    twin = flow.get("redundantWith")
    redundant_with = None if twin is None else _tunnel_id(twin)
    if redundant_with == ANY_TUNNEL:
        raise MalformedError(f"redundantWith {ANY_TUNNEL!r} names no tunnel")
    return FlowMove(
        match=_decode_match(flow.get("match")),
        tunnel_id=tunnel_id,
        redundant_with=redundant_with,
    )


def _decode_match(match: object) -> Match:
    if not isinstance(match, dict):
        raise MalformedError("match is not an object")
    if "syntax" in match:
        if set(match) != {"syntax", "match"}:
            raise MalformedError("an IPTables match has exactly the keys syntax and match")
        if match["syntax"] != IPTABLES_SYNTAX:
            raise MalformedError("unknown match syntax")
        rule = _string(match, "match")
        parse_iptables_match(rule)  # refused here, not later when it is used
        return IptablesMatch(rule)
    if unknown := set(match) - {"proto", "src", "sport", "dst", "dport"}:
        raise MalformedError(f"unknown match keys {sorted(unknown)[:5]}")
    proto = match.get("proto")
    if proto is not None and not isinstance(proto, str):
        raise MalformedError("proto is not a string")
    return _structured(
        proto=None if proto is None else _protocol(proto),
        src=_optional(match.get("src"), _prefix, "src"),
        sport=_optional(match.get("sport"), _port, "sport"),
        dst=_optional(match.get("dst"), _prefix, "dst"),
        dport=_optional(match.get("dport"), _port, "dport"),
    )


def _optional(value: object, check: Callable[[object, str], Any], what: str) -> Any:
    return None if value is None else check(value, what)


def _port(value: object, what: str) -> int:
    port = _integer(value, what)
    if not 0 <= port <= 0xFFFF:
        raise MalformedError(f"{what} out of 0..65535")
    return port


def _prefix(value: object, what: str) -> str:
    """An address ("160.80.81.1") or a prefix ("100.64.0.0/10"), normalized."""
    if not isinstance(value, str) or "%" in value:
        raise MalformedError(f"bad {what} address")
    if "/" not in value:
        return validate_address(value, what)
    address, _, length = value.partition("/")
    if not _PROTO_TEXT_RE.fullmatch(length):
        # ipaddress also takes netmasks ("/255.0.0.0"); only a length is meant here.
        raise MalformedError(f"bad {what} prefix length")
    try:
        # Host bits are allowed and cleared, as iptables does.
        return ipaddress.ip_network(
            f"{validate_address(address, what)}/{length}", False
        ).with_prefixlen
    except ValueError as exc:
        raise MalformedError(f"bad {what} prefix") from exc


def _protocol(value: str) -> str:
    name = value.lower()
    number = _PROTOCOL_NUMBERS.get(name)
    if number is None and _PROTO_TEXT_RE.fullmatch(name) and int(name) <= 255:
        number = int(name)
    if number is None:
        raise MalformedError(f"unknown protocol {value[:20]!r}")
    return _PROTOCOL_NAMES.get(number, str(number))


def _structured(
    *, proto: str | None, src: str | None, sport: int | None, dst: str | None, dport: int | None
) -> StructuredMatch:
    if src is not None and dst is not None and (":" in src) != (":" in dst):
        # Such a selector could never match a packet: surely a mistake.
        raise MalformedError("src and dst of different address families")
    return StructuredMatch(proto=proto, src=src, sport=sport, dst=dst, dport=dport)


def _decode_handover_response(obj: dict[str, Any]) -> Body:
    moved = _integer(obj.get("moved"), "moved")
    if moved < 0:
        raise MalformedError("moved is negative")
    return HandoverResponse(moved=moved)


_DECODERS: Final[dict[str, Callable[[dict[str, Any]], Body]]] = {
    "TunnelSetupRequest": _decode_tunnel_setup_request,
    "TunnelSetupResponse": _decode_tunnel_setup_response,
    "HandoverRequest": _decode_handover_request,
    "HandoverResponse": _decode_handover_response,
}


# --- the paper's iptables syntax ---------------------------------------------

_IPTABLES_OPTIONS: Final[dict[str, str]] = {
    "-p": "proto",
    "--protocol": "proto",
    "-s": "src",
    "--source": "src",
    "--src": "src",
    "-d": "dst",
    "--destination": "dst",
    "--dst": "dst",
    "--sport": "sport",
    "--source-port": "sport",
    "--dport": "dport",
    "--destination-port": "dport",
    # iptables-save writes "-m tcp" before port options; accepted when it
    # names the same protocol as -p.
    "-m": "module",
    "--match": "module",
}
_IPTABLES_MODULES: Final = frozenset({"tcp", "udp", "sctp", "udplite"})


def parse_iptables_match(rule: str) -> StructuredMatch:
    """The selector written in iptables syntax (`-p tcp --destination 160.80.81.1 --dport 80`).

    Supports -p/--protocol (a name, a number or `all`), -s/--source,
    -d/--destination (address or prefix), --sport/--source-port and
    --dport/--destination-port (one number each) and `-m` naming the protocol.
    Anything else (negation, port ranges, other matches or targets, an option
    given twice) raises `MalformedError`.
    """
    if not isinstance(rule, str) or len(rule) > MAX_IPTABLES_RULE:
        raise MalformedError("iptables rule is not a string of reasonable length")
    tokens = rule.split()
    if len(tokens) % 2:
        raise MalformedError("iptables option without a value")
    values: dict[str, str] = {}
    for option, value in zip(tokens[::2], tokens[1::2], strict=True):
        field = _IPTABLES_OPTIONS.get(option)
        if field is None:
            raise MalformedError(f"unsupported iptables option {option[:20]!r}")
        if field in values:
            raise MalformedError(f"iptables option {option} given twice")
        values[field] = value
    proto_text = values.get("proto")
    proto = None if proto_text is None or proto_text.lower() == "all" else _protocol(proto_text)
    module = values.get("module")
    if module is not None and (
        module.lower() not in _IPTABLES_MODULES or _protocol(module) != proto
    ):
        raise MalformedError("-m must name the protocol given with -p")
    return _structured(
        proto=proto,
        src=_optional(values.get("src"), _prefix, "src"),
        sport=_optional(values.get("sport"), _port_text, "sport"),
        dst=_optional(values.get("dst"), _prefix, "dst"),
        dport=_optional(values.get("dport"), _port_text, "dport"),
    )


def _port_text(value: object, what: str) -> int:
    if not isinstance(value, str) or not _PORT_TEXT_RE.fullmatch(value):
        raise MalformedError(f"bad {what}")
    return _port(int(value), what)
