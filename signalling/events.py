"""Events out of the transaction layer, and the keys that name transactions.

All are frozen, slotted values. A daemon dispatches on the event type with a
`{EventType: handler}` table. The keys are opaque to it: it passes a
`ServerKey` back to `TransactionLayer.send_response` and matches a
`ClientKey` against what `TransactionLayer.send_request` returned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, TypeAlias

from sipmessage import Request, Response

from ground.constants import Addr

__all__ = [
    "Addr",
    "ClientKey",
    "Event",
    "RequestReceived",
    "ResponseReceived",
    "ServerKey",
    "TransactionKey",
    "TransactionTerminated",
    "TransactionTimedOut",
]


class ClientKey(NamedTuple):
    """A client transaction, matched per RFC 3261 §17.1.3: top Via branch and CSeq method."""

    branch: str
    method: str


class ServerKey(NamedTuple):
    """A server transaction, matched per RFC 3261 §17.2.3: branch, sent-by and method."""

    branch: str
    sent_by_host: str
    sent_by_port: int | None
    method: str


TransactionKey: TypeAlias = ClientKey | ServerKey


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """A new request (not a retransmission); answer it with `send_response(key, …)`."""

    key: ServerKey
    request: Request
    addr: Addr


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    """A provisional response, or the final one (delivered once) of a client transaction."""

    key: ClientKey
    response: Response


@dataclass(frozen=True, slots=True)
class TransactionTimedOut:
    """Timer F fired (RFC 3261 §17.1.2.2): no final response within 64·T1."""

    key: ClientKey


@dataclass(frozen=True, slots=True)
class TransactionTerminated:
    """The transaction reached Terminated and can be forgotten.

    Emitted by single transactions; `TransactionLayer` consumes it itself.
    """

    key: TransactionKey


Event: TypeAlias = RequestReceived | ResponseReceived | TransactionTimedOut | TransactionTerminated
