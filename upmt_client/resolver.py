"""DNS look-ups of the anchors' SRV name, by dnspython (blocking: run in a worker thread).

`lookup_anchors` asks for the SRV records of `--anchor-srv` (RFC 2782), puts
them in the order to try them (`upmt_client.srv.order_srv`), and gives
every target's IPv4 addresses with the record's port: the addresses from the
answer's additional section when the server sent them, else an A query of
their own. It also says how long the answer may be kept (the smallest TTL,
within `MIN_TTL` and `MAX_TTL`), after which the daemon asks again, as it
does on every failover.

The daemon's queries go from sockets with the client's mark (`MarkedResolver`):
an unmarked socket of the client would be routed into its own TUN (the rule
`not fwmark MARK lookup TABLE`) and its answer never come, once the TUN is up.
"""

from __future__ import annotations

import random
import socket
import time
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver

from ground.constants import Addr
from ground.errors import UpmtError
from upmt_client.srv import SrvRecord, order_srv

__all__ = ["MAX_TTL", "MIN_TTL", "AnchorAnswer", "DnsError", "MarkedResolver", "lookup_anchors"]

MIN_TTL = 30.0  # not more often than this, whatever the zone says (TTL 0 included)
MAX_TTL = 3600.0
LIFETIME = 5.0  # seconds one look-up may take, retries included


class DnsError(UpmtError):
    """The SRV name could not be resolved (one line: the name and why)."""


@dataclass(frozen=True)
class AnchorAnswer:
    anchors: list[Addr]  # SIP addresses in the order to try them
    ttl: float


def lookup_anchors(
    name: str,
    rng: random.Random,
    *,
    resolver: dns.resolver.Resolver | None = None,
) -> AnchorAnswer:
    """The anchors `name` lists, in RFC 2782 order; `DnsError` if there are none."""
    resolver = resolver or dns.resolver.Resolver()
    try:
        answer = resolver.resolve(name, "SRV", lifetime=LIFETIME)
    except (dns.exception.DNSException, OSError) as exc:
        raise DnsError(f"--anchor-srv {name}: {_why(exc)}") from None
    rrset = answer.rrset
    if rrset is None:
        raise DnsError(f"--anchor-srv {name}: no SRV records")
    ttls = [float(rrset.ttl)]
    records = [
        SrvRecord(int(r.priority), int(r.weight), int(r.port), _text(r.target)) for r in rrset
    ]
    glue: dict[str, list[str]] = {}
    for extra in answer.response.additional:
        if extra.rdtype == dns.rdatatype.A:
            glue.setdefault(_text(extra.name), []).extend(r.address for r in extra)
            ttls.append(float(extra.ttl))
    anchors: list[Addr] = []
    failures: list[str] = []
    for record in order_srv(records, rng):
        addresses = glue.get(record.target)
        if addresses is None:
            try:
                found = resolver.resolve(record.target, "A", lifetime=LIFETIME)
            except (dns.exception.DNSException, OSError) as exc:
                failures.append(f"{record.target}: {_why(exc)}")
                continue
            addresses = [r.address for r in found]
            if found.rrset is not None:
                ttls.append(float(found.rrset.ttl))
        for address in addresses:
            if (address, record.port) not in anchors:
                anchors.append((address, record.port))
    if not anchors:
        why = "; ".join(failures) or "the service is not offered there (target '.')"
        raise DnsError(f"--anchor-srv {name}: no anchor address ({why})")
    return AnchorAnswer(anchors, min(max(min(ttls), MIN_TTL), MAX_TTL))


class MarkedResolver(dns.resolver.Resolver):
    """The system's DNS servers (resolv.conf), asked from sockets that carry `mark`.

    Names are taken as absolute (an SRV name is one); a truncated UDP answer
    is asked again over TCP, from a marked socket too. The servers are tried
    in turn within `lifetime`.
    """

    def __init__(self, mark: int) -> None:
        super().__init__()
        self.mark = mark

    def resolve(
        self,
        qname: dns.name.Name | str,
        rdtype: dns.rdatatype.RdataType | str = dns.rdatatype.A,
        rdclass: dns.rdataclass.RdataClass | str = dns.rdataclass.IN,
        tcp: bool = False,
        source: str | None = None,
        raise_on_no_answer: bool = True,
        source_port: int = 0,
        lifetime: float | None = None,
        search: bool | None = None,
    ) -> dns.resolver.Answer:
        name = dns.name.from_text(qname) if isinstance(qname, str) else qname
        kind = dns.rdatatype.RdataType.make(rdtype)
        query = dns.message.make_query(name, kind)
        deadline = time.monotonic() + (lifetime or LIFETIME)
        errors: list[tuple[str, bool, int, Exception | str, dns.message.Message | None]] = []
        for server in self.nameservers:
            where = str(server)
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                response = self._ask(query, where, left)
            except (dns.exception.DNSException, OSError) as exc:
                errors.append((where, False, 53, exc, None))
                continue
            if response.rcode() == dns.rcode.NXDOMAIN:
                raise dns.resolver.NXDOMAIN(qnames=[name], responses={name: response})  # type: ignore[no-untyped-call]
            if response.rcode() != dns.rcode.NOERROR:
                errors.append((where, False, 53, dns.rcode.to_text(response.rcode()), response))
                continue
            return dns.resolver.Answer(name, kind, dns.rdataclass.IN, response, where, 53)
        if errors and len(errors) == len(self.nameservers):
            if all(isinstance(e[3], dns.exception.Timeout) for e in errors):
                raise dns.resolver.LifetimeTimeout(timeout=lifetime or LIFETIME, errors=errors)  # type: ignore[no-untyped-call]
            raise dns.resolver.NoNameservers(request=query, errors=errors)  # type: ignore[no-untyped-call]
        raise dns.resolver.LifetimeTimeout(timeout=lifetime or LIFETIME, errors=errors)  # type: ignore[no-untyped-call]

    def _ask(
        self, query: dns.message.Message, where: str, timeout: float
    ) -> dns.message.QueryMessage:
        family = socket.AF_INET6 if ":" in where else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as udp:
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
            response = dns.query.udp(query, where, timeout=timeout, sock=udp)
        if not response.flags & dns.flags.TC:
            assert isinstance(response, dns.message.QueryMessage)
            return response
        with socket.socket(family, socket.SOCK_STREAM) as stream:
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
            stream.settimeout(timeout)
            stream.connect((where, 53))
            response = dns.query.tcp(query, where, timeout=timeout, sock=stream)
            assert isinstance(response, dns.message.QueryMessage)
            return response


def _text(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True)


def _why(exc: BaseException) -> str:
    if isinstance(exc, dns.resolver.NXDOMAIN):
        return "no such name"
    if isinstance(exc, dns.resolver.NoAnswer):
        return "no records of that type"
    if isinstance(exc, dns.resolver.LifetimeTimeout):
        return "no answer from the DNS servers"
    if isinstance(exc, dns.resolver.NoNameservers):
        return "every DNS server failed"
    return str(exc) or type(exc).__name__
