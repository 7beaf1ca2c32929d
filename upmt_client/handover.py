"""HandoverRequests that the anchor will take: split by its moves cap and by datagram size (pure).

The anchor acts on at most `MAX_MOVES` flows per HandoverRequest (more is a
`400`), and no SIP message may exceed what a datagram carries
(`signalling.message.MAX_MESSAGE_SIZE`). A handover of many flows therefore
goes as several requests: chunks of `MAX_MOVES`, each halved until it
serializes. One flow always fits.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from sipmessage import Request

from paft.flow import FiveTuple, proto_name
from signalling.bodies import FlowMove, HandoverRequest, StructuredMatch, encode_body
from signalling.message import MessageTooLarge, serialize

__all__ = ["MAX_MOVES", "flow_moves", "handover_requests"]

# The anchor's cap (anchor_node.registrar.MAX_MOVES).
MAX_MOVES = 64


def flow_moves(keys: list[FiveTuple], twin_id: str | None = None) -> tuple[FlowMove, ...]:
    """One move per flow, matched by protocol, ports and destination (the source is ours).

    With `twin_id` the flows are redundant on that tunnel too.
    """
    return tuple(
        FlowMove(
            match=StructuredMatch(
                proto=proto_name(k.proto),
                src=None,
                sport=k.sport,
                dst=_text(k.dst),
                dport=k.dport,
            ),
            tunnel_id=None,
            redundant_with=twin_id,
        )
        for k in keys
    )


def handover_requests(
    keys: list[FiveTuple],
    build: Callable[[bytes], Request],
    max_moves: int = MAX_MOVES,
    *,
    twin_id: str | None = None,
) -> list[Request]:
    """The requests announcing `keys` (`build` makes a signed MESSAGE of a JSON body)."""
    pending = [keys[at : at + max_moves] for at in range(0, len(keys), max_moves)] or [[]]
    out: list[Request] = []
    while pending:
        chunk = pending.pop(0)
        request = build(encode_body(HandoverRequest(flows=flow_moves(chunk, twin_id))))
        try:
            serialize(request)
        except MessageTooLarge:
            if len(chunk) <= 1:
                raise
            half = len(chunk) // 2
            pending[:0] = [chunk[:half], chunk[half:]]
            continue
        out.append(request)
    return out


def _text(packed: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if len(packed) == 4 else socket.AF_INET6, packed)
