"""The client's tunnels as one state table: phase, timers, keys and probes per interface (pure).

Lifecycle of one interface's tunnel (`MobileHost` drives it):

    WAITING --usable--> (socket asked for) --opened--> SETTING_UP --200--> UP
       ^                                                 |  ^              |
       |                                      no answer: |  | retry        | probe loss
       |                                        backoff  v  |              v
       +------------------- link down ------------- (retry_at) <------- DEAD

A tunnel that was up and died stays DEAD (with its reason) until a set-up
succeeds again; WAITING means it never came up since its socket opened.
Back-off after a failed set-up or a death doubles from 1 s to 16 s and is
cut short when the interface changes. A socket that could not be opened is
asked for again after 1 s.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

from ground.constants import Addr
from signalling.handshake import SessionKeys, tunnel_keys
from tunnel.addr import format_hostport
from tunnel.crypto import KeyExhausted, Opener, Sealer, TunnelKeys
from tunnel.quality import Goodput
from tunnel.state import BUSY_SILENCE, ProbeScheduler
from upmt_client.forwarder import TunnelTraffic

__all__ = ["MAX_BACKOFF", "ClientTunnel", "TunnelPhase", "tunnel_channel"]

MAX_BACKOFF = 16.0
REOPEN_DELAY = 1.0


class TunnelPhase(Enum):
    WAITING = "waiting"  # the interface is down or has no address
    SETTING_UP = "setting-up"
    UP = "up"
    DEAD = "dead"


BUSY_FOR = 1.0  # a tunnel that moved packets this recently is probed fast


def answered_elsewhere(tunnels: Iterable[ClientTunnel], tunnel: ClientTunnel, now: float) -> bool:
    """Whether another tunnel heard from the anchor within `BUSY_SILENCE`."""
    for other in tunnels:
        heard = other.scheduler.last_heard if other.scheduler is not None else None
        if other is not tunnel and heard is not None and now - heard < BUSY_SILENCE:
            return True
    return False


def tunnel_channel(interface: str) -> str:
    return f"tunnel:{interface}"


@dataclass
class ClientTunnel:
    name: str
    number: int
    phase: TunnelPhase = TunnelPhase.WAITING
    # The tunnel socket's local address while it is open (the driver owns the socket).
    local: Addr | None = None
    # The driver was asked for a socket and has not answered yet.
    opening: bool = False
    # When to open the socket again (after a socket error), or to retry the set-up.
    reopen_at: float | None = None
    retry_at: float | None = None
    backoff: float = 1.0
    setting_up: bool = False
    scheduler: ProbeScheduler | None = None
    tunnel_id: str | None = None
    observed: str | None = None
    setups: int = 0
    down_reason: str = ""
    # This tunnel's AEAD keys (None: --encryption off); the data path holds the
    # same object, a rekey changes it in place.
    keys: TunnelKeys | None = None
    setup_failures: int = 0
    # The data path's packet count when last looked at, and until when the tunnel
    # counts as busy (probed fast); its goodput, sampled every second.
    traffic_seen: int = 0
    busy_until: float = float("-inf")
    goodput: Goodput = field(default_factory=Goodput)

    def note_traffic(
        self, traffic: TunnelTraffic | None, now: float, tunnels: Iterable[ClientTunnel] = ()
    ) -> None:
        """A tunnel whose packet count moved is busy for `BUSY_FOR` s: probed fast.

        Its silence is judged fast only while another of `tunnels` still hears
        the anchor (`answered_elsewhere`).
        """
        if traffic is not None and traffic.packets != self.traffic_seen:
            self.traffic_seen = traffic.packets
            self.busy_until = now + BUSY_FOR
        if self.scheduler is not None:
            elsewhere = answered_elsewhere(tunnels, self, now)
            self.scheduler.set_active(now < self.busy_until, elsewhere=elsewhere)

    @property
    def slot(self) -> int:
        """The tunnel's slot in the association's keys and receiver indexes."""
        return self.number - 1

    @property
    def open(self) -> bool:
        return self.local is not None

    @property
    def local_text(self) -> str | None:
        return None if self.local is None else format_hostport(self.local)

    def install_keys(self, keys: SessionKeys, now: float) -> None:
        """This tunnel's keys of a new association (the first ones, or a rekey)."""
        up, down = tunnel_keys(keys, self.slot)
        sealer = Sealer(up, keys.anchor_index + self.slot, created=now)
        opener = Opener(down, keys.terminal_index + self.slot, created=now)
        if self.keys is None:
            self.keys = TunnelKeys(sealer, opener)
        else:
            self.keys.rekey(sealer, opener)

    def seal(self, frame: bytes) -> bytes | None:
        """A control frame as it goes on the wire: sealed if encrypted; None if it cannot be."""
        if self.keys is None:
            return frame
        try:
            return self.keys.sealer.seal(frame)
        except KeyExhausted:
            return None

    def closed(self) -> None:
        """The socket is gone: nothing of the open tunnel remains but its keys and history."""
        self.local = None
        self.opening = False
        self.setting_up = False
        self.retry_at = None
        self.scheduler = None
