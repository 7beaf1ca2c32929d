"""What the client core (`MobileHost`) asks of its driver: sockets, addresses, datagrams.

The core does no I/O. The driver reads `next_event()` after every call into
the core and acts: opens or closes a socket and says how that went, changes
the TUN's address, remembers a learned anchor key, hands a flow to the
classifier again, looks the anchors' SRV name up again, or stops with an
error. Datagrams come out of
`datagrams_to_send()` ready for the wire (tunnel frames already sealed).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TypeAlias

from ground.constants import Addr
from ground.errors import SetupError
from paft.flow import FiveTuple

__all__ = [
    "AnchorKeyLearned",
    "CloseSocket",
    "Failed",
    "HostEvent",
    "OpenSocket",
    "Outgoing",
    "Reexamine",
    "ResolveAnchors",
    "SocketKind",
    "VipaChanged",
]


class SocketKind(Enum):
    REGISTER = "register"  # REGISTER outside the tunnels, bound to an interface
    TUNNEL = "tunnel"  # the interface's tunnel, connected to the anchor's tunnel port


@dataclass(frozen=True, slots=True)
class Outgoing:
    kind: SocketKind
    interface: str
    data: bytes
    addr: Addr


@dataclass(frozen=True, slots=True)
class OpenSocket:
    """Open the socket; answer with `socket_opened` or `socket_failed`."""

    kind: SocketKind
    interface: str


@dataclass(frozen=True, slots=True)
class CloseSocket:
    kind: SocketKind
    interface: str


@dataclass(frozen=True, slots=True)
class VipaChanged:
    """The anchor gave another VIPA (open connections break): readdress the TUN."""

    old: str
    new: str


@dataclass(frozen=True, slots=True)
class AnchorKeyLearned:
    """An association under a key trusted on first use succeeded: remember the key."""

    key: bytes
    anchor: str = ""  # whose ("host:port"); "" for the first configured anchor


@dataclass(frozen=True, slots=True)
class ResolveAnchors:
    """The anchor failed over: look the SRV name up again (`set_srv_anchors` with the answer)."""


@dataclass(frozen=True, slots=True)
class Reexamine:
    """A flow whose owner was not found: look it up once more."""

    key: FiveTuple


@dataclass(frozen=True, slots=True)
class Failed:
    """The client cannot go on (at start-up: the anchor refused or cannot be reached)."""

    error: SetupError


HostEvent: TypeAlias = (
    OpenSocket | CloseSocket | VipaChanged | AnchorKeyLearned | Reexamine | ResolveAnchors | Failed
)
