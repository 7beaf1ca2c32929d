"""The anchor node's validated configuration."""

import ipaddress
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from anchor_node.pool import parse_pool, parse_shared_pool
from anchor_node.store.location import StoreLocation, parse_store
from ground.constants import Addr
from ground.errors import ConfigError
from ground.names import is_ifname
from paft.aging import Aging
from tunnel.addr import parse_hostport, parse_listen
from upmt.snmp_config import SnmpSettings, parse_snmp

# Anchor ids name anchors in the shared store and its notifications.
_ANCHOR_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


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
    store: StoreLocation | None = None  # --store; None: the SQLite file `state`
    shared_pool: ipaddress.IPv4Network | None = None  # --shared-pool; None: `pool`
    anchor_id: str = field(default_factory=socket.gethostname)
    ha_address: ipaddress.IPv4Address | None = None  # --ha-address: one node of an HA pair
    ha_conntrackd: Path | None = None  # --ha-conntrackd: its conntrackd's configuration
    ha_node: str = field(default_factory=socket.gethostname)  # --ha-node

    @property
    def store_location(self) -> StoreLocation:
        return self.store if self.store is not None else StoreLocation(path=self.state)

    @property
    def routed_pool(self) -> ipaddress.IPv4Network:
        """What this anchor routes to its TUN and NATs: the shared pool, since a terminal
        keeps a VIPA of any anchor's sub-pool."""
        return self.shared_pool if self.shared_pool is not None else self.pool

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
        store: str | None = None,
        shared_pool: str | None = None,
        anchor_id: str | None = None,
        ha_address: str | None = None,
        ha_conntrackd: Path | None = None,
        ha_node: str | None = None,
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
        own_pool = parse_pool(pool)
        location = None if store is None else parse_store(store, state)
        shared = _ha_address(ha_address, listen, location, ha_conntrackd)
        if shared is not None:
            listen = str(shared)
        anchor_id = _name(anchor_id, "--anchor-id")
        return cls(
            listen=listen,
            sip_port=sip_port,
            tunnel_port=tunnel_port,
            pool=own_pool,
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
            store=location,
            shared_pool=None if shared_pool is None else parse_shared_pool(shared_pool, own_pool),
            anchor_id=anchor_id,
            ha_address=shared,
            ha_conntrackd=ha_conntrackd,
            ha_node=_name(ha_node, "--ha-node"),
        )


def _name(text: str | None, option: str) -> str:
    name = socket.gethostname() if text is None else text
    if not _ANCHOR_ID_RE.fullmatch(name):
        raise ConfigError(f"{option} {name!r}: 1 to 64 letters, digits, '.', '_' or '-'")
    return name


def _ha_address(
    text: str | None,
    listen: str,
    store: StoreLocation | None,
    conntrackd: Path | None,
) -> ipaddress.IPv4Address | None:
    """--ha-address, checked against what an HA pair's node needs."""
    if text is None:
        if conntrackd is not None:
            raise ConfigError("--ha-conntrackd needs --ha-address")
        return None
    try:
        address = ipaddress.IPv4Address(text)
    except ValueError:
        raise ConfigError(f"--ha-address {text!r} is not an IPv4 address") from None
    if address.is_unspecified or address.is_multicast or address.is_loopback:
        raise ConfigError(f"--ha-address {text}: a unicast address of the public interface")
    if listen not in ("0.0.0.0", str(address)):
        raise ConfigError(f"--listen {listen}: an HA node listens on its --ha-address {text}")
    if store is None or not store.shared:
        raise ConfigError(
            "--ha-address needs --store postgresql://...: the pair's nodes share the "
            "terminals' state through it"
        )
    return address


def default_key_file(state: Path) -> Path:
    """The anchor key file kept beside the lease store: `<state stem>.key`."""
    return state.with_name(state.stem + ".key")
