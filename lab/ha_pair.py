"""The lab's HA pair: anchors on `an` and `an2` sharing `HA_ADDR` (keepalived, conntrackd).

Set up as an operator would (docs/ha.md): `anchor-node ha config` on each
host writes keepalived's and conntrackd's files, conntrackd and keepalived
start from them, and both anchors run with the options it printed, one key,
one anchor id and one pool on the lab's PostgreSQL. `an` has the higher
priority, so it is the first master.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ground.errors import UpmtError
from lab.scenario import wait_until
from lab.topology import AN2_ADDR, AN_ADDR, HA_ADDR, HA_SYNC, Daemon, Lab

if TYPE_CHECKING:
    from anchor_node.ha_config import HaSettings

__all__ = ["HA_POOL", "HaNode", "HaPair", "kill_host", "start_ha_pair"]

HA_POOL = "100.64.0.0/24"
HA_ANCHOR_ID = "pair"


@dataclass
class HaNode:
    role: str  # the lab host
    name: str  # its node name (--ha-node)
    anchor: Daemon
    keepalived: Daemon
    conntrackd: Daemon
    conf_dir: Path

    def ha(self) -> dict[str, Any]:
        status: dict[str, Any] = self.anchor.status()["ha"]
        return status

    def holds_address(self, lab: Lab) -> bool:
        return f" {HA_ADDR}/" in lab.ip(self.role, "-4", "-o", "addr", "show", "dev", "eth0")


@dataclass
class HaPair:
    first: HaNode
    second: HaNode

    @property
    def nodes(self) -> tuple[HaNode, HaNode]:
        return self.first, self.second

    def active(self) -> HaNode | None:
        for node in self.nodes:
            try:
                if node.anchor.running() and node.ha()["role"] == "active":
                    return node
            except UpmtError:  # its control socket is gone with it
                continue
        return None


def _configure(
    lab: Lab, role: str, name: str, peer: str, priority: int, advert: float, pool: str
) -> HaSettings:
    """`anchor-node ha config` on the host, as an operator runs it; the same settings."""
    from anchor_node.ha_config import HaSettings

    conf_dir = lab.workdir / f"ha-{name}"
    run_dir = lab.workdir / f"ha-{name}.run"
    other = "an2" if role == "an" else "an"
    run_dir.mkdir(mode=0o700, exist_ok=True)  # the units' RuntimeDirectory
    lab.exec(
        role,
        lab.python(),
        "-m",
        "anchor_node",
        "ha",
        "config",
        "--address",
        f"{HA_ADDR}/24",
        "--interface",
        "eth0",
        "--peer",
        peer,
        "--priority",
        str(priority),
        "--advert-interval",
        str(advert),
        "--sync-interface",
        "ha0",
        "--sync-local",
        HA_SYNC[role],
        "--sync-peer",
        HA_SYNC[other],
        "--pool",
        pool,
        "--dir",
        str(conf_dir),
        "--run-dir",
        str(run_dir),
        "--node-name",
        name,
    )
    return HaSettings(
        address=ipaddress.IPv4Interface(f"{HA_ADDR}/24"),
        interface="eth0",
        local=ipaddress.IPv4Address(AN_ADDR if role == "an" else AN2_ADDR),
        peer=ipaddress.IPv4Address(peer),
        priority=priority,
        advert_interval=advert,
        sync_interface="ha0",
        sync_local=ipaddress.IPv4Address(HA_SYNC[role]),
        sync_peer=ipaddress.IPv4Address(HA_SYNC[other]),
        pool=ipaddress.IPv4Network(pool),
        conf_dir=conf_dir,
        run_dir=run_dir,
        node_name=name,
    )


def start_ha_pair(
    lab: Lab,
    *args: str,
    advert_interval: float = 0.2,
    pool: str = HA_POOL,
    timeout: float = 30.0,
) -> HaPair:
    """Both nodes up, `an` holding the shared address and active; `args` go to both anchors."""
    from anchor_node.ha_config import conntrackd_argv, keepalived_argv

    url = lab.store_url()
    lab.exec("an", lab.python(), "-m", "anchor_node", "store", "migrate", "--store", url)
    key = lab.workdir / "pair.key"
    lab.exec("an", lab.python(), "-m", "anchor_node", "key", "--key", str(key))
    nodes = []
    for role, name, peer, priority in (("an", "an1", AN2_ADDR, 150), ("an2", "an2", AN_ADDR, 100)):
        settings = _configure(lab, role, name, peer, priority, advert_interval, pool)
        conf_dir = settings.conf_dir
        conntrackd = lab.start(role, f"conntrackd-{name}", conntrackd_argv(settings))
        anchor = lab.start_anchor(
            "--ha-address",
            HA_ADDR,
            "--ha-conntrackd",
            str(conf_dir / "conntrackd.conf"),
            "--ha-node",
            name,
            "--store",
            url,
            "--anchor-id",
            HA_ANCHOR_ID,
            "--pool",
            pool,
            "--key",
            str(key),
            *args,
            name=f"anchor-{name}",
            role=role,
            listen=HA_ADDR,
        )
        wait_until(anchor.status, timeout, f"{anchor.name}'s control socket", (anchor,))
        keepalived = lab.start(role, f"keepalived-{name}", keepalived_argv(settings))
        nodes.append(HaNode(role, name, anchor, keepalived, conntrackd, conf_dir))
    pair = HaPair(nodes[0], nodes[1])
    daemons = tuple(d for n in pair.nodes for d in (n.anchor, n.keepalived, n.conntrackd))
    wait_until(
        lambda: pair.active() is pair.first, timeout, "an1 active with the shared address", daemons
    )
    return pair


def kill_host(lab: Lab, node: HaNode) -> None:
    """The node's host dies: its links go down, then everything on it stops at once."""
    for dev in ("eth0", "ha0"):
        lab.ip(node.role, "link", "set", dev, "down")
    for daemon in (node.anchor, node.keepalived, node.conntrackd):
        daemon.kill()
