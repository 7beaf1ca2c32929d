"""Restarting the client in place, keeping every open connection.

A plain stop removes `upmt0`, its routes and rules: applications' packets
then leave by the physical interfaces with the VIPA as source, the far end
answers with RST, and connections break. `upmt-client restart` instead
hands the TUN, the tunnel sockets, the control socket and the routing (left
installed) to a fresh interpreter (`upmt.inplace`), with the association
(VIPA, key), tunnels, flows and pins: nothing the kernel sees changes.
"""

import socket
from pathlib import Path
from typing import Any, NoReturn

from paft.flow import FiveTuple
from upmt.inplace import Handover, exec_self, take_handover

ENV = "UPMT_CLIENT_INHERIT"


def take_inherited() -> Handover | None:
    return take_handover(ENV)


def restart(
    *, fds: dict[str, int], extra: dict[str, Any], state: dict[str, Any], state_file: Path
) -> NoReturn:
    exec_self(
        module="upmt_client", env_name=ENV, fds=fds, extra=extra, state=state, state_file=state_file
    )


def tunnel_socket(fd: int) -> socket.socket:
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return sock


def key_to_json(key: FiveTuple) -> list[Any]:
    return [key.proto, key.src.hex(), key.sport, key.dst.hex(), key.dport]


def key_from_json(item: list[Any]) -> FiveTuple:
    return FiveTuple(
        int(item[0]), bytes.fromhex(item[1]), int(item[2]), bytes.fromhex(item[3]), int(item[4])
    )
