"""The client's anchors: the list and its order, the redirect rule, the options, the SRV look-up.

`AnchorSet` (pure), `ClientConfig.build` for `--anchor` repeated and
`--anchor-srv`, the anchor's `--max-terminals`/`--redirect-to`, the 302's
Contacts, and `lookup_anchors` over dnspython answers made in memory (no
DNS server: a resolver whose `resolve` answers from a table).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import pytest
from sipmessage import Response

from anchor_node.config import AnchorConfig
from ground.errors import ConfigError
from upmt_client.anchors import AnchorSet
from upmt_client.association import redirect_contacts
from upmt_client.config import ClientConfig
from upmt_client.resolver import MIN_TTL, DnsError, MarkedResolver, lookup_anchors
from upmt_client.routing import FWMARK

A, B, C = ("192.0.2.1", 5060), ("192.0.2.2", 5060), ("192.0.2.3", 5070)


def test_srv_first_then_the_configured_anchors_each_once() -> None:
    anchors = AnchorSet([A, B], srv=[C, A])
    assert [e.addr for e in anchors.entries] == [C, A, B]
    assert [e.origin for e in anchors.entries] == ["srv", "srv", "anchor"]
    assert anchors.current == C


def test_next_wraps_around_and_a_new_srv_answer_keeps_the_current_anchor() -> None:
    anchors = AnchorSet([A, B, C])
    assert (anchors.next_after(A), anchors.next_after(C)) == (B, A)
    anchors.switch(B, "stopped answering", 100.0)
    anchors.update_srv([C])  # B is not in the answer any more: still current until it fails
    assert anchors.current == B and anchors.listed(B)
    assert [e.addr for e in anchors.entries][:3] == [C, A, B]


def test_states_for_status() -> None:
    anchors = AnchorSet([A, B])
    anchors.mark_failed(A, "stopped answering", 1000.0)
    anchors.switch(B, "stopped answering", 1000.0)
    assert [(e["anchor"], e["state"], e["failed_at"]) for e in anchors.to_json()] == [
        ("192.0.2.1:5060", "failed", 1000.0),
        ("192.0.2.2:5060", "current", None),
    ]
    anchors.associated(A)
    assert anchors.to_json()[0]["state"] == "reserve"
    (change,) = anchors.changes
    assert change.to_json() == {
        "at": 1000.0,
        "from": "192.0.2.1:5060",
        "to": "192.0.2.2:5060",
        "reason": "stopped answering",
    }


def test_redirects_only_to_listed_anchors_or_known_keys() -> None:
    anchors = AnchorSet([A, B])
    assert anchors.may_follow(B, lambda _a: False)
    assert not anchors.may_follow(C, lambda _a: False)  # would be trust on first use
    assert anchors.may_follow(C, lambda a: a == C)  # pinned: C must prove that key
    anchors.switch(C, "redirected by 192.0.2.1:5060", 0.0)
    # Once there by a redirect, C does not become an anchor redirects may name freely.
    assert not anchors.may_follow(C, lambda _a: False)


def test_redirect_contacts() -> None:
    response = Response(302, "Moved Temporarily")
    response.headers.add("Contact", "<sip:198.51.100.3:5062>;q=0.9, <sip:198.51.100.4>")
    response.headers.add("Contact", "<sip:anchor.example.net>")  # not an address: skipped
    response.headers.add("Contact", "<sip:u@198.51.100.3:5062>")  # the same once
    assert redirect_contacts(response, 5060) == [("198.51.100.3", 5062), ("198.51.100.4", 5060)]


# -- options ---------------------------------------------------------------------------


def client(**overrides: Any) -> ClientConfig:
    args: dict[str, Any] = {
        "anchor": (),
        "sip_port": 5060,
        "tunnel_port": 1800,
        "terminal_id": "mh1",
        "interfaces": ("if0",),
        "control": Path("/tmp/c.sock"),
        "run_dir": Path("/tmp/run"),
        "tun_name": "upmt0",
        "probe_interval": 0.5,
        "dead_after": 4,
        "expires": 600,
    }
    args.update(overrides)
    return ClientConfig.build(**args)


def test_anchor_repeated_in_order() -> None:
    cfg = client(anchor=("198.51.100.2", "198.51.100.3:5070"))
    assert cfg.anchor_addrs == (("198.51.100.2", 5060), ("198.51.100.3", 5070))
    assert (cfg.anchor, cfg.sip_port) == ("198.51.100.2", 5060)


def test_anchor_srv_alone_or_with_anchors() -> None:
    cfg = client(anchor_srv="_upmt._udp.example.net.")
    assert cfg.anchor_srv == "_upmt._udp.example.net" and cfg.anchor_addrs == ()
    assert client(anchor=("198.51.100.2",), anchor_srv="_upmt._udp.example.net").anchor_addrs


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({}, "--anchor"),
        ({"anchor": ("198.51.100.2", "198.51.100.2:5060")}, "twice"),
        ({"anchor_srv": "example.net"}, "--anchor-srv"),
        ({"anchor_srv": "_upmt._sctp.example.net"}, "--anchor-srv"),
        ({"anchor_srv": "_upmt._udp.exa mple.net"}, "--anchor-srv"),
    ],
)
def test_bad_anchor_options(overrides: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        client(**overrides)


def anchor_config(**overrides: Any) -> AnchorConfig:
    args: dict[str, Any] = {
        "listen": "198.51.100.2",
        "sip_port": 5060,
        "tunnel_port": 1800,
        "pool": "100.64.0.0/10",
        "state": Path("/tmp/a.sqlite"),
        "control": Path("/tmp/a.sock"),
    }
    args.update(overrides)
    return AnchorConfig.build(**args)


def test_anchor_redirect_options() -> None:
    cfg = anchor_config(max_terminals=0, redirect_to=("198.51.100.3", "198.51.100.4:5070"))
    assert cfg.max_terminals == 0
    assert cfg.redirect_to == (("198.51.100.3", 5060), ("198.51.100.4", 5070))
    assert anchor_config().max_terminals is None
    with pytest.raises(ConfigError, match="itself"):
        anchor_config(redirect_to=("198.51.100.2:5060",))
    with pytest.raises(ConfigError, match="--redirect-to"):
        anchor_config(redirect_to=("anchor2.example.net",))


# -- the SRV look-up ---------------------------------------------------------------------

NAME = "_upmt._udp.example.net"
SRV_ANSWER = """id 1
opcode QUERY
rcode NOERROR
flags QR AA RD
;QUESTION
_upmt._udp.example.net. IN SRV
;ANSWER
_upmt._udp.example.net. 300 IN SRV 20 0 5070 an2.example.net.
_upmt._udp.example.net. 300 IN SRV 10 60 5060 an1.example.net.
;AUTHORITY
;ADDITIONAL
an1.example.net. 120 IN A 198.51.100.2
"""
A_ANSWER = """id 2
opcode QUERY
rcode NOERROR
flags QR AA RD
;QUESTION
an2.example.net. IN A
;ANSWER
an2.example.net. 600 IN A 198.51.100.3
an2.example.net. 600 IN A 198.51.100.4
"""


class TableResolver(dns.resolver.Resolver):
    """Answers from messages given as text; anything else does not exist."""

    def __init__(self, answers: dict[tuple[str, str], str]) -> None:
        super().__init__(configure=False)
        self.answers = answers
        self.asked: list[tuple[str, str]] = []

    def resolve(self, qname: Any, rdtype: Any = "A", *args: Any, **kwargs: Any) -> Any:
        key = (str(qname), str(rdtype))
        self.asked.append(key)
        if key not in self.answers:
            raise dns.resolver.NXDOMAIN
        message = dns.message.from_text(self.answers[key])
        assert isinstance(message, dns.message.QueryMessage)
        return dns.resolver.Answer(
            dns.name.from_text(key[0]),
            dns.rdatatype.from_text(key[1]),
            dns.rdataclass.IN,
            message,
        )


def test_lookup_orders_by_priority_uses_glue_and_asks_for_the_rest() -> None:
    resolver = TableResolver({(NAME, "SRV"): SRV_ANSWER, ("an2.example.net", "A"): A_ANSWER})
    answer = lookup_anchors(NAME, random.Random(0), resolver=resolver)
    assert answer.anchors == [
        ("198.51.100.2", 5060),  # priority 10, its address from the additional section
        ("198.51.100.3", 5070),  # priority 20, looked up
        ("198.51.100.4", 5070),
    ]
    assert ("an1.example.net", "A") not in resolver.asked
    assert answer.ttl == 120.0  # the smallest TTL of what it used


def test_lookup_failures_are_one_line() -> None:
    with pytest.raises(DnsError, match="no such name"):
        lookup_anchors(NAME, random.Random(0), resolver=TableResolver({}))
    only_srv = TableResolver({(NAME, "SRV"): SRV_ANSWER.replace("an1.example.net. 120 IN A", ";")})
    with pytest.raises(DnsError, match="no anchor address"):
        lookup_anchors(NAME, random.Random(0), resolver=only_srv)


def test_a_short_ttl_is_raised_to_the_floor() -> None:
    resolver = TableResolver(
        {(NAME, "SRV"): SRV_ANSWER.replace(" 300 IN", " 0 IN"), ("an2.example.net", "A"): A_ANSWER}
    )
    assert lookup_anchors(NAME, random.Random(0), resolver=resolver).ttl == MIN_TTL


def test_status_text_names_the_anchors_and_the_last_change() -> None:
    from upmt_client.cli import anchor_lines

    anchors = AnchorSet([A, B])
    anchors.mark_failed(A, "stopped answering", 1000.0)
    anchors.switch(B, "stopped answering", 1000.0)
    lines = anchor_lines(
        {"anchors": anchors.to_json(), "anchor_changes": [c.to_json() for c in anchors.changes]}
    )
    assert lines[0].startswith("anchors 192.0.2.1:5060 (failed ")
    assert lines[0].endswith(", 192.0.2.2:5060 (current)")
    assert "192.0.2.1:5060 -> 192.0.2.2:5060 (stopped answering)" in lines[1]
    assert anchor_lines({"anchors": AnchorSet([A]).to_json(), "anchor_changes": []}) == []


async def test_the_daemon_starts_from_the_srv_answer_or_falls_back_to_its_anchors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ground.errors import SetupError
    from upmt_client import daemon
    from upmt_client.resolver import AnchorAnswer

    answers: list[AnchorAnswer | DnsError] = [AnchorAnswer([C, A], 120.0)]

    def lookup(name: str, rng: random.Random, *, resolver: object) -> AnchorAnswer:
        assert isinstance(resolver, MarkedResolver) and resolver.mark == FWMARK  # not via the TUN
        answer = answers.pop(0)
        if isinstance(answer, DnsError):
            raise answer
        return answer

    monkeypatch.setattr(daemon, "lookup_anchors", lookup)
    srv = daemon.ClientDaemon(client(anchor_srv=NAME))
    assert await srv._first_srv() == [C, A] and srv._srv_ttl == 120.0
    answers.append(DnsError(f"--anchor-srv {NAME}: no such name"))
    with pytest.raises(SetupError, match="no anchor to associate with"):
        await srv._first_srv()
    answers.append(DnsError(f"--anchor-srv {NAME}: no such name"))
    both = daemon.ClientDaemon(client(anchor=("192.0.2.1",), anchor_srv=NAME))
    assert await both._first_srv() == []  # DNS failed: the --anchor list alone
    assert await daemon.ClientDaemon(client(anchor=("192.0.2.1",)))._first_srv() == []
