"""Association: the REGISTER that gives a terminal its VIPA, and its refresh.

See docs/architecture.md, "Signalling".

The terminal registers `sip:TERMINAL_ID@<AN>`; the anchor answers `200 OK`
with the VIPA in a `VIpAddr` header and the granted `Expires`. A refresh
carries the VIPA already held, so the anchor can keep it. The builders and
parsers here are the two ends of that exchange (the terminal's schedule of
refreshes is `upmt_client.association`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from sipmessage import Address, Request, Response

from ground.errors import MalformedError

from .bodies import validate_address, validate_terminal_id
from .message import build_request, build_response, checked
from .message import uri_host as _uri_host

__all__ = [
    "DEFAULT_EXPIRES",
    "VIPADDR_HEADER",
    "RegisterInfo",
    "build_register",
    "build_register_ok",
    "parse_register_ok_untrusted",
    "parse_register_untrusted",
]

VIPADDR_HEADER: Final = "VIpAddr"  # UPMT extension header (paper §V)
SIP_DEFAULT_PORT: Final = 5060  # RFC 3261 §19.1.2
DEFAULT_EXPIRES: Final = 3600  # RFC 3261 §10.2.1.1 default registration interval
MAX_EXPIRES: Final = 2**32 - 1  # RFC 3261 §20.19 (delta-seconds, 32 bits)


@dataclass(frozen=True, slots=True)
class RegisterInfo:
    terminal_id: str
    expires: int | None  # None: the anchor picks its default
    vipa: str | None  # the VIPA the terminal already holds (refresh)


def build_register(
    *,
    an_host: str,
    an_port: int,
    terminal_id: str,
    local_host: str,
    local_port: int,
    call_id: str,
    cseq: int,
    from_tag: str,
    branch: str,
    expires: int,
    vipa: str | None,
) -> Request:
    """`REGISTER sip:<an_host>` for `sip:TERMINAL_ID@an_host` with Contact, Expires, VIpAddr.

    The Request-URI carries `an_port` only when it is not 5060, as usual for
    SIP URIs; the datagram's destination is the caller's business.
    """
    host = _uri_host(an_host)
    uri = f"sip:{host}" if an_port == SIP_DEFAULT_PORT else f"sip:{host}:{an_port}"
    aor = f"sip:{terminal_id}@{host}"
    headers = [("Expires", str(expires))]
    if vipa is not None:
        headers.append((VIPADDR_HEADER, vipa))
    return build_request(
        "REGISTER",
        uri,
        via_host=local_host,
        via_port=local_port,
        branch=branch,
        from_uri=aor,
        from_tag=from_tag,
        to_uri=aor,
        call_id=call_id,
        cseq=cseq,
        contact=f"sip:{terminal_id}@{_uri_host(local_host)}:{local_port}",
        headers=headers,
    )


def _delta_seconds(value: str | None, what: str) -> int | None:
    if value is None:
        return None
    if not (value.isascii() and value.isdecimal() and len(value) <= 10):
        raise MalformedError(f"bad {what}")
    seconds = int(value)
    if seconds > MAX_EXPIRES:
        raise MalformedError(f"{what} out of range")
    return seconds


def _vipa_header(message: Request | Response) -> str | None:
    values = message.headers.getlist(VIPADDR_HEADER)
    if len(values) > 1:
        raise MalformedError(f"more than one {VIPADDR_HEADER}")
    return validate_address(values[0], "VIpAddr") if values else None


def _expires_of(message: Request | Response) -> int | None:
    """RFC 3261 §10.2.1.1 / §10.3 step 7: a Contact `expires` parameter wins over Expires."""
    if (message.headers.get("Contact") or "").strip() == "*":
        contact_expires = None  # the wildcard, "remove all" (§10.2.2), has no parameters
    else:
        contacts = checked("Contact", lambda: message.contact)
        contact_expires = contacts[0].parameters.get("expires") if contacts else None
    if contact_expires is not None:
        return _delta_seconds(contact_expires, "Contact expires")
    return _delta_seconds(message.headers.get("Expires"), "Expires")


def parse_register_untrusted(request: Request) -> RegisterInfo:
    """What a REGISTER (from `parse_message_untrusted`) asks; raises only `MalformedError`."""
    if request.method != "REGISTER":
        raise MalformedError(f"{request.method[:20]} is not REGISTER")
    to = checked("To", lambda: request.to_address)
    return RegisterInfo(
        terminal_id=validate_terminal_id(to.uri.user),
        expires=_expires_of(request),
        vipa=_vipa_header(request),
    )


def build_register_ok(request: Request, *, vipa: str, expires: int, to_tag: str) -> Response:
    """`200 OK` with VIpAddr, Expires and the request's Contacts echoed with `expires`.

    RFC 3261 §10.3 step 8: the 200 lists the current bindings. A removal
    (expires 0) lists none. `request` must have passed `parse_register_untrusted`.
    """
    response = build_response(
        request,
        200,
        to_tag=to_tag,
        headers=[(VIPADDR_HEADER, vipa), ("Expires", str(expires))],
    )
    if expires > 0 and (request.headers.get("Contact") or "").strip() != "*":
        contacts = checked("Contact", lambda: request.contact)
        if contacts:
            response.contact = [
                Address(
                    uri=c.uri, name=c.name, parameters=c.parameters.replace(expires=str(expires))
                )
                for c in contacts
            ]
    return response


def parse_register_ok_untrusted(response: Response) -> tuple[str, int]:
    """(VIPA, granted expires) from the anchor's 200 to a REGISTER."""
    if response.code != 200:
        raise MalformedError(f"status {response.code} is not 200")
    if checked("CSeq", lambda: response.cseq.method) != "REGISTER":
        raise MalformedError("not a response to REGISTER")
    vipa = _vipa_header(response)
    if vipa is None:
        raise MalformedError(f"200 without {VIPADDR_HEADER}")
    expires = _expires_of(response)
    if expires is None:
        raise MalformedError("200 without Expires")
    return vipa, expires
