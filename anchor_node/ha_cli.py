"""`anchor-node ha config`: keepalived's and conntrackd's files for one node of the HA pair.

Run once on each node, with the addresses swapped and the priorities
different; it writes the files (see `anchor_node.ha_config`) and prints what
to add to `anchor-node run` and the two commands to start, which the units
deploy/upmt-conntrackd.service and deploy/upmt-keepalived.service run for
the default directories. Errors are `ConfigError`s, which the main command
line prints as one line.
"""

from __future__ import annotations

import ipaddress
import json
import shlex
import socket
import subprocess
from pathlib import Path

import click

from ground.errors import ConfigError

from .ha_config import (
    DEFAULT_POOL,
    HaSettings,
    anchor_options,
    check_interface,
    conntrackd_argv,
    keepalived_argv,
    validate,
    write_files,
)

__all__ = ["ha", "interface_address"]

DEFAULTS = HaSettings(
    address=ipaddress.IPv4Interface("192.0.2.1/24"),
    interface="eth0",
    local=ipaddress.IPv4Address("192.0.2.2"),
    peer=ipaddress.IPv4Address("192.0.2.3"),
    node_name="-",
)


def _address(option: str, text: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise ConfigError(f"{option} {text!r} is not an IPv4 address") from None


def _shared_address(text: str) -> ipaddress.IPv4Interface:
    if "/" not in text:
        raise ConfigError(f"--address {text!r}: give the prefix length too (ADDR/PLEN)")
    try:
        return ipaddress.IPv4Interface(text)
    except ValueError:
        raise ConfigError(f"--address {text!r} is not an IPv4 ADDR/PLEN") from None


def _pool(text: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(text)
    except ValueError:
        raise ConfigError(f"--pool {text!r} is not an IPv4 prefix") from None


def interface_address(
    interface: str, shared: ipaddress.IPv4Address | None = None
) -> ipaddress.IPv4Address:
    """The interface's first IPv4 address but the shared one (`ip -j -4 addr show dev IF`)."""
    check_interface("--interface", interface)
    argv = ["ip", "-j", "-4", "addr", "show", "dev", interface]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"--local not given and `{shlex.join(argv)}` failed: {exc}") from None
    if proc.returncode != 0:
        reason = (proc.stderr.strip() or f"exit {proc.returncode}").splitlines()[0]
        raise ConfigError(f"--interface {interface}: {reason}")
    try:
        links = json.loads(proc.stdout or "[]")
        for link in links:
            for info in link.get("addr_info", []):
                if info.get("family") == "inet":
                    found = ipaddress.IPv4Address(info["local"])
                    if found != shared:
                        return found
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError(f"`{shlex.join(argv)}`: unexpected output") from None
    raise ConfigError(f"--interface {interface} has no IPv4 address of its own: give --local")


@click.group()
def ha() -> None:
    """The HA pair: two anchors sharing one public address (keepalived, conntrackd)."""


@ha.command()
@click.option(
    "--address",
    required=True,
    metavar="ADDR/PLEN",
    help="The shared public address with its prefix length, e.g. 198.51.100.10/24.",
)
@click.option(
    "--interface",
    required=True,
    metavar="IF",
    help="The public interface: VRRP adverts and the shared address.",
)
@click.option(
    "--local",
    default=None,
    metavar="ADDR",
    help="This node's own address on --interface, the adverts' source "
    "[default: the interface's first IPv4 address].",
)
@click.option(
    "--peer", required=True, metavar="ADDR", help="The other node's address on --interface."
)
@click.option(
    "--priority",
    type=int,
    default=DEFAULTS.priority,
    show_default=True,
    help="VRRP priority 1..254; the higher one wins the first election (give the nodes "
    "different ones).",
)
@click.option(
    "--router-id",
    type=int,
    default=DEFAULTS.router_id,
    show_default=True,
    help="VRRP virtual router id 1..255, the same on both nodes.",
)
@click.option(
    "--advert-interval",
    type=float,
    default=DEFAULTS.advert_interval,
    show_default=True,
    metavar="SECONDS",
    help="Between VRRP adverts, 0.01..40 in steps of 0.01; the backup takes over "
    "3 to 4 intervals after the last advert.",
)
@click.option(
    "--sync-interface",
    default=None,
    metavar="IF",
    help="conntrackd's link, best a dedicated one [default: --interface].",
)
@click.option(
    "--sync-local",
    default=None,
    metavar="ADDR",
    help="This node's address on the sync link [default: --local].",
)
@click.option(
    "--sync-peer",
    default=None,
    metavar="ADDR",
    help="The other node's address on the sync link [default: --peer].",
)
@click.option(
    "--sync-port",
    type=int,
    default=DEFAULTS.sync_port,
    show_default=True,
    help="conntrackd's UDP port, the same on both nodes.",
)
@click.option(
    "--pool",
    default=str(DEFAULT_POOL),
    show_default=True,
    help="The VIPA pool (as `anchor-node run --pool`): only its flows' NAT state is replicated.",
)
@click.option(
    "--dir",
    "conf_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULTS.conf_dir,
    show_default=True,
    help="Where the files go (the units read /etc/upmt/ha).",
)
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULTS.run_dir,
    show_default=True,
    help="conntrackd's lock file and control socket, keepalived's pid files.",
)
@click.option("--node-name", default=None, help="keepalived's router_id [default: the host name].")
def config(
    address: str,
    interface: str,
    local: str | None,
    peer: str,
    priority: int,
    router_id: int,
    advert_interval: float,
    sync_interface: str | None,
    sync_local: str | None,
    sync_peer: str | None,
    sync_port: int,
    pool: str,
    conf_dir: Path,
    run_dir: Path,
    node_name: str | None,
) -> None:
    """Write keepalived's and conntrackd's files and the notify script for this node."""
    shared = _shared_address(address)
    check_interface("--interface", interface)
    peer_address = _address("--peer", peer)
    sync_local_address = _address("--sync-local", sync_local) if sync_local is not None else None
    sync_peer_address = _address("--sync-peer", sync_peer) if sync_peer is not None else None
    vipa_pool = _pool(pool)
    settings = HaSettings(
        address=shared,
        interface=interface,
        local=(
            _address("--local", local)
            if local is not None
            else interface_address(interface, shared.ip)
        ),
        peer=peer_address,
        priority=priority,
        router_id=router_id,
        advert_interval=advert_interval,
        sync_interface=sync_interface,
        sync_local=sync_local_address,
        sync_peer=sync_peer_address,
        sync_port=sync_port,
        pool=vipa_pool,
        conf_dir=conf_dir,
        run_dir=run_dir,
        node_name=node_name if node_name is not None else socket.gethostname(),
    )
    validate(settings)
    for path in write_files(settings):
        click.echo(f"wrote {path}")
    click.echo("add to the options of `anchor-node run`:")
    click.echo(f"  {shlex.join(anchor_options(settings))}")
    if settings.conf_dir == DEFAULTS.conf_dir and settings.run_dir == DEFAULTS.run_dir:
        click.echo(
            "start conntrackd, then keepalived: "
            "systemctl enable --now upmt-conntrackd upmt-keepalived, which run"
        )
    else:
        # conntrackd takes a missing directory for a lock file left behind.
        click.echo("run, conntrackd first:")
        click.echo(f"  {shlex.join(['mkdir', '-p', str(settings.run_dir)])}")
    click.echo(f"  {shlex.join(conntrackd_argv(settings))}")
    click.echo(f"  {shlex.join(keepalived_argv(settings))}")
