"""The anchor node's validated configuration."""

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from anchor_node.leases import parse_pool
from ground.constants import Addr
from ground.errors import ConfigError
from ground.names import is_ifname
from paft.aging import Aging
from tunnel.addr import parse_hostport, parse_listen
from upmt.snmp_config import SnmpSettings, parse_snmp


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
    sip_transactions_per_source: int = 256
    offload: str = "auto"  # auto | on | off (--offload)
    encryption: bool = True  # --encryption on|off
    key: Path | None = None  # the static key file; None: beside the state file
    max_leases_per_prefix: int = 1024
    allow_prefixes: tuple[ipaddress.IPv4Network, ...] = ()
    client_to_client: bool = False
    metrics: tuple[str, int] | None = None  # --metrics: Prometheus over HTTP there
    snmp: SnmpSettings | None = None  # --snmp and what goes with it
    max_terminals: int | None = None  # --max-terminals: beyond, REGISTER gets 302 (or 503)
    redirect_to: tuple[Addr, ...] = ()  # --redirect-to: the other anchors' SIP addresses

    @property
    def key_file(self) -> Path:
        """Where the anchor's static X25519 key lives (generated on first start)."""
        return self.key if self.key is not None else default_key_file(self.state)

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
        sip_transactions_per_source: int = 256,
        offload: str = "auto",
        encryption: str = "on",
        key: Path | None = None,
        max_leases_per_prefix: int = 1024,
        allow_prefixes: tuple[str, ...] = (),
        client_to_client: bool = False,
        metrics: str | None = None,
        snmp: str | None = None,
        snmp_community: str | None = None,
        snmp_v3_users: tuple[str, ...] = (),
        snmp_trap: str | None = None,
        max_terminals: int | None = None,
        redirect_to: tuple[str, ...] = (),
    ) -> "AnchorConfig":
        try:
            ipaddress.IPv4Address(listen)
        except ValueError:
            raise ConfigError(f"--listen {listen!r} is not an IPv4 address") from None
        if sip_port == tunnel_port:
            raise ConfigError("--sip-port and --tunnel-port must differ")
        if not is_ifname(tun_name):
            raise ConfigError(f"--tun-name {tun_name!r} is not a valid interface name")
        if encryption not in ("on", "off"):
            raise ConfigError(f"--encryption {encryption!r}: use on or off")
        allowed = []
        for text in allow_prefixes:
            try:
                allowed.append(ipaddress.IPv4Network(text, strict=False))
            except ValueError:
                raise ConfigError(f"--allow-prefix {text!r} is not an IPv4 prefix") from None
        redirects = []
        for text in redirect_to:
            host, port = parse_hostport(text, sip_port)
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ConfigError(f"--redirect-to {text!r}: an IPv4 address[:port]") from None
            if (host, port) == (listen, sip_port):
                raise ConfigError(f"--redirect-to {text!r} is this anchor itself")
            redirects.append((host, port))
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
            sip_transactions_per_source=sip_transactions_per_source,
            offload=offload,
            encryption=encryption == "on",
            key=key,
            max_leases_per_prefix=max_leases_per_prefix,
            allow_prefixes=tuple(allowed),
            client_to_client=client_to_client,
            metrics=None if metrics is None else parse_listen(metrics, "--metrics"),
            snmp=parse_snmp(snmp, snmp_community, snmp_v3_users, snmp_trap),
            max_terminals=max_terminals,
            redirect_to=tuple(redirects),
        )


def default_key_file(state: Path) -> Path:
    """The anchor key file kept beside the lease store: `<state stem>.key`."""
    return state.with_name(state.stem + ".key")
