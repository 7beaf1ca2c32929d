"""The client's sockets, opened and closed when the core asks (`OpenSocket`, `CloseSocket`).

A tunnel socket is bound to its interface, marked to bypass the TUN
(`upmt_client.routing.FWMARK`) and connected to the anchor's tunnel port;
the data-path thread reads it (control frames come back to the core through
the data path). A REGISTER socket is bound and marked the same way, not
connected, and read here by a trio task that feeds the core. Tunnel sockets
handed over by a restart in place are used instead of new ones.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable

import trio

from ground.errors import SetupError
from tunnel.sockets import open_tunnel_socket
from upmt_client.datapath import ClientDataPath
from upmt_client.host import MobileHost
from upmt_client.host_events import Outgoing, SocketKind
from upmt_client.routing import FWMARK

__all__ = ["HostSockets"]


class HostSockets:
    def __init__(
        self,
        host: MobileHost,
        nursery: trio.Nursery,
        pump: Callable[[], None],
        inherited: dict[str, socket.socket] | None = None,
    ) -> None:
        self._host = host
        self._nursery = nursery
        self._pump = pump
        self._inherited = dict(inherited or {})
        self.sockets: dict[tuple[SocketKind, str], socket.socket] = {}
        self._readers: dict[str, trio.CancelScope] = {}
        self.datapath: ClientDataPath | None = None

    def open(self, kind: SocketKind, name: str, now: float) -> None:
        """Open the socket and tell the core how that went."""
        try:
            sock = self._inherited.pop(name, None) if kind is SocketKind.TUNNEL else None
            if sock is None and kind is SocketKind.TUNNEL:
                sock = open_tunnel_socket(interface=name, mark=FWMARK)
                sock.connect(self._host.anchor_tunnel)
            elif sock is None:
                sock = open_tunnel_socket(interface=name, mark=FWMARK, rcvbuf=None, sndbuf=None)
            local = sock.getsockname()[:2]
        except (SetupError, OSError) as exc:
            self._host.socket_failed(kind, name, str(exc), now)
            return
        self.sockets[(kind, name)] = sock
        if kind is SocketKind.TUNNEL:
            assert self.datapath is not None
            self.datapath.attach(name, sock, self._host.tunnels[name].keys)
        else:
            scope = trio.CancelScope()
            self._readers[name] = scope
            self._nursery.start_soon(self._read_register, name, sock, scope)
        self._host.socket_opened(kind, name, local, now)

    def close(self, kind: SocketKind, name: str) -> None:
        sock = self.sockets.pop((kind, name), None)
        if kind is SocketKind.TUNNEL and self.datapath is not None:
            self.datapath.detach(name)
        elif (scope := self._readers.pop(name, None)) is not None:
            scope.cancel()
        if sock is not None:
            sock.close()

    def close_all(self) -> None:
        for kind, name in list(self.sockets):
            self.close(kind, name)
        for sock in self._inherited.values():
            sock.close()
        self._inherited.clear()

    def fileno(self, kind: SocketKind, name: str) -> int:
        return self.sockets[(kind, name)].fileno()

    def send(self, datagrams: list[Outgoing]) -> None:
        for out in datagrams:
            sock = self.sockets.get((out.kind, out.interface))
            if sock is None:
                continue
            with contextlib.suppress(OSError):
                if out.kind is SocketKind.TUNNEL:
                    sock.send(out.data)
                else:
                    sock.sendto(out.data, out.addr)

    async def _read_register(self, name: str, sock: socket.socket, scope: trio.CancelScope) -> None:
        with scope:
            tsock = trio.socket.from_stdlib_socket(sock)
            while True:
                try:
                    data, addr = await tsock.recvfrom(65535)
                except OSError:
                    await trio.sleep(0.1)
                    continue
                self._host.receive_register(name, data, addr[:2], trio.current_time())
                self._pump()
