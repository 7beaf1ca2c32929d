"""SIP message framing on top of `sipmessage`: untrusted parsing, building, serializing.

`sipmessage` does the header grammar (Via, CSeq, addresses, URIs); this module
covers what it leaves out for a datagram receiver facing the network:

* a size cap, and `Content-Length` honoured (the body is cut to it; a declared
  length beyond the datagram is malformed), RFC 3261 §18.3 / §20.14;
* header folding (RFC 3261 §7.3.1), whitespace before the colon, strict UTF-8
  and no control characters in the head;
* the mandatory headers of RFC 3261 §8.1.1 (Via with an RFC 3261 branch, From,
  To, Call-ID, CSeq whose method equals the request method), each singleton
  header present once;
* every `sipmessage` accessor wrapped, so the only exception that escapes
  `parse_message_untrusted` is `MalformedError`;
* a serializer that always writes a correct `Content-Length`.

After `parse_message_untrusted` returns, the typed accessors `via`, `cseq`,
`call_id`, `from_address` and `to_address` of the message are known to work.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Sequence
from typing import Final, TypeVar

from sipmessage import URI, Address, Parameters, Request, Response, Via
from sipmessage.message import COMPACT_FORMS

from ground.errors import MalformedError

__all__ = [
    "BRANCH_MAGIC_COOKIE",
    "MAX_CSEQ",
    "MAX_MESSAGE_SIZE",
    "REASON_PHRASES",
    "MessageTooLarge",
    "build_request",
    "build_response",
    "checked",
    "new_branch",
    "new_call_id",
    "new_tag",
    "parse_message_untrusted",
    "reason_phrase",
    "serialize",
    "top_branch",
    "uri_host",
]

# A SIP datagram larger than this is refused unread. RFC 3261 §18.1.1 asks for
# messages near the path MTU over UDP; UPMT's messages are well under 2 KiB,
# and the cap bounds every allocation and regular-expression run below.
MAX_MESSAGE_SIZE: Final = 8192

# RFC 3261 §8.1.1.7: branches of RFC 3261 clients start with this cookie. Only
# such branches are accepted: the RFC 2543 matching rules (§17.2.3, last
# paragraph) are not implemented, and no UPMT peer needs them.
BRANCH_MAGIC_COOKIE: Final = "z9hG4bK"

# RFC 3261 §8.1.1.5: the CSeq sequence number MUST be less than 2**31.
MAX_CSEQ: Final = 2**31 - 1

# RFC 3261 §8.1.1.6: the recommended initial Max-Forwards.
DEFAULT_MAX_FORWARDS: Final = 70

# RFC 3261 §20: headers that may appear only once. A second copy makes the
# message ambiguous (which Call-ID? which length?), so it is malformed.
_SINGLETON_HEADERS: Final = (
    "Call-ID",
    "Content-Length",
    "Content-Type",
    "CSeq",
    "Expires",
    "From",
    "Max-Forwards",
    "To",
)

# RFC 3261 §21: reason phrases of the status codes.
REASON_PHRASES: Final[dict[int, str]] = {
    100: "Trying",
    180: "Ringing",
    181: "Call Is Being Forwarded",
    182: "Queued",
    183: "Session Progress",
    200: "OK",
    202: "Accepted",
    300: "Multiple Choices",
    301: "Moved Permanently",
    302: "Moved Temporarily",
    305: "Use Proxy",
    380: "Alternative Service",
    400: "Bad Request",
    401: "Unauthorized",
    402: "Payment Required",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    410: "Gone",
    413: "Request Entity Too Large",
    414: "Request-URI Too Long",
    415: "Unsupported Media Type",
    416: "Unsupported URI Scheme",
    420: "Bad Extension",
    421: "Extension Required",
    423: "Interval Too Brief",
    480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist",
    482: "Loop Detected",
    483: "Too Many Hops",
    484: "Address Incomplete",
    485: "Ambiguous",
    486: "Busy Here",
    487: "Request Terminated",
    488: "Not Acceptable Here",
    491: "Request Pending",
    493: "Undecipherable",
    500: "Server Internal Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Server Time-out",
    505: "Version Not Supported",
    513: "Message Too Large",
    600: "Busy Everywhere",
    603: "Decline",
    604: "Does Not Exist Anywhere",
    606: "Not Acceptable",
}

# RFC 3261 §25.1: token, method = token, Request-Line and Status-Line.
_TOKEN: Final = r"[A-Za-z0-9\-.!%*_+`'~]+"
_TOKEN_RE: Final = re.compile(_TOKEN)
_REQUEST_LINE_RE: Final = re.compile(rf"({_TOKEN}) (\S+) SIP/2\.0")
_STATUS_LINE_RE: Final = re.compile(r"SIP/2\.0 ([1-6][0-9]{2}) ([^\x00-\x08\x0a-\x1f\x7f]*)")
# Control characters other than HTAB may not appear in a header (RFC 3261
# §25.1, TEXT-UTF8char and LWS); refusing them also refuses bare CR and LF.
_CONTROL_RE: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# ASCII digits only: `str.isdigit` and `\d` accept other scripts' digits.
_CONTENT_LENGTH_RE: Final = re.compile(r"[0-9]{1,10}")
_CSEQ_NUMBER_RE: Final = re.compile(r"[0-9]{1,10}(?=[ \t])")
_MAX_FORWARDS_RE: Final = re.compile(r"[0-9]{1,3}")
_EXPIRES_RE: Final = re.compile(r"[0-9]{1,10}")
# RFC 3261 §25.1: callid = word ["@" word]; no whitespace at least.
_CALL_ID_RE: Final = re.compile(r"[^\s]{1,256}")

# What sipmessage raises on input it does not like (ValueError covers
# UnicodeDecodeError); anything else would be a bug there, and it is better
# seen than swallowed.
_SIPMESSAGE_ERRORS: Final = (ValueError, KeyError, IndexError, TypeError)

_T = TypeVar("_T")


class MessageTooLarge(ValueError):
    """`serialize` would write more than `MAX_MESSAGE_SIZE` bytes.

    A `ValueError` like every other refusal of the serializer, but its own
    type: an answer that grew too large (a request with many Via headers, say)
    is something the sender of a response must expect and handle, not a bug.
    """


def checked(what: str, getter: Callable[[], _T]) -> _T:
    """Call a sipmessage accessor, turning its exceptions into `MalformedError`."""
    try:
        return getter()
    except _SIPMESSAGE_ERRORS as exc:
        raise MalformedError(f"bad {what}") from exc


def parse_message_untrusted(data: bytes) -> Request | Response:
    """Parse one SIP message received in a datagram.

    Returns a `sipmessage.Request` or `sipmessage.Response` whose body is cut to
    `Content-Length` (or is the rest of the datagram when it is absent, RFC 3261
    §18.3). Raises `MalformedError` (with the reason) and nothing else.
    """
    if len(data) > MAX_MESSAGE_SIZE:
        raise MalformedError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_SIZE}")
    # RFC 3261 §7.5: CRLFs before the start line are ignored (keep-alives).
    data = bytes(data).lstrip(b"\r\n")
    head, separator, rest = data.partition(b"\r\n\r\n")
    if not separator:
        raise MalformedError("no empty line after the headers")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedError("headers are not UTF-8") from exc
    lines = text.split("\r\n")
    message = _parse_start_line(lines[0])
    for name, value in _header_fields(lines[1:]):
        message.headers.add(name, value)
    message.body = _framed_body(message, rest)
    _check_mandatory(message)
    return message


def _parse_start_line(line: str) -> Request | Response:
    if match := _REQUEST_LINE_RE.fullmatch(line):
        method, uri_text = match.group(1), match.group(2)
        uri = checked("Request-URI", lambda: URI.parse(uri_text))
        return Request(method=method, uri=uri)
    if match := _STATUS_LINE_RE.fullmatch(line):
        return Response(code=int(match.group(1)), phrase=match.group(2))
    raise MalformedError("start line is neither a SIP/2.0 request nor a response")


def _header_fields(lines: Sequence[str]) -> list[tuple[str, str]]:
    """Unfold the header lines and split them into (long name, value) pairs."""
    folded: list[str] = []
    for line in lines:
        if line[:1] in (" ", "\t"):
            # RFC 3261 §7.3.1: a line starting with whitespace continues the
            # previous header; the fold is equivalent to one space.
            if not folded:
                raise MalformedError("continuation line before the first header")
            folded[-1] = folded[-1] + " " + line.strip(" \t")
        else:
            folded.append(line)
    fields: list[tuple[str, str]] = []
    for line in folded:
        if _CONTROL_RE.search(line):
            raise MalformedError("control character in a header")
        name, colon, value = line.partition(":")
        if not colon:
            raise MalformedError("header line without a colon")
        # RFC 3261 §25.1 HCOLON allows whitespace before the colon.
        name = name.rstrip(" \t")
        if not _TOKEN_RE.fullmatch(name):
            raise MalformedError("bad header name")
        fields.append((COMPACT_FORMS.get(name.lower(), name), value.strip(" \t")))
    return fields


def _framed_body(message: Request | Response, rest: bytes) -> bytes:
    lengths = message.headers.getlist("Content-Length")
    if not lengths:
        return rest
    if len(lengths) > 1:
        raise MalformedError("more than one Content-Length")
    if not _CONTENT_LENGTH_RE.fullmatch(lengths[0]):
        raise MalformedError("Content-Length is not a number")
    length = int(lengths[0])
    if length > len(rest):
        raise MalformedError(f"Content-Length {length} beyond the {len(rest)} bytes received")
    return rest[:length]


def _check_mandatory(message: Request | Response) -> None:
    for name in _SINGLETON_HEADERS:
        if len(message.headers.getlist(name)) > 1:
            raise MalformedError(f"more than one {name}")

    vias = checked("Via", lambda: message.via)
    if not vias:
        raise MalformedError("no Via")
    top = vias[0]
    if top.port is not None and not 0 < top.port <= 0xFFFF:
        raise MalformedError("Via port out of range")
    branch = top.parameters.get("branch")
    if not branch or not branch.startswith(BRANCH_MAGIC_COOKIE):
        raise MalformedError("top Via has no RFC 3261 branch")

    for name in ("From", "To"):
        if message.headers.get(name) is None:
            raise MalformedError(f"no {name}")
    checked("From", lambda: message.from_address)
    checked("To", lambda: message.to_address)

    call_id = message.headers.get("Call-ID")
    if call_id is None:
        raise MalformedError("no Call-ID")
    if not _CALL_ID_RE.fullmatch(call_id):
        raise MalformedError("bad Call-ID")

    raw_cseq = message.headers.get("CSeq")
    if raw_cseq is None:
        raise MalformedError("no CSeq")
    if not _CSEQ_NUMBER_RE.match(raw_cseq):
        raise MalformedError("CSeq number is not a number")
    cseq = checked("CSeq", lambda: message.cseq)
    if cseq.sequence > MAX_CSEQ:
        raise MalformedError("CSeq number out of range")
    if isinstance(message, Request) and cseq.method != message.method:
        raise MalformedError("CSeq method differs from the request method")

    max_forwards = message.headers.get("Max-Forwards")
    if max_forwards is not None and not (
        _MAX_FORWARDS_RE.fullmatch(max_forwards) and int(max_forwards) <= 255
    ):
        raise MalformedError("bad Max-Forwards")
    expires = message.headers.get("Expires")
    if expires is not None and not _EXPIRES_RE.fullmatch(expires):
        raise MalformedError("bad Expires")


def top_branch(message: Request | Response) -> str:
    """The branch of the top Via of a message that went through the parser or builder."""
    branch = checked("Via", lambda: message.via[0].parameters.get("branch"))
    if not branch:
        raise MalformedError("top Via has no branch")
    return branch


def new_branch() -> str:
    """A fresh RFC 3261 branch (§8.1.1.7): the magic cookie and 64 random bits."""
    return BRANCH_MAGIC_COOKIE + secrets.token_hex(8)


def new_tag() -> str:
    """A fresh From/To tag (RFC 3261 §19.3 asks for at least 32 random bits)."""
    return secrets.token_hex(8)


def new_call_id() -> str:
    """A fresh Call-ID (RFC 3261 §8.1.1.4: globally unique; 128 random bits)."""
    return secrets.token_hex(16)


def reason_phrase(code: int) -> str:
    """The RFC 3261 §21 phrase of `code`, or a generic one for its class."""
    phrase = REASON_PHRASES.get(code)
    if phrase is not None:
        return phrase
    return REASON_PHRASES.get(code // 100 * 100, "Unknown")


def uri_host(host: str) -> str:
    """`host` as it appears in a SIP URI or Via: IPv6 addresses in brackets."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]"
    return host


