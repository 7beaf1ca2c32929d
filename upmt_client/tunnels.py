"""The client's view of one tunnel: its phase, socket, SIP channel and probes."""

import socket
from dataclasses import dataclass, field
from enum import Enum

import trio

from tunnel.state import ProbeScheduler
from upmt.sipchannel import SipChannel


class TunnelPhase(Enum):
    WAITING = "waiting"  # the interface is down or has no address
    SETTING_UP = "setting-up"
    UP = "up"
    DEAD = "dead"


@dataclass
class ClientTunnel:
    name: str
    number: int
    phase: TunnelPhase = TunnelPhase.WAITING
    sock: socket.socket | None = None
    sip: SipChannel | None = None
    scheduler: ProbeScheduler | None = None
    tunnel_id: str | None = None
    observed: str | None = None
    local: str | None = None
    setups: int = 0
    down_reason: str = ""
    retry: trio.Event = field(default_factory=trio.Event)
    # A socket (and a live tunnel) handed over by an in-place restart.
    inherited: socket.socket | None = None
