"""The anchor node's validated configuration."""

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from anchor_node.leases import parse_pool
from upmt.errors import ConfigError


@dataclass(frozen=True)
class AnchorConfig:
    listen: str
    sip_port: int
    tunnel_port: int
    pool: ipaddress.IPv4Network
    state: Path
    control: Path
    tun_name: str = "upmt-an"
    expires: int = 600
    min_expires: int = 30
    max_expires: int = 86400
    flow_idle_timeout: float = 300.0
    tunnel_idle_timeout: float = 180.0
    max_tunnels_per_terminal: int = 8

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
        tun_name: str,
        expires: int,
        flow_idle_timeout: float,
        tunnel_idle_timeout: float,
    ) -> "AnchorConfig":
        try:
            ipaddress.IPv4Address(listen)
        except ValueError:
            raise ConfigError(f"--listen {listen!r} is not an IPv4 address") from None
        if sip_port == tunnel_port:
            raise ConfigError("--sip-port and --tunnel-port must differ")
        if not (0 < len(tun_name) < 16) or "/" in tun_name or " " in tun_name:
            raise ConfigError(f"--tun-name {tun_name!r} is not a valid interface name")
        return cls(
            listen=listen,
            sip_port=sip_port,
            tunnel_port=tunnel_port,
            pool=parse_pool(pool),
            state=state,
            control=control,
            tun_name=tun_name,
            expires=expires,
            flow_idle_timeout=flow_idle_timeout,
            tunnel_idle_timeout=tunnel_idle_timeout,
        )
