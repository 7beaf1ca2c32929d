"""The client's view of one tunnel: its phase, socket, keys, SIP channel and probes."""

import socket
from dataclasses import dataclass, field
from enum import Enum

import trio

from signalling.handshake import SessionKeys, tunnel_keys
from tunnel.crypto import KeyExhausted, Opener, Sealer, TunnelKeys
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
    # This tunnel's AEAD keys (None: --encryption off); the data path holds the
    # same object, a rekey changes it in place.
    keys: TunnelKeys | None = None
    setup_failures: int = 0

    @property
    def slot(self) -> int:
        """The tunnel's slot in the association's keys and receiver indexes."""
        return self.number - 1

    def install_keys(self, keys: SessionKeys, now: float) -> None:
        """This tunnel's keys of a new association (the first ones, or a rekey)."""
        up, down = tunnel_keys(keys, self.slot)
        sealer = Sealer(up, keys.anchor_index + self.slot, created=now)
        opener = Opener(down, keys.terminal_index + self.slot, created=now)
        if self.keys is None:
            self.keys = TunnelKeys(sealer, opener)
        else:
            self.keys.rekey(sealer, opener)

    def send_frame(self, frame: bytes) -> bool:
        """Send one control frame (PROBE, SIGNAL) on the tunnel, sealed if encrypted."""
        sock = self.sock
        if sock is None:
            return False
        try:
            data = frame if self.keys is None else self.keys.sealer.seal(frame)
            sock.send(data)
        except (OSError, KeyExhausted):
            return False
        return True
