"""DNS look-ups of the anchors' SRV name, by dnspython (blocking: run in a worker thread).

`lookup_anchors` asks for the SRV records of `--anchor-srv` (RFC 2782), puts
them in the order to try them (`upmt_client.srv.order_srv`), and gives
every target's IPv4 addresses with the record's port: the addresses from the
answer's additional section when the server sent them, else an A query of
their own. It also says how long the answer may be kept (the smallest TTL,
within `MIN_TTL` and `MAX_TTL`), after which the daemon asks again, as it
does on every failover.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from ground.constants import Addr
from ground.errors import UpmtError
from upmt_client.srv import SrvRecord, order_srv

__all__ = ["MAX_TTL", "MIN_TTL", "AnchorAnswer", "DnsError", "lookup_anchors"]

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
