"""Restarting the anchor in place, without dropping a connection.

A plain stop removes the nftables table; with no NAT hook left in the
namespace, the kernel stops translating replies of NATed connections and
delivers them to its own stack, which answers with RST (measured). So
`anchor-node restart` does not stop: the running process hands its TUN,
sockets, control socket, associations, tunnels, keys and flows to a fresh
interpreter (`upmt.inplace`). The new process adopts them and re-applies
the nftables table atomically, so the NAT hooks never go away: no datagram
is refused and no packet leaves un-NATed.
"""

import socket
from pathlib import Path
from typing import Any, NoReturn

import upmt.inplace as upmt_inplace
from upmt.inplace import Inherited, exec_self

ENV = "UPMT_ANCHOR_INHERIT"


def take_inherited() -> Inherited | None:
    return upmt_inplace.take_inherited(ENV)


def sockets(inherited: Inherited) -> tuple[socket.socket, socket.socket, socket.socket]:
    sip = socket.socket(fileno=inherited.fds["sip"])
    tunnel = socket.socket(fileno=inherited.fds["tunnel"])
    control = socket.socket(fileno=inherited.fds["control"])
    for sock in (sip, tunnel):
        sock.setblocking(False)
    return sip, tunnel, control


def restart(
    *, tun_name: str, fds: dict[str, int], state: dict[str, Any], state_file: Path
) -> NoReturn:
    exec_self(
        module="anchor_node",
        env_name=ENV,
        fds=fds,
        extra={"tun_name": tun_name},
        state=state,
        state_file=state_file,
    )
