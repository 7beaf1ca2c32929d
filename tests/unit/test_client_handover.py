"""HandoverRequests split by the anchor's moves cap and by what a datagram holds."""

from __future__ import annotations

import socket

import pytest
from sipmessage import Request

from paft.flow import FiveTuple
from signalling.bodies import HandoverRequest, decode_body_untrusted
from signalling.message import MAX_MESSAGE_SIZE, MessageTooLarge, build_request, serialize
from signalling.tunnelauth import sign
from upmt_client.announce import Announcer
from upmt_client.flows import FlowBook
from upmt_client.handover import MAX_MOVES, handover_requests
from upmt_client.transactions import ClientTransactions
from upmt_client.tunnels import tunnel_channel

VIPA = socket.inet_aton("100.64.0.2")


def key(i: int) -> FiveTuple:
    dst = socket.inet_aton(f"203.0.{i // 250}.{i % 250 + 1}")
    return FiveTuple(6, VIPA, 10000 + i, dst, 443)


def build(body: bytes) -> Request:
    request = build_request(
        "MESSAGE",
        "sip:198.51.100.2",
        via_host="192.0.2.2",
        via_port=40000,
        branch="z9hG4bKabc",
        from_uri="sip:laptop@198.51.100.2",
        from_tag="t",
        to_uri="sip:laptop@198.51.100.2",
        call_id="c",
        cseq=1,
        body=body,
        content_type="application/json",
    )
    sign(request, bytes(32), now=1e9, seq=1)
    return request


def flows_of(request: Request) -> int:
    body = decode_body_untrusted(request.body)
    assert isinstance(body, HandoverRequest)
    return len(body.flows)


@pytest.mark.parametrize("count", [0, 1, 63, 64, 65, 90, 600])
def test_every_flow_is_announced_within_the_cap_and_the_size(count: int) -> None:
    requests = handover_requests([key(i) for i in range(count)], build)
    assert sum(flows_of(r) for r in requests) == count
    for request in requests:
        assert flows_of(request) <= MAX_MOVES
        assert len(serialize(request)) <= MAX_MESSAGE_SIZE


def test_chunks_that_do_not_fit_are_halved() -> None:
    # Each move here is about 90 bytes: 64 of them exceed what fits with a small limit.
    requests = handover_requests([key(i) for i in range(64)], build, max_moves=64)
    assert all(len(serialize(r)) <= MAX_MESSAGE_SIZE for r in requests)
    padded = [key(i) for i in range(64)]

    def fat(body: bytes) -> Request:
        request = build(body)
        request.headers.set("X-Pad", "p" * 4000)
        return request

    split = handover_requests(padded, fat)
    assert len(split) > 1 and sum(flows_of(r) for r in split) == 64
    assert all(len(serialize(r)) <= MAX_MESSAGE_SIZE for r in split)


def test_a_single_move_that_cannot_fit_is_an_error_not_a_loop() -> None:
    def hopeless(body: bytes) -> Request:
        request = build(body)
        request.headers.set("X-Pad", "p" * 9000)
        return request

    with pytest.raises(MessageTooLarge):
        handover_requests([key(1)], hopeless)


def test_a_twin_the_anchor_never_heard_of_is_told_again() -> None:
    book, transactions = FlowBook(), ClientTransactions()
    transactions.open(tunnel_channel("if0"))
    announcer = Announcer(transactions, book, ("198.51.100.2", 1800))
    flows = [key(1), key(2)]
    announcer.announce_move("if0", flows, build, 0.0, 0, "if1", "203.0.113.11:40000")
    body = decode_body_untrusted(transactions.datagrams_to_send()[0][1].split(b"\r\n\r\n", 1)[1])
    assert isinstance(body, HandoverRequest)
    assert {m.redundant_with for m in body.flows} == {"203.0.113.11:40000"}
    assert book.twins == {flows[0]: "if1", flows[1]: "if1"}  # what the anchor is told
    transactions.close(tunnel_channel("if0"), 1.0)  # the request dies unanswered
    assert book.twins == {}  # so the next re-evaluation announces the pair again