def build_request(
    method: str,
    uri: str | URI,
    *,
    via_host: str,
    via_port: int,
    branch: str,
    from_uri: str,
    from_tag: str,
    to_uri: str,
    call_id: str,
    cseq: int,
    contact: str | None = None,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    content_type: str | None = None,
    max_forwards: int = DEFAULT_MAX_FORWARDS,
) -> Request:
    """A request with the headers of RFC 3261 §8.1.1, in the usual order.

    The Via names UDP and carries `rport` (RFC 3581), so that an anchor behind
    which the terminal is NATed answers to the observed source port. Bad
    arguments (URIs that do not parse) raise `ValueError`: they are local bugs,
    not network input.
    """
    request = Request(method, URI.parse(uri) if isinstance(uri, str) else uri, body)
    request.via = [
        Via(
            transport="UDP",
            host=uri_host(via_host),
            port=via_port,
            parameters=Parameters(branch=branch, rport=None),
        )
    ]
    request.headers.set("Max-Forwards", str(max_forwards))
    request.from_address = Address(uri=URI.parse(from_uri), parameters=Parameters(tag=from_tag))
    request.to_address = Address(uri=URI.parse(to_uri))
    request.headers.set("Call-ID", call_id)
    request.headers.set("CSeq", f"{cseq} {method}")
    if contact is not None:
        request.contact = [Address(uri=URI.parse(contact))]
    for name, value in headers:
        request.headers.add(name, value)
    if content_type is not None:
        request.headers.set("Content-Type", content_type)
    return request


