"""The anchor daemon's start-up steps, in the order `AnchorNode.main` takes them.

The order puts what can fail on bad configuration first (users and key
files, the ports, the store) and the kernel changes last (TUN,
nftables), so that a mistake costs nothing to undo. Each step that
acquires something registers its undo on the caller's ExitStack right
after acquiring it, so the stack undoes exactly what was done, in reverse,
whatever ends the daemon. A process started by a restart in place takes the
sockets, the TUN and the registrar's state over from its predecessor
(`anchor_node.inplace`) instead of creating them.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from anchor_node.config import AnchorConfig
from anchor_node.ha import HaReplica
from anchor_node.ha_state import StateSeal
from anchor_node.inplace import sockets as inherited_sockets
from anchor_node.pool import anchor_address
from anchor_node.registrar import Registrar
from anchor_node.store.api import StoreUnavailable
from anchor_node.store.location import open_store
from anchor_node.users import UserStore
from ground.constants import TUN_OVERHEAD, Addr
from ground.errors import SetupError
from nat.kernel import NatSetup
from paft.table import Paft
from signalling.handshake import StaticKey, encode_key
from tunnel.crypto import OVERHEAD
from tunnel.sockets import open_tunnel_socket
from upmt.control import bind_control_socket
from upmt.inplace import Inherited
from upmt.keyfile import load_or_create_key
from upmt.offload import offload_refusals, offload_status, set_udp_gro, udp_gso_refusal
from upmt.tun import TunDevice, adopt_tun, open_tun

__all__ = [
    "Sockets",
    "install_nat",
    "load_credentials",
    "negotiate_offload",
    "open_ha",
    "open_registrar",
    "open_sockets",
    "open_tun_device",
    "tun_mtu",
]

log = logging.getLogger("upmt.anchor")


def tun_mtu(encryption: bool, access_mtu: int = 1500) -> int:
    """The TUN's MTU: what fits inside a tunnel over an access link of `access_mtu`.

    The link carries `TUN_OVERHEAD` (outer IPv4, UDP, the frame's type byte)
    in front of each inner packet and, with encryption, the ENCRYPTED frame's
    header and tag.
    """
    return access_mtu - TUN_OVERHEAD - (OVERHEAD if encryption else 0)


def load_credentials(cfg: AnchorConfig) -> tuple[UserStore | None, StaticKey]:
    """The users file (None: no authentication) and the anchor's key, created if absent."""
    if cfg.users is None:
        log.warning(
            "running WITHOUT authentication (no --users file): anyone who reaches "
            "the SIP port can associate and get a VIPA"
        )
    users = UserStore.load(cfg.users) if cfg.users is not None else None
    cfg.key_file.parent.mkdir(parents=True, exist_ok=True)
    static_key = load_or_create_key(
        cfg.key_file,
        what="anchor key",
        on_create=lambda _k: log.info("created the anchor key %s", cfg.key_file),
    )
    if not cfg.encryption:
        log.warning(
            "tunnel encryption is OFF (--encryption off): tunnel frames travel in "
            "clear and unauthenticated; only for networks you trust"
        )
    return users, static_key


@dataclass(frozen=True)
class Sockets:
    """The anchor's three sockets, also handed on by a restart in place."""

    sip: socket.socket
    tunnel: socket.socket
    control: socket.socket


def open_sockets(
    cfg: AnchorConfig, stack: contextlib.ExitStack, inherited: Inherited | None
) -> Sockets:
    """The SIP and tunnel ports and the control socket: bound afresh, or inherited.

    Inherited SIP and tunnel sockets are not closed here (they close with the
    process); the control socket is closed and its path removed on any exit.
    """
    if inherited is not None:
        sip_sock, tunnel_sock, control_sock = inherited_sockets(inherited)
    else:
        sip_sock = _udp_socket(cfg, cfg.sip_port, "SIP")
        stack.callback(sip_sock.close)
        tunnel_sock = _udp_socket(cfg, cfg.tunnel_port, "tunnel")
        stack.callback(tunnel_sock.close)
        control_sock = bind_control_socket(cfg.control)
    stack.callback(_unlink, cfg.control)
    stack.callback(control_sock.close)
    return Sockets(sip_sock, tunnel_sock, control_sock)


def _udp_socket(cfg: AnchorConfig, port: int, what: str) -> socket.socket:
    try:
        # An HA node binds the shared address before (or without) holding it.
        return open_tunnel_socket(
            interface=None,
            mark=None,
            bind=(cfg.listen, port),
            freebind=cfg.ha_address is not None,
        )
    except SetupError as exc:
        raise SetupError(f"{what} port: {exc}") from None


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def open_registrar(
    cfg: AnchorConfig,
    stack: contextlib.ExitStack,
    paft: Paft[Addr],
    users: UserStore | None,
    static_key: StaticKey,
    *,
    fresh: bool = True,
) -> Registrar:
    """The store (closed on any exit) and the registrar around it.

    `fresh`: no predecessor hands its state over, so this anchor's tunnel
    records in the store are stale and go.
    """
    cfg.state.parent.mkdir(parents=True, exist_ok=True)
    store = open_store(
        cfg.store_location,
        cfg.pool,
        shared_pool=cfg.shared_pool,
        prefix_cap=cfg.max_leases_per_prefix,
        anchor_id=cfg.anchor_id,
    )
    stack.callback(store.close)
    # An HA node shares its anchor id with the other node, whose records they are.
    if fresh and cfg.ha_address is None:
        try:
            store.clear_tunnels()
        except StoreUnavailable as exc:
            log.warning("stale tunnel records kept: %s", exc)
    registrar = Registrar(
        store,
        paft,
        static_key=static_key,
        encryption=cfg.encryption,
        default_expires=cfg.expires,
        min_expires=cfg.min_expires,
        max_expires=cfg.max_expires,
        max_tunnels=cfg.max_tunnels_per_terminal,
        users=users,
        max_terminals=cfg.max_terminals,
        redirect_to=cfg.redirect_to,
    )
    log.info("anchor key %s (clients pin it with --anchor-key)", encode_key(static_key.public))
    return registrar


def open_tun_device(
    cfg: AnchorConfig,
    stack: contextlib.ExitStack,
    inherited: Inherited | None,
    registrar: Registrar,
) -> TunDevice:
    """The TUN (deleted with its routes when closed): created, or adopted with the state.

    A restarted process takes over its predecessor's associations and flows
    here, once the TUN they route through is its own.
    """
    if inherited is not None:
        tun = adopt_tun(str(inherited.extra["tun_name"]), inherited.fds["tun"])
        restored = registrar.import_state(inherited.state, trio.current_time(), time.monotonic())
        log.info(
            "restarted in place: %d terminals, %d flows taken over",
            restored,
            len(registrar.paft),
        )
    else:
        tun = open_tun(
            cfg.tun_name,
            address=str(anchor_address(cfg.routed_pool)),
            prefixlen=cfg.routed_pool.prefixlen,
            mtu=tun_mtu(cfg.encryption),
            vnet_hdr=cfg.offload != "off",
        )
    stack.callback(tun.close)
    return tun


def negotiate_offload(
    cfg: AnchorConfig, tun: TunDevice, tunnel_sock: socket.socket
) -> dict[str, str]:
    """UDP GRO to match the TUN's offloads; what is in force, for the status.

    SetupError when `--offload on` cannot be had.
    """
    # Also off explicitly: a socket handed over by exec keeps the option.
    gro_refused = set_udp_gro(tunnel_sock, tun.vnet_hdr)
    refusals = offload_refusals(
        tun.vnet_hdr, tun.offload, gro_refused, udp_gso_refusal(tunnel_sock)
    )
    if cfg.offload == "on" and refusals:
        raise SetupError(f"--offload on: {'; '.join(refusals)}")
    return offload_status(cfg.offload, tun.vnet_hdr, tun.offload, tun.offload_refused, gro_refused)


def install_nat(cfg: AnchorConfig, stack: contextlib.ExitStack) -> NatSetup:
    """The nftables table for the pool, removed on any exit (also after a failed install)."""
    nat = NatSetup(
        str(cfg.routed_pool),
        cfg.tun_name,
        record=cfg.state.with_name(cfg.state.name + ".kernel.json"),
        allow_prefixes=[str(p) for p in cfg.allow_prefixes],
        client_to_client=cfg.client_to_client,
        shared_address=None if cfg.ha_address is None else str(cfg.ha_address),
    )
    stack.callback(nat.remove)
    nat.install()
    return nat


def open_ha(cfg: AnchorConfig, registrar: Registrar) -> HaReplica | None:
    """An HA pair's node: its replica of the terminals' state in the store (None: no pair)."""
    if cfg.ha_address is None:
        return None
    from anchor_node.store.postgres import PostgresStore

    store = registrar.store
    if not isinstance(store, PostgresStore):  # AnchorConfig.build requires PostgreSQL
        raise SetupError("--ha-address needs --store postgresql://...")
    log.info(
        "HA node %s of the pair sharing %s (anchor id %s): standby until it holds the address",
        cfg.ha_node,
        cfg.ha_address,
        cfg.anchor_id,
    )
    return HaReplica(
        store,
        registrar.table,
        StateSeal(registrar.static_key, cfg.anchor_id),
        node=cfg.ha_node,
        wall_clock=time.time,
    )
