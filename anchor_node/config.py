"""The anchor node's validated configuration."""

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from anchor_node.leases import parse_pool
from paft.aging import Aging
from upmt.errors import ConfigError
from upmt.names import is_ifname


@dataclass(frozen=True)
class AnchorConfig:
    listen: str
    sip_port: int
    tunnel_port: int
    pool: ipaddress.IPv4Network
    state: Path
    control: Path
    users: Path | None = None
    tun_name: str = "upmt-an"
    expires: int = 600
    min_expires: int = 30
    max_expires: int = 86400
    aging: Aging = field(default_factory=Aging)
    tunnel_idle_timeout: float = 180.0
    max_tunnels_per_terminal: int = 8
    max_flows_per_terminal: int = 65536
    sip_rate: float = 50.0
    offload: str = "auto"  # auto | on | off (--offload)

    @classmethod
    def build(
        cls,
        *,
        listen: str,
        sip_port: int,
        tunnel_port: int,
        pool: str,
        state: Path,
        control: Path,
        users: Path | None = None,
        tun_name: str = "upmt-an",
        expires: int = 600,
        tcp_idle_timeout: float = 7440.0,
        udp_idle_timeout: float = 300.0,
        tunnel_idle_timeout: float = 180.0,
        max_flows_per_terminal: int = 65536,
        max_tunnels_per_terminal: int = 8,
        sip_rate: float = 50.0,
        offload: str = "auto",
    ) -> "AnchorConfig":
        try:
            ipaddress.IPv4Address(listen)
        except ValueError:
            raise ConfigError(f"--listen {listen!r} is not an IPv4 address") from None
        if sip_port == tunnel_port:
            raise ConfigError("--sip-port and --tunnel-port must differ")
        if not is_ifname(tun_name):
            raise ConfigError(f"--tun-name {tun_name!r} is not a valid interface name")
        return cls(
            listen=listen,
            sip_port=sip_port,
            tunnel_port=tunnel_port,
            pool=parse_pool(pool),
            state=state,
            control=control,
            users=users,
            tun_name=tun_name,
            expires=expires,
            aging=Aging(tcp_idle=tcp_idle_timeout, udp_idle=udp_idle_timeout),
            tunnel_idle_timeout=tunnel_idle_timeout,
            max_tunnels_per_terminal=max_tunnels_per_terminal,
            max_flows_per_terminal=max_flows_per_terminal,
            sip_rate=sip_rate,
            offload=offload,
        )