def build_response(
    request: Request,
    code: int,
    reason: str | None = None,
    *,
    to_tag: str | None = None,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    content_type: str | None = None,
) -> Response:
    """A response to `request` following RFC 3261 §8.2.6.

    Via (all values, in order), From, Call-ID and CSeq are copied; To is copied
    and, except on a 100, given `to_tag` (a fresh one when None) if it has no
    tag yet (§8.2.6.2). A 100 also echoes Timestamp (§8.2.6.1). `request` must
    come from `parse_message_untrusted` or `build_request`.
    """
    if not 100 <= code <= 699:
        raise ValueError(f"status code {code} out of 100..699")
    response = Response(code, reason_phrase(code) if reason is None else reason, body)
    to = request.headers["To"]
    if code > 100:
        address = request.to_address
        if "tag" not in address.parameters:
            tag = to_tag if to_tag is not None else new_tag()
            to = str(
                Address(
                    uri=address.uri,
                    name=address.name,
                    parameters=address.parameters.replace(tag=tag),
                )
            )
    response.headers.setlist("Via", list(request.headers.getlist("Via")))
    response.headers.set("From", request.headers["From"])
    response.headers.set("To", to)
    response.headers.set("Call-ID", request.headers["Call-ID"])
    response.headers.set("CSeq", request.headers["CSeq"])
    if code == 100 and (timestamp := request.headers.get("Timestamp")) is not None:
        response.headers.set("Timestamp", timestamp)
    for name, value in headers:
        response.headers.add(name, value)
    if content_type is not None:
        response.headers.set("Content-Type", content_type)
    return response


def serialize(message: Request | Response) -> bytes:
    """The wire form of `message`, with a `Content-Length` equal to the body length.

    Raises `ValueError` if a header carries CR, LF or another control character
    (it would inject headers), and its subclass `MessageTooLarge` if the result
    exceeds `MAX_MESSAGE_SIZE`, which the peer's parser would refuse.
    """
    if isinstance(message, Request):
        lines = [f"{message.method} {message.uri} SIP/2.0"]
    else:
        lines = [f"SIP/2.0 {message.code} {message.phrase}"]
    # sipmessage's Headers is not iterable; keys() lists each name once.
    names = message.headers.keys()
    for name in names:
        if name.lower() in ("content-length", "l"):
            continue
        for value in message.headers.getlist(name):
            lines.append(f"{name}: {value}")
    lines.append(f"Content-Length: {len(message.body)}")
    for line in lines:
        if _CONTROL_RE.search(line):
            raise ValueError(f"control character in {line[:40]!r}")
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + message.body
    if len(data) > MAX_MESSAGE_SIZE:
        raise MessageTooLarge(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_SIZE}")
    return data
